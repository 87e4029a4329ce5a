"""Typed run configuration: one dataclass per section, YAML recipes, ``key=value`` overrides.

Every command reads the same :class:`Config`. A recipe in ``configs/`` sets only what differs from the defaults
below, and dotted overrides on the command line win over the recipe::

    diffusion-pref train --config configs/sd15_dpo_lora.yaml train.max_steps=100 loss.beta=5000

Merging and type conversion are OmegaConf structured configs; this module adds what OmegaConf does not say
clearly: an unknown key names the nearest valid key, a key that moved (``RENAMED``) names its new key, a badly
typed value names the key and the expected type, a value outside a ``Literal`` field's choices lists them and
names the nearest, and a number out of its range (``RANGES``) names the range; :func:`validate` holds the rules
between keys. ``load_config`` returns plain dataclass instances, so the rest of the code reads
``cfg.train.batch_size`` with types it can trust. :func:`resolve_runtime` is the one place "auto" device and
precision are resolved.

The resolved config is written as ``config.yaml`` into ``output.dir`` by every run; passing that file back with
``--config`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Sequence, get_args, get_origin, get_type_hints

# omegaconf is light (no torch), so importing it here keeps `diffusion-pref --help` fast.
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion_pref.fileio import atomic_write
from diffusion_pref.suggest import did_you_mean


# The fixed sets of choices, declared once as types: the loader checks every Literal-typed field (with a
# did-you-mean), and code that needs the list reads it with ``typing.get_args`` (e.g. ``get_args(TrajectoryKind)``).
Precision = Literal["auto", "fp32", "fp16", "bf16"]
ModelFamily = Literal["auto", "sd", "sdxl", "sd3", "tango", "tangoflux"]
TrajectoryKind = Literal["forward", "ddim", "renoise"]
TMode = Literal["exact", "grid_below", "smpo_released"]
TimestepSampling = Literal["auto", "uniform", "logit_normal", "mode"]
SoftLabelWinner = Literal["reward", "human"]
SoftLabelScores = Literal["auto", "dataset", "reward_model"]


@dataclass
class RuntimeConfig:
    """Where and in which precision every command runs, and its seed (train, generate, evaluate, invert, cache,
    reward scoring, iterate, quickstart); :func:`resolve_runtime` turns it into a device and dtypes."""

    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N
    # auto: fp32 for training, caching and inversion everywhere; for sampling (generate, evaluate) fp16 on CUDA and
    # fp32 on a CPU. fp16 / bf16 for training is accelerate's mixed precision (fp32 trainable weights, the frozen
    # modules in that dtype).
    dtype: Precision = "auto"
    # Training's seed (data order, augmentation, noise), generate's base seed for the per-sample seeds, invert's
    # regulariser; iterate samples round r with seed + r - 1.
    seed: int = 0


@dataclass
class SampleConfig:
    """How images are sampled: generate, evaluate (``eval.variant_sampling`` overrides per variant) and the
    validation images of training."""

    steps: int = 25
    guidance_scale: float = 7.5
    resolution: Optional[int] = None  # image height = width; None = the pipeline's default (validation: data.resolution)
    # A diffusers scheduler class name (e.g. DPMSolverMultistepScheduler) built from the pipeline's scheduler
    # config; None keeps the pipeline's own scheduler.
    scheduler: Optional[str] = None
    batch_size: int = 8  # images per pipeline call
    # The model's safety checker (SD1.x ships one). None: each command's own policy: generate runs the checker a
    # model ships and leaves a blocked (black) image out of every pair; evaluate and validation images run none
    # (they compare models). true: run it (an error for a model that ships none); false: never.
    safety_checker: Optional[bool] = None


@dataclass
class InvertConfig:
    """``diffusion-pref invert``: the image to invert and reconstruct (resized to data.resolution) and its prompt;
    the method is trajectory.kind (ddim | renoise), the grid trajectory.steps."""

    image: Optional[str] = None
    prompt: str = ""


@dataclass
class ModelConfig:
    # A hub id, a local folder in the standard diffusers layout, or "toy" for the shapes-world model shipped
    # inside the package (the only one that works without a model hub).
    pretrained: str = "toy"
    family: ModelFamily = "auto"  # "auto" reads the pipeline's model_index.json
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae: Optional[str] = None  # another VAE, e.g. an fp16-safe SDXL VAE
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: Optional[float] = None  # None = lora_rank, so the adapter's scale is 1
    lora_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # Where the reference log-likelihoods come from. auto: the adapter switched off for LoRA, a frozen copy for
    # full fine-tuning, none for reference-free losses. copy_cpu keeps the frozen copy in CPU memory.
    reference: Literal["auto", "adapter", "copy", "copy_cpu", "none"] = "auto"


@dataclass
class DataConfig:
    source: Optional[str] = None  # hub dataset id, a parquet file, or a folder of parquet shards
    split: str = "train"
    # Our column name -> the dataset's, for layouts other than Pick-a-Pic v2
    # (caption, jpg_0, jpg_1, label_0, and optionally score_0, score_1).
    columns: Dict[str, str] = field(default_factory=dict)
    resolution: int = 512
    # Audio models (Tango): the training clip length in seconds; None = the model's (Tango: 10.24 s = 1024 mel frames).
    audio_seconds: Optional[float] = None
    ties: Literal["drop", "soft"] = "drop"  # soft keeps label_0 == 0.5 as a soft label for losses that take one
    on_bad_row: Literal["error", "skip"] = "error"  # skip counts and reports every skipped row
    caption_dropout: float = 0.0  # decided once per pair, never differently for winner and loser
    random_flip: bool = True  # the same flip for both images of a pair
    random_crop: bool = False  # the same crop for both images of a pair
    cache: bool = False  # train from precomputed VAE latents and text embeddings
    cache_dir: Optional[str] = None  # default: <output.dir>/cache
    max_pairs: Optional[int] = None
    shuffle: bool = True
    num_workers: int = 0
    # Where a loss that takes P(winner preferred) (smpo, sppo) gets it. label: from label_0 (1.0 for hard labels,
    # 0.5 for ties kept with ties=soft, max(label_0, 1 - label_0) for a fractional one; with hard labels smpo is
    # dpo with a gamma-fold logit, so it warns). scores: SmPO's sigmoid of the min-max-normalised score gap, from
    # the score_0/score_1 columns or, without them, from reward.models, scored once and stored beside the data
    # cache (diffusion_pref.soft_labels; settings loss.soft_label_*). auto: scores (label only when asked for).
    soft_labels: Literal["auto", "label", "scores"] = "auto"


@dataclass
class RewardConfig:
    # Reward model name -> weight; several names make a weighted sum, e.g. {pickscore: 1.0, clip: 0.5}.
    models: Dict[str, float] = field(default_factory=lambda: {"pickscore": 1.0})
    # Reward model name -> hub id or local path, where the default official weights are not wanted.
    pretrained: Dict[str, str] = field(default_factory=dict)
    batch_size: int = 16  # the reward models run on runtime.device


@dataclass
class LossConfig:
    name: str = "dpo"  # any key of diffusion_pref.losses.LOSSES
    # Our beta equals the diffusers train_diffusion_dpo.py beta (2500 there) and is half of the beta of the
    # original Diffusion-DPO code and the diffusers SDXL script (5000 there = 2500 here); see docs/design.md.
    # None: the loss's own starting beta (losses.DIFFUSION_DEFAULT_BETA: 1000 for smpo and kto, 2500 for the
    # rest), written here by load_config so --print-config and the saved config.yaml hold the number used.
    beta: Optional[float] = None
    # Loss-specific keyword arguments (gamma for smpo, flip_rate for robust, ...), checked against the chosen
    # loss's signature before any model is loaded.
    params: Dict[str, Any] = field(default_factory=dict)
    # SmPO soft labels (data.soft_labels=scores): which side is the winner (reward: the reward model decides, as
    # SmPO does; human: label_0 decides and the score gap only sets the confidence), where scores come from
    # (auto: score columns if present, else reward.models), and a fixed [min, max] for the min-max normalisation
    # instead of the dataset's own range, in the units of the scores (a score outside it is an error naming the
    # row). SmPO's PickScore range is [0.11543526500463486, 0.28201571106910706] in raw cosine; our pickscore
    # returns 100 x cosine (exp(logit_scale) = 100), so there it is [11.543526500463486, 28.201571106910706].
    soft_label_winner: SoftLabelWinner = "reward"
    soft_label_scores: SoftLabelScores = "auto"
    soft_label_range: Optional[List[float]] = None


@dataclass
class TrajectoryConfig:
    kind: TrajectoryKind = "forward"  # where x_t and its target come from
    steps: int = 50  # inversion grid size for ddim / renoise (DDIMInverseScheduler.set_timesteps(steps))
    # How the sampled t meets the grid. exact: invert along the grid points below t, then one last step to t, so
    # x_t really sits at the noise level the UNet is told. grid_below: stop at the last grid point below t and
    # feed that latent as if it were at t (cheaper by one step; SmPO's loop on diffusers >= 0.22). smpo_released:
    # the released SmPO code on the diffusers 0.20.0 it pins: the latent ends at the grid point at or above t
    # (capped at the grid's last point) and is fed as if it were at t (trajectories.py).
    t_mode: TMode = "exact"
    # Which model inverts x0: policy (the model being trained, as SmPO does) or reference (the frozen reference:
    # the adapter-off UNet or the reference copy). With the reference, a pair's inverted latents no longer change
    # during training; otherwise the same computation. A variant, measured in the shapes world (README).
    invert_with: Literal["policy", "reference"] = "policy"
    # With invert_with=reference and data.cache=true: store every grid point's inverted latent in the data cache
    # (float32, steps x 2 latents per pair), so a step reads its x_t instead of inverting: grid_below then costs
    # what a DPO step costs, exact one inversion step more.
    cache_inverted: bool = False
    # ReNoise: K renoise iterations per inversion step (K + 1 noise predictions; 0 = plain DDIM inversion). The
    # SmPO code and ReNoise's SD1.5/SDXL examples use 1; ReNoise's SDXL-Turbo default is 9.
    renoise_iters: int = 1
    # Half-open range [start, end) of prediction indices (0..K) averaged into the final step; SmPO averages both
    # of its two predictions at every step. If the range holds none, the last prediction is used.
    average_window: List[int] = field(default_factory=lambda: [0, 2])
    # ReNoise's noise regularisation (patch-KL + auto-correlation); 0 = off. ReNoise's default when on is 4.
    noise_reg_steps: int = 0
    noise_reg_lambda_kl: float = 0.065  # ReNoise default
    noise_reg_lambda_ac: float = 20.0  # ReNoise default
    noise_reg_ac_rolls: int = 5  # ReNoise default
    # How training draws its timesteps. auto: the model family's own: uniform for DDPM-type models (as every SD
    # training script), SD3's logit-normal for flow matching (schedules.FlowMatchSchedule). uniform, logit_normal
    # and mode choose for a flow-matching model; a DDPM-type model always draws uniformly. logit_mean, logit_std
    # and mode_scale are the SD3 training script's parameters (logit_mean > 0 favours noisier levels, as in the
    # SD3 paper).
    timestep_sampling: TimestepSampling = "auto"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class TrainConfig:
    batch_size: int = 4  # pairs per device per optimizer micro-step
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant_with_warmup"  # any name diffusers.optimization.get_scheduler knows
    warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # torch.compile the UNet (policy, adapter-off reference and inversion calls alike; a frozen reference copy
    # too). The first steps pay the compilation (minutes for SD-sized UNets); fewer kernel launches after that.
    compile: bool = False
    # reduce-overhead: CUDA graphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"  # any torch.compile backend; aot_eager traces without generating code
    # Replay CUDA graphs for the no-grad UNet calls (the reference pass and SmPO's inversion): one graph per
    # batch shape, recorded on first use; removes the kernel-launch cost that dominates these small calls on a
    # GPU. Same numbers as eager (to cuDNN's run-to-run noise); no effect on a CPU.
    cuda_graphs: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # latest | a checkpoint folder
    # Resume although the checkpoint's model, loss, data, batch or optimizer settings differ from this config's.
    resume_force: bool = False
    log_every: int = 1
    logger: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    validate_every: int = 0  # 0 = no validation images during training
    validation_prompts: List[str] = field(default_factory=list)
    # A LoRA folder (as train writes it) the adapter starts from instead of zero: training continues that LoRA
    # (same model.lora_rank and lora_targets). model.reference=adapter then compares against the base,
    # model.reference=copy against this starting model (base + this LoRA). Needs model.finetune=lora.
    init_lora: Optional[str] = None


@dataclass
class GenerateConfig:
    prompts: Optional[str] = None  # text file, JSON list, parquet/hub dataset column, PartiPrompts TSV, HPDv2 JSON
    prompt_column: Optional[str] = None
    samples_per_prompt: int = 4
    strategy: Literal["best_vs_worst", "all_pairs", "best_vs_each"] = "best_vs_worst"
    min_winner_score: Optional[float] = None
    # Audio (a backbone with a sample_rate) only: the loser's score must reach this too (the Audio-alpaca filter)
    min_loser_score: Optional[float] = None
    min_gap: Optional[float] = None
    max_gap: Optional[float] = None
    shard_size: int = 256  # pairs per parquet shard
    # A shard is also written after this many finished prompts, whatever its size: a run killed without warning
    # (SIGKILL, power loss) redoes at most these and the batches in progress. SIGTERM/SIGINT save everything.
    flush_every_prompts: int = 32
    prompt_split: str = "train"  # split to read when generate.prompts is a hub dataset id
    max_prompts: Optional[int] = None  # only the first N prompts (smoke runs); raising it later resumes the same run
    image_format: Literal["png", "jpeg"] = "png"  # png: lossless, stored images score exactly as generated
    audio_format: Literal["flac", "wav"] = "flac"  # audio backbones: both lossless 16-bit PCM
    # Statistical rejection sampling (RSO): None = off; otherwise each prompt's candidates are first thinned to
    # rso_keep samples accepted with probability exp((r - r_max) / rso_beta), then paired by `strategy`.
    rso_beta: Optional[float] = None
    rso_keep: int = 2
    lora: Optional[str] = None  # a LoRA folder (as train writes it) sampled on top of model.pretrained


@dataclass
class EvalConfig:
    prompts: Optional[str] = None  # a prompt set name or file
    # Variant name -> a LoRA folder, a full pipeline folder, or "base".
    variants: Dict[str, str] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    bootstrap_samples: int = 1000
    no_cache: bool = False
    prompt_column: Optional[str] = None  # the prompt column of a parquet / csv / hub prompt set
    max_prompts: Optional[int] = None  # keep only the first N prompts (quick checks)
    # Score images that already exist (HPDv2 benchmark layout <style>/{index:05d}.jpg, or <model>/<style>/...)
    # instead of generating; each model folder is one variant.
    images_dir: Optional[str] = None
    baseline: Optional[str] = None  # the variant win rates are measured against; None = the "base" variant
    bootstrap_seed: int = 0  # the interval resamples the same prompts on every run
    report_prompts: int = 24  # rows (prompts) in the report's sample grid
    # Variant name -> sampling settings that differ from sample.* (steps, guidance_scale, resolution), e.g.
    # {base_cfg3: {guidance_scale: 3.0}} with eval.variants.base_cfg3=base compares the base at another guidance.
    variant_sampling: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class IterateConfig:
    """``diffusion-pref iterate``: rounds of generate -> train -> evaluate, each round sampling the last one's model."""

    rounds: int = 3
    # fixed: every round's reference is the base model; moved: round r's reference is round r-1's model.
    reference: Literal["fixed", "moved"] = "fixed"
    # Round r samples prompts [(r-1)*N, r*N) of generate.prompts, so R rounds of N see the prompts one round of
    # R*N sees; None: every round samples all the prompts. Round r samples with seed runtime.seed + r - 1.
    prompts_per_round: Optional[int] = None


@dataclass
class PromptOptConfig:
    """``diffusion-pref prompt-opt``: a causal LM learns to rewrite prompts (train.*, runtime.*, loss.name and
    model.finetune / lora_rank / lora_alpha apply to it too; model.lora_targets does not: peft's default for the
    architecture is used)."""

    mode: Literal["generate", "train", "evaluate", "iterate", "quickstart"] = "train"
    policy: str = "toy"  # a causal LM folder or hub id; toy = the shipped shapes-world rewriter
    adapter: Optional[str] = None  # a trained LoRA folder (train writes one) to generate from or evaluate
    prompts: Optional[str] = None  # generate: a text file, one prompt a line; None with policy=toy: the toy captions
    eval_prompts: Optional[str] = None  # evaluate: held-out prompts (same format); None with policy=toy: toy ones
    pairs: Optional[str] = None  # train: a pair file or folder; None = <output.dir>/pairs (what generate writes)
    reward: Literal["toy-rewrite", "images"] = "toy-rewrite"  # images: reward.models on model.* renders
    embedder: Literal["minilm", "clip", "none"] = "minilm"  # similarity e(x)·e(y); clip = model.pretrained's encoder
    alpha: float = 0.0  # Sem-DPO weight exp(-alpha (1 - cos)); 0 = the unweighted loss
    beta: float = 0.1  # the LM's loss beta (loss.beta is the diffusion models' scale)
    k: int = 4  # rewrites per prompt (generate) and per held-out prompt (evaluate)
    max_new_tokens: int = 48
    temperature: float = 1.0
    average: bool = False  # length-normalised completion log-probs instead of the sum
    drift_threshold: float = 0.8  # evaluate: a rewrite below this similarity to its prompt counts as drift
    # train: first this many steps of loss sft on (prompt, chosen), then the preference loss from that policy,
    # whose reference is the SFT'd model (<output.dir>/sft/model); 0 = no warm start
    sft_steps: int = 0
    rounds: int = 2  # iterate: rounds of (pairs from the current policy, then train on them) in <output.dir>/round_<r>


@dataclass
class OutputConfig:
    dir: str = "outputs/run"


@dataclass
class Config:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    invert: InvertConfig = field(default_factory=InvertConfig)
    prompt_opt: PromptOptConfig = field(default_factory=PromptOptConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Keys that moved: old dotted key -> new dotted key. A file or override that sets an old key is an error naming
# the new one (with the value to write there, where it changed spelling: train.mixed_precision=no -> fp32).
RENAMED: Dict[str, str] = {
    "train.mixed_precision": "runtime.dtype",
    "train.seed": "runtime.seed",
    "generate.seed": "runtime.seed",
    "generate.dtype": "runtime.dtype",
    "eval.dtype": "runtime.dtype",
    "eval.device": "runtime.device",
    "reward.device": "runtime.device",
    **{f"{section}.{key}": f"sample.{key}" for section in ("generate", "eval")
       for key in ("steps", "guidance_scale", "resolution", "batch_size")},
    "generate.scheduler": "sample.scheduler",
    "trajectory.invert_image": "invert.image",
    "trajectory.invert_prompt": "invert.prompt",
}
# train.mixed_precision's words in runtime.dtype's (YAML reads a bare `no` as false).
_MIXED_PRECISION_DTYPE = {"no": "fp32", "False": "fp32", "false": "fp32", "fp16": "fp16", "bf16": "bf16"}


class ConfigError(ValueError):
    """A config problem the user can fix; the message says which key and what to do."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows: from ``low`` to ``high`` (None = unbounded), each end included unless
    ``low_open`` / ``high_open``. NaN and infinities are never allowed; None stays allowed for Optional fields."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, AT_LEAST_1, AT_LEAST_0 = Range(0, low_open=True), Range(1), Range(0)

# Numeric fields with a range, checked with the rest of the config (before any data or model is loaded) so a
# typo costs seconds. Settings whose limits depend on each other stay with the command that reads them
# (generate.samples_per_prompt, generate.rso_keep, trajectory.steps against the scheduler's timesteps).
RANGES: Dict[str, Range] = {
    "model.lora_rank": AT_LEAST_1,
    "model.lora_alpha": POSITIVE,
    "data.resolution": AT_LEAST_1,
    "data.audio_seconds": POSITIVE,
    "data.caption_dropout": Range(0, 1),
    "data.max_pairs": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "reward.batch_size": AT_LEAST_1,
    "loss.beta": POSITIVE,
    "trajectory.steps": AT_LEAST_1,
    "trajectory.logit_std": POSITIVE,
    "trajectory.mode_scale": Range(-1, 2 / (math.pi - 2)),  # where SD3's mode density is monotone
    "trajectory.renoise_iters": AT_LEAST_0,
    "trajectory.noise_reg_steps": AT_LEAST_0,
    "trajectory.noise_reg_lambda_kl": AT_LEAST_0,
    "trajectory.noise_reg_lambda_ac": AT_LEAST_0,
    "trajectory.noise_reg_ac_rolls": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1,
    "train.learning_rate": POSITIVE,
    "train.warmup_steps": AT_LEAST_0,
    "train.adam_beta1": Range(0, 1, high_open=True),
    "train.adam_beta2": Range(0, 1, high_open=True),
    "train.adam_eps": AT_LEAST_0,
    "train.weight_decay": AT_LEAST_0,
    "train.max_grad_norm": AT_LEAST_0,  # 0 = no clipping
    "train.checkpoint_every": AT_LEAST_0,  # 0 = no checkpoints
    "train.keep_checkpoints": AT_LEAST_0,  # 0 = keep all
    "train.log_every": AT_LEAST_1,
    "train.validate_every": AT_LEAST_0,  # 0 = no validation images
    "sample.steps": AT_LEAST_1,
    "sample.batch_size": AT_LEAST_1,
    "sample.resolution": AT_LEAST_1,
    "generate.shard_size": AT_LEAST_1,
    "generate.max_prompts": AT_LEAST_1,
    "generate.rso_beta": POSITIVE,
    "eval.bootstrap_samples": AT_LEAST_0,
    "eval.max_prompts": AT_LEAST_1,
    "eval.report_prompts": AT_LEAST_0,
    "prompt_opt.alpha": AT_LEAST_0,
    "prompt_opt.beta": POSITIVE,
    "prompt_opt.k": AT_LEAST_1,
    "prompt_opt.max_new_tokens": AT_LEAST_1,
    "prompt_opt.temperature": POSITIVE,
    "prompt_opt.drift_threshold": Range(-1, 1),
    "prompt_opt.sft_steps": AT_LEAST_0,
    "prompt_opt.rounds": AT_LEAST_1,
}


def _section_class(annotation: Any) -> Optional[type]:
    cls = globals().get(annotation) if isinstance(annotation, str) else annotation
    return cls if dataclasses.is_dataclass(cls) else None


def _valid_keys(cls: type = None, prefix: str = "") -> Dict[str, Optional[type]]:
    """Every dotted key the config accepts -> its section class (None for a leaf value)."""
    keys: Dict[str, Optional[type]] = {}
    for f in dataclasses.fields(cls or Config):
        dotted = f"{prefix}{f.name}"
        sub = _section_class(f.type)
        keys[dotted] = sub
        if sub is not None:
            keys.update(_valid_keys(sub, prefix=f"{dotted}."))
    return keys


def choices(dotted: str) -> Optional[tuple]:
    """The values a ``Literal``-typed key allows (``choices("runtime.dtype")``), None for any other key."""
    section, _, key = dotted.partition(".")
    cls = _section_class(next((f.type for f in dataclasses.fields(Config) if f.name == section), None))
    if cls is None:
        return None
    hint = get_type_hints(cls).get(key)
    return get_args(hint) if get_origin(hint) is Literal else None


def _choice_keys() -> List[str]:
    return [dotted for dotted, sub in _valid_keys().items() if sub is None and "." in dotted and choices(dotted)]


# Keys that were removed, with the reason: setting one is an error that says why.
REMOVED: Dict[str, str] = {
    "train.channels_last": "measured slower than the default memory layout (1.74x against 1.94x over diffusers' "
                           "script on an H100, SD1.5 at 512 px; benchmarks/README.md): delete the key",
}


def _renamed_error(old: str, value: Any, where: str) -> ConfigError:
    new = RENAMED[old]
    if old == "train.mixed_precision":
        value = _MIXED_PRECISION_DTYPE.get(str(value), value)
    shown = "null" if value is None else value
    return ConfigError(f"{old} was renamed: use {new}={shown} ({where})")


def _check_keys(tree: Any, where: str, prefix: str = "") -> None:
    """Reject keys that no section has, naming the nearest valid key among all of them (or the new name of a
    renamed key), and values outside a ``Literal`` field's choices.

    Dict-typed fields (column maps, loss params, reward weights) are leaves here: they accept any key.
    """
    valid = _valid_keys()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED:
            raise _renamed_error(dotted, value, where)
        if dotted in REMOVED:
            raise ConfigError(f"{dotted} was removed: {REMOVED[dotted]} ({where})")
        if dotted not in valid:
            while isinstance(value, dict) and len(value) == 1:  # name the whole key the user wrote
                (inner, value), = value.items()
                dotted = f"{dotted}.{inner}"
                if dotted in RENAMED:
                    raise _renamed_error(dotted, value, where)
            leaves = [k for k, sub in valid.items() if sub is None]
            section = dotted.rsplit(".", 1)[0]
            nearby = [k for k in leaves if k.startswith(section + ".")] or leaves
            hint = did_you_mean(dotted, leaves)
            raise ConfigError(
                f"unknown config key '{dotted}' ({where}){'; ' + hint if hint else '.'} "
                f"Valid keys: {', '.join(nearby) if len(nearby) < 40 else 'see --print-config'}"
            )
        if valid[dotted] is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' ({where}) is a section; set its keys, e.g. {dotted}.<key>=...")
            if value:
                _check_keys(value, where, prefix=f"{dotted}.")
        else:
            _check_choice(dotted, value, where)


def _check_choice(dotted: str, value: Any, where: str = "") -> None:
    allowed = choices(dotted)
    if allowed is not None and value not in allowed:
        where = f" ({where})" if where else ""
        hint = did_you_mean(str(value), allowed)
        raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}{'; ' + hint if hint else ''}{where}")


def check_ranges(cfg: Config) -> None:
    """Every key of :data:`RANGES` inside its range; the error names the key, its value and the range."""
    for dotted, allowed in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is out of range: it must be {allowed}")


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def validate(cfg: Config, *, loss: bool = False) -> None:
    """Every rule a config must satisfy that needs only the config (and the loss registry): choices, ranges and
    the rules between keys. ``load_config`` calls it; call it again on a Config built or changed in code. With
    ``loss=True`` (the commands that train) ``loss.name`` and ``loss.params`` are checked too (:func:`check_loss`):
    a recipe may carry params for a loss it does not train with. Rules that need the data, a model or the machine
    stay with the command that reads them."""
    from diffusion_pref.losses import REFERENCE_FREE

    for dotted in _choice_keys():
        section, key = dotted.split(".")
        _check_choice(dotted, getattr(getattr(cfg, section), key))
    if not _DEVICE.match(str(cfg.runtime.device)):
        raise ConfigError(f"runtime.device={cfg.runtime.device!r} is not one of auto, cpu, cuda, cuda:N")
    check_ranges(cfg)
    if loss:
        check_loss(cfg)

    model, traj = cfg.model, cfg.trajectory
    needs_reference = cfg.loss.name not in REFERENCE_FREE
    if model.reference == "adapter" and model.finetune != "lora":
        raise ConfigError("model.reference=adapter needs model.finetune=lora (full fine-tuning has no adapter to switch "
                          "off); use model.reference=copy or copy_cpu")
    if model.reference == "none" and needs_reference:
        raise ConfigError("model.reference=none but this loss compares against a reference; use model.reference=auto")
    if cfg.train.init_lora and model.finetune != "lora":
        raise ConfigError(f"train.init_lora={cfg.train.init_lora} continues a LoRA: it needs model.finetune=lora")
    if traj.cache_inverted and not (cfg.data.cache and traj.kind in ("ddim", "renoise")
                                    and traj.invert_with == "reference"):
        raise ConfigError("trajectory.cache_inverted=true stores the reference model's inversion in the data "
                          "cache: it needs data.cache=true, trajectory.kind=ddim or renoise and "
                          f"trajectory.invert_with=reference (got data.cache={cfg.data.cache}, "
                          f"kind={traj.kind}, invert_with={traj.invert_with})")
    has_reference = model.reference not in ("none", "auto") or (model.reference == "auto" and needs_reference)
    if traj.invert_with == "reference" and not has_reference:
        raise ConfigError(f"trajectory.invert_with=reference needs a reference model, but loss "
                          f"{cfg.loss.name!r} with model.reference={model.reference!r} has none; use "
                          "trajectory.invert_with=policy or set model.reference (adapter, copy)")
    gen = cfg.generate
    if gen.min_gap is not None and gen.max_gap is not None and gen.min_gap > gen.max_gap:
        raise ConfigError(f"generate.min_gap={gen.min_gap} is above generate.max_gap={gen.max_gap}: no pair could pass")
    if gen.rso_beta is not None and gen.rso_keep < 2:
        raise ConfigError(f"generate.rso_keep={gen.rso_keep}: pairs need at least 2 accepted samples")
    if cfg.eval.images_dir is not None and cfg.eval.variants:
        raise ConfigError("set either eval.images_dir (score existing images) or eval.variants (generate), not both")
    po = cfg.prompt_opt
    if po.policy != "toy" and po.mode in ("generate", "iterate", "quickstart") and po.prompts is None:
        raise ConfigError(f"prompt_opt.mode={po.mode} with prompt_opt.policy={po.policy} needs prompt_opt.prompts "
                          "(a text file, one prompt a line); only policy=toy has built-in prompts")
    if po.policy != "toy" and po.mode == "evaluate" and po.eval_prompts is None:
        raise ConfigError(f"prompt_opt.mode=evaluate with prompt_opt.policy={po.policy} needs prompt_opt.eval_prompts")
    if po.alpha > 0 and po.embedder == "none":
        raise ConfigError(f"prompt_opt.alpha={po.alpha} weights pairs by similarity: it needs prompt_opt.embedder "
                          "(minilm or clip), not none")
    if po.reward == "toy-rewrite" and po.policy != "toy" and po.mode != "train":
        raise ConfigError("prompt_opt.reward=toy-rewrite scores shapes-world rewrites only: use it with "
                          "prompt_opt.policy=toy, or prompt_opt.reward=images")


class Runtime(NamedTuple):
    """:func:`resolve_runtime`'s answer: the device, the dtype of the model weights, and accelerate's
    ``mixed_precision`` ("no" | "fp16" | "bf16")."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype
    mixed_precision: str

    @property
    def precision(self) -> str:
        """The dtype's name as the config writes it: fp32 | fp16 | bf16 (part of generate's and evaluate's keys)."""
        return "fp32" if self.mixed_precision == "no" else self.mixed_precision


def resolve_runtime(runtime: RuntimeConfig, *, sampling: bool = False) -> Runtime:
    """``runtime.device`` and ``runtime.dtype`` with "auto" resolved, the one place that does it.

    device auto: cuda if PyTorch sees a CUDA device, else cpu. dtype auto: fp16 for sampling (``sampling=True``:
    generate, evaluate) on CUDA; fp32 otherwise (training, caching, inversion, and anything on a CPU).
    """
    import torch

    name = runtime.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(f"runtime.device={runtime.device}: PyTorch sees {count} CUDA device(s); use "
                              "runtime.device=auto or cpu" + (f" or cuda:0..{count - 1}" if count else ""))
    precision = runtime.dtype
    if precision == "auto":
        precision = "fp16" if sampling and device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return Runtime(device, dtype, "no" if precision == "fp32" else precision)


def _merge(base: DictConfig, layer: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        expected = ""
        ref_type = getattr(err, "ref_type", None)
        node = OmegaConf.select(base, key) if key != "?" else None
        if key != "?":
            section, _, name = key.partition(".")
            section_cls = type(getattr(Config(), section, None))
            hints = {f.name: f.type for f in dataclasses.fields(section_cls)} if dataclasses.is_dataclass(section_cls) else {}
            expected = f" expected type: {hints.get(name, ref_type or type(node).__name__)}."
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' ({where}): {first_line}.{expected}") from None


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["train.max_steps=10", "loss.params.gamma=5"]`` -> nested dict, values parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {err}") from None


def load_config(
    path: Optional[str | Path] = None, overrides: Sequence[str] = (),
    defaults: Optional[str | Path | Sequence[str | Path]] = None,
) -> Config:
    """Defaults, then the YAML file at ``path``, then the dotted ``overrides``; returns a checked :class:`Config`.

    ``defaults`` is a command's own recipe (the quickstart ships one inside the package), or several applied in
    order (the quickstart's, then an audio world's), all before ``path``.
    """
    merged = OmegaConf.structured(Config)
    layers = [defaults] if defaults is None or isinstance(defaults, (str, Path)) else list(defaults)
    for layer in (*layers, path):
        if layer is not None:
            merged = _merge_file(merged, Path(layer))
    dotted = parse_overrides(overrides)
    _check_keys(dotted, where="command line")
    for item in overrides:  # `reward.models={clip: 1.0}` replaces the whole mapping, as a recipe file does
        if item.split("=", 1)[0].strip() in _mapping_keys():
            OmegaConf.update(merged, item.split("=", 1)[0].strip(), {}, merge=False)
    merged = _merge(merged, dotted, where="command line")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config is incomplete: {str(err).splitlines()[0]}") from None
    if cfg.loss.beta is None:  # an unknown loss.name keeps None; check_loss names the valid ones
        from diffusion_pref.losses import DIFFUSION_DEFAULT_BETA

        cfg.loss.beta = DIFFUSION_DEFAULT_BETA.get(cfg.loss.name)
    validate(cfg)
    return cfg


def _merge_file(merged: DictConfig, path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; recipes live in configs/ (e.g. configs/toy_generate.yaml)")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # YAML syntax errors come from several libraries
        raise ConfigError(f"could not read {path} as YAML: {err}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, train:, ...)")
    _check_keys(loaded, where=str(path))
    # A mapping written in a file replaces the one below it (a recipe's `reward.models: {toy-fidelity: 1.0}` must
    # not keep the default pickscore); a dotted override such as `loss.params.gamma=5` still updates one entry.
    for dotted in _mapping_keys():
        section, key = dotted.split(".")
        if isinstance(loaded.get(section), dict) and key in loaded[section]:
            OmegaConf.update(merged, dotted, {}, merge=False)
    return _merge(merged, loaded, where=str(path))


def _mapping_keys() -> List[str]:
    """The dotted names of the Dict-typed fields (column maps, loss params, reward weights, ...)."""
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(_section_class(section.type))
        if str(f.type).startswith("Dict")
    ]


def check_loss(cfg: Config) -> None:
    """Check ``loss.name`` and ``loss.params`` against the loss library before any model is loaded."""
    from diffusion_pref.losses import check_loss_params

    try:
        check_loss_params(cfg.loss.name, dict(cfg.loss.params))
    except (KeyError, ValueError, TypeError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"loss config: {message}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config as ``config.yaml``; ``--config`` on that file reproduces the run.

    A different ``config.yaml`` already there, the record of an earlier run in the folder, is never overwritten:
    it is kept as ``config.<its date>.yaml``.
    """
    import os
    import sys
    import time

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    text = to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept, n = directory / f"config.{stamp}.yaml", 1
        while kept.exists():
            kept, n = directory / f"config.{stamp}-{n}.yaml", n + 1
        os.replace(path, kept)
        print(f"diffusion-pref: note: {path} held another run's config; kept it as {kept.name}", file=sys.stderr)
    atomic_write(path, text)
    return path


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
    "InvertConfig",
    "IterateConfig",
    "LossConfig",
    "ModelConfig",
    "MISSING",
    "OutputConfig",
    "RANGES",
    "RENAMED",
    "Range",
    "RewardConfig",
    "Runtime",
    "RuntimeConfig",
    "SampleConfig",
    "TrainConfig",
    "TrajectoryConfig",
    "check_loss",
    "check_ranges",
    "choices",
    "load_config",
    "parse_overrides",
    "resolve_runtime",
    "save_config",
    "to_yaml",
    "validate",
]

"""Everything a training run sets up before its first step: checks, accelerate, data, model, reference,
optimizer, learning-rate schedule, cache, resume. :class:`Trainer` holds the result; ``Trainer(cfg).train()``
runs :func:`diffusion_pref.training.loop.train` on it (tests reach into its parts between the two).

The pieces, in the order :class:`Trainer` calls them: the config and device checks (:func:`check_device_settings`,
:func:`check_sharding_runs_here`, :func:`resolve_reference`), the data and soft labels, the model
(:func:`setup_policy`: freeze, LoRA or full, the reference copy, ``train.init_lora``), the reference as a plain
function (:func:`reference_predictor`), the batch reader (:func:`batch_reader`: the cache or decoded pixels),
:func:`make_optimizer`, :func:`make_lr_scheduler`, and the checkpoint to resume from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, Optional

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ checks


def resolve_reference(model_cfg, needs_ref: bool) -> str:
    """auto -> adapter (LoRA) / copy (full) / none (reference-free loss); reject combinations that cannot work."""
    from diffusion_pref.config import ConfigError

    mode = model_cfg.reference
    if mode == "auto":
        if not needs_ref:
            return "none"
        return "adapter" if model_cfg.finetune == "lora" else "copy"
    if mode == "adapter" and model_cfg.finetune != "lora":
        raise ConfigError("model.reference=adapter needs model.finetune=lora (full fine-tuning has no adapter to switch "
                          "off); use model.reference=copy or copy_cpu")
    if mode == "none" and needs_ref:
        raise ConfigError("model.reference=none but this loss compares against a reference; use model.reference=auto")
    return mode


# ---------------------------------------------------------------------------------------------- model pieces


def make_optimizer(t, params):
    """The optimizer of ``train.optimizer`` over ``params``."""
    import torch

    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                 weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # present: check_device_settings asked before anything was loaded

        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                   weight_decay=t.weight_decay)
    from transformers.optimization import Adafactor

    # Fixed learning rate, no update scaling: the settings the Diffusion-DPO SDXL run used.
    return Adafactor(params, lr=t.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                     clip_threshold=1.0, weight_decay=t.weight_decay)


def make_lr_scheduler(t, optimizer, num_processes: int):
    """``train.lr_scheduler`` with its warmup, counted in optimizer steps."""
    from diffusers.optimization import get_scheduler

    from diffusion_pref.config import ConfigError

    try:
        # accelerate steps a prepared scheduler once per process per optimizer step, hence the scaling.
        return get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.warmup_steps * num_processes,
                             num_training_steps=t.max_steps * num_processes)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"train.lr_scheduler={t.lr_scheduler!r}: {err}; use e.g. constant, constant_with_warmup, "
                          "linear, cosine") from None


def _set_attention(cfg, unet) -> None:
    if cfg.train.attention == "xformers":  # installed, on a CUDA device: check_device_settings
        unet.enable_xformers_memory_efficient_attention()
    # sdpa: diffusers' default attention processor already calls torch's scaled_dot_product_attention.


def check_device_settings(train_cfg, device, mixed_precision: str = "no") -> None:
    """Reject settings this device or this environment cannot run, before any data or model is loaded.

    One error lists every such setting with what to use instead. On a CPU (tried with the tiny SD model) fp16
    stops in the first step with a dtype mismatch while bf16 and no train; train.cuda_graphs is only ignored
    there, with a warning, so the shipped SD recipes run on a CPU once their fp16 and adamw8bit are changed.
    """
    import importlib.util

    from diffusion_pref.config import ConfigError

    problems = []
    if mixed_precision == "fp16" and device.type == "cpu":
        problems.append("runtime.dtype=fp16 needs a GPU (fp16 autocast fails on a CPU); on a CPU use "
                        "runtime.dtype=fp32 (or bf16)")
    if train_cfg.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes; made for CUDA GPUs); "
                        "without it use train.optimizer=adamw")
    if train_cfg.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            problems.append("train.attention=xformers but xformers is not installed; pip install xformers or use "
                            "train.attention=sdpa (the default, as fast on recent PyTorch)")
        elif device.type != "cuda":
            problems.append(f"train.attention=xformers needs a CUDA GPU (this run is on {device.type}); use "
                            "train.attention=sdpa")
    if problems:
        raise ConfigError("; ".join(problems))


def check_sharding_runs_here() -> None:
    """Refuse an FSDP or DeepSpeed launch (configs/accelerate/fsdp.yaml, deepspeed_zero2.yaml) without a GPU.

    Tried with accelerate 1.15 and two CPU processes: FSDP is switched on for GPU-like devices only, so on CPUs
    the run is plain data parallel (or stops at start on fsdp_sync_module_states); under DeepSpeed 0.19 every
    process counts itself as process 0 of 1, so each would train on the whole data set.
    """
    from accelerate.utils import parse_flag_from_env

    from diffusion_pref.config import ConfigError

    sharding = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                if parse_flag_from_env(flag)]
    if not sharding:
        return
    import torch

    if parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available():
        raise ConfigError(f"the accelerate config asks for {sharding[0]}, which accelerate runs on GPUs only (on CPUs it "
                          "would not shard, or not split the data); on CPUs train data parallel instead: "
                          "ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m diffusion_pref.cli train ...")


def setup_policy(cfg, backbone, weight_dtype, reference: str, device):
    """Freeze what is frozen, add the LoRA adapter or unfreeze the UNet, build the reference copy if any.

    Returns (trainable parameters, reference UNet or None).
    """
    import copy

    import torch

    unet = backbone.denoiser
    for name, module in backbone.frozen.items():
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=backbone.frozen_dtype.get(name, weight_dtype))

    def frozen_copy():
        ref = copy.deepcopy(unet).requires_grad_(False).eval()
        return ref.to(device="cpu" if reference == "copy_cpu" else device,
                      dtype=torch.float32 if reference == "copy_cpu" else weight_dtype)

    init_lora = cfg.train.init_lora  # with model.finetune=lora: config.validate
    ref_unet = None
    if reference in ("copy", "copy_cpu") and not init_lora:
        ref_unet = frozen_copy()
    if cfg.model.finetune == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device=device, dtype=weight_dtype)
        alpha = cfg.model.lora_alpha if cfg.model.lora_alpha is not None else cfg.model.lora_rank
        # Gaussian A and zero B: the adapted UNet starts exactly at the base, so step 0 is the reference.
        try:
            unet.add_adapter(LoraConfig(r=cfg.model.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=list(cfg.model.lora_targets)))
        except ValueError as err:  # peft's "target modules not found" (a ValueError subclass)
            from diffusion_pref.config import ConfigError

            raise ConfigError(f"model.lora_targets={list(cfg.model.lora_targets)} matched no UNet module ({err}); use "
                              "names like to_q, to_k, to_v, to_out.0") from None
        if init_lora:
            load_init_lora(unet, init_lora)
            if reference in ("copy", "copy_cpu"):
                ref_unet = frozen_copy()  # the model training starts from: base + the initial LoRA
        for p in unet.parameters():
            if p.requires_grad:  # optimizer state and updates in fp32; frozen weights stay in weight_dtype
                p.data = p.data.float()
        if weight_dtype != torch.float32:
            # Every UNet call of the trainer runs under autocast, which computes the adapter's matmuls in half
            # precision anyway; peft's cast of each activation to the adapter's fp32 dtype (and autocast's cast
            # back) would only add two copies of the activation per adapted layer.
            for module in unet.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
    else:
        unet.requires_grad_(True)
        unet.to(device=device, dtype=torch.float32)  # fp32 master weights; autocast runs the forward in half
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    _set_attention(cfg, unet)
    for module in (unet, ref_unet):
        if module is None:
            continue
        if cfg.train.compile:
            # In place (nn.Module.compile): the module object stays the one accelerate, peft and the savers know, so
            # every call through it is compiled; switching the adapter off for the reference adds one more graph.
            module.compile(mode=cfg.train.compile_mode, backend=cfg.train.compile_backend)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        from diffusion_pref.config import ConfigError

        raise ConfigError(f"model.lora_targets={list(cfg.model.lora_targets)} matched no UNet module; use names like "
                          "to_q, to_k, to_v, to_out.0")
    return trainable, ref_unet


def load_init_lora(unet, folder) -> None:
    """Copy a LoRA that train saved (``train.init_lora``) into the adapter just added to ``unet``.

    The adapter is built from the config (rank, targets, alpha), so the saved file must hold exactly its weights:
    a missing, extra or differently shaped weight is an error rather than a partly initialised adapter.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffusion_pref.config import ConfigError

    path = Path(folder) / "pytorch_lora_weights.safetensors"  # the name save_lora_weights writes
    if not path.is_file():
        raise ConfigError(f"train.init_lora={folder}: no {path.name} there; point it at the folder a LoRA training "
                          "run wrote")
    saved = load_file(str(path))
    # diffusers prefixes the denoiser's weights with its pipeline component: unet. (SD, SDXL), transformer. (SD3)
    prefix = next((p for p in ("unet.", "transformer.") if any(k.startswith(p) for k in saved)), "unet.")
    state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
    expected = get_peft_model_state_dict(unet)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise ConfigError(f"train.init_lora={folder} does not fit the adapter of model.lora_rank="
                          f"{getattr(unet.peft_config['default'], 'r', '?')} and model.lora_targets: {len(missing)} "
                          f"weights missing, {len(extra)} extra, {len(shapes)} of another shape (first: {first}); "
                          "use the rank and targets it was trained with")
    # The scale is not in the weights: an adapter continued with another alpha would start away from the saved model.
    # Files written before save_lora stored the adapter's config carry no alpha to check.
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    saved_alpha, alpha = header.get(f"{prefix}lora_alpha"), unet.peft_config["default"].lora_alpha
    if saved_alpha is not None and float(saved_alpha) != float(alpha):
        raise ConfigError(f"train.init_lora={folder} was trained with model.lora_alpha={saved_alpha}, not {alpha}; "
                          "use the alpha it was trained with")
    set_peft_model_state_dict(unet, state, adapter_name="default")


# ------------------------------------------------------------------------------------------ run-time pieces


class PairEncoder:
    """Batch -> (latents_w, latents_l, text encodings), from pixels and captions or from the cache. The batch's
    tensors are on the device already (:meth:`~diffusion_pref.training.accel.StepAccel.to_device`)."""

    # Captions whose cut flag is remembered (a few hundred bytes each): the uncached step tokenizes a caption for
    # the text encoder, and checking it against the token limit is a second tokenization; a caption met again
    # (pairs share captions, every epoch repeats them) is not checked again. Past this many, new captions are
    # checked each time they come, as all were before.
    CUT_MEMO_SIZE = 100_000

    def __init__(self, backbone, weight_dtype):
        self.backbone, self.weight_dtype = backbone, weight_dtype
        # Pairs whose caption the text encoder saw cut at its token limit, counted each time a pair is encoded;
        # None once a cache from before this count was read (its shards do not say).
        self.captions_cut = 0
        self._cut_memo: dict = {}  # caption -> backbone.prompts_cut's flag for it

    def _prompts_cut(self, captions) -> list:
        """``backbone.prompts_cut(captions)``, asking the backbone only about captions it was not asked about yet
        (each once, in the order first met)."""
        memo = self._cut_memo
        new = [c for c in dict.fromkeys(captions) if c not in memo]
        found = dict(zip(new, self.backbone.prompts_cut(new))) if new else {}
        if len(memo) + len(found) <= self.CUT_MEMO_SIZE:
            memo.update(found)
        return [memo[c] if c in memo else found[c] for c in captions]

    def _count_cut(self, flags) -> None:
        if self.captions_cut is None:
            return
        cut = int(sum(bool(f) for f in flags))
        if cut and not self.captions_cut:  # one warning per run; the total goes to train_summary.json
            logger.warning("captions longer than the text encoder's %s tokens are cut to that length; the count is "
                           "in train_summary.json (captions_cut)", self.backbone.token_limit())
        self.captions_cut += cut

    def __call__(self, batch):
        from diffusion_pref.data.loader import pair_media

        if "latents_w" in batch:
            if "caption_cut" in batch:
                self._count_cut(batch["caption_cut"].tolist())
            else:
                self.captions_cut = None
            text = {k[len("text."):]: v for k, v in batch.items() if k.startswith("text.")}
            return batch["latents_w"].to(self.weight_dtype), batch["latents_l"].to(self.weight_dtype), text
        media = pair_media(batch)  # pixels [2B, 3, R, R] or waveforms [2B, samples]
        latents = self.backbone.encode(media).to(self.weight_dtype)
        latents_w, latents_l = latents.chunk(2)
        self._count_cut(self._prompts_cut(batch["captions"]))
        return latents_w, latents_l, self.backbone.encode_prompts(batch["captions"])


def reference_predictor(backbone, reference: str, policy, ref_unet, device, accel=None) -> Optional[Callable]:
    """The reference model's no-grad prediction as a plain function ``(x_t, t, cond) -> prediction``.

    ``policy`` with its LoRA adapter switched off (``reference=adapter``), or the frozen copy ``ref_unet`` (its
    inputs moved to its device and dtype, the prediction back to ``device``); None for ``reference=none``.
    ``accel``: a :class:`~diffusion_pref.training.accel.StepAccel` whose CUDA graphs replay the calls; None:
    eager calls (one-off work such as building the cache, which a graph per chunk shape would only slow down).
    """
    def call(name, module, x, t, c):
        if accel is None:
            return backbone.predict(x, t, c, denoiser=module)
        return accel.predict(name, backbone, module, x, t, c)

    if reference == "adapter":
        def predict(x, t, c):
            policy.disable_adapters()
            try:
                return call("adapter off", policy, x, t, c)
            finally:
                policy.enable_adapters()
        return predict
    if reference == "none":
        return None
    first = next(ref_unet.parameters())
    ref_device, ref_dtype = first.device, first.dtype

    def predict(x, t, c):
        pred = call("reference", ref_unet, x.to(ref_device, ref_dtype), t.to(ref_device),
                    {k: v.to(ref_device) for k, v in c.items()})
        return pred.to(device)
    return predict


def batch_reader(cfg, source, backbone, accelerator, reference_predict=None):
    """``(make_batch(items) -> batch, DataLoader workers)``: read from the data cache under ``data.cache`` (built
    first if missing; with ``trajectory.cache_inverted`` it stores ``reference_predict``'s inversion of every
    pair), else decode and augment the pixels."""
    from diffusion_pref.data.loader import collate_pixels

    if not cfg.data.cache:
        def make_batch(items):
            batch = collate_pixels(source, cfg.data, items, cfg.runtime.seed)
            batch["target_size"] = cfg.data.resolution
            return batch
        return make_batch, cfg.data.num_workers
    from diffusion_pref.data.cache import build_cache, cache_spec, grid_inverter

    invert = None
    if cfg.trajectory.cache_inverted:  # the reference never changes: its inversion of each pair is computed once
        invert = grid_inverter(cfg.trajectory, backbone, reference_predict, accelerator.autocast)
    cached = build_cache(cache_spec(cfg), source, backbone, accelerator=accelerator, invert=invert)
    t = cfg.train
    if not (t.validate_every and t.validation_prompts):  # validation images still need the VAE
        for module in backbone.frozen.values():  # cached training never runs them again
            module.to("cpu")
    return cached.read_batch, 0  # reading a shard is cheaper than forking workers


def load_soft_labels(cfg, source, accelerator):
    """``(soft labels or None, their summary)`` for a loss that takes soft labels (smpo, sppo)."""
    from diffusion_pref.soft_labels import soft_label_summary

    labels = None
    mode = cfg.data.soft_labels
    if mode == "auto":  # p from reward scores (columns or reward.models); the human label only when asked
        mode = "scores"
    if mode == "scores":
        from diffusion_pref.data.cache import cache_spec, soft_label_scores_dir
        from diffusion_pref.soft_labels import soft_labels_for_run

        # Scored once before training and stored in output.dir, so a resumed run reads them back; the main
        # process writes them before the others read them.
        with accelerator.main_process_first():
            labels = soft_labels_for_run(source, cfg.output.dir, cfg.loss, cfg.reward, device=accelerator.device,
                                         score_cache_dir=soft_label_scores_dir(cache_spec(cfg), source))
    elif cfg.loss.name == "smpo":
        logger.warning("data.soft_labels=label with loss smpo: every hard-labelled pair gets p = 1, so the loss is "
                       "dpo with a gamma-fold logit and no reward smoothing; unset data.soft_labels for SmPO's soft "
                       "labels from reward scores")
    summary = soft_label_summary(source, labels)
    logger.info("soft labels (p) from %s: %d pairs, %d with p = 1, mean p %.4f",
                *(summary[k] for k in ("from", "pairs", "p_one", "p_mean")))
    return labels, summary


def fresh_accelerator(runtime_cfg, **kwargs):
    """An accelerate ``Accelerator`` in ``runtime.dtype``'s mixed precision on ``runtime.device`` (cpu forces the CPU;
    otherwise accelerate's device, the process's GPU in a multi-process launch), made from a clean state.

    accelerate keeps its settings in process-wide singletons; a second run in the same process (quickstart, iterate,
    benchmarks, tests) may want another precision or accumulation, so its state is reset first. The process group
    (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from diffusion_pref.config import resolve_runtime

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=resolve_runtime(runtime_cfg).mixed_precision, cpu=runtime_cfg.device == "cpu",
                       **kwargs)


def make_accelerator(t, runtime_cfg, out: Path):
    """The training run's :func:`fresh_accelerator`: with its gradient accumulation, logger and project folder."""
    from accelerate.utils import ProjectConfiguration

    check_sharding_runs_here()
    return fresh_accelerator(runtime_cfg, gradient_accumulation_steps=t.grad_accum,
                             log_with=None if t.logger == "none" else t.logger,
                             project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def training_schedule(schedule, traj_cfg):
    """``schedule`` with the timestep sampling ``trajectory.timestep_sampling`` (and its parameters) asks for."""
    from diffusion_pref.config import ConfigError
    from diffusion_pref.schedules import FlowMatchSchedule

    params = (traj_cfg.logit_mean, traj_cfg.logit_std, traj_cfg.mode_scale)
    if not isinstance(schedule, FlowMatchSchedule):
        if traj_cfg.timestep_sampling not in ("auto", "uniform") or params != (0.0, 1.0, 1.29):
            raise ConfigError(f"trajectory.timestep_sampling={traj_cfg.timestep_sampling} and its logit_mean, "
                              "logit_std, mode_scale choose how a flow-matching model (SD3) draws its timesteps; "
                              "this model's DDPM-type schedule draws them uniformly: unset them")
        return schedule
    kind = schedule.timestep_sampling if traj_cfg.timestep_sampling == "auto" else traj_cfg.timestep_sampling
    return FlowMatchSchedule(schedule.num_train_timesteps, schedule.shift, timestep_sampling=kind,
                             logit_mean=traj_cfg.logit_mean, logit_std=traj_cfg.logit_std,
                             mode_scale=traj_cfg.mode_scale)


def check_run(cfg, reference: str) -> None:
    """Checks of a training run beyond :func:`diffusion_pref.config.validate` (what is installed)."""
    from diffusion_pref.config import ConfigError

    if cfg.train.logger == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("train.logger=wandb needs wandb: pip install wandb, or use "
                              "train.logger=tensorboard") from None


# ------------------------------------------------------------------------------------------------ the run


class Trainer:
    """The training run for one config: ``Trainer(cfg).train()``; tests reach into its parts between the two.

    Construction checks the config and data, loads the model, adds the adapter, builds the reference and the
    optimizer, and restores a checkpoint when ``train.resume`` asks; ``train()`` runs to ``train.max_steps`` and
    writes the outputs.
    """

    def __init__(self, cfg):
        from accelerate.utils import set_seed

        from diffusion_pref.config import resolve_runtime, validate
        from diffusion_pref.data.pairs import PairSource, scores_used
        from diffusion_pref.losses import DIFFUSION_DEFAULT_BETA, LOSS_STATE, LOSSES, REFERENCE_FREE, TAKES_SOFT_LABEL
        from diffusion_pref.losses import check_loss_params
        from diffusion_pref.pipelines import check_resolution, load_backbone
        from diffusion_pref.training.accel import StepAccel
        from diffusion_pref.training.checkpoint import Checkpointer

        self.cfg = cfg
        validate(cfg, loss=True)  # again: a Config built or changed in code skips load_config
        runtime = resolve_runtime(cfg.runtime)  # device and precision; auto is fp32 for training
        t = cfg.train
        self.reference = resolve_reference(cfg.model, needs_ref=cfg.loss.name not in REFERENCE_FREE)
        check_run(cfg, self.reference)
        self.out = out = Path(cfg.output.dir)
        self.accelerator = accelerator = make_accelerator(t, cfg.runtime, out)
        logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        check_device_settings(t, accelerator.device, runtime.mixed_precision)
        check_resolution(cfg.model, cfg.data.resolution)
        set_seed(cfg.runtime.seed)
        self.loss_fn = LOSSES[cfg.loss.name]
        self.loss_params = check_loss_params(cfg.loss.name, dict(cfg.loss.params))
        # load_config writes the loss's own default into loss.beta; a Config built in code may still hold None
        self.beta = cfg.loss.beta if cfg.loss.beta is not None else DIFFUSION_DEFAULT_BETA[cfg.loss.name]
        self.takes_soft = cfg.loss.name in TAKES_SOFT_LABEL
        self.loss_state = LOSS_STATE[cfg.loss.name]() if cfg.loss.name in LOSS_STATE else None

        self.checkpointer = Checkpointer(accelerator, out, keep=t.keep_checkpoints, config=cfg)
        # A resume from another run's checkpoint fails here, before any data or model is loaded.
        resume_from = self.checkpointer.find(t.resume)
        if resume_from is not None:
            self.checkpointer.check_config(resume_from, force=t.resume_force)

        # Data first: a bad dataset fails in seconds, before any model is loaded.
        self.source = PairSource(cfg.data, seed=cfg.runtime.seed,
                                 check_scores=scores_used(cfg.loss, cfg.data.soft_labels))
        self.soft_labels = self.soft_label_summary = None
        # Soft labels before any model loads, except for audio pairs scored by a reward model: those are decoded
        # with the model's front end, whose sample rate decides which rows are bad (skipped alike when scoring and
        # training).
        from diffusion_pref.soft_labels import needs_front_end

        late_labels = self.takes_soft and needs_front_end(self.source, cfg.loss)
        if self.takes_soft and not late_labels:
            self.soft_labels, self.soft_label_summary = load_soft_labels(cfg, self.source, accelerator)
        self.backbone = backbone = load_backbone(cfg.model)
        backbone.schedule = training_schedule(backbone.schedule, cfg.trajectory)
        audio = backbone.audio_front_end(cfg.data.audio_seconds)  # (mel settings, frames) of an audio model
        if audio is not None:
            self.source.use_audio(*audio)
        else:
            check_resolution(cfg.model, cfg.data.resolution, vae=backbone.frozen["vae"])  # the exact factor
        if late_labels:
            self.soft_labels, self.soft_label_summary = load_soft_labels(cfg, self.source, accelerator)
        self.weight_dtype = runtime.dtype
        self.device = accelerator.device
        self.accel = StepAccel.for_run(t, accelerator)
        self.trainable, self.ref_unet = setup_policy(cfg, backbone, self.weight_dtype, self.reference, self.device)
        # self.encode may be wrapped (tests do); the caption count stays on the encoder itself
        self.encode = self.pair_encoder = PairEncoder(backbone, self.weight_dtype)
        self.make_batch, self.num_workers = batch_reader(
            cfg, self.source, backbone, accelerator,
            reference_predictor(backbone, self.reference, backbone.denoiser, self.ref_unet, self.device))

        if accelerator.state.deepspeed_plugin is not None:
            # No dataloader goes through prepare(), so DeepSpeed must be told the micro-batch size directly.
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        optimizer = make_optimizer(t, self.trainable)
        lr_scheduler = make_lr_scheduler(t, optimizer, accelerator.num_processes)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(backbone.denoiser, optimizer, lr_scheduler)
        if cfg.model.finetune == "lora":
            self.checkpointer.register_trainable_only(self.unet)
        self.reference_predict = reference_predictor(backbone, self.reference, accelerator.unwrap_model(self.unet),
                                                     self.ref_unet, self.device, self.accel)

        self.step, self.epoch, self.next_index, self.skipped_total = 0, 0, 0, 0
        if resume_from is not None:
            self.resume(resume_from)
        elif t.resume == "latest":
            logger.info("train.resume=latest: no checkpoint under %s yet, starting from scratch",
                        self.checkpointer.root)

    def resume(self, path: Path) -> None:
        """Restore weights, optimizer, schedule, RNG states, data position and loss state from checkpoint ``path``."""
        state = self.checkpointer.load(path)
        self.step, self.epoch, self.next_index = int(state["step"]), int(state["epoch"]), int(state["next_index"])
        self.skipped_total = int(state.get("skipped_rows", 0))
        self.pair_encoder.captions_cut = state.get("captions_cut", 0)
        loss_state = state.get("loss_state", state.get("bco_shift"))  # bco_shift: checkpoints before LOSS_STATE
        if self.loss_state is not None and loss_state:
            self.loss_state.load_state_dict(loss_state)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.next_index)

    def checkpoint_state(self, epoch: int, next_index: int, skipped_rows: int) -> Dict[str, object]:
        """What a checkpoint stores beside accelerate's state, at a data position (see :meth:`resume`)."""
        return {"epoch": epoch, "next_index": next_index, "skipped_rows": skipped_rows,
                "loss_state": self.loss_state.state_dict() if self.loss_state is not None else None,
                "captions_cut": self.pair_encoder.captions_cut}

    def train(self, save_outputs: bool = True) -> Dict[str, object]:
        """Run to ``train.max_steps``; returns the summary also written to ``train_summary.json``.

        ``save_outputs=False`` skips writing the final LoRA / pipeline (benchmarks time the steps only).
        """
        from diffusion_pref.training.loop import train

        return train(self, save_outputs=save_outputs)

    def validate(self, step: int) -> Path:
        from diffusion_pref.training.validation import validate

        return validate(self, step)

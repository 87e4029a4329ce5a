"""``diffusion-pref train``: fine-tune a diffusion model on preference pairs with any loss of the registry.

One accelerate loop for every loss. Per micro-step: encode the pair batch (or read it from the cache), noise
winner and loser with shared noise and timestep, run the policy once over ``[w; l]``, the reference once under
``no_grad`` (the same UNet with its LoRA adapter switched off, a frozen copy, or nothing for reference-free
losses), turn both into log-likelihood estimates and hand them to ``LOSSES[loss.name]``.

Run it::

    diffusion-pref train --config configs/sd15_dpo_lora.yaml model.pretrained=runwayml/stable-diffusion-v1-5 \\
        data.source=/data/pickapic_v2 train.max_steps=2000
    accelerate launch -m diffusion_pref.cli train --config configs/sdxl_dpo_lora.yaml

Writes into ``output.dir``: ``config.yaml`` (once the checks have passed), ``metrics.jsonl`` (one line per logged step),
TensorBoard logs under ``logs/``, ``checkpoints/step-N``, ``train_summary.json``, and the result: a LoRA in the
diffusers format (``pipe.load_lora_weights(output.dir)``) or, for ``model.finetune=full``, a pipeline folder
(``StableDiffusionPipeline.from_pretrained(output.dir)``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict

from diffusion_pref.training.transfer import to_device

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- loss introspection


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


def _optimizer(cfg, params):
    import torch

    t = cfg.train
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


def _lr_scheduler(cfg, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    from diffusion_pref.config import ConfigError

    t = cfg.train
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

    unet = backbone.unet
    for module in backbone.frozen_modules:
        module.requires_grad_(False)
        module.eval()
    vae_dtype = torch.float32 if getattr(backbone, "vae_keeps_fp32", False) else weight_dtype
    backbone.vae.to(device=device, dtype=vae_dtype)
    for module in backbone.frozen_modules[1:]:
        module.to(device=device, dtype=weight_dtype)

    def frozen_copy():
        ref = copy.deepcopy(unet).requires_grad_(False).eval()
        return ref.to(device="cpu" if reference == "copy_cpu" else device,
                      dtype=torch.float32 if reference == "copy_cpu" else weight_dtype)

    init_lora = cfg.train.init_lora
    if init_lora and cfg.model.finetune != "lora":
        from diffusion_pref.config import ConfigError

        raise ConfigError(f"train.init_lora={init_lora} continues a LoRA: it needs model.finetune=lora")
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
        if cfg.train.channels_last:
            module.to(memory_format=torch.channels_last)
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
    state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in saved.items() if k.startswith("unet.")})
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
    saved_alpha, alpha = header.get("unet.lora_alpha"), unet.peft_config["default"].lora_alpha
    if saved_alpha is not None and float(saved_alpha) != float(alpha):
        raise ConfigError(f"train.init_lora={folder} was trained with model.lora_alpha={saved_alpha}, not {alpha}; "
                          "use the alpha it was trained with")
    set_peft_model_state_dict(unet, state, adapter_name="default")


# ------------------------------------------------------------------------------------------------- the loop


def _flat_hparams(cfg) -> Dict[str, object]:
    import dataclasses

    flat = {}
    for section in dataclasses.fields(cfg):
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            flat[f"{section.name}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _step_seed(seed: int, micro: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, micro]).generate_state(1)[0])


class PairEncoder:
    """Batch -> (latents_w, latents_l, text encodings), from pixels and captions or from the cache."""

    def __init__(self, backbone, device, weight_dtype):
        self.backbone, self.device, self.weight_dtype = backbone, device, weight_dtype
        # Pairs whose caption the text encoder saw cut at its token limit, counted each time a pair is encoded;
        # None once a cache from before this count was read (its shards do not say).
        self.captions_cut = 0

    def _count_cut(self, flags) -> None:
        from diffusion_pref.pipelines import token_limit

        if self.captions_cut is None:
            return
        cut = int(sum(bool(f) for f in flags))
        if cut and not self.captions_cut:  # one warning per run; the total goes to train_summary.json
            logger.warning("captions longer than the text encoder's %s tokens are cut to that length; the count is "
                           "in train_summary.json (captions_cut)", token_limit(self.backbone))
        self.captions_cut += cut

    def __call__(self, batch):
        import torch

        from diffusion_pref.pipelines import texts_cut

        if "latents_w" in batch:
            if "caption_cut" in batch:
                self._count_cut(batch["caption_cut"].tolist())
            else:
                self.captions_cut = None
            # without a host wait for the GPU (the loader pins batches on CUDA): the next step's inputs can be
            # on their way while the GPU still runs this one
            latents_w = to_device(batch["latents_w"], self.device, self.weight_dtype)
            latents_l = to_device(batch["latents_l"], self.device, self.weight_dtype)
            text = {k[len("text."):]: to_device(v, self.device) for k, v in batch.items() if k.startswith("text.")}
            return latents_w, latents_l, text
        pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])  # [2B, 3, R, R]
        latents = self.backbone.encode_media(pixels).to(self.weight_dtype)
        latents_w, latents_l = latents.chunk(2)
        self._count_cut(texts_cut(self.backbone, batch["captions"]))
        return latents_w, latents_l, self.backbone.encode_text(batch["captions"])


class Trainer:
    """The training run for one config: ``Trainer(cfg).train()``; tests reach into its parts between the two.

    Construction checks the config and data, loads the model, adds the adapter, builds the reference and the
    optimizer, and restores a checkpoint when ``train.resume`` asks; ``train()`` runs to ``train.max_steps`` and
    writes the outputs.
    """

    def __init__(self, cfg):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        from diffusion_pref.config import ConfigError, resolve_runtime, validate
        from diffusion_pref.data.loader import collate_pixels
        from diffusion_pref.data.pairs import PairSource, scores_used
        from diffusion_pref.losses import (DIFFUSION_DEFAULT_BETA, LOSSES, REFERENCE_FREE, TAKES_SOFT_LABEL,
                                           RunningMean, check_loss_params)
        from diffusion_pref.pipelines import check_resolution, load_backbone
        from diffusion_pref.training.checkpoint import Checkpointer

        self.cfg = cfg
        validate(cfg, loss=True)  # again: a Config built in code skips load_config
        runtime = resolve_runtime(cfg.runtime)  # device and precision: auto is fp32 for training
        t = cfg.train
        if t.logger == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("train.logger=wandb needs wandb: pip install wandb, or use train.logger=tensorboard") from None
        self.out = out = Path(cfg.output.dir)
        # accelerate keeps its settings in process-wide singletons; a second run in the same process (quickstart,
        # benchmarks, tests) may want another precision or accumulation, so start from a clean state. The
        # process group (PartialState) is kept.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        check_sharding_runs_here()
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=t.grad_accum,
            mixed_precision=runtime.mixed_precision, cpu=cfg.runtime.device == "cpu",  # auto: accelerate's device
            log_with=None if t.logger == "none" else t.logger,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
        logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        check_device_settings(t, accelerator.device, runtime.mixed_precision)
        check_resolution(cfg.model, cfg.data.resolution)
        set_seed(cfg.runtime.seed)
        self.loss_params = check_loss_params(cfg.loss.name, dict(cfg.loss.params))
        self.loss_params.pop("reward_shift", None)
        self.loss_fn = LOSSES[cfg.loss.name]
        # load_config writes the loss's own default into loss.beta; a Config built in code may still hold None
        self.beta = cfg.loss.beta if cfg.loss.beta is not None else DIFFUSION_DEFAULT_BETA[cfg.loss.name]
        self.takes_soft = cfg.loss.name in TAKES_SOFT_LABEL
        self.reference = resolve_reference(cfg.model, needs_ref=cfg.loss.name not in REFERENCE_FREE)
        if cfg.trajectory.cache_inverted and not (cfg.data.cache and cfg.trajectory.kind in ("ddim", "renoise")
                                                  and cfg.trajectory.invert_with == "reference"):
            raise ConfigError("trajectory.cache_inverted=true stores the reference model's inversion in the data "
                              "cache: it needs data.cache=true, trajectory.kind=ddim or renoise and "
                              f"trajectory.invert_with=reference (got data.cache={cfg.data.cache}, "
                              f"kind={cfg.trajectory.kind}, invert_with={cfg.trajectory.invert_with})")
        if cfg.trajectory.invert_with == "reference" and self.reference == "none":
            raise ConfigError(f"trajectory.invert_with=reference needs a reference model, but loss "
                              f"{cfg.loss.name!r} with model.reference={cfg.model.reference!r} has none; use "
                              "trajectory.invert_with=policy or set model.reference (adapter, copy)")

        self.checkpointer = Checkpointer(accelerator, out, keep=t.keep_checkpoints, config=cfg)
        # A resume from another run's checkpoint fails here, before any data or model is loaded.
        resume_from = self.checkpointer.find(t.resume)
        if resume_from is not None:
            self.checkpointer.check_config(resume_from, force=t.resume_force)

        # Data first: a bad dataset fails in seconds, before any model is loaded.
        self.source = source = PairSource(cfg.data, seed=cfg.runtime.seed, check_scores=scores_used(cfg.loss, cfg.data.soft_labels))
        self.soft_labels = self.soft_label_summary = None
        if self.takes_soft:
            from diffusion_pref.soft_labels import soft_label_summary

            mode = cfg.data.soft_labels
            if mode == "auto":  # p from reward scores (columns or reward.models); the human label only when asked
                mode = "scores"
            if mode == "scores":
                from diffusion_pref.data.cache import cache_spec, soft_label_scores_dir
                from diffusion_pref.soft_labels import soft_labels_for_run

                # Scored once before training and stored in output.dir, so a resumed run reads them back; the
                # main process writes them before the others read them.
                with accelerator.main_process_first():
                    self.soft_labels = soft_labels_for_run(source, cfg.output.dir, cfg.loss, cfg.reward, device=accelerator.device,
                                                           score_cache_dir=soft_label_scores_dir(cache_spec(cfg), source))
            elif cfg.loss.name == "smpo":
                logger.warning("data.soft_labels=label with loss smpo: every hard-labelled pair gets p = 1, so the "
                               "loss is dpo with a gamma-fold logit and no reward smoothing; unset data.soft_labels "
                               "for SmPO's soft labels from reward scores")
            self.soft_label_summary = soft_label_summary(source, self.soft_labels)
            logger.info("soft labels (p) from %s: %d pairs, %d with p = 1, mean p %.4f",
                        *(self.soft_label_summary[k] for k in ("from", "pairs", "p_one", "p_mean")))
        self.backbone = backbone = load_backbone(cfg.model)
        check_resolution(cfg.model, cfg.data.resolution, vae=backbone.vae)  # the exact factor, once it is loaded
        self.weight_dtype = runtime.dtype
        self.device = accelerator.device
        if self.device.type == "cuda":
            import torch

            # Training shapes are fixed (one resolution, one batch size; SmPO's inversion adds a few sub-batch sizes),
            # so letting cuDNN time its convolution algorithms once pays off from the first steps.
            torch.backends.cudnn.benchmark = True
        self.trainable, self.ref_unet = setup_policy(cfg, backbone, self.weight_dtype, self.reference, self.device)
        self.graphs = None
        if t.cuda_graphs:
            from accelerate.utils import DistributedType

            from diffusion_pref.training.cuda_graphs import CudaGraphCalls

            if self.device.type != "cuda":
                logger.warning("train.cuda_graphs=true has no effect on %s: the UNet calls run eagerly", self.device)
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                # Sharded parameters are gathered into fresh memory for each call: a recorded graph would read
                # whatever occupied the memory it saw while recording.
                logger.warning("train.cuda_graphs=true is ignored under %s", accelerator.distributed_type)
            elif t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
                logger.info("train.cuda_graphs: torch.compile's %s mode records CUDA graphs itself", t.compile_mode)
            else:
                self.graphs = CudaGraphCalls()
        # self.encode may be wrapped (tests do); the caption count stays on the encoder itself
        self.encode = self.pair_encoder = PairEncoder(backbone, self.device, self.weight_dtype)
        if cfg.data.cache:
            from diffusion_pref.data.cache import build_cache, cache_spec

            invert = None
            if cfg.trajectory.cache_inverted:
                from diffusion_pref.data.cache import grid_inverter

                # the reference model never changes, so its inversion of each pair is computed once, here
                invert = grid_inverter(cfg.trajectory, backbone, functools.partial(self._reference_predict, backbone.unet,
                                                                        record=False), accelerator.autocast)
            cached = build_cache(cache_spec(cfg), source, backbone, accelerator=accelerator, invert=invert)
            self.make_batch = cached.read_batch
            self.num_workers = 0  # reading a shard is cheaper than forking workers
            if not (t.validate_every and t.validation_prompts):  # validation images still need the VAE
                for module in backbone.frozen_modules:  # cached training never runs them again
                    module.to("cpu")
        else:
            def make_batch(items):
                batch = collate_pixels(source, cfg.data, items, cfg.runtime.seed)
                batch["target_size"] = cfg.data.resolution
                return batch

            self.make_batch = make_batch
            self.num_workers = cfg.data.num_workers

        if accelerator.state.deepspeed_plugin is not None:
            # No dataloader goes through prepare(), so DeepSpeed must be told the micro-batch size directly.
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        optimizer = _optimizer(cfg, self.trainable)
        lr_scheduler = _lr_scheduler(cfg, optimizer, accelerator.num_processes)
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(backbone.unet, optimizer, lr_scheduler)
        if cfg.model.finetune == "lora":
            self.checkpointer.register_trainable_only(self.unet)
        self.bco_shift = RunningMean() if cfg.loss.name == "bco" else None

        self.step, self.epoch, self.next_index, self.skipped_total = 0, 0, 0, 0
        if resume_from is not None:
            state = self.checkpointer.load(resume_from)
            self.step, self.epoch, self.next_index = int(state["step"]), int(state["epoch"]), int(state["next_index"])
            self.skipped_total = int(state.get("skipped_rows", 0))
            self.pair_encoder.captions_cut = state.get("captions_cut", 0)
            if self.bco_shift is not None and state.get("bco_shift"):
                self.bco_shift.load_state_dict(state["bco_shift"])
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, self.step, self.epoch,
                        self.next_index)
        elif t.resume == "latest":
            logger.info("train.resume=latest: no checkpoint under %s yet, starting from scratch", self.checkpointer.root)

    def _no_grad_predict(self, name, module, x, tt, c, record: bool = True):
        """A no-grad UNet call, replayed from a CUDA graph under train.cuda_graphs (``name`` tells apart the
        module states that share one module: the adapter on or off). ``record=False``: eager, for one-off calls
        (building the cache) that a graph would only make slower."""
        if self.graphs is None or not record:
            return self.backbone.predict(x, tt, c, unet=module)
        return self.graphs(name, lambda *args: self.backbone.predict(*args, unet=module), x, tt, c)

    def _reference_predict(self, policy, x, tt, c, record: bool = True):
        """The reference model's prediction (no grad): ``policy`` with its adapter switched off, or the copy."""
        if self.reference == "adapter":
            policy.disable_adapters()
            try:
                return self._no_grad_predict("adapter off", policy, x, tt, c, record)
            finally:
                policy.enable_adapters()
        ref_unet = self.ref_unet
        ref_device, ref_dtype = next(ref_unet.parameters()).device, next(ref_unet.parameters()).dtype
        pred = self._no_grad_predict("reference", ref_unet, x.to(ref_device, ref_dtype), tt.to(ref_device),
                                     {k: v.to(ref_device) for k, v in c.items()}, record)
        return pred.to(self.device)

    def train(self, save_outputs: bool = True) -> Dict[str, object]:
        """Run to ``train.max_steps``; returns the summary also written to ``train_summary.json``.

        ``save_outputs=False`` skips writing the final LoRA / pipeline (benchmarks time the steps only).
        """
        import torch
        from tqdm.auto import tqdm

        from diffusion_pref.data.loader import PairBatches, make_loader
        from diffusion_pref.losses import denoising_log_likelihood
        from diffusion_pref.pipelines.stable_diffusion import repeat_pair
        from diffusion_pref.training.step_readout import DeferredReadout
        from diffusion_pref.trajectories import make_trajectory, trajectory_options

        cfg, t, out = self.cfg, self.cfg.train, self.out
        accelerator, backbone, device = self.accelerator, self.backbone, self.device
        unet, optimizer, lr_scheduler = self.unet, self.optimizer, self.lr_scheduler
        reference, ref_unet, trainable = self.reference, self.ref_unet, self.trainable
        step, epoch, next_index, skipped_total = self.step, self.epoch, self.next_index, self.skipped_total
        bco_shift = self.bco_shift

        batches = PairBatches(self.source, self.make_batch, t.batch_size, rank=accelerator.process_index,
                              world=accelerator.num_processes, start_epoch=epoch, start_index=next_index)
        data_iter = iter(make_loader(batches, self.num_workers))
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers("train", config=_flat_hparams(cfg) if t.logger == "tensorboard" else None)
            logger.info("data: %s; reference: %s; trainable parameters: %d", self.source.summary(), reference,
                        sum(p.numel() for p in trainable))
            logger.info("loss %s: beta %g", cfg.loss.name, self.beta)
        metrics_file = out / "metrics.jsonl"
        if accelerator.is_main_process and metrics_file.is_file():
            # Keep the lines up to the step this run starts from: a fresh run in an old folder starts a new log, a
            # resumed one drops what the interrupted run logged after its last checkpoint.
            kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= step]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        unwrapped = accelerator.unwrap_model(unet)

        no_grad_predict = self._no_grad_predict
        reference_predict = functools.partial(self._reference_predict, unwrapped)
        if cfg.trajectory.invert_with == "reference":
            invert_predict = reference_predict
        else:
            def invert_predict(x, tt, c):
                return no_grad_predict("policy", unwrapped, x, tt, c)

        progress = tqdm(total=t.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
        readout = DeferredReadout()

        def report(values, info):
            """Log one finished step: metrics line, TensorBoard, progress bar; stop on a diverged loss."""
            logs = {k: v / accelerator.num_processes for k, v in zip(info["keys"], values[:-1])}
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"loss is {logs['loss']} at step {info['step']}; lower train.learning_rate "
                                         "or loss.beta, or use runtime.dtype=bf16 instead of fp16")
            if bco_shift is not None:
                bco_shift.update(logs["reward_batch_mean"], count=2 * int(values[-1]))
            logs.update(lr=info["lr"], pairs_per_s=values[-1] / max(info["seconds"], 1e-9),
                        skipped_rows=info["skipped_rows"], epoch=info["epoch"])
            if accelerator.is_main_process and (info["step"] % t.log_every == 0 or info["step"] == t.max_steps):
                accelerator.log(logs, step=info["step"])
                with open(metrics_file, "a") as f:
                    f.write(json.dumps({"step": info["step"], **logs}) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('implicit_acc', math.nan):.2f}",
                                 margin=f"{logs.get('margin', math.nan):.2e}", lr=f"{logs['lr']:.2e}",
                                 pairs_s=f"{logs['pairs_per_s']:.1f}")
        sums: Dict[str, float] = {}
        micro_in_step = 0
        pairs_in_step = 0
        last_time = time.perf_counter()
        while step < t.max_steps:
            batch = next(data_iter)
            skipped_total += int(batch["skipped"])
            if batch["size"] == 0:  # every row of this batch was undecodable and skipped
                epoch, next_index = batch["epoch"], batch["next_index"]
                continue
            micro = step * t.grad_accum + micro_in_step
            generator = torch.Generator().manual_seed(_step_seed(cfg.runtime.seed, micro))
            with accelerator.accumulate(unet):
                latents_w, latents_l, text = self.encode(batch)
                cond = repeat_pair(backbone.conditioning(text, batch))
                # trajectory.cache_inverted: the reference's inversion of these pairs, read from the cache
                inverted = (torch.cat([to_device(batch[k], device) for k in ("inverted_w", "inverted_l")])
                            if "inverted_w" in batch else None)
                with accelerator.autocast():
                    # Noise and t of each pair do not depend on the process count; ddim / renoise invert x0 with
                    # the current model (SmPO) or the reference (invert_with), under no_grad in make_trajectory.
                    traj = make_trajectory(
                        cfg.trajectory.kind, backbone.scheduler, latents_w, latents_l,
                        predict_fn=invert_predict, cond=cond, inverted=inverted,
                        generator=generator, process_index=accelerator.process_index,
                        num_processes=accelerator.num_processes, **trajectory_options(cfg.trajectory),
                    )
                # The gradient forward gets its own autocast region: leaving this one clears autocast's weight-cast
                # cache. Torch before PR #165068 would otherwise hand the policy forward the casts the no-grad
                # inversion cached, without gradient (full fine-tuning would train only the norms).
                with accelerator.autocast():
                    ref_w = ref_l = None
                    if reference != "none":
                        with torch.no_grad():
                            ref_pred = reference_predict(traj.x_t, traj.t, cond)
                            ref_w, ref_l = denoising_log_likelihood(ref_pred, traj.target).chunk(2)
                    pred = backbone.predict(traj.x_t, traj.t, cond, unet=unet)  # [2B, C, H, W], one pass over [w; l]
                policy_w, policy_l = denoising_log_likelihood(pred, traj.target).chunk(2)  # [B] each
                extra = {}
                # soft labels stay on the host: the loss checks their range there and then moves them
                if self.soft_labels is not None:
                    extra["soft_label"] = self.soft_labels.lookup(batch["rows"])
                elif self.takes_soft:
                    extra["soft_label"] = batch["soft_label"]
                if bco_shift is not None:
                    extra["reward_shift"] = bco_shift.mean
                loss_per_pair, metrics = self.loss_fn(policy_w, policy_l, ref_w, ref_l, beta=self.beta,
                                                       **self.loss_params, **extra)
                loss = loss_per_pair.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            values = {"loss": loss.detach(), "mse_w": -policy_w.detach().mean(), "mse_l": -policy_l.detach().mean()}
            if ref_w is not None:
                values.update(ref_mse_w=-ref_w.mean(), ref_mse_l=-ref_l.mean())
            values.update({k: v for k, v in metrics.items() if v.ndim == 0})
            for key, value in values.items():  # summed on the device; read on the host one step late (report)
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            micro_in_step += 1
            pairs_in_step += int(batch["size"])
            epoch, next_index = batch["epoch"], batch["next_index"]
            if not accelerator.sync_gradients:
                continue

            step += 1
            means = {k: v / micro_in_step for k, v in sums.items()}
            pairs = torch.full((), float(pairs_in_step), device=device)  # made on the device: no host copy to wait on
            reduced = accelerator.reduce(torch.stack([*(v.to(device) for v in means.values()), pairs]), "sum")
            now = time.perf_counter()
            info = {"step": step, "keys": list(means), "seconds": now - last_time, "skipped_rows": skipped_total,
                    "epoch": epoch, "lr": lr_scheduler.get_last_lr()[0]}
            last_time = now
            sums, micro_in_step, pairs_in_step = {}, 0, 0
            finished = [readout.put(reduced, info)]  # the previous step's values, read while this one runs
            validating = t.validate_every > 0 and bool(t.validation_prompts) and step % t.validate_every == 0
            saving = t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < t.max_steps
            if bco_shift is not None or validating or saving or step == t.max_steps:
                # Needed now: BCO's running shift enters the next step's loss, and a validation, a checkpoint or
                # the end of training must come after their step's metrics line and its divergence check.
                finished.append(readout.take())
            for item in finished:
                if item is not None:
                    report(*item)
            if validating:
                self.validate(step)
            if saving:
                self.checkpointer.save(step, {"epoch": epoch, "next_index": next_index, "skipped_rows": skipped_total,
                                         "bco_shift": bco_shift.state_dict() if bco_shift is not None else None,
                                         "captions_cut": self.pair_encoder.captions_cut})
        progress.close()

        accelerator.wait_for_everyone()
        summary = {"steps": step, "data": self.source.summary(), "skipped_rows": skipped_total, "reference": reference,
                   "output": "lora" if cfg.model.finetune == "lora" else "pipeline", "beta": self.beta,
                   "captions_cut": self._captions_cut_total()}
        if self.soft_label_summary is not None:
            summary["soft_labels"] = self.soft_label_summary
        # Full weights are gathered on every process (FSDP / ZeRO-3 shard them); LoRA weights are never sharded.
        full_state = accelerator.get_state_dict(unet) if save_outputs and cfg.model.finetune == "full" else None
        if accelerator.is_main_process and save_outputs:
            final_unet = accelerator.unwrap_model(unet)
            if cfg.model.finetune == "lora":
                backbone.save_lora(out, final_unet)
            else:
                backbone.save_full(out, final_unet, full_state)
            (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
            logger.info("done: %s written to %s", summary["output"], out)
        accelerator.end_training()
        self.step, self.epoch, self.next_index, self.skipped_total = step, epoch, next_index, skipped_total
        return summary


    def _captions_cut_total(self):
        """Pairs whose caption was cut at the text encoder's token limit, over every process (None: unknown)."""
        import torch

        cut = self.pair_encoder.captions_cut
        counts = torch.tensor([cut or 0, int(cut is None)], device=self.device)
        total, unknown = self.accelerator.reduce(counts, "sum").tolist()
        return None if unknown else int(total)

    def validate(self, step: int) -> Path:
        """Images for ``train.validation_prompts`` (seed i for prompt i), with and without the adapter.

        Written as PNGs to ``output.dir/validation/step-N/`` and logged to TensorBoard. Runs on the main
        process only; the fixed seeds make the images of different steps comparable.
        """
        import numpy as np
        import torch

        accelerator, cfg = self.accelerator, self.cfg
        folder = self.out / "validation" / f"step-{step:08d}"
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(self.unet)
            prompts = list(cfg.train.validation_prompts)
            seeds = list(range(len(prompts)))
            kwargs = dict(steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
                          resolution=cfg.sample.resolution or cfg.data.resolution)
            unwrapped.eval()
            panels = {}
            with torch.no_grad(), accelerator.autocast():
                panels["tuned"] = self.backbone.generate(prompts, seeds, **kwargs)
                if cfg.model.finetune == "lora":
                    unwrapped.disable_adapters()
                    panels["base"] = self.backbone.generate(prompts, seeds, **kwargs)
                    unwrapped.enable_adapters()
            unwrapped.train()
            folder.mkdir(parents=True, exist_ok=True)
            for name, images in panels.items():
                for i, image in enumerate(images):
                    image.save(folder / f"{i:02d}_{name}.png")
            if cfg.train.logger == "tensorboard":
                writer = accelerator.get_tracker("tensorboard", unwrap=True)
                for name, images in panels.items():
                    writer.add_images(f"validation/{name}", np.stack([np.asarray(im) for im in images]), step,
                                      dataformats="NHWC")
        accelerator.wait_for_everyone()
        return folder


def run(cfg) -> None:
    """``diffusion-pref train``: see the module docstring."""
    from diffusion_pref.config import save_config

    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        # Only now, after the config, data, model and resume checks: a run that fails them leaves the folder's
        # record of an earlier run alone.
        save_config(cfg, cfg.output.dir)
    trainer.train()

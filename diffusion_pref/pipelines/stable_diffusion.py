"""Stable Diffusion 1.x / 2.x as a backbone: the :class:`~diffusion_pref.pipelines.base.Backbone` protocol over a
diffusers ``StableDiffusionPipeline``.

The pipeline loads without its safety checker; :meth:`StableDiffusionBackbone.sample` loads the checker the model
ships the first time it is asked to run it.

Example::

    from diffusion_pref.pipelines import load_backbone
    backbone = load_backbone(cfg.model)                  # "toy", a hub id, or a diffusers folder
    text = backbone.encode_prompts(["a red cat"])        # {"encoder_hidden_states": [1, L, D]}
    latents = backbone.encode(pixels)                    # pixels [B, 3, H, W] in [-1, 1] -> [B, 4, H/8, W/8]
    pred = backbone.predict(x_t, t, backbone.conditioning(text, batch))
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

from diffusion_pref.pipelines.base import Backbone, Samples, scheduler_class, smallest_token_limit, texts_over_limit


class ModelLoadError(ValueError):
    """model.pretrained could not be loaded; the message says what was tried and what to do."""


def load_pipeline(pipeline_cls, model_cfg, **kwargs):
    """``pipeline_cls.from_pretrained`` with a readable error instead of a deep library traceback."""
    from diffusion_pref.pipelines import resolve_pretrained

    location = resolve_pretrained(model_cfg.pretrained)
    extra = {}
    if model_cfg.vae and "vae" not in kwargs:
        from diffusers import AutoencoderKL

        try:
            extra["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae)
        except Exception as err:
            raise ModelLoadError(f"could not load model.vae={model_cfg.vae!r} ({type(err).__name__}: {err}); "
                                 "give a hub id or a folder with an AutoencoderKL config.json") from None
        if kwargs.get("torch_dtype") is not None:
            extra["vae"].to(dtype=kwargs["torch_dtype"])  # a VAE passed in as a component is not cast by torch_dtype
    try:
        with warnings.catch_warnings():
            # Newer diffusers renamed torch_dtype to dtype; the old name still works in every version we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return pipeline_cls.from_pretrained(location, revision=model_cfg.revision, variant=model_cfg.variant,
                                                **extra, **kwargs)
    except Exception as err:
        raise ModelLoadError(
            f"could not load model.pretrained={model_cfg.pretrained!r} as a {pipeline_cls.__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); give a diffusers pipeline "
            "folder (with model_index.json), a hub id reachable from this machine, or 'toy'"
        ) from None


class StableDiffusionBackbone(Backbone):
    """SD1.x/2.x: one CLIP text encoder, cross-attention conditioning only."""

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, pipe, model_cfg=None):
        from diffusion_pref.schedules import schedule_from_scheduler

        self.pipe = pipe
        self.model_cfg = model_cfg
        pipe.set_progress_bar_config(disable=True)
        # Training noises with the forward process of the checkpoint's own schedule and prediction type.
        self.schedule = schedule_from_scheduler(pipe.scheduler.config)
        self.frozen_dtype = {}
        # The safety checker runs only when sample() asks for it: kept off the pipeline (and off the device) else.
        self._safety_checker = getattr(pipe, "safety_checker", None)
        self._safety_checker_looked_up = self._safety_checker is not None or model_cfg is None
        if self._safety_checker is not None:
            pipe.safety_checker = None
        self._sampling_schedulers: Dict[str, object] = {}

    @classmethod
    def load(cls, model_cfg, dtype=None):
        from diffusers import StableDiffusionPipeline

        pipe = load_pipeline(StableDiffusionPipeline, model_cfg, safety_checker=None, requires_safety_checker=False,
                             **({} if dtype is None else {"torch_dtype": dtype}))
        return cls(pipe, model_cfg)

    @property
    def denoiser(self):
        return self.pipe.unet

    @property
    def frozen(self) -> Dict[str, object]:
        return {"vae": self.pipe.vae, "text_encoder": self.pipe.text_encoder}

    # -- encoders ------------------------------------------------------------------------------------------
    def _tokenizers(self) -> list:
        return [self.pipe.tokenizer]

    def _tokens(self, tokenizer, captions: Sequence[str], device):
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(device)

    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, object]:
        """-> {"encoder_hidden_states": [B, L, D]} (the last hidden state, as SD1.x/2.x were trained)."""
        import torch

        encoder = self.pipe.text_encoder
        with torch.no_grad():
            hidden = encoder(self._tokens(self.pipe.tokenizer, prompts, encoder.device))[0]
        return {"encoder_hidden_states": hidden}

    def prompts_cut(self, prompts: Sequence[str]) -> List[bool]:
        return texts_over_limit(self._tokenizers(), prompts)

    def token_limit(self) -> Optional[int]:
        return smallest_token_limit(self._tokenizers())

    def encode(self, media):
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, C, H/f, W/f]``.

        Uses the posterior mode, not a sample: deterministic, so cached and uncached latents are identical (the
        SD VAE's posterior std is tiny next to the diffusion noise).
        """
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(media.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode(self, latents):
        """Scaled latents -> pixels ``[B, 3, H, W]`` in about [-1, 1] (the VAE decoder's output, its dtype)."""
        import torch

        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift).sample

    def conditioning(self, text: Dict[str, object], batch: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        """The UNet's keyword inputs for a batch, from its text encodings (and, for SDXL, its size metadata)."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    # -- the denoiser --------------------------------------------------------------------------------------
    def predict(self, x_t, t, cond: Dict[str, object], denoiser=None):
        """UNet output for ``x_t`` ``[N, C, H, W]`` at ``t`` ``[N]``; ``denoiser`` overrides the policy (a reference copy)."""
        denoiser = self.denoiser if denoiser is None else denoiser
        return denoiser(x_t, self.schedule.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"]).sample

    # -- sampling ------------------------------------------------------------------------------------------
    def _safety_checker_for(self, wanted: Optional[bool]):
        """The safety checker to run (None: none), loaded from the model the first time it is wanted."""
        if wanted is False:
            return None
        if not self._safety_checker_looked_up:
            self._safety_checker_looked_up = True
            self._safety_checker = self._load_safety_checker()
        if self._safety_checker is None:
            if wanted:
                where = f" {self.model_cfg.pretrained}" if self.model_cfg is not None else ""
                raise ValueError(f"safety_checker=true: the {self.family} model{where} ships no safety checker; set "
                                 "sample.safety_checker=false")
            return None
        encoder = self.pipe.text_encoder  # the pipeline feeds the checker in the prompt embeddings' dtype
        return self._safety_checker.to(device=encoder.device, dtype=encoder.dtype)

    def _load_safety_checker(self):
        from diffusers import DiffusionPipeline, StableDiffusionPipeline

        from diffusion_pref.pipelines import resolve_pretrained

        cfg = self.model_cfg
        try:
            entry = DiffusionPipeline.load_config(resolve_pretrained(cfg.pretrained), revision=cfg.revision)
        except Exception:
            return None
        if not (entry.get("safety_checker") or [None])[0]:
            return None
        # Every component already loaded is passed in, so only the checker (and its image processor) load.
        have = {name: getattr(self.pipe, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                            "feature_extractor") if getattr(self.pipe, name, None) is not None}
        full = load_pipeline(StableDiffusionPipeline, cfg, **have)
        if self.pipe.feature_extractor is None:
            self.pipe.feature_extractor = full.feature_extractor
        return full.safety_checker

    def _sampling_scheduler(self, name: str):
        if name not in self._sampling_schedulers:
            self._sampling_schedulers[name] = scheduler_class(name).from_config(self.pipe.scheduler.config)
        return self._sampling_schedulers[name]

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
               resolution: Optional[int] = None, scheduler: Optional[str] = None,
               safety_checker: Optional[bool] = False, output_type: str = "pil") -> Samples:
        """One sample per (prompt, seed); each one's noise comes from its own seed (a CPU generator: the same noise
        on any device), so results don't depend on batching. See :meth:`Backbone.sample`."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        checker = self._safety_checker_for(safety_checker)
        sampler = self._sampling_scheduler(scheduler) if scheduler else None
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        pipe = self.pipe
        model_scheduler = pipe.scheduler
        try:
            if sampler is not None:
                pipe.scheduler = sampler
            if checker is not None:
                pipe.safety_checker = checker
            output = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators, output_type=output_type, **size)
        finally:
            pipe.scheduler = model_scheduler
            if checker is not None:
                pipe.safety_checker = None
        return Samples(list(output.images), getattr(output, "nsfw_content_detected", None))

    def load_lora(self, folder) -> None:
        """``pipe.load_lora_weights``: the format :meth:`save_lora` writes (its lora_alpha is read from the file)."""
        self.pipe.load_lora_weights(str(folder))

    def unload_lora(self) -> None:
        self.pipe.unload_lora_weights()

    # -- outputs -------------------------------------------------------------------------------------------
    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def save_lora(self, directory, denoiser) -> None:
        """The adapter in the diffusers LoRA format: ``pipe.load_lora_weights(directory)`` loads it."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
        # The adapter's config travels in the file's header, where the loader reads lora_alpha: without it the
        # loader assumes alpha = rank, and an adapter trained with another alpha loads at the wrong scale.
        self._pipeline_class().save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True,
                                                 unet_lora_adapter_metadata=denoiser.peft_config["default"].to_dict())

    def _full_pipeline(self, denoiser):
        return load_pipeline(self._pipeline_class(), self.model_cfg, unet=denoiser, safety_checker=None,
                             requires_safety_checker=False)

    def save_full(self, directory, denoiser, state_dict=None) -> None:
        """A full pipeline folder with the trained UNet; the frozen parts are reloaded at their original precision.

        ``state_dict``: the gathered UNet weights when the live module is sharded (FSDP, ZeRO-3).
        """
        if state_dict is not None:
            denoiser = type(denoiser).from_config(denoiser.config)
            denoiser.load_state_dict(state_dict)
        self._full_pipeline(denoiser).save_pretrained(str(directory), safe_serialization=True)

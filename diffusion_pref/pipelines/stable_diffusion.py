"""Stable Diffusion 1.x / 2.x as a training backbone: a thin adapter over a diffusers ``StableDiffusionPipeline``.

The surface every backbone shares (docs/design.md): ``encode_text``, ``encode_media`` (pixels -> latents),
``predict(x_t, t, cond)``, ``target(x0, noise, t)`` (epsilon or v), ``scheduler`` (the training noise schedule),
``generate(prompts, seeds, ...)``, plus ``save_lora`` / ``save_full`` for the trainer's outputs.

Example::

    from diffusion_pref.pipelines import load_backbone
    backbone = load_backbone(cfg.model)                 # "toy", a hub id, or a diffusers folder
    text = backbone.encode_text(["a red cat"])          # {"encoder_hidden_states": [1, L, D]}
    latents = backbone.encode_media(pixels)              # pixels [B, 3, H, W] in [-1, 1] -> [B, 4, H/8, W/8]
    pred = backbone.predict(x_t, t, backbone.conditioning(text, batch))
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence


class ModelLoadError(ValueError):
    """model.pretrained could not be loaded; the message says what was tried and what to do."""


def load_pipeline(pipeline_cls, model_cfg, **kwargs):
    """``pipeline_cls.from_pretrained`` with a readable error instead of a deep library traceback."""
    from diffusion_pref.pipelines import resolve_pretrained

    location = resolve_pretrained(model_cfg.pretrained)
    extra = {}
    if model_cfg.vae:
        from diffusers import AutoencoderKL

        try:
            extra["vae"] = AutoencoderKL.from_pretrained(model_cfg.vae)
        except Exception as err:
            raise ModelLoadError(f"could not load model.vae={model_cfg.vae!r} ({type(err).__name__}: {err}); "
                                 "give a hub id or a folder with an AutoencoderKL config.json") from None
    try:
        return pipeline_cls.from_pretrained(location, revision=model_cfg.revision, variant=model_cfg.variant,
                                            **extra, **kwargs)
    except Exception as err:
        raise ModelLoadError(
            f"could not load model.pretrained={model_cfg.pretrained!r} as a {pipeline_cls.__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); give a diffusers pipeline "
            "folder (with model_index.json), a hub id reachable from this machine, or 'toy'"
        ) from None


class StableDiffusionBackbone:
    """SD1.x/2.x: one CLIP text encoder, cross-attention conditioning only."""

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, pipe, model_cfg=None):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.model_cfg = model_cfg
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        # Training noises with the DDPM forward process of the checkpoint's own betas and prediction type.
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @classmethod
    def load(cls, model_cfg):
        from diffusers import StableDiffusionPipeline

        pipe = load_pipeline(StableDiffusionPipeline, model_cfg, safety_checker=None, requires_safety_checker=False)
        return cls(pipe, model_cfg)

    @property
    def frozen_modules(self) -> List[object]:
        return [self.vae, self.text_encoder]

    # -- encoders ------------------------------------------------------------------------------------------
    def _tokens(self, tokenizer, captions: Sequence[str], device):
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(device)

    def encode_text(self, captions: Sequence[str]) -> Dict[str, object]:
        """-> {"encoder_hidden_states": [B, L, D]} (the last hidden state, as SD1.x/2.x were trained)."""
        import torch

        with torch.no_grad():
            ids = self._tokens(self.tokenizer, captions, self.text_encoder.device)
            hidden = self.text_encoder(ids)[0]
        return {"encoder_hidden_states": hidden}

    def encode_media(self, pixels):
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, C, H/f, W/f]``.

        Uses the posterior mean, not a sample: deterministic, so cached and uncached latents are identical (the
        SD VAE's posterior std is tiny next to the diffusion noise).
        """
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
            latents = dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def conditioning(self, text: Dict[str, object], batch: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        """The UNet's keyword inputs for a batch, from its text encodings (and, for SDXL, its size metadata)."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    # -- the denoiser --------------------------------------------------------------------------------------
    def predict(self, x_t, t, cond: Dict[str, object], unet=None):
        """UNet output for ``x_t`` ``[N, C, H, W]`` at ``t`` ``[N]``; ``unet`` overrides the policy (a reference copy)."""
        unet = self.unet if unet is None else unet
        return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def target(self, x0, noise, t):
        from diffusion_pref.trajectories import denoising_target

        return denoising_target(self.scheduler, x0, noise, t)

    # -- sampling ------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance_scale: float = 7.5,
                 resolution: Optional[int] = None, output_type: str = "pil"):
        """One image per (prompt, seed); each image's noise comes from its own seed, so results don't depend on batching."""
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        kwargs = {} if resolution is None else {"height": resolution, "width": resolution}
        return self.pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=generators, output_type=output_type, **kwargs).images

    # -- outputs -------------------------------------------------------------------------------------------
    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def save_lora(self, directory, unet) -> None:
        """The adapter in the diffusers LoRA format: ``pipe.load_lora_weights(directory)`` loads it."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        # The adapter's config travels in the file's header, where the loader reads lora_alpha: without it the
        # loader assumes alpha = rank, and an adapter trained with another alpha loads at the wrong scale.
        self._pipeline_class().save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True,
                                                 unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())

    def save_full(self, directory, unet, state_dict=None) -> None:
        """A full pipeline folder with the trained UNet; the frozen parts are reloaded at their original precision.

        ``state_dict``: the gathered UNet weights when the live module is sharded (FSDP, ZeRO-3).
        """
        if state_dict is not None:
            unet = type(unet).from_config(unet.config)
            unet.load_state_dict(state_dict)
        pipe = load_pipeline(self._pipeline_class(), self.model_cfg, unet=unet,
                             **({"safety_checker": None, "requires_safety_checker": False} if self.family == "sd" else {}))
        pipe.save_pretrained(str(directory), safe_serialization=True)


def repeat_pair(cond: Dict[str, object]) -> Dict[str, object]:
    """Repeat every per-pair tensor for the ``[w; l]`` layout (both sides of a pair share the prompt)."""
    import torch

    return {k: torch.cat([v, v]) if hasattr(v, "shape") else v for k, v in cond.items()}

"""Stable Diffusion 3 as a training backbone: an MMDiT transformer trained by rectified flow.

A thin adapter over diffusers' ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``, ``AutoencoderKL`` with 16
latent channels, ``FlowMatchEulerDiscreteScheduler``, text encoders CLIP-L, CLIP-G and optionally T5: a folder whose
``model_index.json`` has no ``text_encoder_3`` loads with ``text_encoder_3=None``, and the pipeline feeds zeros in
T5's place, as diffusers documents for SD3 without T5).

What changes against the SD/SDXL UNet backbones, and nothing else does:

- Noise: ``x_t = (1 - sigma) x0 + sigma eps`` with SD3's shifted sigmas (the scheduler's ``shift``, 3.0 for SD3),
  target the velocity ``eps - x0``; ``schedule`` (a ``FlowMatchSchedule``) holds that arithmetic, and ``predict``
  tells the transformer ``schedule.model_timestep(t) = sigma * 1000``, what the pipeline passes when sampling.
- Latents: ``(vae mode - shift_factor) * scaling_factor`` (SD3: 0.0609, 1.5305), and back for decoding.
- Text: the pipeline's own ``encode_prompt`` without classifier-free guidance: ``prompt_embeds`` ``[B, 77 + L_T5,
  4096]`` (CLIP-L and CLIP-G penultimate states concatenated, zero-padded to T5's width, then T5's states) and
  ``pooled_prompt_embeds`` ``[B, 2048]``.

The per-sample log-likelihood estimate every loss consumes stays ``-mean_{C,H,W}(pred - target)^2``
(``losses.denoising_log_likelihood``); with the velocity target it is ``-mean((v_pred - (eps - x0))^2)``. Weighting:
uniform in the velocity error, no per-sigma factor. SD3's own training (diffusers' ``train_dreambooth_lora_sd3.py``,
``--weighting_scheme logit_normal``) draws sigma from the logit-normal density and weights the velocity MSE by 1
(``compute_loss_weighting_for_sd3`` returns ones for it): the non-uniform emphasis lives in the timestep density,
not in a weight. Flow-DPO (Liu et al. 2025, arXiv 2501.13918; code released in yifan123/flow_grpo,
``scripts/train_sd3_dpo.py``, linked from KwaiVGI/VideoAlign's README) does the same: logit-normal(0, 1) timesteps
and unweighted per-sample velocity MSEs inside ``-logsigmoid(-beta/2 * diff)``, one beta for every timestep. So
the Diffusion-DPO estimate carries over unchanged, and beta keeps the README's mapping (their ``beta`` 100 = our 50).

Example::

    backbone = load_backbone(cfg.model)            # model_index.json says StableDiffusion3Pipeline
    text = backbone.encode_prompts(["a red cat"])   # prompt_embeds [1, S, D], pooled_prompt_embeds [1, P]
    x0 = backbone.encode(pixels)                    # [B, 16, H/8, W/8] for the real VAE
    v = backbone.predict(x_t, t, backbone.conditioning(text))   # t: schedule indices in [0, 1000)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from diffusion_pref.pipelines.base import Backbone, Samples, scheduler_class, smallest_token_limit, texts_over_limit
from diffusion_pref.pipelines.stable_diffusion import load_pipeline
from diffusion_pref.schedules import schedule_from_scheduler

# The attention projections of the joint (image + text) attention that Diffusion-DPO's UNet recipes adapt; the
# context stream's add_{q,k,v}_proj / to_add_out can be added through model.lora_targets (Flow-DPO adapts both).
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class SD3Backbone(Backbone):
    """SD3 / SD3.5: ``denoiser`` is the ``SD3Transformer2DModel``; see the module docstring."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_lora_targets = SD3_LORA_TARGETS

    def __init__(self, pipe, model_cfg=None, max_sequence_length: int = 256):
        self.pipe = pipe
        self.model_cfg = model_cfg
        pipe.set_progress_bar_config(disable=True)
        self.denoiser = pipe.transformer
        self.frozen = {name: module for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
                       if (module := getattr(pipe, name)) is not None}
        # The VAE stays fp32 under fp16/bf16 training, as Flow-DPO's SD3 script keeps it (yifan123/flow_grpo,
        # scripts/train_sd3_dpo.py: vae.to(..., dtype=torch.float32), the text encoders in the half dtype).
        self.frozen_dtype: Dict[str, object] = {"vae": _float32()}
        self.schedule = schedule_from_scheduler(pipe.scheduler)  # FlowMatchSchedule: the scheduler's shift
        # T5's sequence length: the pipeline's default 256, cut to a shorter tokenizer's limit (the test kit's 32)
        limit = getattr(pipe.tokenizer_3, "model_max_length", None)
        self.max_sequence_length = min(max_sequence_length, limit) if isinstance(limit, int) else max_sequence_length

    @classmethod
    def load(cls, model_cfg, dtype=None):
        from diffusers import StableDiffusion3Pipeline

        from diffusion_pref.pipelines import resolve_pretrained

        extra = {} if dtype is None else {"torch_dtype": dtype}
        index = Path(resolve_pretrained(model_cfg.pretrained)) / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("text_encoder_3", [None])[0] is None:
            extra.update(text_encoder_3=None, tokenizer_3=None)  # saved without T5: diffusers wants them named
        return cls(load_pipeline(StableDiffusion3Pipeline, model_cfg, **extra), model_cfg)

    # -- encoders ------------------------------------------------------------------------------------------
    def encode(self, media):
        """Pixels ``[B, 3, H, W]`` in [-1, 1] -> ``(posterior mode - shift_factor) * scaling_factor``."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(media.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def decode(self, latents):
        """The inverse of :meth:`encode`: latents -> pixels in about [-1, 1] (as the pipeline decodes)."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            return vae.decode(z).sample

    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, object]:
        """-> ``{"prompt_embeds": [B, S, D], "pooled_prompt_embeds": [B, P]}`` by the pipeline's ``encode_prompt``."""
        import torch

        device = self.pipe.text_encoder.device
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(prompts), None, None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _tokenizers(self) -> list:
        tokenizers = [self.pipe.tokenizer, self.pipe.tokenizer_2]
        if self.pipe.text_encoder_3 is not None:
            tokenizers.append(_Limited(self.pipe.tokenizer_3, self.max_sequence_length))
        return tokenizers

    def prompts_cut(self, prompts: Sequence[str]) -> List[bool]:
        """Per prompt, whether an encoder sees it cut (CLIP at its 77 tokens, T5 at ``max_sequence_length``)."""
        return texts_over_limit(self._tokenizers(), prompts)

    def token_limit(self) -> Optional[int]:
        return smallest_token_limit(self._tokenizers())

    def conditioning(self, text: Dict[str, object], batch: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        """The transformer's keyword inputs: SD3 has no size micro-conditioning, so ``batch`` adds nothing."""
        return {"encoder_hidden_states": text["prompt_embeds"], "pooled_projections": text["pooled_prompt_embeds"]}

    # -- the denoiser --------------------------------------------------------------------------------------
    def predict(self, x_t, t, cond: Dict[str, object], denoiser=None):
        """Velocity for ``x_t`` ``[N, C, H, W]`` at schedule indices ``t`` ``[N]``; ``denoiser`` overrides the policy
        (a reference copy)."""
        module = self.denoiser if denoiser is None else denoiser
        timestep = self.schedule.model_timestep(t).to(x_t.device)
        return module(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                      pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    # -- sampling ------------------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
               resolution: Optional[int] = None, scheduler: Optional[str] = None,
               safety_checker: Optional[bool] = False, output_type: str = "pil") -> Samples:
        """One image per (prompt, seed), each from its own seed's CPU generator (independent of batching), with
        the T5 length training encodes with. See :meth:`Backbone.sample`; SD3 ships no safety checker, so
        ``safety_checker=True`` is an error and None runs none."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if safety_checker:
            raise ValueError("safety_checker=true: StableDiffusion3Pipeline ships no safety checker; set "
                             "sample.safety_checker=false")
        sampler = scheduler_class(scheduler).from_config(self.pipe.scheduler.config) if scheduler else None
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        size = {} if resolution is None else {"height": resolution, "width": resolution}
        pipe, model_scheduler = self.pipe, self.pipe.scheduler
        try:
            if sampler is not None:
                pipe.scheduler = sampler
            output = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators, output_type=output_type,
                          max_sequence_length=self.max_sequence_length, **size)
        finally:
            pipe.scheduler = model_scheduler
        return Samples(list(output.images))

    def load_lora(self, folder) -> None:
        self.pipe.load_lora_weights(str(folder))

    def unload_lora(self) -> None:
        self.pipe.unload_lora_weights()

    # -- outputs -------------------------------------------------------------------------------------------
    def save_lora(self, directory, denoiser) -> None:
        """The adapter in the diffusers format ``StableDiffusion3Pipeline.load_lora_weights(directory)`` reads, with
        the adapter's config (lora_alpha) in the file's header, so it loads at the trained scale."""
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        StableDiffusion3Pipeline.save_lora_weights(
            str(directory), transformer_lora_layers=get_peft_model_state_dict(denoiser), safe_serialization=True,
            transformer_lora_adapter_metadata=denoiser.peft_config["default"].to_dict())

    def save_full(self, directory, denoiser, state_dict=None) -> None:
        """A full pipeline folder with the trained transformer; the frozen parts reloaded at their saved precision.

        ``state_dict``: the gathered weights when the live module is sharded (FSDP, ZeRO-3).
        """
        from diffusers import StableDiffusion3Pipeline

        if state_dict is not None:
            denoiser = type(denoiser).from_config(denoiser.config)
            denoiser.load_state_dict(state_dict)
        extra = {"text_encoder_3": None, "tokenizer_3": None} if self.pipe.text_encoder_3 is None else {}
        pipe = load_pipeline(StableDiffusion3Pipeline, self.model_cfg, transformer=denoiser, **extra)
        pipe.save_pretrained(str(directory), safe_serialization=True)


def _float32():
    import torch

    return torch.float32


class _Limited:
    """A tokenizer seen with another ``model_max_length`` (T5 is cut at ``max_sequence_length``, not its own 512)."""

    def __init__(self, tokenizer, limit: int):
        self._tokenizer, self.model_max_length = tokenizer, limit

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

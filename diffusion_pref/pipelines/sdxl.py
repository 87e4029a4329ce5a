"""SDXL as a backbone: two text encoders, pooled text embeds and size/crop micro-conditioning.

Same protocol as :mod:`.stable_diffusion` (:class:`~diffusion_pref.pipelines.base.Backbone`). The prompt embedding
is the penultimate hidden state of both text encoders, concatenated; the pooled embedding is the projected output
of the second; ``time_ids`` are ``(orig_h, orig_w, crop_y, crop_x, target_h, target_w)`` per pair, from the pair's
original size and the crop box the paired augmentation chose (both images share them). The SDXL VAE overflows in
fp16, so training keeps it fp32 (``frozen_dtype``) unless ``model.vae`` names an fp16-safe one. SDXL pipelines
have no safety checker.

Example::

    backbone = load_backbone(cfg.model)         # model_index.json says StableDiffusionXLPipeline
    text = backbone.encode_prompts(captions)    # encoder_hidden_states [B, L, 2048], text_embeds [B, 1280]
    cond = backbone.conditioning(text, batch)   # + time_ids [B, 6]
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from diffusion_pref.pipelines.stable_diffusion import StableDiffusionBackbone, load_pipeline


class SDXLBackbone(StableDiffusionBackbone):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def __init__(self, pipe, model_cfg=None):
        import torch

        super().__init__(pipe, model_cfg)
        self.frozen_dtype = {} if model_cfg is not None and model_cfg.vae else {"vae": torch.float32}

    @classmethod
    def load(cls, model_cfg, dtype=None):
        from diffusers import StableDiffusionXLPipeline

        return cls(load_pipeline(StableDiffusionXLPipeline, model_cfg, **({} if dtype is None else {"torch_dtype": dtype})),
                   model_cfg)

    @property
    def frozen(self) -> Dict[str, object]:
        return {"vae": self.pipe.vae, "text_encoder": self.pipe.text_encoder, "text_encoder_2": self.pipe.text_encoder_2}

    def _tokenizers(self) -> list:
        return [self.pipe.tokenizer, self.pipe.tokenizer_2]

    def encode_prompts(self, prompts: Sequence[str]) -> Dict[str, object]:
        import torch

        hidden, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                       (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
                out = encoder(self._tokens(tokenizer, prompts, encoder.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the projected pooled output of the last encoder
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def conditioning(self, text: Dict[str, object], batch: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        import torch

        hidden = text["encoder_hidden_states"]
        n = hidden.shape[0]
        if batch is not None and "original_size" in batch:
            target = int(batch["target_size"])
            sizes, crops = batch["original_size"], batch["crop_top_left"]  # [B, 2] each
            time_ids = torch.cat([sizes, crops, torch.full_like(sizes, target)], dim=1)  # [B, 6]
        else:
            res = self.pipe.unet.config.sample_size * (2 ** (len(self.pipe.vae.config.block_out_channels) - 1))
            time_ids = torch.tensor([[res, res, 0, 0, res, res]]).repeat(n, 1)
        return {"encoder_hidden_states": hidden, "text_embeds": text["text_embeds"],
                "time_ids": time_ids.to(hidden.device, hidden.dtype, non_blocking=True)}

    def predict(self, x_t, t, cond: Dict[str, object], denoiser=None):
        denoiser = self.denoiser if denoiser is None else denoiser
        return denoiser(x_t, self.schedule.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample

    def _load_safety_checker(self):
        return None  # SDXL pipelines ship none

    def _full_pipeline(self, denoiser):
        return load_pipeline(self._pipeline_class(), self.model_cfg, unet=denoiser)

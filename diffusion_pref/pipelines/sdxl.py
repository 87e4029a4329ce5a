"""SDXL as a training backbone: two text encoders, pooled text embeds and size/crop micro-conditioning.

Same surface as :mod:`.stable_diffusion`. The prompt embedding is the penultimate hidden state of both text
encoders, concatenated; the pooled embedding is the projected output of the second; ``time_ids`` are
``(orig_h, orig_w, crop_y, crop_x, target_h, target_w)`` per pair, from the pair's original size and the crop
box the paired augmentation chose (both images share them). The SDXL VAE overflows in fp16, so it stays fp32
unless ``model.vae`` names an fp16-safe one.

Example::

    backbone = load_backbone(cfg.model)       # model_index.json says StableDiffusionXLPipeline
    text = backbone.encode_text(captions)     # encoder_hidden_states [B, L, 2048], text_embeds [B, 1280]
    cond = backbone.conditioning(text, batch) # + time_ids [B, 6]
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from diffusion_pref.pipelines.stable_diffusion import StableDiffusionBackbone, load_pipeline


class SDXLBackbone(StableDiffusionBackbone):
    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def __init__(self, pipe, model_cfg=None):
        super().__init__(pipe, model_cfg)
        self.text_encoder_2 = pipe.text_encoder_2
        self.tokenizer_2 = pipe.tokenizer_2
        self.vae_keeps_fp32 = not (model_cfg is not None and model_cfg.vae)

    @classmethod
    def load(cls, model_cfg):
        from diffusers import StableDiffusionXLPipeline

        return cls(load_pipeline(StableDiffusionXLPipeline, model_cfg), model_cfg)

    @property
    def frozen_modules(self) -> List[object]:
        return [self.vae, self.text_encoder, self.text_encoder_2]

    def encode_text(self, captions: Sequence[str]) -> Dict[str, object]:
        import torch

        hidden, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = encoder(self._tokens(tokenizer, captions, encoder.device), output_hidden_states=True)
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
            res = self.unet.config.sample_size * (2 ** (len(self.vae.config.block_out_channels) - 1))
            time_ids = torch.tensor([[res, res, 0, 0, res, res]]).repeat(n, 1)
        return {"encoder_hidden_states": hidden, "text_embeds": text["text_embeds"],
                "time_ids": time_ids.to(hidden.device, hidden.dtype, non_blocking=True)}

    def predict(self, x_t, t, cond: Dict[str, object], unet=None):
        unet = self.unet if unet is None else unet
        return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample

    def save_full(self, directory, unet, state_dict=None) -> None:
        if state_dict is not None:
            unet = type(unet).from_config(unet.config)
            unet.load_state_dict(state_dict)
        pipe = load_pipeline(self._pipeline_class(), self.model_cfg, unet=unet)
        pipe.save_pretrained(str(directory), safe_serialization=True)

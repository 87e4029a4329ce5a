"""The tones-world model: build, save, load and sample a tiny Tango-structured text-to-audio model.

Folder layout (the Tango backbone's, ``diffusion_pref.testing.save_tiny_tango``'s): ``text_encoder/``
(``T5EncoderModel``), ``tokenizer/`` (``T5Tokenizer``), ``unet/`` (``UNet2DConditionModel``, 8 latent channels,
cross-attention to the T5 states with their attention mask), ``vae/`` (AudioLDM-style ``AutoencoderKL`` on
1-channel log-mels ``[B, 1, frames, n_mels]``), ``scheduler/`` (``DDPMScheduler``, v-prediction), ``vocoder/``
(``config.json`` with ``"_class_name": "GriffinLimVocoder"``: :class:`diffusion_pref.tones.vocoder.GriffinLimVocoder`,
no weights) and ``stft_config.json``.

:func:`sample` is the tones world's own reference sampler (DDIM, classifier-free guidance with the empty prompt,
Griffin-Lim): pretraining measures fidelity with it, and tests check the Tango backbone against it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_pref.tones.audio import FRAMES, N_MELS, STFT_CONFIG
from diffusion_pref.tones.render import KINDS, PITCHES, PLURAL

MAX_TOKENS = 16
LATENT_CHANNELS = 8
TEXT_WIDTH = 64


def tones_tokenizer():
    """A ``T5Tokenizer`` whose vocabulary has a whole-word piece for every word of the tones captions."""
    from transformers import T5Tokenizer

    words = ["a", "an", "one", "two", "three", "then", "and", *PITCHES, *KINDS, *PLURAL.values()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in dict.fromkeys(words)]
    characters = [chr(c) for c in range(33, 127)]
    pieces += [("\u2581" + c, -4.0) for c in characters] + [(c, -5.0) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def schedulers():
    """(training DDPM, sampling DDIM): Tango's SD2.1 betas, v-prediction, rescaled to zero terminal SNR.

    Zero terminal SNR (as the shapes world): otherwise the leaked mean at t=999 tells the model where the sounds
    are and sampling reads it off the starting noise instead of the caption."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  clip_sample=False)
    return DDPMScheduler(**common), DDIMScheduler(**common)


def build_models(tokenizer, unet_channels=(16, 32), vae_channels=(8, 16, 16)):
    """Fresh text encoder, UNet and VAE with Tango's structure at tiny sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=MAX_TOKENS,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=(FRAMES // 4, N_MELS // 4), in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(unet_channels), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=TEXT_WIDTH, use_linear_projection=True, upcast_attention=True, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=tuple(vae_channels), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=FRAMES, mid_block_add_attention=False)
    return text_encoder, unet, vae


@dataclass
class TonesModel:
    text_encoder: Any
    tokenizer: Any
    unet: Any
    vae: Any
    vocoder: Any
    scheduler: Any  # training DDPM

    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("text_encoder", "unet", "vae"):
            getattr(self, name).save_pretrained(str(folder / name), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        self.scheduler.save_pretrained(str(folder / "scheduler"))
        self.vocoder.save_pretrained(folder / "vocoder")
        (folder / "stft_config.json").write_text(json.dumps(STFT_CONFIG, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder) -> TonesModel:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        from diffusion_pref.tones.vocoder import GriffinLimVocoder

        folder = Path(folder)
        if not (folder / "unet").is_dir():
            raise FileNotFoundError(f"{folder}: no unet/ folder; not a tones/Tango model folder")
        return cls(
            text_encoder=T5EncoderModel.from_pretrained(str(folder / "text_encoder")).eval(),
            tokenizer=AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
            unet=UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval(),
            vae=AutoencoderKL.from_pretrained(str(folder / "vae")).eval(),
            vocoder=GriffinLimVocoder.from_pretrained(folder / "vocoder"),
            scheduler=DDPMScheduler.from_pretrained(str(folder / "scheduler")),
        )

    def encode_text(self, prompts: Sequence[str]):
        """(hidden states [B, L, width], attention mask [B, L])."""
        import torch

        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                return_tensors="pt")
        with torch.no_grad():
            states = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return states, tokens.attention_mask

    def decode(self, latents):
        """Scaled latents [B, 8, f, m] -> log-mel [B, frames, n_mels]."""
        import torch

        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample[:, 0]

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance_scale: float = 1.0,
               return_mel: bool = False):
        """Waveforms ``[B, NUM_SAMPLES]`` at 16 kHz (DDIM, CFG with ''; one generator per seed)."""
        import torch
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        cond, mask = self.encode_text(prompts)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            uncond, umask = self.encode_text([""] * len(prompts))
            cond, mask = torch.cat([uncond, cond]), torch.cat([umask, mask])
        shape = (LATENT_CHANNELS, FRAMES // 4, N_MELS // 4)
        latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = torch.cat([latents, latents]) if use_cfg else latents
                out = self.unet(x, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
                if use_cfg:
                    u, c = out.chunk(2)
                    out = u + guidance_scale * (c - u)
                latents = scheduler.step(out, t, latents).prev_sample
        mel = self.decode(latents)
        return mel if return_mel else self.vocoder(mel)


__all__ = ["FRAMES", "MAX_TOKENS", "TonesModel", "build_models", "schedulers", "tones_tokenizer"]

"""Tiny random-weight models for tests and smoke runs, built offline.

Every builder returns a model of the real architecture family (the same classes the real checkpoints load
into), with random weights small enough that a forward pass takes milliseconds on a CPU. Tokenizers are built
locally from a small vocabulary written in code, so nothing touches the network. Each model can be saved in
its standard hub layout with ``save_pretrained`` (safetensors), so the real loading code is exercised on the
real layout.

Builders (deterministic for a given ``seed``; they do not disturb the global torch RNG):

- ``tiny_clip_tokenizer(save_dir=None)`` -> ``CLIPTokenizer`` (byte-level BPE, every byte covered,
  ``model_max_length`` 16).
- ``tiny_sd_pipeline(seed=0, prediction_type="epsilon")`` -> ``StableDiffusionPipeline`` (32x32 images,
  latents ``[B, 4, 8, 8]``, DDIM scheduler with the SD1.5 betas).
- ``tiny_sdxl_pipeline(seed=0)`` -> ``StableDiffusionXLPipeline`` (two text encoders, ``text_time``
  micro-conditioning, 32x32 images).
- ``tiny_tango_components(seed=0)`` -> ``TinyTango`` (T5 encoder + tokenizer, cross-attention UNet with 8 latent
  channels, AudioLDM-style 1-channel mel VAE, ``SpeechT5HifiGan`` vocoder, v-prediction DDPM scheduler and the
  mel/STFT settings the vocoder expects).
- ``tiny_causal_lm(seed=0)`` -> ``(GPT2LMHeadModel, GPT2Tokenizer)`` with ``pad_token = eos_token``.

Savers (write the standard layout into ``path`` and return it as a ``Path``):

- ``save_tiny_sd(path, **kw)``, ``save_tiny_sdxl(path, **kw)``: a diffusers pipeline folder
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` ...);
  load it with ``StableDiffusionPipeline.from_pretrained(path)`` / ``StableDiffusionXLPipeline.from_pretrained``.
- ``save_tiny_tango(path, **kw)``: AudioLDM-style subfolders ``text_encoder/`` (``T5EncoderModel``),
  ``tokenizer/`` (``AutoTokenizer``), ``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``),
  ``vocoder/`` (``SpeechT5HifiGan``), ``scheduler/`` (``DDPMScheduler``), plus ``stft_config.json`` at the top
  (keys ``sampling_rate, filter_length, hop_length, win_length, n_mel_channels, mel_fmin, mel_fmax``, the
  argument names of Tango's ``TacotronSTFT``). There is no ``model_index.json``: no diffusers pipeline class
  runs Tango; the audio backbone loads each subfolder itself.
- ``save_tiny_causal_lm(path, **kw)``: a transformers folder for ``AutoModelForCausalLM`` / ``AutoTokenizer``.

Pytest fixtures in ``tests/conftest.py`` (session-scoped, saved once; treat the folders as read-only):
``tiny_sd_dir``, ``tiny_sd_vpred_dir``, ``tiny_sdxl_dir``, ``tiny_tango_dir``, ``tiny_causal_lm_dir``.

Example::

    from diffusion_pref.testing import tiny_sd_pipeline, save_tiny_sd
    pipe = tiny_sd_pipeline(seed=0)
    image = pipe("a red cat", num_inference_steps=2, output_type="pt").images  # [1, 3, 32, 32]
    save_tiny_sd("/tmp/tiny-sd")  # then: diffusion-pref train ... model.pretrained=/tmp/tiny-sd
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Words whose BPE merges are part of the tiny vocabularies, so common captions tokenize into a few whole-word
# tokens instead of one token per character. Any other text still tokenizes (every byte / character is covered).
_COMMON_WORDS = (
    "a an the of and in on with at to is by for from photo picture painting image of cat dog bird horse car "
    "house tree flower man woman person red green blue yellow black white small large sky sea water city "
    "street sound dog barking music playing people talking rain wind engine running birds singing"
).split()

CLIP_MAX_LENGTH = 16  # the real CLIP uses 77; a different number exposes code that hard-codes 77


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch for the block without changing the caller's global RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_alphabet() -> list[str]:
    # The 256 printable stand-ins that byte-level BPE uses for raw bytes; covering all of them means no text
    # ever falls back to an unknown token.
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _word_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each symbol sequence into one token, without duplicates."""
    merges: list[tuple[str, str]] = []
    seen = set()
    for symbols in words:
        current = symbols[0]
        for nxt in symbols[1:]:
            pair = (current, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current = current + nxt
    return merges


def _bpe_vocab(base: list[str], merges: list[tuple[str, str]], specials: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token in base + ["".join(m) for m in merges] + specials:
        vocab.setdefault(token, len(vocab))
    return vocab


def tiny_clip_tokenizer(save_dir: str | Path | None = None, model_max_length: int = CLIP_MAX_LENGTH):
    """A real ``CLIPTokenizer`` over a byte-level BPE vocabulary built here (about 600 tokens).

    The vocabulary holds every byte symbol, with and without CLIP's ``</w>`` end-of-word marker, plus merges
    for a few common caption words, plus ``<|startoftext|>`` / ``<|endoftext|>`` (also the pad token, as in
    CLIP). If ``save_dir`` is given, ``vocab.json`` and ``merges.txt`` are written there and the tokenizer is
    loaded from those files; otherwise it is built from the same vocabulary in memory.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    # CLIP lower-cases and marks the last symbol of every word with </w>.
    merges = _word_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in _COMMON_WORDS if len(w) > 1])
    vocab = _bpe_vocab(alphabet + [a + "</w>" for a in alphabet], merges, ["<|startoftext|>", "<|endoftext|>"])
    merge_lines = [f"{a} {b}" for a, b in merges]
    if save_dir is None:
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    return CLIPTokenizer.from_pretrained(str(save_dir), model_max_length=model_max_length)


def _clip_text_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        # The pooled output is taken at the first eos token; it must be our eos id, not CLIP's legacy 2.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _image_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    # Three blocks -> vae_scale_factor 4, so the UNet's 8x8 latents decode to 32x32 images.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def _sd15_scheduler_config(prediction_type: str) -> dict[str, Any]:
    # The SD1.x training schedule; clip_sample must be off for latent models.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {_PREDICTION_TYPES}")


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` with SD1.x structure and random weights (about 0.2M parameters).

    UNet: 2 blocks (8, 16), 1 layer each, cross-attention to a 2-layer ``CLIPTextModel`` of width 32,
    latents ``[B, 4, 8, 8]``. VAE: 3 blocks, images ``[B, 3, 32, 32]``. Scheduler: ``DDIMScheduler`` with the
    SD1.5 betas and the given ``prediction_type`` ("epsilon" or "v_prediction"). No safety checker.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    _check_prediction_type(prediction_type)
    tokenizer = tiny_clip_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=32,
            norm_num_groups=4,
        )
        vae = _image_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    scheduler = DDIMScheduler(**_sd15_scheduler_config(prediction_type))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(path: str | Path, **kwargs) -> Path:
    """Save ``tiny_sd_pipeline(**kwargs)`` as a diffusers pipeline folder (safetensors) and return the path."""
    path = Path(path)
    tiny_sd_pipeline(**kwargs).save_pretrained(str(path), safe_serialization=True)
    return path

"""Tiny random-weight models for tests and smoke runs, built offline.

Every builder returns a model of the real architecture family (the same classes the real checkpoints load
into), with random weights small enough that a forward pass takes milliseconds on a CPU. Tokenizers are built
locally from a small vocabulary written in code, so nothing touches the network. Each model can be saved in
its standard hub layout with ``save_pretrained`` (safetensors), so the real loading code is exercised on the
real layout.

Builders (deterministic for a given ``seed``; they do not disturb the global torch RNG; modules come in eval mode,
as ``from_pretrained`` returns them):

- ``tiny_clip_tokenizer(save_dir=None)`` -> ``CLIPTokenizer`` (byte-level BPE, every byte covered,
  ``model_max_length`` 16).
- ``tiny_sd_pipeline(seed=0, prediction_type="epsilon")`` -> ``StableDiffusionPipeline`` (32x32 images,
  latents ``[B, 4, 8, 8]``, DDIM scheduler with the SD1.5 betas).
- ``tiny_sdxl_pipeline(seed=0)`` -> ``StableDiffusionXLPipeline`` (two text encoders, ``text_time``
  micro-conditioning, 32x32 images).
- ``tiny_sd3_pipeline(seed=0, t5=True)`` -> ``StableDiffusion3Pipeline`` (CLIP-L, CLIP-G and optionally T5 text
  encoders, ``SD3Transformer2DModel``, 16-channel VAE with SD3's shift and scaling factors, 32x32 images, latents
  ``[B, 16, 8, 8]``, ``FlowMatchEulerDiscreteScheduler`` with shift 3.0).
- ``tiny_tango_components(seed=0)`` -> ``TinyTango`` (T5 encoder + tokenizer, cross-attention UNet with 8 latent
  channels, AudioLDM-style 1-channel mel VAE, ``SpeechT5HifiGan`` vocoder, v-prediction DDPM scheduler and the
  mel/STFT settings the vocoder expects).
- ``tiny_causal_lm(seed=0)`` -> ``(GPT2LMHeadModel, GPT2Tokenizer)`` with ``pad_token = eos_token``.

Savers (write the standard layout into ``path`` and return it as a ``Path``):

- ``save_tiny_sd(path, **kw)``, ``save_tiny_sdxl(path, **kw)``: a diffusers pipeline folder
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` ...);
  load it with ``StableDiffusionPipeline.from_pretrained(path)`` / ``StableDiffusionXLPipeline.from_pretrained``.
- ``save_tiny_sd3(path, t5=True, **kw)``: the SD3 hub layout (``transformer/``, ``vae/``, ``text_encoder/``,
  ``text_encoder_2/``, ``text_encoder_3/`` and ``tokenizer_3/`` with T5, ``scheduler/`` ...); load it with
  ``StableDiffusion3Pipeline.from_pretrained(path)``, and a folder saved with ``t5=False`` with
  ``from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`` (as diffusers loads the real SD3 without T5).
- ``save_tiny_tango(path, **kw)``: AudioLDM-style subfolders ``text_encoder/`` (``T5EncoderModel``),
  ``tokenizer/`` (``AutoTokenizer``), ``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``),
  ``vocoder/`` (``SpeechT5HifiGan``), ``scheduler/`` (``DDPMScheduler``), plus ``stft_config.json`` at the top
  (keys ``sampling_rate, filter_length, hop_length, win_length, n_mel_channels, mel_fmin, mel_fmax``, the
  argument names of Tango's ``TacotronSTFT``). There is no ``model_index.json``: no diffusers pipeline class
  runs Tango; the audio backbone loads each subfolder itself.
- ``save_tiny_tangoflux(path, seed=0)``: the ``declare-lab/TangoFlux`` hub layout (``config.json``,
  ``tangoflux.safetensors``, ``vae.safetensors``) plus ``vae_config.json`` and ``text_encoder/`` (T5 config and
  tokenizer), which the real sizes take from their defaults and the hub.
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


def _eval(*modules):
    # from_pretrained returns modules in eval mode; freshly constructed ones are in train mode, where T5's and
    # GPT-2's dropout would make the in-memory model disagree with its saved copy.
    for module in modules:
        module.eval()


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


def tiny_clip_tokenizer(
    save_dir: str | Path | None = None,
    model_max_length: int = CLIP_MAX_LENGTH,
    pad_token: str = "<|endoftext|>",
):
    """A real ``CLIPTokenizer`` over a byte-level BPE vocabulary built here (about 600 tokens).

    The vocabulary holds every byte symbol, with and without CLIP's ``</w>`` end-of-word marker, plus merges
    for a few common caption words, plus ``<|startoftext|>`` / ``<|endoftext|>`` (also the pad token, as in
    CLIP; SDXL's second tokenizer pads with ``"!"``: pass ``pad_token="!"`` for that). If ``save_dir`` is
    given, ``vocab.json`` and ``merges.txt`` are written there and the tokenizer is loaded from those files;
    otherwise it is built from the same vocabulary in memory.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    # CLIP lower-cases and marks the last symbol of every word with </w>.
    merges = _word_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in _COMMON_WORDS if len(w) > 1])
    vocab = _bpe_vocab(alphabet + [a + "</w>" for a in alphabet], merges, ["<|startoftext|>", "<|endoftext|>"])
    merge_lines = [f"{a} {b}" for a, b in merges]
    if save_dir is None:
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    return CLIPTokenizer.from_pretrained(str(save_dir), model_max_length=model_max_length, pad_token=pad_token)


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
    """A ``StableDiffusionPipeline`` with SD1.x structure and random weights (about 0.14M parameters).

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
    _eval(unet, vae, text_encoder)
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


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` with SDXL structure and random weights.

    Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, width 32 each, so the UNet's
    cross-attention width is their concatenation, 64), two tokenizers (the second pads with ``"!"`` as SDXL's
    does), a UNet whose first block has no attention and whose second has two transformer layers, with
    ``text_time`` micro-conditioning (6 size/crop numbers x 8 + the pooled 32-d text embedding = 80 inputs).
    Latents ``[B, 4, 8, 8]``, images ``[B, 3, 32, 32]``, ``EulerDiscreteScheduler`` as in SDXL base.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    text_width, pooled_width, time_embed_dim = 32, 32, 8
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * text_width,
            norm_num_groups=4,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
        )
        vae = _image_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=text_width))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(tokenizer_2, hidden_size=text_width, projection_dim=pooled_width)
        )
    _eval(unet, vae, text_encoder, text_encoder_2)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl(path: str | Path, **kwargs) -> Path:
    """Save ``tiny_sdxl_pipeline(**kwargs)`` as a diffusers pipeline folder (safetensors) and return the path."""
    path = Path(path)
    tiny_sdxl_pipeline(**kwargs).save_pretrained(str(path), safe_serialization=True)
    return path


# ---------------------------------------------------------------- Stable Diffusion 3 (MMDiT, rectified flow)

# SD3's VAE constants (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json): latents are
# (mean - shift_factor) * scaling_factor.
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_SCHEDULER_SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler shift of SD3 medium's scheduler_config.json


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True):
    """A ``StableDiffusion3Pipeline`` with SD3 structure and random weights.

    Text: ``CLIPTextModelWithProjection`` x2 (CLIP-L-like width 32, CLIP-G-like width 48: different widths, so
    code that mixes them up fails), and with ``t5=True`` a ``T5EncoderModel`` of width 96 = the transformer's
    ``joint_attention_dim`` (the concatenated CLIP states, 80 wide, are zero-padded to it as in SD3); with
    ``t5=False`` ``text_encoder_3`` and ``tokenizer_3`` are None and the pipeline feeds zeros in T5's place.
    Transformer: ``SD3Transformer2DModel``, 2 joint blocks, 2 heads of 8, patch 2, 16 latent channels,
    pooled projection 80 (= 32 + 48). VAE: 16 latent channels, no quant convs, SD3's shift and scaling factors,
    images ``[B, 3, 32, 32]`` -> latents ``[B, 16, 8, 8]``. Scheduler: ``FlowMatchEulerDiscreteScheduler`` with
    1000 training steps and shift 3.0, as SD3 medium.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    width_l, width_g, joint = 32, 48, 96
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=joint,
            caption_projection_dim=16,  # = heads x head dim, as SD3 (1536 = 24 x 64)
            pooled_projection_dim=width_l + width_g,
            pos_embed_max_size=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 8, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=SD3_VAE_SCALING_FACTOR,
            shift_factor=SD3_VAE_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModelWithProjection(
            _clip_text_config(tokenizer, hidden_size=width_l, projection_dim=width_l))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(tokenizer_2, hidden_size=width_g, projection_dim=width_g))
        text_encoder_3 = tokenizer_3 = None
        if t5:
            tokenizer_3 = tiny_t5_tokenizer()
            text_encoder_3 = T5EncoderModel(T5Config(
                vocab_size=len(tokenizer_3), d_model=joint, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
                decoder_start_token_id=tokenizer_3.pad_token_id))
    _eval(*(m for m in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3) if m is not None))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SCHEDULER_SHIFT)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd3(path: str | Path, **kwargs) -> Path:
    """Save ``tiny_sd3_pipeline(**kwargs)`` as a diffusers pipeline folder (safetensors) and return the path."""
    path = Path(path)
    tiny_sd3_pipeline(**kwargs).save_pretrained(str(path), safe_serialization=True)
    return path


# ---------------------------------------------------------------- Tango-structured text-to-audio

T5_MAX_LENGTH = 32


def tiny_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A real ``T5Tokenizer`` (Unigram, SentencePiece-style ``▁`` word marks) over a vocabulary built here.

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>`` as in T5. The vocabulary has whole-word pieces for a few common
    caption words and every printable ASCII and Latin-1 character, so English captions never hit ``<unk>``.
    No sentinel ``<extra_id_*>`` tokens: only the encoder is used.
    """
    from transformers import T5Tokenizer

    # Unigram picks the segmentation with the highest total log-probability: whole words beat characters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0) for word in dict.fromkeys(_COMMON_WORDS)]
    characters = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256)]
    pieces += [("\u2581" + c, -4.0) for c in characters] + [(c, -5.0) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


@dataclass
class TinyTango:
    """The modules of a Tango-structured text-to-audio model (see ``tiny_tango_components``).

    ``stft`` holds the mel front-end settings the vocoder and VAE were sized for (Tango's ``TacotronSTFT``
    argument names); the vocoder turns ``[B, frames, n_mel_channels]`` log-mels into ``frames * hop_length``
    samples at ``sampling_rate``.
    """

    text_encoder: Any  # transformers.T5EncoderModel
    tokenizer: Any  # transformers.T5Tokenizer
    unet: Any  # diffusers.UNet2DConditionModel, latents [B, 8, frames / 4, n_mels / 4]
    vae: Any  # diffusers.AutoencoderKL, mels [B, 1, frames, n_mels]
    vocoder: Any  # transformers.SpeechT5HifiGan
    scheduler: Any  # diffusers.DDPMScheduler (v-prediction)
    stft: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the AudioLDM-style subfolders and ``stft_config.json`` (layout in the module docstring)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in ("text_encoder", "tokenizer", "unet", "vae", "vocoder", "scheduler"):
            module = getattr(self, name)
            if name == "scheduler" or name == "tokenizer":
                module.save_pretrained(str(path / name))
            else:
                module.save_pretrained(str(path / name), safe_serialization=True)
        (path / "stft_config.json").write_text(json.dumps(self.stft, indent=2) + "\n")
        return path


TINY_TANGO_STFT = {
    "sampling_rate": 16000,
    "filter_length": 1024,
    "hop_length": 160,
    "win_length": 1024,
    "n_mel_channels": 16,  # Tango uses 64
    "mel_fmin": 0,
    "mel_fmax": 8000,
}


def tiny_tango_components(seed: int = 0) -> TinyTango:
    """Tiny random-weight modules with the structure of Tango / Tango 2 (declare-lab).

    - ``T5EncoderModel`` (FLAN-T5 style: gated-GELU, untied embeddings; 2 layers, width 32) + ``T5Tokenizer``.
    - ``UNet2DConditionModel`` with 8 in/out latent channels, cross-attention to the T5 width, linear
      projections and upcast attention, as Tango's UNet config.
    - AudioLDM-style ``AutoencoderKL``: 1-channel mel in/out, 8 latent channels, x4 downsampling in time and
      frequency. ``scaling_factor`` is 0.5 (not 1) so code that forgets it gives different numbers.
    - ``SpeechT5HifiGan`` vocoder: ``n_mel_channels`` mels in, upsampling 5*4*2*2*2 = 160 = hop length, 16 kHz.
    - ``DDPMScheduler`` with the SD2.1 schedule Tango uses: scaled-linear betas, ``v_prediction``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    stft = dict(TINY_TANGO_STFT)
    n_mels, latent_channels, text_width = stft["n_mel_channels"], 8, 32
    with _seeded(seed):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=text_width,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=(16, n_mels // 4),  # 64 mel frames (0.64 s) -> 16 latent frames
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            cross_attention_dim=text_width,
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.5,
        )
        vocoder = SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                model_in_dim=n_mels,
                sampling_rate=stft["sampling_rate"],
                upsample_initial_channel=32,
                upsample_rates=[5, 4, 2, 2, 2],
                # kernel - rate even, so each stage upsamples exactly by its rate
                upsample_kernel_sizes=[11, 8, 4, 4, 4],
                resblock_kernel_sizes=[3],
                resblock_dilation_sizes=[[1, 3]],
                normalize_before=False,  # Tango's converted HiFi-GAN does not normalise its input
            )
        )
    _eval(text_encoder, unet, vae, vocoder)
    # DDPM has no set_alpha_to_one; the rest is the SD2.1 scheduler config Tango loads.
    schedule = _sd15_scheduler_config("v_prediction")
    schedule.pop("set_alpha_to_one")
    scheduler = DDPMScheduler(**schedule)
    return TinyTango(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        vae=vae,
        vocoder=vocoder,
        scheduler=scheduler,
        stft=stft,
    )


def save_tiny_tango(path: str | Path, **kwargs) -> Path:
    """Save ``tiny_tango_components(**kwargs)`` in the layout described in the module docstring."""
    return tiny_tango_components(**kwargs).save_pretrained(path)


# ---------------------------------------------------------------- TangoFlux

TINY_TANGOFLUX_CONFIG = {  # the keys of declare-lab/TangoFlux's config.json, tiny values
    "num_layers": 1,
    "num_single_layers": 1,
    "in_channels": 8,  # the VAE's latent channels (TangoFlux: 64)
    "attention_head_dim": 128,  # as TangoFlux: diffusers' default rope axes (16, 56, 56) sum to it
    "num_attention_heads": 1,
    "joint_attention_dim": 32,  # = the T5 width, as in TangoFlux (1024 both)
    "audio_seq_len": 16,  # 16 latent frames * 2048 samples = 0.743 s at 44.1 kHz (TangoFlux: 645)
    "max_duration": 0.7,  # TangoFlux: 30
    "uncondition": False,
    "text_encoder_name": "text_encoder",  # a subfolder here (T5 config + tokenizer); TangoFlux: google/flan-t5-large
}

TINY_OOBLECK_CONFIG = {"encoder_hidden_size": 16,  # mean + scale: 8 latent channels
                       "downsampling_ratios": [2, 4, 4, 8, 8],
                       "channel_multiples": [1, 1, 1, 1, 1], "decoder_channels": 4, "decoder_input_channels": 8,
                       "audio_channels": 2, "sampling_rate": 44100}


def save_tiny_tangoflux(path: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight TangoFlux in the hub layout of ``declare-lab/TangoFlux``: ``config.json``,
    ``tangoflux.safetensors`` (prefixes ``text_encoder.`` without the tied ``encoder.embed_tokens``, ``fc.``,
    ``duration_emebdder.``, ``transformer.``) and ``vae.safetensors`` (``AutoencoderOobleck``, stereo, 2048 samples
    per latent frame as Stable Audio Open's), plus what the hub does not need for the real sizes: ``vae_config.json``
    and ``text_encoder/`` (T5 config + tokenizer, named by ``text_encoder_name``)."""
    from diffusers import AutoencoderOobleck, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from diffusion_pref.pipelines.tangoflux import _conditioner_class

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_TANGOFLUX_CONFIG)
    tokenizer = tiny_t5_tokenizer()
    width = config["joint_attention_dim"]
    t5_config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.pad_token_id)
    with _seeded(seed):
        text_encoder = T5EncoderModel(t5_config)
        transformer = FluxTransformer2DModel(
            in_channels=config["in_channels"], num_layers=config["num_layers"],
            num_single_layers=config["num_single_layers"], attention_head_dim=config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"], joint_attention_dim=width,
            pooled_projection_dim=width, guidance_embeds=False)
        conditioner = _conditioner_class()(width, width, config["max_duration"])
        conditioner.duration_emebdder.time_positional_embedding[0].weights.data.normal_()  # TangoFlux: randn
        vae = AutoencoderOobleck(**TINY_OOBLECK_CONFIG)
    state = {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state.update(conditioner.state_dict())
    state.update({f"transformer.{k}": v for k, v in transformer.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "tangoflux.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path / "vae.safetensors"))
    (path / "vae_config.json").write_text(json.dumps(TINY_OOBLECK_CONFIG, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    t5_config.save_pretrained(str(path / "text_encoder"))
    tokenizer.save_pretrained(str(path / "text_encoder"))
    return path


# ---------------------------------------------------------------- GPT-2-style causal LM

GPT2_MAX_POSITIONS = 64


def tiny_gpt2_tokenizer():
    """A real ``GPT2Tokenizer`` (byte-level BPE; spaces are the ``Ġ`` prefix of the next word) built here.

    Every byte is in the vocabulary, plus merges for a few common words with and without a leading space,
    plus ``<|endoftext|>``, which is also bos, eos and pad (GPT-2 has no pad token of its own).
    """
    from transformers import GPT2Tokenizer

    # Words after a space first: their merges then win over the bare-word ones inside running text.
    words = [["\u0120", *w] for w in _COMMON_WORDS] + [[*w] for w in _COMMON_WORDS if len(w) > 1]
    merges = _word_merges(words)
    vocab = _bpe_vocab(_byte_alphabet(), merges, ["<|endoftext|>"])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=GPT2_MAX_POSITIONS)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_causal_lm(seed: int = 0):
    """``(GPT2LMHeadModel, GPT2Tokenizer)``: 2 layers, width 32, 64 positions, random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_gpt2_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=GPT2_MAX_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = GPT2LMHeadModel(config)
    _eval(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny_causal_lm(path: str | Path, **kwargs) -> Path:
    """Save ``tiny_causal_lm(**kwargs)`` (model as safetensors + tokenizer) into one folder; return the path."""
    path = Path(path)
    model, tokenizer = tiny_causal_lm(**kwargs)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path

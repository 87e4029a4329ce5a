"""Tiny random-weight models: each saved model loads back with the ecosystem's own loader and behaves the same.

Run: HF_HUB_OFFLINE=1 python -m pytest tests/test_testing.py -q
"""

import json

import pytest
import torch

from diffusion_pref import testing


def _state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# A saved model must load back bit for bit: the weights are compared exactly. Its outputs are not the same call as
# the in-memory model's: the same weights sit in other buffers (a memory-mapped safetensors file, or 64-byte
# aligned allocations) and may go through other kernels (transformers and diffusers pick attention backends at
# load time), and a CPU's kernels may split a reduction differently by alignment, SIMD width (AVX2, AVX-512,
# NEON) and thread count. A reordered float32 sum moves its result by a few ulps (eps = 1.2e-7) of the magnitude
# of its terms; over the tiny models' few dozen layers (and two sampling steps for images) outputs move by about
# 1e-6 of their scale (1.3e-6 on images in [0, 1] was measured on an AMD EPYC). 1e-5 of the output's scale leaves
# room for that and is a hundred times below what another model does (one of another seed, checked).
ROUNDING = 1e-5


def _assert_same_up_to_rounding(loaded_out, memory_out, other_out):
    scale = memory_out.abs().max().item()  # the tiny vocoder's waveforms are around 1e-12, images around 1
    torch.testing.assert_close(loaded_out, memory_out, rtol=ROUNDING, atol=ROUNDING * scale)
    assert (other_out - memory_out).abs().max() > 100 * ROUNDING * scale  # the tolerance tells models apart


def _unet_inputs(unet, batch=2, tokens=testing.CLIP_MAX_LENGTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)  # [B, 4, 8, 8]
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)  # [B, L, D]
    timesteps = torch.tensor([10, 700])[:batch]
    return latents, timesteps, context


@torch.no_grad()
def _unet_out(unet, inputs, **kwargs):
    latents, timesteps, context = inputs
    return unet(latents, timesteps, encoder_hidden_states=context, **kwargs).sample


@torch.no_grad()
def _image(pipe, prompt="a photo of a red cat", seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="pt", **kwargs).images


# ---------------------------------------------------------------- tokenizer


def test_clip_tokenizer_round_trips_any_caption_and_pads():
    tokenizer = testing.tiny_clip_tokenizer()
    caption = "A photo of 3 red cats, jumping! (naïve café)"
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # No unknown token: CLIP's unk is its eos, which must appear only at the end.
    assert tokenizer.unk_token_id not in ids[1:-1]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    # CLIP lower-cases and decodes word ends as spaces, so compare without whitespace.
    assert decoded.replace(" ", "") == caption.lower().replace(" ", "")
    # Common words are single tokens (merges work), rarer ones split into byte symbols.
    assert len(tokenizer("the")["input_ids"]) == 3
    padded = tokenizer(["a cat", caption], padding="max_length", truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (2, testing.CLIP_MAX_LENGTH)


def test_clip_tokenizer_from_written_files_matches_in_memory(tmp_path):
    in_memory = testing.tiny_clip_tokenizer()
    from_files = testing.tiny_clip_tokenizer(save_dir=tmp_path)
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    caption = "the dog and the bird, singing in the rain"
    assert from_files(caption).input_ids == in_memory(caption).input_ids
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == len(in_memory)


# ---------------------------------------------------------------- Stable Diffusion


def test_sd_builder_is_deterministic_per_seed_and_keeps_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = testing.tiny_sd_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the builder did not consume the caller's RNG
    b = testing.tiny_sd_pipeline(seed=0)
    c = testing.tiny_sd_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        assert _state_dicts_equal(getattr(a, name), getattr(b, name)), name
        assert not _state_dicts_equal(getattr(a, name), getattr(c, name)), name


def test_sd_generates_32px_images_in_two_steps():
    pipe = testing.tiny_sd_pipeline()
    images = _image(pipe, prompt=["a cat", "a dog"])
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images[0], images[1])  # the prompt reaches the UNet


def test_sd_prediction_type_sets_scheduler():
    assert testing.tiny_sd_pipeline().scheduler.config.prediction_type == "epsilon"
    assert testing.tiny_sd_pipeline(prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        testing.tiny_sd_pipeline(prediction_type="sample_x0")


def test_saved_sd_loads_with_diffusers_and_matches(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = testing.tiny_sd_pipeline(seed=0)
    testing.save_tiny_sd(tmp_path, seed=0)
    assert (tmp_path / "model_index.json").exists()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "text_encoder" / "model.safetensors").exists()
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        assert _state_dicts_equal(getattr(loaded, name), getattr(pipe, name)), name
    other = testing.tiny_sd_pipeline(seed=1)
    inputs = _unet_inputs(pipe.unet)
    _assert_same_up_to_rounding(_unet_out(loaded.unet, inputs), _unet_out(pipe.unet, inputs), _unet_out(other.unet, inputs))
    _assert_same_up_to_rounding(_image(loaded), _image(pipe), _image(other))
    assert loaded.tokenizer("a red cat").input_ids == pipe.tokenizer("a red cat").input_ids


def test_tiny_sd_dir_fixture_is_a_pipeline_folder(tiny_sd_dir, tiny_sd_vpred_dir):
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    scheduler = json.loads((tiny_sd_vpred_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_lora_on_unet_changes_output_and_round_trips_through_load_lora_weights(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = testing.tiny_sd_pipeline()
    inputs = _unet_inputs(pipe.unet)
    base = _unet_out(pipe.unet, inputs)
    torch.manual_seed(0)
    # init_lora_weights=False gives a random (non-zero) B, so the adapter acts before any training.
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(config)
    with_lora = _unet_out(pipe.unet, inputs)
    assert not torch.allclose(with_lora, base, atol=1e-4)
    pipe.unet.disable_adapters()
    torch.testing.assert_close(_unet_out(pipe.unet, inputs), base)
    pipe.unet.enable_adapters()

    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora_layers, safe_serialization=True)
    fresh = testing.tiny_sd_pipeline()
    fresh.load_lora_weights(tmp_path)
    _assert_same_up_to_rounding(_unet_out(fresh.unet, inputs), with_lora, base)  # PEFT's layers vs diffusers' loader


# ---------------------------------------------------------------- SDXL


def test_sdxl_generates_32px_images_and_micro_conditioning_reaches_the_unet():
    pipe = testing.tiny_sdxl_pipeline()
    te_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == te_width
    assert pipe.tokenizer_2.pad_token == "!"
    images = _image(pipe)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # original_size is one of the six text_time numbers; changing it must change the image.
    assert not torch.allclose(_image(pipe, original_size=(16, 16)), images, atol=1e-5)


def test_saved_sdxl_loads_with_diffusers_and_matches(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = testing.tiny_sdxl_pipeline(seed=0)
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    loaded.set_progress_bar_config(disable=True)
    assert (tiny_sdxl_dir / "text_encoder_2" / "model.safetensors").exists()
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.tokenizer_2("a cat", padding="max_length").input_ids == pipe.tokenizer_2(
        "a cat", padding="max_length"
    ).input_ids
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _state_dicts_equal(getattr(loaded, name), getattr(pipe, name)), name
    other = testing.tiny_sdxl_pipeline(seed=1)
    assert not _state_dicts_equal(pipe.unet, other.unet)
    _assert_same_up_to_rounding(_image(loaded), _image(pipe), _image(other))


# ---------------------------------------------------------------- SD3


def test_sd3_modules_fit_together_as_sd3_does():
    pipe = testing.tiny_sd3_pipeline()
    t = pipe.transformer.config
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    # CLIP-L and CLIP-G states side by side are padded to T5's width, the transformer's joint attention width
    assert clip_width < t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert pipe.vae.config.latent_channels == t.in_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.0609, 1.5305)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    images = _image(pipe, height=32, width=32, max_sequence_length=testing.T5_MAX_LENGTH)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("t5", [True, False])
def test_saved_sd3_loads_with_diffusers_and_matches(t5, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = testing.tiny_sd3_pipeline(seed=0, t5=t5)
    path = testing.save_tiny_sd3(tmp_path / "sd3", seed=0, t5=t5)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == (["transformers", "T5EncoderModel"] if t5 else [None, None])
    # without T5 diffusers wants the absent parts named, as for the real SD3 loaded without T5
    loaded = StableDiffusion3Pipeline.from_pretrained(path, **({} if t5 else {"text_encoder_3": None,
                                                                                "tokenizer_3": None}))
    loaded.set_progress_bar_config(disable=True)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2"] + (["text_encoder_3"] if t5 else [])
    for name in names:
        assert _state_dicts_equal(getattr(loaded, name), getattr(pipe, name)), name
    assert (loaded.text_encoder_3 is None) is (not t5)
    other = testing.tiny_sd3_pipeline(seed=1, t5=t5)
    assert not _state_dicts_equal(pipe.transformer, other.transformer)
    kwargs = dict(height=32, width=32, max_sequence_length=testing.T5_MAX_LENGTH)
    _assert_same_up_to_rounding(_image(loaded, **kwargs), _image(pipe, **kwargs), _image(other, **kwargs))


# ---------------------------------------------------------------- Tango


def test_t5_tokenizer_round_trips_caption_without_unknowns():
    tokenizer = testing.tiny_t5_tokenizer()
    caption = "A dog barking in the rain, then 2 birds singing (loudly)!"
    ids = tokenizer(caption).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1  # T5's ids


def test_tango_modules_fit_together():
    parts = testing.tiny_tango_components()
    stft = parts.stft
    batch = parts.tokenizer(["a dog barking", "rain"], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = parts.text_encoder(**batch).last_hidden_state  # [B, L, 32]
        frames = 64
        mel = torch.randn(2, 1, frames, stft["n_mel_channels"])  # [B, 1, T, F]
        latents = parts.vae.encode(mel).latent_dist.mode()
        assert latents.shape == (2, parts.unet.config.in_channels, frames // 4, stft["n_mel_channels"] // 4)
        noise_pred = parts.unet(
            latents, torch.tensor([5, 900]), encoder_hidden_states=text, encoder_attention_mask=batch.attention_mask
        ).sample
        assert noise_pred.shape == latents.shape
        decoded = parts.vae.decode(latents).sample
        assert decoded.shape == mel.shape
        waveform = parts.vocoder(decoded.squeeze(1))  # [B, T * hop]
    assert waveform.shape == (2, frames * stft["hop_length"])
    assert parts.vocoder.config.sampling_rate == stft["sampling_rate"]
    assert parts.scheduler.config.prediction_type == "v_prediction"


def test_saved_tango_subfolders_load_with_their_classes(tiny_tango_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, SpeechT5HifiGan, T5EncoderModel

    parts = testing.tiny_tango_components(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tango_dir / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(tiny_tango_dir / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(tiny_tango_dir / "unet")
    vae = AutoencoderKL.from_pretrained(tiny_tango_dir / "vae")
    vocoder = SpeechT5HifiGan.from_pretrained(tiny_tango_dir / "vocoder")
    scheduler = DDPMScheduler.from_pretrained(tiny_tango_dir / "scheduler")

    caption = "birds singing while an engine is running"
    assert tokenizer(caption).input_ids == parts.tokenizer(caption).input_ids
    batch = parts.tokenizer([caption], return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 8, 16, 4, generator=g)
    mel = torch.randn(1, 32, parts.stft["n_mel_channels"], generator=g)  # [B, T, F], the vocoder's layout
    other = testing.tiny_tango_components(seed=1)
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae), ("vocoder", vocoder)):
        assert _state_dicts_equal(module, getattr(parts, name)), name
        assert not _state_dicts_equal(module, getattr(other, name)), name
    with torch.no_grad():
        text = parts.text_encoder(**batch).last_hidden_state
        _assert_same_up_to_rounding(text_encoder(**batch).last_hidden_state, text,
                                    other.text_encoder(**batch).last_hidden_state)
        t = torch.tensor([300])
        loaded_pred = unet(latents, t, encoder_hidden_states=text).sample
        memory_pred = parts.unet(latents, t, encoder_hidden_states=text).sample
        _assert_same_up_to_rounding(loaded_pred, memory_pred, other.unet(latents, t, encoder_hidden_states=text).sample)
        _assert_same_up_to_rounding(vae.decode(latents).sample, parts.vae.decode(latents).sample,
                                    other.vae.decode(latents).sample)
        _assert_same_up_to_rounding(vocoder(mel), parts.vocoder(mel), other.vocoder(mel))
    assert vae.config.scaling_factor == parts.vae.config.scaling_factor == 0.5
    settings = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert settings(scheduler.config) == settings(parts.scheduler.config)
    assert json.loads((tiny_tango_dir / "stft_config.json").read_text()) == testing.TINY_TANGO_STFT


# ---------------------------------------------------------------- GPT-2


def test_gpt2_tokenizer_round_trips_any_text_exactly():
    _, tokenizer = testing.tiny_causal_lm()
    text = "A photo of a cat, rewritten: 'naïve café' 🐱\n  done."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer(" the cat").input_ids) == 2  # merges give whole words
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_saved_causal_lm_loads_with_auto_classes_and_matches(tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = testing.tiny_causal_lm(seed=0)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    assert (tiny_causal_lm_dir / "model.safetensors").exists()
    texts = ["a red car in the city", "music"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert loaded_tokenizer(texts, padding=True, return_tensors="pt").input_ids.tolist() == batch.input_ids.tolist()
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    other, _ = testing.tiny_causal_lm(seed=1)
    assert _state_dicts_equal(loaded, model) and _state_dicts_equal(model, testing.tiny_causal_lm(seed=0)[0])
    assert not _state_dicts_equal(model, other)
    with torch.no_grad():
        _assert_same_up_to_rounding(loaded(**batch).logits, model(**batch).logits, other(**batch).logits)

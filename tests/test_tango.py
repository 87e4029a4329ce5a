"""The Tango backbone (diffusion_pref.pipelines.tango) on the tiny Tango-structured model of diffusion_pref.testing:
loading, the attention mask reaching the UNet, sampling, Audio-alpaca data, and training every loss through the one
loop (LoRA) and full fine-tuning once, with the outputs loading back."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pref.config import load_config
from diffusion_pref.losses import LOSSES, TAKES_SOFT_LABEL

sys.path.insert(0, str(Path(__file__).parent))
from helpers import backbone_of, read_metrics, train_config  # noqa: E402

SECONDS = 0.64  # 64 mel frames -> latents [8, 16, 4] on the tiny model
RATE = 16000


def tone(freq, seconds=0.5, rate=RATE, amp=0.3):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_alpaca(path, n=4, bad=None, fmt="WAV"):
    """Audio-alpaca-layout parquet: prompt, chosen, rejected ({"bytes", "path"} as the datasets Audio feature writes),
    strategy. ``bad``: row -> (waveform, rate) put in "rejected" instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_pref.audio import wav_bytes

    bad = bad or {}
    rows = {"prompt": [], "chosen": [], "rejected": [], "strategy": []}
    for i in range(n):
        rows["prompt"].append(f"a dog barking {i}")
        rows["chosen"].append({"bytes": wav_bytes(tone(300 + 50 * i), RATE, fmt), "path": f"chosen_{i}.wav"})
        wave, rate = bad.get(i, (tone(2000 + 100 * i, rate=22050), 22050))
        rows["rejected"].append({"bytes": wav_bytes(wave, rate, fmt), "path": f"reject_{i}.wav"})
        rows["strategy"].append("1.1")
    pq.write_table(pa.table(rows), str(path))
    return path


@pytest.fixture(scope="module")
def alpaca_path(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("alpaca") / "train.parquet")


def make_cfg(model_dir, data, out, *overrides):
    return train_config(model_dir, data, out, *overrides, batch_size=2, learning_rate="1e-2",
                        data_keys=(f"data.audio_seconds={SECONDS}",))


# ------------------------------------------------------------------------------------------------ backbone


def test_tango_folder_loads_as_the_tango_family(tiny_tango_dir):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffusion_pref.pipelines import detect_family
    from diffusion_pref.pipelines.tango import TangoBackbone
    from diffusion_pref.schedules import DDPMSchedule

    cfg = load_config(None, [f"model.pretrained={tiny_tango_dir}"])
    assert detect_family(cfg.model) == "tango"
    backbone = backbone_of(tiny_tango_dir)
    assert isinstance(backbone, TangoBackbone) and backbone.family == "tango"
    assert isinstance(backbone.denoiser, UNet2DConditionModel) and isinstance(backbone.scheduler, DDPMScheduler)
    assert set(backbone.frozen) == {"vae", "text_encoder", "vocoder"}
    assert isinstance(backbone.schedule, DDPMSchedule) and backbone.schedule.prediction_type == "v_prediction"
    assert backbone.sample_rate == 16000


def test_encode_decode_shapes(tiny_tango_dir):
    backbone = backbone_of(tiny_tango_dir)
    samples = backbone.samples_for(SECONDS)
    assert samples == 64 * 160
    waves = torch.randn(2, samples) * 0.2
    latents = backbone.encode(waves)
    assert latents.shape == (2, 8, 16, 4)
    # encode is log-mel -> VAE mode * scaling_factor
    from diffusion_pref.audio import log_mel

    mel = log_mel(waves, backbone.settings, frames=64).unsqueeze(1)
    expected = backbone.vae.encode(mel).latent_dist.mode() * backbone.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected.detach())
    assert backbone.decode(latents).shape == (2, samples)
    with pytest.raises(ValueError, match="multiple of 8 frames"):
        backbone.frames_for(0.5)


def test_attention_mask_hides_padding_from_the_unet(tiny_tango_dir):
    """Padded to the fixed length with the mask == the unpadded prompt alone (Tango pads to the batch's longest)."""
    backbone = backbone_of(tiny_tango_dir)
    text = backbone.encode_prompts(["a dog barking", "rain"])
    mask = text["encoder_attention_mask"]
    assert mask.shape == text["encoder_hidden_states"].shape[:2] and mask.dtype == torch.float32
    x = torch.randn(2, 8, 16, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        padded = backbone.predict(x, t, backbone.conditioning(text))
        for i in range(2):
            n = int(mask[i].sum())
            tokens = backbone.tokenizer(["a dog barking", "rain"][i], return_tensors="pt")
            assert tokens.input_ids.shape[1] == n
            alone = backbone.text_encoder(input_ids=tokens.input_ids)[0]
            out = backbone.denoiser(x[i:i + 1], t[i:i + 1], encoder_hidden_states=alone).sample
            # the same sums but for masked keys (exp(-10000) = 0 in float32) and T5 over a shorter padded input
            torch.testing.assert_close(padded[i:i + 1], out, atol=1e-5, rtol=1e-4)


def test_sample_is_per_seed_and_guided(tiny_tango_dir):
    backbone = backbone_of(tiny_tango_dir)
    kw = dict(steps=3, duration=SECONDS)
    waves = backbone.sample(["a dog barking", "rain"], [0, 1], guidance_scale=3.0, **kw)
    assert len(waves) == 2 and waves[0].shape == (64 * 160,) and waves[0].dtype == np.float32
    as_tensors = backbone.sample(["rain"], [1], guidance_scale=3.0, output_type="pt", **kw)
    assert isinstance(as_tensors[0], torch.Tensor) and as_tensors[0].shape == (64 * 160,)
    # the random tiny vocoder's output is ~1e-13: compare the latents
    both = backbone.sample(["a dog barking", "rain"], [0, 1], guidance_scale=3.0, output_type="latent", **kw)
    assert both[0].shape == (8, 16, 4)
    alone = backbone.sample(["rain"], [1], guidance_scale=3.0, output_type="latent", **kw)
    torch.testing.assert_close(alone[0], both[1], atol=1e-5, rtol=1e-5)
    unguided = backbone.sample(["rain"], [1], guidance_scale=1.0, output_type="latent", **kw)
    assert (unguided[0] - alone[0]).abs().max() > 1e-3
    ddim = backbone.sample(["rain"], [1], guidance_scale=3.0, scheduler="DDIMScheduler", **kw)
    assert np.isfinite(ddim[0]).all()
    with pytest.raises(ValueError, match="resolution"):
        backbone.sample(["rain"], [1], guidance_scale=3.0, resolution=32, **kw)


def test_cfg_step_matches_the_guidance_formula(tiny_tango_dir):
    """One DDIM step (eta 0, deterministic) from the seed's noise: the UNet's uncond + g * (cond - uncond) by hand."""
    from diffusers import DDIMScheduler

    backbone = backbone_of(tiny_tango_dir)
    got = backbone.sample(["rain"], [3], steps=1, guidance_scale=2.5, scheduler="DDIMScheduler",
                          duration=SECONDS, output_type="latent")[0]
    sched = DDIMScheduler.from_config(backbone.scheduler.config)
    sched.set_timesteps(1)
    x = torch.randn((1, 8, 16, 4), generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
    t = sched.timesteps[0]
    text, empty = backbone.encode_prompts(["rain"]), backbone.encode_prompts([""])
    with torch.no_grad():
        cond = backbone.denoiser(x, t, encoder_hidden_states=text["encoder_hidden_states"],
                                 encoder_attention_mask=text["encoder_attention_mask"]).sample
        uncond = backbone.denoiser(x, t, encoder_hidden_states=empty["encoder_hidden_states"],
                                   encoder_attention_mask=empty["encoder_attention_mask"]).sample
    latents = sched.step(uncond + 2.5 * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(got, latents[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ data


def test_alpaca_layout_reads_as_audio_pairs(alpaca_path, tiny_tango_dir):
    from diffusion_pref.data.loader import collate_pixels
    from diffusion_pref.data.pairs import PairSource

    cfg = load_config(None, [f"data.source={alpaca_path}", "data.shuffle=false"])
    source = PairSource(cfg.data)
    assert source.alpaca and source.media == "audio" and len(source) == 4
    backbone = backbone_of(tiny_tango_dir)
    source.use_audio(*backbone.audio_front_end(SECONDS))
    batch = collate_pixels(source, cfg.data, source.order(0)[:2], seed=0)
    assert batch["audio_w"].shape == (2, 64 * 160) and batch["captions"] == ["a dog barking 0", "a dog barking 1"]
    # the winner is "chosen": a 300 Hz tone, peak 0.5 after Tango's normalisation
    spectrum = np.abs(np.fft.rfft(batch["audio_w"][0, :8000].numpy()))
    assert abs(np.argmax(spectrum) * RATE / 8000 - 300) <= 2
    assert math.isclose(float(batch["audio_w"][0].abs().max()), 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("problem,wave,match", [
    ("silent", (np.zeros(4000, np.float32), RATE), "silent"),
    ("rate", (tone(300, rate=8000), 8000), "8000 Hz"),
    ("stereo", (np.stack([tone(300), tone(400)], 1), RATE), "2 channels"),
])
def test_bad_audio_is_an_error_naming_the_row_or_a_counted_skip(problem, wave, match, tmp_path, tiny_tango_dir):
    from diffusion_pref.data.loader import collate_pixels
    from diffusion_pref.data.pairs import DataError, PairSource

    path = write_alpaca(tmp_path / "bad.parquet", n=3, bad={1: wave})
    settings = backbone_of(tiny_tango_dir).audio_front_end(SECONDS)
    cfg = load_config(None, [f"data.source={path}", "data.shuffle=false"])
    source = PairSource(cfg.data)
    source.use_audio(*settings)
    with pytest.raises(DataError, match=rf"row 1 .*column rejected: audio .*{match}"):
        collate_pixels(source, cfg.data, source.order(0), seed=0)
    cfg = load_config(None, [f"data.source={path}", "data.shuffle=false", "data.on_bad_row=skip"])
    source = PairSource(cfg.data)
    source.use_audio(*settings)
    batch = collate_pixels(source, cfg.data, source.order(0), seed=0)
    assert batch["size"] == 2 and batch["skipped"] == 1


def test_nan_and_undecodable_audio(tmp_path, tiny_tango_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_pref.data.pairs import DataError, PairSource

    from diffusion_pref.audio import wav_bytes

    good = wav_bytes(tone(300), RATE)
    nan = {"array": np.array([0.1, np.nan, 0.2], np.float32), "sampling_rate": RATE}
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": [good, good], "rejected": [b"garbage", good]}),
                   str(tmp_path / "p.parquet"))
    cfg = load_config(None, [f"data.source={tmp_path / 'p.parquet'}", "data.shuffle=false"])
    source = PairSource(cfg.data)
    source.use_audio(*backbone_of(tiny_tango_dir).audio_front_end(SECONDS))
    with pytest.raises(DataError, match="row 0 .*could not decode audio"):
        source.read(source.order(0))
    with pytest.raises(DataError, match="NaN"):
        source._decode_audio(nan, source.blocks[0], 1, "rejected")


def test_audio_data_needs_an_audio_model(alpaca_path):
    from diffusion_pref.data.pairs import DataError, PairSource

    cfg = load_config(None, [f"data.source={alpaca_path}"])
    source = PairSource(cfg.data)
    with pytest.raises(DataError, match="not an audio model"):
        source.read(source.order(0)[:1])


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_tango_lora(loss, alpaca_path, tiny_tango_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    soft = ["data.soft_labels=label"] if loss in TAKES_SOFT_LABEL else []
    trainer = Trainer(make_cfg(tiny_tango_dir, alpaca_path, tmp_path, f"loss.name={loss}", *soft))
    assert trainer.backbone.family == "tango"
    denoiser = trainer.accelerator.unwrap_model(trainer.unet)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    summary = trainer.train()
    assert summary["steps"] == 2
    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    params = dict(denoiser.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in before.items()), f"{loss}: nothing trained"
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_lora_output_loads_back_for_sampling(alpaca_path, tiny_tango_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    out = tmp_path / "out"
    trainer = Trainer(make_cfg(tiny_tango_dir, alpaca_path, out, "loss.name=dpo", "train.learning_rate=5e-2"))
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.unet)
    x, t = torch.randn(1, 8, 16, 4), torch.tensor([500])
    cond = trainer.backbone.conditioning(trainer.backbone.encode_prompts(["rain"]))
    with torch.no_grad():
        expected = trainer.backbone.predict(x, t, cond, denoiser=trained)
    backbone = backbone_of(tiny_tango_dir)
    kw = dict(steps=2, guidance_scale=3.0, duration=SECONDS, output_type="latent")
    base = backbone.sample(["rain"], [0], **kw)[0]
    backbone.load_lora(out)
    with torch.no_grad():
        torch.testing.assert_close(backbone.predict(x, t, cond), expected, atol=1e-5, rtol=1e-4)
    tuned = backbone.sample(["rain"], [0], **kw)[0]
    assert (tuned - base).abs().max() > 1e-4
    backbone.unload_lora()
    torch.testing.assert_close(backbone.sample(["rain"], [0], **kw)[0], base, atol=1e-6, rtol=1e-6)


def test_full_finetune_and_cache_output_loads_back(alpaca_path, tiny_tango_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    out = tmp_path / "full"
    trainer = Trainer(make_cfg(tiny_tango_dir, alpaca_path, out, "model.finetune=full", "loss.name=dpo",
                               "train.learning_rate=1e-3", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}"))
    summary = trainer.train()
    assert summary["output"] == "pipeline"
    trained = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    loaded = backbone_of(out)
    for name, value in loaded.denoiser.state_dict().items():
        torch.testing.assert_close(value, trained[name], msg=name)
    base = backbone_of(tiny_tango_dir).denoiser.state_dict()
    assert any(not torch.equal(base[n], v) for n, v in loaded.denoiser.state_dict().items())
    assert np.isfinite(loaded.sample(["rain"], [0], steps=2, guidance_scale=3.0, duration=SECONDS)[0]).all()


@pytest.mark.parametrize("kind", ["ddim", "renoise"])
def test_smpo_trajectories_train_tango(kind, alpaca_path, tiny_tango_dir, tmp_path):
    """SmPO with its inverted trajectories (v-prediction DDPM schedule) through the one loop."""
    from diffusion_pref.training.setup import Trainer

    trainer = Trainer(make_cfg(tiny_tango_dir, alpaca_path, tmp_path, "loss.name=smpo", "data.soft_labels=label",
                               f"trajectory.kind={kind}", "trajectory.steps=4", "train.max_steps=1"))
    summary = trainer.train()
    assert summary["steps"] == 1
    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_validation_writes_wav_clips(alpaca_path, tiny_tango_dir, tmp_path):
    import soundfile

    from diffusion_pref.training.setup import Trainer

    trainer = Trainer(make_cfg(tiny_tango_dir, alpaca_path, tmp_path, "loss.name=dpo", "train.max_steps=1",
                               "train.validate_every=1", "train.validation_prompts=[rain]", "sample.steps=2"))
    trainer.train()
    clips = sorted((tmp_path / "validation").rglob("*.wav"))
    assert [c.name for c in clips] == ["00_base.wav", "00_tuned.wav"]
    data, rate = soundfile.read(str(clips[0]))
    assert rate == 16000 and data.shape == (64 * 160,)


def test_cache_command_then_cached_training(alpaca_path, tiny_tango_dir, tmp_path):
    from diffusion_pref.commands import cache
    from diffusion_pref.training.setup import Trainer

    overrides = ("loss.name=dpo", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}")
    cache.run(make_cfg(tiny_tango_dir, alpaca_path, tmp_path / "out", *overrides))
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*.safetensors")}
    assert shards
    trainer = Trainer(make_cfg(tiny_tango_dir, alpaca_path, tmp_path / "out", *overrides, "train.max_steps=1"))
    assert trainer.train()["steps"] == 1
    # the same cache key: the shards are read, not rebuilt
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("shard-*.safetensors")} == shards


def test_a_registered_name_is_detected_as_tango(tiny_tango_dir):
    from diffusion_pref.pipelines import NAMED_MODELS, detect_family, register_named_model

    register_named_model("tiny-tango-test", tiny_tango_dir, "build it with save_tiny_tango")
    try:
        cfg = load_config(None, ["model.pretrained=tiny-tango-test"])
        assert detect_family(cfg.model) == "tango"
        assert backbone_of("tiny-tango-test").family == "tango"
    finally:
        NAMED_MODELS.pop("tiny-tango-test")


def test_tango2_recipe_trains_the_tiny_model_through_the_cli(alpaca_path, tiny_tango_dir, tmp_path):
    """configs/tango2_dpo.yaml as shipped (full fine-tuning, frozen copy as reference, beta 1000), on the tiny model
    and the test pairs for one step."""
    from diffusion_pref import cli

    recipe = Path(__file__).parent.parent / "configs" / "tango2_dpo.yaml"
    code = cli.main(["train", "--config", str(recipe), f"model.pretrained={tiny_tango_dir}",
                     f"data.source={alpaca_path}", f"data.audio_seconds={SECONDS}", "data.num_workers=0",
                     "train.batch_size=2", "train.grad_accum=1", "train.max_steps=1", "train.logger=none",
                     f"output.dir={tmp_path}"])
    assert code == 0
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["output"] == "pipeline" and summary["beta"] == 1000 and summary["reference"] == "copy"
    assert backbone_of(tmp_path).family == "tango"

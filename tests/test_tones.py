"""The tones world: deterministic clips, captions that parse, a reward that separates right from wrong captions,
the Griffin-Lim vocoder, and the Tango-structured model loading through the Tango backbone."""

import json
import random

import numpy as np
import pytest
from pathlib import Path
import torch

from diffusion_pref.tones import render as R
from diffusion_pref.tones.rewards import TonesFidelity, detect, sequence_score


def test_render_is_deterministic_and_seeded():
    text = "two high beeps then a low hum"
    a = R.render(R.Clip.from_caption(text, seed=3))
    b = R.render(R.Clip.from_caption(text, seed=3))
    c = R.render(R.Clip.from_caption(text, seed=4))
    assert a.dtype == np.float32 and a.shape == (R.NUM_SAMPLES,) and R.NUM_SAMPLES == 20480
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a).max() <= 1.0
    batch = R.render_batch([text, "three clicks"], [3, 0])
    assert np.array_equal(batch[0], a)


def test_captions_parse_and_round_trip():
    captions = R.all_captions()
    assert len(captions) == len(set(captions)) > 100
    for text in captions:
        clip = R.Clip.from_caption(text)
        assert R.caption(clip) == text
    assert R.parse_caption("Two high beeps then a low hum.") == (R.Group(2, "beep", "high"), R.Group(1, "hum", "low"))
    assert R.Clip.from_caption("three clicks then a high chirp").events() == [("click", None)] * 3 + [("chirp", "high")]
    train, held = set(R.train_captions()), R.eval_prompts()
    assert held and not train & set(held)
    kinds_in_train = {g.kind for t in train for g in R.parse_caption(t)}
    assert kinds_in_train == set(R.KINDS)


@pytest.mark.parametrize("bad", ["two beeps", "a low hiss", "four high beeps", "a dog barks",
                                 "a high beep then a high beep", "a beep then a hiss then a click", "three low hums"])
def test_bad_captions_are_clear_errors(bad):
    with pytest.raises(ValueError, match="tones"):
        R.Clip.from_caption(bad)


def test_sequence_score_by_hand():
    hb, lh, lb = ("beep", "high"), ("hum", "low"), ("beep", "low")
    assert sequence_score([hb, hb, lh], [hb, hb, lh]) == 1.0
    assert sequence_score([hb, hb, lh], [hb, lh]) == pytest.approx(1 - 1 / 3)  # one sound missing
    assert sequence_score([hb, hb, lh], [hb, lb, lh]) == pytest.approx(1 - 0.5 / 3)  # one pitch wrong
    assert sequence_score([hb], [("hiss", None)]) == 0.0  # kind and pitch wrong
    assert sequence_score([hb, lh], [lh, hb]) == 0.0  # order swapped: two substitutions of cost 1
    assert sequence_score([hb], []) == 0.0


def _wrong(text, rng):
    clip = R.Clip.from_caption(text)
    options = [c for c in R.all_captions() if R.Clip.from_caption(c).events() != clip.events()]
    return options[rng.randrange(len(options))]


def test_reward_separates_right_from_wrong_captions():
    rng = random.Random(0)
    captions = rng.sample(R.all_captions(), 40)
    waves = R.render_batch(captions, list(range(40)))
    reward = TonesFidelity()
    right = reward.score(captions, list(waves), sample_rate=16000)
    wrong = reward.score([_wrong(c, rng) for c in captions], torch.from_numpy(waves))
    assert right.shape == (40,) and right.dtype == torch.float32
    assert torch.all(right == 1.0), [c for c, s in zip(captions, right) if s < 1]
    assert torch.all(wrong < 1.0) and wrong.mean() < 0.5


def test_reward_detects_each_attribute():
    wave = R.render(R.Clip.from_caption("two high beeps then a low hum", seed=1))
    found = [(s["kind"], s["pitch"]) for s in detect(wave)]
    assert found == [("beep", "high"), ("beep", "high"), ("hum", "low")]
    reward = TonesFidelity()
    for text, expected in [("two high beeps then a low hum", 1.0), ("three high beeps then a low hum", 0.75),
                           ("two low beeps then a low hum", 1 - 1 / 3), ("a low hum then two high beeps", 1 / 3)]:
        assert float(reward.score([text], [wave])[0]) == pytest.approx(expected)
    # loudness does not matter (peak normalisation), silence has no sounds
    assert float(reward.score(["two high beeps then a low hum"], [wave * 0.1])[0]) == 1.0
    assert float(reward.score(["a click"], [np.zeros(R.NUM_SAMPLES, np.float32)])[0]) == 0.0
    with pytest.raises(ValueError, match="sample_rate"):
        reward.score(["a click"], [wave], sample_rate=48000)


def test_mel_is_the_tango_front_end_with_an_independent_filterbank():
    """The tones mel is diffusion_pref.audio's; its filterbank equals a direct numpy Slaney construction."""
    from diffusion_pref.audio import mel_basis
    from diffusion_pref.tones import audio as A

    sr, n_fft, n_mels = 16000, 1024, A.N_MELS

    def hz_to_mel(f):
        f = np.asarray(f, float)
        return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27), f * 3 / 200)

    def mel_to_hz(m):
        m = np.asarray(m, float)
        return np.where(m >= 15, 1000 * np.exp((np.log(6.4) / 27) * (m - 15)), m * 200 / 3)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), n_mels + 2))
    fft = np.linspace(0, sr / 2, n_fft // 2 + 1)
    bank = np.zeros((n_mels, len(fft)))
    for i in range(n_mels):
        lo, mid, hi = edges[i:i + 3]
        bank[i] = np.maximum(0, np.minimum((fft - lo) / (mid - lo), (hi - fft) / (hi - mid))) * 2 / (hi - lo)
    np.testing.assert_allclose(mel_basis(A.settings()).numpy(), bank, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(A.mel_centres_hz(), edges[1:-1], rtol=1e-6)
    mel = A.log_mel(R.render(R.Clip.from_caption("a high beep")))
    assert mel.shape == (A.FRAMES, A.N_MELS)


def test_griffin_lim_round_trip_keeps_the_reward(tmp_path):
    from diffusion_pref.tones.audio import log_mel, prepare
    from diffusion_pref.tones.vocoder import GriffinLimVocoder, is_griffin_lim

    vocoder = GriffinLimVocoder(n_mel_channels=32, n_iter=8)
    vocoder.save_pretrained(tmp_path / "vocoder")
    assert is_griffin_lim(tmp_path / "vocoder")
    loaded = GriffinLimVocoder.from_pretrained(tmp_path / "vocoder")
    assert loaded.n_iter == 8 and list(loaded.parameters()) == []
    captions = ["two high beeps then a low hum", "three clicks then a high chirp", "a hiss then two low chirps"]
    mels = log_mel(np.stack([prepare(w) for w in R.render_batch(captions, [0, 1, 2])]))
    waves = loaded(mels)
    assert waves.shape == (3, R.NUM_SAMPLES)
    assert torch.equal(waves, loaded(mels))  # deterministic
    assert torch.all(TonesFidelity().score(captions, waves) == 1.0)


@pytest.fixture(scope="module")
def tiny_tones_dir(tmp_path_factory):
    """A random-weight model with the shipped model's structure and layout."""
    from diffusion_pref.tones.model import (
        TonesModel,
        build_models,
        schedulers,
        tones_tokenizer,
    )
    from diffusion_pref.tones.vocoder import GriffinLimVocoder

    torch.manual_seed(0)
    tokenizer = tones_tokenizer()
    text_encoder, unet, vae = build_models(tokenizer)
    model = TonesModel(text_encoder.eval(), tokenizer, unet.eval(), vae.eval(), GriffinLimVocoder(n_iter=2),
                       schedulers()[0])
    return model.save_pretrained(tmp_path_factory.mktemp("tones") / "model")


def test_model_loads_through_the_tango_backbone_and_matches_the_reference_sampler(tiny_tones_dir):
    from diffusion_pref.config import ModelConfig
    from diffusion_pref.pipelines import detect_family, load_backbone
    from diffusion_pref.tones.model import TonesModel

    cfg = ModelConfig(pretrained=str(tiny_tones_dir))
    assert detect_family(cfg) == "tango"
    backbone = load_backbone(cfg)
    assert type(backbone.vocoder).__name__ == "GriffinLimVocoder" and backbone.sample_rate == 16000
    prompts, seeds = ["two high beeps then a low hum", "three clicks"], [0, 1]
    waves = backbone.sample(prompts, seeds, steps=3, guidance_scale=2.0, scheduler="DDIMScheduler",
                            output_type="pt")
    assert len(waves) == 2 and waves[0].shape == (20480,)
    reference = TonesModel.from_pretrained(tiny_tones_dir).sample(prompts, seeds, steps=3, guidance_scale=2.0)
    torch.testing.assert_close(torch.stack(list(waves)), reference, rtol=1e-4, atol=1e-4)
    # encode/decode run on the tones clip length
    latents = backbone.encode(torch.from_numpy(R.render_batch(prompts, seeds)))
    assert latents.shape == (2, 8, 32, 8)


def test_shipped_model_loads_by_name_and_samples():
    from diffusion_pref.config import ModelConfig
    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.tones import WEIGHTS

    if not (WEIGHTS / "stft_config.json").is_file():
        pytest.skip("tones weights not built in this checkout")
    assert sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file()) < 5 * 2**20
    backbone = load_backbone(ModelConfig(pretrained="tones"))
    waves = backbone.sample(["a low hum"], [0], steps=4, guidance_scale=1.0, scheduler="DDIMScheduler")
    assert waves[0].shape == (20480,) and np.isfinite(waves[0]).all()
    score = TonesFidelity().score(["a low hum"], list(waves), sample_rate=backbone.sample_rate)
    assert 0.0 <= float(score[0]) <= 1.0


def test_plugin_registers_names():
    from diffusion_pref import plugins
    from diffusion_pref.pipelines import named_model_folder
    from diffusion_pref.prompts import read_prompts
    from diffusion_pref.reward_models import load_reward

    assert "diffusion_pref.tones" in plugins.PLUGINS
    records = read_prompts("tones")
    assert records and all(r.category in R.KINDS for r in records)
    assert {r.prompt for r in read_prompts("tones-train")} == set(R.train_captions())
    assert named_model_folder("tones").name == "weights"
    reward = load_reward({"tones-fidelity": 1.0})
    wave = R.render(R.Clip.from_caption("a low hum", 0))
    assert float(reward.score(["a low hum"], [wave])[0]) == 1.0


def test_quickstart_runs_generate_train_evaluate_through_the_standard_commands(tmp_path):
    # python -m diffusion_pref.tones.quickstart is `diffusion-pref quickstart model.pretrained=tones`: the shipped
    # model through generate -> train -> evaluate, with the tones recipe reaching each step (reduced sizes)
    from diffusion_pref.config import load_config
    from diffusion_pref.tones import WEIGHTS
    from diffusion_pref.tones.quickstart import main

    if not (WEIGHTS / "stft_config.json").is_file():
        pytest.skip("tones weights not built in this checkout")
    out = tmp_path / "qs"
    assert main(["--out", str(out), "sample.steps=2", "generate.max_prompts=2", "generate.samples_per_prompt=2",
                 "generate.min_gap=null", "train.max_steps=1", "train.batch_size=2", "eval.max_prompts=2",
                 "eval.seeds=[0]", "eval.bootstrap_samples=20"]) == 0
    summary = json.loads((out / "quickstart_summary.json").read_text())
    assert "(audio)" in summary["model"] and summary["loss"] == "dpo"
    win = json.loads((out / "eval" / "metrics.json").read_text())["win_rates"]["tones-fidelity"]["dpo"]
    assert win["n_pairs"] == 2 and 0.0 <= win["ci_low"] <= win["win_rate"] <= win["ci_high"] <= 1.0
    assert (out / "train" / "pytorch_lora_weights.safetensors").is_file()
    train_cfg = load_config(out / "train" / "config.yaml")
    recipe = load_config(Path(WEIGHTS).parent / "quickstart.yaml")
    assert train_cfg.loss.beta == recipe.loss.beta and train_cfg.train.learning_rate == recipe.train.learning_rate
    assert train_cfg.generate.strategy == recipe.generate.strategy and train_cfg.eval.seeds == [0]
    import pyarrow.parquet as pq

    pairs = pq.read_table(sorted((out / "pairs").glob("pairs-*.parquet"))[0]).to_pydict()
    assert {"prompt", "chosen", "rejected", "strategy", "score_0", "score_1"} <= set(pairs)
    assert len(pairs["prompt"]) >= 1  # SmPO's soft labels read the score columns


def test_quickstart_takes_the_tones_recipe_and_keeps_what_the_user_set(tmp_path, capsys):
    # the command line layers the tones recipe over the shapes world's and under the user's values: a value given
    # equal to the shapes-world default (generate.strategy=best_vs_worst) stays too
    import yaml

    from diffusion_pref.cli import main
    from diffusion_pref.config import load_config
    from diffusion_pref.tones import WEIGHTS

    if not (WEIGHTS / "stft_config.json").is_file():
        pytest.skip("tones weights not built in this checkout")
    recipe = load_config(Path(WEIGHTS).parent / "quickstart.yaml")
    shapes = load_config(Path(WEIGHTS).parents[1] / "quickstart.yaml")
    assert recipe.generate.strategy != shapes.generate.strategy == "best_vs_worst"

    def resolved(*overrides):
        assert main(["quickstart", "--print-config", "model.pretrained=tones", *overrides]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    tones = resolved("train.max_steps=7", "sample.steps=3", "generate.strategy=best_vs_worst")
    assert tones["reward"]["models"] == {"tones-fidelity": 1.0}
    assert tones["generate"]["prompts"] == "tones-train" and tones["eval"]["prompts"] == "tones"
    assert tones["sample"]["scheduler"] == "DDIMScheduler" and tones["generate"]["samples_per_prompt"] == 8
    assert tones["train"]["max_steps"] == 7 and tones["sample"]["steps"] == 3  # the user's values stay
    assert tones["generate"]["strategy"] == "best_vs_worst"  # given equal to the shapes world's: still the user's
    assert tones["loss"]["beta"] == recipe.loss.beta and tones["model"]["lora_rank"] == shapes.model.lora_rank
    config = tmp_path / "mine.yaml"
    config.write_text("loss:\n  beta: 55\n")
    assert resolved("--config", str(config))["loss"]["beta"] == 55  # --config over the world's recipe
    image = main(["quickstart", "--print-config"]) == 0 and yaml.safe_load(capsys.readouterr().out)
    assert image["generate"]["strategy"] == shapes.generate.strategy and image["loss"]["beta"] == shapes.loss.beta

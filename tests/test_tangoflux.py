"""TangoFlux backbone (diffusion_pref/pipelines/tangoflux.py) on a tiny model in the declare-lab/TangoFlux hub layout:
each protocol member against diffusers' own computation or a by-hand one of TangoFlux's definitions, and DPO
training with LoRA through the train command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffusion_pref.config import load_config

RATE = 44100
SECONDS = 0.5  # the duration the tiny model (window 16 * 2048 samples = 0.743 s, max_duration 0.7) conditions on


@pytest.fixture(scope="module")
def tiny_tangoflux_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_tangoflux

    return save_tiny_tangoflux(tmp_path_factory.mktemp("tiny-tangoflux"))


def tone(freq, seconds=0.6, rate=RATE, amp=0.3):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    """Audio-alpaca-layout parquet (prompt, chosen, rejected, strategy) with 44.1 kHz / 48 kHz clips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_pref.audio import wav_bytes

    rows = {"prompt": [], "chosen": [], "rejected": [], "strategy": []}
    for i in range(4):
        rows["prompt"].append(f"a dog barking {i}")
        rows["chosen"].append({"bytes": wav_bytes(tone(300 + 50 * i), RATE), "path": f"c{i}.wav"})
        rows["rejected"].append({"bytes": wav_bytes(tone(2000 + 100 * i, rate=48000), 48000), "path": f"r{i}.wav"})
        rows["strategy"].append("crpo")
    path = tmp_path_factory.mktemp("pairs") / "train.parquet"
    pq.write_table(pa.table(rows), str(path))
    return path


def backbone_of(model_dir, *overrides):
    from diffusion_pref.pipelines import load_backbone

    return load_backbone(load_config(None, [f"model.pretrained={model_dir}", *overrides]).model)


def raw_modules(folder):
    """The tiny model's tensors read independently: the state dict, a FluxTransformer2DModel, the T5 encoder."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    config = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "tangoflux.safetensors"))
    transformer = FluxTransformer2DModel(
        in_channels=config["in_channels"], num_layers=config["num_layers"],
        num_single_layers=config["num_single_layers"], attention_head_dim=config["attention_head_dim"],
        num_attention_heads=config["num_attention_heads"], joint_attention_dim=config["joint_attention_dim"],
        pooled_projection_dim=config["joint_attention_dim"], guidance_embeds=False).eval()
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    t5 = T5EncoderModel(AutoConfig.from_pretrained(str(folder / "text_encoder"))).eval()
    t5.load_state_dict({**{k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")},
                        "encoder.embed_tokens.weight": state["text_encoder.shared.weight"]})  # strict
    return config, state, transformer, t5, AutoTokenizer.from_pretrained(str(folder / "text_encoder"))


def by_hand_condition(config, state, t5, tokenizer, prompts, seconds, pad_to=None):
    """TangoFlux's ``forward`` conditioning, written out: T5 padded to the batch's longest prompt (or ``pad_to``),
    nanmean over real tokens -> Linear + ReLU, duration -> [t, sin 2 pi w t, cos 2 pi w t] -> Linear, appended."""
    kw = dict(padding="max_length", max_length=pad_to) if pad_to else dict(padding=True, max_length=64)
    tokens = tokenizer(prompts, truncation=True, return_tensors="pt", **kw)
    with torch.no_grad():
        hidden = t5(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    masked = torch.where(tokens.attention_mask[..., None].bool(), hidden, torch.tensor(float("nan")))
    pooled = torch.relu(torch.nanmean(masked, 1) @ state["fc.0.weight"].T + state["fc.0.bias"])
    t = torch.full((len(prompts),), seconds).clamp(0, config["max_duration"]) / config["max_duration"]
    angle = t[:, None] * state["duration_emebdder.time_positional_embedding.0.weights"] * 2 * math.pi
    features = torch.cat([t[:, None], angle.sin(), angle.cos()], -1)
    token = features @ state["duration_emebdder.time_positional_embedding.1.weight"].T \
        + state["duration_emebdder.time_positional_embedding.1.bias"]
    return torch.cat([hidden, token[:, None]], 1), pooled


def flux_call(transformer, x, sigma, states, pooled):
    txt_ids = torch.zeros(states.shape[1], 3)
    img_ids = torch.arange(x.shape[1]).float()[:, None].repeat(1, 3)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=sigma, encoder_hidden_states=states, pooled_projections=pooled,
                           txt_ids=txt_ids, img_ids=img_ids, guidance=None, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------ backbone


def test_hub_layout_is_detected_and_loaded(tiny_tangoflux_dir):
    from diffusers import AutoencoderOobleck, FluxTransformer2DModel

    from diffusion_pref.pipelines import detect_family
    from diffusion_pref.pipelines.tangoflux import TangoFluxBackbone
    from diffusion_pref.schedules import FlowMatchSchedule

    assert detect_family(load_config(None, [f"model.pretrained={tiny_tangoflux_dir}"]).model) == "tangoflux"
    backbone = backbone_of(tiny_tangoflux_dir)
    assert isinstance(backbone, TangoFluxBackbone) and backbone.family == "tangoflux"
    assert isinstance(backbone.denoiser, FluxTransformer2DModel) and isinstance(backbone.vae, AutoencoderOobleck)
    assert isinstance(backbone.schedule, FlowMatchSchedule) and backbone.schedule.shift == 1.0
    assert backbone.schedule.timestep_sampling == "logit_normal"
    assert backbone.sample_rate == RATE and backbone.hop == 2048 and backbone.frames == 16
    assert set(backbone.frozen) == {"vae", "text_encoder", "conditioner"}


def test_missing_file_is_a_one_line_error(tiny_tangoflux_dir, tmp_path):
    import shutil

    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    broken = tmp_path / "tf"
    shutil.copytree(tiny_tangoflux_dir, broken)
    (broken / "vae.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing vae\.safetensors") as err:
        backbone_of(broken, "model.family=tangoflux")
    assert "\n" not in str(err.value)


def test_schedule_matches_diffusers_scale_noise_and_tangoflux_sigmas(tiny_tangoflux_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    backbone = backbone_of(tiny_tangoflux_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)  # what TangoFlux builds
    # TangoFlux's training sigmas: scheduler.sigmas at indices of its descending timestep table
    assert torch.allclose(backbone.schedule.sigmas.sort().values, scheduler.sigmas.sort().values)
    x0, noise = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    t = torch.tensor([0, 499, 999])
    ours = backbone.schedule.add_noise(x0, noise, t)
    for i in range(3):
        theirs = scheduler.scale_noise(x0[i:i + 1], torch.tensor([float(t[i] + 1)]), noise[i:i + 1])
        torch.testing.assert_close(ours[i:i + 1], theirs)
    torch.testing.assert_close(backbone.schedule.target(x0, noise, t), noise - x0)


def test_predict_matches_tangoflux_forward_by_hand(tiny_tangoflux_dir):
    backbone = backbone_of(tiny_tangoflux_dir)
    config, state, transformer, t5, tokenizer = raw_modules(tiny_tangoflux_dir)
    prompts = ["a dog barking in the rain", "wind"]
    backbone.audio_front_end(SECONDS)  # the duration training conditions on
    cond = backbone.conditioning(backbone.encode_prompts(prompts))
    states, pooled = by_hand_condition(config, state, t5, tokenizer, prompts, SECONDS)
    torch.testing.assert_close(cond["encoder_hidden_states"], states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond["pooled_projections"], pooled, atol=1e-5, rtol=1e-5)
    x, t = torch.randn(2, 16, 8), torch.tensor([100, 800])
    with torch.no_grad():
        ours = backbone.predict(x, t, cond)
    sigma = (t + 1).float() / 1000  # TangoFlux: timesteps / 1000 = sigma
    torch.testing.assert_close(ours, flux_call(transformer, x, sigma, states, pooled), atol=1e-5, rtol=1e-5)


def test_encode_decode_against_the_oobleck_vae(tiny_tangoflux_dir):
    backbone = backbone_of(tiny_tangoflux_dir)
    wave = torch.randn(2, 16 * 2048) * 0.1
    latents = backbone.encode(wave)
    assert latents.shape == (2, 16, 8)
    with torch.no_grad():
        stereo = wave[:, None].repeat(1, 2, 1)  # TangoFlux's "fake stereo" for mono files
        expected = backbone.vae.encode(stereo).latent_dist.mode().transpose(1, 2)
        torch.testing.assert_close(latents, expected)
        decoded = backbone.vae.decode(latents.transpose(1, 2)).sample
    torch.testing.assert_close(backbone.decode(latents), decoded.mean(1))
    assert backbone.decode(latents).shape == (2, 16 * 2048)


def test_waveform_front_end_resamples_cuts_and_pads_without_normalising(tiny_tangoflux_dir):
    import soxr

    from diffusion_pref.audio import WaveSettings, prepare_waveform

    backbone = backbone_of(tiny_tangoflux_dir)
    settings, frames = backbone.audio_front_end(0.3)
    assert settings == WaveSettings(RATE, 2048, 0.3) and frames == 16 and backbone.duration == 0.3
    wave = tone(440, seconds=0.6, rate=48000, amp=0.9)
    out = prepare_waveform(wave, 48000, settings, frames)
    kept = int(0.3 * RATE)
    assert out.shape == (16 * 2048,) and not out[kept:].any()
    np.testing.assert_allclose(out[:kept], soxr.resample(wave, 48000, RATE)[:kept], atol=1e-6)
    assert np.abs(out).max() > 0.8  # no peak normalisation to 0.5
    with pytest.raises(ValueError, match="data.audio_seconds=5: TangoFlux takes durations"):
        backbone.audio_front_end(5)


def test_sample_matches_tangoflux_inference_by_hand(tiny_tangoflux_dir):
    """TangoFlux's inference_flow for one prompt: noise from manual_seed(seed), CFG with "" padded to the prompt's
    length, Euler on linspace(1, 1/steps, steps) through diffusers' scheduler; and batching changes nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    backbone = backbone_of(tiny_tangoflux_dir)
    config, state, transformer, t5, tokenizer = raw_modules(tiny_tangoflux_dir)
    prompt, seed, steps, guidance = "a dog barking", 7, 3, 4.5
    ours = backbone.sample([prompt], [seed], steps=steps, guidance_scale=guidance, duration=SECONDS,
                           output_type="latent")[0]

    states, pooled = by_hand_condition(config, state, t5, tokenizer, [prompt], SECONDS)
    length = states.shape[1] - 1
    empty_states, empty_pooled = by_hand_condition(config, state, t5, tokenizer, [""], SECONDS, pad_to=length)
    states, pooled = torch.cat([empty_states, states]), torch.cat([empty_pooled, pooled])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    torch.manual_seed(seed)
    latents = torch.randn(1, config["audio_seq_len"], config["in_channels"])
    for t in scheduler.timesteps:
        out = flux_call(transformer, torch.cat([latents] * 2), torch.tensor([t / 1000] * 2), states, pooled)
        uncond, cond = out.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    torch.testing.assert_close(ours, latents[0], atol=1e-5, rtol=1e-5)

    batch = backbone.sample(["wind", prompt, "rain on the street"], [1, seed, 2], steps=steps,
                            guidance_scale=guidance, duration=SECONDS, output_type="latent")
    torch.testing.assert_close(batch[1], ours, atol=1e-6, rtol=1e-6)
    waves = backbone.sample([prompt, "wind"], [seed, 1], steps=steps, guidance_scale=guidance, duration=SECONDS)
    assert [w.shape for w in waves] == [(int(SECONDS * RATE),)] * 2 and waves[0].dtype == np.float32
    with torch.no_grad():
        full = backbone.decode(ours[None])[0]
    np.testing.assert_allclose(waves[0], full[:int(SECONDS * RATE)].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="sample.scheduler=DDIMScheduler: TangoFlux is a flow-matching model"):
        backbone.sample([prompt], [0], steps=1, guidance_scale=1.0, scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="duration=31: TangoFlux takes durations"):
        backbone.sample([prompt], [0], steps=1, guidance_scale=1.0, duration=31)


def test_rpo_with_beta_1000_is_tangoflux_crpo_loss():
    """TangoFlux.forward(sft=False): -logsigmoid(-0.5 * 2000 * ((mse_w - mse_l) - (ref_w - ref_l))) + mse_w."""
    import torch.nn.functional as F

    from diffusion_pref.losses import rpo

    g = torch.Generator().manual_seed(0)
    mse_w, mse_l, ref_w, ref_l = (torch.rand(6, generator=g, dtype=torch.float64) * 1e-3 for _ in range(4))
    theirs = -F.logsigmoid(-0.5 * 2000 * ((mse_w - mse_l) - (ref_w - ref_l))).mean() + mse_w.mean()
    loss, _ = rpo(-mse_w, -mse_l, -ref_w, -ref_l, beta=1000, alpha=1.0)
    torch.testing.assert_close(loss.mean(), theirs.to(loss.dtype))


# ------------------------------------------------------------------------------------------------ training


def train_args(model_dir, data, out, *overrides):
    return ["train", f"model.pretrained={model_dir}", f"data.source={data}", f"data.audio_seconds={SECONDS}",
            "data.num_workers=0", "train.batch_size=2", "train.max_steps=2", "train.learning_rate=5e-2",
            "train.weight_decay=0", "train.logger=none", "train.checkpoint_every=0", "model.lora_rank=2",
            f"output.dir={out}", *overrides]


def test_dpo_lora_trains_through_the_cli_and_loads_back(tiny_tangoflux_dir, pairs_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    from diffusion_pref import cli

    out = tmp_path / "lora"
    assert cli.main(train_args(tiny_tangoflux_dir, pairs_path, out, "loss.name=rpo", "loss.beta=1000")) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    backbone = backbone_of(tiny_tangoflux_dir)
    kw = dict(steps=2, guidance_scale=4.5, duration=SECONDS, output_type="latent")
    base = backbone.sample(["rain"], [0], **kw)[0]
    x, t = torch.randn(1, 16, 8), torch.tensor([500])
    cond = backbone.conditioning(backbone.encode_prompts(["rain"]))
    backbone.load_lora(out)
    tuned = backbone.sample(["rain"], [0], **kw)[0]
    assert (tuned - base).abs().max() > 1e-4
    with torch.no_grad():
        ours = backbone.predict(x, t, cond)
    # diffusers' own reader of the Flux LoRA format gives the same transformer
    _, _, transformer, _, _ = raw_modules(tiny_tangoflux_dir)
    assert isinstance(transformer, FluxTransformer2DModel)
    transformer.load_lora_adapter(str(out), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        theirs = backbone.predict(x, t, cond, denoiser=transformer)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    backbone.unload_lora()
    torch.testing.assert_close(backbone.sample(["rain"], [0], **kw)[0], base, atol=1e-6, rtol=1e-6)


def test_full_finetune_writes_the_hub_layout(tiny_tangoflux_dir, pairs_path, tmp_path):
    from diffusion_pref.training.setup import Trainer

    out = tmp_path / "full"
    cfg = load_config(None, train_args(tiny_tangoflux_dir, pairs_path, out, "model.finetune=full", "loss.name=dpo",
                                       "train.learning_rate=1e-3", "data.cache=true",
                                       f"data.cache_dir={tmp_path / 'cache'}")[1:])
    trainer = Trainer(cfg)
    summary = trainer.train()
    assert summary["output"] == "pipeline"
    assert {"config.json", "tangoflux.safetensors", "vae.safetensors"} <= {p.name for p in out.iterdir()}
    trained = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    loaded = backbone_of(out)
    for name, value in loaded.denoiser.state_dict().items():
        torch.testing.assert_close(value, trained[name], msg=name)
    base = backbone_of(tiny_tangoflux_dir).denoiser.state_dict()
    assert any(not torch.equal(base[n], v) for n, v in loaded.denoiser.state_dict().items())
    assert np.isfinite(loaded.sample(["rain"], [0], steps=2, guidance_scale=4.5, duration=SECONDS)[0]).all()


@pytest.mark.parametrize("loss", sorted(__import__("diffusion_pref.losses", fromlist=["LOSSES"]).LOSSES))
def test_every_loss_trains_tangoflux_lora(loss, tiny_tangoflux_dir, pairs_path, tmp_path):
    from diffusion_pref.losses import TAKES_SOFT_LABEL
    from diffusion_pref.training.setup import Trainer

    soft = ["data.soft_labels=label"] if loss in TAKES_SOFT_LABEL else []
    trainer = Trainer(load_config(None, train_args(tiny_tangoflux_dir, pairs_path, tmp_path, f"loss.name={loss}",
                                                   "train.max_steps=1", *soft)[1:]))
    denoiser = trainer.accelerator.unwrap_model(trainer.unet)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    assert trainer.train()["steps"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    params = dict(denoiser.named_parameters())
    assert any(not torch.equal(params[n], p) for n, p in before.items()), f"{loss}: nothing trained"


@pytest.mark.parametrize("kind", ["ddim"])
def test_smpo_inverted_trajectories_train_tangoflux(kind, tiny_tangoflux_dir, pairs_path, tmp_path):
    """SmPO along the flow model's inverted Euler trajectory, through the one loop."""
    from diffusion_pref.training.setup import Trainer

    trainer = Trainer(load_config(None, train_args(tiny_tangoflux_dir, pairs_path, tmp_path, "loss.name=smpo",
                                                   "data.soft_labels=label", f"trajectory.kind={kind}",
                                                   "trajectory.steps=4", "train.max_steps=1")[1:]))
    assert trainer.train()["steps"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_crpo_recipe_trains_the_tiny_model_through_the_cli(tiny_tangoflux_dir, pairs_path, tmp_path):
    """configs/tangoflux_crpo.yaml as shipped (full fine-tuning, frozen copy as reference, rpo with beta 1000 and
    alpha 1: TangoFlux's CRPO loss), on the tiny model for one step; the output is the hub layout again."""
    from pathlib import Path

    from diffusion_pref import cli

    recipe = Path(__file__).parent.parent / "configs" / "tangoflux_crpo.yaml"
    code = cli.main(["train", "--config", str(recipe), f"model.pretrained={tiny_tangoflux_dir}",
                     f"data.source={pairs_path}", f"data.audio_seconds={SECONDS}", "data.num_workers=0",
                     "train.batch_size=2", "train.max_steps=1", "train.logger=none", f"output.dir={tmp_path}"])
    assert code == 0
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["output"] == "pipeline" and summary["beta"] == 1000 and summary["reference"] == "copy"
    assert backbone_of(tmp_path).family == "tangoflux"


def test_crpo_round_generate_with_clap_then_train(tiny_tangoflux_dir, tmp_path):
    """CRPO's loop through the standard commands: the model's own samples ranked by CLAP (a tiny random CLAP here),
    best vs worst, stored at 44.1 kHz, then DPO on them."""
    import pyarrow.parquet as pq

    from diffusion_pref.audio import read_audio
    from diffusion_pref.commands.generate import generate
    from diffusion_pref.testing.rewards import save_tiny_clap
    from diffusion_pref.training.setup import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barking\nrain on the street\n")
    clap = save_tiny_clap(tmp_path / "clap")
    summary = generate(load_config(None, [
        f"model.pretrained={tiny_tangoflux_dir}", f"generate.prompts={prompts}", "generate.samples_per_prompt=3",
        "generate.strategy=best_vs_worst", "generate.min_gap=0", "sample.steps=2", "sample.guidance_scale=4.5",
        "sample.batch_size=3", "runtime.device=cpu", "reward.models={clap: 1.0}", f"reward.pretrained={{clap: {clap}}}",
        f"output.dir={tmp_path / 'pairs'}"]))
    assert summary["samples"] == 6 and summary["pairs_written"] >= 1
    table = pq.read_table(sorted((tmp_path / "pairs").glob("pairs-*.parquet"))).to_pydict()
    wave, rate = read_audio(table["chosen"][0])
    assert rate == RATE and wave.shape == (int(0.7 * RATE),)  # the tiny model's default duration (max_duration)
    out = tmp_path / "train"
    result = Trainer(load_config(None, train_args(tiny_tangoflux_dir, tmp_path / "pairs", out, "loss.name=rpo",
                                                  "loss.beta=1000", "train.max_steps=1", "train.batch_size=1")[1:])
                     ).train()
    assert result["steps"] == 1 and (out / "pytorch_lora_weights.safetensors").is_file()


def test_cache_key_changes_when_the_weights_are_rewritten_in_place(tiny_tangoflux_dir, tmp_path):
    """A TangoFlux folder has neither model_index.json nor stft_config.json: its cache key must still see its
    weights rewritten in place (a fine-tune saved over the folder), or a cache of the old weights would be reused."""
    import os
    import shutil

    from diffusion_pref.data.cache import model_identity

    folder = tmp_path / "tf"
    shutil.copytree(tiny_tangoflux_dir, folder)
    cfg = load_config(None, [f"model.pretrained={folder}"]).model
    before = model_identity(cfg)
    weights = folder / "tangoflux.safetensors"
    stat = weights.stat()
    os.utime(weights, (stat.st_atime, stat.st_mtime + 10))
    assert model_identity(cfg) != before

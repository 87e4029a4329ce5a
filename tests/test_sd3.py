"""SD3 (rectified flow, MMDiT) as a backbone: loading, the flow arithmetic, encoders, predict, training, outputs.

Tiny random-weight SD3 pipelines from ``diffusion_pref.testing`` (latents ``[B, 16, 8, 8]``, 32x32 images), with
and without T5. Every number is checked against diffusers' own pieces (``FlowMatchEulerDiscreteScheduler``, the
pipeline's ``encode_prompt`` and sampler, the VAE) or a formula written out here; training runs 1-2 steps of
batch 1, so the file stays within seconds per test on a CPU.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from diffusion_pref.config import load_config
from diffusion_pref.training.setup import Trainer  # the one place that names the training module

sys.path.insert(0, str(Path(__file__).parent))
from helpers import backbone_of, read_metrics, train_config  # noqa: E402
from test_data import write_pairs  # noqa: E402


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", n=4)


def make_cfg(model_dir, data, out, *overrides):
    return train_config(model_dir, data, out, *overrides, batch_size=1, learning_rate="1e-2")


# ------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("t5", [True, False])
def test_tiny_sd3_loads_through_load_backbone(t5, sd3_dir, tiny_sd3_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffusion_pref.pipelines import detect_family, load_backbone
    from diffusion_pref.pipelines.base import Backbone
    from diffusion_pref.pipelines.sd3 import SD3Backbone

    model_dir = sd3_dir if t5 else tiny_sd3_dir
    assert detect_family(load_config(None, [f"model.pretrained={model_dir}"]).model) == "sd3"
    assert detect_family(load_config(None, [f"model.pretrained={model_dir}", "model.family=sd3"]).model) == "sd3"
    backbone = backbone_of(model_dir)
    assert isinstance(backbone, SD3Backbone) and backbone.family == "sd3"
    assert isinstance(backbone.denoiser, SD3Transformer2DModel)
    assert isinstance(backbone.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    names = ["vae", "text_encoder", "text_encoder_2"] + (["text_encoder_3"] if t5 else [])
    assert list(backbone.frozen) == names
    assert backbone.schedule.prediction_type == "flow"
    assert backbone.schedule.num_train_timesteps == 1000
    assert backbone.default_lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert isinstance(backbone, Backbone) and backbone.sample_rate is None
    assert backbone.frozen_dtype == {"vae": torch.float32}
    for name in ("load", "encode", "decode", "encode_prompts", "prompts_cut", "token_limit", "conditioning",
                 "predict", "sample", "load_lora", "unload_lora", "save_lora", "save_full", "to"):
        assert callable(getattr(backbone, name)), name
    half = load_backbone(load_config(None, [f"model.pretrained={model_dir}"]).model, dtype=torch.bfloat16)
    assert {m.dtype for m in (half.denoiser, *half.frozen.values())} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ the flow


def test_flow_schedule_matches_diffusers_flow_match_scheduler(sd3_dir):
    """Index i <-> the scheduler's training sigmas read from the clean end; x_t as its scale_noise; sigma * 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = backbone_of(sd3_dir).schedule
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    t = torch.arange(1000)
    a, b = schedule.coefficients(t)
    sigmas = ref.sigmas[:1000].flip(0)  # diffusers lists them noisiest first
    torch.testing.assert_close(b, sigmas.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(a, 1 - sigmas.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(schedule.model_timestep(t), ref.timesteps.flip(0).float(), rtol=1e-6, atol=1e-4)
    # by hand at both ends: s = 1/1000 -> 3s / (1 + 2s); s = 1 -> 1
    assert float(b[0]) == pytest.approx(0.003 / 1.002, rel=1e-6) and float(b[-1]) == pytest.approx(1.0)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    idx = torch.tensor([0, 500, 999])
    want = torch.stack([ref.scale_noise(x0[i:i + 1], ref.timesteps[999 - int(k)].reshape(1), noise[i:i + 1])[0]
                        for i, k in enumerate(idx)])
    torch.testing.assert_close(schedule.add_noise(x0, noise, idx), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.target(x0, noise, idx), noise - x0)


def test_forward_pairs_on_the_flow_give_dpo_the_velocity_error(sd3_dir):
    """Forward trajectory on SD3's schedule: x_t = (1 - sigma) x0 + sigma eps with eps and t shared by a pair, target
    eps - x0; the log-likelihood estimate every loss gets is -mean((v_pred - (eps - x0))^2), unweighted."""
    from diffusion_pref.losses import denoising_log_likelihood
    from diffusion_pref.trajectories import make_trajectory

    schedule = backbone_of(sd3_dir).schedule
    g = torch.Generator().manual_seed(0)
    w, l = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    traj = make_trajectory("forward", schedule, w, l, generator=torch.Generator().manual_seed(1))
    x0 = torch.cat([w, l])
    assert torch.equal(traj.t[:3], traj.t[3:]) and torch.equal(traj.noise[:3], traj.noise[3:])
    sigma = (3 * (traj.t.double() + 1) / 1000 / (1 + 2 * (traj.t.double() + 1) / 1000)).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(traj.x_t, (1 - sigma) * x0 + sigma * traj.noise)
    torch.testing.assert_close(traj.target, traj.noise - x0)
    v_pred = torch.randn(6, 16, 8, 8, generator=g)
    want = -((v_pred - (traj.noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(denoising_log_likelihood(v_pred, traj.target), want)


# ------------------------------------------------------------------------------------------------ encoders


def test_encode_and_decode_use_the_vae_shift_and_scaling_factors(sd3_dir):
    backbone = backbone_of(sd3_dir)
    vae = backbone.pipe.vae
    assert (vae.config.latent_channels, vae.config.shift_factor, vae.config.scaling_factor) == (16, 0.0609, 1.5305)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = backbone.encode(pixels)
    assert latents.shape == (2, 16, 8, 8)
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
        torch.testing.assert_close(latents, (mode - 0.0609) * 1.5305)
        # decode inverts the scaling exactly as the pipeline does before vae.decode
        torch.testing.assert_close(backbone.decode(latents), vae.decode(mode).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t5", [True, False])
def test_encode_prompts_are_clip_states_padded_to_t5_width_then_t5(t5, sd3_dir, tiny_sd3_dir):
    """SD3's layout written out: CLIP-L and CLIP-G penultimate states side by side, zero-padded to the joint width,
    followed by T5's last hidden state (zeros without T5); pooled = both CLIP projections side by side."""
    backbone = backbone_of(sd3_dir if t5 else tiny_sd3_dir)
    pipe = backbone.pipe
    prompts = ["a red cat", "a small blue house in the city"]
    text = backbone.encode_prompts(prompts)
    clip_len, joint, seq = 16, 96, backbone.max_sequence_length
    # T5: the tiny tokenizer's limit of 32 cuts the pipeline's default 256; without T5 the pipeline's 256 zero rows
    assert seq == (32 if t5 else 256)
    assert text["prompt_embeds"].shape == (2, clip_len + seq, joint)
    assert text["pooled_prompt_embeds"].shape == (2, 32 + 48)
    with torch.no_grad():
        states, pooled = [], []
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.nn.functional.pad(torch.cat(states, -1), (0, joint - 80))
        if t5:
            ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=seq, truncation=True,
                                   return_tensors="pt").input_ids
            t5_states = pipe.text_encoder_3(ids)[0]
        else:
            t5_states = torch.zeros(2, seq, joint)
    torch.testing.assert_close(text["prompt_embeds"], torch.cat([clip, t5_states], 1))
    torch.testing.assert_close(text["pooled_prompt_embeds"], torch.cat(pooled, -1))
    assert backbone.conditioning(text).keys() == {"encoder_hidden_states", "pooled_projections"}
    assert backbone.prompts_cut(["a red cat", "cat " * 40]) == [False, True]
    assert backbone.token_limit() == 16


# ------------------------------------------------------------------------------------------------- predict


def test_predict_is_the_velocity_the_pipeline_samples_with(sd3_dir):
    """One Euler step of the pipeline from sigma 1 to 0 without guidance is x - v(x, 1000): predict at index 999
    must give the same v, so the timestep scale and the conditioning keys are the pipeline's."""
    backbone = backbone_of(sd3_dir)
    text = backbone.encode_prompts(["a red cat", "a dog"])
    cond = backbone.conditioning(text)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = backbone.predict(noise, torch.tensor([999, 999]), cond)
        assert v.shape == (2, 16, 8, 8)
        want = backbone.pipe(prompt_embeds=text["prompt_embeds"], pooled_prompt_embeds=text["pooled_prompt_embeds"],
                             latents=noise, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                             height=32, width=32).images
        torch.testing.assert_close(noise - v, want, rtol=1e-5, atol=1e-5)
        # index 0 tells the transformer sigma_0 * 1000, not 0 or 1
        sigma0 = 3 * 0.001 / (1 + 2 * 0.001)
        direct = backbone.denoiser(hidden_states=noise, timestep=torch.full((2,), sigma0 * 1000),
                                   encoder_hidden_states=cond["encoder_hidden_states"],
                                   pooled_projections=cond["pooled_projections"]).sample
        torch.testing.assert_close(backbone.predict(noise, torch.tensor([0, 0]), cond), direct)


def test_sample_draws_each_image_from_its_own_seed(sd3_dir):
    backbone = backbone_of(sd3_dir)
    both = backbone.sample(["a red cat", "a dog"], [3, 4], steps=2, guidance_scale=2.0, resolution=32, output_type="pt")
    one = backbone.sample(["a dog"], [4], steps=2, guidance_scale=2.0, resolution=32, output_type="pt")
    assert len(both) == 2 and both[0].shape == (3, 32, 32) and both.blocked == [False, False]
    torch.testing.assert_close(both[1], one[0], rtol=1e-5, atol=1e-5)
    # another diffusers scheduler for one call, then the model's own again
    other = backbone.sample(["a dog"], [4], steps=2, guidance_scale=2.0, resolution=32, output_type="pt",
                            scheduler="FlowMatchHeunDiscreteScheduler")
    assert not torch.allclose(other[0], one[0])
    assert type(backbone.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pil = backbone.sample(["a dog"], [4], steps=1, guidance_scale=1.0, resolution=32)
    assert pil[0].size == (32, 32)
    with pytest.raises(ValueError, match="sample.safety_checker"):
        backbone.sample(["a"], [0], steps=1, guidance_scale=1.0, safety_checker=True)


# ------------------------------------------------------------------------------------------------ training


def snapshot(named):
    return {n: p.detach().clone() for n, p in named}


def test_dpo_trains_the_lora_not_the_reference_and_the_lora_loads_in_diffusers(sd3_dir, pairs_path, tmp_path):
    """Two DPO steps on forward (velocity) trajectories: LoRA weights move, the transformer's own weights (the
    adapter reference) and the frozen encoders do not; step 1 is at log 2 exactly (reference = adapter off). The
    saved file loads with StableDiffusion3Pipeline.load_lora_weights at the trained scale (alpha 4 at rank 2)."""
    from diffusers import StableDiffusion3Pipeline

    trainer = Trainer(make_cfg(sd3_dir, pairs_path, tmp_path, "model.lora_alpha=4"))
    model = trainer.accelerator.unwrap_model(trainer.unet)
    assert model is trainer.backbone.denoiser
    trainable = snapshot((n, p) for n, p in model.named_parameters() if p.requires_grad)
    frozen = snapshot((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    for name, module in trainer.backbone.frozen.items():
        frozen.update(snapshot((f"{name}.{n}", p) for n, p in module.named_parameters()))
    assert trainable and all("lora" in n for n in trainable)
    assert any(".attn.to_q." in n for n in trainable) and not any("add_q_proj" in n for n in trainable)
    trainer.train()

    rows = read_metrics(tmp_path)
    assert rows[0]["mse_w"] == rows[0]["ref_mse_w"] and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in rows)
    params = dict(model.named_parameters())
    for name, module in trainer.backbone.frozen.items():
        params.update({f"{name}.{n}": p for n, p in module.named_parameters()})
    assert not [n for n, p in trainable.items() if torch.equal(params[n], p)]
    assert not [n for n, p in frozen.items() if not torch.equal(params[n], p)]

    model.eval()
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    kwargs = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 48, 96, generator=g),
                  pooled_projections=torch.randn(1, 80, generator=g))

    def image():
        return pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=32,
                    width=32, max_sequence_length=32, output_type="pt").images

    with torch.no_grad():
        base, base_out = image(), pipe.transformer(x, **kwargs).sample
        want = model(x, **kwargs).sample
        pipe.load_lora_weights(str(tmp_path))
        tuned, got = image(), pipe.transformer(x, **kwargs).sample
    delta = (want - base_out).abs().max().item()
    assert delta > 1e-3 * base_out.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * delta  # a wrong scale (alpha = rank) would be off by delta / 2
    assert not torch.allclose(base, tuned)


def test_full_finetune_saves_an_sd3_pipeline_with_the_trained_transformer(tiny_sd3_dir, pairs_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    trainer = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path, "model.finetune=full", "train.max_steps=1",
                               "train.learning_rate=1e-4"))
    model = trainer.accelerator.unwrap_model(trainer.unet)
    ref_before = snapshot(trainer.ref_unet.named_parameters())
    trainer.train()
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_unet.named_parameters())
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    saved = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(saved[n], p.detach()) for n, p in model.named_parameters())
    assert backbone_of(tmp_path).family == "sd3"  # the written folder is a backbone again


def test_ddim_trajectories_run_on_sd3(tiny_sd3_dir, pairs_path, tmp_path):
    """Euler inversion along the flow (trajectory.kind=ddim) once trajectories take a Schedule (issue 14)."""
    pytest.importorskip("diffusion_pref.schedules")
    trainer = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path, "trajectory.kind=ddim", "trajectory.steps=2",
                               "train.max_steps=1"))
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_init_lora_continues_an_sd3_lora(tiny_sd3_dir, pairs_path, tmp_path):
    """train.init_lora (iterate's rounds) reads the transformer LoRA save_lora wrote, at its alpha."""
    from diffusion_pref.config import ConfigError
    first = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path / "a", "model.lora_alpha=4", "train.max_steps=1"))
    first.train()
    trained = snapshot((n, p) for n, p in first.accelerator.unwrap_model(first.unet).named_parameters()
                       if p.requires_grad)
    second = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path / "b", "model.lora_alpha=4",
                              f"train.init_lora={tmp_path / 'a'}"))
    started = dict(second.accelerator.unwrap_model(second.unet).named_parameters())
    assert trained and all(torch.equal(started[n], p) for n, p in trained.items())
    with pytest.raises(ConfigError, match="lora_alpha=4"):
        Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path / "c", f"train.init_lora={tmp_path / 'a'}"))


def test_cached_sd3_training_matches_uncached(tiny_sd3_dir, pairs_path, tmp_path):
    """data.cache stores SD3's encode_prompts rows (prompt_embeds and pooled_prompt_embeds) and latents; step 1's
    numbers equal the uncached run's up to the VAE's batch-size rounding (see test_train's cache test)."""
    Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path / "plain", "train.max_steps=1")).train()
    cached = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path / "cached", "train.max_steps=1", "data.cache=true",
                              f"data.cache_dir={tmp_path / 'cache'}"))
    batch = cached.make_batch(cached.source.order(0)[:1])
    assert {"text.prompt_embeds", "text.pooled_prompt_embeds"} <= set(batch)
    assert batch["latents_w"].shape == (1, 16, 8, 8)
    cached.train()
    a, b = read_metrics(tmp_path / "plain")[0], read_metrics(tmp_path / "cached")[0]
    for key in ("loss", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_validation_images_during_sd3_training(tiny_sd3_dir, pairs_path, tmp_path):
    trainer = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path, "train.max_steps=1", "train.validate_every=1",
                               "train.validation_prompts=[a red cat]", "sample.steps=1"))
    trainer.train()
    folder = tmp_path / "validation" / "step-00000001"
    assert sorted(p.name for p in folder.iterdir()) == ["00_base.png", "00_tuned.png"]


def test_bf16_training_keeps_the_sd3_vae_in_fp32(tiny_sd3_dir, pairs_path, tmp_path):
    trainer = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path, "runtime.dtype=bf16", "train.max_steps=1"))
    frozen = trainer.backbone.frozen
    assert frozen["vae"].dtype == torch.float32
    assert frozen["text_encoder"].dtype == frozen["text_encoder_2"].dtype == torch.bfloat16
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


class _RedMean:
    """Score = mean red value in [0, 1], known from the image alone (a stand-in reward model)."""

    name = "red"
    scale = "[0, 1]"

    def score(self, prompts, images):
        import numpy as np

        return torch.tensor([np.asarray(im, dtype=np.float64)[..., 0].mean() / 255 for im in images],
                            dtype=torch.float64)


def test_the_whole_loop_on_sd3_generate_train_evaluate(tiny_sd3_dir, tmp_path):
    """generate (pairs sampled by SD3, ranked by a reward) -> train a DPO LoRA on them -> evaluate base vs tuned,
    every step through the commands' own code with an SD3 model."""
    from diffusion_pref.commands.evaluate import run as evaluate
    from diffusion_pref.commands.generate import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue house\n")
    pairs = tmp_path / "pairs"
    generate(load_config(None, [
        f"model.pretrained={tiny_sd3_dir}", f"output.dir={pairs}", f"generate.prompts={prompts}", "sample.steps=2",
        "generate.samples_per_prompt=2", "sample.batch_size=4", "sample.resolution=32"]), reward=_RedMean())
    assert list(pairs.glob("*.parquet"))
    Trainer(make_cfg(tiny_sd3_dir, pairs, tmp_path / "lora", "train.max_steps=2")).train()
    metrics = evaluate(load_config(None, [
        f"model.pretrained={tiny_sd3_dir}", f"eval.prompts={prompts}", "eval.seeds=[0,1]", "sample.steps=2",
        "sample.resolution=32", "eval.bootstrap_samples=50", "reward.models={red: 1.0}", f"output.dir={tmp_path / 'eval'}",
        f"eval.variants={{base: base, tuned: {tmp_path / 'lora'}}}"]), scorers={"red": _RedMean()})
    assert metrics["variants"] == ["base", "tuned"]
    base, tuned = (metrics["scores"]["red"][v]["mean"] for v in ("base", "tuned"))
    assert math.isfinite(base) and math.isfinite(tuned) and base != tuned  # the LoRA was applied when sampling


def test_invert_command_euler_inverts_and_reconstructs_on_sd3(tiny_sd3_dir, tmp_path):
    """`diffusion-pref invert` with trajectory.kind=ddim on SD3: Euler inversion along the flow, then Euler
    sampling back. Euler is first order, so the latent round-trip error falls about in proportion to the step
    size: 10x the steps must cut it at least 4-fold (measured: 4 steps 0.075, 50 steps 0.0065 on a noise image)."""
    import numpy as np
    from PIL import Image

    from diffusion_pref.commands.invert import run as invert

    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(image)
    rmse = {}
    for steps in (4, 40):
        out = tmp_path / f"out{steps}"
        invert(load_config(None, [f"model.pretrained={tiny_sd3_dir}", "trajectory.kind=ddim",
                                  f"invert.image={image}", "invert.prompt=a red cat",
                                  f"trajectory.steps={steps}", "data.resolution=32", f"output.dir={out}"]))
        metrics = json.loads((out / "invert_metrics.json").read_text())
        assert metrics["grid"][-1] == 999 and len(metrics["grid"]) == steps  # ends at pure noise (sigma 1)
        rmse[steps] = metrics["latent_rmse"]
    assert 0 < rmse[40] < rmse[4] / 4


@pytest.mark.parametrize("choice", ["uniform", "mode"])
def test_trajectory_timestep_sampling_reaches_the_flow_schedule(choice, tiny_sd3_dir, pairs_path, tmp_path):
    trainer = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path, f"trajectory.timestep_sampling={choice}",
                               "trajectory.mode_scale=0.5"))
    schedule = trainer.backbone.schedule
    assert (schedule.timestep_sampling, schedule.mode_scale, schedule.shift) == (choice, 0.5, 3.0)
    auto = Trainer(make_cfg(tiny_sd3_dir, pairs_path, tmp_path / "auto")).backbone.schedule
    assert auto.timestep_sampling == "logit_normal"  # SD3's own


def test_timestep_sampling_of_a_ddpm_model_is_refused(tiny_sd_dir, pairs_path, tmp_path):
    from diffusion_pref.config import ConfigError

    with pytest.raises(ConfigError, match="trajectory.timestep_sampling=logit_normal .* draws them uniformly"):
        Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "trajectory.timestep_sampling=logit_normal"))

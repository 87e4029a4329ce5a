"""Trainer variants: SDXL (two text encoders, size/crop micro-conditioning), SmPO soft labels from score
columns, and inversion trajectories (ddim) wired into the loop."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from diffusion_pref.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import assert_first_step_at_log2, make_cfg, read_metrics  # noqa: E402


def cfg_for(model_dir, data, out, *overrides):
    """The trainer tests' config, with a larger learning rate so one or two steps visibly move a tiny LoRA."""
    return make_cfg(model_dir, data, out, "train.learning_rate=1e-2", *overrides)


def test_sdxl_lora_trains_with_micro_conditioning_and_loads_into_the_sdxl_pipeline(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffusion_pref.pipelines.sdxl import SDXLBackbone
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4, size=(48, 40))
    trainer = Trainer(cfg_for(tiny_sdxl_dir, data, tmp_path / "out", "data.random_crop=true"))
    assert isinstance(trainer.backbone, SDXLBackbone)
    seen = []
    predict = trainer.backbone.predict

    def spy(x_t, t, cond, denoiser=None):
        seen.append(cond["time_ids"].clone())
        return predict(x_t, t, cond, denoiser=denoiser)

    trainer.backbone.predict = spy
    trainer.train()
    assert_first_step_at_log2(read_metrics(tmp_path / "out")[0], beta=2500, same_computation=True)
    time_ids = seen[0]  # [2B, 6]: (orig_h, orig_w, crop_y, crop_x, target_h, target_w), shared within a pair
    b = time_ids.shape[0] // 2
    assert torch.equal(time_ids[:b], time_ids[b:])
    assert time_ids[0, :2].tolist() == [40, 48] and time_ids[0, 4:].tolist() == [32, 32]

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),  # noqa: E731
                       output_type="pt").images
    base = run()
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert not torch.allclose(base, run())


def test_smpo_reads_soft_labels_from_score_columns(tiny_sd_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    scores = [(0.9, 0.1), (0.2, 0.6), (0.5, 0.4), (0.3, 0.8)]
    data = write_pairs(tmp_path / "p.parquet", n=4, scores=scores)
    trainer = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "out", "loss.name=smpo", "train.max_steps=1"))
    assert trainer.soft_labels is not None and (tmp_path / "out" / "soft_labels.json").is_file()
    # Labels alternate 1, 0: the stored winner's score gap is 0.8, 0.4, 0.1, 0.5 over the range [0.1, 0.9].
    p = trainer.soft_labels.lookup(torch.tensor([0, 1, 2, 3]))
    expected = torch.sigmoid(torch.tensor([0.8, 0.4, 0.1, 0.5]) / 0.8)
    assert torch.allclose(p, expected, atol=1e-6)
    trainer.train()
    assert math.isfinite(read_metrics(tmp_path / "out")[0]["loss"])

    label_only = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "out2", "loss.name=smpo", "data.soft_labels=label"))
    assert label_only.soft_labels is None


def test_ddim_inversion_trajectory_trains(tiny_sd_dir, tmp_path):
    from diffusion_pref.commands.train import run

    data = write_pairs(tmp_path / "p.parquet", n=4)
    run(cfg_for(tiny_sd_dir, data, tmp_path / "out", "trajectory.kind=ddim", "trajectory.steps=3"))
    rows = read_metrics(tmp_path / "out")
    assert_first_step_at_log2(rows[0], beta=2500, same_computation=True)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[1]["loss"] != rows[0]["loss"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_invert_with_chooses_the_model_that_inverts(tiny_sd_dir, tmp_path, monkeypatch, finetune):
    """invert_with=policy inverts with the model being trained, invert_with=reference with the frozen reference
    (adapter off, or the reference copy): probed at the second step, when the trained weights have moved."""
    from diffusers import UNet2DConditionModel

    from diffusion_pref import trajectories
    from diffusion_pref.training.setup import Trainer

    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    real = trajectories.make_trajectory
    probes = []

    def probing(kind, scheduler, latents_w, latents_l, *, predict_fn=None, cond=None, **kwargs):
        x = torch.cat([latents_w, latents_l])
        t = torch.full((x.shape[0],), 500)
        with torch.no_grad():
            probes.append((predict_fn(x, t, cond), base(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample))
        return real(kind, scheduler, latents_w, latents_l, predict_fn=predict_fn, cond=cond, **kwargs)

    monkeypatch.setattr(trajectories, "make_trajectory", probing)
    data = write_pairs(tmp_path / "p.parquet", n=4)
    extra = ["model.finetune=full", "model.reference=copy"] if finetune == "full" else []
    for mode in ("policy", "reference"):
        probes.clear()
        Trainer(cfg_for(tiny_sd_dir, data, tmp_path / mode, "trajectory.kind=ddim", "trajectory.steps=3",
                        f"trajectory.invert_with={mode}", *extra)).train()
        inverting, frozen = probes[1]  # step 2: the policy has had one update
        assert torch.allclose(inverting, frozen, atol=1e-5) == (mode == "reference")


def test_invert_with_reference_needs_a_reference(tiny_sd_dir, tmp_path):
    from diffusion_pref.config import ConfigError
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    with pytest.raises(ConfigError, match="invert_with=reference needs a reference"):
        Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "out", "loss.name=sft", "trajectory.kind=ddim",
                        "trajectory.invert_with=reference"))


def test_validation_images_with_and_without_the_adapter(tiny_sd_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from diffusion_pref.commands.train import run

    data = write_pairs(tmp_path / "p.parquet", n=4)
    run(cfg_for(tiny_sd_dir, data, tmp_path / "out", "train.max_steps=1", "train.validate_every=1",
                "train.validation_prompts=[a red cat, a blue dog]", "sample.steps=2", "train.logger=tensorboard"))
    events = list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 1000  # scalars and images reached TensorBoard
    folder = tmp_path / "out" / "validation" / "step-00000001"
    assert sorted(p.name for p in folder.iterdir()) == ["00_base.png", "00_tuned.png", "01_base.png", "01_tuned.png"]
    base, tuned = (np.asarray(Image.open(folder / f"00_{k}.png"), dtype=np.int16) for k in ("base", "tuned"))
    assert base.shape == (32, 32, 3) and np.abs(base - tuned).max() > 0


def test_bf16_grad_accum_checkpointing_adafactor_and_warmup_schedule(tiny_sd_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=8)
    trainer = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "out", "runtime.dtype=bf16", "train.grad_accum=2",
                              "train.gradient_checkpointing=true", "train.optimizer=adafactor",
                              "train.lr_scheduler=linear", "train.warmup_steps=1", "train.max_steps=3"))
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert unet.is_gradient_checkpointing
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}  # fp32 adapter
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}  # half frozen base
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    trainer.train()
    # Checkpointed blocks still pass gradients to the adapter (a reentrant checkpoint would silently drop them).
    assert all(not torch.equal(p, before[n]) for n, p in unet.named_parameters() if p.requires_grad)
    rows = read_metrics(tmp_path / "out")
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Linear warmup over 1 step (the first update has lr 0), then linear decay to 0 at step 3.
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 5e-3, 0.0])
    # 3 steps x 2 micro-batches of 2 pairs = 6 batches; an epoch of 8 pairs has 4.
    assert rows[0]["epoch"] == 0 and (trainer.epoch, trainer.next_index) == (1, 2)


def _adapted_layers(trainer):
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return [m for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled")]


def test_half_precision_lora_skips_peft_input_casts_without_changing_the_step(tiny_sd_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    fp32 = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "fp32"))
    assert _adapted_layers(fp32) and all(m.cast_input_dtype_enabled for m in _adapted_layers(fp32))  # peft's default

    runs = {}
    for name, cast in (("skipped", False), ("peft-cast", True)):
        trainer = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / name, "runtime.dtype=bf16"))
        assert not any(m.cast_input_dtype_enabled for m in _adapted_layers(trainer))
        for m in _adapted_layers(trainer):  # the reference: peft's behaviour, casting each input to fp32
            m.cast_input_dtype_enabled = cast
        trainer.train()
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    # Autocast computes the adapter's matmuls in bf16 either way, so the casts change nothing but the memory traffic.
    assert runs["skipped"] == runs["peft-cast"]


def test_removed_channels_last_says_why(tiny_sd_dir, tmp_path):
    from diffusion_pref.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.channels_last was removed: measured slower .*1.74x.*1.94x"):
        cfg_for(tiny_sd_dir, write_pairs(tmp_path / "p.parquet", n=4), tmp_path / "out", "train.channels_last=true")


def test_cache_command_then_cached_training_reuses_it(tiny_sd_dir, tmp_path):
    from diffusion_pref.commands import cache
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    overrides = ("data.cache=true", f"data.cache_dir={tmp_path / 'cache'}")
    cache.run(cfg_for(tiny_sd_dir, data, tmp_path / "out", *overrides))
    [built] = list((tmp_path / "cache").iterdir())
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["pairs"] == 4 and manifest["key"]["augmentation"]["resolution"] == 32
    stamp = (built / "manifest.json").stat().st_mtime_ns
    trainer = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "out", *overrides, "train.max_steps=1"))
    # Cached training must run neither the VAE nor the text encoder.
    vae, text_encoder = trainer.backbone.frozen["vae"], trainer.backbone.frozen["text_encoder"]
    vae.forward = vae.encode = text_encoder.forward = None
    trainer.train()
    assert (built / "manifest.json").stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("t_mode", ["grid_below", "exact", "smpo_released"])
def test_cached_reference_inversion_trains_like_inverting_in_the_step(tiny_sd_dir, tmp_path, monkeypatch, t_mode):
    """trajectory.cache_inverted: the reference model's inversion of every pair, stored once by `diffusion-pref
    cache`, gives the losses of inverting with the reference in each step, with at most one inversion step left
    per training step (none for grid_below)."""
    from safetensors.torch import load_file

    from diffusion_pref import trajectories
    from diffusion_pref.commands import cache
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    # hard labels (no score columns) and beta 2500: the settings these tolerances were set for
    flags = ["loss.name=smpo", "data.soft_labels=label", "loss.beta=2500",
             "trajectory.kind=renoise", "trajectory.steps=5", f"trajectory.t_mode={t_mode}",
             "trajectory.invert_with=reference", "train.max_steps=3"]
    cached_flags = ["data.cache=true", f"data.cache_dir={tmp_path / 'cache'}", "trajectory.cache_inverted=true"]
    cache.run(cfg_for(tiny_sd_dir, data, tmp_path / "cached", *flags, *cached_flags))
    [built] = list((tmp_path / "cache").iterdir())
    shard = load_file(str(next(built.glob("shard-*.safetensors"))))
    assert shard["inverted_w"].shape == (4, 5, *shard["latents_w"].shape[1:])  # every grid point, each pair
    assert shard["inverted_w"].dtype == torch.float32

    calls = []
    real = trajectories._invert

    def counting(*args, **kwargs):
        calls.append(int(args[5].max()) if len(args[5]) else 0)  # the longest path of this inversion
        return real(*args, **kwargs)

    monkeypatch.setattr(trajectories, "_invert", counting)
    runs = {}
    for name, extra in (("in the step", []), ("cached", cached_flags)):
        calls.clear()
        trainer = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / name.replace(" ", "_"), *flags, *extra))
        trainer.train()
        runs[name] = [v for r in read_metrics(trainer.out) for v in (r["loss"], r["mse_w"], r["ref_mse_l"])]
        steps = list(calls)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the trainer reused what `cache` built
    assert max(steps) == (1 if t_mode == "exact" else 0)  # inversion steps left per training step (cached run)
    assert runs["cached"] == pytest.approx(runs["in the step"], rel=1e-4, abs=1e-6)


def test_cache_inverted_needs_the_cache_and_the_reference(tiny_sd_dir, tmp_path):
    from diffusion_pref.config import ConfigError
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    base = ["trajectory.kind=renoise", "trajectory.cache_inverted=true"]
    for extra in (["trajectory.invert_with=reference"], ["data.cache=true"],
                  ["data.cache=true", "trajectory.invert_with=reference", "trajectory.kind=forward"]):
        with pytest.raises(ConfigError, match="cache_inverted=true"):
            Trainer(cfg_for(tiny_sd_dir, data, tmp_path / "out", *base, *extra))


def test_sdxl_full_finetune_with_cpu_reference_saves_a_loadable_pipeline(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=2)
    trainer = Trainer(cfg_for(tiny_sdxl_dir, data, tmp_path / "out", "model.finetune=full",
                              "model.reference=copy_cpu", "train.max_steps=1", "train.learning_rate=1e-4"))
    assert trainer.reference == "copy_cpu" and next(trainer.ref_unet.parameters()).device.type == "cpu"
    trainer.train()
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    trained = trainer.accelerator.unwrap_model(trainer.unet)
    assert all(torch.equal(p, trained.state_dict()[n]) for n, p in pipe.unet.state_dict().items())
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert not all(torch.equal(p, base.unet.state_dict()[n]) for n, p in pipe.unet.state_dict().items())


# Two of the four recipes (LoRA/SD1.5 with 8-bit Adam swapped for AdamW, full/SDXL with its Adafactor) keep the
# file fast; every recipe's keys are checked by load_config in test_config.
@pytest.mark.parametrize("recipe,model", [("sd15_dpo_lora", "sd"), ("sdxl_dpo_full", "sdxl")])
def test_recipes_run_on_tiny_models(recipe, model, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    from diffusion_pref.commands.train import run

    root = Path(__file__).parents[1]
    data = write_pairs(tmp_path / "p.parquet", n=2)
    cfg = load_config(root / "configs" / f"{recipe}.yaml", [
        f"model.pretrained={tiny_sd_dir if model == 'sd' else tiny_sdxl_dir}", "model.vae=null",
        f"data.source={data}", "data.resolution=32", "data.num_workers=0", "train.batch_size=1", "train.grad_accum=1",
        "train.max_steps=1", "runtime.dtype=fp32", "train.logger=none", f"output.dir={tmp_path / 'out'}",
        *(["train.optimizer=adamw"] if recipe.endswith("lora") else []),  # bitsandbytes is CUDA-only
    ])
    assert cfg.loss.beta == 2500 and cfg.train.gradient_checkpointing  # the recipe's own settings are in force
    run(cfg)
    # sdxl_dpo_full's reference is a frozen copy of the UNet: equal to the policy only up to rounding.
    assert_first_step_at_log2(read_metrics(tmp_path / "out")[0], beta=cfg.loss.beta,
                              same_computation=cfg.model.finetune == "lora")


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_compiled_unet_trains_like_the_eager_one_and_saves_the_same_outputs(tiny_sd_dir, tmp_path, finetune):
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    # aot_eager traces the graphs as inductor would (dynamo, the adapter switched off for the reference, autograd)
    # without generating code, so the compiled run must match the eager one to rounding.
    extra = ["model.finetune=full", "model.reference=copy"] if finetune == "full" else []
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["train.compile=true", "train.compile_backend=aot_eager"])):
        trainer = Trainer(cfg_for(tiny_sd_dir, data, tmp_path / name, *extra, *flags))
        unet = trainer.accelerator.unwrap_model(trainer.unet)
        compiled = [m for m in (unet, trainer.ref_unet) if m is not None]
        assert all((m._compiled_call_impl is not None) == bool(flags) for m in compiled)
        trainer.train()
        runs[name] = [v for r in read_metrics(tmp_path / name) for v in (r["loss"], r["mse_w"], r["ref_mse_l"])]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5, abs=1e-7)
    if finetune == "lora":  # the saved adapter has the plain key names (no compile wrapper in them)
        from safetensors.torch import load_file

        eager, compiled = (load_file(tmp_path / n / "pytorch_lora_weights.safetensors") for n in ("eager", "compiled"))
        assert eager.keys() == compiled.keys()
        assert all(torch.allclose(eager[k], compiled[k], atol=1e-6) for k in eager)

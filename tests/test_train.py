"""The trainer (diffusion_pref.training: setup, loop): every loss trains, reference handling, resume, cache, outputs, errors.

Tiny random-weight SD (8x8 latents) from ``diffusion_pref.testing``; a handful of pairs written as Pick-a-Pic
parquet by ``test_data.write_pairs``; 1-3 optimizer steps per run, so the file stays well under a minute of CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion_pref.config import load_config
from diffusion_pref.losses import LOSSES, TAKES_SOFT_LABEL

sys.path.insert(0, str(Path(__file__).parent))
from helpers import read_metrics, train_config  # noqa: E402
from test_data import write_pairs  # noqa: E402


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", n=8)


def make_cfg(model_dir, data, out, *overrides):
    return train_config(model_dir, data, out, *overrides, batch_size=2, learning_rate="1e-3")


FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
# Two float32 UNet forwards of the same weights held in other tensors (a full fine-tune's policy and its frozen
# copy) need not be the same sums: a CPU's kernels may split a reduction by memory alignment, SIMD width or thread
# count, and each reordered sum moves by a few ulps. Over the tiny UNet's layers the mean squared errors (of order
# 1) then differ by a few 1e-7 (2.4e-7 was measured on an AMD EPYC); 1e-5 of their size is far above that and far
# below what a reference with other weights gives (1e-2 and more).
MSE_ROUNDING = 1e-5


def assert_first_step_at_log2(row, beta, same_computation=False):
    """The first logged step of a DPO-style loss, taken with the policy equal to its reference, is at log 2.

    With the LoRA reference (the adapter switched off; its B starts at zero, so the policy's forward adds exact
    zeros to the same layers' outputs) policy and reference are the same computation: equal MSEs, exactly.
    Otherwise the MSEs agree up to rounding, and the loss -log sigmoid(beta h), h = (ref_w - mse_w) - (ref_l -
    mse_l), is log 2 - beta h / 2 to first order: beta (2500) amplifies each MSE's rounding into the loss. The
    bound is then beta / 2 times the measured |h| plus the float32 rounding of h itself (a few ulps of the MSEs).
    """
    if same_computation:
        assert row["mse_w"] == row["ref_mse_w"] and row["mse_l"] == row["ref_mse_l"]
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the float32 log 2 is within 3e-8
        return
    for side in ("w", "l"):
        assert row[f"mse_{side}"] == pytest.approx(row[f"ref_mse_{side}"], rel=MSE_ROUNDING, abs=0), side
    h = (row["ref_mse_w"] - row["mse_w"]) - (row["ref_mse_l"] - row["mse_l"])
    h_rounding = 4 * FLOAT32_EPS * (row["ref_mse_w"] + row["ref_mse_l"])
    assert row["loss"] == pytest.approx(math.log(2), abs=beta / 2 * (abs(h) + h_rounding) + 1e-6)


def snapshot(named):
    return {n: p.detach().clone() for n, p in named}


TINY_MODELS = {"sd": "tiny_sd_dir", "sdxl": "tiny_sdxl_dir", "sd3": "tiny_sd3_dir"}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_only_its_trainable_parameters(loss, family, pairs_path, tmp_path, request):
    """Every loss through the one training loop, on SD1.x (epsilon), SDXL and SD3 (flow matching, velocity)."""
    from diffusion_pref.training.setup import Trainer

    # the pairs have no score columns: smpo and sppo take p from the human labels here (no reward model to load)
    soft = ["data.soft_labels=label"] if loss in TAKES_SOFT_LABEL else []
    model_dir = request.getfixturevalue(TINY_MODELS[family])
    trainer = Trainer(make_cfg(model_dir, pairs_path, tmp_path, f"loss.name={loss}", *soft))
    assert trainer.backbone.family == family
    denoiser = trainer.accelerator.unwrap_model(trainer.unet)

    def frozen_params():
        return {f"{name}.{n}": p for name, module in trainer.backbone.frozen.items() for n, p in module.named_parameters()}

    trainable = snapshot((n, p) for n, p in denoiser.named_parameters() if p.requires_grad)
    frozen = snapshot((n, p) for n, p in denoiser.named_parameters() if not p.requires_grad)
    frozen.update(snapshot(frozen_params().items()))
    assert trainable and all("lora" in n for n in trainable)
    trainer.train()

    assert all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path))
    params = dict(denoiser.named_parameters())
    params.update(frozen_params())
    unchanged = [n for n, before in trainable.items() if torch.equal(params[n], before)]
    assert not unchanged, f"{loss}: trainable parameters did not change: {unchanged[:4]}"
    changed = [n for n, before in frozen.items() if not torch.equal(params[n], before)]
    assert not changed, f"{loss}: frozen/reference parameters changed: {changed[:4]}"
    expected_ref = "none" if loss in ("sft", "asft", "redi") else "adapter"
    assert trainer.reference == expected_ref
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_fresh_lora_starts_at_log2_and_half_accuracy(tiny_sd_dir, pairs_path, tmp_path):
    from diffusion_pref.commands.train import run

    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.max_steps=1"))
    first = read_metrics(tmp_path)[0]
    assert_first_step_at_log2(first, beta=2500, same_computation=True)
    assert first["implicit_acc"] == 0.5


def test_overfitting_a_few_pairs_drives_implicit_accuracy_to_one(tiny_sd_dir, tmp_path, monkeypatch):
    import diffusion_pref.training.loop as loop_module
    from diffusion_pref.commands.train import run

    # Hold noise and timestep fixed across steps: with a fresh t each step, a few steps of a random tiny UNet
    # are dominated by which t was drawn, and the test would measure luck instead of the optimisation.
    monkeypatch.setattr(loop_module, "derive_seed", lambda seed, micro: 1234)
    data = write_pairs(tmp_path / "four.parquet", n=4)
    run(make_cfg(tiny_sd_dir, data, tmp_path / "out", "train.batch_size=4", "train.max_steps=8",
                                "train.learning_rate=1e-2", "model.lora_rank=4", "data.shuffle=false"))
    metrics = read_metrics(tmp_path / "out")
    assert metrics[0]["implicit_acc"] == 0.5
    assert [m["implicit_acc"] for m in metrics[-3:]] == [1.0] * 3
    losses = [m["loss"] for m in metrics]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.3


def test_full_finetune_keeps_a_frozen_copy_and_saves_a_pipeline(tiny_sd_dir, pairs_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_pref.training.setup import Trainer

    trainer = Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "model.finetune=full", "train.learning_rate=1e-4"))
    assert trainer.reference == "copy"
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    before = snapshot(unet.named_parameters())
    ref_before = snapshot(trainer.ref_unet.named_parameters())
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in unet.named_parameters())  # weight_decay=0: only gradients move them
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_unet.named_parameters())
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    saved = dict(pipe.unet.named_parameters())
    assert all(torch.equal(saved[n], p.detach()) for n, p in unet.named_parameters())


def test_saved_lora_loads_into_a_diffusers_pipeline_and_changes_its_output(tiny_sd_dir, pairs_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_pref.commands.train import run

    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.learning_rate=1e-2"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    base = sample()
    pipe.load_lora_weights(str(tmp_path))
    tuned = sample()
    assert not torch.allclose(base, tuned)



def _unet_inputs(config, batch=2):
    """Fixed random inputs for a UNet of this config; SDXL's text_time conditioning gets pooled embeds and time ids."""
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g),
            torch.tensor([500] * batch), torch.randn(batch, 7, config.cross_attention_dim, generator=g))
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                      "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)}
    return args, extra


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_saved_lora_with_alpha_other_than_rank_loads_at_the_trained_scale(family, pairs_path, tmp_path, request):
    """lora_alpha=8 at rank 4 scales the adapter by 2 in training; diffusers' loader must apply the same 2.

    Without the adapter's config in the file, the loader assumes alpha = rank (scale 1) and the loaded UNet moves by
    half the trained delta. With it, trained and loaded UNets hold equal weights and the same scale, so they differ
    only where their float32 sums may be ordered differently (another attention processor): a few ulps of the output,
    far below the 1e-4 of the delta's size allowed here, and far below the half delta a wrong scale gives.
    """
    import diffusers

    from diffusion_pref.training.setup import Trainer

    model_dir = request.getfixturevalue("tiny_sd_dir" if family == "sd" else "tiny_sdxl_dir")
    trainer = Trainer(make_cfg(model_dir, pairs_path, tmp_path, "model.lora_rank=4", "model.lora_alpha=8",
                               "train.learning_rate=1e-2", "train.max_steps=1"))
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.unet).eval()
    args, extra = _unet_inputs(trained.config)
    pipeline_class = diffusers.StableDiffusionPipeline if family == "sd" else diffusers.StableDiffusionXLPipeline
    pipe = pipeline_class.from_pretrained(model_dir)
    with torch.no_grad():
        base = pipe.unet(*args, **extra).sample
        want = trained(*args, **extra).sample
        pipe.load_lora_weights(str(tmp_path))
        got = pipe.unet(*args, **extra).sample
    delta = (want - base).abs().max().item()
    assert delta > 1e-3 * base.abs().max().item()  # the adapter matters: a wrong scale would show
    assert (got - want).abs().max().item() <= 1e-4 * delta



def test_init_lora_continues_only_at_the_alpha_it_was_trained_with(tiny_sd_dir, pairs_path, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from diffusion_pref.config import ConfigError
    from diffusion_pref.training.setup import Trainer

    first = Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "a", "model.lora_alpha=4", "train.max_steps=1",
                             "train.learning_rate=1e-2"))
    first.train()
    saved = get_peft_model_state_dict(first.accelerator.unwrap_model(first.unet))
    with pytest.raises(ConfigError, match=r"train.init_lora=.* model.lora_alpha=4.0, not 2") as err:
        Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "b", f"train.init_lora={tmp_path / 'a'}"))
    assert "\n" not in str(err.value)
    same = Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "c", f"train.init_lora={tmp_path / 'a'}",
                            "model.lora_alpha=4"))
    start = get_peft_model_state_dict(same.accelerator.unwrap_model(same.unet))
    assert set(start) == set(saved) and all(torch.equal(start[k], saved[k]) for k in saved)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(os.environ["TEST_TORCH_THREADS"]))  # the parent's count: the same float reductions
    from diffusion_pref.config import load_config
    from diffusion_pref.training.setup import Trainer
    trainer = Trainer(load_config(None, sys.argv[1:]))
    save, encode = trainer.checkpointer.save, trainer.encode
    saved = []
    def save_then_mark(*a, **k):
        saved.append(save(*a, **k))
    def encode_or_die(batch):
        if saved:  # the first micro-step after a checkpoint: die mid-step, as a preempted job would
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(batch)
    trainer.checkpointer.save, trainer.encode = save_then_mark, encode_or_die
    trainer.train()
""")


def test_sigkill_after_checkpoint_then_resume_matches_an_uninterrupted_run(tiny_sd_dir, pairs_path, tmp_path):
    from safetensors.torch import load_file

    from diffusion_pref.commands.train import run

    args = lambda out, *extra: [f"model.pretrained={tiny_sd_dir}", f"data.source={pairs_path}",  # noqa: E731
                                "data.resolution=32", "train.batch_size=2", "train.max_steps=4",
                                "train.learning_rate=1e-3", "train.logger=none", "train.checkpoint_every=2",
                                "model.lora_rank=2", f"output.dir={out}", "runtime.seed=7", *extra]
    run(load_config(None, args(tmp_path / "straight")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "TEST_TORCH_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args(tmp_path / "killed")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]  # complete, renamed; no temporary folder left behind
    run(load_config(None, args(tmp_path / "killed", "train.resume=latest")))
    assert [m["step"] for m in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4]
    assert read_metrics(tmp_path / "killed")[3]["loss"] == pytest.approx(read_metrics(tmp_path / "straight")[3]["loss"],
                                                                        abs=1e-6)
    straight = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "killed" / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6, rtol=0), (
            name, (straight[name] - resumed[name]).abs().max().item())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in straight.items() if "lora_B" in k or "lora.up" in k)


def test_cached_and_uncached_runs_give_the_same_losses(tiny_sd_dir, pairs_path, tmp_path):
    from diffusion_pref.data.cache import build_cache, cache_dir, cache_key, cache_spec
    from diffusion_pref.commands.train import run
    from diffusion_pref.training.setup import Trainer

    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "plain"))
    cache_root = tmp_path / "cache"
    cfg = make_cfg(tiny_sd_dir, pairs_path, tmp_path / "cached", "data.cache=true", f"data.cache_dir={cache_root}")
    trainer = Trainer(cfg)
    trainer.train()
    plain, cached = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "cached")
    assert len(plain) == len(cached) == 2
    # The VAE run over a batch of 2 pairs and over a shard of 8 differs in the last float bits, and Adam's first
    # update (about lr * sign(grad)) turns that into visible differences for near-zero gradients: so step 1 must
    # match tightly, step 2 closely.
    for (a, b), rel in zip(zip(plain, cached), (1e-5, 1e-3)):
        for key in ("loss", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l"):
            assert a[key] == pytest.approx(b[key], rel=rel), key
    # And the cached inputs are what the uncached path computes for the same pairs.
    from diffusion_pref.data.loader import collate_pixels

    items = trainer.source.order(0)[:3]
    batch = collate_pixels(trainer.source, cfg.data, items, cfg.runtime.seed)
    for module in trainer.backbone.frozen.values():
        module.to("cpu")
    from_cache = trainer.make_batch(items)
    assert torch.equal(from_cache["rows"], batch["rows"])
    latents = trainer.backbone.encode(torch.cat([batch["pixels_w"], batch["pixels_l"]]))
    assert torch.allclose(torch.cat([from_cache["latents_w"], from_cache["latents_l"]]), latents, atol=1e-5)
    text = trainer.backbone.encode_prompts(batch["captions"])["encoder_hidden_states"]
    assert torch.allclose(from_cache["text.encoder_hidden_states"], text, atol=1e-5)
    [first_dir] = list(cache_root.iterdir())
    shards = sorted(first_dir.glob("shard-*.safetensors"))
    mtimes = [s.stat().st_mtime_ns for s in shards]

    # Same key: reused, nothing re-encoded. Another resolution: another key and a new cache.
    spec = cache_spec(cfg)  # the cache layer gets values: training's seed and precision, the cache root
    assert (spec.seed, spec.mixed_precision, spec.root) == (cfg.runtime.seed, "no", cache_root)
    build_cache(spec, trainer.source, trainer.backbone)
    assert [s.stat().st_mtime_ns for s in shards] == mtimes
    # another precision is another key (the latents are stored in it); output.dir is not part of it
    bf16 = cache_spec(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "elsewhere", "data.cache=true",
                               f"data.cache_dir={cache_root}", "runtime.dtype=bf16"))
    assert cache_dir(bf16, cache_key(bf16, trainer.source)) != first_dir
    same = cache_spec(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "elsewhere", "data.cache=true",
                               f"data.cache_dir={cache_root}"))
    assert cache_dir(same, cache_key(same, trainer.source)) == first_dir
    other = cache_spec(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "cached", "data.cache=true",
                                f"data.cache_dir={cache_root}", "data.resolution=64"))
    assert cache_dir(other, cache_key(other, trainer.source)) != first_dir
    reader = build_cache(other, trainer.source, trainer.backbone)
    assert reader.directory != first_dir and len(list(cache_root.iterdir())) == 2
    batch = reader.read_batch([(0, 0)])
    assert batch["latents_w"].shape[-1] == 16  # 64 px through the tiny VAE's factor 4


def test_bad_inputs_give_clear_errors(tiny_sd_dir, pairs_path, tmp_path):
    from diffusion_pref.config import ConfigError
    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError
    from diffusion_pref.training.setup import Trainer

    with pytest.raises(ModelLoadError, match="no such folder"):
        Trainer(make_cfg(tmp_path / "missing-model", pairs_path, tmp_path))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        Trainer(make_cfg(empty, pairs_path, tmp_path))
    with pytest.raises(ConfigError, match="model.reference=adapter needs model.finetune=lora"):
        Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "model.finetune=full", "model.reference=adapter"))
    import importlib.util

    if importlib.util.find_spec("wandb") is None:  # an optional extra
        with pytest.raises(ConfigError, match="pip install wandb"):
            Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.logger=wandb"))
    with pytest.raises(ConfigError, match="model.reference=none but this loss compares against a reference"):
        Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "model.reference=none"))
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, f"train.resume={tmp_path}"))
    with pytest.raises(ConfigError, match="matched no UNet module"):
        Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "model.lora_targets=[nope]"))


def test_cli_reports_bad_data_without_a_traceback(tiny_sd_dir, tmp_path):
    bad = write_pairs(tmp_path / "bad.parquet", n=3, columns={"jpg_1": "image_b"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "diffusion_pref.cli", "train", f"model.pretrained={tiny_sd_dir}",
                           f"data.source={bad}", f"output.dir={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "missing column(s) jpg_1" in proc.stderr and "data.columns.jpg_1=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_only_the_last_checkpoints_are_kept_and_a_fresh_run_restarts_the_log(tiny_sd_dir, pairs_path, tmp_path):
    from diffusion_pref.commands.train import run

    cfg = make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.max_steps=4", "train.checkpoint_every=1",
                   "train.keep_checkpoints=2", "train.learning_rate=1e-3")
    run(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["steps"] == 4 and "kept 8 of 8 rows" in summary["data"]
    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.max_steps=1"))
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]


def test_resumed_full_finetune_keeps_the_reference_at_the_base_model(tiny_sd_dir, pairs_path, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffusion_pref.commands.train import run
    from diffusion_pref.training.setup import Trainer

    args = ("model.finetune=full", "train.learning_rate=1e-4", "train.checkpoint_every=1")
    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path, *args))
    resumed = Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, *args, "train.resume=latest", "train.max_steps=3"))
    assert resumed.step == 1
    base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").state_dict()
    # The reference is rebuilt from the pretrained weights, never from the half-trained policy in the checkpoint.
    assert all(torch.equal(p, base[n]) for n, p in resumed.ref_unet.state_dict().items())
    policy = resumed.accelerator.unwrap_model(resumed.unet).state_dict()
    assert not all(torch.equal(p, base[n]) for n, p in policy.items())


def test_a_resumed_bco_run_continues_its_running_reward_shift(tiny_sd_dir, pairs_path, tmp_path):
    """bco's shift is declared loss state (losses.LOSS_STATE): checkpointed and restored, so step 3 of a run resumed
    at step 2 is step 3 of the uninterrupted run, bit for bit; a run that lost the shift would start again at 0."""
    import shutil

    from diffusion_pref.commands.train import run

    args = ("loss.name=bco", "train.max_steps=3", "train.checkpoint_every=2")
    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "straight", *args))
    [checkpoint] = list((tmp_path / "straight" / "checkpoints").iterdir())
    state = json.loads((checkpoint / "trainer_state_0.json").read_text())["loss_state"]
    rows = read_metrics(tmp_path / "straight")
    assert state["count"] == 2 * 2 * 2  # two steps of two pairs, both sides of each
    assert state["mean"] == pytest.approx((rows[0]["reward_batch_mean"] + rows[1]["reward_batch_mean"]) / 2, rel=1e-6)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path / "resumed", *args, "train.resume=latest"))
    assert read_metrics(tmp_path / "resumed") == [{**row, "pairs_per_s": again["pairs_per_s"]}
                                                  for row, again in zip(rows, read_metrics(tmp_path / "resumed"))]


def test_a_diverging_run_stops_with_a_clear_error(tiny_sd_dir, pairs_path, tmp_path):
    from diffusion_pref.commands.train import run

    with pytest.raises(FloatingPointError, match="lower train.learning_rate"):
        run(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.learning_rate=1e30", "train.max_steps=4",
                     "train.max_grad_norm=0"))
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()  # no NaN weights saved as a result


# ------------------------------------------------------------------------------ bad input (issue 13, items 4 10 16)


def test_captions_cut_by_the_text_encoder_are_counted_once_cached_or_not(tiny_sd_dir, tmp_path, caplog):
    import logging

    from transformers import CLIPTokenizer

    from diffusion_pref.training.setup import Trainer

    long = "a red cat on a blue mat with a green hat and a yellow bat"
    captions = [long if i in (1, 2, 6) else f"a cat {i}" for i in range(8)]
    data = write_pairs(tmp_path / "long.parquet", n=8, captions=captions)
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_dir / "tokenizer"))
    over = [len(tokenizer(c).input_ids) > tokenizer.model_max_length for c in captions]
    assert over == [i in (1, 2, 6) for i in range(8)]
    expected = sum(over[:4])  # shuffle off, 2 steps of 2 pairs: rows 0-3 are trained on
    for name, extra in (("plain", ()), ("cached", ("data.cache=true",))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusion_pref.training.setup"):
            summary = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / name, "data.shuffle=false", *extra)).train()
        assert summary["captions_cut"] == expected == 2, name
        assert json.loads((tmp_path / name / "train_summary.json").read_text())["captions_cut"] == expected
        cut_warnings = [r for r in caplog.records if "cut to that length" in r.getMessage()]
        assert len(cut_warnings) == 1 and "16 tokens" in cut_warnings[0].getMessage(), name
    # a resumed run continues the count from its checkpoint (step 1: rows 0-1), then encodes rows 2-3
    cfg = make_cfg(tiny_sd_dir, data, tmp_path / "resumed", "data.shuffle=false", "train.checkpoint_every=1")
    Trainer(cfg).train()
    resumed = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "resumed", "data.shuffle=false", "train.resume=latest"))
    assert resumed.step == 1 and resumed.pair_encoder.captions_cut == sum(over[:2]) == 1
    assert resumed.train()["captions_cut"] == expected


def test_nan_scores_stop_only_losses_that_use_scores(tiny_sd_dir, tmp_path):
    from diffusion_pref.data.pairs import DataError
    from diffusion_pref.training.setup import Trainer

    scores = [(1.0, 0.0), (math.nan, 0.2), (0.5, 0.1), (0.3, 0.9)]
    data = write_pairs(tmp_path / "nan.parquet", n=4, scores=scores)
    summary = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "dpo", "train.max_steps=1")).train()
    assert "1 rows with NaN/infinite scores kept" in summary["data"] and "kept 4 of 4" in summary["data"]
    with pytest.raises(DataError, match=r"row 1 .*score is NaN"):
        Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "smpo", "loss.name=smpo"))


def test_cli_reports_a_bad_row_met_in_a_loader_worker_in_one_line(tiny_sd_dir, tmp_path):
    bad = write_pairs(tmp_path / "bad.parquet", n=4, bad_rows=(1,))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "diffusion_pref.cli", "train", f"model.pretrained={tiny_sd_dir}",
                           f"data.source={bad}", "data.num_workers=2", "data.shuffle=false", "data.resolution=32",
                           "train.batch_size=2", "train.logger=none", f"output.dir={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "row 1 " in errors[0] and "column jpg_1" in errors[0], proc.stderr[-2000:]
    assert errors[0].endswith("set data.on_bad_row=skip to skip such rows (they are counted)")
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr

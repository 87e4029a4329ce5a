"""The shapes world: renderer, tokenizer, programmatic rewards, pretraining helpers, shipped weights."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pref.toy.rewards import ToyFidelity, ToySize
from diffusion_pref.toy import render as R

WEIGHTS = Path(R.__file__).parent / "weights"


def _swap_colours(prompt: str) -> str:
    fg, shape, bg = R.parse_caption(prompt)
    return R.CAPTION_TEMPLATE.format(fg=bg, shape=shape, bg=fg)


def _other_colour(*taken: str) -> str:
    return next(c for c in R.COLOURS if c not in taken)


def _blur(images: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur with edge replication: what a small VAE does to a flat-colour image."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :]) / 16  # [3, 3]
    weight = kernel.expand(3, 1, 3, 3).contiguous()
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, weight, groups=3)


# --- renderer -------------------------------------------------------------------------------------------


def test_render_same_seed_same_pixels_different_seed_differs():
    prompt = "a red circle on a blue background"
    a = np.asarray(R.render(R.Scene.from_caption(prompt, seed=7)))
    b = np.asarray(R.render(R.Scene.from_caption(prompt, seed=7)))
    c = np.asarray(R.render(R.Scene.from_caption(prompt, seed=8)))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Determinism must not depend on global RNG state.
    random.seed(123)
    d = np.asarray(R.render(R.Scene.from_caption(prompt, seed=7)))
    assert np.array_equal(a, d)


def test_render_colours_and_border():
    image = np.asarray(R.render(R.Scene.from_caption("a yellow square on a black background", seed=3)))
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (border == R.PALETTE["black"]).all()  # shapes never touch the border
    # The exact shape colour is present in the interior.
    assert (image.reshape(-1, 3) == R.PALETTE["yellow"]).all(axis=1).sum() > 20


def test_caption_parse_round_trip_and_errors():
    scene = R.Scene.from_caption("a green triangle on a white background", seed=1)
    assert (scene.fg, scene.shape, scene.bg) == ("green", "triangle", "white")
    assert R.caption(scene) == "a green triangle on a white background"
    with pytest.raises(ValueError, match="cannot parse"):
        R.parse_caption("a purple circle on a blue background")
    with pytest.raises(ValueError, match="fg == bg"):
        R.Scene("red", "circle", "red", 0.5, 0.5, 0.2)


def test_prompt_sets_are_disjoint_and_cover_the_world():
    train, held = set(R.train_captions()), set(R.eval_prompts())
    assert train.isdisjoint(held)
    assert len(train) + len(held) == len(R.all_triples()) == 6 * 5 * 3
    assert len(held) >= 10
    # Every held-out colour pair appears in training with another shape: only the combination is new.
    train_pairs = {(fg, bg) for fg, _, bg in R.train_triples()}
    assert all((fg, bg) in train_pairs for fg, _, bg in R.eval_triples())


def test_render_batch_matches_render():
    prompts = R.eval_prompts()[:3]
    batch = R.render_batch(prompts, [0, 1, 2])  # [3, 3, 32, 32]
    assert batch.shape == (3, 3, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    single = np.asarray(R.render(R.Scene.from_caption(prompts[1], 1)))
    assert np.array_equal((batch[1].permute(1, 2, 0) * 255).round().byte().numpy(), single)


# --- rewards --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ground_truth():
    prompts = R.train_captions() + R.eval_prompts()
    seeds = list(range(100, 100 + len(prompts)))
    return prompts, R.render_batch(prompts, seeds)


def test_fidelity_high_on_ground_truth_low_on_mismatch(ground_truth):
    prompts, images = ground_truth
    fidelity = ToyFidelity()
    right = fidelity.score(prompts, images)
    assert right.dtype == torch.float32 and right.shape == (len(prompts),)
    assert right.mean() > 0.97 and right.min() > 0.9
    swapped = fidelity.score([_swap_colours(p) for p in prompts], images)
    assert swapped.mean() < 0.03
    # One colour wrong is worth half.
    one_wrong = []
    for p in prompts:
        fg, shape, bg = R.parse_caption(p)
        one_wrong.append(R.CAPTION_TEMPLATE.format(fg=_other_colour(fg, bg), shape=shape, bg=bg))
    half = fidelity.score(one_wrong, images)
    assert 0.45 < half.mean() < 0.55


def test_fidelity_robust_to_blur_and_noise(ground_truth):
    prompts, images = ground_truth
    generator = torch.Generator().manual_seed(0)
    degraded = (_blur(images) + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert ToyFidelity().score(prompts, degraded).mean() > 0.9


def test_fidelity_on_hand_built_image_and_pil_input():
    # Independent of the renderer: a blue square drawn directly into a red image.
    array = np.empty((32, 32, 3), dtype=np.uint8)
    array[:] = R.PALETTE["red"]
    array[10:20, 12:22] = R.PALETTE["blue"]
    image = Image.fromarray(array)
    fidelity = ToyFidelity()
    scores = fidelity.score(
        ["a blue square on a red background", "a green square on a red background", "a red circle on a blue background"],
        [image, image, image],
    )
    assert torch.allclose(scores, torch.tensor([1.0, 0.5, 0.0]), atol=1e-3)
    as_tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(fidelity.score(["a blue square on a red background"], as_tensor), scores[:1])
    # No shape at all: the shape colour cannot be right.
    empty = torch.full((1, 3, 32, 32), 0.0) + torch.tensor(R.PALETTE["red"])[None, :, None, None] / 255
    assert torch.allclose(fidelity.score(["a blue square on a red background"], empty), torch.tensor([0.5]), atol=1e-3)


def test_fidelity_rejects_unparseable_prompt_and_wrong_count(ground_truth):
    _, images = ground_truth
    with pytest.raises(ValueError, match="cannot find the colours"):
        ToyFidelity().score(["a photo of a cat"], images[:1])
    with pytest.raises(ValueError, match="2 prompts for 1"):
        ToyFidelity().score(["a red circle on a blue background"] * 2, images[:1])


def test_size_scores_pixel_fraction_and_ranks_bigger_higher():
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:] = R.PALETTE["white"]
    array[0:8, 0:16] = R.PALETTE["green"]  # touches the border but the border median stays white
    image = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(ToySize().score(["x"], image), torch.tensor([128 / 1024]))

    small = R.Scene("red", "circle", "blue", 0.5, 0.5, R.MIN_HALF_SIZE / 32)
    large = R.Scene("red", "circle", "blue", 0.5, 0.5, R.MAX_HALF_SIZE / 32)
    images = torch.stack([torch.from_numpy(np.array(R.render(s))).permute(2, 0, 1) for s in (small, large)]) / 255
    size = ToySize().score(["a red circle on a blue background"] * 2, images)
    assert size[1] > 3 * size[0]
    # Close to the analytic circle area.
    assert abs(float(size[1]) - np.pi * R.MAX_HALF_SIZE**2 / 1024) < 0.03
    # The two rewards disagree by design: fidelity is indifferent to size.
    fidelity = ToyFidelity().score(["a red circle on a blue background"] * 2, images)
    assert torch.allclose(fidelity, torch.ones(2), atol=1e-3)


def test_scorers_declare_protocol_attributes():
    for scorer, name in ((ToyFidelity(), "toy-fidelity"), (ToySize(device="cpu", batch_size=4), "toy-size")):
        assert scorer.name == name and isinstance(scorer.scale, str) and scorer.scale


# --- tokenizer ------------------------------------------------------------------------------------------


def _check_tokenizer(tokenizer):
    words = {w for p in R.train_captions() + R.eval_prompts() for w in p.split()}
    for word in words:
        pieces = tokenizer.tokenize(word)
        assert pieces == [word + "</w>"], (word, pieces)
    ids = tokenizer("a red circle on a blue background", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == tokenizer.model_max_length
    assert tokenizer.unk_token_id not in ids[1:8]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red circle on a blue background"


def test_tokenizer_saves_and_loads_with_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from diffusion_pref.toy.tokenizer import save_tokenizer

    save_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()
    _check_tokenizer(CLIPTokenizer.from_pretrained(tmp_path / "tok"))


# --- pretraining helpers --------------------------------------------------------------------------------


def test_corrupt_caption_changes_exactly_one_colour_and_stays_in_training_set():
    from diffusion_pref.toy.pretrain import corrupt_caption

    allowed = set(R.train_triples())
    rng = random.Random(0)
    changed_roles = set()
    for fg, shape, bg in R.train_triples():
        new_fg, new_shape, new_bg = R.parse_caption(corrupt_caption(fg, shape, bg, rng, allowed))
        assert (new_fg, new_shape, new_bg) in allowed and new_shape == shape
        assert (new_fg != fg) + (new_bg != bg) == 1
        changed_roles.add("fg" if new_fg != fg else "bg")
    assert changed_roles == {"fg", "bg"}


def test_lr_schedule_warms_up_then_decays_to_floor():
    from diffusion_pref.toy.pretrain import lr_factor

    assert lr_factor(0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup=10) == pytest.approx(1.0)
    assert lr_factor(55, 100, warmup=10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, warmup=10) == pytest.approx(0.1)


# --- shipped weights ------------------------------------------------------------------------------------


@pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason="shipped toy weights not committed yet")
def test_shipped_pipeline_loads_offline_and_generates_32px():
    from diffusers import StableDiffusionPipeline

    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total < 20 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS, local_files_only=True)
    assert pipe.safety_checker is None
    _check_tokenizer(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a red circle on a blue background"],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images  # [1, 3, 32, 32]
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_v_prediction_schedule_has_zero_terminal_snr_and_samples_from_t999():
    from diffusion_pref.toy.pretrain import make_schedulers

    train, sample = make_schedulers("v_prediction")
    assert train.config.prediction_type == sample.config.prediction_type == "v_prediction"
    assert float(train.alphas_cumprod[-1]) < 1e-9 < float(train.alphas_cumprod[-2])
    sample.set_timesteps(10)
    assert int(sample.timesteps[0]) == 999
    eps_train, _ = make_schedulers("epsilon")
    assert float(eps_train.alphas_cumprod[-1]) > 1e-3  # SD 1.x schedule kept for epsilon
    with pytest.raises(ValueError, match="prediction_type"):
        make_schedulers("sample")


def test_loss_weight_caps_the_x0_factor():
    from diffusion_pref.toy.pretrain import loss_weight

    snr = torch.tensor([0.0, 1.0, 4.0, 100.0])
    # v: v-MSE = (snr + 1) x0-MSE; the factor is capped at gamma + 1 = 6.
    expected_v = torch.tensor([1.0, 1.0, 1.0, 6.0 / 101.0])
    assert torch.allclose(loss_weight(snr, "v_prediction", 5.0), expected_v)
    # epsilon: eps-MSE = snr x0-MSE; the factor is capped at gamma = 5.
    assert torch.allclose(loss_weight(snr[1:], "epsilon", 5.0), torch.tensor([1.0, 1.0, 0.05]))
    assert torch.equal(loss_weight(snr, "v_prediction", 0.0), torch.ones(4))


def test_pretrain_script_writes_a_loadable_pipeline(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    from diffusion_pref.toy import pretrain

    out = tmp_path / "run"
    pretrain.main(["--out", str(out), "--steps", "2", "--vae-steps", "2", "--dataset-size", "16", "--batch-size", "4",
                   "--save-every", "100", "--eval-seeds", "1", "--eval-steps", "2"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = next(r for r in records if r.get("tag") == "final")
    assert 0.0 <= final["fidelity"] <= 1.0 and final["n"] == len(R.eval_prompts())
    assert (out / "final" / "tokenizer" / "vocab.json").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out / "final", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the cached latents, not SD's constant
    _check_tokenizer(pipe.tokenizer)


@pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason="shipped toy weights not committed yet")
def test_shipped_pipeline_follows_prompts_with_guidance():
    # Random or wrongly-exported weights score near chance (~0.15); the trained model scores ~1 at guidance 5.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = R.eval_prompts()[:6]
    images = pipe(prompts, num_inference_steps=10, guidance_scale=5.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    assert ToyFidelity().score(prompts, images).mean() > 0.75


# ---------------------------------------------------------------- a plugin of the core


def test_the_toy_registers_its_names_from_outside_the_core():
    import diffusion_pref.toy as toy
    from diffusion_pref import pipelines, plugins, prompts, reward_models

    assert "diffusion_pref.toy" in plugins.PLUGINS
    assert prompts.PROMPT_SETS["toy"] is toy.eval_prompt_records
    assert prompts.PROMPT_SETS["toy-train"] is toy.train_prompt_records
    assert reward_models.reward_model_class("toy-fidelity") is ToyFidelity
    assert reward_models.reward_model_class("toy-size") is ToySize
    assert pipelines.named_model_folder("toy") == toy.WEIGHTS == WEIGHTS
    # The core modules name no toy module: everything toy comes through the registries.
    core = Path(pipelines.__file__).parent.parent
    for module in ("prompts.py", "pipelines/__init__.py", "reward_models/__init__.py"):
        text = (core / module).read_text()
        assert "diffusion_pref.toy" not in text and "TOY" not in text, module


def test_a_missing_named_model_says_how_to_build_it(tmp_path, monkeypatch):
    from diffusion_pref import pipelines
    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    monkeypatch.setitem(pipelines.NAMED_MODELS, "toy", pipelines.NamedModel(tmp_path / "gone", "build them with X"))
    with pytest.raises(ModelLoadError, match=r"model.pretrained=toy: the shipped toy weights are missing at .*gone; "
                                             r"build them with X or set model.pretrained"):
        pipelines.resolve_pretrained("toy")
    with pytest.raises(ModelLoadError, match=r"no such folder; give a diffusers pipeline folder, a hub id or .*'toy'"):
        pipelines.resolve_pretrained("./nowhere")


def test_plugins_load_once_in_a_fresh_interpreter_from_any_registry():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    for first in ("diffusion_pref.reward_models", "diffusion_pref.prompts", "diffusion_pref.pipelines",
                  "diffusion_pref.toy", "diffusion_pref.toy.rewards"):
        code = (f"import sys; sys.path.insert(0, {str(repo)!r}); import {first}; "
                "from diffusion_pref import pipelines, prompts, reward_models; "
                "assert {'toy', 'toy-train'} <= set(prompts.PROMPT_SETS); "
                "assert {'toy-fidelity', 'toy-size'} <= set(reward_models.REWARD_MODELS); "
                "assert 'toy' in pipelines.NAMED_MODELS; assert 'torch' not in sys.modules or "
                f"{first!r}.endswith('rewards')")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (first, result.stderr[-2000:])

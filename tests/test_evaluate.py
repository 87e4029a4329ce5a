"""Tests for `diffusion-pref evaluate`: statistics against independent computations, caching, the HPDv2 image
layout, the report's structure and clear errors on bad input.

The end-to-end runs use the tiny random-weight SD pipeline and scorers whose values are known functions of the
saved pixels (mean of one colour channel), so every score in the table can be checked against the files.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffusion_pref.config import ConfigError, load_config
from diffusion_pref.evaluation.stats import bootstrap_ratio_ci, compute_metrics, pair_outcomes
from diffusion_pref.commands.evaluate import WEIGHTED_SUM, run, save_media
from diffusion_pref.evaluation.report import render_report

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog on the street", "a green tree", "a yellow car"]
CATEGORIES = ["animals", "animals", "plants", "vehicles"]


class ChannelMean:
    """Known-value scorer: the mean of one RGB channel of the image, in [0, 1]."""

    scale = "[0, 1]"

    def __init__(self, channel: int):
        self.channel = channel
        self.name = f"channel{channel}"

    def score(self, prompts, media):
        assert len(prompts) == len(media)
        return torch.tensor([np.asarray(im, dtype=np.float64)[..., self.channel].mean() / 255 for im in media])


def _scorers():
    return {"red": ChannelMean(0), "blue": ChannelMean(2)}


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": p, "category": c} for p, c in zip(PROMPTS, CATEGORIES)]))
    return path


def _save_random_lora(base_dir: Path, out_dir: Path) -> Path:
    """A LoRA with non-zero up-projections (peft's default init would be an exact no-op)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
    return out_dir


def _overrides(tiny_sd_dir, prompts, out, **extra):
    items = {
        "model.pretrained": str(tiny_sd_dir),
        "eval.prompts": str(prompts),
        "eval.seeds": "[0,1]",
        "sample.steps": 2,
        "sample.batch_size": 4,
        "eval.bootstrap_samples": 200,
        "eval.bootstrap_seed": 3,
        "reward.models": "{red: 1.0, blue: 0.5}",
        "output.dir": str(out),
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def evaluated(tiny_sd_dir, tmp_path_factory):
    """One run with base, an identical full-pipeline copy ("same") and a random LoRA ("lora")."""
    tmp = tmp_path_factory.mktemp("eval")
    same = shutil.copytree(tiny_sd_dir, tmp / "same_pipeline")
    lora = _save_random_lora(tiny_sd_dir, tmp / "lora")
    prompts = _prompt_file(tmp)
    out = tmp / "out"
    variants = f"{{base: base, same: {same}, lora: {lora}}}"
    overrides = _overrides(tiny_sd_dir, prompts, out, **{"eval.variants": variants})
    cfg = load_config(None, overrides)
    metrics = run(cfg, scorers=_scorers())
    return {"cfg": cfg, "overrides": overrides, "metrics": metrics, "out": out, "tmp": tmp, "prompts": prompts}


# -- statistics on their own ---------------------------------------------------------------------------------


def test_pair_outcomes_count_ties_half():
    out = pair_outcomes(np.array([1.0, 2.0, 3.0]), np.array([0.5, 2.0, 4.0]))
    assert out.tolist() == [1.0, 0.5, 0.0]


def _synthetic_table(n_prompts, p_win, rng, seeds=(0, 1)):
    rows = []
    for i in range(n_prompts):
        for seed in seeds:
            base = rng.normal()
            tuned = base + (1.0 if rng.random() < p_win else -1.0)
            for variant, score in (("base", base), ("tuned", tuned)):
                rows.append(dict(variant=variant, prompt_index=i, prompt=f"p{i}", category=None, seed=seed, media="",
                                 r=score))
    return pd.DataFrame(rows)


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    widths = []
    for n_prompts in (20, 400):
        table = _synthetic_table(n_prompts, 0.7, rng)
        w = compute_metrics(table, ["r"], "base", bootstrap_samples=500, bootstrap_seed=1)["win_rates"]["r"]["tuned"]
        assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]
        assert w["ci_low"] < w["ci_high"]
        widths.append(w["ci_high"] - w["ci_low"])
    assert widths[1] < widths[0] / 2  # 20x the prompts: the width should shrink by about sqrt(20) ~ 4.5


def test_bootstrap_interval_matches_a_plain_loop():
    wins = np.array([2.0, 0.5, 1.0, 0.0, 1.5])
    pairs = np.array([2.0, 2.0, 2.0, 2.0, 2.0])
    low, high = bootstrap_ratio_ci(wins, pairs, samples=300, seed=7)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 5, size=(300, 5))
    boot = [sum(wins[j] for j in row) / sum(pairs[j] for j in row) for row in draws]
    assert (low, high) == pytest.approx((np.quantile(boot, 0.025), np.quantile(boot, 0.975)))


def test_identical_scores_give_win_rate_exactly_half():
    table = _synthetic_table(10, 0.5, np.random.default_rng(1))
    table.loc[table["variant"] == "tuned", "r"] = table.loc[table["variant"] == "base", "r"].to_numpy()
    w = compute_metrics(table, ["r"], "base", bootstrap_samples=100)["win_rates"]["r"]["tuned"]
    assert w["win_rate"] == 0.5 and w["ci_low"] == 0.5 and w["ci_high"] == 0.5
    assert w["ties"] == w["n_pairs"] == 20


# -- end to end on the tiny pipeline ------------------------------------------------------------------------


def test_outputs_written_and_scores_are_the_scorers_values(evaluated):
    out = evaluated["out"]
    for name in ("metrics.json", "per_image.parquet", "per_image.csv", "report.html", "config.yaml"):
        if name != "config.yaml":  # config.yaml is written by the CLI, not by run()
            assert (out / name).is_file(), name
    table = pd.read_parquet(out / "per_image.parquet")
    assert len(table) == 3 * len(PROMPTS) * 2
    assert set(table.columns) >= {"variant", "prompt", "category", "seed", "media", "red", "blue", WEIGHTED_SUM}
    for row in table.itertuples():
        pixels = np.asarray(Image.open(out / row.media).convert("RGB"), dtype=np.float64)
        assert row.red == pytest.approx(pixels[..., 0].mean() / 255, abs=1e-12)
        assert row.blue == pytest.approx(pixels[..., 2].mean() / 255, abs=1e-12)
        assert row.prompt == PROMPTS[row.prompt_index] and row.category == CATEGORIES[row.prompt_index]
    assert table[WEIGHTED_SUM].to_numpy() == pytest.approx((table["red"] + 0.5 * table["blue"]).to_numpy())
    csv = pd.read_csv(out / "per_image.csv")
    assert csv["red"].to_numpy() == pytest.approx(table["red"].to_numpy())


def test_every_metric_recomputed_from_the_table(evaluated):
    out = evaluated["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "per_image.csv")  # the CSV, read independently of the parquet the code wrote first
    assert metrics["baseline"] == "base" and metrics["variants"] == ["base", "same", "lora"]
    assert metrics["rewards"] == ["red", "blue", WEIGHTED_SUM]
    assert metrics["n_prompts"] == len(PROMPTS) and metrics["seeds"] == [0, 1]
    boot = metrics["bootstrap"]
    for reward in metrics["rewards"]:
        for variant, group in table.groupby("variant"):
            s = metrics["scores"][reward][variant]
            values = group[reward].to_numpy()
            assert s["mean"] == pytest.approx(sum(values) / len(values), abs=1e-12)
            assert s["median"] == pytest.approx(np.percentile(values, 50), abs=1e-12)
            assert s["std"] == pytest.approx(np.sqrt(np.mean((values - values.mean()) ** 2)), abs=1e-12)
            assert s["n"] == len(values)
            expected_cats = {c: g[reward].mean() for c, g in group.groupby("category")}
            assert s["by_category"] == pytest.approx(expected_cats, abs=1e-12)
        base = {(r.prompt_index, r.seed): getattr(r, reward) for r in table[table.variant == "base"].itertuples()}
        assert set(metrics["win_rates"][reward]) == {"same", "lora"}
        for variant, w in metrics["win_rates"][reward].items():
            outcomes = {}
            for r in table[table.variant == variant].itertuples():
                mine, theirs = getattr(r, reward), base[(r.prompt_index, r.seed)]
                outcomes.setdefault(r.prompt_index, []).append(1.0 if mine > theirs else 0.5 if mine == theirs else 0.0)
            flat = [o for p in sorted(outcomes) for o in outcomes[p]]
            assert w["win_rate"] == pytest.approx(sum(flat) / len(flat), abs=1e-12)
            assert (w["wins"], w["ties"], w["losses"]) == (flat.count(1.0), flat.count(0.5), flat.count(0.0))
            assert w["n_pairs"] == len(flat) and w["n_prompts"] == len(outcomes)
            # The documented bootstrap recipe, written out as a loop.
            prompts = sorted(outcomes)
            rng = np.random.default_rng(boot["seed"])
            draws = rng.integers(0, len(prompts), size=(boot["samples"], len(prompts)))
            rates = [sum(sum(outcomes[prompts[j]]) for j in row) / sum(len(outcomes[prompts[j]]) for j in row)
                     for row in draws]
            assert w["ci_low"] == pytest.approx(np.quantile(rates, 0.025), abs=1e-12)
            assert w["ci_high"] == pytest.approx(np.quantile(rates, 0.975), abs=1e-12)
            assert w["ci_low"] <= w["win_rate"] <= w["ci_high"]


def test_identical_variant_wins_exactly_half_and_lora_changes_images(evaluated):
    out, metrics = evaluated["out"], evaluated["metrics"]
    table = pd.read_parquet(out / "per_image.parquet")
    key = ["prompt_index", "seed"]
    base = table[table.variant == "base"].sort_values(key)
    for variant in ("same", "lora"):
        other = table[table.variant == variant].sort_values(key)
        identical = [np.array_equal(np.asarray(Image.open(out / a)), np.asarray(Image.open(out / b)))
                     for a, b in zip(base["media"], other["media"])]
        assert all(identical) if variant == "same" else not any(identical)
    for reward in metrics["rewards"]:
        w = metrics["win_rates"][reward]["same"]
        assert w["win_rate"] == 0.5 and w["ties"] == w["n_pairs"] == len(PROMPTS) * 2
        assert (w["ci_low"], w["ci_high"]) == (0.5, 0.5)
        assert metrics["win_rates"][reward]["lora"]["ties"] == 0


def test_rerun_reuses_samples_and_no_cache_regenerates(evaluated):
    out = evaluated["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "media").rglob("*.png")}
    again = run(load_config(None, evaluated["overrides"]), scorers=_scorers())
    assert again["run"]["n_generated"] == 0 and again["run"]["n_reused"] == len(before)
    assert {p: p.stat().st_mtime_ns for p in (out / "media").rglob("*.png")} == before
    assert again["win_rates"] == evaluated["metrics"]["win_rates"]
    # eval.no_cache regenerates everything, even with every sample on disk.
    base_only = _overrides(evaluated["cfg"].model.pretrained, evaluated["prompts"], evaluated["tmp"] / "base_only",
                           **{"eval.max_prompts": 2})
    for extra, expected in (([], 4), (["eval.no_cache=true"], 4)):
        result = run(load_config(None, base_only + extra), scorers=_scorers())
        assert result["run"]["n_generated"] == expected, extra
    assert len(list((evaluated["tmp"] / "base_only" / "media").rglob("*.png"))) == 4


def test_cache_key_changes_with_settings_and_weights(evaluated):
    from diffusion_pref.commands.evaluate import model_fingerprint, resolve_variants, sample_key, sampling_settings

    cfg = evaluated["cfg"]
    variants = {v.name: v for v in resolve_variants(cfg)}
    settings = sampling_settings(cfg)
    assert settings["dtype"] == ("fp16" if torch.cuda.is_available() else "fp32")  # "auto" resolved
    keys = {name: sample_key(model_fingerprint(cfg, v), "a red cat", 0, settings) for name, v in variants.items()}
    assert len(set(keys.values())) == 3  # base, its full copy and the LoRA are three models
    lora = variants["lora"]
    assert sample_key(model_fingerprint(cfg, lora), "a red cat", 0, settings) == keys["lora"]  # deterministic
    for changed in (dict(settings, steps=3), dict(settings, guidance_scale=1.0), dict(settings, dtype="bf16")):
        assert sample_key(model_fingerprint(cfg, lora), "a red cat", 0, changed) != keys["lora"]
    assert sample_key(model_fingerprint(cfg, lora), "a red cat", 1, settings) != keys["lora"]
    assert sample_key(model_fingerprint(cfg, lora), "a red dog", 0, settings) != keys["lora"]
    # Retraining into the same folder rewrites the weights file: the old samples must not be reused.
    weights = lora.path / "pytorch_lora_weights.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert sample_key(model_fingerprint(cfg, lora), "a red cat", 0, settings) != keys["lora"]
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_base_with_other_sampling_settings_is_a_variant(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    overrides = _overrides(tiny_sd_dir, _prompt_file(tmp_path), out, **{
        "eval.variants": "{base: base, base_g1: base}", "eval.variant_sampling.base_g1.guidance_scale": 1.0,
        "eval.max_prompts": 2, "eval.seeds": "[0]"})
    metrics = run(load_config(None, overrides), scorers=_scorers())
    assert metrics["run"]["settings"]["base_g1"]["guidance_scale"] == 1.0
    assert metrics["run"]["settings"]["base"]["guidance_scale"] == 7.5
    table = pd.read_parquet(out / "per_image.parquet").sort_values(["variant", "prompt_index"])
    g1, base = table[table.variant == "base_g1"], table[table.variant == "base"]
    assert not any(np.array_equal(np.asarray(Image.open(out / a)), np.asarray(Image.open(out / b)))
                   for a, b in zip(g1["media"], base["media"]))
    with pytest.raises(ConfigError, match=r"variant_sampling.base_g1.guidance: not a sampling .*'guidance_scale'"):
        run(load_config(None, overrides + ["eval.variant_sampling.base_g1.guidance=2"]), scorers=_scorers())


def test_report_is_self_contained_with_table_grid_and_charts(evaluated):
    html = (evaluated["out"] / "report.html").read_text()
    assert 'id="summary"' in html and 'id="grid"' in html
    assert html.count("data:image/png;base64,") == 3 * len(PROMPTS)  # grid: prompts x variants, one seed
    assert html.count('class="winrate"') == 3 and html.count('class="histogram"') == 3  # one per reward column
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "animals" in html  # per-category table


def test_grid_png_places_each_sample_under_its_variant_and_seed(evaluated):
    from diffusion_pref.evaluation.report import write_grid_png

    out = evaluated["out"]
    table = pd.read_parquet(out / "per_image.parquet")
    variants = evaluated["metrics"]["variants"]  # base, same, lora
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"), dtype=np.int16)
    cell, header, gap, label = 128, 14, 4, 160  # write_grid_png's defaults
    seeds, prompts = [0, 1], sorted(table["prompt_index"].unique())
    assert grid.shape == (header + len(prompts) * cell, label + len(seeds) * len(variants) * cell + gap, 3)
    assert (grid[header:, :label] < 128).any()  # the prompts' text
    for row in table.itertuples():  # every sample sits, fitted to its cell, where its variant, seed and prompt say
        expected = Image.open(out / row.media).convert("RGB")  # 32 px: enlarged 4x, pixel for pixel
        assert expected.size == (32, 32)
        expected = expected.resize((cell, cell), Image.Resampling.NEAREST)
        x = label + seeds.index(row.seed) * (len(variants) * cell + gap) + variants.index(row.variant) * cell
        y = header + prompts.index(row.prompt_index) * cell
        x += (cell - expected.width) // 2
        y += (cell - expected.height) // 2
        patch = grid[y:y + expected.height, x:x + expected.width]
        assert np.array_equal(patch, np.asarray(expected, dtype=np.int16)), (row.variant, row.seed, row.prompt_index)
    audio = table.assign(media=table["media"].str.replace(".png", ".wav"))
    assert write_grid_png(out / "unused.png", audio, variants, out) is None and not (out / "unused.png").exists()


def test_cli_with_the_toy_recipe(tiny_sd_dir, tmp_path):
    """The shipped recipe runs through the CLI (toy-fidelity scores any RGB image; the model is the tiny SD)."""
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_pref.cli", "evaluate", "--config", str(REPO / "configs/toy_evaluate.yaml"),
         f"model.pretrained={tiny_sd_dir}", "eval.max_prompts=2", "eval.seeds=[0]", "sample.steps=2",
         f"output.dir={out}", "eval.bootstrap_samples=50"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rewards"] == ["toy-fidelity"] and metrics["n_prompts"] == 2
    assert (out / "config.yaml").is_file() and (out / "report.html").is_file()


# -- already generated images ------------------------------------------------------------------------------


def test_scores_a_folder_in_the_hpdv2_benchmark_layout(tmp_path):
    bench = tmp_path / "benchmark"
    bench.mkdir()
    styles = {"anime": ["an anime cat", "an anime dog"], "photo": ["a photo of a tree"]}
    for style, prompts in styles.items():
        (bench / f"{style}.json").write_text(json.dumps(prompts))
    images = tmp_path / "benchmark_imgs"
    expected = {}
    for model, level in (("sd15", 40), ("tuned", 200)):
        for style, prompts in styles.items():
            for i, prompt in enumerate(prompts):
                path = images / model / style / f"{i:05d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (level + 10 * i, 0, 0)).save(path, quality=100)
                expected[(model, prompt)] = np.asarray(Image.open(path), dtype=np.float64)[..., 0].mean() / 255
    cfg = load_config(None, [f"eval.prompts={bench}", f"eval.images_dir={images}", "eval.baseline=sd15",
                             f"output.dir={tmp_path / 'out'}", "reward.models={red: 1.0}", "eval.bootstrap_samples=50"])
    metrics = run(cfg, scorers={"red": ChannelMean(0)})
    table = pd.read_parquet(tmp_path / "out" / "per_image.parquet")
    assert sorted(table["variant"].unique()) == ["sd15", "tuned"]
    assert {(r.variant, r.prompt): r.red for r in table.itertuples()} == pytest.approx(expected)
    assert set(table["category"]) == {"anime", "photo"}
    assert metrics["win_rates"]["red"]["tuned"]["win_rate"] == 1.0
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") == 3 * 2

    # One image missing: an error that names it, not a silently smaller evaluation.
    (images / "tuned" / "photo" / "00000.jpg").unlink()
    with pytest.raises(ConfigError, match=r"tuned.*lacks 1 of 3 images.*photo/00000.jpg"):
        run(cfg, scorers={"red": ChannelMean(0)})


def test_registered_reward_models_score_each_column(tmp_path, capsys):
    """The real registry path (load_scorers): shapes-world renders, right vs wrong colours, scored by toy rewards."""
    from diffusion_pref.prompts import read_prompts
    from diffusion_pref.toy.rewards import ToyFidelity, ToySize
    from diffusion_pref.toy.render import COLOURS, Scene, place, render

    records = read_prompts("toy")[:4]
    images, positions = tmp_path / "imgs", {}
    for model in ("right", "wrong"):
        for record in records:
            index = positions.setdefault((model, record.category), [0])
            scene = Scene.from_caption(record.prompt, 0)
            if model == "wrong":  # another foreground colour: fidelity drops
                fg = next(c for c in COLOURS if c not in (scene.fg, scene.bg))
                scene = place(fg, scene.shape, scene.bg, 0)
            path = images / model / record.category / f"{index[0]:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render(scene).save(path)
            index[0] += 1
    # In a recipe the mapping replaces the default reward (pickscore, which needs hub weights).
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward:\n  models: {toy-fidelity: 1.0, toy-size: 2.0}\n")
    cfg = load_config(recipe, ["eval.prompts=toy", "eval.max_prompts=4", f"eval.images_dir={images}",
                               "eval.baseline=wrong", f"output.dir={tmp_path / 'out'}", "eval.bootstrap_samples=20"])
    metrics = run(cfg)
    table = pd.read_parquet(tmp_path / "out" / "per_image.parquet")
    assert metrics["rewards"] == ["toy-fidelity", "toy-size", WEIGHTED_SUM]
    pixels = [Image.open(p).convert("RGB") for p in table["media"]]
    assert table["toy-fidelity"].to_numpy() == pytest.approx(ToyFidelity().score(list(table["prompt"]), pixels).numpy())
    assert table[WEIGHTED_SUM].to_numpy() == pytest.approx((table["toy-fidelity"] + 2 * table["toy-size"]).to_numpy())
    assert metrics["win_rates"]["toy-fidelity"]["right"]["win_rate"] == 1.0
    assert table["toy-size"].to_numpy() == pytest.approx(ToySize().score(list(table["prompt"]), pixels).numpy())
    # toy-fidelity has a known maximum: every wrong-colour baseline sample is an error the right renders fix.
    errors = metrics["win_rates"]["toy-fidelity"]["right"]["errors"]
    assert (errors["baseline_errors"], errors["fixed"], errors["regressions"], errors["errors"]) == (4, 4, 0, 0)
    assert "errors" not in metrics["win_rates"]["toy-size"]["right"]  # no known maximum: nothing to count
    printed = capsys.readouterr().out
    assert "wins/ties/losses 4/0/0" in printed and "base errors fixed 4/4, regressions 0" in printed
    report = (tmp_path / "out" / "report.html").read_text()
    assert "wins/ties/losses 4/0/0" in report and "base errors fixed 4/4, regressions 0" in report


def test_max_score_errors_counts_fixed_and_regressed_pairs():
    from diffusion_pref.evaluation.stats import max_score_errors

    ref = [1.0, 0.5, 0.5, 0.0, 0.9, 0.74]
    new = [0.5, 1.0, 0.5, 0.8, 1.0, 0.76]
    e = max_score_errors(new, ref, maximum=1.0, tolerance=0.25)
    # right means >= 0.75: ref right at 0 and 4; new right at 1, 3, 4, 5
    assert (e["baseline_errors"], e["errors"], e["fixed"], e["regressions"]) == (4, 2, 3, 1)
    assert e["shortfall_recovered"] == pytest.approx((np.mean(new) - np.mean(ref)) / (1.0 - np.mean(ref)))
    assert max_score_errors([1.0], [1.0], maximum=1.0, tolerance=0.0)["shortfall_recovered"] is None


# -- audio hook -----------------------------------------------------------------------------------------------


def test_report_embeds_audio_players_for_audio_samples(tmp_path):
    sr = 8000
    tone = np.sin(2 * np.pi * 440 * np.arange(sr // 10) / sr).astype(np.float32)
    rows = []
    for variant, gain in (("base", 0.2), ("tuned", 0.5)):
        path = save_media(gain * tone, tmp_path / "media" / variant / "00000_s0_0123456789abcdef", sample_rate=sr)
        assert path.suffix == ".wav"
        rows.append(dict(variant=variant, prompt_index=0, prompt="a beep", category=None, seed=0,
                         media=str(path.relative_to(tmp_path)), loud=gain))
    table = pd.DataFrame(rows)
    metrics = compute_metrics(table, ["loud"], "base", bootstrap_samples=10)
    html = render_report(metrics, table, media_root=tmp_path)
    assert html.count('<audio controls preload="none" src="data:audio/wav;base64,') == 2
    # each player has its spectrogram and there is no other image (audio is never shown as a picture)
    assert html.count('<img class="spectrogram"') == html.count("<img") == 2


# -- bad input -----------------------------------------------------------------------------------------------


def test_missing_lora_folder_is_a_clear_error(tiny_sd_dir, tmp_path):
    cfg = load_config(None, _overrides(tiny_sd_dir, _prompt_file(tmp_path), tmp_path / "out",
                                       **{"eval.variants": f"{{base: base, dpo: {tmp_path / 'nope'}}}"}))
    with pytest.raises(ConfigError, match=r"eval.variants.dpo=.*nope: no such folder.*LoRA folder"):
        run(cfg, scorers=_scorers())
    assert not (tmp_path / "out" / "media").exists()  # failed before generating anything


def test_cli_reports_a_missing_lora_folder_without_a_traceback(tiny_sd_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_pref.cli", "evaluate", f"model.pretrained={tiny_sd_dir}",
         f"eval.prompts={_prompt_file(tmp_path)}", f"eval.variants.dpo={tmp_path / 'missing_lora'}",
         "eval.variants.base=base", f"output.dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode != 0
    assert "eval.variants.dpo=" in result.stderr and "no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_that_is_neither_lora_nor_pipeline_is_a_clear_error(tiny_sd_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = load_config(None, _overrides(tiny_sd_dir, _prompt_file(tmp_path), tmp_path / "out",
                                       **{"eval.variants": f"{{dpo: {tmp_path / 'empty'}}}"}))
    with pytest.raises(ConfigError, match=r"eval.variants.dpo=.*neither pytorch_lora_weights.safetensors"):
        run(cfg, scorers=_scorers())


def test_prompt_file_without_prompts_is_a_clear_error(tiny_sd_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cfg = load_config(None, _overrides(tiny_sd_dir, empty, tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"eval.prompts=.*empty.txt.*no prompts"):
        run(cfg, scorers=_scorers())


def test_unknown_reward_model_is_a_clear_error_before_generation(tiny_sd_dir, tmp_path):
    cfg = load_config(None, _overrides(tiny_sd_dir, _prompt_file(tmp_path), tmp_path / "out",
                                       **{"reward.models": "{pickscor: 1.0}"}))
    with pytest.raises(ConfigError, match=r"reward.models.pickscor: unknown reward model 'pickscor'; did you mean 'pickscore'"):
        run(cfg)
    assert not (tmp_path / "out" / "media").exists()


def test_unknown_baseline_is_a_clear_error(tiny_sd_dir, tmp_path):
    cfg = load_config(None, _overrides(tiny_sd_dir, _prompt_file(tmp_path), tmp_path / "out",
                                       **{"eval.baseline": "sd15", "eval.max_prompts": 1, "eval.seeds": "[0]"}))
    with pytest.raises(ConfigError, match=r"eval.baseline=sd15 is not one of the variants \['base'\]"):
        run(cfg, scorers=_scorers())


def test_a_reward_model_that_cannot_load_stops_the_run_before_any_sample(tiny_sd_dir, tmp_path, capsys):
    """Loaded through the loader generate uses, before sampling: one line naming the model and the key to set."""
    from diffusion_pref.cli import main

    (tmp_path / "empty").mkdir()  # not a CLIPModel folder: fails the same way with or without a network
    out = tmp_path / "out"
    code = main(["evaluate", *_overrides(tiny_sd_dir, _prompt_file(tmp_path), out, **{
        "reward.models": "{toy-fidelity: 1.0, pickscore: 1.0}", "reward.pretrained.pickscore": tmp_path / "empty"})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "could not load reward model 'pickscore'" in err[0] and "set reward.pretrained.pickscore" in err[0]
    assert not (out / "media").exists()  # no sample was generated


def test_prompts_longer_than_the_text_encoder_takes_are_counted(tiny_sd_dir, tmp_path, capsys):
    from transformers import CLIPTokenizer

    long = "a red cat on a blue mat with a green hat and a yellow bat"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red cat\n{long}\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_dir / "tokenizer"))
    assert len(tokenizer(long).input_ids) > tokenizer.model_max_length >= len(tokenizer("a red cat").input_ids)
    overrides = _overrides(tiny_sd_dir, prompts, tmp_path / "out", **{"eval.seeds": "[0]"})
    metrics = run(load_config(None, overrides), scorers=_scorers())
    assert metrics["run"]["prompts_cut"] == {"base": 1}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["run"]["prompts_cut"] == {"base": 1}
    printed = capsys.readouterr().out
    assert printed.count("longer than the text encoder") == 1 and "1 of 2 prompts" in printed

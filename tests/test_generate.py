"""Preference-dataset generation: pairing rules, the parquet output, resuming after SIGKILL, process sharding."""

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_pref.commands.generate as generate_module
from diffusion_pref.config import ConfigError, load_config
from diffusion_pref.commands.generate import FILTER_REASONS, form_pairs, generate, read_shards, rso_select, sample_seed
from diffusion_pref.prompts import read_prompts

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a small house", "a white bird"]
SAMPLES = 3


class MeanPixel:
    """Score = mean pixel value in [0, 1]: known from the image alone, so every stored score can be recomputed."""

    name = "mean-pixel"
    scale = "[0, 1]"

    def score(self, prompts, images):
        return torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 for im in images], dtype=torch.float64)


class TableScorer:
    """Scores from a fixed table: the k-th image scored for a prompt gets table[prompt][k] (samples in order)."""

    name = "table"
    scale = "table"

    def __init__(self, table):
        self.table = table
        self.calls = Counter()

    def score(self, prompts, images):
        out = []
        for prompt in prompts:
            out.append(self.table[prompt][self.calls[prompt]])
            self.calls[prompt] += 1
        return torch.tensor(out, dtype=torch.float64)


class SeedColourBackbone:
    """Stands in for a backbone where the images don't matter: a flat grey image whose value is the low byte of
    its seed. The members generate uses, with the signatures of ``Backbone.sample`` and ``prompts_cut``."""

    tokenizer = None  # set one to have prompts counted as cut at its limit

    def sample(self, prompts, seeds, *, steps, guidance_scale, resolution=None, scheduler=None, safety_checker=False,
               output_type="pil"):
        from PIL import Image

        from diffusion_pref.pipelines.base import Samples

        assert len(prompts) == len(seeds) and output_type == "pil"
        return Samples([Image.new("RGB", (8, 8), (seed % 256,) * 3) for seed in seeds])

    def prompts_cut(self, prompts):
        from diffusion_pref.pipelines.base import texts_over_limit

        return texts_over_limit([self.tokenizer] if self.tokenizer is not None else [], prompts)


def _overrides(tmp_path, model_dir, out="out", prompts=PROMPTS, **generate):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    settings = dict(prompts=str(prompt_file), steps=2, samples_per_prompt=SAMPLES, batch_size=6, shard_size=2)
    settings.update(generate)
    overrides = [f"model.pretrained={model_dir}", f"output.dir={tmp_path / out}"]
    return overrides + [f"{_SECTION.get(k, 'generate')}.{k}={'null' if v is None else v}" for k, v in settings.items()]


# The settings generate reads from the shared sections.
_SECTION = {"steps": "sample", "guidance_scale": "sample", "resolution": "sample", "scheduler": "sample",
            "batch_size": "sample", "safety_checker": "sample", "seed": "runtime", "dtype": "runtime"}


def _config(tmp_path, model_dir, **kwargs):
    return load_config(None, _overrides(tmp_path, model_dir, **kwargs))


def _rows(folder):
    import datasets

    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    if not files:
        return []
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(Path(folder) / ".hf"))
    return sorted(dataset.to_list(), key=lambda r: (r["prompt_index"], r["seed_0"], r["seed_1"]))


def _pixels(png):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_sd_dir):
    """The tiny SD pipeline loaded by diffusers alone: an independent check of what generate stored."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    """The tiny SD backbone, loaded as generate loads it (fp32 on the CPU)."""
    return generate_module._load_backbone(load_config(None, [f"model.pretrained={tiny_sd_dir}"]), "cpu")


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory, tiny_sd_dir):
    """One uninterrupted single-process run (pipeline loaded from the folder by generate itself)."""
    tmp = tmp_path_factory.mktemp("reference")
    summary = generate(_config(tmp, tiny_sd_dir, strategy="all_pairs"), reward=MeanPixel())
    return _rows(tmp / "out"), summary, tmp / "out", str(tiny_sd_dir)


# ------------------------------------------------------------------------------------------------ pairing rules


def test_strategies_on_a_score_table():
    scores = [0.1, 0.5, 0.3, 0.5]  # two equal best scores: the first (index 1) is the best
    pairs, stats = form_pairs(scores, "best_vs_worst")
    assert pairs == [(1, 0)] and stats["tie"] == 0
    pairs, stats = form_pairs(scores, "best_vs_each")
    assert pairs == [(1, 0), (1, 2)] and stats["tie"] == 1 and stats["pairs_considered"] == 3
    pairs, stats = form_pairs(scores, "all_pairs")
    assert sorted(pairs) == sorted([(1, 0), (2, 0), (3, 0), (1, 2), (3, 2)])
    assert stats["tie"] == 1 and stats["pairs_considered"] == 6 and stats["pairs_written"] == 5


def test_filters_count_each_pair_under_the_first_reason():
    scores = [0.0, 0.2, 0.25, 0.9]
    pairs, stats = form_pairs(scores, "all_pairs", min_winner_score=0.21)
    assert sorted(pairs) == [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)] and stats["min_winner_score"] == 1
    pairs, stats = form_pairs(scores, "all_pairs", min_gap=0.1, max_gap=0.7)
    # gaps: (1,0) .2, (2,0) .25, (3,0) .9 > max, (2,1) .05 < min, (3,1) .7, (3,2) .65
    assert sorted(pairs) == [(1, 0), (2, 0), (3, 1), (3, 2)]
    assert stats["min_gap"] == 1 and stats["max_gap"] == 1 and stats["pairs_written"] == 4


def test_ties_and_nan_scores_never_become_pairs():
    pairs, stats = form_pairs([0.4, 0.4, 0.4], "best_vs_worst")
    assert pairs == [] and stats["tie"] == 1 and stats["pairs_considered"] == 1
    pairs, stats = form_pairs([float("nan"), 0.2, 0.7], "all_pairs")
    assert pairs == [(2, 1)] and stats["nan_scores"] == 1
    pairs, stats = form_pairs([float("nan"), 0.2], "best_vs_worst")
    assert pairs == [] and stats["nan_scores"] == 1 and stats["pairs_considered"] == 0


def test_rso_samples_from_the_reward_tilted_distribution():
    rng = random.Random(0)
    # One accepted out of two: P(i) is proportional to exp(r_i / beta), here e / (1 + e) for the better one.
    draws = [rso_select([0.0, 1.0], keep=1, beta=1.0, rng=rng)[0] for _ in range(4000)]
    assert abs(np.mean(draws) - math.e / (1 + math.e)) < 0.03
    # A tiny beta keeps the best ones; keep >= len keeps all.
    assert rso_select([0.3, 0.9, 0.1, 0.8], keep=2, beta=1e-6, rng=rng) == [1, 3]
    assert rso_select([0.3, 0.9, 0.1], keep=5, beta=0.5, rng=rng) == [0, 1, 2]


def test_sample_seeds_are_fixed_and_distinct():
    seeds = {sample_seed(0, p, s) for p in range(50) for s in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**32 for s in seeds)
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1) != sample_seed(1, 3, 1)


# ------------------------------------------------------------------------------------------------ end to end


def test_output_loads_and_every_row_is_reproducible(reference_rows, diffusers_pipe):
    rows, summary, out, model = reference_rows
    assert len(rows) == summary["pairs_written"] == len(PROMPTS) * 3  # all_pairs of 3 samples: 3 pairs per prompt
    assert summary["prompts_done"] == summary["prompts_total"] == len(PROMPTS) and summary["prompts_missing"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    regenerated = set()
    for row in rows:
        index = row["prompt_index"]
        assert row["caption"] == PROMPTS[index] and row["model"] == model
        assert row["reward_model"] == "mean-pixel" and row["label_1"] == 1 - row["label_0"]
        expected_seeds = {sample_seed(0, index, s) for s in range(SAMPLES)}
        assert {row["seed_0"], row["seed_1"]} <= expected_seeds
        for side in (0, 1):
            pixels = _pixels(row[f"jpg_{side}"])  # PNG bytes
            assert row[f"score_{side}"] == pytest.approx(pixels.mean() / 255, abs=1e-12)
            # The recorded seed alone regenerates the stored image (checked on the first prompt's samples).
            if index == 0 and row[f"seed_{side}"] not in regenerated:
                alone = diffusers_pipe(PROMPTS[index], num_inference_steps=2, output_type="np",
                                      generator=torch.Generator().manual_seed(row[f"seed_{side}"])).images[0]
                regenerated.add(row[f"seed_{side}"])
                assert np.abs((alone * 255).round() - pixels).max() <= 1
        winner = 0 if row["label_0"] == 1.0 else 1
        assert row[f"score_{winner}"] > row[f"score_{1 - winner}"]
    assert {row["label_0"] for row in rows} == {0.0, 1.0}  # the winner's position is not constant


def test_training_data_reader_takes_the_output_winner_first(reference_rows):
    from diffusion_pref.data.pairs import PairSource

    rows, _, out, _ = reference_rows
    source = PairSource(load_config(None, [f"data.source={out}"]).data)
    pairs = source.read(list(source.order(epoch=0)))[0]
    assert len(pairs) == len(rows)
    for pair in pairs:
        assert pair.score_w > pair.score_l
        assert np.asarray(pair.image_w).mean() / 255 == pytest.approx(pair.score_w, abs=1e-12)


def test_strategies_and_filters_end_to_end(tmp_path):
    nan = float("nan")
    table = {"p0": [1.0, 1.0, 0.5], "p1": [nan, 0.2, 0.9], "p2": [0.3, 0.3, 0.3], "p3": [0.1, 0.2, 0.95]}
    prompts = list(table)
    expected = {
        # strategy -> {prompt index: [(winner sample, loser sample)]}
        "best_vs_worst": {0: [(0, 2)], 1: [(2, 1)], 3: [(2, 0)]},
        "best_vs_each": {0: [(0, 2)], 1: [(2, 1)], 3: [(2, 0), (2, 1)]},
        "all_pairs": {0: [(0, 2), (1, 2)], 1: [(2, 1)], 3: [(1, 0), (2, 0), (2, 1)]},
    }
    for strategy, pairs in expected.items():
        cfg = _config(tmp_path, "unused", out=strategy, prompts=prompts, strategy=strategy)
        summary = generate(cfg, backbone=SeedColourBackbone(), reward=TableScorer(table))
        got = {}
        for row in _rows(tmp_path / strategy):
            w, l = (0, 1) if row["label_0"] == 1.0 else (1, 0)
            sample = {sample_seed(0, row["prompt_index"], s): s for s in range(SAMPLES)}
            got.setdefault(row["prompt_index"], []).append((sample[row[f"seed_{w}"]], sample[row[f"seed_{l}"]]))
            assert row[f"score_{w}"] == table[prompts[row["prompt_index"]]][sample[row[f"seed_{w}"]]]
        assert {k: sorted(v) for k, v in got.items()} == pairs, strategy
        assert summary["samples_with_nan_score"] == 1 and summary["prompts_without_pairs"] == 1  # p2: all tied
        assert summary["pairs_filtered"]["tie"] == {"best_vs_worst": 1, "best_vs_each": 3, "all_pairs": 4}[strategy]

    cfg = _config(tmp_path, "unused", out="filtered", prompts=prompts, strategy="all_pairs",
                  min_winner_score=0.5, min_gap=0.6, max_gap=0.8)
    summary = generate(cfg, backbone=SeedColourBackbone(), reward=TableScorer(table))
    # Left: p1 (2,1) gap .7; p3 (2,0) gap .85 > max, (2,1) gap .75, (1,0) winner .2 < min winner.
    assert sorted((r["prompt_index"], max(r["score_0"], r["score_1"])) for r in _rows(tmp_path / "filtered")) == [
        (1, 0.9), (3, 0.95)]
    assert summary["pairs_filtered"] == {"tie": 4, "min_winner_score": 1, "min_gap": 2, "max_gap": 1}


def test_rso_thins_candidates_before_pairing(tmp_path):
    table = {"p": [0.0, 0.1, 0.2, 5.0, 5.1]}
    cfg = _config(tmp_path, "unused", prompts=["p"], samples_per_prompt=5, strategy="all_pairs",
                  rso_beta=0.01, rso_keep=2)
    summary = generate(cfg, backbone=SeedColourBackbone(), reward=TableScorer(table))
    # A small beta accepts the two best samples only: one pair, 5.1 over 5.0.
    (row,) = _rows(tmp_path / "out")
    assert sorted([row["score_0"], row["score_1"]]) == [5.0, 5.1] and summary["samples_rejected_by_rso"] == 3


_KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads({threads})  # the parent's count: the same float reductions, so the same images
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import diffusion_pref.commands.generate as generate_module
import diffusion_pref.reward_models as reward_models
from diffusion_pref.config import load_config
from test_generate import MeanPixel

kill_on, kill_at, calls = {kill_on!r}, {kill_at}, [0]

def count_and_maybe_die():
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGTERM if kill_on == "term" else signal.SIGKILL)

replace = os.replace
def killing_replace(src, dst, **kwargs):
    if kill_on == "rename" and os.path.basename(dst).startswith("pairs-p"):  # os.replace is global: shards only
        count_and_maybe_die()  # between writing a shard's temporary file and renaming it
    replace(src, dst, **kwargs)
generate_module.os.replace = killing_replace

class KillingMeanPixel(MeanPixel):
    def score(self, prompts, images):
        if kill_on in ("score", "term"):
            count_and_maybe_die()  # in the middle of a prompt group: images sampled, nothing written
        return super().score(prompts, images)

reward_models.load_reward_from_config = lambda *args, **kwargs: KillingMeanPixel()
generate_module.run(load_config(None, {overrides!r}))  # what `diffusion-pref generate` runs
"""


def _killed_run(tmp_path, overrides, kill_on, kill_at, returncode):
    """Run generate in a subprocess that signals itself at the kill_at-th shard rename or scoring call."""
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), kill_on=kill_on, kill_at=kill_at,
                                         overrides=overrides, threads=torch.get_num_threads()))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == returncode, result.stderr[-2000:]
    out = Path(load_config(None, overrides).output.dir)
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")), result.stderr


def _covered(folder):
    return sorted(i for meta in read_shards(folder).values() for i in meta["prompt_indices"])


def test_sigkill_twice_then_restart_gives_exactly_the_expected_rows(tmp_path, tiny_sd_dir, reference_rows, pipe, monkeypatch):
    # Groups of 2 prompts (batch 6 = 2 prompts x 3 samples), a shard after each group: [0, 1], [2, 3], [4].
    overrides = _overrides(tmp_path, tiny_sd_dir, strategy="all_pairs")
    cfg = load_config(None, overrides)
    out = Path(cfg.output.dir)

    def killed_run(kill_on, kill_at):
        return _killed_run(tmp_path, overrides, kill_on, kill_at, returncode=-signal.SIGKILL)[0]

    # Killed while renaming the second shard: shard 0 complete, shard 1 half-written.
    files = killed_run("rename", 2)
    assert [f for f in files if f.endswith(".parquet")] == ["pairs-p000-00000.parquet"] and any(f.endswith(".tmp") for f in files), files
    # The restart is killed while scoring its second group ([4]), with the pairs of [2, 3] being encoded in a
    # worker thread and not yet written: its cleanup removed the half-written file, and it wrote nothing.
    files = killed_run("score", 2)
    assert files == ["pairs-p000-00000.parquet"], files
    assert _covered(out) == [0, 1]

    summary = generate(cfg, backbone=pipe, reward=MeanPixel())
    rows = reference_rows[0]
    assert summary["pairs_written"] == len(rows) and summary["prompts_missing"] == 0
    restarted = _rows(out)
    keys = [(r["prompt_index"], r["seed_0"], r["seed_1"]) for r in restarted]
    assert len(keys) == len(set(keys))  # no duplicates
    assert restarted == rows  # none lost, bit-identical images and scores
    # A further restart has nothing left to do and changes nothing (no pipeline is even loaded).
    monkeypatch.setattr(generate_module, "_load_backbone", None)
    generate(cfg, reward=MeanPixel())
    assert _rows(out) == rows


def test_sigterm_saves_the_finished_prompts_and_a_rerun_completes_the_same_rows(tmp_path, tiny_sd_dir, reference_rows,
                                                                                 pipe):
    # Groups [0, 1], [2, 3], [4]; shards of 1000 pairs or 32 prompts would hold everything until the end.
    overrides = _overrides(tmp_path, tiny_sd_dir, strategy="all_pairs", shard_size=1000)
    out = Path(load_config(None, overrides).output.dir)
    # SIGTERM while the second group is being scored: that group is finished, the third is never started.
    files, stderr = _killed_run(tmp_path, overrides, "term", 2, returncode=128 + signal.SIGTERM)
    assert "SIGTERM received: finishing the current batch" in stderr and "stopped by SIGTERM" in stderr
    assert "Traceback" not in stderr
    assert _covered(out) == [0, 1, 2, 3] and not any(f.endswith(".tmp") for f in files), files
    assert json.loads((out / "summary.json").read_text())["prompts_missing"] == 1

    summary = generate(load_config(None, overrides), backbone=pipe, reward=MeanPixel())
    assert summary["prompts_missing"] == 0 and _covered(out) == list(range(len(PROMPTS)))  # each prompt once
    assert _rows(out) == reference_rows[0]  # identical to the uninterrupted run: no row lost or duplicated


def test_sigkill_loses_at_most_flush_every_prompts(tmp_path, tiny_sd_dir, reference_rows, pipe):
    overrides = _overrides(tmp_path, tiny_sd_dir, strategy="all_pairs", shard_size=1000, flush_every_prompts=2)
    out = Path(load_config(None, overrides).output.dir)
    # SIGKILL while the third group ([4]) is scored: [0, 1] and [2, 3] were sampled, [0, 1] was due to be written
    # (2 prompts pending), [2, 3] was still being paired. Without flush_every_prompts nothing would be saved.
    _killed_run(tmp_path, overrides, "score", 3, returncode=-signal.SIGKILL)
    finished = 4
    assert _covered(out) == [0, 1] and finished - len(_covered(out)) <= 2
    generate(load_config(None, overrides), backbone=pipe, reward=MeanPixel())
    assert _rows(out) == reference_rows[0]


def test_stop_on_signal_asks_once_then_gives_the_signal_back():
    # Python's own Ctrl-C handler to start from: a job started in the background by a shell inherits SIGINT ignored
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_on_signal_round_trip()
    finally:
        signal.signal(signal.SIGINT, outer)


def _stop_on_signal_round_trip():
    before = signal.getsignal(signal.SIGINT)
    with generate_module._StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT" and stop.signal_number == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C interrupts at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_flush_every_prompts_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="generate.flush_every_prompts must be >= 1, got 0"):
        generate(_config(tmp_path, "unused", flush_every_prompts=0), reward=MeanPixel())


def test_two_processes_give_the_same_rows_as_one(tmp_path, pipe):
    # batch_size = samples_per_prompt: one prompt per batch, so both layouts see identical batches.
    single = _config(tmp_path, "unused", out="single", batch_size=SAMPLES, strategy="best_vs_each")
    generate(single, backbone=pipe, reward=MeanPixel())
    split = _config(tmp_path, "unused", out="split", batch_size=SAMPLES, strategy="best_vs_each")
    assert generate(split, backbone=pipe, reward=MeanPixel(), process_index=1, num_processes=2) is None
    summary = generate(split, backbone=pipe, reward=MeanPixel(), process_index=0, num_processes=2)
    by_process = {"pairs-p000": set(), "pairs-p001": set()}
    for path, meta in read_shards(tmp_path / "split").items():
        by_process[path.name[:10]] |= set(meta["prompt_indices"])
    assert by_process == {"pairs-p000": {0, 2, 4}, "pairs-p001": {1, 3}}
    assert _rows(tmp_path / "split") == _rows(tmp_path / "single") and len(_rows(tmp_path / "single")) == 10
    assert summary["prompts_missing"] == 0 and summary["pairs_written"] == 10


def test_prompts_without_pairs_are_recorded_and_not_redone(tmp_path):
    cfg = _config(tmp_path, "unused", prompts=PROMPTS[:2], min_gap=10.0)  # no gap of mean pixels reaches 10
    summary = generate(cfg, backbone=SeedColourBackbone(), reward=MeanPixel())
    assert summary["pairs_written"] == 0 and summary["pairs_filtered"]["min_gap"] == 2
    assert summary["prompts_done"] == 2 and summary["prompts_without_pairs"] == 2
    assert [p.name for p in read_shards(tmp_path / "out")] == ["pairs-p000-00000.empty.json"]
    again = generate(cfg, backbone=None, reward=MeanPixel())  # nothing to do: no model needed
    assert again == summary


def test_a_second_run_into_the_same_share_is_refused_while_the_first_runs(tmp_path):
    import fcntl

    cfg = _config(tmp_path, "unused", prompts=PROMPTS[:1])
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".lock-p000", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a running generate holds it
        with pytest.raises(RuntimeError, match="another generate run is writing the shards of process 0"):
            generate(cfg, backbone=SeedColourBackbone(), reward=MeanPixel())
    assert generate(cfg, backbone=SeedColourBackbone(), reward=MeanPixel())["prompts_missing"] == 0


def test_raising_max_prompts_extends_the_same_run(tmp_path):
    first = generate(_config(tmp_path, "unused", max_prompts=2), backbone=SeedColourBackbone(), reward=MeanPixel())
    assert first["prompts_done"] == 2 and first["prompts_total"] == 2
    full = generate(_config(tmp_path, "unused"), backbone=SeedColourBackbone(), reward=MeanPixel())
    assert full["prompts_done"] == len(PROMPTS) and full["prompts_missing"] == 0
    assert sorted(r["prompt_index"] for r in _rows(tmp_path / "out")) == list(range(len(PROMPTS)))


def test_restart_with_other_settings_is_refused(tmp_path):
    cfg = _config(tmp_path, "unused", prompts=PROMPTS[:1])
    generate(cfg, backbone=SeedColourBackbone(), reward=MeanPixel())
    with pytest.raises(ConfigError, match=r"already holds pairs made with other settings .*seed: 0 -> 5"):
        generate(_config(tmp_path, "unused", prompts=PROMPTS[:1], seed=5), backbone=SeedColourBackbone(), reward=MeanPixel())
    with pytest.raises(ConfigError, match=r"prompts: '\w+' -> '\w+'"):
        generate(_config(tmp_path, "unused", prompts=["another prompt"]), backbone=SeedColourBackbone(), reward=MeanPixel())


def test_bad_settings_and_prompt_files_fail_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt=1: a pair needs at least 2"):
        generate(_config(tmp_path, "unused", samples_per_prompt=1), reward=MeanPixel())
    with pytest.raises(ConfigError, match="min_gap=0.5 is above generate.max_gap=0.1"):
        generate(_config(tmp_path, "unused", min_gap=0.5, max_gap=0.1), reward=MeanPixel())
    with pytest.raises(ConfigError, match="generate.prompts is not set"):
        generate(load_config(None, [f"output.dir={tmp_path}"]), reward=MeanPixel())
    with pytest.raises(ValueError, match="model.pretrained=/nonexistent/sd: no such folder"):
        generate(_config(tmp_path, "/nonexistent/sd", out="bad-model"), reward=MeanPixel())
    with pytest.raises(ConfigError, match="sample.scheduler='NoSuchScheduler' is not a diffusers scheduler"):
        generate(_config(tmp_path, "/nonexistent/sd", out="bad-scheduler", scheduler="NoSuchScheduler"), reward=MeanPixel())
    cfg = _config(tmp_path, "unused")
    cfg.generate.prompts = str(tmp_path / "empty.txt")
    Path(cfg.generate.prompts).write_text("\n")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        generate(cfg, reward=MeanPixel())


def test_scheduler_dtype_and_vae_are_applied_on_load(tmp_path, tiny_sd_dir):
    cfg = _config(tmp_path, tiny_sd_dir, scheduler="EulerDiscreteScheduler", dtype="bf16")
    cfg.model.vae = str(Path(tiny_sd_dir) / "vae")
    loaded = generate_module._load_backbone(cfg, "cpu")
    sampler = loaded._sampling_scheduler(cfg.sample.scheduler)  # what sample(scheduler=...) swaps in
    assert type(sampler).__name__ == "EulerDiscreteScheduler"
    assert sampler.config.beta_schedule == "scaled_linear"  # built from the pipeline's own config
    assert loaded.denoiser.dtype == torch.bfloat16
    assert all(module.dtype == torch.bfloat16 for module in loaded.frozen.values())  # model.vae too
    cfg.model.vae = str(tmp_path / "no-vae")
    with pytest.raises(ValueError, match="could not load model.vae="):
        generate_module._load_backbone(cfg, "cpu")


def test_auto_dtype_is_fp16_on_any_cuda_device_and_fp32_elsewhere(monkeypatch):
    from diffusion_pref.config import resolve_runtime  # generate's one call: resolve_runtime(cfg.runtime, sampling=True)

    def dtype(*overrides):
        return resolve_runtime(load_config(None, list(overrides)).runtime, sampling=True).dtype

    assert dtype("runtime.device=cpu") == torch.float32
    assert dtype("runtime.device=cpu", "runtime.dtype=bf16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dtype("runtime.device=cuda:1") == dtype("runtime.device=cuda") == dtype() == torch.float16


def test_recipes_load(tmp_path):
    toy = load_config(REPO / "configs" / "toy_generate.yaml")
    assert toy.model.pretrained == "toy" and toy.reward.models == {"toy-fidelity": 1.0}  # no default pickscore
    assert len(read_prompts(toy.generate.prompts)) > 10
    sd = load_config(REPO / "configs" / "datagen_sd15_pickscore.yaml")
    assert sd.reward.models == {"pickscore": 1.0} and sd.sample.scheduler == "DPMSolverMultistepScheduler"
    assert sd.sample.safety_checker and not toy.sample.safety_checker  # SD1.5 datagen keeps its safety checker
    assert set(FILTER_REASONS) == {"tie", "min_winner_score", "min_gap", "max_gap"}


# ------------------------------------------------------------------------------------------------ safety checker


class BlockFirstOfEachCall(torch.nn.Module):
    """A stand-in for SD1.x's safety checker: blacks out the first image of every pipeline call and flags it."""

    device, dtype = torch.device("cpu"), torch.float32  # what a pipeline asks of its components

    def forward(self, images, clip_input):
        images = images.clone() if torch.is_tensor(images) else images.copy()  # [N, ...] tensor or numpy
        images[0] = 0
        return images, [i == 0 for i in range(len(images))]


def test_images_blocked_by_the_pipelines_safety_checker_never_enter_pairs(tmp_path, tiny_sd_dir):
    from diffusers import DiffusionPipeline
    from transformers import CLIPImageProcessor

    from diffusion_pref.pipelines.stable_diffusion import StableDiffusionBackbone

    pipeline = DiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipeline.register_modules(safety_checker=BlockFirstOfEachCall(), feature_extractor=CLIPImageProcessor())
    # Scores that would make every blocked (black) image its prompt's loser, were it kept.
    reward = MeanPixel()
    summary = generate(_config(tmp_path, tiny_sd_dir, strategy="all_pairs"), backbone=StableDiffusionBackbone(pipeline),
                       reward=reward)

    # batch_size 6 = 2 prompts x 3 samples per call: sample 0 of prompts 0, 2 and 4 is blocked.
    blocked = {sample_seed(0, p, 0) for p in (0, 2, 4)}
    rows = _rows(tmp_path / "out")
    used = {row[f"seed_{k}"] for row in rows for k in (0, 1)}
    assert not used & blocked
    assert all(_pixels(row[f"jpg_{k}"]).max() > 0 for row in rows for k in (0, 1))
    # prompts 0, 2, 4 keep one pair of their two other samples, prompts 1 and 3 all three pairs.
    assert len(rows) == 3 * 1 + 2 * 3
    assert summary["samples_blocked_by_safety_checker"] == 3 and summary["samples"] == 15


def test_sample_safety_checker_decides_whether_a_shipped_checker_is_loaded(tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    tiny = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1)
    config = CLIPConfig(text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=16), projection_dim=8)
    pipe.register_modules(safety_checker=StableDiffusionSafetyChecker(config),
                          feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    pipe.save_pretrained(tmp_path / "sd-with-checker")  # an SD1.x folder that ships a safety checker
    for keep in (True, False, None):  # None: generate's own policy, the checker the model ships
        cfg = load_config(None, [f"model.pretrained={tmp_path / 'sd-with-checker'}", "sample.steps=1",
                                 *([] if keep is None else [f"sample.safety_checker={str(keep).lower()}"])])
        loaded = generate_module._load_backbone(cfg, "cpu")
        ran = []
        choose = loaded._safety_checker_for
        loaded._safety_checker_for = lambda wanted: ran.append(choose(wanted)) or ran[-1]
        images = generate_module._sample(loaded, ["a red cat"], [0], cfg.sample)
        assert len(images) == 1 and len(images.blocked) == 1
        assert isinstance(ran[0], StableDiffusionSafetyChecker) == (keep is not False)


def test_prompts_longer_than_the_text_encoder_takes_are_counted_once(tmp_path, capsys):
    from diffusion_pref.testing import tiny_clip_tokenizer

    backbone = SeedColourBackbone()
    backbone.tokenizer = tokenizer = tiny_clip_tokenizer()  # cuts at 16 tokens, as a pipeline's encode_prompt does
    long = "a red cat on a blue mat with a green hat and a yellow bat"
    prompts = ["a red cat", long, "a blue dog", long + " again"]
    assert [len(tokenizer(p).input_ids) > tokenizer.model_max_length for p in prompts] == [False, True, False, True]
    summary = generate(_config(tmp_path, "unused", prompts=prompts), backbone=backbone, reward=MeanPixel())
    assert summary["prompts_cut"] == 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["prompts_cut"] == 2
    printed = capsys.readouterr().out
    assert printed.count("longer than the text encoder takes") == 1 and "warning: 2 prompts" in printed
    again = generate(_config(tmp_path, "unused", prompts=prompts), backbone=None, reward=MeanPixel())
    assert again["prompts_cut"] == 2  # nothing left to sample, no model loaded: the finished run's count stays


# ------------------------------------------------------------------------------------------------ one sampling path


def _sample_as_before(cfg, prompts, seeds):
    """What generate did before it sampled through the backbone (its own _load_pipeline and _sample_images): the
    pipeline loaded by diffusers in generate.dtype, the scheduler class built from the pipeline's scheduler config,
    the LoRA loaded on top, one CPU generator per seed, one call per batch."""
    import diffusers
    from diffusers import DiffusionPipeline

    from diffusion_pref.config import resolve_runtime

    gen, sample = cfg.generate, cfg.sample
    dtype = resolve_runtime(cfg.runtime, sampling=True).dtype
    pipe = DiffusionPipeline.from_pretrained(cfg.model.pretrained, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if sample.scheduler:
        pipe.scheduler = getattr(diffusers, sample.scheduler).from_config(pipe.scheduler.config)
    if gen.lora:
        pipe.load_lora_weights(gen.lora)
    images = []
    for start in range(0, len(prompts), sample.batch_size):
        size = {"height": sample.resolution, "width": sample.resolution} if sample.resolution else {}
        images += pipe(prompt=prompts[start:start + sample.batch_size], num_inference_steps=sample.steps,
                       guidance_scale=sample.guidance_scale, output_type="pil",
                       generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + sample.batch_size]],
                       **size).images
    return images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_generate_stores_the_images_it_sampled_before_the_backbone_protocol(tmp_path, tiny_sd_dir, tiny_sdxl_dir,
                                                                            family):
    from peft import LoraConfig

    from diffusion_pref.pipelines import load_backbone

    folder = {"sd": tiny_sd_dir, "sdxl": tiny_sdxl_dir}[family]
    trained = load_backbone(load_config(None, [f"model.pretrained={folder}"]).model)
    trained.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=trained.default_lora_targets))
    trained.save_lora(tmp_path / "lora", trained.denoiser)
    prompts = PROMPTS[:2]
    cfg = _config(tmp_path, folder, prompts=prompts, strategy="all_pairs", scheduler="EulerDiscreteScheduler",
                  dtype="bf16", resolution=48, lora=tmp_path / "lora", guidance_scale=4.0)
    generate(cfg, reward=MeanPixel())
    jobs = [(p, s) for p in range(len(prompts)) for s in range(SAMPLES)]  # one batch of 6, as generate samples it
    before = _sample_as_before(cfg, [prompts[p] for p, _ in jobs], [sample_seed(0, p, s) for p, s in jobs])
    expected = {sample_seed(0, p, s): np.asarray(image) for (p, s), image in zip(jobs, before)}
    rows = _rows(tmp_path / "out")
    assert len(rows) == len(prompts) * 3
    for row in rows:
        for side in (0, 1):
            stored = _pixels(row[f"jpg_{side}"])
            assert stored.shape == (48, 48, 3) and np.array_equal(stored, expected[row[f"seed_{side}"]])

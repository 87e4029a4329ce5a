"""benchmarks/alignment.py: its pure pieces (label flipping, the two-level bootstrap, time to a target, the share of
the clean gain and its interval)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from alignment import (flip_labels, prompt_gains, share_interval, share_of_clean_gain, time_to_reach,  # noqa: E402
                       two_level_bootstrap)


def _pairs(n: int) -> pd.DataFrame:
    label = (np.arange(n) % 2).astype(float)
    return pd.DataFrame({"caption": [f"c{i}" for i in range(n)], "label_0": label, "label_1": 1 - label,
                         "score_0": np.arange(n, dtype=float), "score_1": -np.arange(n, dtype=float)})


def test_flip_labels_flips_the_recorded_share_and_keeps_columns_consistent():
    table = _pairs(50)
    noisy, flipped = flip_labels(table, 0.2, seed=3)
    assert len(flipped) == 10 and flipped == sorted(set(flipped))
    again, flipped_again = flip_labels(table, 0.2, seed=3)
    assert flipped_again == flipped and again.equals(noisy)  # the seed names the flips
    assert flip_labels(table, 0.2, seed=4)[1] != flipped
    changed = np.flatnonzero(noisy["label_0"].to_numpy() != table["label_0"].to_numpy()).tolist()
    assert changed == flipped
    rows = table.index[flipped]
    assert (noisy.loc[rows, "label_0"] == 1 - table.loc[rows, "label_0"]).all()
    assert (noisy.loc[rows, "label_1"] == table.loc[rows, "label_0"]).all()
    # scores swap with the label, so a score-derived soft label agrees with the flipped hard one
    assert (noisy.loc[rows, "score_0"].to_numpy() == table.loc[rows, "score_1"].to_numpy()).all()
    keep = table.index.difference(rows)
    assert noisy.loc[keep].equals(table.loc[keep])
    assert flip_labels(table, 0.0, seed=0)[1] == []
    with pytest.raises(ValueError, match="flip rate"):
        flip_labels(table, 1.5, seed=0)


def test_two_level_bootstrap_matches_an_explicit_resampling_loop():
    rng = np.random.default_rng(0)
    pairs = rng.integers(20, 30, size=(3, 7)).astype(float)
    wins = np.floor(pairs * rng.uniform(0.3, 0.9, size=(3, 7)))
    low, high = two_level_bootstrap(wins, pairs, samples=400, seed=5)
    # the same draws, summed the slow way
    draw = np.random.default_rng(5)
    s_idx = draw.integers(0, 3, size=(400, 3))
    p_idx = draw.integers(0, 7, size=(400, 7))
    boot = [wins[np.ix_(s, p)].sum() / pairs[np.ix_(s, p)].sum() for s, p in zip(s_idx, p_idx)]
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert low <= wins.sum() / pairs.sum() <= high
    # a seed whose outcome differs a lot widens the interval against resampling prompts alone
    spread = wins.copy()
    spread[0] = 0.0
    wide = two_level_bootstrap(spread, pairs, samples=400, seed=5)
    one_seed = two_level_bootstrap(spread[1:2], pairs[1:2], samples=400, seed=5)
    assert wide[1] - wide[0] > one_seed[1] - one_seed[0]


def test_time_to_reach_interpolates_and_share_of_clean_gain():
    assert time_to_reach([10, 20, 30], [0.5, 0.6, 0.7], 0.65) == pytest.approx(25.0)
    assert time_to_reach([10, 20], [0.7, 0.8], 0.65) == 10.0
    assert time_to_reach([10, 20], [0.5, 0.6], 0.65) is None
    assert share_of_clean_gain(0.05, 0.1) == pytest.approx(0.5)
    assert share_of_clean_gain(0.05, 0.0) is None


def test_share_interval_matches_an_explicit_resampling_loop():
    rng = np.random.default_rng(1)
    n_noisy, n_clean = rng.integers(20, 25, size=(2, 6)).astype(float), rng.integers(20, 25, size=(3, 6)).astype(float)
    noisy = n_noisy * rng.uniform(0.02, 0.08, size=(2, 6))
    clean = n_clean * rng.uniform(0.1, 0.2, size=(3, 6))
    low, high = share_interval(noisy, n_noisy, clean, n_clean, samples=300, seed=7)
    draw = np.random.default_rng(7)  # the same draws in the same order: prompts, noisy seeds, clean seeds
    p_idx = draw.integers(0, 6, size=(300, 6))
    a_idx = draw.integers(0, 2, size=(300, 2))
    b_idx = draw.integers(0, 3, size=(300, 3))
    boot = [(noisy[np.ix_(a, p)].sum() / n_noisy[np.ix_(a, p)].sum()) / (clean[np.ix_(b, p)].sum() / n_clean[np.ix_(b, p)].sum())
            for p, a, b in zip(p_idx, a_idx, b_idx)]
    assert (low, high) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    point = (noisy.sum() / n_noisy.sum()) / (clean.sum() / n_clean.sum())
    assert low <= point <= high
    # the same gains noisy and clean: every draw shares the prompts, so with one seed each the share is exactly 1
    assert share_interval(clean[:1], n_clean[:1], clean[:1], n_clean[:1], samples=50) == pytest.approx((1.0, 1.0))
    assert share_interval(noisy[:1], n_noisy[:1], np.zeros((1, 6)), n_noisy[:1], samples=50) is None
    with pytest.raises(ValueError, match="same prompts"):
        share_interval(noisy, n_noisy, clean[:, :5], n_clean[:, :5])


def test_prompt_gains_sums_tuned_minus_base_per_prompt():
    final = {"pair_keys": [[1, 0], [0, 0], [1, 1], [0, 1], [2, 0]], "scores": [1.0, 0.5, 1.0, 1.0, 0.0],
             "base_scores": [0.5, 0.5, 1.0, 0.5, 0.5]}
    assert prompt_gains(final) == ([0.5, 0.5, -0.5], [2, 2, 1])

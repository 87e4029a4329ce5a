"""Seeds and pairs of generated samples, as pure functions: the seed of each sample, the (winner, loser) pairs of one
prompt's scored candidates and why the others were left out, rejection sampling (RSO), and which column holds
the winner.

``diffusion-pref generate`` (:mod:`diffusion_pref.commands.generate`, which hands these names on) and the prompt
optimizer (:mod:`diffusion_pref.prompt_opt.generate`, :mod:`diffusion_pref.prompt_opt.evaluate`) share them.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from typing import List, Optional, Sequence, Tuple

# Why a candidate pair was not written, in the order the checks run (a pair counts under the first that fails).
FILTER_REASONS = ("tie", "min_winner_score", "min_gap", "max_gap")


def sample_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample: a 32-bit hash of (base seed, prompt index, sample index).

    Hashing (rather than e.g. ``base + prompt * N + sample``) keeps seeds unrelated across prompts and unchanged
    when ``samples_per_prompt`` grows; 32 bits fit every RNG (torch, numpy, random).
    """
    digest = hashlib.blake2b(f"{base_seed}/{prompt_index}/{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def winner_first(seed_w: int, seed_l: int) -> bool:
    """Whether the winner goes into column ``jpg_0``: a fixed coin flip per pair, so no position always wins."""
    return hashlib.blake2b(f"{seed_w}/{seed_l}".encode(), digest_size=1).digest()[0] % 2 == 0


def rso_select(scores: Sequence[float], keep: int, beta: float, rng: random.Random) -> List[int]:
    """Statistical rejection sampling (Liu et al. 2023, RSO): indices of up to ``keep`` accepted candidates.

    Draws a remaining candidate uniformly and accepts it with probability ``exp((r - r_max) / beta)``, where
    ``r_max`` is the best remaining score, until ``keep`` are accepted. This samples from the policy tilted by
    ``exp(r / beta)``: small beta keeps the best samples, large beta is close to a uniform subset. The best
    remaining candidate is always accepted when drawn, so the loop ends. Returns sorted indices.
    """
    if beta <= 0:
        raise ValueError(f"rso_beta must be > 0, got {beta}")
    remaining = list(range(len(scores)))
    accepted: List[int] = []
    while remaining and len(accepted) < keep:
        best = max(scores[i] for i in remaining)
        i = remaining[rng.randrange(len(remaining))]
        if rng.random() < math.exp((scores[i] - best) / beta):
            accepted.append(i)
            remaining.remove(i)
    return sorted(accepted)


def form_pairs(
    scores: Sequence[float],
    strategy: str,
    min_winner_score: Optional[float] = None,
    min_gap: Optional[float] = None,
    max_gap: Optional[float] = None,
    *,
    min_loser_score: Optional[float] = None,
    components: Optional[Sequence[Sequence[float]]] = None,
) -> Tuple[List[Tuple[int, int]], Counter]:
    """(winner, loser) index pairs of one prompt's candidates, and counts of what was left out and why.

    Pairs are ranked by ``scores``; the filters apply to ``scores``, or, when ``components`` (one score list per
    reward model, aligned with ``scores``) is given, to every one of those lists: a pair must pass on each.
    NaN scores are left out first (``nan_scores``). Among equal best (or worst) scores the lowest index is taken,
    so the result does not depend on anything but the scores. Counter keys: ``pairs_considered``,
    ``pairs_written``, ``nan_scores`` and one per :data:`FILTER_REASONS`.
    """
    stats: Counter = Counter()
    valid = [i for i, s in enumerate(scores) if not math.isnan(s)]
    stats["nan_scores"] = len(scores) - len(valid)
    candidates: List[Tuple[int, int]] = []
    if len(valid) >= 2:
        best = max(valid, key=lambda i: (scores[i], -i))
        if strategy == "best_vs_worst":
            worst = min(valid, key=lambda i: (scores[i], i))
            candidates = [(best, worst if worst != best else next(i for i in valid if i != best))]
        elif strategy == "best_vs_each":
            candidates = [(best, j) for j in valid if j != best]
        elif strategy == "all_pairs":
            candidates = [
                (i, j) if scores[i] >= scores[j] else (j, i) for a, i in enumerate(valid) for j in valid[a + 1:]
            ]
        else:
            raise ValueError(f"unknown pairing strategy {strategy!r}; use best_vs_worst, all_pairs or best_vs_each")
    if min_loser_score is not None:
        stats["min_loser_score"] = 0  # so that the summary lists the filter when it is set
    lists = [scores] if components is None else list(components)
    pairs = []
    for w, l in candidates:
        gap = scores[w] - scores[l]
        if gap == 0:
            reason = "tie"
        elif min_winner_score is not None and any(c[w] < min_winner_score for c in lists):
            reason = "min_winner_score"
        elif min_loser_score is not None and any(c[l] < min_loser_score for c in lists):
            reason = "min_loser_score"
        elif min_gap is not None and any(c[w] - c[l] < min_gap for c in lists):
            reason = "min_gap"
        elif max_gap is not None and any(c[w] - c[l] > max_gap for c in lists):
            reason = "max_gap"
        else:
            pairs.append((w, l))
            continue
        stats[reason] += 1
    stats["pairs_considered"] = len(candidates)
    stats["pairs_written"] = len(pairs)
    return pairs, stats


__all__ = ["FILTER_REASONS", "form_pairs", "rso_select", "sample_seed", "winner_first"]

"""SmPO soft labels: per-pair P(winner preferred) from reward scores, computed once and stored with the run.

SmPO (Lu et al., arXiv 2506.02698) scales each pair's DPO logit by ``gamma * (2p - 1)`` with
``p = sigmoid(r'_w - r'_l)``, where ``r'`` are reward scores min-max normalised over the whole dataset (both
images of every kept pair). The SmPO code scores Pick-a-Pic with PickScore (raw cosine) and hard-codes the
dataset range [0.11543526500463486, 0.28201571106910706]; pass that as ``score_range`` to reproduce it.

Which image is the winner (``winner``):

- ``reward`` (the SmPO code): the reward model decides. The data layer orients every pair by its human label, so
  here ``p = sigmoid(r'_w - r'_l)`` for the pair as stored, which is below 0.5 where the reward model disagrees
  with the human. The smpo loss ``-log sigmoid(gamma (2p - 1) beta h)`` is unchanged by swapping the two sides
  together with ``p -> 1 - p`` (h flips sign, so does 2p - 1), so this equals training on the reward-oriented
  pair with ``p >= 0.5``; no pair needs re-ordering.
- ``human``: the human label decides the direction and the reward gap only the confidence:
  ``p = sigmoid(|r'_w - r'_l|) >= 0.5``.

Scores come from the dataset's ``score_0`` / ``score_1`` columns (``scores="dataset"``) or from a reward model
run over every kept pair before training (``scores="reward_model"``, any spec ``load_reward`` takes);
``"auto"`` uses the columns when the dataset has them. The result is written to ``soft_labels.parquet``
(row, score_w, score_l, p) plus ``soft_labels.json`` (range, settings, data identity) in the run folder and
read back on resume, so an expensive reward pass runs once per run.

Example (the trainer calls ``soft_labels_for_run(cfg, source)``, which reads these settings from the config)::

    from diffusion_pref.data.pairs import PairSource
    from diffusion_pref.soft_labels import prepare_soft_labels
    labels = prepare_soft_labels(PairSource(cfg.data), out_dir=cfg.output.dir, winner="reward")
    p = labels.lookup(batch["rows"])          # [B] float32, one p per pair
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

WINNER_MODES = ("reward", "human")
SCORE_SOURCES = ("auto", "dataset", "reward_model")
TABLE_FILE = "soft_labels.parquet"
META_FILE = "soft_labels.json"


def minmax_range(scores_w: Sequence[float], scores_l: Sequence[float]) -> Tuple[float, float]:
    """(min, max) over both images of every pair; the range the SmPO normalisation divides by."""
    values = [float(v) for v in scores_w] + [float(v) for v in scores_l]
    if not values:
        raise ValueError("soft labels: no scores to normalise (the dataset has no kept pairs).")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("soft labels: a reward score is NaN or infinite; fix the score columns or the reward model.")
    low, high = min(values), max(values)
    if not high > low:
        raise ValueError(f"soft labels: every reward score equals {low}; min-max normalisation needs a spread of "
                         "scores (is the score column constant?).")
    return low, high


def soft_label_probs(scores_w, scores_l, low: float, high: float, winner: str = "reward"):
    """``p`` per pair from raw scores: ``sigmoid(r'_w - r'_l)`` (reward) or ``sigmoid(|r'_w - r'_l|)`` (human).

    ``r' = (s - low) / (high - low)``. Returns float64 numpy ``[pairs]``.
    """
    import numpy as np

    if winner not in WINNER_MODES:
        raise ValueError(f"soft labels: winner={winner!r} is not one of {', '.join(WINNER_MODES)}.")
    if not high > low:
        raise ValueError(f"soft labels: score range [{low}, {high}] is empty; high must exceed low.")
    s_w = np.asarray(scores_w, dtype=np.float64)
    s_l = np.asarray(scores_l, dtype=np.float64)
    if s_w.shape != s_l.shape or s_w.ndim != 1:
        raise ValueError(f"soft labels: scores_w {s_w.shape} and scores_l {s_l.shape} must be matching 1-D arrays.")
    gap = (s_w - s_l) / (high - low)  # r'_w - r'_l: the shift by `low` cancels
    if winner == "human":
        gap = np.abs(gap)
    return 1.0 / (1.0 + np.exp(-gap))


@dataclass
class SoftLabels:
    """Per-row soft labels of one dataset; ``lookup(rows)`` gives the batch's ``soft_label`` tensor."""

    rows: Any  # numpy int64 [n], global dataset row ids (PreferencePair.row / batch["rows"])
    p: Any  # numpy float64 [n], P(the stored winner is preferred)
    scores_w: Any  # numpy float64 [n], raw scores of the stored winner / loser
    scores_l: Any
    low: float
    high: float
    winner: str
    scores: str  # where the scores came from: dataset | reward_model

    def __post_init__(self):
        import numpy as np

        order = np.argsort(self.rows, kind="stable")
        self._sorted_rows = np.asarray(self.rows)[order]
        self._sorted_p = np.asarray(self.p)[order]

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, rows):
        """``rows`` (tensor or sequence of global row ids, ``[B]``) -> float32 tensor ``[B]`` of p, one per pair."""
        import numpy as np
        import torch

        wanted = np.asarray(rows.tolist() if hasattr(rows, "tolist") else list(rows), dtype=np.int64)
        index = np.searchsorted(self._sorted_rows, wanted)
        index = np.clip(index, 0, len(self._sorted_rows) - 1)
        missing = wanted[self._sorted_rows[index] != wanted]
        if missing.size:
            raise KeyError(f"soft labels: no soft label for dataset row(s) {missing[:5].tolist()}; the stored "
                           f"{TABLE_FILE} was built for other data. Delete it (and {META_FILE}) to rebuild.")
        return torch.tensor(self._sorted_p[index], dtype=torch.float32)

    def save(self, out_dir, extra_meta: Optional[Dict[str, Any]] = None) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = pa.table({"row": self.rows, "score_w": self.scores_w, "score_l": self.scores_l, "p": self.p})
        pq.write_table(table, out / TABLE_FILE)
        meta = {"low": self.low, "high": self.high, "winner": self.winner, "scores": self.scores,
                "pairs": len(self), "p_mean": float(self.p.mean()), **(extra_meta or {})}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return out / TABLE_FILE

    @classmethod
    def load(cls, out_dir) -> "SoftLabels":
        import pyarrow.parquet as pq

        out = Path(out_dir)
        meta = json.loads((out / META_FILE).read_text())
        table = pq.read_table(out / TABLE_FILE)
        col = {name: table.column(name).to_numpy() for name in ("row", "score_w", "score_l", "p")}
        return cls(rows=col["row"], p=col["p"], scores_w=col["score_w"], scores_l=col["score_l"], low=meta["low"],
                   high=meta["high"], winner=meta["winner"], scores=meta["scores"])


def _dataset_scores(source):
    """(rows, score_w, score_l) from the score columns, without decoding any image."""
    rows, s_w, s_l = [], [], []
    for block in source.blocks:
        for i, row in enumerate(block.rows):
            s0, s1 = block.scores[i]
            rows.append(row)
            s_w.append(s1 if block.swap[i] else s0)
            s_l.append(s0 if block.swap[i] else s1)
    return rows, s_w, s_l


def _reward_model_scores(source, reward, batch_size: int):
    """(rows, score_w, score_l) by scoring every kept pair's two images with ``reward.score(prompts, images)``."""
    from tqdm.auto import tqdm

    items = [(b, i) for b, block in enumerate(source.blocks) for i in range(len(block.rows))]
    rows, s_w, s_l = [], [], []
    for start in tqdm(range(0, len(items), batch_size), desc="soft labels: scoring pairs"):
        # Rows that fail to decode (data.on_bad_row=skip) are skipped and counted by the trainer's reads too, so
        # they never need a label.
        pairs, _ = source.read(items[start:start + batch_size])
        if not pairs:
            continue
        captions = [p.caption for p in pairs]
        scores = reward.score(captions + captions, [p.image_w for p in pairs] + [p.image_l for p in pairs])
        scores = [float(v) for v in scores.tolist()]
        rows.extend(p.row for p in pairs)
        s_w.extend(scores[:len(pairs)])
        s_l.extend(scores[len(pairs):])
    return rows, s_w, s_l


def compute_soft_labels(source, *, winner: str = "reward", scores: str = "auto", reward=None,
                        score_range: Optional[Sequence[float]] = None, batch_size: int = 16) -> SoftLabels:
    """Soft labels for every kept pair of ``source`` (a :class:`~diffusion_pref.data.pairs.PairSource`).

    ``reward``: an object with ``score(prompts, images)``, a spec for ``load_reward`` (name or ``{name:
    weight}``), or a zero-argument function returning a scorer (so nothing loads when the columns suffice);
    needed when ``scores`` is ``reward_model`` (or ``auto`` without score columns).
    ``score_range``: fixed ``[low, high]`` instead of the dataset's min/max (the SmPO code's PickScore range).
    """
    import numpy as np

    if winner not in WINNER_MODES:
        raise ValueError(f"soft labels: winner={winner!r} is not one of {', '.join(WINNER_MODES)}.")
    if scores not in SCORE_SOURCES:
        raise ValueError(f"soft labels: scores={scores!r} is not one of {', '.join(SCORE_SOURCES)}.")
    if scores == "auto":
        scores = "dataset" if source.has_scores else "reward_model"
    if scores == "dataset":
        if not source.has_scores:
            raise ValueError(f"soft labels: data.source={source.cfg.source} has no score columns (score_0, score_1; "
                             "map yours with data.columns.score_0=...); score the pairs with a reward model instead.")
        rows, s_w, s_l = _dataset_scores(source)
    else:
        if reward is None:
            raise ValueError("soft labels: the dataset has no score columns and no reward model was given; set the "
                             "reward models (reward.models) or add score_0/score_1 columns.")
        if callable(reward) and not hasattr(reward, "score"):
            reward = reward()
        elif not hasattr(reward, "score"):
            from diffusion_pref.reward_models import load_reward

            reward = load_reward(reward)
        rows, s_w, s_l = _reward_model_scores(source, reward, batch_size)
    if score_range is not None:
        low, high = (float(v) for v in score_range)
    else:
        low, high = minmax_range(s_w, s_l)
    p = soft_label_probs(s_w, s_l, low, high, winner)
    return SoftLabels(rows=np.asarray(rows, dtype=np.int64), p=p, scores_w=np.asarray(s_w, dtype=np.float64),
                      scores_l=np.asarray(s_l, dtype=np.float64), low=low, high=high, winner=winner, scores=scores)


def prepare_soft_labels(source, out_dir, *, winner: str = "reward", scores: str = "auto", reward=None,
                        score_range: Optional[Sequence[float]] = None, batch_size: int = 16,
                        reward_id: Any = None) -> SoftLabels:
    """Load the run's stored soft labels if they match these settings and data, else compute and store them.

    ``reward_id`` names the reward model in the stored settings (default: the spec, or the scorer's ``name``).
    """
    out = Path(out_dir)
    if reward_id is None:
        reward_id = reward if isinstance(reward, (str, dict)) else getattr(reward, "name", None)
    settings = {"winner": winner, "scores_requested": scores,
                "score_range": list(score_range) if score_range is not None else None,
                "reward": reward_id, "data": source.identity()}
    settings = json.loads(json.dumps(settings, default=str))  # what the JSON file will hold, for comparison
    if (out / META_FILE).is_file() and (out / TABLE_FILE).is_file():
        stored = json.loads((out / META_FILE).read_text())
        if stored.get("settings") == settings:
            return SoftLabels.load(out)
        raise ValueError(f"soft labels: {out / META_FILE} was built with other settings or data than this run; "
                         f"use another output.dir or delete {META_FILE} and {TABLE_FILE} there to rebuild them.")
    labels = compute_soft_labels(source, winner=winner, scores=scores, reward=reward, score_range=score_range,
                                 batch_size=batch_size)
    labels.save(out, extra_meta={"settings": settings})
    return labels


def soft_labels_for_run(cfg, source, device: Any = "cpu") -> SoftLabels:
    """The trainer's one call: soft labels for ``source`` stored in ``cfg.output.dir``, settings from ``cfg``.

    Reads ``loss.soft_label_winner``, ``loss.soft_label_scores``, ``loss.soft_label_range`` ([low, high], or None
    for the dataset's min/max) and ``cfg.reward``; the reward model is loaded only if the scores must be computed.
    """
    from diffusion_pref.reward_models import load_reward_from_config, reward_spec

    loss = cfg.loss
    return prepare_soft_labels(
        source, cfg.output.dir, winner=loss.soft_label_winner, scores=loss.soft_label_scores,
        reward=lambda: load_reward_from_config(cfg.reward, device),
        score_range=list(loss.soft_label_range) if loss.soft_label_range is not None else None,
        batch_size=cfg.reward.batch_size, reward_id=reward_spec(cfg.reward),
    )


__all__ = [
    "SoftLabels",
    "compute_soft_labels",
    "minmax_range",
    "prepare_soft_labels",
    "soft_label_probs",
    "soft_labels_for_run",
]

"""SmPO soft labels: per-pair P(winner preferred) from reward scores, computed once and stored with the run.

SmPO (Lu et al., arXiv 2506.02698) scales each pair's DPO logit by ``gamma * (2p - 1)`` with
``p = sigmoid(r'_w - r'_l)``, where ``r'`` are reward scores min-max normalised over the whole dataset (both
images of every kept pair). The SmPO code scores Pick-a-Pic with PickScore as a raw cosine and hard-codes the
dataset range [0.11543526500463486, 0.28201571106910706] in those units. Our ``pickscore`` scorer returns
``exp(logit_scale) * cosine`` (the official PickScore score; exp(logit_scale) = 100 for PickScore_v1, CLIP's cap), so
the same range in our units is :data:`SMPO_PICKSCORE_RANGE` = [11.543526500463486, 28.201571106910706]. A fixed
``score_range`` is always in the units of the scores it normalises; a score outside it (beyond
:data:`RANGE_SLACK` of its width) is an error naming the row, which is how a range in the wrong units shows up.

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
``"auto"`` uses the columns when the dataset has them. Audio pairs (``source.media == "audio"``, decoded with the
model's front end: the trainer scores them once the backbone is loaded) are scored on each side's decoded mono
waveform at its own sample rate, ``reward.score(prompts, waves, sample_rate=rate)`` (``tones-fidelity``, ``clap``).
Rows that do not decode are skipped with ``data.on_bad_row=skip`` (training skips the same rows) and counted
(``skipped`` in ``soft_labels.json`` and the score cache). A reward model's raw scores are stored once per dataset and
reward model (:class:`ScoreCache`; the trainer keeps them beside the data cache, ``data.cache_dir`` or
``output.dir/cache``) and reused by every later run, whatever its winner or range settings. The run's labels are
written to ``soft_labels.parquet`` (row, score_w, score_l, p) plus ``soft_labels.json`` (range, settings, data
identity) in the run folder and read back on resume.

Example (the trainer calls ``soft_labels_for_run(source, cfg.output.dir, cfg.loss, cfg.reward)``, which reads these
settings from the loss and reward sections)::

    from diffusion_pref.data.pairs import PairSource
    from diffusion_pref.soft_labels import prepare_soft_labels
    labels = prepare_soft_labels(PairSource(cfg.data), out_dir=cfg.output.dir, winner="reward")
    p = labels.lookup(batch["rows"])          # [B] float32, one p per pair
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, get_args

from diffusion_pref.config import SoftLabelScores, SoftLabelWinner

from diffusion_pref.fileio import atomic_write

logger = logging.getLogger(__name__)

WINNER_MODES = get_args(SoftLabelWinner)  # the choices are declared once, in diffusion_pref.config
SCORE_SOURCES = get_args(SoftLabelScores)
TABLE_FILE = "soft_labels.parquet"
META_FILE = "soft_labels.json"
# The SmPO code's hard-coded PickScore range (raw cosine, the dataset's min and max), and the same range in the
# units of our pickscore scorer (exp(logit_scale) * cosine with exp(logit_scale) = 100).
SMPO_PICKSCORE_RANGE_COSINE = (0.11543526500463486, 0.28201571106910706)
SMPO_PICKSCORE_RANGE = (11.543526500463486, 28.201571106910706)
# How far outside a fixed range (as a fraction of its width) a score may lie: scores recomputed on other hardware
# or in another precision than the range differ by rounding; a range in other units misses by orders of magnitude.
RANGE_SLACK = 0.01


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


def _where(source, row: int) -> str:
    """A dataset row as the data layer names it: file, row group, row, global id."""
    for block in source.blocks:
        if row in block.rows:
            i = block.rows.index(row)
            return f"{block.file}: row {block.local_rows[i]} of row group {block.row_group} (dataset row {row})"
    return f"dataset row {row}"


def check_score_range(rows, scores_w, scores_l, low: float, high: float, *, units: str = "the scores' units",
                      where: Callable[[int], str] = lambda row: f"dataset row {row}") -> None:
    """Raise ``ValueError`` naming the first row whose score lies outside ``[low, high]`` (widened by
    :data:`RANGE_SLACK` of its width): a fixed range must be in the units of the scores it normalises."""
    import numpy as np

    slack = RANGE_SLACK * (high - low)
    for side, values in (("winner", scores_w), ("loser", scores_l)):
        values = np.asarray(values, dtype=np.float64)
        outside = np.flatnonzero((values < low - slack) | (values > high + slack))
        if outside.size:
            k = int(outside[0])
            raise ValueError(
                f"soft labels: {where(int(rows[k]))}: the {side}'s score {values[k]:.6g} is outside "
                f"loss.soft_label_range [{low:.6g}, {high:.6g}] ({outside.size} {side} score(s) outside in all). The "
                f"range must be in the units of the scores ({units}); SmPO's raw-cosine PickScore range "
                f"{list(SMPO_PICKSCORE_RANGE_COSINE)} is {list(SMPO_PICKSCORE_RANGE)} in our pickscore's units "
                "(100 x cosine). Fix the range, or unset loss.soft_label_range to normalise by the data's own min/max.")


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
    skipped: int = 0  # rows the reward model could not score because they did not decode (data.on_bad_row=skip)

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
        atomic_write(out / TABLE_FILE, lambda tmp: pq.write_table(table, tmp))
        meta = {"low": self.low, "high": self.high, "winner": self.winner, "scores": self.scores,
                "pairs": len(self), "p_mean": float(self.p.mean()), **(extra_meta or {})}
        if self.skipped:
            meta["skipped"] = self.skipped
        atomic_write(out / META_FILE, json.dumps(meta, indent=2))
        return out / TABLE_FILE

    @classmethod
    def load(cls, out_dir) -> "SoftLabels":
        import pyarrow.parquet as pq

        out = Path(out_dir)
        meta = json.loads((out / META_FILE).read_text())
        table = pq.read_table(out / TABLE_FILE)
        col = {name: table.column(name).to_numpy() for name in ("row", "score_w", "score_l", "p")}
        return cls(rows=col["row"], p=col["p"], scores_w=col["score_w"], scores_l=col["score_l"], low=meta["low"],
                   high=meta["high"], winner=meta["winner"], scores=meta["scores"], skipped=meta.get("skipped", 0))


@dataclass
class ScoreCache:
    """A reward model's raw scores of a dataset's kept pairs, in ``directory`` (``scores.parquet`` with row,
    score_w, score_l, and ``manifest.json`` holding ``key``, written last). ``key`` names the data and the reward
    model; scores stored under another key, or half written, are not read."""

    directory: Path
    key: Dict[str, Any]

    @staticmethod
    def make_key(reward_id: Any, data_identity: Dict[str, Any]) -> Dict[str, Any]:
        return json.loads(json.dumps({"kind": "soft label scores", "version": 1, "reward": reward_id,
                                      "data": data_identity}, default=str))

    def read(self):
        """(rows, score_w, score_l, units, skipped) when complete scores for ``key`` are stored, else None."""
        import pyarrow.parquet as pq

        manifest = Path(self.directory) / "manifest.json"
        if not manifest.is_file():
            return None
        stored = json.loads(manifest.read_text())
        if stored.get("key") != json.loads(json.dumps(self.key, default=str)):
            return None
        table = pq.read_table(Path(self.directory) / "scores.parquet")
        columns = [table.column(name).to_numpy().tolist() for name in ("row", "score_w", "score_l")]
        return (*columns, stored.get("units", "the stored scores' units"), int(stored.get("skipped", 0)))

    def write(self, rows, scores_w, scores_l, units: str = "", skipped: int = 0) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        table = pa.table({"row": pa.array(rows, pa.int64()), "score_w": pa.array(scores_w, pa.float64()),
                          "score_l": pa.array(scores_l, pa.float64())})
        atomic_write(directory / "scores.parquet", lambda tmp: pq.write_table(table, tmp))
        manifest = {"key": self.key, "pairs": len(rows), "units": units}
        if skipped:  # undecodable rows (data.on_bad_row=skip): no scores, counted
            manifest["skipped"] = int(skipped)
        atomic_write(directory / "manifest.json", json.dumps(manifest, indent=2, default=str))


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


def needs_front_end(source, loss_cfg) -> bool:
    """Whether ``source``'s soft labels must wait for the model's audio front end: audio pairs scored by a reward
    model (no score columns, or ``loss.soft_label_scores=reward_model``) are decoded with it, and its sample rate
    decides which rows are bad. Labels from score columns, and image pairs, are computed before any model loads."""
    scores = loss_cfg.soft_label_scores
    from_model = scores == "reward_model" or (scores == "auto" and not source.has_scores)
    return source.media == "audio" and from_model


def _reward_model_scores(source, reward, batch_size: int):
    """(rows, score_w, score_l, skipped) by scoring every kept pair's two sides with the reward model: images as
    ``reward.score(prompts, images)``, audio (``source.media == "audio"``) as the decoded mono waveforms with
    ``sample_rate=`` (:func:`_score_audio`). ``skipped``: rows that did not decode (``data.on_bad_row=skip``)."""
    from tqdm.auto import tqdm

    audio = source.media == "audio"
    if audio and source.audio is None:
        raise ValueError("soft labels: the data holds audio, which is decoded with the model's front end; call "
                         "source.use_audio(*backbone.audio_front_end(...)) before scoring the pairs")
    items = [(b, i) for b, block in enumerate(source.blocks) for i in range(len(block.rows))]
    rows, s_w, s_l, skipped = [], [], [], 0
    for start in tqdm(range(0, len(items), batch_size), desc="soft labels: scoring pairs"):
        # Rows that fail to decode (data.on_bad_row=skip) are skipped and counted by the trainer's reads too, so
        # they never need a label.
        pairs, bad = source.read(items[start:start + batch_size])
        skipped += bad
        if not pairs:
            continue
        if audio:
            scores = _score_audio(source, reward, pairs)
        else:
            captions = [p.caption for p in pairs]
            scores = reward.score(captions + captions, [p.image_w for p in pairs] + [p.image_l for p in pairs])
            scores = [float(v) for v in scores.tolist()]
        rows.extend(p.row for p in pairs)
        s_w.extend(scores[:len(pairs)])
        s_l.extend(scores[len(pairs):])
    if skipped:
        logger.warning("soft labels: %d pair(s) could not be decoded and were skipped (data.on_bad_row=skip); they "
                       "get no soft label, and training skips and counts the same rows", skipped)
    return rows, s_w, s_l, skipped


def _score_audio(source, reward, pairs) -> list:
    """Winners' then losers' scores (floats, ``2 * len(pairs)``) of audio pairs: each side's decoded mono
    waveform at its own sample rate (what ``source.read`` returns), one ``reward.score(prompts, waves,
    sample_rate=rate)`` call per sample rate present."""
    captions = [p.caption for p in pairs] * 2
    clips = [p.image_w for p in pairs] + [p.image_l for p in pairs]  # (waveform, rate)
    scores: list = [None] * len(clips)
    for rate in dict.fromkeys(int(r) for _, r in clips):  # the rates in order of appearance
        index = [k for k, (_, r) in enumerate(clips) if int(r) == rate]
        try:
            out = reward.score([captions[k] for k in index], [clips[k][0] for k in index], sample_rate=rate)
        except ValueError as err:
            k = index[0]
            side = "winner" if k < len(pairs) else "loser"
            message = " ".join(str(err).split())
            raise ValueError(
                f"soft labels: reward.models ({getattr(reward, 'name', 'the reward model')}) could not score the "
                f"{side} of {_where(source, pairs[k % len(pairs)].row)} ({len(index)} clip(s) at {rate} Hz in this "
                f"batch): {message}; resample the audio to a rate this reward model takes") from None
        for k, v in zip(index, out.tolist()):
            scores[k] = float(v)
    return scores


def compute_soft_labels(source, *, winner: str = "reward", scores: str = "auto", reward=None,
                        score_range: Optional[Sequence[float]] = None, batch_size: int = 16,
                        score_cache: Optional[ScoreCache] = None) -> SoftLabels:
    """Soft labels for every kept pair of ``source`` (a :class:`~diffusion_pref.data.pairs.PairSource`).

    ``reward``: an object with ``score(prompts, images)`` (audio: ``score(prompts, waves, sample_rate=...)``),
    a spec for ``load_reward`` (name or ``{name: weight}``), or a zero-argument function returning a scorer (so
    nothing loads when the columns suffice);
    needed when ``scores`` is ``reward_model`` (or ``auto`` without score columns).
    ``score_range``: fixed ``[low, high]`` instead of the dataset's min/max, in the units of the scores (for our
    pickscore, SmPO's range is :data:`SMPO_PICKSCORE_RANGE`); a score outside it is an error naming the row.
    ``score_cache``: where a reward model's scores are read from if stored, else stored after scoring.
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
        skipped = 0
        units = "the dataset's score columns"
    else:
        if reward is None:
            raise ValueError("soft labels: the dataset has no score columns and no reward model was given; set the "
                             "reward models (reward.models) or add score_0/score_1 columns.")
        stored = score_cache.read() if score_cache is not None else None
        if stored is not None:
            rows, s_w, s_l, units, skipped = stored
            logger.info("soft labels: reusing the reward scores of %d pairs stored in %s%s", len(rows),
                        score_cache.directory, f" ({skipped} undecodable pair(s) skipped)" if skipped else "")
        else:
            if callable(reward) and not hasattr(reward, "score"):
                reward = reward()
            elif not hasattr(reward, "score"):
                from diffusion_pref.reward_models import load_reward

                reward = load_reward(reward)
            rows, s_w, s_l, skipped = _reward_model_scores(source, reward, batch_size)
            units = f"{getattr(reward, 'name', 'the reward model')}: {getattr(reward, 'scale', 'its own scale')}"
            if score_cache is not None:
                score_cache.write(rows, s_w, s_l, units=units, skipped=skipped)
    if score_range is not None:
        if len(score_range) != 2 or not all(math.isfinite(float(v)) for v in score_range):
            raise ValueError(f"soft labels: loss.soft_label_range={list(score_range)} must be two finite numbers "
                             "[low, high].")
        low, high = (float(v) for v in score_range)
        if not high > low:
            raise ValueError(f"soft labels: loss.soft_label_range [{low}, {high}] is empty; high must exceed low.")
        check_score_range(rows, s_w, s_l, low, high, units=units, where=lambda row: _where(source, row))
    else:
        low, high = minmax_range(s_w, s_l)
    p = soft_label_probs(s_w, s_l, low, high, winner)
    return SoftLabels(rows=np.asarray(rows, dtype=np.int64), p=p, scores_w=np.asarray(s_w, dtype=np.float64),
                      scores_l=np.asarray(s_l, dtype=np.float64), low=low, high=high, winner=winner, scores=scores,
                      skipped=skipped)


def prepare_soft_labels(source, out_dir, *, winner: str = "reward", scores: str = "auto", reward=None,
                        score_range: Optional[Sequence[float]] = None, batch_size: int = 16,
                        reward_id: Any = None, score_cache_dir: Any = None) -> SoftLabels:
    """Load the run's stored soft labels if they match these settings and data, else compute and store them.

    ``reward_id`` names the reward model in the stored settings (default: the spec, or the scorer's ``name``).
    ``score_cache_dir``: a folder for the reward model's raw scores (:class:`ScoreCache`), read by later runs on
    the same data with the same reward model; None keeps them only in this run's ``soft_labels.parquet``.
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
    score_cache = None
    if score_cache_dir is not None:
        score_cache = ScoreCache(Path(score_cache_dir), ScoreCache.make_key(settings["reward"], settings["data"]))
    labels = compute_soft_labels(source, winner=winner, scores=scores, reward=reward, score_range=score_range,
                                 batch_size=batch_size, score_cache=score_cache)
    labels.save(out, extra_meta={"settings": settings})
    return labels


def soft_labels_for_run(source, out_dir: Any, loss_cfg, reward_cfg, device: Any = "cpu",
                        score_cache_dir: Any = None) -> SoftLabels:
    """The trainer's one call: soft labels for ``source`` stored in ``out_dir`` (the run's output.dir).

    Reads ``loss_cfg.soft_label_winner``, ``soft_label_scores``, ``soft_label_range`` ([low, high] in the scores'
    units, or None for the dataset's min/max) and ``reward_cfg``; the reward model is loaded only if the
    scores must be computed, and its scores are stored in ``score_cache_dir`` (the callers pass
    ``data.cache.soft_label_scores_dir``: beside the data cache) for every later run on the same data with the
    same reward model.
    """
    from diffusion_pref.config import ConfigError
    from diffusion_pref.reward_models import load_reward_from_config, reward_spec

    loss = loss_cfg
    spec = reward_spec(reward_cfg)

    def load_reward():
        try:
            return load_reward_from_config(reward_cfg, device)
        except ConfigError as err:
            message = " ".join(str(err).split())  # one line: the hub's errors span several
            raise ConfigError(
                f"soft labels for loss {loss.name}: the pairs are scored with reward.models (data.source has no "
                f"score columns, or loss.soft_label_scores=reward_model), which failed: {message}. Alternatively add "
                "score_0/score_1 columns (data.columns.score_0=... maps yours), or train on the human labels with "
                "data.soft_labels=label (p = 1 for every pair)"
            ) from err

    return prepare_soft_labels(
        source, out_dir, winner=loss.soft_label_winner, scores=loss.soft_label_scores,
        reward=load_reward,
        score_range=list(loss.soft_label_range) if loss.soft_label_range is not None else None,
        batch_size=reward_cfg.batch_size, reward_id=spec,
        score_cache_dir=score_cache_dir,
    )


def soft_label_summary(source, labels: Optional[SoftLabels] = None) -> Dict[str, Any]:
    """Where the run's p comes from and how many pairs have p = 1 (a hard label: smpo then is dpo with a
    gamma-fold logit), for the log and ``train_summary.json``. ``labels`` None: p from ``label_0``."""
    import numpy as np

    if labels is None:
        p = np.asarray([v for block in source.blocks for v in block.soft_labels], dtype=np.float64)
        origin = "label"
    else:
        p, origin = np.asarray(labels.p, dtype=np.float64), labels.scores
    return {"from": origin, "pairs": int(p.size), "p_one": int((p == 1.0).sum()),
            "p_mean": float(p.mean()) if p.size else math.nan}


__all__ = [
    "RANGE_SLACK",
    "SMPO_PICKSCORE_RANGE",
    "SMPO_PICKSCORE_RANGE_COSINE",
    "ScoreCache",
    "SoftLabels",
    "check_score_range",
    "compute_soft_labels",
    "minmax_range",
    "needs_front_end",
    "prepare_soft_labels",
    "soft_label_probs",
    "soft_label_summary",
    "soft_labels_for_run",
]

"""Prompt-rewrite preference pairs: read a pair file, check every row, and collate rows into a token batch.

A pair file (parquet, or JSON lines: ``.jsonl`` / ``.json``; or a folder of parquet shards as ``prompt-opt
generate`` writes) has one row per pair:

    prompt, chosen, rejected                       required: the user's prompt and two rewrites of it
    score_chosen, score_rejected, similarity       optional numbers (kept for reports)
    weight                                         optional per-pair loss weight (Sem-DPO's W), finite and >= 0

    from diffusion_pref.prompt_opt.pairs import read_pairs, collate_pairs
    pairs = read_pairs("pairs.parquet", tokenizer=tok, max_length=1024)          # errors name file and row
    pairs = read_pairs("pairs.jsonl", tokenizer=tok, on_bad_row="skip")          # pairs.skipped: counts by reason
    batch = collate_pairs(tok, pairs.rows[:8])   # input_ids [16, T]: the 8 chosen rows, then the 8 rejected rows

A bad row (a missing or non-text field, an empty completion, prompt + completion longer than ``max_length``
tokens, a weight that is not a finite number >= 0) raises ``ValueError`` with one line naming the file and row,
or with ``on_bad_row="skip"`` is left out and counted in ``PairSet.skipped`` under its reason.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from diffusion_pref.prompt_opt.logprobs import encode_completions
from diffusion_pref.prompt_opt.semantic import semantic_weight

__all__ = ["OPTIONAL", "REQUIRED", "PairSet", "collate_pairs", "read_pairs"]

REQUIRED = ("prompt", "chosen", "rejected")
OPTIONAL = ("score_chosen", "score_rejected", "similarity", "weight")
SKIP_REASONS = ("missing_field", "not_text", "empty", "too_long", "bad_weight", "bad_similarity")


class _BadRow(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PairSet:
    """The checked rows (dicts with the required keys and any optional ones present), where they came from, and
    counts of the rows left out by reason (``on_bad_row="skip"``)."""

    rows: list[dict]
    source: str
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:  # a torch Dataset: DataLoader(pairs, collate_fn=PairCollator(tok))
        return self.rows[index]

    @property
    def has_weight(self) -> bool:
        return bool(self.rows) and "weight" in self.rows[0]

    def soft_labels(self, *, winner: str = "reward", score_range: Optional[Sequence[float]] = None,
                    hard: bool = False):
        """P(chosen preferred) per pair for the losses that take soft labels (smpo, sppo), as a
        :class:`diffusion_pref.soft_labels.SoftLabels` keyed by the row's index here: SmPO's
        ``sigmoid(r'_chosen - r'_rejected)`` from ``score_chosen`` / ``score_rejected``, min-max normalised over
        both sides of every pair (or over ``score_range``), by :func:`diffusion_pref.soft_labels.soft_label_probs`
        (``winner="human"``: ``sigmoid(|gap|)``). ``hard``: p = 1 for every pair (no scores needed).
        A file without the score columns, or a row whose score is not finite, is an error naming it."""
        import numpy as np

        from diffusion_pref.soft_labels import SoftLabels, check_score_range, minmax_range, soft_label_probs

        rows = np.arange(len(self.rows), dtype=np.int64)
        if hard:
            ones = np.ones(len(self.rows))
            return SoftLabels(rows=rows, p=ones, scores_w=ones, scores_l=np.zeros(len(self.rows)), low=0.0,
                              high=1.0, winner=winner, scores="label")
        for key in ("score_chosen", "score_rejected"):
            if not self.rows or key not in self.rows[0]:
                raise ValueError(f"{self.source}: soft labels need the {key!r} column (P(chosen preferred) comes from "
                                 "score_chosen - score_rejected); prompt-opt generate writes both.")
            for index, row in enumerate(self.rows):
                if not math.isfinite(row[key]):
                    raise ValueError(f"{self.source}: pair {index} ({row['prompt']!r}): {key!r} is {row[key]!r}; "
                                     "soft labels need a finite score on both sides of every pair.")
        s_w = np.asarray([r["score_chosen"] for r in self.rows], dtype=np.float64)
        s_l = np.asarray([r["score_rejected"] for r in self.rows], dtype=np.float64)
        if score_range is not None:
            low, high = (float(v) for v in score_range)
            check_score_range(rows, s_w, s_l, low, high, units="the pair file's score columns",
                              where=lambda row: f"{self.source}: pair {row}")
        else:
            low, high = minmax_range(s_w, s_l)
        p = soft_label_probs(s_w, s_l, low, high, winner)
        return SoftLabels(rows=rows, p=p, scores_w=s_w, scores_l=s_l, low=low, high=high, winner=winner,
                          scores="dataset")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{path}: the folder has no .parquet pair files.")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: no such pair file or folder.")
    return [path]


def _read_table(path: Path) -> tuple[list[dict], list[str]]:
    """Rows as dicts and the column names of one file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.to_pylist(), table.column_names
    if suffix in (".jsonl", ".json"):
        rows, columns = [], {}
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {line_number} is not valid JSON ({err.msg}).") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {line_number} is a JSON {type(row).__name__}, not an object.")
                rows.append(row)
                columns.update(dict.fromkeys(row))
        return rows, list(columns)
    raise ValueError(f"{path}: unknown pair file type {suffix!r}; use .parquet or .jsonl.")


def _check_row(row: dict, optional: Sequence[str], tokenizer, max_length, chat_template, prompt_template) -> dict:
    clean = {}
    for key in REQUIRED:
        value = row.get(key)
        if value is None:
            raise _BadRow("missing_field", f"no {key!r} value")
        if not isinstance(value, str):
            raise _BadRow("not_text", f"{key!r} is a {type(value).__name__}, not text")
        if not value.strip():
            raise _BadRow("empty", f"{key!r} is empty")
        clean[key] = value
    for key in optional:
        value = row.get(key)
        if value is None:
            if key == "weight":
                raise _BadRow("bad_weight", "no 'weight' value (other rows have one)")
            clean[key] = float("nan")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            reason = "bad_weight" if key == "weight" else "not_text"
            raise _BadRow(reason, f"{key!r} is {value!r}, not a number")
        clean[key] = float(value)
    if "weight" in clean and not (math.isfinite(clean["weight"]) and clean["weight"] >= 0):
        raise _BadRow("bad_weight", f"'weight' is {clean['weight']!r}; it must be a finite number >= 0")
    if tokenizer is not None:
        prompt = clean["prompt"] if prompt_template is None else prompt_template.format(prompt=clean["prompt"])
        for side in ("chosen", "rejected"):
            try:
                encode_completions(tokenizer, [prompt], [clean[side]], max_length=max_length,
                                   chat_template=chat_template)
            except ValueError as err:
                message = str(err).removeprefix("row 0: ")
                reason = "too_long" if "longer than" in message else "empty"
                raise _BadRow(reason, f"{side!r}: {message}") from None
    return clean


def read_pairs(
    path: str | Path,
    *,
    tokenizer: Any = None,
    max_length: Optional[int] = None,
    chat_template: Optional[bool] = None,
    prompt_template: Optional[str] = None,
    on_bad_row: str = "error",
    semantic_alpha: Optional[float] = None,
) -> PairSet:
    """Read and check a pair file (or a folder of parquet shards); see the module docstring.

    With ``tokenizer`` every row is also tokenised as training will tokenise it (``chat_template``,
    ``prompt_template``, ``max_length``: the values the policy uses, e.g. ``policy.context_length``), so rows that
    do not fit are caught here rather than mid-run. Row numbers in messages count from 0 within each file.

    ``semantic_alpha``: set each row's ``weight`` to Sem-DPO's ``exp(-alpha (1 - similarity))`` from the file's
    ``similarity`` column (as ``prompt-opt generate`` or ``semantic.add_semantic_weights`` write it); a file that
    already has ``weight``, or a row without a finite similarity, is an error (or a skip: ``bad_similarity``).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r}; use 'error' or 'skip'.")
    path = Path(path)
    rows: list[dict] = []
    skipped: Counter = Counter()
    for file in _files(path):
        records, columns = _read_table(file)
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ValueError(f"{file}: no column {missing[0]!r} (columns: {', '.join(columns) or 'none'}); a pair "
                             f"file needs {', '.join(REQUIRED)}.")
        optional = [c for c in OPTIONAL if c in columns]
        if semantic_alpha is not None:
            if "weight" in optional:
                raise ValueError(f"{file}: has a 'weight' column already; read it as it is (semantic_alpha=None) "
                                 "or drop the column to recompute it at another alpha.")
            if "similarity" not in optional:
                raise ValueError(f"{file}: semantic_alpha needs a 'similarity' column (semantic.add_semantic_weights "
                                 "or prompt-opt generate with an embedder writes it).")
        if rows and ("weight" in optional or semantic_alpha is not None) != ("weight" in rows[0]):
            raise ValueError(f"{file}: {'has' if 'weight' in optional else 'lacks'} a 'weight' column but the "
                             "files before it do not; give every shard the same columns.")
        for index, record in enumerate(records):
            try:
                row = _check_row(record, optional, tokenizer, max_length, chat_template, prompt_template)
                if semantic_alpha is not None:
                    if not -1.0 <= row["similarity"] <= 1.0:  # NaN fails too
                        raise _BadRow("bad_similarity", f"'similarity' is {row['similarity']!r}, not a cosine")
                    row["weight"] = float(semantic_weight(row["similarity"], semantic_alpha))
                rows.append(row)
            except _BadRow as bad:
                if on_bad_row == "error":
                    raise ValueError(f"{file}: row {index}: {str(bad).rstrip('.')}.") from None
                skipped[bad.reason] += 1
    if not rows:
        detail = f" ({sum(skipped.values())} bad rows skipped)" if skipped else ""
        raise ValueError(f"{path}: no usable pairs{detail}.")
    return PairSet(rows, str(path), skipped)


def collate_pairs(
    tokenizer,
    rows: Sequence[dict],
    *,
    max_length: Optional[int] = None,
    chat_template: Optional[bool] = None,
    prompt_template: Optional[str] = None,
) -> dict:
    """Tokenise ``rows`` into one batch: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2N, T]`` with
    the N chosen completions first and the N rejected ones after (the ``(w, l)`` halves the losses read), plus
    ``weight`` ``[N]`` float32 when the rows carry one. Padding is on the right."""
    import torch

    if not rows:
        raise ValueError("collate_pairs: no rows.")
    prompts = [r["prompt"] if prompt_template is None else prompt_template.format(prompt=r["prompt"]) for r in rows]
    batch = encode_completions(tokenizer, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                               max_length=max_length, chat_template=chat_template)
    if "weight" in rows[0]:
        batch["weight"] = torch.tensor([r["weight"] for r in rows], dtype=torch.float32)
    return batch


@dataclass
class PairCollator:
    """``collate_pairs`` as a ``DataLoader`` ``collate_fn`` with the policy's tokenisation settings."""

    tokenizer: Any
    max_length: Optional[int] = None
    chat_template: Optional[bool] = None
    prompt_template: Optional[str] = None

    @classmethod
    def for_policy(cls, policy) -> "PairCollator":
        return cls(policy.tokenizer, policy.context_length, policy.chat_template, policy.prompt_template)

    def __call__(self, rows: Sequence[dict]) -> dict:
        return collate_pairs(self.tokenizer, rows, max_length=self.max_length, chat_template=self.chat_template,
                             prompt_template=self.prompt_template)

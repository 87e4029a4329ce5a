"""Preference pairs from Pick-a-Pic-layout parquet: a local file, a folder of shards, or a hub dataset id.

A row holds a caption, two encoded images (``jpg_0``, ``jpg_1``: raw bytes, or the ``{"bytes": ...}`` struct the
``datasets`` Image feature writes) and ``label_0`` = P(image 0 preferred); ``score_0``/``score_1`` are optional.
``data.columns`` maps our names to a dataset's own. Every pair comes out winner first.

Large datasets are streamed: one pass reads only the label/score columns (to drop ties, find NaN and count
pairs before any model loads), then training reads one parquet row group at a time. The order of an epoch is a
seeded permutation of the row groups, then of the rows inside each, so it is reproducible, needs no shuffle
buffer, and a resumed run continues from the exact same pair. A hub id is read through ``huggingface_hub``'s
filesystem, so the same range-request streaming applies without downloading whole shards.

Example::

    from diffusion_pref.config import load_config
    from diffusion_pref.data.pairs import PairSource
    source = PairSource(load_config(None, ["data.source=pairs.parquet"]).data)
    print(source.summary())            # "kept 950 of 1000 rows; dropped 50 ties (data.ties=soft keeps them)"
    pair = source.read([source.order(epoch=0)[0]])[0][0]   # PreferencePair, winner first
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
OPTIONAL_COLUMNS = ("score_0", "score_1")


class DataError(ValueError):
    """Bad preference data; the message names the file, row and column and what to do."""


@dataclass
class PreferencePair:
    """One pair, winner first. ``soft_label`` = P(winner preferred) (1.0 for a hard label, 0.5 for a tie)."""

    caption: str
    image_w: "object"  # PIL.Image.Image
    image_l: "object"
    soft_label: float
    row: int  # global row id in the dataset (the order of files, then rows), stable across runs
    score_w: Optional[float] = None
    score_l: Optional[float] = None


@dataclass
class Block:
    """The kept rows of one parquet row group; the unit of streaming and of shuffling."""

    file: str
    row_group: int
    local_rows: List[int]  # row index inside the row group
    rows: List[int]  # global row ids
    swap: List[bool]  # True when image 1 is the winner
    soft_labels: List[float]
    scores: Optional[List[Tuple[float, float]]] = None  # (score_0, score_1) before the swap


@dataclass
class ScanStats:
    rows: int = 0
    kept: int = 0
    ties_dropped: int = 0
    bad_labels_skipped: int = 0
    files: int = 0


def resolve_parquet_files(source: str, split: str) -> Tuple[List[str], object]:
    """``source`` -> (sorted parquet paths, filesystem or None for local paths)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"data.source={source} is a file but not a .parquet file; give a parquet file or a folder of them")
        return [str(path)], None
    if path.is_dir():
        # Hidden files are other tools' temporary or partial writes, never data.
        files = sorted(str(p) for p in path.rglob("*.parquet")
                       if not any(part.startswith(".") for part in p.relative_to(path).parts))
        split_files = [f for f in files if _in_split(f, split)]
        files = split_files or files
        if not files:
            raise DataError(f"data.source={source} is a folder without .parquet files; write the pairs as parquet "
                            "(the Pick-a-Pic v2 columns caption, jpg_0, jpg_1, label_0)")
        return files, None
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"data.source={source} does not exist; give a parquet file, a folder of parquet shards or a hub dataset id (owner/name)")
    return _hub_parquet_files(source, split)


def _in_split(path: str, split: str) -> bool:
    name = Path(path).name
    parts = Path(path).parts
    return name.startswith(f"{split}-") or name.startswith(f"{split}.") or split in parts[:-1]


def _hub_parquet_files(repo_id: str, split: str):
    try:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        files = sorted(fs.glob(f"datasets/{repo_id}/**/*.parquet"))
    except Exception as err:  # offline, missing repo, auth: all end the same way for the user
        raise DataError(f"could not list parquet files of hub dataset {repo_id!r} ({type(err).__name__}: {err}); "
                        "check the id and your network, or download it and set data.source to the local folder") from None
    split_files = [f for f in files if _in_split(f, split)]
    if not split_files:
        raise DataError(f"hub dataset {repo_id!r} has no parquet files for split {split!r} "
                        f"(found {len(files)} parquet files); set data.split")
    return split_files, fs


class PairSource:
    """The kept rows of a dataset, their epoch order, and decoding of a list of them into pairs."""

    def __init__(self, data_cfg, seed: int = 0):
        if not data_cfg.source:
            raise DataError("data.source is not set; give a parquet file, a folder of parquet shards or a hub dataset id")
        self.cfg = data_cfg
        self.seed = seed
        self.columns = {name: data_cfg.columns.get(name, name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
        self.files, self.fs = resolve_parquet_files(data_cfg.source, data_cfg.split)
        self.stats = ScanStats(files=len(self.files))
        self.blocks: List[Block] = []
        self.has_scores = False
        self._scan()
        self._cache_key: Optional[Tuple[str, int]] = None
        self._cache_table = None

    # -- the label pass ------------------------------------------------------------------------------------
    def _open(self, file: str):
        import pyarrow.parquet as pq

        if self.fs is None:
            return pq.ParquetFile(file)
        return pq.ParquetFile(self.fs.open(file, "rb"))

    def _check_schema(self, file: str, names: Sequence[str]) -> None:
        missing = [ours for ours in REQUIRED_COLUMNS if self.columns[ours] not in names]
        if missing:
            mapping = " ".join(f"data.columns.{ours}=<your column>" for ours in missing)
            raise DataError(
                f"{file}: missing column(s) {', '.join(self.columns[m] for m in missing)} "
                f"(present: {', '.join(names)}). If your dataset names them differently, map them: {mapping}"
            )
        present = [self.columns[s] in names for s in OPTIONAL_COLUMNS]
        if any(present) and not all(present):
            raise DataError(f"{file}: has only one of the score columns {self.columns['score_0']}, {self.columns['score_1']}; "
                            "give both or neither")

    def _scan(self) -> None:
        import numpy as np

        cfg = self.cfg
        row_base = 0
        for file_index, file in enumerate(self.files):
            if self._full():
                break
            pf = self._open(file)
            names = pf.schema_arrow.names
            self._check_schema(file, names)
            has_scores = self.columns["score_0"] in names
            if file_index == 0:
                self.has_scores = has_scores
            elif has_scores != self.has_scores:
                raise DataError(f"{file}: score columns present in some files and not others; make all shards alike")
            wanted = [self.columns["label_0"]] + ([self.columns["score_0"], self.columns["score_1"]] if has_scores else [])
            for rg in range(pf.num_row_groups):
                if self._full():
                    break
                table = pf.read_row_group(rg, columns=wanted)
                labels = table.column(0).to_numpy(zero_copy_only=False).astype("float64")
                scores = (np.stack([table.column(1).to_numpy(zero_copy_only=False).astype("float64"),
                                    table.column(2).to_numpy(zero_copy_only=False).astype("float64")], 1)
                          if has_scores else None)
                block = Block(file=file, row_group=rg, local_rows=[], rows=[], swap=[], soft_labels=[],
                              scores=[] if has_scores else None)
                for local, label in enumerate(labels):
                    if self._full():  # data.max_pairs reached: the rest of the dataset is not read
                        break
                    row = row_base + local
                    self.stats.rows += 1
                    problem = None
                    if not math.isfinite(label) or not 0.0 <= label <= 1.0:
                        problem = f"{self.columns['label_0']}={label} is not a probability in [0, 1]"
                    elif scores is not None and not np.isfinite(scores[local]).all():
                        problem = f"score is NaN or infinite ({self.columns['score_0']}={scores[local][0]}, {self.columns['score_1']}={scores[local][1]})"
                    if problem:
                        if cfg.on_bad_row == "skip":
                            self.stats.bad_labels_skipped += 1
                            continue
                        raise DataError(f"{file}: row {local} of row group {rg} (dataset row {row}): {problem}; "
                                        "fix the data or set data.on_bad_row=skip to skip such rows (they are counted)")
                    if label == 0.5 and cfg.ties == "drop":
                        self.stats.ties_dropped += 1
                        continue
                    block.local_rows.append(local)
                    block.rows.append(row)
                    block.swap.append(bool(label < 0.5))
                    block.soft_labels.append(float(max(label, 1.0 - label)))
                    if scores is not None:
                        block.scores.append((float(scores[local][0]), float(scores[local][1])))
                    self.stats.kept += 1
                row_base += len(labels)
                if block.rows:
                    self.blocks.append(block)
        logger.info(self.summary())
        if self.stats.kept == 0:
            raise DataError(f"data.source={cfg.source}: no pairs left after filtering ({self.summary()}); "
                            + ("set data.ties=soft to keep ties" if self.stats.ties_dropped else "check the label column"))

    def _full(self) -> bool:
        return self.cfg.max_pairs is not None and self.stats.kept >= self.cfg.max_pairs

    def summary(self) -> str:
        s = self.stats
        parts = [f"kept {s.kept} of {s.rows} rows in {s.files} file(s)"]
        if s.ties_dropped:
            parts.append(f"dropped {s.ties_dropped} ties (data.ties=soft keeps them)")
        if s.bad_labels_skipped:
            parts.append(f"skipped {s.bad_labels_skipped} rows with bad labels/scores")
        return "; ".join(parts)

    def __len__(self) -> int:
        return self.stats.kept

    # -- order ---------------------------------------------------------------------------------------------
    def order(self, epoch: int) -> List[Tuple[int, int]]:
        """(block index, index inside block) for every kept row, in this epoch's order."""
        import numpy as np

        if not self.cfg.shuffle:
            return [(b, i) for b, block in enumerate(self.blocks) for i in range(len(block.rows))]
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        for b in rng.permutation(len(self.blocks)):
            out.extend((int(b), int(i)) for i in rng.permutation(len(self.blocks[b].rows)))
        return out

    # -- decoding ------------------------------------------------------------------------------------------
    def _row_group(self, block: Block):
        key = (block.file, block.row_group)
        if self._cache_key != key:
            cols = [self.columns[c] for c in ("caption", "jpg_0", "jpg_1")]
            self._cache_table = self._open(block.file).read_row_group(block.row_group, columns=cols)
            self._cache_key = key
        return self._cache_table

    def read(self, items: Sequence[Tuple[int, int]]) -> Tuple[List[PreferencePair], int]:
        """Decode the given (block, index) items; returns (pairs, number of rows skipped as undecodable)."""
        pairs, skipped = [], 0
        for b, i in items:
            block = self.blocks[b]
            table = self._row_group(block)
            local = block.local_rows[i]
            caption = table.column(0)[local].as_py()
            raw = [table.column(1)[local].as_py(), table.column(2)[local].as_py()]
            try:
                images = [self._decode(raw[k], block, i, self.columns[f"jpg_{k}"]) for k in (0, 1)]
            except DataError:
                if self.cfg.on_bad_row == "skip":
                    skipped += 1
                    continue
                raise
            swap = block.swap[i]
            score_w = score_l = None
            if block.scores is not None:
                s0, s1 = block.scores[i]
                score_w, score_l = (s1, s0) if swap else (s0, s1)
            pairs.append(PreferencePair(
                caption=caption if isinstance(caption, str) else ("" if caption is None else str(caption)),
                image_w=images[1] if swap else images[0],
                image_l=images[0] if swap else images[1],
                soft_label=block.soft_labels[i],
                row=block.rows[i],
                score_w=score_w,
                score_l=score_l,
            ))
        return pairs, skipped

    def _decode(self, value, block: Block, i: int, column: str):
        from PIL import Image

        if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        where = f"{block.file}: row {block.local_rows[i]} of row group {block.row_group} (dataset row {block.rows[i]}), column {column}"
        if not isinstance(value, (bytes, bytearray)):
            raise DataError(f"{where}: expected encoded image bytes, got {type(value).__name__}; "
                            "set data.on_bad_row=skip to skip such rows (they are counted)")
        try:
            image = Image.open(io.BytesIO(value))
            image.load()
            return image.convert("RGB")
        except Exception as err:
            raise DataError(f"{where}: could not decode image bytes ({type(err).__name__}: {err}); "
                            "set data.on_bad_row=skip to skip such rows (they are counted)") from None

    def identity(self) -> Dict[str, object]:
        """What the cache key needs to know about the data: files with size and mtime, and the row filter."""
        files = []
        for f in self.files:
            if self.fs is None:
                st = Path(f).stat()
                files.append([f, st.st_size, int(st.st_mtime)])
            else:
                files.append([f])
        return {"files": files, "columns": self.columns, "ties": self.cfg.ties, "on_bad_row": self.cfg.on_bad_row,
                "max_pairs": self.cfg.max_pairs, "split": self.cfg.split}

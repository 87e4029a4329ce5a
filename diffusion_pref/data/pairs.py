"""Preference pairs from Pick-a-Pic-layout (images) or Audio-alpaca-layout (audio) parquet: a local file, a folder of
shards, or a hub dataset id.

Audio (text-to-audio backbones such as Tango): the Audio-alpaca layout (``prompt, chosen, rejected, strategy``; the
winner is always ``chosen``, so there is no label column) is recognised by its columns; the Pick-a-Pic layout with
audio in ``jpg_0``/``jpg_1`` works too once the trainer calls :meth:`PairSource.use_audio`. Audio cells are encoded
bytes (wav, flac, ogg), the ``datasets`` Audio struct (``{"bytes", "path"}``, or ``{"array", "sampling_rate"}``) or a
path to a file (relative paths against the parquet file's folder). Unreadable, silent, NaN, multi-channel audio or a
sample rate below the model's is a :class:`DataError` naming the file, row and column, or a counted skip with
``data.on_bad_row=skip``.

A row holds a caption, two encoded images (``jpg_0``, ``jpg_1``: raw bytes, or the ``{"bytes": ...}`` struct the
``datasets`` Image feature writes) and ``label_0`` = P(image 0 preferred); ``score_0``/``score_1`` are optional.
``data.columns`` maps our names to a dataset's own. Every pair comes out winner first: the image whose side of
``label_0`` is above 0.5, so a fractional label (0.3) is a pair with a winner (image 1) and a soft label
max(label_0, 1 - label_0) (0.7) that only soft-label losses read; such labels and null or empty captions are
counted in the summary. A caption column stored as binary is decoded as UTF-8.

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

from diffusion_pref.seeding import derive_rng

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
OPTIONAL_COLUMNS = ("score_0", "score_1")
# Audio-alpaca (declare-lab/audio-alpaca): our name -> its column; the winner is always "chosen" (label_0 = 1)
ALPACA_COLUMNS = {"caption": "prompt", "jpg_0": "chosen", "jpg_1": "rejected"}


class DataError(ValueError):
    """Bad preference data; the message names the file, row and column and what to do."""


@dataclass
class PreferencePair:
    """One pair, winner first. ``soft_label`` = P(winner preferred) (1.0 for a hard label, 0.5 for a tie)."""

    caption: str
    image_w: "object"  # PIL.Image.Image; for audio a (float32 mono waveform, sample rate) tuple
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
    bad_labels_skipped: int = 0  # rows skipped (data.on_bad_row=skip) for a bad label, score or caption
    files: int = 0
    empty_captions: int = 0  # kept rows whose caption is null, empty or only whitespace
    fractional_labels: int = 0  # kept rows whose label_0 is neither 0, 0.5 nor 1
    unused_bad_scores: int = 0  # kept rows with a NaN/infinite score that this run does not use


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


def scores_used(loss_cfg, soft_labels: str) -> bool:
    """Whether a training run with this loss section and ``data.soft_labels`` reads the score columns: only a loss
    that takes a soft label, with its labels from the dataset's scores (``data.soft_labels`` auto or scores,
    ``loss.soft_label_scores`` auto or dataset). Other runs keep rows with NaN scores (counted) instead of stopping
    on them."""
    from diffusion_pref.losses import TAKES_SOFT_LABEL

    return (loss_cfg.name in TAKES_SOFT_LABEL and soft_labels in ("auto", "scores")
            and loss_cfg.soft_label_scores in ("auto", "dataset"))


def caption_text(value) -> str:
    """A caption cell as text: bytes (a binary column) are decoded as UTF-8 (``UnicodeDecodeError`` if they are
    not), null becomes ``""``."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return value if isinstance(value, str) else str(value)


class PairSource:
    """The kept rows of a dataset, their epoch order, and decoding of a list of them into pairs.

    ``check_scores=False`` (the trainer passes :func:`scores_used`): NaN or infinite scores are counted, not a
    bad row, since the run never reads them.
    """

    def __init__(self, data_cfg, seed: int = 0, check_scores: bool = True):
        if not data_cfg.source:
            raise DataError("data.source is not set; give a parquet file, a folder of parquet shards or a hub dataset id")
        self.cfg = data_cfg
        self.seed = seed
        self.check_scores = check_scores
        self.columns = {name: data_cfg.columns.get(name, name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
        self.files, self.fs = resolve_parquet_files(data_cfg.source, data_cfg.split)
        # Audio-alpaca: recognised by its columns when the file has no label column of ours
        names = self._open(self.files[0]).schema_arrow.names
        self.alpaca = self.columns["label_0"] not in names and all(
            data_cfg.columns.get(ours, theirs) in names for ours, theirs in ALPACA_COLUMNS.items())
        if self.alpaca:
            self.columns.update({ours: data_cfg.columns.get(ours, theirs) for ours, theirs in ALPACA_COLUMNS.items()})
        self.media = "audio" if self.alpaca else "image"
        self.audio = None  # (MelSettings, frames) once use_audio is called
        self.stats = ScanStats(files=len(self.files))
        self.blocks: List[Block] = []
        self.has_scores = False
        self.binary_captions = False
        self._scan()
        self._cache_key: Optional[Tuple[str, int]] = None
        self._cache_table = None

    # -- the label pass ------------------------------------------------------------------------------------
    def _open(self, file: str):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(file if self.fs is None else self.fs.open(file, "rb"))
        except Exception as err:  # pyarrow raises several types for a file that is not parquet; none names it
            raise DataError(f"{file}: could not be read as parquet ({type(err).__name__}: {err}); remove it from "
                            "data.source or rewrite it as parquet") from None

    @staticmethod
    def _read_row_group(pf, file: str, rg: int, columns):
        try:
            return pf.read_row_group(rg, columns=columns)
        except Exception as err:  # a truncated or corrupt file: name it, or the user cannot tell which shard
            raise DataError(f"{file}: row group {rg} could not be read ({type(err).__name__}: {err}); the file is "
                            "damaged; rewrite it or remove it from data.source") from None

    def use_audio(self, settings, frames: int) -> None:
        """Decode the media columns as audio, for a model whose front end is ``settings``
        (:class:`diffusion_pref.audio.MelSettings`) with clips of ``frames`` mel frames."""
        self.media = "audio"
        self.audio = (settings, int(frames))

    def _check_schema(self, file: str, names: Sequence[str]) -> None:
        required = [c for c in REQUIRED_COLUMNS if not (self.alpaca and c == "label_0")]
        missing = [ours for ours in required if self.columns[ours] not in names]
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
        import pyarrow as pa

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
            caption_type = pf.schema_arrow.field(self.columns["caption"]).type
            self.binary_captions |= pa.types.is_binary(caption_type) or pa.types.is_large_binary(caption_type)
            # Captions are read here too (small next to the images): bad ones fail before any model loads.
            wanted = [self.columns["caption"]] + ([] if self.alpaca else [self.columns["label_0"]])
            wanted += [self.columns["score_0"], self.columns["score_1"]] if has_scores else []
            for rg in range(pf.num_row_groups):
                if self._full():
                    break
                table = self._read_row_group(pf, file, rg, wanted)
                captions = table.column(0).to_pylist()
                # Audio-alpaca has no label: "chosen" always won
                labels = (np.ones(table.num_rows) if self.alpaca
                          else table.column(1).to_numpy(zero_copy_only=False).astype("float64"))
                first_score = 1 if self.alpaca else 2
                scores = (np.stack([table.column(first_score).to_numpy(zero_copy_only=False).astype("float64"),
                                    table.column(first_score + 1).to_numpy(zero_copy_only=False).astype("float64")],
                                   1) if has_scores else None)
                block = Block(file=file, row_group=rg, local_rows=[], rows=[], swap=[], soft_labels=[],
                              scores=[] if has_scores else None)
                for local, label in enumerate(labels):
                    if self._full():  # data.max_pairs reached: the rest of the dataset is not read
                        break
                    row = row_base + local
                    self.stats.rows += 1
                    problem = None
                    bad_scores = scores is not None and not np.isfinite(scores[local]).all()
                    caption = None
                    if not math.isfinite(label) or not 0.0 <= label <= 1.0:
                        problem = f"{self.columns['label_0']}={label} is not a probability in [0, 1]"
                    elif bad_scores and self.check_scores:
                        problem = f"score is NaN or infinite ({self.columns['score_0']}={scores[local][0]}, {self.columns['score_1']}={scores[local][1]})"
                    else:
                        try:
                            caption = caption_text(captions[local])
                        except UnicodeDecodeError as err:
                            problem = f"{self.columns['caption']} holds bytes that are not UTF-8 text ({err})"
                    if problem:
                        if cfg.on_bad_row == "skip":
                            self.stats.bad_labels_skipped += 1
                            continue
                        raise DataError(f"{file}: row {local} of row group {rg} (dataset row {row}): {problem}; "
                                        "fix the data or set data.on_bad_row=skip to skip such rows (they are counted)")
                    if label == 0.5 and cfg.ties == "drop":
                        self.stats.ties_dropped += 1
                        continue
                    self.stats.empty_captions += not caption.strip()
                    self.stats.fractional_labels += label not in (0.0, 0.5, 1.0)
                    self.stats.unused_bad_scores += bool(bad_scores)
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
        from diffusion_pref.losses import TAKES_SOFT_LABEL

        if self.stats.empty_captions:
            logger.warning("%d kept pairs have a null or empty caption; they train as unconditional pairs (as caption "
                           "dropout does)", self.stats.empty_captions)
        if self.stats.fractional_labels:
            logger.warning("%d kept pairs have a fractional %s (not 0, 0.5 or 1): the image above 0.5 is the winner; "
                           "losses with hard labels train them as hard pairs, %s with data.soft_labels=label take "
                           "max(%s, 1 - %s) as P(winner preferred)", self.stats.fractional_labels,
                           self.columns["label_0"], "/".join(sorted(TAKES_SOFT_LABEL)), self.columns["label_0"],
                           self.columns["label_0"])
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
            parts.append(f"skipped {s.bad_labels_skipped} rows with bad labels/scores/captions")
        if s.empty_captions:
            parts.append(f"{s.empty_captions} null or empty captions (trained as unconditional)")
        if s.fractional_labels:
            parts.append(f"{s.fractional_labels} fractional labels (the side above 0.5 wins)")
        if s.unused_bad_scores:
            parts.append(f"{s.unused_bad_scores} rows with NaN/infinite scores kept (this loss does not use scores)")
        return "; ".join(parts)

    def __len__(self) -> int:
        return self.stats.kept

    # -- order ---------------------------------------------------------------------------------------------
    def order(self, epoch: int) -> List[Tuple[int, int]]:
        """(block index, index inside block) for every kept row, in this epoch's order."""
        if not self.cfg.shuffle:
            return [(b, i) for b, block in enumerate(self.blocks) for i in range(len(block.rows))]
        rng = derive_rng(self.seed, epoch)
        out = []
        for b in rng.permutation(len(self.blocks)):
            out.extend((int(b), int(i)) for i in rng.permutation(len(self.blocks[b].rows)))
        return out

    # -- decoding ------------------------------------------------------------------------------------------
    def _row_group(self, block: Block):
        key = (block.file, block.row_group)
        if self._cache_key != key:
            cols = [self.columns[c] for c in ("caption", "jpg_0", "jpg_1")]
            self._cache_table = self._read_row_group(self._open(block.file), block.file, block.row_group, cols)
            self._cache_key = key
        return self._cache_table

    def read(self, items: Sequence[Tuple[int, int]]) -> Tuple[List[PreferencePair], int]:
        """Decode the given (block, index) items; returns (pairs, number of rows skipped as undecodable)."""
        pairs, skipped = [], 0
        for b, i in items:
            block = self.blocks[b]
            table = self._row_group(block)
            local = block.local_rows[i]
            raw = [table.column(1)[local].as_py(), table.column(2)[local].as_py()]
            try:
                caption = self._caption(table.column(0)[local].as_py(), block, i)
                decode = self._decode_audio if self.media == "audio" else self._decode
                images = [decode(raw[k], block, i, self.columns[f"jpg_{k}"]) for k in (0, 1)]
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
                caption=caption,
                image_w=images[1] if swap else images[0],
                image_l=images[0] if swap else images[1],
                soft_label=block.soft_labels[i],
                row=block.rows[i],
                score_w=score_w,
                score_l=score_l,
            ))
        return pairs, skipped

    @staticmethod
    def _where(block: Block, i: int) -> str:
        return f"{block.file}: row {block.local_rows[i]} of row group {block.row_group} (dataset row {block.rows[i]})"

    def _caption(self, value, block: Block, i: int) -> str:
        try:
            return caption_text(value)
        except UnicodeDecodeError as err:  # the scan checked it: the file changed since
            raise DataError(f"{self._where(block, i)}, column {self.columns['caption']}: caption bytes are not UTF-8 "
                            f"text ({err}); set data.on_bad_row=skip to skip such rows (they are counted)") from None

    def _decode(self, value, block: Block, i: int, column: str):
        from PIL import Image

        if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        where = f"{self._where(block, i)}, column {column}"
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

    def _decode_audio(self, value, block: Block, i: int, column: str):
        """An audio cell -> (mono float32 waveform, sample rate), checked (see the module docstring)."""
        from diffusion_pref.audio import AudioError, check_audio, read_audio

        where = f"{self._where(block, i)}, column {column}"
        if self.audio is None:
            raise DataError(f"{where}: the data holds audio but the model is not an audio model; set "
                            "model.pretrained to a text-to-audio model (e.g. a Tango folder)")
        settings = self.audio[0]
        if isinstance(value, str) and self.fs is None and not Path(value).is_absolute():
            value = str(Path(block.file).parent / value)  # a path relative to the parquet file
        elif isinstance(value, dict) and value.get("bytes") is None and value.get("array") is None and value.get("path"):
            path = value["path"]
            value = path if Path(path).is_absolute() or self.fs is not None else str(Path(block.file).parent / path)
        try:
            wave, rate = read_audio(value)
            return check_audio(wave, rate, settings.sampling_rate), rate
        except AudioError as err:
            raise DataError(f"{where}: audio {err}; fix the data or set data.on_bad_row=skip to skip such rows "
                            "(they are counted)") from None

    def identity(self) -> Dict[str, object]:
        """What the cache key needs to know about the data: files with size and mtime, and the row filter."""
        files = []
        for f in self.files:
            if self.fs is None:
                st = Path(f).stat()
                files.append([f, st.st_size, int(st.st_mtime)])
            else:
                files.append([f])
        ident = {"files": files, "columns": self.columns, "ties": self.cfg.ties, "on_bad_row": self.cfg.on_bad_row,
                 "max_pairs": self.cfg.max_pairs, "split": self.cfg.split}
        if self.has_scores and not self.check_scores:  # rows with NaN scores are kept: other rows than a checked scan
            ident["scores_checked"] = False
        if self.binary_captions:  # decoded as UTF-8 (older versions trained on the text "b'...'")
            ident["captions"] = "utf-8"
        if self.media == "audio":  # the front end the cached latents were computed with
            ident["audio"] = {"frames": self.audio[1] if self.audio else None,
                              "settings": self.audio[0].to_dict() if self.audio else None}
        return ident

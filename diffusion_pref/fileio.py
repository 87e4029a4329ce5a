"""Atomic writes: a result file (or folder) is either the old one or the complete new one, never half written.

``atomic_write(path, data)`` writes ``data`` (bytes, text, or a function that writes a given path) to a
temporary file in ``path``'s folder, flushes and fsyncs it, renames it over ``path`` and fsyncs the folder, so
a crash or a full disk at any moment leaves the previous file intact. ``replace_folder(tmp, final)`` does the
same for a folder written in full under ``tmp`` (checkpoints).

Temporary names are ``.<name>.<pid>.tmp`` (hidden, per process): a run killed mid-write leaves one behind, which
a later run may delete by that pattern.

Example::

    from diffusion_pref.fileio import atomic_write
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write(out / "pairs.parquet", lambda tmp: pq.write_table(table, tmp))
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Union

Data = Union[bytes, str, Callable[[Path], object]]


def temporary_path(path: Path) -> Path:
    """Where ``atomic_write`` writes before the rename: a hidden per-process file next to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], data: Data, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``.

    ``data``: bytes, a str (encoded with ``encoding``), or a function ``write(tmp_path)`` that writes the file
    itself (``pq.write_table``, safetensors' ``save_file``). On any error the temporary file is removed, the old
    ``path`` (if any) is untouched and the error is raised.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        if callable(data):
            data(tmp)
            _fsync_file(tmp)
        else:
            payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_folder(path.parent)
    return path


def replace_folder(tmp: Union[str, Path], final: Union[str, Path]) -> Path:
    """Put the finished folder ``tmp`` in place of ``final`` (removed first if present); returns ``final``.

    Every file under ``tmp`` is fsynced before the rename, so ``final`` never names a folder whose files are
    not on disk yet; the rename of a folder is atomic, so ``final`` is complete or absent (never half written).
    """
    tmp, final = Path(tmp), Path(final)
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_folder(Path(root))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_folder(final.parent)
    return final


__all__ = ["atomic_write", "fsync_folder", "replace_folder", "temporary_path"]

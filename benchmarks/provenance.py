"""Which code a benchmark measured, recorded in every results file.

A GPU machine receives a copy of the working tree whose git HEAD may be stale, and the tree may hold uncommitted
changes, so ``git rev-parse HEAD`` alone can name the wrong code. The results therefore also carry a digest of the
source files themselves (the package and the benchmarks); ``python benchmarks/provenance.py`` prints the digest
of the current tree, so a results file can be matched to a commit by checking it out and comparing.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("diffusion_pref/**/*.py", "diffusion_pref/**/*.yaml", "benchmarks/*.py", "benchmarks/*.sh")


def source_digest(root: Path = ROOT) -> str:
    """sha256 (first 16 hex digits) over the sorted relative paths and bytes of the measured source files."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in SOURCES for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    except OSError:  # no git on the machine
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_identity() -> dict:
    """``ours_commit`` (git HEAD, may be stale on a copied tree), ``ours_tree_dirty`` (uncommitted changes to the
    measured files, None without git) and ``ours_source_sha256`` (the digest above: the code that actually ran)."""
    status = _git("status", "--porcelain", "--", "diffusion_pref", "benchmarks")
    return {"ours_commit": _git("rev-parse", "HEAD"), "ours_tree_dirty": None if status is None else bool(status),
            "ours_source_sha256": source_digest()}


if __name__ == "__main__":
    print(code_identity())

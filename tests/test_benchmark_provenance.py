"""benchmarks/provenance.py: the digest that names the code a benchmark measured."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from provenance import source_digest  # noqa: E402


def _tree(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_digest_follows_the_measured_sources_and_nothing_else(tmp_path):
    files = {"diffusion_pref/a.py": "x = 1\n", "diffusion_pref/training/b.py": "y = 2\n",
             "benchmarks/bench_x.py": "z = 3\n", "benchmarks/gpu_check.sh": "echo\n"}
    base = source_digest(_tree(tmp_path / "one", files))
    assert source_digest(_tree(tmp_path / "two", files)) == base  # same files elsewhere: same digest
    assert source_digest(_tree(tmp_path / "two", {"README.md": "notes\n", "tests/t.py": "pass\n"})) == base
    assert source_digest(_tree(tmp_path / "two", {"diffusion_pref/training/b.py": "y = 3\n"})) != base
    # a file's name is part of the digest, not only its bytes
    moved = dict(files)
    moved["diffusion_pref/c.py"] = moved.pop("diffusion_pref/a.py")
    assert source_digest(_tree(tmp_path / "three", moved)) != base

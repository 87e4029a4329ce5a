"""The metrics log (diffusion_pref.training.metrics_log): each step's line is written at the end of its step, so a
checkpoint finds its own step's line and every step has its line when training ends."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg, read_metrics  # noqa: E402


def test_checkpoints_and_the_end_of_training_follow_their_steps_metrics(tiny_sd_dir, tmp_path, monkeypatch):
    """A checkpoint at step N must find step N's line in metrics.jsonl (a resumed run keeps the lines up to its
    checkpoint), and every step has its line when training ends."""
    from diffusion_pref.training.checkpoint import Checkpointer
    from diffusion_pref.training.setup import Trainer

    seen = {}
    save = Checkpointer.save

    def spy(self, step, state):
        seen[step] = [r["step"] for r in read_metrics(tmp_path)]
        return save(self, step, state)

    monkeypatch.setattr(Checkpointer, "save", spy)
    pairs_path = write_pairs(tmp_path / "pairs.parquet", n=4)
    Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, "train.max_steps=5", "train.checkpoint_every=3")).train()
    assert seen == {3: [1, 2, 3]}
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

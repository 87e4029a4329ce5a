"""Per-step metrics read one step late (diffusion_pref.training.step_readout) and the trainer's use of it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg, read_metrics  # noqa: E402


def test_put_hands_back_the_previous_step_and_take_the_queued_one():
    from diffusion_pref.training.step_readout import DeferredReadout

    readout = DeferredReadout()
    assert readout.take() is None
    assert readout.put(torch.tensor([1.0, 2.0]), {"step": 1}) is None
    assert readout.put(torch.tensor([3.0, 4.0]), {"step": 2}) == ([1.0, 2.0], {"step": 1})
    assert readout.take() == ([3.0, 4.0], {"step": 2})
    assert readout.take() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_values_are_those_at_put_time_even_if_changed_later():
    from diffusion_pref.training.step_readout import DeferredReadout

    readout = DeferredReadout()
    values = torch.arange(3.0, device="cuda")
    readout.put(values, "a")
    values.add_(10)  # queued after the copy: must not show in what was put
    assert readout.put(values, "b") == ([0.0, 1.0, 2.0], "a")
    assert readout.take() == ([10.0, 11.0, 12.0], "b")


def test_checkpoints_and_the_end_of_training_follow_their_steps_metrics(tiny_sd_dir, tmp_path, monkeypatch):
    """Metrics are written one step late, except where something depends on them: a checkpoint at step N must
    find step N's line in metrics.jsonl (a resumed run keeps the lines up to its checkpoint), and every step has
    its line when training ends."""
    from diffusion_pref.training.checkpoint import Checkpointer
    from diffusion_pref.training.trainer import Trainer

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

"""Helpers shared by the training tests: a small training config and the metrics a run logged.

Not a test module (pytest collects ``test_*.py`` only). Test files put this folder on ``sys.path`` and import it
as ``from helpers import ...``, as they import ``test_data``.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_pref.config import load_config

IMAGE_DATA = ("data.resolution=32",)


def train_config(model_dir, data, out, *overrides, batch_size, learning_rate, data_keys=IMAGE_DATA):
    """A 2-step LoRA (rank 2) run of ``model_dir`` on ``data`` into ``out``: no weight decay, logger or checkpoints.

    ``batch_size`` and ``learning_rate`` are each test file's own; ``data_keys`` are the data overrides that size
    the samples (an image resolution, or ``data.audio_seconds`` for audio). ``overrides`` come last and win.
    """
    return load_config(None, [
        f"model.pretrained={model_dir}", f"data.source={data}", *data_keys, f"train.batch_size={batch_size}",
        "train.max_steps=2", f"train.learning_rate={learning_rate}", "train.weight_decay=0", "train.logger=none",
        "train.checkpoint_every=0", "model.lora_rank=2", f"output.dir={out}", *overrides,
    ])


def read_metrics(out):
    """The rows of ``out/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def backbone_of(model_dir):
    """The backbone ``load_backbone`` makes of the saved model at ``model_dir`` (default model settings)."""
    from diffusion_pref.pipelines import load_backbone

    return load_backbone(load_config(None, [f"model.pretrained={model_dir}"]).model)

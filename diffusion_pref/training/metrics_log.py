"""The training run's metrics: ``metrics.jsonl`` (one line per logged step), the tracker (TensorBoard, wandb) and
the progress bar."""

from __future__ import annotations

from diffusion_pref.fileio import atomic_write

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict


def flat_hparams(cfg) -> Dict[str, object]:
    """The config as ``section.key -> value`` for the tracker's hyperparameter table."""
    flat = {}
    for section in dataclasses.fields(cfg):
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            flat[f"{section.name}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class MetricsLog:
    """Opened at ``start_step`` (0, or the step a resumed run continues from)."""

    def __init__(self, cfg, accelerator, out: Path, start_step: int):
        from tqdm.auto import tqdm

        self.accelerator, self.train_cfg = accelerator, cfg.train
        self.file = Path(out) / "metrics.jsonl"
        if accelerator.is_main_process:
            Path(out).mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers("train", config=flat_hparams(cfg) if cfg.train.logger == "tensorboard" else None)
            if self.file.is_file():
                # Keep the lines up to the step this run starts from: a fresh run in an old folder starts a new
                # log, a resumed one drops what the interrupted run logged after its last checkpoint.
                kept = [line for line in self.file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
                atomic_write(self.file, "".join(line + "\n" for line in kept))
        self.progress = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not accelerator.is_main_process,
                             desc="train")

    def write(self, step: int, logs: Dict[str, float]) -> None:
        """One finished optimizer step: a metrics line and the tracker every ``train.log_every`` steps and at the
        last; the progress bar always."""
        t = self.train_cfg
        if self.accelerator.is_main_process and (step % t.log_every == 0 or step == t.max_steps):
            self.accelerator.log(logs, step=step)
            with open(self.file, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('implicit_acc', math.nan):.2f}",
                                  margin=f"{logs.get('margin', math.nan):.2e}", lr=f"{logs['lr']:.2e}",
                                  pairs_s=f"{logs['pairs_per_s']:.1f}")

    def close(self) -> None:
        self.progress.close()

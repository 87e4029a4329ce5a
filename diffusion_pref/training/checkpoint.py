"""Checkpoints that a crash cannot corrupt, and resume that continues the exact run.

A checkpoint is accelerate's ``save_state`` (model, optimizer, LR scheduler, every process's RNG states) plus a
small JSON per process (optimizer step, data position, running loss state). It is written into
``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only when every process has finished, so a
folder named ``step-N`` is always complete; ``train.resume=latest`` picks the highest one. Only the last
``train.keep_checkpoints`` are kept. For LoRA runs the model part is the trainable parameters only (a few MB),
not the whole frozen UNet.

Example::

    ckpt = Checkpointer(accelerator, output_dir, keep=3)
    ckpt.save(step, {"epoch": 0, "next_index": 12})
    state = ckpt.load(ckpt.find("latest"))    # -> the JSON of this process
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINABLE_FILE = "policy_trainable.safetensors"


def list_checkpoints(root: Path):
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


class Checkpointer:
    def __init__(self, accelerator, output_dir, keep: int = 3):
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def register_trainable_only(self, unet) -> None:
        """Save and load only ``unet``'s trainable parameters (LoRA), not its frozen weights."""
        from safetensors.torch import load_file, save_file

        accelerator = self.accelerator
        target = accelerator.unwrap_model(unet)

        def is_target(model) -> bool:
            return accelerator.unwrap_model(model) is target

        def save_hook(models, weights, output_dir):
            for i in reversed(range(len(models))):
                if is_target(models[i]):
                    if accelerator.is_main_process:
                        state = {n: p.detach().float().cpu().contiguous() for n, p in target.named_parameters() if p.requires_grad}
                        save_file(state, os.path.join(output_dir, TRAINABLE_FILE))
                    if weights:
                        weights.pop(i)

        def load_hook(models, input_dir):
            import torch

            for i in reversed(range(len(models))):
                if is_target(models[i]):
                    state = load_file(os.path.join(input_dir, TRAINABLE_FILE))
                    params = dict(target.named_parameters())
                    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
                    if missing:
                        raise ValueError(f"checkpoint {input_dir} lacks trainable parameters {missing[:3]}...; "
                                         "was it written with another model.lora_rank or model.lora_targets?")
                    with torch.no_grad():
                        for name, value in state.items():
                            params[name].copy_(value.to(params[name].dtype))
                    models.pop(i)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def save(self, step: int, state: Dict[str, object]) -> Path:
        accelerator = self.accelerator
        tmp = self.root / f".tmp-step-{step:08d}"
        final = self.root / f"step-{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash during an earlier save
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        (tmp / f"trainer_state_{accelerator.process_index}.json").write_text(json.dumps({"step": step, **state}))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the atomic step: a step-N folder is complete or absent
            for old in list_checkpoints(self.root)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def find(self, resume: Optional[str]) -> Optional[Path]:
        """``latest`` -> the newest complete checkpoint (None if there is none yet); a path -> that folder."""
        if not resume:
            return None
        if resume == "latest":
            found = list_checkpoints(self.root)
            return found[-1] if found else None
        path = Path(resume).expanduser()
        if not (path / "trainer_state_0.json").is_file():
            raise ValueError(f"train.resume={resume}: not a checkpoint folder (no trainer_state_0.json); give "
                             f"'latest' or one of the step-N folders under {self.root}")
        return path

    def load(self, path: Path) -> Dict[str, object]:
        accelerator = self.accelerator
        accelerator.load_state(str(path))
        own = path / f"trainer_state_{accelerator.process_index}.json"
        if not own.is_file():
            raise ValueError(f"{path} was written by fewer processes than this run has ({accelerator.num_processes}); "
                             "resume with the same number of processes")
        return json.loads(own.read_text())

"""Checkpoints that a crash cannot corrupt, and resume that continues the exact run.

A checkpoint is accelerate's ``save_state`` (model, optimizer, LR scheduler, every process's RNG states) plus a
small JSON per process (optimizer step, data position, running loss state). It is written into
``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` only when every process has finished, so a
folder named ``step-N`` is always complete; ``train.resume=latest`` picks the highest one. Only the last
``train.keep_checkpoints`` are kept. For LoRA runs the model part is the trainable parameters only (a few MB),
not the whole frozen UNet.

Each checkpoint also holds the run's ``config.yaml``: a resume whose model, adapter, loss, data, batch or optimizer
settings differ from the checkpoint's is refused with the differing keys listed (``train.resume_force=true``
continues anyway, unless the adapter's shapes differ, which no resume can bridge). A full disk while saving is
reported as such, and the previous complete checkpoint stays.

Example::

    ckpt = Checkpointer(accelerator, output_dir, keep=3)
    ckpt.save(step, {"epoch": 0, "next_index": 12})
    state = ckpt.load(ckpt.find("latest"))    # -> the JSON of this process
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from diffusion_pref.fileio import replace_folder

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINABLE_FILE = "policy_trainable.safetensors"
CONFIG_FILE = "config.yaml"

# What a resumed run must share with its checkpoint: what the weights and optimizer state mean (model, adapter,
# loss, trajectory), which pairs come in which order (data, seed, batch), and the optimizer's settings, which the
# restored optimizer state would silently override. Everything else (max_steps, logging, checkpointing,
# validation, data workers, speed options, the other commands' sections) may change.
_RESUME_SECTIONS = ("model", "loss", "trajectory", "data")
_RESUME_TRAIN_KEYS = ("batch_size", "grad_accum", "optimizer", "learning_rate", "lr_scheduler", "warmup_steps",
                      "adam_beta1", "adam_beta2", "adam_eps", "weight_decay")
_RESUME_FREE = {"data.num_workers", "data.cache", "data.cache_dir"}
_RESUME_OTHER_KEYS = (("runtime", "seed"),)


def resume_differences(saved: Dict[str, dict], current: Dict[str, dict]) -> List[str]:
    """``key (checkpoint -> now)`` for each resume-relevant key of two configs (YAML trees) that differs.

    A key the checkpoint's config lacks (written before the key existed) is not compared.
    """
    keys = [(section, key) for section in _RESUME_SECTIONS for key in current.get(section, {})]
    keys += [("train", key) for key in _RESUME_TRAIN_KEYS] + list(_RESUME_OTHER_KEYS)
    found = []
    for section, key in keys:
        name = f"{section}.{key}"
        if name in _RESUME_FREE or key not in saved.get(section, {}):
            continue
        old, new = saved[section][key], current.get(section, {}).get(key)
        if old != new:
            found.append(f"{name} ({old!r} -> {new!r})")
    return found


def is_disk_full(err: BaseException) -> bool:
    """The errors torch.save and safetensors raise when a write runs out of space (torch's never says so)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(mark in str(err) for mark in (
        "No space left", "unexpected pos", "file write failed", "StorageFull", "Disk quota exceeded"))


def list_checkpoints(root: Path):
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


class Checkpointer:
    def __init__(self, accelerator, output_dir, keep: int = 3, config=None):
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.config = config  # the run's Config, stored in each checkpoint so that a resume can be checked

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
                    trainable = {n for n, p in params.items() if p.requires_grad}
                    missing = sorted(trainable - state.keys())
                    extra = sorted(state.keys() - trainable)
                    shapes = [n for n in sorted(trainable & state.keys()) if state[n].shape != params[n].shape]
                    if missing or extra or shapes:
                        parts = [f"{len(names)} {label} (e.g. {names[0]})" for label, names in (
                            ("tensors differ in shape", shapes), ("missing", missing), ("not in this model", extra))
                            if names]
                        if shapes:
                            parts[0] = (f"{len(shapes)} tensors differ in shape (e.g. {shapes[0]}: "
                                        f"{list(state[shapes[0]].shape)} saved, {list(params[shapes[0]].shape)} now)")
                        raise ValueError(f"cannot resume from {input_dir}: its adapter does not fit this model "
                                         f"({'; '.join(parts)}); it was written with another model.lora_rank, "
                                         "model.lora_targets or base model (train.resume_force cannot bridge that)")
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
        try:
            accelerator.save_state(str(tmp))
            (tmp / f"trainer_state_{accelerator.process_index}.json").write_text(json.dumps({"step": step, **state}))
            if accelerator.is_main_process and self.config is not None:
                from diffusion_pref.config import to_yaml

                (tmp / CONFIG_FILE).write_text(to_yaml(self.config))
        except Exception as err:  # torch: RuntimeError, safetensors: SafetensorError, plain writes: OSError
            if not is_disk_full(err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder would only hold on to the space
            found = list_checkpoints(self.root)
            last = (f"the last complete checkpoint {found[-1]} is intact: free some space and resume with "
                    "train.resume=latest") if found else "no complete checkpoint was written yet"
            raise OSError(errno.ENOSPC, f"the disk is full: writing checkpoint step {step} under {self.root} failed "
                                        f"({str(err).splitlines()[0][:200]}); {last}") from None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_folder(tmp, final)  # the atomic step: a step-N folder is complete or absent
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

    def check_config(self, path: Path, force: bool = False) -> None:
        """Refuse to resume from ``path`` when its run differs in what resume must keep (see resume_differences)."""
        import yaml

        from diffusion_pref.config import to_yaml

        saved_file = path / CONFIG_FILE
        if self.config is None:
            return
        if not saved_file.is_file():
            logger.warning("%s holds no %s (written by an older version): cannot check that this run matches it",
                           path, CONFIG_FILE)
            return
        differences = resume_differences(yaml.safe_load(saved_file.read_text()) or {},
                                         yaml.safe_load(to_yaml(self.config)))
        saved_processes = len(list(path.glob("trainer_state_*.json")))
        if saved_processes != self.accelerator.num_processes:
            differences.append(f"number of processes ({saved_processes} -> {self.accelerator.num_processes})")
        if not differences:
            return
        listed = ", ".join(differences)
        if force:
            logger.warning("train.resume_force=true: resuming from %s although the run differs in %s", path, listed)
            return
        raise ValueError(f"train.resume: the checkpoint {path} was made by another run: {listed}; resume with the "
                         "checkpoint's settings (its config.yaml), use another output.dir for a new run, or set "
                         "train.resume_force=true to continue anyway")

    def load(self, path: Path) -> Dict[str, object]:
        accelerator = self.accelerator
        try:
            accelerator.load_state(str(path))
        except RuntimeError as err:
            from diffusion_pref.pipelines import summarize_mismatch

            summary = summarize_mismatch(str(err))
            if summary is None:
                raise
            raise ValueError(f"cannot resume from {path}: its model does not fit this one ({summary}); it was "
                             "written for another model.pretrained or model.finetune") from None
        own = path / f"trainer_state_{accelerator.process_index}.json"
        if not own.is_file():
            raise ValueError(f"{path} was written by fewer processes than this run has ({accelerator.num_processes}); "
                             "resume with the same number of processes")
        return json.loads(own.read_text())

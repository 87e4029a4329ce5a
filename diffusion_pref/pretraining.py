"""What the toy worlds' pretraining scripts share (``toy/pretrain.py``, ``tones/pretrain.py``): a progress log and the
optimizer step with its weight EMA."""

from __future__ import annotations

from pathlib import Path
from typing import Union


def run_log(path: Union[str, Path]):
    """A progress log for long jobs (pretraining): ``log(record)`` prints ``record`` as one JSON line with the seconds
    since this call (``t``) and appends it to ``path`` (JSON lines, flushed at once, so a killed job keeps its log)."""
    import json
    import time

    start = time.time()
    file = Path(path).open("a")

    def log(record: dict) -> None:
        line = json.dumps({"t": round(time.time() - start, 1), **record})
        print(line, flush=True)
        file.write(line + "\n")
        file.flush()

    return log


def start_run(args):
    """Seed torch and a ``random.Random`` with ``args.seed``, create ``args.out`` and its ``log.jsonl`` progress log
    (the arguments are its first line): ``(rng, out, log)``."""
    import random

    import torch

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = run_log(out / "log.jsonl")
    log({"args": vars(args)})
    return random.Random(args.seed), out, log


def optimizer_step_with_ema(loss, opt, params, modules, ema, step: int, ema_max: float) -> None:
    """One optimizer step of a pretraining script (gradient norm clipped at 1) and the EMA of ``modules``' weights
    into ``ema`` (a list of parameter lists), with diffusers' EMAModel warm-up: decay min(ema_max, (1+step)/(10+step)),
    so early checkpoints are not dominated by the random init."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema_max, (1 + step) / (10 + step))
    with torch.no_grad():
        for module, shadow in zip(modules, ema):
            for p, e in zip(module.parameters(), shadow):
                e.lerp_(p.detach(), 1 - decay)

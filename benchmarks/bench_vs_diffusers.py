"""Our training step against diffusers' ``train_diffusion_dpo.py`` on the same model, data and machine (not a test).

Both sides train a LoRA with the DPO loss on the same local pipeline folder and the same local Pick-a-Pic-layout
parquet dataset (``caption, jpg_0, jpg_1, label_0``), with the same batch (pairs), resolution, LoRA rank and
targets, precision, grad-norm clipping, TensorBoard logging, data workers, no gradient checkpointing, one process
and the same thread count. Each run is a fresh process; runs alternate (diffusers, ours uncached, ours cached,
then again) so a load from other jobs on the machine lands on every side alike.

What is timed: a global ``torch.optim`` step post-hook records the time of every optimizer step on both sides
(nothing in either training loop is changed). A step's time is the gap between two consecutive optimizer steps, so
it covers data loading, VAE / text encoding (uncached), the reference and policy forwards, the backward, clipping,
the optimizer and logging. The first ``--warmup`` steps are dropped; the table quotes the median of the rest,
pooled over the repeats. Peak memory is the process's peak RSS on a CPU (``ru_maxrss``: model loading included,
which both sides do the same way) or ``torch.cuda.max_memory_allocated`` on a GPU. For the cached run, building the
cache (one VAE / text-encoder pass over the dataset) happens before the first step and is reported separately as
``setup_s`` minus the uncached run's.

diffusers' script is not part of this project: fetch it yourself and pass its path, e.g. from a diffusers checkout::

    git -C diffusers show <commit>:examples/research_projects/diffusion_dpo/train_diffusion_dpo.py \\
        > /tmp/train_diffusion_dpo.py

(the latest results used commit 58eb52c0803ea9af3abec60841c2a093bdf1f951; see ``benchmarks/README.md``).

It is run unmodified. Two things make it run offline on a machine without W&B: ``wandb`` (imported at its top,
used only with ``--report_to wandb``) is replaced by an empty module when it is not installed, and
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are set.

Run (CPU, 2 threads; the SD1.5-sized UNet at 64 px is slow on a CPU, keep the steps few)::

    OMP_NUM_THREADS=2 python benchmarks/bench_vs_diffusers.py --diffusers-script /tmp/train_diffusion_dpo.py \\
        --models sd15 --batch-size 2 --steps 3 --warmup 1 --repeats 3 --threads 2 \\
        --out benchmarks/results/vs_diffusers_sd15_cpu.json
    python benchmarks/bench_vs_diffusers.py --from-json benchmarks/results/vs_diffusers_sd15_cpu.json  # the table again
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _save_sd15_sized, _write_pairs  # noqa: E402  (shared model and data builders)

SIDES = ("diffusers", "ours-uncached", "ours-cached")


# ------------------------------------------------------------------------------------------ inside the child


def _install_step_clock(threads: int):
    """Times of every optimizer step, from a global hook, so neither training loop is edited."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(threads)
    stamps: list = []

    def after_step(optimizer, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    register_optimizer_step_post_hook(after_step)
    return stamps


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_diffusers(script: str, argv: list) -> None:
    import runpy

    try:
        import wandb  # noqa: F401
    except ImportError:  # imported unconditionally by the script, used only with --report_to wandb
        import importlib.machinery

        stub = types.ModuleType("wandb")
        # A spec, so libraries probing with find_spec still get "not installed" from the package metadata.
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")


def _run_ours(overrides: list) -> float:
    """Returns the seconds spent before the first step (model loading, and building the cache when cached)."""
    from diffusion_pref.config import load_config
    from diffusion_pref.training.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(load_config(None, overrides))
    setup = time.perf_counter() - start
    trainer.train()
    return setup


def child(args) -> None:
    spec = json.loads(args.child)
    stamps = _install_step_clock(spec["threads"])
    start = time.perf_counter()
    setup = None
    if spec["side"] == "diffusers":
        _run_diffusers(spec["script"], spec["argv"])
    else:
        setup = _run_ours(spec["overrides"])
    seconds = [b - a for a, b in zip(stamps, stamps[1:])][spec["warmup"] - 1:]  # gaps after the warm-up steps
    print(json.dumps({"step_seconds": seconds, "steps_run": len(stamps), "peak_bytes": _peak_bytes(),
                      "setup_s": setup, "first_step_at_s": stamps[0] - start if stamps else None}))


# ------------------------------------------------------------------------------------------- the driver


def _sha256(path) -> str | None:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def _git_head() -> str | None:
    proc = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False)
    return proc.stdout.strip() or None


def _commands(side: str, model_dir: Path, data_dir: Path, out: Path, args, resolution: int) -> dict:
    steps = args.warmup + args.steps
    if side == "diffusers":
        argv = ["--pretrained_model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
                "--dataset_split_name", "train", "--output_dir", str(out), "--resolution", str(resolution),
                "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
                "--rank", str(args.rank), "--mixed_precision", args.mixed_precision, "--seed", "0",
                "--checkpointing_steps", str(10 * steps), "--report_to", "tensorboard",
                "--dataloader_num_workers", "0", "--learning_rate", "1e-5", "--lr_warmup_steps", "0",
                "--max_grad_norm", "1.0", "--cache_dir", str(out / "hf_datasets")]
        return {"side": side, "script": str(args.diffusers_script), "argv": argv}
    overrides = [f"model.pretrained={model_dir}", f"data.source={data_dir}", f"data.resolution={resolution}",
                 f"train.batch_size={args.batch_size}", f"train.max_steps={steps}", f"model.lora_rank={args.rank}",
                 "loss.name=dpo", "train.logger=tensorboard", "train.checkpoint_every=0", "data.num_workers=0",
                 "train.learning_rate=1e-5", "train.max_grad_norm=1.0", "train.gradient_checkpointing=false",
                 f"output.dir={out}", f"data.cache={'true' if side == 'ours-cached' else 'false'}"]
    if args.mixed_precision != "no":  # a bare `no` is the default; passing it is not needed
        overrides.append(f"train.mixed_precision={args.mixed_precision}")
    return {"side": side, "overrides": overrides}


def _run_child(spec: dict, args) -> dict:
    spec = {**spec, "threads": args.threads, "warmup": args.warmup}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['side']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - start
    if row["steps_run"] != args.warmup + args.steps:
        raise SystemExit(f"{spec['side']} ran {row['steps_run']} optimizer steps, expected {args.warmup + args.steps}")
    return row


def _summary(rows: list, batch_size: int) -> dict:
    seconds = [s for r in rows for s in r["step_seconds"]]
    median = statistics.median(seconds)
    setups = [r["setup_s"] for r in rows if r["setup_s"] is not None]
    return {"median_step_s": median, "pairs_per_s": batch_size / median, "min_step_s": min(seconds),
            "best_pairs_per_s": batch_size / min(seconds), "max_step_s": max(seconds), "timed_steps": len(seconds),
            "peak_gib": max(r["peak_bytes"] for r in rows) / 2**30,
            "setup_s": statistics.median(setups) if setups else None}


def _results(runs: list, meta: dict) -> list:
    """Per model and side: pooled step times of every repeat, and the ratios to diffusers' run."""
    results = []
    for name in dict.fromkeys(r["model"] for r in runs):
        by_side = {}
        for r in runs:
            if r["model"] == name:
                by_side.setdefault(r["side"], []).append(r)
        base = _summary(by_side["diffusers"], meta["batch_size"]) if "diffusers" in by_side else None
        uncached = _summary(by_side["ours-uncached"], meta["batch_size"]) if "ours-uncached" in by_side else None
        for side, rows in by_side.items():
            s = _summary(rows, meta["batch_size"])
            nan = float("nan")
            s.update(model=name, side=side, resolution=rows[0]["resolution"], batch_size=meta["batch_size"],
                     speedup_vs_diffusers=s["pairs_per_s"] / base["pairs_per_s"] if base else nan,
                     best_speedup_vs_diffusers=s["best_pairs_per_s"] / base["best_pairs_per_s"] if base else nan,
                     memory_vs_diffusers=s["peak_gib"] / base["peak_gib"] if base else nan)
            if side == "ours-cached" and uncached is not None:
                s["cache_build_s"] = s["setup_s"] - uncached["setup_s"]  # extra time before the first step
            results.append(s)
    return results


def _table(results: list) -> str:
    # The ratio of fastest steps is left to the JSON: on a shared machine one side can land in a quiet moment the
    # other never saw, so only the medians of interleaved runs compare the two fairly.
    lines = ["| model | res | pairs/step | side | pairs/s | vs diffusers | median s/step (min-max) | peak GiB | "
             "vs diffusers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch_size']} | {r['side']} | {r['pairs_per_s']:.3f} | "
                     f"{r['speedup_vs_diffusers']:.2f}x | {r['median_step_s']:.2f} "
                     f"({r['min_step_s']:.2f}-{r['max_step_s']:.2f}) | {r['peak_gib']:.2f} | "
                     f"{r['memory_vs_diffusers']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", type=Path, help="path to diffusers' train_diffusion_dpo.py")
    parser.add_argument("--models", default="tiny", help="comma list of tiny, sd15")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 32 tiny, 64 sd15)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the timed ones (at least 1)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of diffusers / ours-uncached / ours-cached")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (diffusers' README recipes use 8)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads in every run")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--out", default="bench_vs_diffusers.json")
    parser.add_argument("--diffusers-commit", default=None, help="the diffusers commit the script came from (recorded)")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table of an earlier results file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one run, as JSON
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(_table(_results(saved["runs"], saved["meta"])))
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step's start is not observable from the step hook")
    sides = args.sides.split(",")
    if "diffusers" in sides and (args.diffusers_script is None or not args.diffusers_script.is_file()):
        parser.error("--diffusers-script must name diffusers' train_diffusion_dpo.py (see the module docstring), "
                     "or leave diffusers out of --sides")

    import diffusers
    import torch

    from diffusion_pref.testing import save_tiny_sd

    raw = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model_dir = save_tiny_sd(tmp / "tiny") if name == "tiny" else _save_sd15_sized(tmp / "sd15")
            resolution = args.resolution or (32 if name == "tiny" else 64)
            data_dir = tmp / f"pairs-{name}"
            data_dir.mkdir()
            # One epoch covers every step of a run; `train-*` is the file name datasets maps to split "train".
            _write_pairs(data_dir / "train-00000-of-00001.parquet", args.batch_size * (args.warmup + args.steps),
                         resolution)
            for repeat in range(args.repeats):
                for side in sides:  # interleaved, so a burst of load from other jobs hits every side
                    spec = _commands(side, model_dir, data_dir, tmp / f"out-{name}-{side}-{repeat}", args, resolution)
                    row = _run_child(spec, args)
                    raw.append({"model": name, "side": side, "repeat": repeat, "resolution": resolution, **row})
                    print(f"{name} {side} #{repeat}: median {statistics.median(row['step_seconds']):.3f} s/step, "
                          f"peak {row['peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads,
            "mixed_precision": args.mixed_precision, "lora_rank": args.rank, "warmup": args.warmup,
            "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
            "diffusers_script": str(args.diffusers_script), "diffusers_script_sha256": _sha256(args.diffusers_script),
            "diffusers_script_commit": args.diffusers_commit, "ours_commit": _git_head()}
    results = _results(raw, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "runs": raw}, indent=2))
    print(_table(results))


if __name__ == "__main__":
    main()

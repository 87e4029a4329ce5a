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
import re
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
from provenance import code_identity  # noqa: E402

SIDES = ("diffusers", "ours-uncached", "ours-cached")


# ------------------------------------------------------------------------------------------ inside the child


def _install_step_clock(threads: int, on_step=None, wait_at=None):
    """Times of every optimizer step, from a global hook, so neither training loop is edited.

    ``wait_at``: the stamp indices at which the clock waits for the GPU first (None: every step, so each gap is
    one step's GPU time). ``--clock window`` waits only at the two ends of the timed window: a loop that queues
    its next step while the GPU still runs the current one keeps that overlap, which a wait at every step would
    take from it; the window's length is then exact and the gaps inside it are the host's pace.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(threads)
    stamps: list = []

    def after_step(optimizer, args, kwargs):
        if torch.cuda.is_available() and (wait_at is None or len(stamps) in wait_at):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if on_step is not None:
            on_step()

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
    from diffusion_pref.training.setup import Trainer

    start = time.perf_counter()
    trainer = Trainer(load_config(None, overrides))
    setup = time.perf_counter() - start
    trainer.train()
    return setup


def _unet_step_flops(spec: dict) -> dict:
    """FLOPs of one pair's UNet work in a LoRA DPO step, counted by ``torch.utils.flop_counter``.

    One pair is two images: a reference forward under no_grad and a policy forward + backward (the backward of a
    LoRA step computes input gradients through the frozen UNet and weight gradients of the adapter only, and the
    counter sees exactly what autograd runs). Model-FLOPs utilisation is then ``pairs/s * flops / peak``. VAE and
    text-encoder FLOPs are left out: they are not the model being trained, and cached training does not run them.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["mixed_precision"]]
    unet = UNet2DConditionModel.from_pretrained(spec["model_dir"], subfolder="unet").to(device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    side = spec["resolution"] // spec["vae_scale_factor"]
    latents = torch.randn(2, unet.config.in_channels, side, side, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    text = torch.randn(2, spec["text_length"], unet.config.cross_attention_dim, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            unet(latents, t, text)
    reference = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        unet(latents, t, text).sample.float().pow(2).mean().backward()
    policy = counter.get_total_flops()
    return {"flops_per_pair": reference + policy, "reference_flops_per_pair": reference,
            "policy_flops_per_pair": policy, "unet_forward_flops_per_image": reference / 2}


def _profiler(warmup: int, active: int):
    """A torch.profiler over ``active`` optimizer steps after ``warmup`` ones; fills the returned dict when done.

    The dict gets the top of the op table (by self time on the GPU, or the CPU without one) and the summed
    kernel time, which the caller divides by the wall time of the same steps: the fraction of the step the GPU
    was busy. Everything else is the GPU waiting for the host (launches, data, synchronisation).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available()
    result: dict = {}

    def ready(prof):
        events = prof.key_averages()
        device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        result["table"] = events.table(sort_by=device_attr if cuda else "self_cpu_time_total", row_limit=30)
        result["device_seconds"] = sum(getattr(e, device_attr) for e in events) / 1e6 if cuda else None

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                   on_trace_ready=ready)
    return prof, result


def child(args) -> None:
    spec = json.loads(args.child)
    if spec["side"] == "flops":
        print(json.dumps(_unet_step_flops(spec)))
        return
    prof = profiled = None
    if spec.get("profile_steps"):
        prof, profiled = _profiler(spec["warmup"], spec["profile_steps"])
    first, last = spec["warmup"] - 1, spec["warmup"] + spec["steps"] - 1  # the stamps that open / close the window
    wait_at = {first, last} if spec.get("clock") == "window" else None
    stamps = _install_step_clock(spec["threads"], on_step=prof.step if prof is not None else None, wait_at=wait_at)
    if prof is not None:
        prof.start()
    start = time.perf_counter()
    setup = None
    if spec["side"] == "diffusers":
        _run_diffusers(spec["script"], spec["argv"])
    else:
        setup = _run_ours(spec["overrides"])
    if prof is not None:
        prof.stop()
    seconds = [b - a for a, b in zip(stamps, stamps[1:])][spec["warmup"] - 1:]  # gaps after the warm-up steps
    row = {"step_seconds": seconds, "steps_run": len(stamps), "peak_bytes": _peak_bytes(), "setup_s": setup,
           "first_step_at_s": stamps[0] - start if stamps else None, "clock": spec.get("clock", "step"),
           "window_s": stamps[last] - stamps[first] if len(stamps) > last else None,
           "window_steps": last - first}
    if profiled:
        first = spec["warmup"] - 1  # the profiled steps are the gaps after the warm-up stamps
        wall = stamps[first + spec["profile_steps"]] - stamps[first]
        row["profile"] = {**profiled, "wall_seconds": wall, "steps": spec["profile_steps"],
                          "device_busy": profiled["device_seconds"] / wall if profiled["device_seconds"] else None}
    print(json.dumps(row))


# ------------------------------------------------------------------------------------------- the driver


def _sha256(path) -> str | None:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def _commands(side: str, model_dir: Path, data_dir: Path, out: Path, args, resolution: int,
              extra_steps: int = 0) -> dict:
    steps = args.warmup + args.steps + extra_steps
    if side == "diffusers":
        argv = ["--pretrained_model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
                "--dataset_split_name", "train", "--output_dir", str(out), "--resolution", str(resolution),
                "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
                "--rank", str(args.rank), "--mixed_precision", args.mixed_precision, "--seed", "0",
                "--checkpointing_steps", str(10 * steps), "--report_to", "tensorboard",
                "--dataloader_num_workers", "0", "--learning_rate", "1e-5", "--lr_warmup_steps", "0",
                "--max_grad_norm", "1.0", "--cache_dir", str(out / "hf_datasets")]
        return {"side": side, "script": str(args.diffusers_script), "argv": argv}
    side, _, extra = side.partition("+")  # "ours-cached+train.cuda_graphs=true": a variant of an ours side
    overrides = [f"model.pretrained={model_dir}", f"data.source={data_dir}", f"data.resolution={resolution}",
                 f"train.batch_size={args.batch_size}", f"train.max_steps={steps}", f"model.lora_rank={args.rank}",
                 "loss.name=dpo", "train.logger=tensorboard", "train.checkpoint_every=0", "data.num_workers=0",
                 "train.learning_rate=1e-5", "train.max_grad_norm=1.0", "train.gradient_checkpointing=false",
                 f"output.dir={out}", f"data.cache={'true' if side == 'ours-cached' else 'false'}"]
    if args.mixed_precision != "no":  # fp32 (auto) is the default; passing it is not needed
        overrides.append(f"runtime.dtype={args.mixed_precision}")
    overrides += [o for o in extra.split("+") if o]
    return {"side": side, "overrides": overrides}


class ChildFailed(RuntimeError):
    """One run failed; the driver records it and goes on with the others (a GPU lease is too short to rerun)."""


def _run_child(spec: dict, args, optimizer_steps: bool = True, expected_steps: bool = True) -> dict:
    spec = {**spec, "threads": args.threads, "warmup": args.warmup, "steps": args.steps, "clock": args.clock}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise ChildFailed(f"{spec['side']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not optimizer_steps:
        return row
    row["wall_s"] = time.perf_counter() - start
    if expected_steps and row["steps_run"] != args.warmup + args.steps:
        raise ChildFailed(f"{spec['side']} ran {row['steps_run']} optimizer steps, expected {args.warmup + args.steps}")
    return row


# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets (no sparsity), for model-FLOPs utilisation.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # the most specific names come first
        if key in device_name:
            return value
    return None


def _summary(rows: list, batch_size: int) -> dict:
    seconds = [s for r in rows for s in r["step_seconds"]]
    median = statistics.median(seconds)
    setups = [r["setup_s"] for r in rows if r["setup_s"] is not None]
    summary = {"pairs_per_s": batch_size / median}
    if all(r.get("clock") == "window" and r.get("window_s") for r in rows):
        # --clock window: the throughput over the timed window is the number that keeps host/GPU overlap
        summary = {"pairs_per_s": batch_size * sum(r["window_steps"] for r in rows) / sum(r["window_s"] for r in rows),
                   "median_gap_pairs_per_s": batch_size / median}
    return {**summary, "median_step_s": median, "min_step_s": min(seconds),
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
            flops = meta.get("flops", {}).get(name)
            if flops and meta.get("peak_tflops"):
                achieved = s["pairs_per_s"] * flops["flops_per_pair"]
                s.update(model_tflops_per_s=achieved / 1e12, mfu=achieved / (meta["peak_tflops"] * 1e12))
            results.append(s)
    return results


def _table(results: list) -> str:
    # The ratio of fastest steps is left to the JSON: on a shared machine one side can land in a quiet moment the
    # other never saw, so only the medians of interleaved runs compare the two fairly.
    lines = ["| model | res | pairs/step | side | pairs/s | vs diffusers | median s/step (min-max) | peak GiB | "
             "vs diffusers | UNet TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = (f"{r['model_tflops_per_s']:.0f} | {100 * r['mfu']:.1f}%" if "mfu" in r else "- | -")
        lines.append(f"| {r['model']} | {r['resolution']} | {r['batch_size']} | {r['side']} | {r['pairs_per_s']:.3f} | "
                     f"{r['speedup_vs_diffusers']:.2f}x | {r['median_step_s']:.3f} "
                     f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | {r['peak_gib']:.2f} | "
                     f"{r['memory_vs_diffusers']:.2f}x | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", type=Path, help="path to diffusers' train_diffusion_dpo.py")
    parser.add_argument("--models", default="tiny", help="comma list of tiny, sd15")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 32 tiny, 64 sd15)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--clock", default="step", choices=["step", "window"],
                        help="step: wait for the GPU after every step (per-step times); window: only at the ends of "
                             "the timed steps (keeps a loop's overlap of host and GPU work; see window pairs/s)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the timed ones (at least 1)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of diffusers / ours-uncached / ours-cached")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (diffusers' README recipes use 8)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads in every run")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma list of diffusers, ours-uncached, ours-cached; an ours side may add overrides "
                             "after +, e.g. ours-cached+train.cuda_graphs=true")
    parser.add_argument("--out", default="bench_vs_diffusers.json")
    parser.add_argument("--diffusers-commit", default=None, help="the diffusers commit the script came from (recorded)")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table of an earlier results file")
    parser.add_argument("--encoders", default="tiny", choices=["tiny", "sd15"],
                        help="sd15 model only: tiny VAE + 1-layer text encoder, or SD1.5's own VAE and text encoder "
                             "architectures (what a GPU check at 512 px needs)")
    parser.add_argument("--flops", action="store_true",
                        help="count the UNet FLOPs of a step and report model-FLOPs utilisation (MFU)")
    parser.add_argument("--profile", default="", help="comma list of sides to run once more under torch.profiler "
                        "(not timed): the op table and the fraction of the step the GPU was busy")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled after the warm-up")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: from the device name, GPUs only)")
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

    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "clock": args.clock,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": device_name,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads,
            "mixed_precision": args.mixed_precision, "lora_rank": args.rank, "warmup": args.warmup,
            "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size, "encoders": args.encoders,
            "diffusers_script": str(args.diffusers_script), "diffusers_script_sha256": _sha256(args.diffusers_script),
            "diffusers_script_commit": args.diffusers_commit, **code_identity(),
            "peak_tflops": args.peak_tflops or peak_tflops(device_name), "flops": {}}
    raw = []

    def failed(model: str, side: str, err: Exception) -> None:
        meta.setdefault("failures", []).append({"model": model, "side": side, "error": str(err)})
        print(f"{model} {side}: {err}", file=sys.stderr, flush=True)
        save()

    def save():  # after every run, so a run cut short by a time limit still leaves what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": _results(raw, meta), "runs": raw}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model_dir = (save_tiny_sd(tmp / "tiny") if name == "tiny"
                         else _save_sd15_sized(tmp / "sd15", encoders=args.encoders))
            resolution = args.resolution or (32 if name == "tiny" else 64)
            data_dir = tmp / f"pairs-{name}"
            data_dir.mkdir()
            # One epoch covers every step of a run; `train-*` is the file name datasets maps to split "train".
            most_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
            _write_pairs(data_dir / "train-00000-of-00001.parquet", args.batch_size * most_steps, resolution)
            if args.flops:
                vae = json.loads((model_dir / "vae" / "config.json").read_text())
                text = json.loads((model_dir / "text_encoder" / "config.json").read_text())
                spec = {"side": "flops", "model_dir": str(model_dir), "mixed_precision": args.mixed_precision,
                        "rank": args.rank, "resolution": resolution,
                        "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
                        "text_length": text["max_position_embeddings"]}
                try:
                    meta["flops"][name] = _run_child(spec, args, optimizer_steps=False)
                    print(f"{name}: {meta['flops'][name]['flops_per_pair'] / 1e12:.2f} TFLOP per pair",
                          file=sys.stderr, flush=True)
                except ChildFailed as err:
                    failed(name, "flops", err)
            for repeat in range(args.repeats):
                for side in sides:  # interleaved, so a burst of load from other jobs hits every side
                    spec = _commands(side, model_dir, data_dir, tmp / f"out-{name}-{side}-{repeat}", args, resolution)
                    try:
                        row = _run_child(spec, args)
                    except ChildFailed as err:
                        failed(name, side, err)
                        continue
                    raw.append({"model": name, "side": side, "repeat": repeat, "resolution": resolution, **row})
                    save()
                    print(f"{name} {side} #{repeat}: median {statistics.median(row['step_seconds']):.3f} s/step, "
                          f"peak {row['peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            for side in filter(None, args.profile.split(",")):
                spec = _commands(side, model_dir, data_dir, tmp / f"out-{name}-{side}-profile", args, resolution,
                                 extra_steps=args.profile_steps)
                try:
                    row = _run_child({**spec, "profile_steps": args.profile_steps}, args, expected_steps=False)
                except ChildFailed as err:
                    failed(name, f"{side} (profiled)", err)
                    continue
                meta.setdefault("profiles", {})[f"{name} {side}"] = row["profile"]
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{name}-{side}")  # a side may hold + and =
                Path(f"{args.out}.profile-{safe}.txt").write_text(row["profile"]["table"])
                save()
                busy = row["profile"]["device_busy"]
                print(f"{name} {side} profiled: GPU busy {'-' if busy is None else f'{100 * busy:.0f}%'} of "
                      f"{row['profile']['wall_seconds'] / args.profile_steps:.3f} s/step", file=sys.stderr, flush=True)
    save()
    print(_table(_results(raw, meta)))
    if meta.get("failures"):
        raise SystemExit(f"{len(meta['failures'])} run(s) failed: " + ", ".join(f["side"] for f in meta["failures"]))

if __name__ == "__main__":
    main()

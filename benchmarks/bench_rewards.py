"""Throughput of every registered reward scorer (not a test): images/s (clips/s for CLAP) of ``score(prompts, media)``.

For each scorer (pickscore, hpsv21, clip, aesthetic, imagereward, clap, toy-fidelity, toy-size) it writes a tiny
random-weight model in the scorer's official checkpoint layout to a temporary folder (``diffusion_pref.
testing.rewards``: CLIP folders for PickScore/CLIP/aesthetic plus the aesthetic MLP ``.pth``, an open_clip
``HPS_v2.1_compressed.pt``, an ``ImageReward.pt`` + ``med_config.json`` + ``vocab.txt`` folder, a CLAP
folder), loads it through the public
``load_reward_model(name, ...)``, scores one warm-up batch, then times ``score`` on ``--n`` items ``--repeats``
times and reports the median. Media: 512x512 RGB PIL images (what SD1.5 generation hands the scorers), 32x32 for
the toy scorers (the shapes world's native size), 10-second 48 kHz mono clips for CLAP.

What the numbers mean: the models are tiny (two 32- or 48-wide transformer layers per tower; 0.05-0.2M
parameters, 1.7M for HPS, almost all of it open_clip's 49,408-token embedding table), so on a CPU these numbers
mostly measure **preprocessing** (PIL resize and crop of a 512 px image to 224, the HPS letterbox, CLAP's mel
spectrogram of 480,000 samples, tokenisation) and per-batch overhead, not the networks. A cProfile of one call:
PickScore spends ~90% in the image processor and ~9% in the CLIP forwards; CLAP ~75% in the feature extractor and
~20% in HTSAT. So the table shows which scorer's input pipeline is the slow one; it does not say how fast a real
ViT-H-14 or BLIP ViT-L scores. Real-size numbers need a GPU machine and the real weights
(``load_reward_model(name)`` with the hub ids, or local copies in the official layout).

Run (from the repository root, offline)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_rewards.py --threads 1                  # CPU, under a minute
    HF_HUB_OFFLINE=1 python benchmarks/bench_rewards.py --scorers pickscore clap --n 64 --repeats 5 --out x.json

Prints a markdown table and writes JSON (default ``benchmarks/results/bench_rewards.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCORERS = ("pickscore", "hpsv21", "clip", "aesthetic", "imagereward", "clap", "toy-fidelity", "toy-size")
PROMPTS = ["a photo of a cat", "a red car in the street", "a painting of a house by the sea", "a dog barking"]
SAMPLE_RATE = 48_000
CLIP_SECONDS = 10
IMAGE_SIZE = 512
TOY_SIZE = 32
# ---------------------------------------------------------------- media and timing


def _media(name: str, n: int, seed: int = 0):
    """(prompts, media, score kwargs, unit) for n items of the scorer's kind."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if name == "clap":
        clips = [(rng.standard_normal(SAMPLE_RATE * CLIP_SECONDS) * 0.3).astype(np.float32) for _ in range(n)]
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)], clips, {"sample_rate": SAMPLE_RATE}, "clips/s"
    if name.startswith("toy-"):
        from diffusion_pref.toy.render import render_batch, train_captions

        captions = train_captions()
        prompts = [captions[i % len(captions)] for i in range(n)]
        pixels = render_batch(prompts, list(range(n)), resolution=TOY_SIZE)  # [n, 3, 32, 32] in [0, 1]
        arrays = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return prompts, [Image.fromarray(a) for a in arrays], {}, "images/s"
    images = [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)], images, {}, "images/s"


def _parameters(scorer) -> int:
    import torch

    modules = [v for v in vars(scorer).values() if isinstance(v, torch.nn.Module)]
    return sum(p.numel() for m in modules for p in m.parameters())


def bench_one(name: str, root: Path, n: int, repeats: int, batch_size: int | None) -> dict:
    import torch

    from diffusion_pref.reward_models import load_reward_model
    from diffusion_pref.testing.rewards import tiny_reward_kwargs

    kwargs = tiny_reward_kwargs(name, root)
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    scorer = load_reward_model(name, device="cpu", **kwargs)
    prompts, media, score_kwargs, unit = _media(name, n)
    warm = min(n, getattr(scorer, "batch_size", None) or n)
    scores = scorer.score(prompts[:warm], media[:warm], **score_kwargs)
    if scores.shape != (warm,) or not torch.isfinite(scores).all():
        raise RuntimeError(f"{name}: warm-up returned {scores!r}")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.score(prompts, media, **score_kwargs)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "scorer": name, "unit": unit, "n": n, "media": "10 s 48 kHz mono" if name == "clap" else
        f"{TOY_SIZE if name.startswith('toy-') else IMAGE_SIZE}px RGB PIL",
        "batch_size": getattr(scorer, "batch_size", None), "threads": torch.get_num_threads(),
        "parameters": _parameters(scorer), "seconds": seconds, "median_s": median, "items_per_s": n / median,
    }


def markdown(results: list[dict]) -> str:
    lines = ["| scorer | media | n | batch | threads | params | median s | items/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        batch = r["batch_size"] if r["batch_size"] is not None else "all"
        lines.append(f"| {r['scorer']} | {r['media']} | {r['n']} | {batch} | {r['threads']} | {r['parameters']:,} "
                     f"| {r['median_s']:.3f} | {r['items_per_s']:.1f} {r['unit']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=SCORERS)
    parser.add_argument("--n", type=int, default=32, help="items scored per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per scorer; the median is reported")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each scorer's own default")
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/bench_rewards.json")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be >= 1")
    if args.threads is not None:
        # Before torch is imported, so OpenMP pools (also in numpy/PIL-adjacent code) start at this size.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save/load bars would bury the table
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_rewards_") as tmp:
        for name in args.scorers:
            results.append(bench_one(name, Path(tmp), args.n, args.repeats, args.batch_size))
            r = results[-1]
            print(f"{name}: {r['items_per_s']:.1f} {r['unit']} (median of {args.repeats})", file=sys.stderr)
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "bench_rewards", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "n": args.n,
              "repeats": args.repeats, "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Training-step throughput and peak memory of ``diffusion-pref train`` (not a test).

Measures pairs/s of optimizer steps (after one warm-up step) and peak memory for:

- ``tiny``: the tiny random-weight SD of ``diffusion_pref.testing`` (8x8 latents, 32 px);
- ``sd15``: a UNet with the SD1.5 architecture (860M parameters, random weights) behind the tiny VAE (factor 4)
  and a one-layer 768-wide CLIP text encoder, so the UNet dominates as it does in real training;

each uncached and cached (``data.cache=true``: no VAE / text encoder in the step), each in a fresh process.
Peak memory is ``torch.cuda.max_memory_allocated`` during the timed steps on a GPU, and the process's peak RSS
(model loading included) on a CPU. Writes JSON and prints a markdown table.

Run::

    python benchmarks/bench_train.py --models tiny --steps 5                       # CPU smoke run
    python benchmarks/bench_train.py --models sd15 --resolution 256 --batch-size 8 --mixed-precision bf16 \\
        --steps 10 --out bench_train.json                                           # GPU: 64x64 latents
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _write_pairs(path: Path, n: int, size: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"caption": [f"a photo of a cat {i}" for i in range(n)], "jpg_0": [png() for _ in range(n)],
                             "jpg_1": [png() for _ in range(n)], "label_0": [1.0] * n}), str(path), row_group_size=64)
    return path


def _save_sd15_sized(path: Path, encoders: str = "tiny") -> Path:
    """SD1.5 UNet architecture, random weights, saved as a diffusers pipeline folder.

    ``encoders="tiny"``: behind the tiny VAE (factor 4) and a one-layer 768-wide text encoder, so the UNet dominates
    as it does in a LoRA step on a CPU. ``encoders="sd15"``: SD1.5's own VAE (factor 8, 84M parameters) and
    12-layer CLIP text encoder architectures (random weights), so that an uncached step at 512 px pays what it
    pays with the real model (the VAE encoder at 512 px costs about a UNet forward per image).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusion_pref import testing

    if encoders not in ("tiny", "sd15"):
        raise SystemExit(f"--encoders {encoders!r}: choose tiny or sd15")
    torch.manual_seed(0)
    tokenizer = testing.tiny_clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 defaults otherwise
    text_config = testing._clip_text_config(tokenizer, hidden_size=768, projection_dim=768)
    text_config.num_attention_heads, text_config.intermediate_size = 12, 3072
    text_config.num_hidden_layers = 12 if encoders == "sd15" else 1
    if encoders == "sd15":  # SD1.5's vae/config.json, random weights
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)
    else:
        vae = testing._image_vae(0.18215)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config),
                                   tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**testing._sd15_scheduler_config("epsilon")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def bench_one(model_dir: Path, data: Path, out: Path, args, cached: bool) -> dict:
    import torch

    from diffusion_pref.config import load_config
    from diffusion_pref.training.setup import Trainer

    overrides = [f"model.pretrained={model_dir}", f"data.source={data}", f"data.resolution={args.resolution}",
                 f"train.batch_size={args.batch_size}", "train.max_steps=1", "train.logger=none",
                 "train.checkpoint_every=0",
                 f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
                 f"model.finetune={args.finetune}", f"output.dir={out}", f"data.cache={str(cached).lower()}",
                 f"data.num_workers={args.num_workers}"]
    if args.mixed_precision != "no":  # accelerate's word; runtime.dtype's default (auto) trains in fp32
        overrides.append(f"runtime.dtype={args.mixed_precision}")
    trainer = Trainer(load_config(None, overrides))
    trainer.train(save_outputs=False)  # warm-up step (allocator, kernels, workers)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.cfg.train.max_steps = 1 + args.steps
    start = time.perf_counter()
    trainer.train(save_outputs=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"pairs_per_s": args.steps * args.batch_size / seconds, "seconds_per_step": seconds / args.steps,
            "peak_memory_gib": peak / 2**30, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma list of tiny, sd15")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 32 tiny, 128 sd15)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--finetune", default="lora", choices=["lora", "full"])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--modes", default="uncached,cached")
    parser.add_argument("--out", default="bench_train.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: MODEL_DIR,DATA,OUT,MODE
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:  # one measurement in a fresh process, so the peak RSS is this configuration's own
        model_dir, data, out, mode = args.one.split(",")
        print(json.dumps(bench_one(Path(model_dir), Path(data), Path(out), args, cached=(mode == "cached"))))
        return

    from diffusion_pref.testing import save_tiny_sd

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model_dir = save_tiny_sd(tmp / "tiny") if name == "tiny" else _save_sd15_sized(tmp / "sd15")
            resolution = args.resolution or (32 if name == "tiny" else 128)
            pairs = args.batch_size * (args.steps + 1)
            data = _write_pairs(tmp / f"pairs-{name}.parquet", pairs, resolution)
            for mode in args.modes.split(","):
                import subprocess

                cmd = [sys.executable, __file__, "--one", f"{model_dir},{data},{tmp / f'out-{name}-{mode}'},{mode}",
                       "--resolution", str(resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                       "--mixed-precision", args.mixed_precision, "--finetune", args.finetune,
                       "--num-workers", str(args.num_workers)]
                if args.gradient_checkpointing:
                    cmd.append("--gradient-checkpointing")
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"benchmark {name}/{mode} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(model=name, mode=mode, resolution=resolution, batch_size=args.batch_size,
                           mixed_precision=args.mixed_precision, finetune=args.finetune)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| model | mode | res | batch | precision | finetune | device | pairs/s | s/step | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['mode']} | {r['resolution']} | {r['batch_size']} | {r['mixed_precision']} | "
              f"{r['finetune']} | {r['device']} | {r['pairs_per_s']:.2f} | {r['seconds_per_step']:.3f} | "
              f"{r['peak_memory_gib']:.2f} |")


if __name__ == "__main__":
    main()

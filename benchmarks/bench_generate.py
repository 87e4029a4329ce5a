"""Throughput of ``diffusion-pref generate`` (not a test): sampling images/s, and what the rest of the run costs.

For each model it measures, after one warm-up batch:

- ``sample``: images/s of the pipeline call alone (``steps`` denoising steps, ``batch`` images per call);
- ``end_to_end``: images/s of a whole ``generate`` run over ``prompts`` prompts (sampling, scoring with a
  mean-pixel scorer, pairing, PNG encoding, atomic parquet shards), and the share of the time that is not sampling.

Models: ``tiny`` (the tiny random-weight SD of ``diffusion_pref.testing``, 32 px) and ``sd15`` (a UNet with the
SD1.5 architecture, random weights, behind the tiny VAE (factor 4) and a one-layer 768-wide CLIP text encoder;
meant for a GPU). Writes JSON and prints a markdown table.

Run::

    python benchmarks/bench_generate.py --models tiny                                  # CPU, about a minute
    python benchmarks/bench_generate.py --models sd15 --resolution 256 --batch 16 --steps 25 --out bench_generate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class MeanPixel:
    """A scorer that costs almost nothing, so end_to_end measures the generation machinery, not a reward model."""

    name = "mean-pixel"
    scale = "[0, 1]"

    def score(self, prompts, images):
        import numpy as np
        import torch

        return torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


def _sd15_shaped_pipeline():
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion_pref import testing

    tiny = testing.tiny_sd_pipeline()
    tokenizer = tiny.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # The SD1.5 UNet config (860M parameters): 4 blocks (320, 640, 1280, 1280), 8 heads, 768-d text context.
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=tokenizer.model_max_length, projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _backbone(name: str, device: str, dtype):
    from diffusion_pref.pipelines.stable_diffusion import StableDiffusionBackbone
    from diffusion_pref.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline() if name == "tiny" else _sd15_shaped_pipeline()
    return StableDiffusionBackbone(pipe).to(device, dtype)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(name: str, args, device: str) -> dict:
    import torch

    from diffusion_pref.config import load_config
    from diffusion_pref.commands.generate import _sample, generate

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backbone = _backbone(name, device, dtype)
    resolution = args.resolution or (32 if name == "tiny" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(f"a red cat {i}" for i in range(args.prompts)) + "\n")
        cfg = load_config(None, [
            f"generate.prompts={prompts}", f"sample.steps={args.steps}", f"sample.batch_size={args.batch}",
            f"generate.samples_per_prompt={args.samples}", f"sample.resolution={resolution}",
            f"output.dir={Path(tmp) / 'out'}", "generate.strategy=best_vs_worst",
        ])
        batch_prompts = ["a red cat"] * args.batch
        _sample(backbone, batch_prompts, list(range(args.batch)), cfg.sample)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for r in range(args.repeats):
            _sample(backbone, batch_prompts, [r * args.batch + i for i in range(args.batch)], cfg.sample)
        _sync(device)
        sample_s = (time.perf_counter() - start) / (args.repeats * args.batch)

        start = time.perf_counter()
        summary = generate(cfg, backbone=backbone, reward=MeanPixel())
        _sync(device)
        total = time.perf_counter() - start
    images = args.prompts * args.samples
    return {
        "model": name,
        "device": device,
        "dtype": args.dtype,
        "resolution": resolution,
        "steps": args.steps,
        "batch": args.batch,
        "sample_images_per_s": 1 / sample_s,
        "end_to_end_images_per_s": images / total,
        "end_to_end_prompts_per_s": args.prompts / total,
        "not_sampling_share": max(0.0, 1 - images * sample_s / total),
        "pairs_written": summary["pairs_written"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, sd15")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt in the end-to-end run")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the end-to-end run")
    parser.add_argument("--repeats", type=int, default=3, help="timed pipeline calls after the warm-up")
    parser.add_argument("--resolution", type=int, default=None, help="default: 32 for tiny, 256 for sd15")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = [bench(name.strip(), args, device) for name in args.models.split(",")]
    header = "| model | device | dtype | px | steps | batch | sample img/s | end-to-end img/s | prompts/s | not sampling |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        print(f"| {r['model']} | {r['device']} | {r['dtype']} | {r['resolution']} | {r['steps']} | {r['batch']} | "
              f"{r['sample_images_per_s']:.1f} | {r['end_to_end_images_per_s']:.1f} | "
              f"{r['end_to_end_prompts_per_s']:.2f} | {r['not_sampling_share']:.0%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

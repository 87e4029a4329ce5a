"""Throughput of every registered reward scorer (not a test): images/s (clips/s for CLAP) of ``score(prompts, media)``.

For each scorer (pickscore, hpsv21, clip, aesthetic, imagereward, clap, toy-fidelity, toy-size) it writes a tiny
random-weight model in the scorer's official checkpoint layout to a temporary folder (CLIP folders for
PickScore/CLIP/aesthetic plus the aesthetic MLP ``.pth``, an open_clip ``HPS_v2.1_compressed.pt``, an
``ImageReward.pt`` + ``med_config.json`` + ``vocab.txt`` folder, a CLAP folder), loads it through the public
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
# The HPS tiny architecture as an open_clip config; vocab 49408 because open_clip's tokenizer is the real one.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# ---------------------------------------------------------------- tiny models in the official layouts


def _clip_folder(root: Path) -> str:
    """A 2-layer CLIPModel (224 px, patch 32, projection 16) + CLIP tokenizer + slow image processor."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel

    from diffusion_pref.reward_models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from diffusion_pref.testing import tiny_clip_tokenizer

    folder = root / "clip"
    if folder.is_dir():
        return str(folder)
    # The scorers tokenise with max_length=77, so the text tower needs CLIP's 77 positions.
    tok = tiny_clip_tokenizer(folder, model_max_length=77)
    tok.save_pretrained(folder)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                  image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(folder)
    return str(folder)


def _aesthetic_mlp(root: Path) -> str:
    """The sac+logos+ava1-l14-linearMSE layout (layers.{0,2,4,6,7}) on the tiny CLIP's 16-d embeddings."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        mlp = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.2), nn.Linear(64, 32), nn.Dropout(0.2),
                            nn.Linear(32, 16), nn.Dropout(0.1), nn.Linear(16, 8), nn.Linear(8, 1))
    path = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, path)
    return str(path)


def _hps_folder(root: Path) -> str:
    """``{'state_dict': fp16 tensors}`` in HPS_v2.1_compressed.pt, as released."""
    import open_clip
    import torch

    folder = root / "hps"
    folder.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = open_clip.CLIP(**TINY_OPEN_CLIP)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, folder / "HPS_v2.1_compressed.pt")
    return str(folder)


def _imagereward_folder(root: Path) -> str:
    """ImageReward.pt with BLIP's timm-style ViT names and med-BERT names, + med_config.json + vocab.txt."""
    import torch
    from torch import nn
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    folder = root / "imagereward"
    folder.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "of", "the", "photo", "cat", "dog", "car"]
    (folder / "vocab.txt").write_text("\n".join(words + letters + ["##" + c for c in letters]) + "\n")
    vocab_size = len(BertTokenizer(str(folder / "vocab.txt"))) + 2  # + BLIP's [DEC] and [ENC]
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
           "encoder_width": 48, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vision = BlipVisionModel(BlipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=224, patch_size=32))
        text = BlipTextModel(BlipTextConfig(vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=48,
                                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            max_position_embeddings=40, is_decoder=True, pad_token_id=0),
                             add_pooling_layer=False)
        mlp = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.2), nn.Linear(64, 16), nn.Dropout(0.2),
                            nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))
    # transformers BLIP names -> the release's names (the inverse of the loader's mapping).
    vit_renames = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                   ("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm."),
                   ("encoder.layers.", "blocks."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
                   ("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj.")]
    state = {}
    for key, value in vision.state_dict().items():
        for old, new in vit_renames:
            key = key.replace(old, new)
        state["blip.visual_encoder." + key] = value
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    state.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    torch.save(state, folder / "ImageReward.pt")
    return str(folder)


def _clap_folder(root: Path) -> str:
    """A ClapModel (2-stage HTSAT, 2-layer RoBERTa) + byte-level RoBERTa tokenizer + the clap-htsat-unfused
    feature extractor settings (48 kHz, 10 s, rand_trunc, repeatpad, 50-14000 Hz)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    folder = root / "clap"
    folder.mkdir()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):  # every byte: no text falls back to <unk>
        vocab[symbol] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, projection_dim=16),
        audio_config=dict(depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32,
                          projection_dim=16),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", frequency_min=50,
                         frequency_max=14000).save_pretrained(folder)
    return str(folder)


def tiny_scorer_kwargs(name: str, root: Path) -> dict:
    """Constructor kwargs for ``load_reward_model(name, **kwargs)`` pointing at a tiny model written under root."""
    if name in ("pickscore", "clip"):
        return {"pretrained": _clip_folder(root)}
    if name == "aesthetic":
        return {"pretrained": _aesthetic_mlp(root), "clip_model": _clip_folder(root)}
    if name == "hpsv21":
        return {"pretrained": _hps_folder(root), "architecture": TINY_OPEN_CLIP}
    if name == "imagereward":
        return {"pretrained": _imagereward_folder(root), "vision_heads": 2}
    if name == "clap":
        return {"pretrained": _clap_folder(root)}
    if name in ("toy-fidelity", "toy-size"):
        return {}
    raise ValueError(f"bench_rewards: no tiny model for scorer {name!r}; choose from {', '.join(SCORERS)}")


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

    kwargs = tiny_scorer_kwargs(name, root)
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

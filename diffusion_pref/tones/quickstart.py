"""The tones-world quickstart: generate -> train -> evaluate on the shipped tones model, on a CPU.

    python -m diffusion_pref.tones.quickstart --out outputs/tones_quickstart            # Diffusion-DPO
    python -m diffusion_pref.tones.quickstart --out /tmp/qs loss.name=smpo loss.beta=... # any loss, any override

1. generate: the tones model (through the Tango backbone) samples ``--samples`` clips per training caption; the
   programmatic ``tones-fidelity`` reward scores them; best and worst become a pair when they differ by
   ``--min-gap``; pairs are written as an Audio-alpaca parquet (``prompt, chosen, rejected, strategy``, WAV bytes)
   with the reward scores as ``score_0``/``score_1`` (SmPO's soft labels read them).
2. train: a LoRA on those pairs with the library's ``Trainer`` (``loss.name`` etc. as ``key=value`` overrides).
3. evaluate: base against tuned on the held-out captions with the same seeds: mean fidelity and the win rate
   with its 95% bootstrap interval over prompts (``evaluation.stats.win_rate``); ``summary.json``.

``diffusion-pref quickstart model.pretrained=tones`` runs the same loop through the standard commands (generate
writes Audio-alpaca pairs, evaluate writes a report with players and spectrograms; recipe in
``tones/quickstart.yaml``). This module stays as the lighter loop the measured runs in ``tones/weights/README.md``
used: steps 1 and 3 with the same pieces (backbone.sample, the reward, the statistics), step 2 with the trainer.

Defaults (8 samples x 128 captions; DPO beta 30, lr 3e-3, 300 steps) measured on the shared 2-core CPU: base 0.486 ->
tuned 0.534, win rate 0.604 [95% CI 0.538, 0.670] in ~5 minutes (``tones/weights/README.md`` has the table; with
training seed 1 the interval touches 0.5).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SAMPLE_KW = dict(steps=20, guidance_scale=1.0, scheduler="DDIMScheduler")


def _score(backbone, prompts, seeds, batch: int = 32):
    from diffusion_pref.tones.rewards import TonesFidelity

    reward = TonesFidelity()
    waves, scores = [], []
    for i in range(0, len(prompts), batch):
        out = backbone.sample(prompts[i:i + batch], seeds[i:i + batch], output_type="np", **SAMPLE_KW)
        waves += list(out)
        scores += reward.score(prompts[i:i + batch], list(out), sample_rate=backbone.sample_rate).tolist()
    return waves, scores


def generate_pairs(backbone, captions, samples: int, min_gap: float, path: Path, seed: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_pref.audio import wav_bytes
    from diffusion_pref.seeding import derive_seed

    prompts = [c for c in captions for _ in range(samples)]
    seeds = [derive_seed(seed, i, k) for i in range(len(captions)) for k in range(samples)]
    waves, scores = _score(backbone, prompts, seeds)
    rows = {"prompt": [], "chosen": [], "rejected": [], "strategy": [], "score_0": [], "score_1": []}
    for i, caption in enumerate(captions):
        group = list(range(i * samples, (i + 1) * samples))
        best = max(group, key=lambda j: scores[j])
        worst = min(group, key=lambda j: scores[j])
        if scores[best] - scores[worst] < min_gap:
            continue
        rows["prompt"].append(caption)
        rows["chosen"].append({"bytes": wav_bytes(waves[best], backbone.sample_rate), "path": f"{best}.wav"})
        rows["rejected"].append({"bytes": wav_bytes(waves[worst], backbone.sample_rate), "path": f"{worst}.wav"})
        rows["strategy"].append(f"{scores[best]:.3f}-{scores[worst]:.3f}")
        rows["score_0"].append(float(scores[best]))  # the reward scores (losses with soft labels read them)
        rows["score_1"].append(float(scores[worst]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), str(path))
    return {"pairs": len(rows["prompt"]), "prompts": len(captions), "samples": len(prompts),
            "mean_fidelity": round(sum(scores) / len(scores), 4)}


def evaluate(backbone, lora_dir: Path, prompts, seeds) -> dict:
    import pandas as pd

    from diffusion_pref.evaluation.stats import win_rate
    from diffusion_pref.tones.render import category

    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    _, base = _score(backbone, all_prompts, all_seeds)
    backbone.load_lora(lora_dir)
    try:
        _, tuned = _score(backbone, all_prompts, all_seeds)
    finally:
        backbone.unload_lora()
    rows = []
    for variant, scores in (("base", base), ("tuned", tuned)):
        for k, (p, s, v) in enumerate(zip(all_prompts, all_seeds, scores)):
            rows.append({"variant": variant, "prompt_index": k // len(seeds), "seed": s, "category": category(p),
                         "tones-fidelity": v})
    stats = win_rate(pd.DataFrame(rows), "tones-fidelity", "tuned", "base", bootstrap_samples=2000,
                     maximum=(1.0, 0.2))
    return {"base_fidelity": sum(base) / len(base), "tuned_fidelity": sum(tuned) / len(tuned), **stats}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/tones_quickstart")
    parser.add_argument("--model", default="tones", help="model.pretrained (default: the shipped tones model)")
    parser.add_argument("--samples", type=int, default=8, help="clips per training caption")
    parser.add_argument("--max-prompts", type=int, default=128,
                        help="use only this many training captions, evenly spaced (0 = all 248)")
    parser.add_argument("--min-gap", type=float, default=0.25)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=0, help="use only this many held-out captions (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", help="train on this pairs parquet (from an earlier run) instead of generating")
    parser.add_argument("overrides", nargs="*", help="config key=value for training, e.g. loss.name=smpo")
    args = parser.parse_args(argv)

    import torch

    from diffusion_pref.config import load_config
    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.tones.render import eval_prompts, train_captions
    from diffusion_pref.training.setup import Trainer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.time()
    captions = train_captions()
    if args.max_prompts:
        captions = captions[:: max(1, len(captions) // args.max_prompts)][: args.max_prompts]
    backbone = load_backbone(load_config(None, [f"model.pretrained={args.model}"]).model)
    pairs = Path(args.pairs) if args.pairs else out / "pairs" / "train.parquet"
    if args.pairs:
        gen = {"pairs_file": str(pairs)}
    else:
        gen = generate_pairs(backbone, captions, args.samples, args.min_gap, pairs)
    print(f"generate: {gen} ({time.time() - start:.0f} s)", flush=True)
    cfg = load_config(None, [
        f"model.pretrained={args.model}", f"data.source={pairs}", "model.lora_rank=8",
        "loss.name=dpo", "loss.beta=30", "train.batch_size=8", "train.max_steps=300", "train.learning_rate=3e-3",
        "train.lr_scheduler=constant", "train.logger=none", "train.checkpoint_every=0",
        f"output.dir={out / 'train'}", *args.overrides,
    ])
    summary = Trainer(cfg).train()
    print(f"train: {cfg.loss.name}, {summary.get('steps')} steps ({time.time() - start:.0f} s)", flush=True)
    held_out = eval_prompts()[: args.eval_prompts or None]
    result = evaluate(backbone, out / "train", held_out, list(range(args.eval_seeds)))
    result.update(generate=gen, loss=cfg.loss.name, seconds=round(time.time() - start, 1))
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"tones-fidelity on held-out captions: base {result['base_fidelity']:.3f} -> tuned "
          f"{result['tuned_fidelity']:.3f}; win rate {result['win_rate']:.3f} "
          f"[95% CI {result['ci_low']:.3f}, {result['ci_high']:.3f}] over {result['n_pairs']} pairs "
          f"({result['wins']} wins, {result['ties']} ties, {result['losses']} losses); {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()

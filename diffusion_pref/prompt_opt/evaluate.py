"""``prompt-opt evaluate``: does a rewriter raise the reward without drifting from what the user asked for?

On held-out prompts, ``k`` rewrites per prompt are sampled from the policy (seed ``sample_seed(seed, i, -1)``, as
``prompt-opt generate`` does); each rewrite and the original prompt are scored by the same reward against the
ORIGINAL prompt (an image reward renders both at the same seeds ``sample_seed(seed, i, j)``). Reported, each with a
95% percentile bootstrap interval that resamples prompts (:func:`diffusion_pref.evaluation.stats.bootstrap_ratio_ci`,
``bootstrap_seed`` fixed, so the same prompt sets for every policy):

- ``reward_original`` / ``reward_rewrite``: mean reward of the prompts as written and of their rewrites;
- ``win_rate``: share of rewrites scoring above their original prompt (ties count half,
  :func:`~diffusion_pref.evaluation.stats.pair_outcomes`);
- ``similarity``: mean cosine between the embeddings of prompt and rewrite (with an embedder);
- ``drift_rate``: share of rewrites whose similarity is below ``drift_threshold``;
- ``drift_rate_exact``: share of rewrites that changed what was asked for, where the world can tell exactly
  (the shapes world: :func:`diffusion_pref.toy.rewriter.drift`).

Every number is a function of ``rewrites.jsonl`` (one row per rewrite), written beside ``metrics.json`` and
``report.html`` (:mod:`diffusion_pref.prompt_opt.report`: the table and examples, original prompt and rewrite, with
both images when an image backbone rendered them, saved in ``images/``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffusion_pref.fileio import atomic_write
from diffusion_pref.pairing import sample_seed

__all__ = ["evaluate_rewrites", "interval_metrics", "paired_differences"]


def _mean_ci(values_by_prompt: list[list[float]], samples: int, seed: int) -> dict:
    from diffusion_pref.evaluation.stats import bootstrap_ratio_ci

    sums = [math.fsum(v) for v in values_by_prompt]
    counts = [len(v) for v in values_by_prompt]
    low, high = bootstrap_ratio_ci(sums, counts, samples=samples, seed=seed)
    return {"mean": math.fsum(sums) / sum(counts), "ci_low": low, "ci_high": high}


def interval_metrics(rows: Sequence[dict], *, bootstrap_samples: int = 1000, bootstrap_seed: int = 0) -> dict:
    """The metrics of the module docstring from the per-rewrite rows (``prompt_index``, ``score_original``,
    ``score_rewrite``, and ``similarity`` / ``drift`` / ``drift_exact`` where present)."""
    from diffusion_pref.evaluation.stats import pair_outcomes

    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(int(row["prompt_index"]), []).append(row)
    groups = [by_prompt[i] for i in sorted(by_prompt)]

    def column(key, transform=float):
        return [[transform(r[key]) for r in g] for g in groups]

    def ci(values):
        return _mean_ci(values, bootstrap_samples, bootstrap_seed)

    originals = [[float(g[0]["score_original"])] for g in groups]  # one score per prompt
    metrics = {
        "prompts": len(groups), "rewrites": len(rows),
        "reward_original": ci(originals),
        "reward_rewrite": ci(column("score_rewrite")),
        "win_rate": ci([[float(x) for x in pair_outcomes([r["score_rewrite"] for r in g],
                                                          [r["score_original"] for r in g])] for g in groups]),
    }
    if all(r.get("similarity") is not None and math.isfinite(r["similarity"]) for r in rows):
        metrics["similarity"] = ci(column("similarity"))
        metrics["drift_rate"] = ci(column("drift"))
    if all("drift_exact" in r for r in rows):
        metrics["drift_rate_exact"] = ci(column("drift_exact"))
    return metrics


def paired_differences(rows_a: Sequence[dict], rows_b: Sequence[dict], keys: Sequence[str], *,
                       bootstrap_samples: int = 1000, bootstrap_seed: int = 0) -> dict:
    """Mean of ``a - b`` per key over rewrites matched by (prompt_index, sample) (the same prompts and sampling
    seeds), with the prompt-resampling bootstrap interval: is policy a's reward / drift above policy b's?"""
    b_of = {(r["prompt_index"], r["sample"]): r for r in rows_b}
    if set(b_of) != {(r["prompt_index"], r["sample"]) for r in rows_a}:
        raise ValueError("paired_differences: the two evaluations cover different prompts or samples.")
    out = {}
    for key in keys:
        by_prompt: dict[int, list[float]] = {}
        for r in rows_a:
            other = b_of[(r["prompt_index"], r["sample"])]
            by_prompt.setdefault(int(r["prompt_index"]), []).append(float(r[key]) - float(other[key]))
        out[key] = _mean_ci([by_prompt[i] for i in sorted(by_prompt)], bootstrap_samples, bootstrap_seed)
    return out


def evaluate_rewrites(
    prompts: Sequence[str],
    out_dir: str | Path,
    policy: Any,
    reward: Any,
    *,
    backbone: Any = None,
    embed: Callable | None = None,
    drift_threshold: float = 0.8,
    exact_drift: Callable[[str, str], bool] | None = None,
    k: int = 4,
    seed: int = 0,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    steps: int = 20,
    guidance_scale: float = 1.0,
    resolution: int | None = None,
    bootstrap_samples: int = 1000,
    bootstrap_seed: int = 0,
    examples: int = 12,
    name: str = "",
) -> dict:
    """Score ``k`` rewrites per prompt against the prompts as written; writes ``rewrites.jsonl`` and
    ``metrics.json`` (with ``examples``: the first rewrites of the first prompts) in ``out_dir``; returns the
    metrics."""
    from diffusion_pref.prompt_opt.generate import RewriteSettings, _score_candidates

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompt-opt evaluate: no prompts.")
    settings = RewriteSettings(k=k, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                               steps=steps, guidance_scale=guidance_scale, resolution=resolution)
    out = Path(out_dir)
    rows, pictures = [], {}
    for i, prompt in enumerate(prompts):
        rewrites = policy.sample(prompt, k, seed=sample_seed(seed, i, -1), max_new_tokens=max_new_tokens,
                                 temperature=temperature)
        images = [] if i < examples else None
        scores = _score_candidates(i, prompt, [prompt, *rewrites], reward, backbone, settings, keep_images=images)
        if images:  # the example's images: the original and its first rewrite at the first image seed
            (out / "images").mkdir(parents=True, exist_ok=True)
            pictures[i] = {}
            for side, image in (("original", images[0]), ("rewrite", images[settings.image_seeds])):
                relative = f"images/{i:04d}_{side}.png"
                atomic_write(out / relative, lambda tmp, image=image: image.save(tmp, format="PNG"))
                pictures[i][f"image_{side}"] = relative
        similarity = [None] * k
        if embed is not None:
            from diffusion_pref.prompt_opt.semantic import cosine_similarities

            similarity = [float(s) for s in cosine_similarities(embed, [prompt] * k, rewrites)]
        for j, rewrite in enumerate(rewrites):
            row = {"prompt_index": i, "prompt": prompt, "sample": j, "rewrite": rewrite,
                   "score_original": scores[0], "score_rewrite": scores[j + 1], "similarity": similarity[j]}
            if similarity[j] is not None:
                row["drift"] = float(similarity[j] < drift_threshold)
            if exact_drift is not None:
                row["drift_exact"] = float(exact_drift(prompt, rewrite))
            rows.append(row)
    metrics = {"policy": name, "drift_threshold": drift_threshold, "k": k, "seed": seed,
               "bootstrap_samples": bootstrap_samples,
               **interval_metrics(rows, bootstrap_samples=bootstrap_samples, bootstrap_seed=bootstrap_seed),
               "examples": [{**{key: r[key] for key in ("prompt", "rewrite", "score_original", "score_rewrite",
                                                        "similarity")}, **pictures.get(r["prompt_index"], {})}
                            for r in rows if r["sample"] == 0][:examples]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "rewrites.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    from diffusion_pref.prompt_opt.report import write_rewrite_report

    write_rewrite_report(out / "report.html", metrics, media_root=out)
    return metrics

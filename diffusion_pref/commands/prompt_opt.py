"""``diffusion-pref prompt-opt <mode>``: a prompt-rewriting language model, from pairs to evaluation.

    diffusion-pref prompt-opt generate                 # rewrite pairs from the policy -> <output.dir>/pairs (resumable)
    diffusion-pref prompt-opt train prompt_opt.alpha=2 # DPO (alpha 0) or Sem-DPO on those pairs -> <output.dir> (LoRA)
    diffusion-pref prompt-opt evaluate prompt_opt.adapter=outputs/prompt_opt   # -> <output.dir>/eval/metrics.json
    diffusion-pref prompt-opt iterate prompt_opt.rounds=3   # pairs from the current policy, train; per round (resumable)
    diffusion-pref prompt-opt quickstart               # the shapes world: generate, DPO vs Sem-DPO, evaluate all

The defaults (``diffusion_pref/prompt_opt/defaults.yaml``) train the shipped shapes-world rewriter on a CPU.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from diffusion_pref.fileio import atomic_write

logger = logging.getLogger(__name__)

# Sem-DPO's alpha in the quickstart when prompt_opt.alpha is 0 (the quickstart compares it against alpha = 0)
QUICKSTART_ALPHA = 16.0


def _prompts(po, held_out: bool) -> list:
    source = po.eval_prompts if held_out else po.prompts
    if source is None:  # validate: only policy=toy gets here without prompts
        from diffusion_pref.toy.render import eval_prompts, train_captions

        return eval_prompts() if held_out else train_captions()
    from diffusion_pref.prompts import read_prompts

    return [r.prompt for r in read_prompts(source)]


def _embedder(cfg):
    from diffusion_pref.prompt_opt import semantic

    kind = cfg.prompt_opt.embedder
    if kind == "none":
        return None
    if kind == "minilm":
        embed = semantic.minilm_embedder()
    else:  # the image model's own text encoder; resolve_pretrained: a named model ("toy") is a local folder
        from diffusion_pref.pipelines import resolve_pretrained

        embed = semantic.clip_text_embedder(resolve_pretrained(cfg.model.pretrained))
    embed.name = kind if kind == "minilm" else f"clip:{cfg.model.pretrained}"
    return embed


def _reward_and_backbone(cfg):
    if cfg.prompt_opt.reward == "toy-rewrite":
        from diffusion_pref.toy.rewriter import ToyRewriteReward

        return ToyRewriteReward(), None
    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.reward_models import load_reward_from_config

    return load_reward_from_config(cfg.reward), load_backbone(cfg.model)


def generate(cfg, out_dir=None) -> dict:
    from diffusion_pref.prompt_opt.generate import RewriteSettings, generate_pairs
    from diffusion_pref.prompt_opt.train import load_policy

    po = cfg.prompt_opt
    policy = load_policy(cfg, train=False, adapter=po.adapter)
    reward, backbone = _reward_and_backbone(cfg)
    settings = RewriteSettings(k=po.k, seed=cfg.runtime.seed, max_new_tokens=po.max_new_tokens,
                               temperature=po.temperature, steps=cfg.sample.steps,
                               guidance_scale=cfg.sample.guidance_scale, resolution=cfg.sample.resolution)
    out = Path(out_dir or po.pairs or Path(cfg.output.dir) / "pairs")
    names = {"policy": f"{po.policy}+{po.adapter}" if po.adapter else po.policy}
    if backbone is not None:
        names["backbone"] = cfg.model.pretrained
    summary = generate_pairs(_prompts(po, held_out=False), out, policy, reward, backbone=backbone,
                             embed=_embedder(cfg), settings=settings, names=names, progress=True)
    logger.info("prompt-opt generate: %s", json.dumps(summary))
    return summary


def train(cfg, pairs=None) -> dict:
    from diffusion_pref.prompt_opt.train import train_with_warm_start

    return train_with_warm_start(cfg, pairs_path=pairs)


def evaluate(cfg, adapter=None, out_dir=None, embed=None) -> dict:
    from diffusion_pref.prompt_opt.evaluate import evaluate_rewrites
    from diffusion_pref.prompt_opt.train import load_policy

    po = cfg.prompt_opt
    adapter = adapter if adapter is not None else po.adapter
    policy = load_policy(cfg, train=False, adapter=adapter)
    reward, backbone = _reward_and_backbone(cfg)
    exact = None
    if po.policy == "toy":
        from diffusion_pref.toy.rewriter import drift as exact
    metrics = evaluate_rewrites(
        _prompts(po, held_out=True), out_dir or Path(cfg.output.dir) / "eval", policy, reward, backbone=backbone,
        embed=embed if embed is not None else _embedder(cfg), drift_threshold=po.drift_threshold,
        exact_drift=exact, k=po.k, seed=cfg.runtime.seed, max_new_tokens=po.max_new_tokens,
        temperature=po.temperature, steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
        resolution=cfg.sample.resolution, bootstrap_samples=cfg.eval.bootstrap_samples,
        bootstrap_seed=cfg.eval.bootstrap_seed, name=str(adapter or po.policy))
    logger.info("prompt-opt evaluate: reward %.4f -> %.4f, win rate %.3f", metrics["reward_original"]["mean"],
                metrics["reward_rewrite"]["mean"], metrics["win_rate"]["mean"])
    return metrics


def iterate(cfg) -> dict:
    """``prompt_opt.rounds`` rounds, round r in ``<output.dir>/round_<r>``: pairs from the current policy (the
    previous round's; sampled with seed ``runtime.seed + r - 1``), then ``train`` on them from that policy. With
    LoRA each round continues the adapter and the reference stays the starting model (the SFT'd one when
    ``prompt_opt.sft_steps`` > 0: the warm start runs in round 1 only); a fully trained model starts each round
    from the previous round's weights, which are also that round's reference. A finished round is recorded in
    ``round_<r>/round.json`` and skipped when the command is started again (a round cut short resumes its pairs,
    and its training with ``train.resume``). Writes ``<output.dir>/iterate.json``; the last round's folder is the
    result (``prompt_opt.adapter=<output.dir>/round_<R>`` for evaluate)."""
    out = Path(cfg.output.dir)
    po = cfg.prompt_opt
    policy, adapter = po.policy, po.adapter
    rounds = []
    for r in range(1, po.rounds + 1):
        folder = out / f"round_{r}"
        record = folder / "round.json"
        if record.is_file():
            info = json.loads(record.read_text())
            logger.info("prompt-opt iterate: round %d is done (%s); skipping it", r, record)
        else:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.runtime.seed = cfg.runtime.seed + r - 1
            run_cfg.prompt_opt.policy, run_cfg.prompt_opt.adapter = policy, adapter
            run_cfg.prompt_opt.sft_steps = po.sft_steps if r == 1 else 0
            run_cfg.output.dir, run_cfg.prompt_opt.mode = str(folder), "train"  # prompts: the starting policy's
            pairs = generate(run_cfg, out_dir=folder / "pairs")
            summary = train(run_cfg, pairs=str(folder / "pairs"))
            lora = summary["output"] == "lora"
            start = summary["warm_start"]["model"] if "warm_start" in summary else policy
            info = {"round": r, "seed": run_cfg.runtime.seed, "trained_from": {"policy": policy, "adapter": adapter},
                    "policy": start if lora else str(folder), "adapter": str(folder) if lora else None,
                    "pairs": pairs, "train": summary}
            atomic_write(record, json.dumps(info, indent=2, default=str) + "\n")
        policy, adapter = info["policy"], info["adapter"]
        rounds.append(info)
    summary = {"rounds": len(rounds), "policy": policy, "adapter": adapter,
               "per_round": [{k: r[k] for k in ("round", "seed", "policy", "adapter")} for r in rounds]}
    atomic_write(out / "iterate.json", json.dumps(summary, indent=2) + "\n")
    logger.info("prompt-opt iterate: %d rounds; the result: prompt_opt.policy=%s prompt_opt.adapter=%s", len(rounds),
                policy, adapter)
    return summary


def quickstart(cfg) -> dict:
    """Pairs from the base policy, then DPO (alpha 0) and Sem-DPO (``prompt_opt.alpha``, or QUICKSTART_ALPHA) on
    them with the same steps, seed and data order; base, DPO and Sem-DPO evaluated on the held-out prompts with
    the same seeds. Writes ``<output.dir>/quickstart.json``."""
    import time

    start = time.perf_counter()
    out = Path(cfg.output.dir)
    po = cfg.prompt_opt
    alpha = po.alpha if po.alpha > 0 else QUICKSTART_ALPHA
    embed = _embedder(cfg)
    generate(cfg, out_dir=out / "pairs")
    results = {"base": evaluate(cfg, adapter=None, out_dir=out / "eval" / "base", embed=embed)}
    for name, a in (("dpo", 0.0), ("sem_dpo", alpha)):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.prompt_opt.alpha = a
        run_cfg.prompt_opt.adapter = None
        run_cfg.output.dir = str(out / name)
        train(run_cfg, pairs=str(out / "pairs"))
        results[name] = evaluate(run_cfg, adapter=str(out / name), out_dir=out / "eval" / name, embed=embed)
    keys = ("reward_rewrite", "win_rate", "similarity", "drift_rate", "drift_rate_exact")
    table = {name: {k: m[k] for k in keys if k in m} for name, m in results.items()}
    from diffusion_pref.prompt_opt.evaluate import paired_differences

    def rows(name):
        return [json.loads(line) for line in (out / "eval" / name / "rewrites.jsonl").read_text().splitlines()]

    keys = [k for k in ("score_rewrite", "similarity", "drift_exact") if k in rows("dpo")[0]
            and rows("dpo")[0][k] is not None]
    difference = paired_differences(rows("sem_dpo"), rows("dpo"), keys, bootstrap_samples=cfg.eval.bootstrap_samples,
                                    bootstrap_seed=cfg.eval.bootstrap_seed)
    summary = {"alpha": alpha, "steps": cfg.train.max_steps, "loss": cfg.loss.name, "beta": po.beta,
               "k": po.k, "seed": cfg.runtime.seed, "reward_original": results["base"]["reward_original"],
               "table": table, "sem_dpo_minus_dpo": difference, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write(out / "quickstart.json", json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print("sem_dpo - dpo (same prompts and sampling seeds): " + ", ".join(
        f"{k} {m['mean']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]" for k, m in difference.items()))
    return summary


def format_table(summary: dict) -> str:
    """The quickstart's table as markdown: mean [95% interval] per policy."""
    def cell(m):
        return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m else "-"

    cols = ("reward_rewrite", "win_rate", "similarity", "drift_rate", "drift_rate_exact")
    lines = ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def run(cfg) -> None:
    mode = cfg.prompt_opt.mode
    {"generate": generate, "train": train, "evaluate": evaluate, "iterate": iterate, "quickstart": quickstart}[mode](cfg)

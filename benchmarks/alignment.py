"""Alignment quality on the shapes world, where the true reward is known (a benchmark, not a test).

Every run trains a LoRA on shapes-world preference pairs with the quickstart's recipe plus a few overrides, then
evaluates base against tuned on the held-out captions and seeds (``toy-fidelity``). Suites:

- ``recipe``: candidate quickstart recipes (beta, learning rate, steps, pairs) for the packaged settings;
- ``losses``: every loss of ``LOSSES`` on the same pairs with the same budget, ``--seeds`` training seeds each;
- ``beta``: a beta sweep for ``dpo`` and ``smpo`` (``--losses``/``--betas`` for others);
- ``noise``: 0/10/20/30% of the pairs' labels flipped at random (recorded seeds); dpo, robust, cdpo, ipo; each
  loss's gain at each noise level as a share of its clean gain;
- ``time``: time to quality for DPO and SmPO (forward, ReNoise, ReNoise with the cached reference inversion):
  checkpoints along the way are evaluated, giving win rate against wall-clock training time.

Resumable: a run whose ``result.json`` exists in ``--out`` is skipped, and pairs are generated once per
generation setting. Tables are rebuilt from every finished run each time, so a partial sweep is still reported
(with the seeds that finished). Win-rate intervals are two-level bootstraps: training seeds and held-out prompts
are both resampled.

Run::

    export OMP_NUM_THREADS=1  # on a shared CPU: see README (Quick start)
    python benchmarks/alignment.py --suite recipe
    python benchmarks/alignment.py --suite losses --seeds 0 1 2 --steps 100
    python benchmarks/alignment.py --suite noise
    python benchmarks/alignment.py --suite time
    python benchmarks/alignment.py --suite losses --report-only   # tables and plot from finished runs

Results: ``benchmarks/results/alignment_<suite>.{json,md}`` (and ``.png`` for losses and time).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
REWARD = "toy-fidelity"
REWARD_MAX = 1.0
EVAL_OVERRIDES: List[str] = []  # --eval-override: smaller evaluations for smoke runs
REWARD_TOLERANCE = 0.25  # toy-fidelity: a wrong colour costs 0.5, so "at the maximum" is within a quarter of 1


# ---------------------------------------------------------------------------------------------- pure pieces


def flip_labels(table, rate: float, seed: int):
    """``table`` (pair rows with ``label_0``) with ``round(rate * n)`` rows' preferences flipped; returns the new
    table and the flipped row positions (sorted). Flipped rows swap ``label_0``/``label_1`` and, when present,
    ``score_0``/``score_1``, so every column still tells the same (now wrong) story."""
    import numpy as np

    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"flip rate must be in [0, 1], got {rate}")
    n = len(table)
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=int(round(rate * n)), replace=False))
    out = table.copy()
    rows = out.index[flipped]
    out.loc[rows, "label_0"] = 1.0 - table.loc[rows, "label_0"].astype(float)
    if "label_1" in out.columns:
        out.loc[rows, "label_1"] = 1.0 - table.loc[rows, "label_1"].astype(float)
    if "score_0" in out.columns and "score_1" in out.columns:
        out.loc[rows, "score_0"] = table.loc[rows, "score_1"].to_numpy()
        out.loc[rows, "score_1"] = table.loc[rows, "score_0"].to_numpy()
    return out, flipped.tolist()


def two_level_bootstrap(wins, pairs, *, samples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile interval of ``sum(wins) / sum(pairs)`` over ``[n_seeds, n_prompts]`` arrays, resampling
    training seeds and prompts with replacement (independently): both the runs and the prompts are samples."""
    import numpy as np

    wins = np.asarray(wins, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.float64)
    if wins.shape != pairs.shape or wins.ndim != 2:
        raise ValueError(f"wins and pairs must be [seeds, prompts] arrays of one shape, got {wins.shape}, {pairs.shape}")
    n_seeds, n_prompts = wins.shape
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, n_seeds, size=(samples, n_seeds))  # [B, S]
    p_idx = rng.integers(0, n_prompts, size=(samples, n_prompts))  # [B, P]
    # Sum over the resampled grid: sum_s sum_p x[s_b, p_b] = (counts of s) @ x @ (counts of p).
    s_count = np.zeros((samples, n_seeds))
    np.add.at(s_count, (np.arange(samples)[:, None], s_idx), 1.0)
    p_count = np.zeros((samples, n_prompts))
    np.add.at(p_count, (np.arange(samples)[:, None], p_idx), 1.0)
    num = np.einsum("bs,sp,bp->b", s_count, wins, p_count)
    den = np.einsum("bs,sp,bp->b", s_count, pairs, p_count)
    low, high = np.quantile(num / den, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def share_of_clean_gain(gain: float, clean_gain: float) -> Optional[float]:
    """A noisy run's gain over the base as a share of the same loss's clean gain (None if the clean gain is ~0)."""
    return None if abs(clean_gain) < 1e-9 else gain / clean_gain


def share_interval(noisy, noisy_n, clean, clean_n, *, samples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile interval of the share ``mean gain(noisy) / mean gain(clean)`` from ``[n_seeds, n_prompts]``
    arrays of per-prompt summed gains (tuned - base score) and pair counts. Prompts are resampled once per draw
    for both runs (they are evaluated on the same held-out prompts and seeds against the same base images);
    training seeds are resampled independently for each (they are different runs). Draws whose clean gain is 0
    are dropped; None when every draw is dropped."""
    import numpy as np

    arrays = [np.asarray(a, dtype=np.float64) for a in (noisy, noisy_n, clean, clean_n)]
    if arrays[0].shape != arrays[1].shape or arrays[2].shape != arrays[3].shape or arrays[0].ndim != 2 \
            or arrays[2].ndim != 2 or arrays[0].shape[1] != arrays[2].shape[1]:
        raise ValueError("gains and counts must be [seeds, prompts] arrays over the same prompts, got "
                         + ", ".join(str(a.shape) for a in arrays))
    noisy, noisy_n, clean, clean_n = arrays
    n_prompts = noisy.shape[1]
    rng = np.random.default_rng(seed)
    p_idx = rng.integers(0, n_prompts, size=(samples, n_prompts))
    a_idx = rng.integers(0, noisy.shape[0], size=(samples, noisy.shape[0]))
    b_idx = rng.integers(0, clean.shape[0], size=(samples, clean.shape[0]))

    def counts(idx, n):
        c = np.zeros((samples, n))
        np.add.at(c, (np.arange(samples)[:, None], idx), 1.0)
        return c

    p_count = counts(p_idx, n_prompts)
    a_count, b_count = counts(a_idx, noisy.shape[0]), counts(b_idx, clean.shape[0])
    mean_noisy = np.einsum("bs,sp,bp->b", a_count, noisy, p_count) / np.einsum("bs,sp,bp->b", a_count, noisy_n, p_count)
    mean_clean = np.einsum("bs,sp,bp->b", b_count, clean, p_count) / np.einsum("bs,sp,bp->b", b_count, clean_n, p_count)
    keep = mean_clean != 0
    if not keep.any():
        return None
    low, high = np.quantile(mean_noisy[keep] / mean_clean[keep], [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def prompt_gains(final: Dict):
    """Per-prompt summed gains (tuned - base score) and pair counts of one run's final evaluation, prompt order."""
    sums: Dict[int, float] = {}
    counts: Dict[int, int] = {}
    for (prompt, _), score, base in zip(final["pair_keys"], final["scores"], final["base_scores"]):
        sums[int(prompt)] = sums.get(int(prompt), 0.0) + float(score) - float(base)
        counts[int(prompt)] = counts.get(int(prompt), 0) + 1
    keys = sorted(sums)
    return [sums[k] for k in keys], [counts[k] for k in keys]


def time_to_reach(times: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """First time at which ``values`` reaches ``target`` (linear between evaluated points); None if never."""
    prev_t, prev_v = 0.0, None
    for t, v in zip(times, values):
        if v >= target:
            if prev_v is None or prev_v >= target:
                return float(t)
            return float(prev_t + (t - prev_t) * (target - prev_v) / (v - prev_v))
        prev_t, prev_v = t, v
    return None


# ---------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # unique folder name
    group: str  # runs of one group differ only by training seed
    overrides: Tuple[str, ...] = ()  # train / loss / model / trajectory overrides on the quickstart recipe
    generate: Tuple[str, ...] = ()  # generate.* and sample.* overrides: which pairs (evaluation keeps its sample.*)
    seed: int = 0
    flip_rate: float = 0.0
    flip_seed: int = 0
    checkpoints: int = 0  # >0: evaluate a checkpoint every this many steps too (time suite)


def _pairs_dir(out: Path, generate: Sequence[str]) -> Path:
    tag = hashlib.sha1(" ".join(sorted(generate)).encode()).hexdigest()[:8] if generate else "default"
    return out / "pairs" / tag


def _config(overrides: Sequence[str]):
    from diffusion_pref.config import load_config

    return load_config(overrides=list(overrides), defaults=ROOT / "diffusion_pref" / "quickstart.yaml")


def ensure_pairs(out: Path, run: Run) -> Tuple[Path, float]:
    """The run's pair folder (generated once, flipped copies derived once); returns it and its generate time."""
    from diffusion_pref.commands import generate

    folder = _pairs_dir(out, run.generate)
    timing = folder / "timing.json"
    if not timing.is_file():
        cfg = _config([*run.generate, f"output.dir={folder}"])
        started = time.perf_counter()
        generate.run(cfg)
        timing.write_text(json.dumps({"generate_s": time.perf_counter() - started, "overrides": list(run.generate)}))
    generate_s = json.loads(timing.read_text())["generate_s"]
    if run.flip_rate <= 0:
        return folder, generate_s
    import pandas as pd

    flipped_dir = folder.parent / f"{folder.name}-flip{run.flip_rate:g}-s{run.flip_seed}"
    record = flipped_dir / "flips.json"
    if not record.is_file():
        shards = sorted(folder.glob("*.parquet"))
        table = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
        noisy, flipped = flip_labels(table, run.flip_rate, run.flip_seed)
        tmp = flipped_dir.with_name(flipped_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        noisy.to_parquet(tmp / "pairs-p000-00000.parquet", index=False)
        (tmp / "flips.json").write_text(json.dumps({"rate": run.flip_rate, "seed": run.flip_seed,
                                                   "n_pairs": len(table), "flipped_rows": flipped}))
        shutil.rmtree(flipped_dir, ignore_errors=True)
        os.replace(tmp, flipped_dir)
    return flipped_dir, generate_s


def _checkpoint_lora(train_cfg, checkpoint: Path, dest: Path) -> None:
    """A diffusers LoRA folder from a training checkpoint's trainable parameters."""
    import torch
    from safetensors.torch import load_file

    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.training.checkpoint import TRAINABLE_FILE
    from peft import LoraConfig

    backbone = load_backbone(train_cfg.model)
    unet = backbone.denoiser
    rank = train_cfg.model.lora_rank
    alpha = train_cfg.model.lora_alpha if train_cfg.model.lora_alpha is not None else rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(train_cfg.model.lora_targets)))
    state = load_file(str(checkpoint / TRAINABLE_FILE))
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    backbone.save_lora(dest, unet)


def evaluate_variant(out: Path, name: str, lora: Path) -> Dict:
    """Base vs ``lora`` on the held-out captions; the shared folder keeps the base's images for every run."""
    from diffusion_pref.commands import evaluate

    shared = out / "eval"
    cfg = _config([f"output.dir={shared}", "eval.baseline=base", *EVAL_OVERRIDES])
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, variants={"base": "base", name: str(lora)}))
    metrics = evaluate.run(cfg)
    import pandas as pd

    table = pd.read_parquet(shared / "per_image.parquet")
    return {"metrics": metrics, "table": table}


def _outcomes(table, name: str):
    """Per-prompt summed outcomes and pair counts of ``name`` over base ([n_prompts] each, prompt order)."""
    from diffusion_pref.evaluation.stats import paired_table

    paired = paired_table(table, REWARD, name, "base")
    per_prompt = paired.groupby("prompt_index", sort=True)["outcome"].agg(["sum", "count"])
    return per_prompt["sum"].tolist(), per_prompt["count"].tolist(), paired


def do_run(out: Path, run: Run) -> Dict:
    from diffusion_pref.commands import train as train_command

    folder = out / "runs" / run.name
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    pairs, generate_s = ensure_pairs(out, run)
    train_dir = folder / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # a half-finished run starts over: its wall time must be whole
    overrides = [*run.overrides, f"data.source={pairs}", f"output.dir={train_dir}", f"runtime.seed={run.seed}",
                 "train.logger=none"]
    overrides.append(f"train.checkpoint_every={run.checkpoints}")
    if run.checkpoints:
        overrides.append("train.keep_checkpoints=1000")
    cfg = _config(overrides)
    print(f"=== {run.name}: {' '.join(run.overrides)} seed {run.seed} flip {run.flip_rate:g}", flush=True)
    started = time.time()
    cpu_started = time.process_time()
    train_command.run(cfg)
    train_s = time.time() - started
    train_cpu_s = time.process_time() - cpu_started  # all of this process's threads: steadier than wall on a busy machine

    points = []  # (step, seconds since the start of training, lora folder)
    if run.checkpoints:
        from diffusion_pref.training.checkpoint import list_checkpoints

        for ckpt in list_checkpoints(train_dir / "checkpoints"):
            step = int(ckpt.name.split("-")[1])
            lora = folder / f"lora-step-{step}"
            if not (lora / "pytorch_lora_weights.safetensors").is_file():
                _checkpoint_lora(cfg, ckpt, lora)
            # the folder is renamed into place right after the state is written: its mtime is that moment
            points.append((step, ckpt.stat().st_mtime - started, lora))
    points.append((cfg.train.max_steps, train_s, train_dir))

    evals = []
    eval_s = 0.0
    for step, seconds, lora in points:
        t0 = time.perf_counter()
        variant = run.name if lora == train_dir else f"{run.name}.step{step}"
        found = evaluate_variant(out, variant, lora)
        eval_s = time.perf_counter() - t0
        wins, pairs_n, paired = _outcomes(found["table"], variant)
        m = found["metrics"]
        evals.append({
            "step": step, "train_s": seconds, "variant": variant,
            "tuned_mean": m["scores"][REWARD][variant]["mean"], "base_mean": m["scores"][REWARD]["base"]["mean"],
            "win_rate": m["win_rates"][REWARD][variant]["win_rate"],
            "ci_low": m["win_rates"][REWARD][variant]["ci_low"], "ci_high": m["win_rates"][REWARD][variant]["ci_high"],
            "wins": m["win_rates"][REWARD][variant]["wins"], "ties": m["win_rates"][REWARD][variant]["ties"],
            "losses": m["win_rates"][REWARD][variant]["losses"],
            "wins_per_prompt": wins, "pairs_per_prompt": pairs_n,
            "pair_keys": paired[["prompt_index", "seed"]].to_numpy().tolist(),
            "scores": paired["score"].tolist(), "base_scores": paired["ref_score"].tolist(),
        })
    summary = json.loads((train_dir / "train_summary.json").read_text()) if (train_dir / "train_summary.json").is_file() else {}
    result = {**dataclasses.asdict(run), "pairs": str(pairs), "n_pairs": _count_pairs(pairs),
              "generate_s": generate_s, "train_s": train_s, "train_cpu_s": train_cpu_s, "eval_s": eval_s, "final": evals[-1], "points": evals,
              "train_summary": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}}
    folder.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    for lora in folder.glob("lora-step-*"):
        shutil.rmtree(lora, ignore_errors=True)
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)
    return result


def _count_pairs(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


# ---------------------------------------------------------------------------------------------- suites


def _losses():
    from diffusion_pref.losses import LOSSES

    return list(LOSSES)


def suite_runs(suite: str, seeds: Sequence[int], steps: int, beta: float,
               sweep: Sequence[str] = ("dpo", "smpo"), betas: Sequence[float] = (25, 100, 250, 1000, 2500)) -> List[Run]:
    budget = (f"train.max_steps={steps}",)
    runs: List[Run] = []

    def add(group: str, overrides: Sequence[str], **kw):
        for seed in seeds:
            runs.append(Run(f"{suite}-{group}-s{seed}", group, tuple(overrides), seed=seed, **kw))

    if suite == "losses":
        # interleaved by seed: a sweep cut short has every loss's first seed before any second seed
        for seed in seeds:
            for loss in _losses():
                extra = ("loss.params.flip_rate=0.1",) if loss == "robust" else ()
                runs.append(Run(f"losses-{loss}-s{seed}", loss,
                                (*budget, f"loss.name={loss}", f"loss.beta={beta:g}", *extra), seed=seed))
    elif suite == "beta":
        for seed in seeds:
            for loss in sweep:
                extra = ("loss.params.flip_rate=0.1",) if loss == "robust" else ()
                for b in betas:
                    runs.append(Run(f"beta-{loss}-b{b:g}-s{seed}", f"{loss} beta {b:g}",
                                    (*budget, f"loss.name={loss}", f"loss.beta={b:g}", *extra), seed=seed))
    elif suite == "noise":
        for seed in seeds:
            for rate in (0.0, 0.1, 0.2, 0.3):
                for loss in ("dpo", "robust", "cdpo", "ipo"):
                    extra = {"robust": (f"loss.params.flip_rate={max(rate, 0.05):g}",),
                             "cdpo": (f"loss.params.label_smoothing={max(rate, 0.05):g}",)}.get(loss, ())
                    runs.append(Run(f"noise-{loss}-f{rate:g}-s{seed}", f"{loss} flip {rate:g}",
                                    (*budget, f"loss.name={loss}", f"loss.beta={beta:g}", *extra),
                                    seed=seed, flip_rate=rate, flip_seed=1000 + seed))
    elif suite == "time":
        every = max(steps // 4, 1)
        renoise = ("trajectory.kind=renoise", "trajectory.steps=5")
        variants = {
            "dpo": ("loss.name=dpo",),
            "smpo-forward": ("loss.name=smpo",),
            "smpo-renoise": ("loss.name=smpo", *renoise),
            "smpo-renoise-cached-ref": ("loss.name=smpo", *renoise, "trajectory.invert_with=reference",
                                        "data.cache=true", "trajectory.cache_inverted=true"),
        }
        for seed in seeds:
            for group, extra in variants.items():
                runs.append(Run(f"time-{group}-s{seed}", group, (*budget, f"loss.beta={beta:g}", *extra),
                                seed=seed, checkpoints=every))
    else:
        raise SystemExit(f"unknown suite {suite!r}")
    return runs


# ---------------------------------------------------------------------------------------------- reporting


def group_summary(results: List[Dict]) -> Dict:
    """Mean fidelity, pooled win rate with the two-level interval, and wall times of one group's runs."""
    import numpy as np

    finals = [r["final"] for r in results]
    wins = np.array([f["wins_per_prompt"] for f in finals])
    pairs = np.array([f["pairs_per_prompt"] for f in finals])
    low, high = two_level_bootstrap(wins, pairs, samples=2000, seed=0)
    base = float(np.mean([f["base_mean"] for f in finals]))
    tuned = float(np.mean([f["tuned_mean"] for f in finals]))
    return {
        "seeds": sorted(r["seed"] for r in results),
        "overrides": list(results[0]["overrides"]),
        "n_pairs": results[0]["n_pairs"],
        "base_mean": base, "tuned_mean": tuned,
        "tuned_mean_per_seed": [f["tuned_mean"] for f in finals],
        "shortfall_recovered": (tuned - base) / (REWARD_MAX - base),
        "win_rate": float(wins.sum() / pairs.sum()), "ci_low": low, "ci_high": high,
        "wins": int(sum(f["wins"] for f in finals)), "ties": int(sum(f["ties"] for f in finals)),
        "losses": int(sum(f["losses"] for f in finals)),
        "errors": [_errors(f) for f in finals],
        "train_s": float(np.mean([r["train_s"] for r in results])),
        # process CPU seconds of training (one torch thread): steadier than wall time on a shared machine; runs
        # recorded before it was measured have none
        "train_cpu_s": (float(np.mean([r["train_cpu_s"] for r in results if "train_cpu_s" in r]))
                        if any("train_cpu_s" in r for r in results) else None),
        "eval_s": float(np.mean([r["eval_s"] for r in results])),
        "generate_s": float(np.mean([r["generate_s"] for r in results])),
    }


def _machine() -> Dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from provenance import code_identity

    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            **code_identity()}


def _errors(final: Dict) -> Dict:
    from diffusion_pref.evaluation.stats import max_score_errors

    return max_score_errors(final["scores"], final["base_scores"], maximum=REWARD_MAX, tolerance=REWARD_TOLERANCE)


def _errors_text(errors: List[Optional[Dict]]) -> str:
    errors = [e for e in errors if e]
    if not errors:
        return "-"
    fixed = sum(e["fixed"] for e in errors)
    base_errors = sum(e["baseline_errors"] for e in errors)
    regressions = sum(e["regressions"] for e in errors)
    return f"{fixed}/{base_errors} fixed, {regressions} regressed"


def write_report(out: Path, suite: str, results_dir: Path, note: str, planned: List[Run]) -> Dict:
    finished = {}
    for run in planned:
        f = out / "runs" / run.name / "result.json"
        if f.is_file():
            finished.setdefault(run.group, []).append(json.loads(f.read_text()))
    groups = {g: group_summary(rs) for g, rs in finished.items()}
    planned_groups = list(dict.fromkeys(r.group for r in planned))
    missing = [r.name for r in planned if not (out / "runs" / r.name / "result.json").is_file()]
    report: Dict = {"suite": suite, "note": note, "machine": _machine(), "groups": groups,
                    "planned_groups": planned_groups, "unfinished_runs": missing}
    lines = [f"# Shapes-world alignment: suite `{suite}`", "", note, "",
             "| run | seeds | pairs | base | tuned toy-fidelity | shortfall recovered | win rate (95% CI) | "
             "wins/ties/losses | colour errors | train s | train CPU s | eval s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in planned_groups:
        s = groups.get(g)
        if s is None:
            lines.append(f"| {g} | not run | | | | | | | | | | |")
            continue
        lines.append(
            f"| {g} | {','.join(map(str, s['seeds']))} | {s['n_pairs']} | {s['base_mean']:.3f} | {s['tuned_mean']:.3f} | "
            f"{s['shortfall_recovered']:.0%} | {s['win_rate']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] | "
            f"{s['wins']}/{s['ties']}/{s['losses']} | {_errors_text(s['errors'])} | {s['train_s']:.0f} | "
            f"{'-' if s['train_cpu_s'] is None else format(s['train_cpu_s'], '.0f')} | {s['eval_s']:.0f} |")
    if suite == "noise":
        lines += ["", "Gain over the base (tuned - base toy-fidelity) as a share of the same loss's clean gain:", "",
                  "| loss | clean gain (95% CI) | 10% flipped | 20% flipped | 30% flipped |",
                  "| --- | --- | --- | --- | --- |"]
        shares, shares_ci = {}, {}
        for loss in ("dpo", "robust", "cdpo", "ipo"):
            clean = groups.get(f"{loss} flip 0")
            row = []
            if clean is None:
                row.append("-")
            else:  # mean gain = sum of per-prompt gains / pairs: the two-level bootstrap of a ratio of sums
                cg = [prompt_gains(r["final"]) for r in finished[f"{loss} flip 0"]]
                low, high = two_level_bootstrap([g for g, _ in cg], [n for _, n in cg], samples=2000, seed=0)
                row.append(f"{clean['tuned_mean'] - clean['base_mean']:+.3f} [{low:+.3f}, {high:+.3f}]")
            for rate in ("0.1", "0.2", "0.3"):
                s = groups.get(f"{loss} flip {rate}")
                if clean is None or s is None:
                    row.append("-")
                    continue
                share = share_of_clean_gain(s["tuned_mean"] - s["base_mean"], clean["tuned_mean"] - clean["base_mean"])
                if clean["tuned_mean"] - clean["base_mean"] <= 0:  # no clean gain: a share of a loss means nothing
                    shares[f"{loss} {rate}"] = None
                    row.append(f"n/a (gain {s['tuned_mean'] - s['base_mean']:+.3f})")
                    continue
                ng = [prompt_gains(r["final"]) for r in finished[f"{loss} flip {rate}"]]
                cg = [prompt_gains(r["final"]) for r in finished[f"{loss} flip 0"]]
                ci = share_interval([g for g, _ in ng], [n for _, n in ng], [g for g, _ in cg], [n for _, n in cg])
                shares[f"{loss} {rate}"] = share
                shares_ci[f"{loss} {rate}"] = ci
                row.append("-" if share is None else f"{share:.0%}" + ("" if ci is None else f" [{ci[0]:.0%}, {ci[1]:.0%}]"))
            lines.append(f"| {loss} | " + " | ".join(row) + " |")
        report["share_of_clean_gain"] = shares
        report["share_of_clean_gain_ci95"] = shares_ci
        lines += ["", "Intervals: 95% bootstrap over the held-out prompts (resampled together for the noisy and the "
                  "clean run) and the training seeds (each run's independently); a share is unstable where the clean "
                  "gain's own interval comes near 0."]
    if suite == "time":
        curves = {}
        for g, rs in finished.items():
            import numpy as np

            steps = [p["step"] for p in rs[0]["points"]]
            times = [float(np.mean([r["points"][i]["train_s"] for r in rs])) for i in range(len(steps))]
            rates = [float(np.mean([r["points"][i]["win_rate"] for r in rs])) for i in range(len(steps))]
            curves[g] = {"steps": steps, "train_s": times, "win_rate": rates}
        report["curves"] = curves
        if "dpo" in curves:
            target = curves["dpo"]["win_rate"][-1]
            lines += ["", f"Time to reach DPO's final win rate ({target:.3f}); checkpoints every "
                      f"{curves['dpo']['steps'][0]} steps, win rate linear between them; seconds since the train command started "
                      "(model loading and any cache building included):", "",
                      "| variant | win rate by step | seconds to DPO's final win rate |", "| --- | --- | --- |"]
            for g, c in curves.items():
                reach = time_to_reach(c["train_s"], c["win_rate"], target)
                c["seconds_to_dpo_final"] = reach
                pts = ", ".join(f"{s}: {w:.3f} ({t:.0f} s)" for s, w, t in zip(c["steps"], c["win_rate"], c["train_s"]))
                lines.append(f"| {g} | {pts} | {'not reached' if reach is None else f'{reach:.0f}'} |")
    if missing:
        lines += ["", f"Unfinished runs ({len(missing)}): " + ", ".join(missing)]
    lines += ["", f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, torch "
              f"{report['machine']['torch']}, OMP_NUM_THREADS={report['machine']['OMP_NUM_THREADS']}; code "
              f"{report['machine'].get('ours_commit')} (source digest {report['machine'].get('ours_source_sha256')})."]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"alignment_{suite}.json").write_text(json.dumps(report, indent=2))
    (results_dir / f"alignment_{suite}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    if suite in ("losses", "time", "beta"):
        _plot(report, finished, results_dir / f"alignment_{suite}.png", suite)
    return report


def _plot(report: Dict, finished: Dict, path: Path, suite: str) -> None:
    """The suite's picture: time -- win rate against training time per variant (checkpoints along the way);
    losses/beta -- win rate (95% interval) and mean tuned toy-fidelity (one dot per training seed) against the
    mean training wall time of each run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or the `bench` extra)", flush=True)
        return
    xlabel = "training wall time, s (shared 2-core CPU, one torch thread)"
    if suite == "time":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for g, c in report.get("curves", {}).items():
            ax.plot(c["train_s"], c["win_rate"], marker="o", label=g)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("win rate over base (toy-fidelity)")
        ax.legend(fontsize=8)
        axes = [ax]
    elif suite == "beta":  # win rate and fidelity against beta, a line per loss
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        rate_ax, fid_ax = axes
        by_loss: Dict[str, List] = {}
        for g, s in report["groups"].items():
            opts = dict(o.split("=", 1) for o in s["overrides"])
            # (runs copied from the recipe suite carry only their beta: the recipe's loss, dpo)
            by_loss.setdefault(opts.get("loss.name", "dpo"), []).append((float(opts["loss.beta"]), s))
        for i, (loss, points) in enumerate(sorted(by_loss.items())):
            points.sort(key=lambda p: p[0])
            betas = [b for b, _ in points]
            rate_ax.errorbar(betas, [s["win_rate"] for _, s in points], capsize=3, marker="o", label=loss,
                             yerr=[[s["win_rate"] - s["ci_low"] for _, s in points],
                                   [s["ci_high"] - s["win_rate"] for _, s in points]], color=f"C{i}")
            fid_ax.plot(betas, [s["tuned_mean"] for _, s in points], marker="o", label=loss, color=f"C{i}")
        base = [s["base_mean"] for s in report["groups"].values()]
        if base:
            fid_ax.axhline(base[0], color="grey", lw=0.5, ls="--", label="base")
        rate_ax.axhline(0.5, color="grey", lw=0.5)
        rate_ax.set_ylabel("win rate over base, 95% interval")
        fid_ax.set_ylabel("mean tuned toy-fidelity")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("beta (our convention)")
            ax.legend(fontsize=8)
    else:
        # a loss's mean CPU seconds (over the runs that recorded them: steady under a varying load) when every
        # group has some, else wall seconds
        cpu = all(s.get("train_cpu_s") is not None for s in report["groups"].values())
        key = "train_cpu_s" if cpu else "train_s"
        if cpu:
            xlabel = "training CPU s per run (one torch thread; mean of the runs that recorded it)"
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        rate_ax, fid_ax = axes
        for i, (g, s) in enumerate(report["groups"].items()):
            colour = plt.get_cmap("tab20")(i % 20)
            rate_ax.errorbar([s[key]], [s["win_rate"]], fmt="o", capsize=3, color=colour,
                             yerr=[[s["win_rate"] - s["ci_low"]], [s["ci_high"] - s["win_rate"]]])
            rate_ax.annotate(g, (s[key], s["win_rate"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
            fid_ax.scatter([s[key]] * len(s["tuned_mean_per_seed"]), s["tuned_mean_per_seed"], s=14, color=colour)
            fid_ax.annotate(g, (s[key], s["tuned_mean"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        rate_ax.axhline(0.5, color="grey", lw=0.5)
        rate_ax.set_ylabel("win rate over base, 95% interval (seeds x prompts)")
        base = [s["base_mean"] for s in report["groups"].values()]
        if base:
            fid_ax.axhline(base[0], color="grey", lw=0.5, ls="--")
            fid_ax.annotate("base", (fid_ax.get_xlim()[0], base[0]), fontsize=7, xytext=(2, 2), textcoords="offset points")
        fid_ax.set_ylabel("mean tuned toy-fidelity (a dot per training seed)")
        for ax in axes:
            ax.set_xlabel(xlabel)
    fig.suptitle(f"shapes world: alignment suite `{suite}`")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", required=True, choices=["recipe", "losses", "beta", "noise", "time"])
    p.add_argument("--out", default="outputs/alignment", help="work folder (pairs, runs, evaluation images)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100, help="training steps per run (the per-run budget)")
    p.add_argument("--beta", type=float, default=None, help="beta for losses/noise/time (default: the recipe's)")
    p.add_argument("--run", nargs="+", action="append", default=[], metavar="NAME OVERRIDE",
                   help="recipe suite: a named run and its overrides (generate.* and sample.* pick the pairs); repeatable")
    p.add_argument("--losses", nargs="+", default=["dpo", "smpo"], help="beta suite: the losses swept")
    p.add_argument("--betas", type=float, nargs="+", default=[25, 100, 250, 1000, 2500], help="beta suite: the values")
    p.add_argument("--only", nargs="*", help="only runs whose name contains one of these")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--eval-override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="eval.* overrides, e.g. eval.max_prompts=2 eval.seeds=[0] for a smoke run")
    args = p.parse_args(argv)
    EVAL_OVERRIDES[:] = args.eval_override
    out = Path(args.out)
    beta = args.beta if args.beta is not None else _config([]).loss.beta
    if args.suite == "recipe":
        planned = []
        for name, *overrides in args.run:
            gen = tuple(o for o in overrides if o.startswith(("generate.", "sample.")))
            rest = tuple(o for o in overrides if not o.startswith(("generate.", "sample.")))
            for seed in args.seeds:
                planned.append(Run(f"recipe-{name}-s{seed}", name, rest, gen, seed=seed))
        if not planned:  # report every recipe run found
            for f in sorted((out / "runs").glob("recipe-*/result.json")):
                r = json.loads(f.read_text())
                planned.append(Run(r["name"], r["group"], tuple(r["overrides"]), tuple(r["generate"]), seed=r["seed"]))
    else:
        planned = suite_runs(args.suite, args.seeds, args.steps, beta, args.losses, args.betas)
    if args.only:
        planned = [r for r in planned if any(k in r.name for k in args.only)]
    if not args.report_only:
        for run in planned:
            do_run(out, run)
    write_report(out, args.suite, Path(args.results), args.note, planned)


if __name__ == "__main__":
    main()

"""The tones-world quickstart, measured: ``diffusion-pref quickstart model.pretrained=tones`` at several seeds.

For each ``--seeds`` value N this runs, as a user would (one torch thread),

    OMP_NUM_THREADS=1 diffusion-pref quickstart model.pretrained=tones output.dir=OUT/seedN runtime.seed=N

(``runtime.seed`` moves the generated pairs and the training noise; the held-out captions and evaluation seeds stay),
and records its wall time, the load average and the printed numbers. ``--losses smpo ...`` then trains each extra
loss on the same seed's pairs with the same recipe (``diffusion-pref train --config OUT/seedN/train/config.yaml
loss.name=smpo``) and evaluates base, dpo and it together (``diffusion-pref evaluate``; base and dpo samples come
from the quickstart's evaluation cache, so their numbers are unchanged).

    python benchmarks/tones_quickstart.py --seeds 0 1 2 --losses smpo --out /tmp/tones_qs \\
        --results benchmarks/results/tones_quickstart_cpu.json

Resumable: a seed whose quickstart summary exists is not run again (its recorded wall time is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_identity  # noqa: E402

REWARD = "tones-fidelity"


def _cli(*args: str, log: Path) -> float:
    """Run ``diffusion-pref ARGS`` (this checkout's package) with one torch thread; the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "diffusion_pref.cli", *args], stdout=handle,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"diffusion-pref {args[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - started


def _win(metrics: dict, variant: str) -> dict:
    scores, win = metrics["scores"][REWARD], metrics["win_rates"][REWARD][variant]
    return {"base_mean": scores["base"]["mean"], "tuned_mean": scores[variant]["mean"],
            **{k: win[k] for k in ("win_rate", "ci_low", "ci_high", "wins", "ties", "losses", "n_pairs", "n_prompts")}}


def run_seed(out: Path, seed: int, losses: list[str], extra: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    record_file = run_dir / "benchmark_record.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if "dpo" not in record:
        run_dir.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        wall = _cli("quickstart", "model.pretrained=tones", f"output.dir={run_dir}", f"runtime.seed={seed}", *extra,
                    log=run_dir / "quickstart.log")
        summary = json.loads((run_dir / "quickstart_summary.json").read_text())
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        pairs = json.loads((run_dir / "pairs" / "summary.json").read_text())["pairs_written"]
        record["dpo"] = {"wall_s": round(wall, 1), "steps_s": {k: round(v, 1) for k, v in summary["timings"].items()},
                         "load_average_before": [round(x, 2) for x in load_before],
                         "load_average_after": [round(x, 2) for x in os.getloadavg()], "pairs": pairs,
                         **_win(metrics, "dpo")}
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    for loss in losses:
        if loss in record:
            continue
        train_s = _cli("train", "--config", str(run_dir / "train" / "config.yaml"), f"loss.name={loss}",
                       f"output.dir={run_dir / ('train_' + loss)}", log=run_dir / f"train_{loss}.log")
        evaluation = run_dir / f"eval_{loss}"
        if not evaluation.exists():  # the quickstart's samples of base and dpo are reused from its cache
            shutil.copytree(run_dir / "eval", evaluation)
            (evaluation / "config.yaml").unlink()
        eval_s = _cli("evaluate", "--config", str(run_dir / "eval" / "config.yaml"), f"output.dir={evaluation}",
                      f"eval.variants={{base: base, dpo: {run_dir / 'train'}, {loss}: {run_dir / ('train_' + loss)}}}",
                      log=run_dir / f"eval_{loss}.log")
        metrics = json.loads((evaluation / "metrics.json").read_text())
        record[loss] = {"train_s": round(train_s, 1), "evaluate_s": round(eval_s, 1), **_win(metrics, loss)}
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="*", default=[], help="more losses on each seed's pairs, e.g. smpo")
    parser.add_argument("--out", default="outputs/tones_quickstart_bench")
    parser.add_argument("--results", default="benchmarks/results/tones_quickstart_cpu.json")
    parser.add_argument("overrides", nargs="*", help="key=value for every quickstart run (the recipe otherwise)")
    args = parser.parse_args(argv)

    import torch

    out = Path(args.out)
    runs = {str(seed): run_seed(out, seed, args.losses, args.overrides) for seed in args.seeds}
    recipe = Path(__file__).resolve().parents[1] / "diffusion_pref" / "tones" / "quickstart.yaml"
    result = {
        "command": "OMP_NUM_THREADS=1 diffusion-pref quickstart model.pretrained=tones output.dir=OUT/seedN "
                   "runtime.seed=N " + " ".join(args.overrides),
        "benchmark": "python benchmarks/tones_quickstart.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads": 1,
                    "note": "shared with other sessions: see each run's load averages"},
        "recipe": recipe.read_text(),
        **code_identity(),
        "runs": runs,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    for seed, record in runs.items():
        for loss, r in record.items():
            print(f"seed {seed} {loss}: base {r['base_mean']:.3f} -> tuned {r['tuned_mean']:.3f}, win rate "
                  f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({r['wins']}/{r['ties']}/{r['losses']})"
                  + (f", {r['wall_s']:.0f} s" if "wall_s" in r else f", train {r['train_s']:.0f} s"))


if __name__ == "__main__":
    main()

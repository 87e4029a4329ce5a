"""Online rounds against one round with the same pairs and steps, on the shapes world (not a test).

Each arm is one ``diffusion-pref iterate`` run with the quickstart's settings (``diffusion_pref/quickstart.yaml``:
the shipped shapes-world model, toy-fidelity reward, DPO (beta 2500 unless overridden), 8 samples per caption, best vs worst with
a gap of at least 0.25) over the same 78 training captions and the same total number of training steps:

- ``one_round``: 1 round of 78 captions, ``--total-steps`` steps (300: the quickstart, with 78 of its 80 captions);
- ``three_rounds_fixed``: 3 rounds of 26 captions and a third of the steps each; round r samples the model of
  round r-1, the reference stays the base model;
- ``three_rounds_moved``: the same with the reference moved to the previous round's model.

Every arm is evaluated on the held-out captions with the same seeds (so ``base`` is the same in all of them).
The number of pairs an arm trains on is what its rounds' filters let through (written down per round). Arms run
as separate processes, ``--jobs`` at a time; the results JSON holds every arm's iterate summary, commands, wall
times, the machine's load and the code identity. Arms are ``iterate`` runs, so the same command run again after an
interruption resumes each arm at the stage where it stopped (``--work`` must be the same).

Run::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/iterate_rounds.py --jobs 3 \\
        --out benchmarks/results/iterate_rounds_toy_cpu.json
    # what benchmarks/results/iterate_rounds_toy_cpu.json holds (a smaller budget, on a busy machine):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/iterate_rounds.py --jobs 3 --total-steps 150 \\
        --out benchmarks/results/iterate_rounds_toy_cpu.json loss.beta=250 "eval.seeds=[0,1,2,3,4,5,6,7,8,9,10,11]"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_identity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("one_round", "three_rounds_fixed", "three_rounds_moved")


def command(arm: str, work: Path, total_steps: int, extra: list) -> list:
    rounds = 1 if arm == "one_round" else 3
    settings = [f"iterate.rounds={rounds}", f"iterate.prompts_per_round={78 // rounds}",
                f"train.max_steps={total_steps // rounds}", f"train.checkpoint_every={max(1, total_steps // 6)}"]
    if rounds > 1:
        settings.append(f"iterate.reference={arm.rsplit('_', 1)[1]}")
    return [sys.executable, "-m", "diffusion_pref.cli", "iterate", "--config", "diffusion_pref/quickstart.yaml",
            f"output.dir={work / arm}", "train.logger=none", *settings, *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=1, help="arms run at the same time")
    parser.add_argument("--total-steps", type=int, default=300, help="training steps of an arm, all rounds together")
    parser.add_argument("--work", default="outputs/iterate_rounds", help="the arms' output folders (kept: resumable)")
    parser.add_argument("--out", default="iterate_rounds.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every arm (e.g. loss.beta=250)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.parent.mkdir(parents=True, exist_ok=True)
    identity = code_identity()
    load_before = os.getloadavg()
    commands = {arm: command(arm, work, args.total_steps, args.overrides) for arm in args.arms}
    pending, running, results = list(args.arms), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            arm = pending.pop(0)
            log = open(work.parent / f"{work.name}_{arm}.log", "w")
            running[arm] = (subprocess.Popen(commands[arm], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                            time.perf_counter(), log)
        time.sleep(2)
        for arm, (proc, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[arm]
            if proc.returncode != 0:
                raise SystemExit(f"arm {arm} failed (exit {proc.returncode}); see {log.name}")
            summary = json.loads((work / arm / "iterate_summary.json").read_text())
            # The stages' own times survive a resumed run (the process's wall time would only count the last attempt).
            stage_s = sum(sum(row["seconds"].values()) for row in summary["rounds"])
            results[arm] = {"wall_s": time.perf_counter() - started, "stage_s": stage_s, "summary": summary}
            print(f"{arm}: done in {results[arm]['wall_s']:.0f} s", flush=True)

    rows = []
    for arm in args.arms:
        summary = results[arm]["summary"]
        last = summary["rounds"][-1]
        win = last["win_rate_over_base"]["toy-fidelity"]
        rows.append(f"| {arm} | {sum(r['pairs'] for r in summary['rounds'])} | "
                    f"{sum(r['train_steps'] for r in summary['rounds'])} | {summary['base_reward_mean']['toy-fidelity']:.3f} | "
                    + " ".join(f"{r['reward_mean']['toy-fidelity']:.3f}" for r in summary["rounds"])
                    + f" | {win['win_rate']:.3f} [{win['ci_low']:.3f}, {win['ci_high']:.3f}] | {results[arm]['stage_s']:.0f} |")
    table = ["| arm | pairs | steps | base fidelity | fidelity after each round | win rate over base (last round) | stages s |",
             "|---|---|---|---|---|---|---|", *rows]
    print("\n".join(table))
    record = {
        "benchmark": "iterate_rounds", "arms": results, "commands": {a: " ".join(c) for a, c in commands.items()},
        "jobs": args.jobs, "total_steps": args.total_steps, "overrides": args.overrides, "table_markdown": "\n".join(table),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "note": "a 2-core machine shared with other jobs: wall times are inflated and not comparable "
                            "across runs"},
        **identity,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

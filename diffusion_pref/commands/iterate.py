"""``diffusion-pref iterate``: online rounds of generate -> train -> evaluate, each round sampling the last one's model.

    diffusion-pref iterate --config diffusion_pref/quickstart.yaml output.dir=outputs/iterate \\
        iterate.rounds=3 iterate.prompts_per_round=26 train.max_steps=100

Round r (1 .. ``iterate.rounds``) works in ``<output.dir>/round_<r>/``:

1. generate and score (``pairs/``): the current model samples this round's prompts with seeds from
   ``runtime.seed + r - 1``; round 1 samples the base, round r the base with round r-1's LoRA (``generate.lora``).
   ``reward.models`` scores the samples and ``generate.strategy`` pairs them, as ``diffusion-pref generate`` does.
   With ``iterate.prompts_per_round=N`` round r takes prompts [(r-1)N, rN) of ``generate.prompts``, so R rounds of
   N see the same prompts as one round of RN; unset, every round samples every prompt.
2. train (``train/``): round r continues round r-1's LoRA (``train.init_lora``) for ``train.max_steps`` steps on
   this round's pairs, with a fresh optimizer. ``iterate.reference=fixed``: the reference is the base model in every
   round (the adapter switched off); ``moved``: round r's reference is round r-1's model (a frozen copy of the base
   with round r-1's LoRA), so each round's loss measures the change from the model that sampled its pairs.
3. evaluate (``<output.dir>/eval/``): the base and every round so far on ``eval.prompts`` with ``eval.seeds``; the
   samples of earlier rounds come from evaluate's sample cache. Its ``metrics.json`` and ``report.html`` hold every
   round; ``iterate_summary.json`` and the table printed at the end give each round's pairs, reward means, win rate
   over the base (95% interval) and wall times.

Resuming: ``iterate_state.json`` records every finished stage, and running the same command again skips them. A
stage that was stopped part way continues: generate keeps the shards it wrote, train resumes from its last
checkpoint (``train.resume=latest``), evaluate reuses its samples. Raising ``iterate.rounds`` continues a finished
run; any other changed setting is refused, since the earlier rounds were made with the old one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from diffusion_pref.config import Config, ConfigError
from diffusion_pref.fileio import atomic_write
from diffusion_pref.commands.quickstart import step_config

STATE_FILE = "iterate_state.json"
SUMMARY_FILE = "iterate_summary.json"
# Set per round by iterate; a value given by the user would be silently replaced, so it is refused instead.
_SET_PER_ROUND = {"generate.lora": None, "train.init_lora": None, "eval.variants": {}}


def _check(cfg: Config) -> None:
    it = cfg.iterate
    if it.rounds < 1:
        raise ConfigError(f"iterate.rounds must be >= 1, got {it.rounds}")
    if it.prompts_per_round is not None and it.prompts_per_round < 1:
        raise ConfigError(f"iterate.prompts_per_round must be >= 1 or null, got {it.prompts_per_round}")
    if cfg.model.finetune != "lora":
        raise ConfigError("iterate continues each round's LoRA in the next round: it needs model.finetune=lora")
    if cfg.train.resume not in (None, "latest"):
        raise ConfigError(f"train.resume={cfg.train.resume}: iterate resumes each round's training itself; unset it")
    for dotted, unset in _SET_PER_ROUND.items():
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) != unset:
            raise ConfigError(f"{dotted} is set by iterate for each round (the previous round's LoRA, every round "
                              "as an eval variant); unset it")


def _settings(cfg: Config) -> Dict[str, Any]:
    """What a resumed run must share with the run that made the earlier rounds: all but the number of rounds and
    where the folder is (a run folder may be moved and resumed there)."""
    settings = dataclasses.asdict(cfg)
    del settings["iterate"]["rounds"]
    del settings["output"]["dir"]
    settings["train"].pop("resume")  # None and latest do the same here
    return json.loads(json.dumps(settings, default=str))


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix == "":
            flat.update(_flat(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _load_state(out: Path, settings: Dict[str, Any]) -> Dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        return {"settings": settings, "stages": {}}
    state = json.loads(path.read_text())
    old, new = _flat(state["settings"]), _flat(settings)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        details += f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ConfigError(f"output.dir {out} holds rounds made with other settings ({details}); resume with the "
                          "same settings (only iterate.rounds may grow), or choose a new output.dir")
    return state


def _save_state(out: Path, state: Dict[str, Any]) -> None:
    atomic_write(out / STATE_FILE, json.dumps(state, indent=2))  # a run killed mid-write leaves the previous state whole


def _round_prompts(cfg: Config, rounds: int) -> Optional[List[List[dict]]]:
    """Each round's prompts (``iterate.prompts_per_round``), or None when every round samples every prompt."""
    per_round = cfg.iterate.prompts_per_round
    if per_round is None:
        return None
    from diffusion_pref.prompts import read_prompts

    gen = cfg.generate
    if not gen.prompts:
        raise ConfigError("generate.prompts is not set; give a prompt file, folder or hub dataset id")
    records = read_prompts(gen.prompts, gen.prompt_column, gen.prompt_split)
    if gen.max_prompts is not None:
        records = records[: gen.max_prompts]
    if rounds * per_round > len(records):
        raise ConfigError(f"iterate.prompts_per_round={per_round} for iterate.rounds={rounds} needs "
                          f"{rounds * per_round} prompts; generate.prompts={gen.prompts} has {len(records)}")
    return [[{"prompt": r.prompt, "category": r.category} for r in records[i * per_round:(i + 1) * per_round]]
            for i in range(rounds)]


def _reference(cfg: Config, round_number: int) -> str:
    """model.reference for a round: the base (adapter off) for a fixed reference, a frozen copy of the starting
    model (base + the previous round's LoRA) for a moved one."""
    from diffusion_pref.losses import REFERENCE_FREE

    if round_number == 1 or cfg.loss.name in REFERENCE_FREE:
        return cfg.model.reference
    if cfg.iterate.reference == "fixed":
        return "adapter"
    return "copy_cpu" if cfg.model.reference == "copy_cpu" else "copy"


def _generate_stage(cfg: Config, folder: Path, round_number: int, prompts: Optional[List[dict]],
                    lora: Optional[str]) -> Dict[str, Any]:
    from diffusion_pref.commands import generate

    fields: Dict[str, Any] = {"lora": lora}
    if prompts is not None:
        prompt_file = folder / "prompts.json"
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(prompt_file, json.dumps(prompts, indent=1))
        fields.update(prompts=str(prompt_file), prompt_column=None, max_prompts=None)
    runtime = {"seed": cfg.runtime.seed + round_number - 1}  # training keeps runtime.seed
    summary = generate.generate(step_config(cfg, folder / "pairs", generate=fields, runtime=runtime))
    if not summary["pairs_written"]:
        raise ValueError(f"round {round_number} wrote no preference pairs ({summary['pairs_filtered']} filtered, "
                         f"{folder / 'pairs'}); lower generate.min_gap or sample more prompts or samples per prompt")
    return {"pairs": summary["pairs_written"], "prompts": summary["prompts_done"], "samples": summary["samples"]}


def _train_stage(cfg: Config, folder: Path, round_number: int, lora: Optional[str]) -> Dict[str, Any]:
    from diffusion_pref.commands import train as train_command

    step = step_config(cfg, folder / "train", data={"source": str(folder / "pairs")},
                        train={"init_lora": lora, "resume": "latest"},
                        model={"reference": _reference(cfg, round_number)})
    train_command.run(step)
    summary = json.loads((folder / "train" / "train_summary.json").read_text())
    return {"steps": summary["steps"], "reference": summary["reference"], "init_lora": lora}


def _evaluate_stage(cfg: Config, out: Path, round_number: int) -> Dict[str, Any]:
    from diffusion_pref.commands import evaluate

    variants = {"base": "base", **{f"round_{r}": str(out / f"round_{r}" / "train") for r in range(1, round_number + 1)}}
    evaluate.run(step_config(cfg, out / "eval", eval={"variants": variants, "baseline": "base"}))
    return {"variants": list(variants)}


def _round_rows(state: Dict[str, Any], metrics: Dict[str, Any], rounds: int) -> List[Dict[str, Any]]:
    rows = []
    for r in range(1, rounds + 1):
        done = state["stages"][str(r)]
        name = f"round_{r}"
        row = {"round": r, "pairs": done["generate"]["pairs"], "prompts": done["generate"]["prompts"],
               "train_steps": done["train"]["steps"], "reference": done["train"]["reference"],
               "seconds": {stage: done[stage]["seconds"] for stage in ("generate", "train", "evaluate")},
               "reward_mean": {}, "win_rate_over_base": {}}
        for reward, scores in metrics["scores"].items():
            row["reward_mean"][reward] = scores[name]["mean"]
            win = metrics["win_rates"][reward].get(name)
            if win is not None:
                row["win_rate_over_base"][reward] = win
        rows.append(row)
    return rows


def _table(summary: Dict[str, Any], reward: str) -> List[str]:
    lines = [f"{'round':>6} {'pairs':>6} {'steps':>6}  {reward + ' mean':>20}  {'win rate over base [95% CI]':>28}"
             f"  {'wall s (gen/train/eval)':>24}",
             f"{'base':>6} {'':>6} {'':>6}  {summary['base_reward_mean'][reward]:>20.4f}"]
    for row in summary["rounds"]:
        win = row["win_rate_over_base"].get(reward)
        win_text = f"{win['win_rate']:.3f} [{win['ci_low']:.3f}, {win['ci_high']:.3f}]" if win else "-"
        seconds = "/".join(f"{row['seconds'][s]:.0f}" for s in ("generate", "train", "evaluate"))
        lines.append(f"{row['round']:>6} {row['pairs']:>6} {row['train_steps']:>6}  {row['reward_mean'][reward]:>20.4f}"
                     f"  {win_text:>28}  {seconds:>24}")
    return lines


def run(cfg: Config) -> Dict[str, Any]:
    """Run (or resume) every round; returns the summary also written to ``iterate_summary.json``."""
    _check(cfg)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = cfg.iterate.rounds
    round_prompts = _round_prompts(cfg, rounds)
    state = _load_state(out, _settings(cfg))
    for r in range(1, rounds + 1):
        folder = out / f"round_{r}"
        done = state["stages"].setdefault(str(r), {})
        lora = str(out / f"round_{r - 1}" / "train") if r > 1 else None
        stages = {
            "generate": lambda: _generate_stage(cfg, folder, r, round_prompts[r - 1] if round_prompts else None, lora),
            "train": lambda: _train_stage(cfg, folder, r, lora),
            "evaluate": lambda: _evaluate_stage(cfg, out, r),
        }
        for stage, work in stages.items():
            if stage in done:
                print(f"iterate: round {r} {stage}: done before, skipped", flush=True)
                continue
            print(f"iterate: round {r} of {rounds}: {stage}", flush=True)
            started = time.perf_counter()
            result = work()
            done[stage] = {**result, "seconds": time.perf_counter() - started}
            _save_state(out, state)

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    reward = next(iter(metrics["scores"]))
    summary = {
        "rounds": _round_rows(state, metrics, rounds),
        "base_reward_mean": {name: scores["base"]["mean"] for name, scores in metrics["scores"].items()},
        "reference": cfg.iterate.reference,
        "loss": cfg.loss.name,
        "metrics_file": str(out / "eval" / "metrics.json"),
        "report": str(out / "eval" / "report.html"),
    }
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    print("\n".join(["", f"iterate: {rounds} rounds of {cfg.loss.name} (reference {cfg.iterate.reference}), "
                         f"evaluated on {cfg.eval.prompts}", *_table(summary, reward),
                     f"  report: {summary['report']}"]), flush=True)
    return summary

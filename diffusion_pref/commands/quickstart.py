"""``diffusion-pref quickstart``: the whole loop, generate -> train -> evaluate, on a built-in model, on a CPU.

    diffusion-pref quickstart                          # Diffusion-DPO on the shapes-world model
    diffusion-pref quickstart loss.name=smpo           # any loss of the registry, same command
    diffusion-pref quickstart output.dir=/tmp/qs train.max_steps=50 generate.max_prompts=20

1. generate: the shipped shapes-world model samples several images per training caption; the programmatic
   ``toy-fidelity`` reward ranks them; best and worst become a preference pair (``<output.dir>/pairs``).
2. train: a LoRA on those pairs with ``loss.name`` (``<output.dir>/train``, loads with ``pipe.load_lora_weights``).
3. evaluate: base against tuned on held-out captions with the same seeds: reward means, win rate with a 95%
   bootstrap interval, and ``report.html`` (``<output.dir>/eval``).

Each step writes its own ``config.yaml``, so any step can be rerun alone with ``diffusion-pref <step> --config``.
The settings live in ``quickstart.yaml`` beside this file; ``--config`` and ``key=value`` apply on top.

``diffusion-pref quickstart model.pretrained=tones`` runs the same three commands on the tones world (audio: the
tiny Tango-structured model, the ``tones-fidelity`` reward, Audio-alpaca pairs, a report with players and
spectrograms) with the recipe in ``diffusion_pref/tones/quickstart.yaml`` layered over the shapes-world values
(:func:`model_recipes`; ``--config`` and ``key=value`` still apply on top).

When the shapes-world weights are not in the package, the loop runs on a tiny random-weight Stable Diffusion
instead and says so: that shows the plumbing works end to end, not that alignment works.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from diffusion_pref.config import Config, save_config
from diffusion_pref.fileio import atomic_write


def step_config(cfg: Config, out: Path, **sections) -> Config:
    """``cfg`` with some sections' fields replaced, writing into ``out``; its config.yaml reruns the step alone."""
    changed = {name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    step = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out)), **changed)
    save_config(step, out)
    return step


def _built_in_model(cfg: Config, out: Path) -> tuple[Config, str]:
    """The shapes-world model if it ships with the package; otherwise a tiny random-weight SD (said plainly)."""
    from diffusion_pref.pipelines import named_model_folder

    shipped = named_model_folder(cfg.model.pretrained)
    if shipped is not None and (shipped / "stft_config.json").is_file():  # its recipe: model_recipes
        return cfg, f"model: {cfg.model.pretrained} (audio)"
    if shipped is None or (shipped / "model_index.json").is_file():
        return cfg, f"model: {cfg.model.pretrained}"
    from diffusion_pref.testing import save_tiny_sd

    folder = save_tiny_sd(out / "tiny-random-sd")
    note = (
        "NOTE: the shapes-world model is not shipped in this installation, so the quickstart runs on a tiny "
        f"random-weight Stable Diffusion ({folder}). This shows that generate -> train -> evaluate works end to "
        "end; the numbers below say nothing about alignment quality."
    )
    print(note, flush=True)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=str(folder))), note


def model_recipes(pretrained: str) -> list[Path]:
    """The recipe files a built-in world adds for ``model.pretrained`` (the command line layers them after the
    shapes-world ``quickstart.yaml`` and before ``--config`` and ``key=value``, so every value the user gives
    stays): an audio world's ``quickstart.yaml`` beside its weights (e.g. tones); none for image models."""
    from diffusion_pref.config import ConfigError
    from diffusion_pref.pipelines import named_model_folder

    shipped = named_model_folder(pretrained)
    if shipped is None or not (shipped / "stft_config.json").is_file():
        return []
    recipe = shipped.parent / "quickstart.yaml"
    if not recipe.is_file():
        raise ConfigError(f"model.pretrained={pretrained} is an audio model without a quickstart recipe "
                          f"({recipe} is missing); run generate, train and evaluate with your own config")
    return [recipe]


def _summary_lines(metrics: dict, reward: str, tuned: str) -> list[str]:
    """Human-readable before/after lines from evaluate's metrics.json."""
    lines = []
    for variant, stats in metrics["scores"][reward].items():
        lines.append(f"  {reward} of {variant}: mean {stats['mean']:.3f}  median {stats['median']:.3f}")
    win = metrics["win_rates"][reward].get(tuned)
    if win is not None:
        low, high = win["ci_low"], win["ci_high"]
        verdict = "above" if low > 0.5 else ("below" if high < 0.5 else "overlapping")
        lines.append(f"  win rate of {tuned} over base: {win['win_rate']:.3f}  95% CI [{low:.3f}, {high:.3f}] "
                     f"({verdict} 0.5); wins/ties/losses {win['wins']}/{win['ties']}/{win['losses']}")
        if win.get("errors"):
            from diffusion_pref.evaluation.stats import errors_text

            lines.append(f"  {errors_text(win['errors'])}")
    return lines


def run(cfg: Config) -> dict:
    from diffusion_pref.commands import evaluate, generate
    from diffusion_pref.commands import train as train_command

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, model_note = _built_in_model(cfg, out)
    timings = {}

    started = time.perf_counter()
    pairs = out / "pairs"
    generate.run(step_config(cfg, pairs))
    timings["generate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    tuned = out / "train"
    train_command.run(step_config(cfg, tuned, data={"source": str(pairs)}))
    timings["train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    evaluation = out / "eval"
    variants = {"base": "base", cfg.loss.name: str(tuned)}
    evaluate.run(step_config(cfg, evaluation, eval={"variants": variants, "baseline": "base"}))
    timings["evaluate_s"] = time.perf_counter() - started

    metrics = json.loads((evaluation / "metrics.json").read_text())
    reward = next(iter(cfg.reward.models))
    lines = [
        "",
        f"quickstart: {model_note}; loss {cfg.loss.name} (beta {cfg.loss.beta:g}), {cfg.train.max_steps} steps",
        *_summary_lines(metrics, reward, cfg.loss.name),
        "  wall time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items())
        + f", total {sum(timings.values()):.0f} s",
        f"  report: {evaluation / 'report.html'}",
    ]
    print("\n".join(lines), flush=True)
    result = {"model": model_note, "loss": cfg.loss.name, "timings": timings, "metrics_file": str(evaluation / "metrics.json")}
    atomic_write(out / "quickstart_summary.json", json.dumps(result, indent=2))
    return result

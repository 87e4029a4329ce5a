"""The quickstart runs generate -> train -> evaluate end to end (reduced: few prompts, few steps)."""

import json
import subprocess
import sys

from diffusers import StableDiffusionPipeline

from diffusion_pref.config import load_config
from diffusion_pref.toy import WEIGHTS as TOY_WEIGHTS


def test_reduced_quickstart_runs_end_to_end(tmp_path):
    """On the shipped shapes-world model (the quickstart's default), with few prompts and steps."""
    out = tmp_path / "qs"
    overrides = [
        f"output.dir={out}", "generate.max_prompts=6", "sample.steps=2",
        "generate.min_gap=null", "train.max_steps=3", "train.checkpoint_every=100", "eval.max_prompts=3",
        "eval.seeds=[0,1]", "eval.bootstrap_samples=50",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_pref.cli", "quickstart", *overrides],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "win rate of dpo over base" in result.stdout
    w = json.loads((out / "eval" / "metrics.json").read_text())["win_rates"]["toy-fidelity"]["dpo"]
    assert f"wins/ties/losses {w['wins']}/{w['ties']}/{w['losses']}" in result.stdout
    assert f"base errors fixed {w['errors']['fixed']}/{w['errors']['baseline_errors']}" in result.stdout
    assert "random-weight" not in result.stdout  # the real shapes-world model ran, not the fallback

    # Each step wrote its outputs and a config.yaml that reruns it alone.
    assert list((out / "pairs").glob("pairs-*.parquet"))
    assert (out / "train" / "pytorch_lora_weights.safetensors").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"base", "dpo"}
    assert metrics["win_rates"]["toy-fidelity"]["dpo"]["n_pairs"] == 3 * 2
    assert (out / "eval" / "report.html").stat().st_size > 1000
    train_cfg = load_config(out / "train" / "config.yaml")
    assert train_cfg.data.source == str(out / "pairs") and train_cfg.output.dir == str(out / "train")

    # The tuned LoRA loads with diffusers' own loader.
    pipe = StableDiffusionPipeline.from_pretrained(TOY_WEIGHTS)
    pipe.load_lora_weights(out / "train")
    summary = json.loads((out / "quickstart_summary.json").read_text())
    assert summary["loss"] == "dpo" and set(summary["timings"]) == {"generate_s", "train_s", "evaluate_s"}


def test_without_the_shapes_world_weights_it_falls_back_and_says_so(tmp_path, monkeypatch, capsys):
    from diffusion_pref import pipelines
    from diffusion_pref.commands import quickstart

    monkeypatch.setitem(pipelines.NAMED_MODELS, "toy", pipelines.NamedModel(tmp_path / "missing", "build them"))
    cfg, note = quickstart._built_in_model(load_config(), tmp_path)
    assert "random-weight" in note and "random-weight" in capsys.readouterr().out
    StableDiffusionPipeline.from_pretrained(cfg.model.pretrained)  # a real pipeline folder the loop can use
    # With the weights present (the shipped case) nothing changes.
    monkeypatch.undo()
    same, note = quickstart._built_in_model(load_config(), tmp_path)
    assert same.model.pretrained == "toy" and "random" not in note

"""The quickstart runs generate -> train -> evaluate end to end (reduced: few prompts, few steps)."""

import json
import subprocess
import sys

from diffusers import StableDiffusionPipeline

from diffusion_pref.config import load_config


def test_reduced_quickstart_runs_end_to_end(tmp_path, tiny_sd_dir):
    out = tmp_path / "qs"
    overrides = [
        f"output.dir={out}", f"model.pretrained={tiny_sd_dir}", "generate.max_prompts=6", "generate.steps=2",
        "generate.min_gap=null", "train.max_steps=3", "train.checkpoint_every=100", "eval.max_prompts=3",
        "eval.steps=2", "eval.seeds=[0,1]", "eval.bootstrap_samples=50",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_pref.cli", "quickstart", *overrides],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "win rate of dpo over base" in result.stdout

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
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(out / "train")
    summary = json.loads((out / "quickstart_summary.json").read_text())
    assert summary["loss"] == "dpo" and set(summary["timings"]) == {"generate_s", "train_s", "evaluate_s"}

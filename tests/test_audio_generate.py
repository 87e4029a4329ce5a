"""diffusion-pref generate for an audio backbone: the shipped tones model, tones-fidelity, Audio-alpaca output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_pref.commands.generate import form_pairs, generate
from diffusion_pref.config import load_config
from diffusion_pref.tones import WEIGHTS

pytestmark = pytest.mark.skipif(not (WEIGHTS / "stft_config.json").is_file(), reason="tones weights not built")

PROMPTS = ["two high beeps then a low hum", "three clicks", "a low hum"]


def _cfg(tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return load_config(None, [
        "model.pretrained=tones", f"generate.prompts={prompts}", "generate.samples_per_prompt=3",
        "sample.steps=3", "sample.guidance_scale=1.0", "sample.scheduler=DDIMScheduler", "sample.batch_size=6",
        "runtime.device=cpu", "reward.models={tones-fidelity: 1.0}", f"output.dir={tmp_path / 'pairs'}", *extra,
    ])


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("audio_gen")
    cfg = _cfg(tmp, "generate.min_gap=0")
    summary = generate(cfg)
    return tmp, cfg, summary


def test_audio_pairs_are_written_in_the_audio_alpaca_layout(generated):
    import pyarrow.parquet as pq

    from diffusion_pref.audio import read_audio
    from diffusion_pref.tones.rewards import TonesFidelity

    tmp, _, summary = generated
    assert summary["prompts_done"] == 3 and summary["samples"] == 9
    files = sorted((tmp / "pairs").glob("pairs-*.parquet"))
    table = pq.read_table(files).to_pydict()
    assert {"prompt", "chosen", "rejected", "strategy", "score_0", "score_1"} <= set(table)
    assert "label_0" not in table and "jpg_0" not in table
    assert summary["pairs_written"] == len(table["prompt"]) >= 1
    for prompt, chosen, rejected, s0, s1 in zip(table["prompt"], table["chosen"], table["rejected"],
                                                table["score_0"], table["score_1"]):
        assert s0 > s1 and chosen["path"].endswith(".flac")
        assert chosen["bytes"][:4] == b"fLaC"
        waves = []
        for cell in (chosen, rejected):
            wave, rate = read_audio(cell)
            assert rate == 16000 and wave.ndim == 1 and wave.shape == (20480,)
            waves.append(wave)
        # the stored (16-bit) clips score as generated: the reward is a step function of the clip, so compare
        # the winner/loser order, and the scores themselves within the 16-bit quantisation's effect
        stored = TonesFidelity().score([prompt, prompt], waves, sample_rate=16000).tolist()
        assert stored[0] == pytest.approx(s0, abs=0.05) and stored[1] == pytest.approx(s1, abs=0.05)


def test_train_reads_the_generated_pairs(generated):
    from diffusion_pref.training.setup import Trainer

    tmp = generated[0]
    train_cfg = load_config(None, [
        "model.pretrained=tones", f"data.source={tmp / 'pairs'}", "model.lora_rank=4", "loss.name=dpo",
        "train.batch_size=2", "train.max_steps=1", "train.logger=none", "train.checkpoint_every=0",
        "runtime.device=cpu", f"output.dir={tmp / 'train'}",
    ])
    result = Trainer(train_cfg).train()
    assert result.get("steps") == 1
    assert (tmp / "train" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_does_nothing_more(generated):
    _, cfg, summary = generated
    again = generate(cfg)
    assert again["pairs_written"] == summary["pairs_written"] and again["samples"] == summary["samples"]


def test_min_loser_score_filters_and_is_counted(tmp_path):
    torch.set_num_threads(1)
    summary = generate(_cfg(tmp_path, "generate.min_loser_score=2.0", "generate.max_prompts=1"))
    assert summary["pairs_written"] == 0
    reasons = list(summary["pairs_filtered"])
    assert reasons == ["tie", "min_winner_score", "min_loser_score", "min_gap", "max_gap"]
    assert summary["pairs_filtered"]["min_loser_score"] + summary["pairs_filtered"]["tie"] == 1


def test_two_scorers_must_both_pass_the_filters():
    # combined ranking says 0 beats 1; scorer b has the loser below min_loser_score -> filtered
    combined, a, b = [1.0, 0.5], [0.9, 0.6], [0.8, 0.1]
    pairs, stats = form_pairs(combined, "best_vs_worst", min_loser_score=0.3, components=[a, b])
    assert pairs == [] and stats["min_loser_score"] == 1
    pairs, _ = form_pairs(combined, "best_vs_worst", min_loser_score=0.3, components=[a, a])
    assert pairs == [(0, 1)]
    # a gap window each scorer must meet: b's gap 0.7 is above max_gap
    pairs, stats = form_pairs(combined, "best_vs_worst", min_gap=0.1, max_gap=0.5, components=[a, b])
    assert pairs == [] and stats["max_gap"] == 1
    # scorers disagreeing on the winner fail min_gap > 0 on the disagreeing one
    pairs, stats = form_pairs(combined, "best_vs_worst", min_gap=0.01, components=[a, [0.2, 0.3]])
    assert pairs == [] and stats["min_gap"] == 1
    # without components the filters apply to the ranking scores, as for images
    pairs, _ = form_pairs(combined, "best_vs_worst", min_loser_score=0.3)
    assert pairs == [(0, 1)] and not math.isnan(np.mean(combined))


def test_evaluate_scores_audio_and_reports_players_and_spectrograms(tmp_path):
    import json

    from diffusion_pref.commands.evaluate import run as evaluate

    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    cfg = load_config(None, [
        "model.pretrained=tones", f"eval.prompts={prompts}", "eval.seeds=[0, 1]", "eval.bootstrap_samples=200",
        "eval.variants={base: base, g2: base}", "eval.variant_sampling={g2: {guidance_scale: 2.0}}",
        "sample.steps=3", "sample.guidance_scale=1.0", "sample.scheduler=DDIMScheduler", "runtime.device=cpu",
        "reward.models={tones-fidelity: 1.0}", f"output.dir={out}",
    ])
    metrics = evaluate(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rewards"] == ["tones-fidelity"] and metrics["variants"] == ["base", "g2"]
    rate = saved["win_rates"]["tones-fidelity"]["g2"]
    assert 0.0 <= rate["ci_low"] <= rate["win_rate"] <= rate["ci_high"] <= 1.0
    clips = sorted((out / "media").rglob("*.wav"))
    assert len(clips) == 2 * len(PROMPTS) * 2  # variants x prompts x seeds, beside the report
    html = (out / "report.html").read_text()
    shown = 2 * len(PROMPTS)  # the grid shows one seed: variants x prompts
    assert html.count("<audio controls") == shown and html.count('<img class="spectrogram"') == shown
    assert not (out / "grid.png").exists()  # the image grid is for images only


def test_quickstart_runs_the_tones_world_through_the_standard_commands(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "qs"
    overrides = [
        "model.pretrained=tones", f"output.dir={out}", "generate.max_prompts=6", "sample.steps=3",
        "generate.min_gap=null", "train.max_steps=2", "train.batch_size=2", "train.logger=none",
        "eval.max_prompts=2", "eval.seeds=[0,1]", "eval.bootstrap_samples=50",
    ]
    result = subprocess.run([sys.executable, "-m", "diffusion_pref.cli", "quickstart", *overrides],
                            capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tones-fidelity of base" in result.stdout and "win rate of dpo over base" in result.stdout
    assert list((out / "pairs").glob("pairs-*.parquet"))
    assert (out / "train" / "pytorch_lora_weights.safetensors").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["win_rates"]["tones-fidelity"]["dpo"]["n_pairs"] == 2 * 2
    assert "<audio controls" in (out / "eval" / "report.html").read_text()


class _ByIndex:
    """A stub audio scorer: the clip's position in its batch times ``step``; records the sample_rate it gets."""

    scale = "stub"

    def __init__(self, name, step):
        self.name, self.step, self.rates = name, step, []

    def score(self, prompts, media, sample_rate=None):
        self.rates.append(sample_rate)
        return torch.tensor([self.step * (i % 3) for i in range(len(media))], dtype=torch.float64)


@pytest.mark.parametrize("second_step", [1.0, 0.0])
def test_generate_with_two_scorers_needs_both_to_pass(tmp_path, second_step):
    from diffusion_pref.reward_models.base import WeightedReward

    torch.set_num_threads(1)
    a, b = _ByIndex("a", 1.0), _ByIndex("b", second_step)
    reward = WeightedReward({"a": (a, 1.0), "b": (b, 1.0)})
    cfg = _cfg(tmp_path, "generate.max_prompts=1", "generate.min_loser_score=0.0", "generate.min_gap=0.5",
               "generate.strategy=all_pairs")
    summary = generate(cfg, reward=reward)
    assert a.rates == b.rates == [16000]  # every scorer is told the clips' sample rate
    # scores a = [0, 1, 2] (b the same, or all 0): all_pairs gives 3 pairs, each with a gap >= 1 on a;
    # on a constant b every gap is 0 < min_gap, so nothing passes
    assert summary["pairs_written"] == (3 if second_step else 0)
    assert summary["pairs_filtered"]["min_gap"] == (0 if second_step else 3)

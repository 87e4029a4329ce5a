"""prompt-opt's stages: the SFT warm start before the preference loss, iterative rounds, the evaluate report."""

from __future__ import annotations

import json

import pytest
import torch
from test_prompt_opt_train import PAIRS, lm_config, write_pairs


def logprobs(model, tokenizer, rows):
    from diffusion_pref.prompt_opt.logprobs import completion_logprobs
    from diffusion_pref.prompt_opt.pairs import collate_pairs

    batch = collate_pairs(tokenizer, rows)
    with torch.no_grad():
        return completion_logprobs(model.eval(), {k: batch[k] for k in ("input_ids", "attention_mask",
                                                                          "completion_mask")})


def test_sft_warm_start_then_the_preference_loss_with_the_sft_model_as_reference(tiny_causal_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffusion_pref.commands import prompt_opt
    from diffusion_pref.prompt_opt.train import load_policy, sft_model_dir

    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    cfg = lm_config(tmp_path, tiny_causal_lm_dir, pairs, "prompt_opt.sft_steps=2", "train.max_steps=2")
    summary = prompt_opt.train(cfg)
    out = tmp_path / "run"
    model_dir = sft_model_dir(out)
    assert summary["steps"] == 2 and summary["policy"] == str(model_dir)
    assert summary["warm_start"] == {"from": str(tiny_causal_lm_dir), "model": str(model_dir), "steps": 2}
    # the SFT stage ran loss sft (= -log p(chosen)) through the loop for its own steps
    sft_rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(sft_rows) == 2 and sft_rows[0]["loss"] == pytest.approx(sft_rows[0]["nll_w"], rel=1e-6)
    # the SFT'd model moved away from the base; the preference stage's reference is it (step 0: loss log 2)
    tok = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    base = logprobs(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), tok, PAIRS)
    sft = logprobs(AutoModelForCausalLM.from_pretrained(model_dir), tok, PAIRS)
    assert (sft[:4] - base[:4]).mean() > 0  # SFT raised log p(chosen)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out))
    tuned = logprobs(adapted, tok, PAIRS)
    with adapted.disable_adapter():
        reference = logprobs(adapted, tok, PAIRS)
    torch.testing.assert_close(reference, sft, rtol=0, atol=1e-5)
    assert not torch.allclose(tuned, sft)
    # evaluate / generate with the original policy load the adapter on the SFT'd model
    policy = load_policy(cfg, train=False, adapter=str(out))
    with torch.no_grad():
        from diffusion_pref.prompt_opt.pairs import collate_pairs

        w, l = policy.log_likelihoods(collate_pairs(policy.tokenizer, PAIRS))
    torch.testing.assert_close(torch.cat([w, l]), tuned, rtol=0, atol=1e-5)
    # continuing that adapter (as iterate's next round does): the new run records the same SFT'd base
    more = prompt_opt.train(lm_config(tmp_path / "more", model_dir, pairs, f"prompt_opt.adapter={out}",
                                      "train.max_steps=1"))
    assert more["warm_start"] == summary["warm_start"] and more["policy"] == str(model_dir)
    # started again: the finished warm start is kept
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    prompt_opt.train(cfg)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_iterate_two_rounds_each_from_the_last_and_resumable_by_round(tmp_path, capsys):
    from diffusion_pref import cli

    args = ["prompt-opt", "iterate", f"output.dir={tmp_path}", "prompt_opt.rounds=2", "train.max_steps=2",
            "prompt_opt.k=2", "prompt_opt.embedder=none"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "iterate.json").read_text())
    assert summary["rounds"] == 2 and summary["adapter"] == str(tmp_path / "round_2")
    one = json.loads((tmp_path / "round_1" / "round.json").read_text())
    two = json.loads((tmp_path / "round_2" / "round.json").read_text())
    assert one["trained_from"] == {"policy": "toy", "adapter": None} and one["seed"] + 1 == two["seed"]
    assert two["trained_from"]["adapter"] == str(tmp_path / "round_1")  # round 2 samples and trains from round 1
    assert two["pairs"]["pairs_written"] > 0 and two["train"]["steps"] == 2
    first, second = adapter_weights(tmp_path / "round_1"), adapter_weights(tmp_path / "round_2")
    assert first.keys() == second.keys() and not all(torch.equal(first[k], second[k]) for k in first)
    # round 2 cut short: started again, round 1 is kept and round 2 is redone from it, to the same weights
    stamp = (tmp_path / "round_1" / "adapter_model.safetensors").stat().st_mtime_ns
    (tmp_path / "round_2" / "round.json").unlink()
    (tmp_path / "round_2" / "adapter_model.safetensors").unlink()
    assert cli.main(args) == 0
    assert (tmp_path / "round_1" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    again = adapter_weights(tmp_path / "round_2")
    assert all(torch.equal(second[k], again[k]) for k in second)


class FakeImages(list):
    blocked = ()


class FakeBackbone:
    """Draws a solid image whose brightness is the prompt's length (so rewrites and originals differ)."""

    def sample(self, prompts, seeds, **kwargs):
        from PIL import Image

        out = FakeImages(Image.new("RGB", (16, 16), (min(255, 4 * len(p)), seed % 256, 0))
                         for p, seed in zip(prompts, seeds))
        out.blocked = [False] * len(out)
        return out


class FakeImageReward:
    name = "red"

    def score(self, prompts, images):
        return torch.tensor([img.getpixel((0, 0))[0] / 255 for img in images], dtype=torch.float64)


def test_evaluate_report_has_a_row_per_example_with_both_images(tmp_path):
    import html
    import re

    from PIL import Image

    from diffusion_pref.config import load_config
    from diffusion_pref.prompt_opt.evaluate import evaluate_rewrites
    from diffusion_pref.prompt_opt.train import load_policy

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    policy = load_policy(cfg, train=False)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    metrics = evaluate_rewrites(prompts, tmp_path / "img", policy, FakeImageReward(), backbone=FakeBackbone(), k=2,
                                max_new_tokens=8, bootstrap_samples=20, examples=2)
    page = (tmp_path / "img" / "report.html").read_text()
    rows = re.findall(r'<tr class="example">(.*?)</tr>', page, flags=re.DOTALL)
    assert len(rows) == 2 == len(metrics["examples"])
    for row, example in zip(rows, metrics["examples"]):
        assert row.count("<img ") == 2
        assert html.escape(example["prompt"]) in row and html.escape(example["rewrite"]) in row
        # the saved images are the ones the reward scored: the original's brightness is its length
        original = Image.open(tmp_path / "img" / example["image_original"]).getpixel((0, 0))[0]
        assert original / 255 == pytest.approx(example["score_original"])
        rewrite = Image.open(tmp_path / "img" / example["image_rewrite"]).getpixel((0, 0))[0]
        assert rewrite / 255 == pytest.approx(example["score_rewrite"])
    assert 'id="metrics"' in page and "reward_rewrite" in page and "win_rate" in page
    # text-side reward (the shapes world): the same rows, text only
    from diffusion_pref.toy.rewriter import ToyRewriteReward

    evaluate_rewrites(prompts, tmp_path / "txt", policy, ToyRewriteReward(), k=2, max_new_tokens=8,
                      bootstrap_samples=20, examples=3)
    page = (tmp_path / "txt" / "report.html").read_text()
    rows = re.findall(r'<tr class="example">(.*?)</tr>', page, flags=re.DOTALL)
    assert len(rows) == 3 and "<img " not in page and not (tmp_path / "txt" / "images").exists()


def test_iterate_with_a_warm_start_runs_it_once_and_evaluate_finds_its_base(tmp_path):
    from diffusion_pref import cli

    args = ["prompt-opt", "iterate", f"output.dir={tmp_path}", "prompt_opt.rounds=2", "train.max_steps=1",
            "prompt_opt.k=2", "prompt_opt.embedder=none", "prompt_opt.sft_steps=1"]
    assert cli.main(args) == 0
    sft = str(tmp_path / "round_1" / "sft" / "model")
    two = json.loads((tmp_path / "round_2" / "round.json").read_text())
    assert two["trained_from"] == {"policy": sft, "adapter": str(tmp_path / "round_1")}
    assert not (tmp_path / "round_2" / "sft").exists()
    assert two["train"]["warm_start"]["model"] == sft and two["policy"] == sft
    code = cli.main(["prompt-opt", "evaluate", f"output.dir={tmp_path / 'eval'}", "prompt_opt.k=1",
                     "prompt_opt.embedder=none", f"prompt_opt.adapter={tmp_path / 'round_2'}",
                     "eval.bootstrap_samples=10"])
    assert code == 0 and (tmp_path / "eval" / "eval" / "report.html").is_file()

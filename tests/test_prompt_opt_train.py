"""prompt-opt train / evaluate / the command: the LM through the shared training loop, Sem-DPO's weight, LoRA files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_pref.config import ConfigError, load_config

PAIRS = [
    {"prompt": "a photo of a cat", "chosen": " on a blue sofa", "rejected": " dog", "similarity": 0.9},
    {"prompt": "red car", "chosen": " in the rain at night", "rejected": " painting of the city", "similarity": 0.5},
    {"prompt": "the dog in the city", "chosen": " at night", "rejected": " with a man", "similarity": 0.2},
    {"prompt": "a house", "chosen": " by the lake", "rejected": " cat", "similarity": 0.7},
]


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_config(tmp_path, model_dir, pairs, *overrides):
    return load_config(None, [
        f"prompt_opt.policy={model_dir}", f"prompt_opt.pairs={pairs}", "prompt_opt.mode=train", "runtime.device=cpu",
        "train.batch_size=2", "train.max_steps=3", "train.learning_rate=0.05", "train.logger=none",
        "train.checkpoint_every=0", "train.lr_scheduler=constant", "model.lora_rank=4",
        f"output.dir={tmp_path / 'run'}", *overrides])


def train(cfg, pairs=None):
    from diffusion_pref.prompt_opt.train import LMTrainer

    trainer = LMTrainer(cfg, pairs_path=pairs)
    summary = trainer.train()
    return trainer, summary


def lora_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.module.named_parameters() if v.requires_grad}


def test_a_short_run_changes_the_policy_and_not_the_reference(tiny_causal_lm_dir, tmp_path):
    from diffusion_pref.prompt_opt.pairs import collate_pairs
    from diffusion_pref.prompt_opt.train import LMTrainer

    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    trainer = LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, pairs))
    batch = collate_pairs(trainer.policy.tokenizer, PAIRS)
    before_policy = trainer.policy.log_likelihoods(batch)
    before_ref = trainer.policy.log_likelihoods(batch, reference=True)
    assert torch.equal(before_policy[0].detach(), before_ref[0])  # LoRA B starts at zero: policy == reference
    summary = trainer.train()
    after_policy = trainer.policy.log_likelihoods(batch)
    after_ref = trainer.policy.log_likelihoods(batch, reference=True)
    assert not torch.allclose(after_policy[0], before_policy[0])
    assert torch.equal(after_ref[0], before_ref[0]) and torch.equal(after_ref[1], before_ref[1])
    # DPO raised the chosen side relative to the rejected one
    margin = lambda w, l, rw, rl: ((w - rw) - (l - rl)).mean().item()
    assert margin(*after_policy, *after_ref) > 0
    assert summary["steps"] == 3 and summary["output"] == "lora" and summary["alpha"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    assert {"nll_w", "nll_l", "ref_nll_w", "ref_nll_l"} <= set(rows[0])


def test_lora_saves_and_loads_with_peft(tiny_causal_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from diffusion_pref.prompt_opt.logprobs import completion_logprobs
    from diffusion_pref.prompt_opt.pairs import collate_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    trainer, _ = train(lm_config(tmp_path, tiny_causal_lm_dir, pairs))
    out = tmp_path / "run"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), str(out)).eval()
    batch = collate_pairs(trainer.policy.tokenizer, PAIRS)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        got = completion_logprobs(loaded, inputs)
        want = torch.cat(trainer.policy.log_likelihoods(batch))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert json.loads((out / "train_summary.json").read_text())["policy"] == str(tiny_causal_lm_dir)


def test_alpha_zero_equals_dpo_exactly_and_alpha_weights_reach_the_loss(tiny_causal_lm_dir, tmp_path):
    plain = write_pairs(tmp_path / "plain.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in PAIRS])
    ones = write_pairs(tmp_path / "ones.jsonl", [{**r, "weight": 1.0} for r in PAIRS])
    with_sim = write_pairs(tmp_path / "sim.jsonl", PAIRS)
    runs = {}
    for name, path, alpha in (("dpo", plain, 0), ("alpha0", with_sim, 0), ("ones", ones, 0), ("sem", with_sim, 3)):
        cfg = lm_config(tmp_path / name, tiny_causal_lm_dir, path, f"prompt_opt.alpha={alpha}")
        runs[name] = train(cfg)
    dpo = lora_state(runs["dpo"][0])
    for name in ("alpha0", "ones"):  # no weight, and weight 1 through LOSSES[...](weight=): the same bits
        other = lora_state(runs[name][0])
        assert all(torch.equal(dpo[k], other[k]) for k in dpo), name
    sem = lora_state(runs["sem"][0])
    assert not all(torch.equal(dpo[k], sem[k]) for k in dpo)
    # Sem-DPO's weight exp(-alpha (1 - s)) per pair, as the loss saw it: its mean over the first batch
    first = json.loads((tmp_path / "sem" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    order = runs["sem"][0].source.order(0)[:2]
    want = sum(math.exp(-3 * (1 - PAIRS[i]["similarity"])) for i in order) / 2
    assert first["weight_mean"] == pytest.approx(want, rel=1e-6)


def test_full_finetune_keeps_a_frozen_reference(tiny_causal_lm_dir, tmp_path):
    from diffusion_pref.prompt_opt.pairs import collate_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    trainer, summary = train(lm_config(tmp_path, tiny_causal_lm_dir, pairs, "model.finetune=full",
                                       "train.learning_rate=0.001"))
    batch = collate_pairs(trainer.policy.tokenizer, PAIRS)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    ref = trainer.policy.reference_module
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))
    assert summary["output"] == "full" and (tmp_path / "run" / "model.safetensors").is_file()
    w, _ = trainer.policy.log_likelihoods(batch)
    rw, _ = trainer.policy.log_likelihoods(batch, reference=True)
    assert not torch.allclose(w, rw)


def test_bad_pair_file_names_the_row_through_the_command(tiny_causal_lm_dir, tmp_path, capsys):
    from diffusion_pref import cli

    bad = write_pairs(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "x", "chosen": "", "rejected": "y"}])
    code = cli.main(["prompt-opt", "train", f"prompt_opt.policy={tiny_causal_lm_dir}", f"prompt_opt.pairs={bad}",
                     f"output.dir={tmp_path / 'run'}", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 1 and "bad.jsonl: row 1: 'chosen' is empty" in err


def test_config_rules():
    with pytest.raises(ConfigError, match="prompt_opt.mode"):
        load_config(None, ["prompt_opt.mode=tune"])
    with pytest.raises(ConfigError, match="prompt_opt.embedder"):
        load_config(None, ["prompt_opt.alpha=1", "prompt_opt.embedder=none"])
    with pytest.raises(ConfigError, match="prompt_opt.alpha"):
        load_config(None, ["prompt_opt.alpha=-1"])
    with pytest.raises(ConfigError, match="prompt_opt.prompts"):
        load_config(None, ["prompt_opt.mode=generate", "prompt_opt.policy=gpt2", "prompt_opt.reward=images"])
    with pytest.raises(ConfigError, match="toy-rewrite"):
        load_config(None, ["prompt_opt.mode=evaluate", "prompt_opt.policy=gpt2", "prompt_opt.eval_prompts=p.txt"])


def test_cli_mode_is_the_first_argument():
    from diffusion_pref import cli

    parser = cli.build_parser()
    args = parser.parse_args(["prompt-opt", "evaluate", "prompt_opt.k=2"])
    assert cli._flag_overrides(cli.COMMANDS["prompt-opt"], args) == ["prompt_opt.mode=evaluate"]
    args = parser.parse_args(["prompt-opt", "prompt_opt.k=2", "prompt_opt.alpha=1"])  # the config's mode
    assert cli._flag_overrides(cli.COMMANDS["prompt-opt"], args) == ["prompt_opt.k=2"]
    with pytest.raises(ConfigError, match="not a mode"):
        cli._flag_overrides(cli.COMMANDS["prompt-opt"], parser.parse_args(["prompt-opt", "tune"]))


def test_interval_metrics_by_hand():
    from diffusion_pref.prompt_opt.evaluate import interval_metrics

    rows = [
        {"prompt_index": 0, "score_original": 0.5, "score_rewrite": 0.7, "similarity": 0.9, "drift": 0.0},
        {"prompt_index": 0, "score_original": 0.5, "score_rewrite": 0.5, "similarity": 0.6, "drift": 1.0},
        {"prompt_index": 1, "score_original": 0.8, "score_rewrite": 0.2, "similarity": 0.95, "drift": 0.0},
        {"prompt_index": 1, "score_original": 0.8, "score_rewrite": 0.9, "similarity": 0.85, "drift": 0.0},
    ]
    m = interval_metrics(rows, bootstrap_samples=200, bootstrap_seed=0)
    assert m["reward_original"]["mean"] == pytest.approx((0.5 + 0.8) / 2)
    assert m["reward_rewrite"]["mean"] == pytest.approx((0.7 + 0.5 + 0.2 + 0.9) / 4)
    assert m["win_rate"]["mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a tie counts half
    assert m["drift_rate"]["mean"] == pytest.approx(0.25)
    assert m["similarity"]["mean"] == pytest.approx((0.9 + 0.6 + 0.95 + 0.85) / 4)
    # two prompts: the bootstrap resamples {0,0}, {0,1}, {1,1}; the interval lies within the extremes
    assert 0.2 <= m["reward_rewrite"]["ci_low"] <= m["reward_rewrite"]["ci_high"] <= 0.6 + 1e-12
    assert m["prompts"] == 2 and m["rewrites"] == 4


def test_toy_evaluate_and_generate_through_the_command(tmp_path):
    from diffusion_pref.commands import prompt_opt

    cfg = load_config(None, ["prompt_opt.embedder=none", "prompt_opt.k=2", f"output.dir={tmp_path}",
                             "eval.bootstrap_samples=50"], defaults=None)
    metrics = prompt_opt.evaluate(cfg)
    assert metrics["prompts"] == 10 and metrics["rewrites"] == 20 and "drift_rate_exact" in metrics
    rows = [json.loads(line) for line in (tmp_path / "eval" / "rewrites.jsonl").read_text().splitlines()]
    from diffusion_pref.toy.rewriter import ToyRewriteReward, drift

    reward = ToyRewriteReward()
    for row in rows:
        assert row["score_rewrite"] == pytest.approx(reward.one(row["prompt"], row["rewrite"]))
        assert row["score_original"] == pytest.approx(reward.one(row["prompt"], row["prompt"]))
        assert row["drift_exact"] == float(drift(row["prompt"], row["rewrite"]))


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tiny_causal_lm_dir, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    args = ("train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    whole, _ = train(lm_config(tmp_path, tiny_causal_lm_dir, pairs, *args))
    final = lora_state(whole)
    from diffusion_pref.prompt_opt.train import LMTrainer

    resumed = LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, pairs, *args, "train.resume=latest"))
    assert (resumed.step, resumed.epoch, resumed.next_index) == (2, 0, 2)  # 4 pairs, batch 2: epoch 0 done
    assert not all(torch.equal(final[k], v) for k, v in lora_state(resumed).items())  # step 2's weights
    assert resumed.train()["steps"] == 4
    again = lora_state(resumed)
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_quickstart_command_writes_the_dpo_and_sem_dpo_table(tmp_path, capsys):
    from diffusion_pref import cli

    code = cli.main(["prompt-opt", "quickstart", f"output.dir={tmp_path}", "train.max_steps=2", "prompt_opt.k=2",
                     "eval.bootstrap_samples=20",
                     "prompt_opt.embedder=clip"])  # the toy model's own text encoder: no semantic extra needed
    assert code == 0
    summary = json.loads((tmp_path / "quickstart.json").read_text())
    assert set(summary["table"]) == {"base", "dpo", "sem_dpo"} and summary["alpha"] == 16.0
    assert set(summary["sem_dpo_minus_dpo"]) == {"score_rewrite", "similarity", "drift_exact"}
    assert json.loads((tmp_path / "sem_dpo" / "train_summary.json").read_text())["alpha"] == 16.0
    assert "| sem_dpo |" in capsys.readouterr().out

"""Every loss of LOSSES trains the LM through the shared loop; smpo / sppo get SmPO's p from the pair scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_prompt_opt_train import PAIRS, lm_config, lora_state, write_pairs

from diffusion_pref.losses import LOSSES, REFERENCE_FREE

SCORES = [(0.9, 0.1), (0.6, 0.5), (0.4, 0.7), (0.8, 0.2)]  # the third pair's reward disagrees with its order
SCORED = [{**r, "score_chosen": w, "score_rejected": l} for r, (w, l) in zip(PAIRS, SCORES)]


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_the_lm_and_leaves_the_reference(loss, tiny_causal_lm_dir, tmp_path):
    from diffusion_pref.prompt_opt.pairs import collate_pairs
    from diffusion_pref.prompt_opt.train import LMTrainer

    pairs = write_pairs(tmp_path / "pairs.jsonl", SCORED)
    trainer = LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, pairs, f"loss.name={loss}", "train.max_steps=2"))
    batch = collate_pairs(trainer.policy.tokenizer, SCORED)
    before = lora_state(trainer)
    ref_before = trainer.policy.log_likelihoods(batch, reference=True)
    summary = trainer.train()
    after = lora_state(trainer)
    assert not all(torch.equal(before[k], after[k]) for k in before), loss
    ref_after = trainer.policy.log_likelihoods(batch, reference=True)
    assert all(torch.equal(a, b) for a, b in zip(ref_before, ref_after))
    assert summary["steps"] == 2
    assert summary["reference"] == ("none" if loss in REFERENCE_FREE else "adapter")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_soft_labels_are_smpos_p_from_the_pair_scores(tiny_causal_lm_dir, tmp_path):
    from diffusion_pref.prompt_opt.train import LMTrainer

    pairs = write_pairs(tmp_path / "pairs.jsonl", SCORED)
    trainer = LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, pairs, "loss.name=smpo", "train.max_steps=1"))
    low, high = 0.1, 0.9  # min and max over both sides of every pair
    want = [1 / (1 + math.exp(-(w - l) / (high - low))) for w, l in SCORES]
    got = trainer.soft_labels.lookup(torch.arange(4)).tolist()
    assert got == pytest.approx(want, rel=1e-6)
    assert got[2] < 0.5  # the reward disagrees with the pair's order
    summary = trainer.train()
    assert summary["soft_labels"]["pairs"] == 4 and summary["soft_labels"]["p_mean"] == pytest.approx(sum(want) / 4)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    order = trainer.source.order(0)[:2]
    assert first["soft_label_mean"] == pytest.approx(sum(want[i] for i in order) / 2, rel=1e-6)
    assert (tmp_path / "run" / "soft_labels.parquet").is_file()
    # winner=human: p = sigmoid(|gap|); a fixed range in the scores' units
    human = LMTrainer(lm_config(tmp_path / "h", tiny_causal_lm_dir, pairs, "loss.name=sppo",
                                "loss.soft_label_winner=human", "loss.soft_label_range=[0,1]"))
    want = [1 / (1 + math.exp(-abs(w - l))) for w, l in SCORES]
    assert human.soft_labels.lookup(torch.arange(4)).tolist() == pytest.approx(want, rel=1e-6)


def test_soft_labels_without_scores_name_the_column_and_the_row(tiny_causal_lm_dir, tmp_path):
    from diffusion_pref.config import ConfigError
    from diffusion_pref.prompt_opt.train import LMTrainer

    plain = write_pairs(tmp_path / "plain.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="loss.name=smpo: .*plain.jsonl: soft labels need the 'score_chosen'"):
        LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, plain, "loss.name=smpo"))
    gap = write_pairs(tmp_path / "gap.jsonl", [SCORED[0], {**SCORED[1], "score_rejected": None}])
    with pytest.raises(ConfigError, match="pair 1 .*'score_rejected' is nan"):
        LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, gap, "loss.name=sppo"))
    # data.soft_labels=label: p = 1 for every pair, no scores needed
    hard = LMTrainer(lm_config(tmp_path, tiny_causal_lm_dir, plain, "loss.name=smpo", "data.soft_labels=label"))
    assert hard.soft_labels.lookup(torch.arange(4)).tolist() == [1.0] * 4

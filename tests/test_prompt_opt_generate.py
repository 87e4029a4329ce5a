"""prompt-opt generate's pieces: rewrites scored against the original prompt, pairs written, resumed after a kill."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from diffusion_pref.prompt_opt.generate import (
    RewriteSettings,
    generate_pairs,
    read_done,
)
from diffusion_pref.prompt_opt.model import CausalLMPolicy
from diffusion_pref.prompt_opt.pairs import read_pairs
from diffusion_pref.toy.render import eval_prompts
from diffusion_pref.toy.rewriter import WEIGHTS, ToyRewriteReward

PROMPTS = eval_prompts()[:5]


@pytest.fixture(scope="module")
def policy():
    return CausalLMPolicy.load(WEIGHTS, with_reference=False)


def rows_of(folder):
    rows = [r for path in sorted(folder.glob("pairs-*.parquet")) for r in pq.read_table(path).to_pylist()]
    # NaN (no embedder: no similarity) != NaN; compare it as None
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    return sorted(rows, key=lambda r: r["prompt_index"])


class Dies:
    """The policy, killed (an exception) when asked for its ``n``-th prompt."""

    def __init__(self, policy, n):
        self.policy, self.n, self.calls, self.name = policy, n, 0, policy.name

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt("killed")
        return self.policy.sample(*args, **kwargs)


def test_text_side_pairs_are_best_vs_worst_against_the_original(tmp_path, policy):
    reward = ToyRewriteReward()
    summary = generate_pairs(PROMPTS, tmp_path, policy, reward, settings=RewriteSettings(k=4, seed=3))
    rows = rows_of(tmp_path)
    assert summary["prompts_done"] == 5 and summary["pairs_written"] == len(rows) >= 4
    for row in rows:
        candidates = json.loads(row["candidates"])
        assert candidates[0][0] == row["prompt"] and len(candidates) == 5  # the original, then 4 rewrites
        scores = [s for _, s in candidates]
        assert row["score_chosen"] == max(scores) > row["score_rejected"] == min(scores)
        # every score is against the ORIGINAL prompt
        assert row["score_chosen"] == pytest.approx(reward.one(row["prompt"], row["chosen"]))
        assert row["score_original"] == pytest.approx(reward.one(row["prompt"], row["prompt"]))
    # the written folder is a pair file the trainer reads
    assert len(read_pairs(tmp_path, tokenizer=policy.tokenizer, max_length=policy.context_length)) == len(rows)
    assert set(pq.read_schema(next(tmp_path.glob("pairs-*.parquet"))).names) >= {
        "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "similarity"}


def test_resumes_after_a_kill_with_every_prompt_done_once(tmp_path, policy):
    settings = RewriteSettings(k=3, seed=1, flush_every_prompts=2)
    reward = ToyRewriteReward()
    generate_pairs(PROMPTS, tmp_path / "whole", policy, reward, settings=settings)

    with pytest.raises(KeyboardInterrupt):
        generate_pairs(PROMPTS, tmp_path / "killed", Dies(policy, 4), reward, settings=settings)
    assert sorted(i for m in read_done(tmp_path / "killed").values() for i in m["prompt_indices"]) == [0, 1]
    again = Dies(policy, 0)
    summary = generate_pairs(PROMPTS, tmp_path / "killed", again, reward, settings=settings)
    assert again.calls == 3  # prompts 2, 3, 4 only
    assert summary["prompts_done"] == 5
    assert rows_of(tmp_path / "killed") == rows_of(tmp_path / "whole")
    assert generate_pairs(PROMPTS, tmp_path / "killed", Dies(policy, 1), reward, settings=settings)["prompts_done"] == 5

    with pytest.raises(ValueError, match=r"written with other settings \(k\)"):
        generate_pairs(PROMPTS, tmp_path / "killed", policy, reward, settings=RewriteSettings(k=2, seed=1))


def test_image_backbone_renders_rewrites_and_scores_against_the_original(tmp_path, policy):
    from diffusion_pref.config import ModelConfig
    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.toy.rewards import ToyFidelity

    class Recording(ToyFidelity):
        def __init__(self):
            super().__init__()
            self.seen = []

        def score(self, prompts, media):
            self.seen.extend(prompts)
            return super().score(prompts, media)

    backbone = load_backbone(ModelConfig(pretrained="toy"))
    reward = Recording()
    settings = RewriteSettings(k=2, seed=0, image_seeds=2, steps=2)
    summary = generate_pairs(PROMPTS[:2], tmp_path, policy, reward, backbone=backbone, settings=settings,
                             embed=_bag_of_words)
    assert reward.seen == [PROMPTS[0]] * 6 + [PROMPTS[1]] * 6  # 3 candidates x 2 seeds, all against the original
    rows = rows_of(tmp_path)
    assert summary["prompts_done"] == 2 and len(rows) == summary["pairs_written"]
    for row in rows:
        assert 0.0 <= row["score_rejected"] < row["score_chosen"] <= 1.0
        assert -1.0 <= row["similarity"] <= 1.0


def _bag_of_words(texts):
    import torch

    vocab = sorted({w for t in texts for w in t.replace(",", "").split()})
    return torch.tensor([[t.replace(",", "").split().count(w) for w in vocab] for t in texts], dtype=torch.float32)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        RewriteSettings(k=0)
    with pytest.raises(ValueError, match="no pair"):
        RewriteSettings(k=1, include_original=False)

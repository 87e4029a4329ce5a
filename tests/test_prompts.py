"""Prompt readers: every layout gives the prompts in file order with their categories; bad files name themselves."""

import json

import pytest

from diffusion_pref.prompts import HPDV2_STYLES, PromptFileError, PromptRecord, read_prompts


def test_text_file_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n\n  a blue dog  \r\nzebra\n", encoding="utf-8")
    assert read_prompts(path) == [PromptRecord("a red cat"), PromptRecord("a blue dog"), PromptRecord("zebra")]


def test_text_file_with_byte_order_mark_and_non_ascii(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffcafé au lait\n東京の夜\n".encode("utf-8"))
    assert [r.prompt for r in read_prompts(path)] == ["café au lait", "東京の夜"]


def test_json_list_of_strings_and_of_objects(tmp_path):
    strings = tmp_path / "list.json"
    strings.write_text(json.dumps(["one", "two"]))
    assert read_prompts(strings) == [PromptRecord("one"), PromptRecord("two")]
    # The ImageReward benchmark layout: objects {id, prompt}; an explicit category key is kept.
    objects = tmp_path / "benchmark-prompts.json"
    objects.write_text(json.dumps([{"id": "7", "prompt": "a castle"}, {"id": "8", "prompt": "a moat", "category": "x"}]))
    assert read_prompts(objects) == [PromptRecord("a castle"), PromptRecord("a moat", "x")]
    other_key = tmp_path / "other.json"
    other_key.write_text(json.dumps([{"text_in": "hello"}]))
    assert read_prompts(other_key, column="text_in") == [PromptRecord("hello")]


def test_hpdv2_benchmark_files_get_their_style(tmp_path):
    for style in HPDV2_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} prompt 0", f"{style} prompt 1"]))
    (tmp_path / "drawbench.json").write_text(json.dumps(["not one of the four styles"]))
    records = read_prompts(tmp_path)  # the folder: the four styles in the official order, drawbench left out
    assert [r.category for r in records] == [s for s in HPDV2_STYLES for _ in range(2)]
    assert records[2] == PromptRecord("concept-art prompt 0", "concept-art")
    assert read_prompts(tmp_path / "photo.json")[1] == PromptRecord("photo prompt 1", "photo")
    assert read_prompts(tmp_path / "drawbench.json") == [PromptRecord("not one of the four styles", "drawbench")]


def test_partiprompts_tsv_keeps_category_and_quotes(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\t\n"
        'a sign that says "Hello World\tWorld Knowledge\tWriting & Symbols\tunbalanced quote\n'
        "an owl\tAnimals\tBasic\t\n",
        encoding="utf-8",
    )
    assert read_prompts(path) == [
        PromptRecord("bond", "Abstract"),
        PromptRecord('a sign that says "Hello World', "World Knowledge"),
        PromptRecord("an owl", "Animals"),
    ]


def test_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    assert [r.prompt for r in read_prompts(csv_path)] == ["a cat, sitting", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "category": "c"}\n\n{"prompt": "y"}\n')
    assert read_prompts(jsonl) == [PromptRecord("x", "c"), PromptRecord("y")]


def _write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_column_default_and_explicit_and_folder(tmp_path):
    _write_parquet(tmp_path / "a.parquet", {"caption": ["c0", "c1"], "other": ["o0", "o1"], "category": ["k", None]})
    assert read_prompts(tmp_path / "a.parquet") == [PromptRecord("c0", "k"), PromptRecord("c1")]
    assert [r.prompt for r in read_prompts(tmp_path / "a.parquet", column="other")] == ["o0", "o1"]
    _write_parquet(tmp_path / "b.parquet", {"caption": ["c2"], "other": ["o2"], "category": ["m"]})
    assert [r.prompt for r in read_prompts(tmp_path)] == ["c0", "c1", "c2"]  # shards in name order


def test_empty_files_are_errors_naming_the_file(tmp_path):
    for name, content in [("e.txt", ""), ("blank.txt", "\n  \n"), ("e.json", "[]"), ("e.tsv", "Prompt\tCategory\n")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(PromptFileError, match=f"{name} holds no prompts"):
            read_prompts(path)


def test_not_utf8_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"latin1.txt is not UTF-8 .*byte 0xe9 .*line 2.*re-save it as UTF-8"):
        read_prompts(path)


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "p.parquet"
    _write_parquet(path, {"title": ["x"], "score": [1.0]})
    with pytest.raises(PromptFileError, match=r"p.parquet has none of the prompt columns .*columns: title, score.*prompt_column"):
        read_prompts(path)
    with pytest.raises(PromptFileError, match=r"p.parquet has no column 'caption' \(columns: title, score\)"):
        read_prompts(path, column="caption")
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\nx\ty\n")
    with pytest.raises(PromptFileError, match=r"p.tsv has no column 'text'"):
        read_prompts(tsv, column="text")


def test_bad_rows_and_files_name_where(tmp_path):
    path = tmp_path / "p.parquet"
    _write_parquet(path, {"prompt": ["ok", None]})
    with pytest.raises(PromptFileError, match=r"p.parquet row 1: the prompt is NoneType"):
        read_prompts(path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('["a", ')
    with pytest.raises(PromptFileError, match="bad.json is not valid JSON"):
        read_prompts(bad_json)
    wrong_shape = tmp_path / "dict.json"
    wrong_shape.write_text('{"prompts": ["a"]}')
    with pytest.raises(PromptFileError, match="dict.json holds a JSON dict; expected a list"):
        read_prompts(wrong_shape)
    with pytest.raises(PromptFileError, match="missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.xlsx").write_bytes(b"x")
    with pytest.raises(PromptFileError, match=r"unknown prompt file type '.xlsx'"):
        read_prompts(tmp_path / "p.xlsx")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(PromptFileError, match="empty-folder holds neither the HPDv2 benchmark files"):
        read_prompts(tmp_path / "empty-folder")


def test_unreachable_hub_dataset_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptFileError, match=r"'nobody/no-such-prompts' is not a local file or folder.*split 'test'"):
        read_prompts("nobody/no-such-prompts", split="test")


def test_named_toy_sets_have_the_shape_as_category():
    from diffusion_pref.toy.render import eval_prompts, train_captions

    held_out, train = read_prompts("toy"), read_prompts("toy-train")
    assert [r.prompt for r in held_out] == eval_prompts() and [r.prompt for r in train] == train_captions()
    assert not {r.prompt for r in held_out} & {r.prompt for r in train}
    assert all(r.category in r.prompt.split() and r.category in ("circle", "square", "triangle") for r in held_out + train)


def test_a_name_close_to_a_named_set_is_suggested(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptFileError, match=r"'toyy' is not a local file or folder, nor a named prompt set "
                                              r"\(did you mean 'toy'\?\), and loading it as hub dataset"):
        read_prompts("toyy")


def test_a_registered_prompt_set_reads_by_name(monkeypatch):
    from diffusion_pref import prompts

    monkeypatch.setitem(prompts.PROMPT_SETS, "two", lambda: [PromptRecord("a", None), PromptRecord("b", "x")])
    assert read_prompts("two") == [PromptRecord("a", None), PromptRecord("b", "x")]

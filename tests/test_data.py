"""Preference-pair reading, filtering, validation errors and paired augmentation (diffusion_pref.data)."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest

from diffusion_pref.config import load_config


def image_bytes(color, size=(40, 32), fmt="PNG", pattern=False) -> bytes:
    """Encoded RGB image of one colour; ``pattern`` puts a bright square in the top-left corner (to see flips)."""
    from PIL import Image

    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = color
    if pattern:
        array[: size[1] // 4, : size[0] // 4] = 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_pairs(path, n=8, labels=None, captions=None, scores=None, row_group_size=None, columns=None, bad_rows=(),
                size=(40, 32)):
    """A small Pick-a-Pic-layout parquet: caption, jpg_0, jpg_1, label_0 (+ score_0/score_1). Returns the path.

    Image 0 of row i is dark (value 10*i), image 1 bright (200 - 10*i), alternating PNG and JPEG;
    ``bad_rows`` get undecodable bytes in jpg_1; ``columns`` renames columns (ours -> theirs).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [1.0 if i % 2 == 0 else 0.0 for i in range(n)] if labels is None else labels
    captions = [f"a red cat {i}" for i in range(n)] if captions is None else captions
    data = {
        "caption": captions,
        "jpg_0": [image_bytes((10 * i % 256, 0, 0), size, "PNG" if i % 2 else "JPEG", pattern=True) for i in range(n)],
        "jpg_1": [b"not an image" if i in bad_rows else image_bytes((200 - 10 * i % 200, 50, 50), size, pattern=True)
                  for i in range(n)],
        "label_0": [float(x) for x in labels],
    }
    if scores is not None:
        data["score_0"] = [float(s[0]) for s in scores]
        data["score_1"] = [float(s[1]) for s in scores]
    columns = columns or {}
    table = pa.table({columns.get(k, k): v for k, v in data.items()})
    pq.write_table(table, str(path), row_group_size=row_group_size or n)
    return path


def data_cfg(source, *overrides):
    return load_config(None, [f"data.source={source}", *overrides]).data


def all_pairs(source):
    from diffusion_pref.data.pairs import PairSource

    src = source if isinstance(source, PairSource) else source
    return src.read(src.order(0))


def test_winner_first_and_ties_dropped_with_count(tmp_path):
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=6, labels=[1.0, 0.0, 0.5, 1.0, 0.5, 0.0])
    src = PairSource(data_cfg(path, "data.shuffle=false"))
    assert len(src) == 4 and src.stats.ties_dropped == 2
    assert "dropped 2 ties" in src.summary()
    pairs, skipped = src.read(src.order(0))
    assert skipped == 0
    assert [p.row for p in pairs] == [0, 1, 3, 5]
    for p in pairs:
        # label 1 -> image 0 (dark) wins; label 0 -> image 1 (bright) wins, so the pair is swapped.
        w_val, l_val = p.image_w.getpixel((20, 20))[0], p.image_l.getpixel((20, 20))[0]
        label = [1.0, 0.0, 0.5, 1.0, 0.5, 0.0][p.row]
        dark, bright = (10 * p.row, 200 - 10 * p.row)
        assert abs(w_val - (dark if label == 1.0 else bright)) <= 3
        assert abs(l_val - (bright if label == 1.0 else dark)) <= 3
        assert p.soft_label == 1.0


def test_soft_ties_kept_with_half_label(tmp_path):
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=4, labels=[0.5, 0.8, 0.5, 0.3])
    src = PairSource(data_cfg(path, "data.ties=soft", "data.shuffle=false"))
    pairs, _ = src.read(src.order(0))
    assert [p.soft_label for p in pairs] == [0.5, 0.8, 0.5, pytest.approx(0.7)]


def test_scores_follow_the_swap(tmp_path):
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=2, labels=[1.0, 0.0], scores=[(0.9, 0.1), (0.2, 0.7)])
    src = PairSource(data_cfg(path, "data.shuffle=false"))
    pairs, _ = src.read(src.order(0))
    assert [(p.score_w, p.score_l) for p in pairs] == [(0.9, 0.1), (0.7, 0.2)]


def test_column_mapping(tmp_path):
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=3, columns={"caption": "prompt", "label_0": "pref"})
    src = PairSource(data_cfg(path, "data.columns.caption=prompt", "data.columns.label_0=pref"))
    pairs, _ = src.read(src.order(0))
    assert sorted(p.caption for p in pairs) == ["a red cat 0", "a red cat 1", "a red cat 2"]


def test_missing_columns_are_named_with_the_mapping_to_set(tmp_path):
    from diffusion_pref.data.pairs import DataError, PairSource

    path = write_pairs(tmp_path / "p.parquet", n=3, columns={"caption": "prompt"})
    with pytest.raises(DataError) as err:
        PairSource(data_cfg(path))
    assert "missing column(s) caption" in str(err.value)
    assert "data.columns.caption=<your column>" in str(err.value)
    assert "prompt" in str(err.value)  # the present columns are listed


def test_undecodable_image_errors_with_row_or_is_counted_when_skipping(tmp_path):
    from diffusion_pref.data.pairs import DataError, PairSource

    path = write_pairs(tmp_path / "p.parquet", n=4, bad_rows=(2,))
    src = PairSource(data_cfg(path, "data.shuffle=false"))
    with pytest.raises(DataError) as err:
        src.read(src.order(0))
    assert "row 2" in str(err.value) and "jpg_1" in str(err.value) and "data.on_bad_row=skip" in str(err.value)
    src = PairSource(data_cfg(path, "data.shuffle=false", "data.on_bad_row=skip"))
    pairs, skipped = src.read(src.order(0))
    assert skipped == 1 and [p.row for p in pairs] == [0, 1, 3]


def test_nan_scores_and_empty_dataset_are_clear_errors(tmp_path):
    from diffusion_pref.data.pairs import DataError, PairSource

    path = write_pairs(tmp_path / "nan.parquet", n=3, scores=[(1.0, 0.0), (math.nan, 0.0), (0.5, 0.1)])
    with pytest.raises(DataError, match=r"row 1 .*score is NaN"):
        PairSource(data_cfg(path))
    src = PairSource(data_cfg(path, "data.on_bad_row=skip"))
    assert len(src) == 2 and src.stats.bad_labels_skipped == 1

    ties = write_pairs(tmp_path / "ties.parquet", n=3, labels=[0.5, 0.5, 0.5])
    with pytest.raises(DataError, match=r"no pairs left after filtering.*dropped 3 ties.*data.ties=soft"):
        PairSource(data_cfg(ties))
    with pytest.raises(DataError, match="does not exist"):
        PairSource(data_cfg(tmp_path / "nope.parquet"))


def test_folder_of_shards_streams_row_groups_in_a_seeded_order(tmp_path):
    from diffusion_pref.data.pairs import PairSource

    folder = tmp_path / "shards"
    folder.mkdir()
    write_pairs(folder / "train-0.parquet", n=6, row_group_size=2)
    write_pairs(folder / "train-1.parquet", n=4, row_group_size=2)
    (folder / ".train-2.parquet").write_bytes(b"partial write of another tool")  # hidden: ignored
    src = PairSource(data_cfg(folder), seed=3)
    assert len(src.blocks) == 5 and len(src) == 10
    order0, order1 = src.order(0), src.order(1)
    assert sorted(order0) == sorted(order1) and order0 != order1
    assert order0 == PairSource(data_cfg(folder), seed=3).order(0)  # reproducible
    # Row-group-major: the two rows of a block are adjacent in the order.
    blocks = [b for b, _ in order0]
    assert all(blocks[i] == blocks[i + 1] for i in range(0, 10, 2))
    pairs, _ = src.read(order0)
    assert sorted(p.row for p in pairs) == list(range(10))


def test_paired_augmentation_flips_and_crops_both_images_alike(tmp_path):
    from diffusion_pref.data.augment import augment_pair
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=16, size=(48, 32))
    src = PairSource(data_cfg(path, "data.shuffle=false"))
    pairs, _ = src.read(src.order(0))
    flips = 0
    for pair in pairs:
        pix_w, pix_l, caption, meta = augment_pair(pair, 16, flip=True, crop=True, caption_dropout=0.5, seed=0)
        assert pix_w.shape == pix_l.shape == (3, 16, 16)
        assert pix_w.min() >= -1 and pix_w.max() <= 1
        # Both images carry the white corner square: it must land in the same place on both.
        assert ((pix_w[1] > 0.9) == (pix_l[1] > 0.9)).all()
        flips += int((pix_w[1, 0, -1] > 0.9).item() and not (pix_w[1, 0, 0] > 0.9).item())
        assert caption in ("", pair.caption)
        assert meta["original_size"] == (32, 48)
        again = augment_pair(pair, 16, flip=True, crop=True, caption_dropout=0.5, seed=0)
        assert (again[0] == pix_w).all() and again[2] == caption  # deterministic per (seed, row)
    assert 0 < flips < 16


def test_caption_dropout_is_one_decision_per_pair(tmp_path):
    from diffusion_pref.data.loader import collate_pixels
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=20)
    cfg = data_cfg(path, "data.caption_dropout=0.5", "data.resolution=16", "data.shuffle=false")
    src = PairSource(cfg)
    batch = collate_pixels(src, cfg, src.order(0), seed=0)
    dropped = sum(c == "" for c in batch["captions"])
    assert 0 < dropped < 20  # one caption per pair: it is dropped for winner and loser together
    assert batch["pixels_w"].shape == (20, 3, 16, 16)


def test_loader_resumes_at_the_same_batch_and_splits_processes(tmp_path):
    from diffusion_pref.data.loader import PairBatches
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=12, row_group_size=4)
    src = PairSource(data_cfg(path), seed=1)
    rows = lambda items: {"rows": [src.blocks[b].rows[i] for b, i in items]}  # noqa: E731
    full = PairBatches(src, rows, batch_size=2)
    it = iter(full)
    seq = [next(it) for _ in range(8)]  # crosses into epoch 1 (6 batches per epoch)
    resumed = PairBatches(src, rows, batch_size=2, start_epoch=0, start_index=4)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(4)] == seq[4:8]
    r0 = PairBatches(src, rows, batch_size=2, rank=0, world=2)
    r1 = PairBatches(src, rows, batch_size=2, rank=1, world=2)
    a, b = iter(r0), iter(r1)
    seen = [x for _ in range(3) for x in next(a)["rows"] + next(b)["rows"]]
    assert sorted(seen) == list(range(12))  # the two processes split an epoch without overlap


def test_loader_workers_return_the_same_batches_in_order(tmp_path):
    from diffusion_pref.data.loader import PairBatches, collate_pixels, make_loader
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=8, row_group_size=4)
    cfg = data_cfg(path, "data.resolution=16")
    src = PairSource(cfg, seed=0)

    def rows_of(num_workers):
        batches = PairBatches(src, lambda items: collate_pixels(src, cfg, items, 0), batch_size=2)
        it = iter(make_loader(batches, num_workers))
        return [next(it)["rows"].tolist() for _ in range(6)]

    assert rows_of(2) == rows_of(0)


def test_hub_dataset_id_streams_its_split_through_the_hub_filesystem(tmp_path, monkeypatch):
    import huggingface_hub
    from fsspec.implementations.local import LocalFileSystem

    from diffusion_pref.data.pairs import DataError, PairSource

    repo = tmp_path / "datasets" / "someone" / "pairs" / "data"
    repo.mkdir(parents=True)
    write_pairs(repo / "train-00000-of-00001.parquet", n=4)
    write_pairs(repo / "validation-00000-of-00001.parquet", n=2)

    class LocalHub(LocalFileSystem):
        """Stands in for HfFileSystem: hub paths 'datasets/<id>/...' under tmp_path, read by byte ranges."""

        def glob(self, pattern, **kw):
            return [str(p.relative_to(tmp_path)) for p in tmp_path.glob(pattern)]

        def open(self, path, mode="rb", **kw):
            return super().open(str(tmp_path / path), mode, **kw)

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", LocalHub)
    src = PairSource(data_cfg("someone/pairs", "data.split=validation"))
    assert len(src) == 2 and src.files == ["datasets/someone/pairs/data/validation-00000-of-00001.parquet"]
    pairs, _ = src.read(src.order(0))
    assert sorted(p.caption for p in pairs) == ["a red cat 0", "a red cat 1"]
    with pytest.raises(DataError, match="no parquet files for split 'test'"):
        PairSource(data_cfg("someone/pairs", "data.split=test"))
    monkeypatch.undo()
    with pytest.raises(DataError, match="could not list parquet files of hub dataset 'nobody/nothing'"):
        PairSource(data_cfg("nobody/nothing"))  # offline in tests: a clear message, not a hub traceback


def test_max_pairs_stops_reading_after_enough_kept_pairs(tmp_path):
    from diffusion_pref.data.pairs import PairSource

    path = write_pairs(tmp_path / "p.parquet", n=10, labels=[0.5, 1.0] * 5, row_group_size=2)
    src = PairSource(data_cfg(path, "data.max_pairs=3", "data.shuffle=false"))
    assert len(src) == 3 and [src.blocks[b].rows[i] for b, i in src.order(0)] == [1, 3, 5]
    assert src.stats.rows == 6 and src.stats.ties_dropped == 3  # rows 6.. were never read


# ------------------------------------------------------------------------------ bad input (issue 13, items 1 4 5 10 14 16)


def test_binary_captions_are_decoded_and_undecodable_ones_are_bad_rows(tmp_path):
    from diffusion_pref.data.pairs import DataError, PairSource

    captions = [b"a red cat", "caf\u00e9 au lait".encode(), b"\xff\xfe a", None]
    path = write_pairs(tmp_path / "p.parquet", n=4, labels=[1.0] * 4, captions=captions)
    import pyarrow.parquet as pq

    assert str(pq.read_schema(path).field("caption").type) == "binary"
    with pytest.raises(DataError) as err:  # at the scan, before any model would load
        PairSource(data_cfg(path))
    message = str(err.value)
    assert "row 2 " in message and "caption holds bytes that are not UTF-8" in message
    assert "data.on_bad_row=skip" in message and str(path) in message
    src = PairSource(data_cfg(path, "data.on_bad_row=skip", "data.shuffle=false"))
    assert src.stats.bad_labels_skipped == 1 and "skipped 1 rows" in src.summary()
    pairs, skipped = src.read(src.order(0))
    assert skipped == 0
    assert [(p.row, p.caption) for p in pairs] == [(0, "a red cat"), (1, "caf\u00e9 au lait"), (3, "")]
    # a binary caption column keys the cache apart from caches built when such captions were read as "b'...'"
    plain = PairSource(data_cfg(write_pairs(tmp_path / "s.parquet", n=2, labels=[1.0, 1.0])))
    assert src.identity().get("captions") == "utf-8" and "captions" not in plain.identity()


def test_empty_captions_and_fractional_labels_are_counted_with_one_warning_each(tmp_path, caplog):
    import logging

    from diffusion_pref.data.pairs import PairSource

    labels = [1.0, 0.3, 0.8, 0.0, 1.0, 0.5]
    path = write_pairs(tmp_path / "p.parquet", n=6, labels=labels, captions=["", None, "  ", "ok", "fine", ""])
    with caplog.at_level(logging.WARNING, logger="diffusion_pref.data.pairs"):
        src = PairSource(data_cfg(path, "data.shuffle=false"))
    # the tie (row 5) is dropped before counting; rows 0, 1, 2 have no caption; rows 1 and 2 are fractional
    assert src.stats.empty_captions == 3 and src.stats.fractional_labels == 2
    assert "3 null or empty captions" in src.summary() and "2 fractional labels" in src.summary()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "3 kept pairs have a null or empty caption" in warnings[0]
    assert "2 kept pairs have a fractional label_0" in warnings[1] and "max(label_0, 1 - label_0)" in warnings[1]
    pairs, _ = src.read(src.order(0))
    by_row = {p.row: p for p in pairs}
    assert by_row[1].caption == "" and by_row[3].caption == "ok"
    # 0.3: image 1 (bright, 200 - 10) is the winner with P = 0.7; 0.8: image 0 (dark, 20) wins with P = 0.8
    assert abs(by_row[1].image_w.getpixel((20, 20))[0] - 190) <= 3 and by_row[1].soft_label == pytest.approx(0.7)
    assert abs(by_row[2].image_w.getpixel((20, 20))[0] - 20) <= 3 and by_row[2].soft_label == pytest.approx(0.8)


def test_a_file_that_is_not_parquet_or_is_damaged_is_named(tmp_path):
    from diffusion_pref.data.pairs import DataError, PairSource

    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"caption,label_0\na cat,1\n")
    with pytest.raises(DataError, match=rf"{fake}: could not be read as parquet \(.*magic bytes"):
        PairSource(data_cfg(fake))
    folder = tmp_path / "shards"
    folder.mkdir()
    write_pairs(folder / "a.parquet", n=2)
    (folder / "b.parquet").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=rf"{folder / 'b.parquet'}: could not be read as parquet"):
        PairSource(data_cfg(folder))
    # Damaged data pages: pyarrow raises OSError (not even a ValueError) without the file's name.
    damaged = tmp_path / "damaged.parquet"
    data = bytearray(write_pairs(tmp_path / "good.parquet", n=2).read_bytes())
    data[4:20] = bytes(b ^ 0xFF for b in data[4:20])
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{damaged}: row group 0 could not be read"):
        PairSource(data_cfg(damaged))


def test_nan_scores_stop_only_runs_whose_loss_uses_scores(tmp_path):
    from diffusion_pref.data.pairs import DataError, PairSource, scores_used

    def used(*overrides):
        cfg = load_config(None, list(overrides))
        return scores_used(cfg.loss, cfg.data.soft_labels)

    assert not used("loss.name=dpo") and not used("loss.name=ipo")
    assert used("loss.name=smpo") and used("loss.name=sppo", "data.soft_labels=scores")
    assert not used("loss.name=smpo", "data.soft_labels=label")
    assert not used("loss.name=smpo", "loss.soft_label_scores=reward_model")

    path = write_pairs(tmp_path / "nan.parquet", n=3, scores=[(1.0, 0.0), (math.nan, 0.0), (0.5, math.inf)])
    with pytest.raises(DataError, match=r"row 1 .*score is NaN"):
        PairSource(data_cfg(path), check_scores=True)
    src = PairSource(data_cfg(path, "data.shuffle=false"), check_scores=False)
    assert len(src) == 3 and src.stats.unused_bad_scores == 2 and src.stats.bad_labels_skipped == 0
    assert "2 rows with NaN/infinite scores kept" in src.summary()
    # other kept rows than a checked scan: a cache built by one must not be read by the other
    checked = PairSource(data_cfg(path, "data.on_bad_row=skip"), check_scores=True)
    assert len(checked) == 1 and src.identity() != checked.identity()
    clean = write_pairs(tmp_path / "clean.parquet", n=2, scores=[(1.0, 0.0), (0.5, 0.1)])
    assert "scores_checked" not in PairSource(data_cfg(clean), check_scores=True).identity()


@pytest.mark.parametrize("kind", ["image", "caption"])
def test_a_bad_row_met_in_a_loader_worker_is_the_one_line_message(tmp_path, kind):
    from diffusion_pref.data.loader import PairBatches, collate_pixels, make_loader
    from diffusion_pref.data.pairs import DataError, PairSource

    path = write_pairs(tmp_path / "p.parquet", n=8, bad_rows=(5,) if kind == "image" else ())
    cfg = data_cfg(path, "data.resolution=16", "data.shuffle=false")
    src = PairSource(cfg, seed=0)
    if kind == "caption":  # passes the scan, then the file changes under the run (read checks again)
        write_pairs(path, n=8, captions=[f"cap {i}" if i != 5 else b"\xff" for i in range(8)])
        src._cache_key = None
        import pyarrow.parquet as pq

        captions = pq.read_table(path, columns=["caption"]).column(0).to_pylist()
        assert captions[5] == b"\xff" and captions[0] == b"cap 0"

    def first_error(num_workers):
        batches = PairBatches(src, lambda items: collate_pixels(src, cfg, items, 0), batch_size=2)
        with pytest.raises(DataError) as err:
            for _ in zip(range(8), make_loader(batches, num_workers)):  # two epochs: the loader never ends
                pass
        return re.sub(r"0x[0-9a-f]+", "0x", str(err.value))  # PIL names an object's address

    alone = first_error(0)
    assert "row 5 " in alone and ("jpg_1" if kind == "image" else "caption bytes are not UTF-8") in alone
    assert first_error(2) == alone  # not "Caught DataError in DataLoader worker process 1. Original Traceback..."


def test_texts_cut_counts_either_tokenizer_of_a_model():
    from diffusion_pref.pipelines.base import smallest_token_limit, texts_over_limit
    from diffusion_pref.testing import tiny_clip_tokenizer

    first, second = tiny_clip_tokenizer(), tiny_clip_tokenizer(model_max_length=8)
    texts = ["a cat", "a red cat on a blue mat", "a red cat on a blue mat with a green hat and a yellow bat ok"]
    lengths = [len(first(t).input_ids) for t in texts]  # the same byte-level BPE for both
    assert lengths[0] <= 8 < lengths[1] <= 16 < lengths[2]
    assert texts_over_limit([first], texts) == [False, False, True]
    assert texts_over_limit([first, second], texts) == [False, True, True]
    assert smallest_token_limit([first, second]) == 8 and smallest_token_limit([]) is None
    assert texts_over_limit([], texts) == [False] * 3 and texts_over_limit([first], []) == []

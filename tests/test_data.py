"""Preference-pair reading, filtering, validation errors and paired augmentation (diffusion_pref.data)."""

from __future__ import annotations

import io
import math

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

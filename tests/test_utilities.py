"""The shared utilities: one seed scheme (seeding), one atomic writer (fileio), one spelling suggestion (suggest)."""

import os

import numpy as np
import pytest

from diffusion_pref import fileio
from diffusion_pref.fileio import atomic_write, replace_folder, temporary_path
from diffusion_pref.seeding import derive_rng, derive_seed
from diffusion_pref.suggest import did_you_mean

# ---------------------------------------------------------------------------------------------------- seeding


@pytest.mark.parametrize("parts", [(0, 0), (0, 1), (42, 7), (3, 10**6), (2**40, 5)])
def test_derive_seed_is_the_trainers_former_step_seed(parts):
    # The former trainer._step_seed, written out: noise and timesteps of every training step stay the same.
    assert derive_seed(*parts) == int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def test_derive_seed_pinned_values():
    # Written down once, so that a change of the scheme (or of numpy's SeedSequence) cannot pass unseen.
    assert [derive_seed(0, 0), derive_seed(0, 1), derive_seed(42, 7)] == [2968811710, 3964924996, 1955881634]
    assert derive_seed(np.int64(42), 7) == derive_seed(42, 7)
    assert 0 <= derive_seed(5) < 2**32


def test_derive_rng_is_the_former_epoch_order_and_augmentation_streams():
    # data.pairs: default_rng([seed, epoch]); data.augment: default_rng([seed, row, 0x5EED]).
    for seed, epoch in [(0, 0), (0, 3), (7, 1)]:
        expected = np.random.default_rng([seed, epoch]).permutation(50).tolist()
        assert derive_rng(seed, epoch).permutation(50).tolist() == expected
    assert derive_rng(1, 2, 0x5EED).random(4).tolist() == np.random.default_rng([1, 2, 0x5EED]).random(4).tolist()
    assert np.random.default_rng([0, 3]).permutation(6).tolist() == [1, 3, 0, 5, 2, 4]  # pinned
    assert derive_rng(0, 3).permutation(6).tolist() == [1, 3, 0, 5, 2, 4]


def test_derive_seed_keeps_parts_apart_and_refuses_bad_parts():
    assert derive_seed(1, 23) != derive_seed(12, 3) and derive_seed(0, 1) != derive_seed(1, 0)
    for bad in [(-1, 0), (0.5,), ("3",), ()]:
        with pytest.raises(ValueError, match="seed"):
            derive_seed(*bad)


def test_the_data_order_and_augmentation_use_it():
    from diffusion_pref.data import augment, pairs

    assert pairs.derive_rng is derive_rng and augment.derive_rng is derive_rng


# ---------------------------------------------------------------------------------------------------- fileio


def _fsync_calls(monkeypatch):
    calls = []
    real = os.fsync

    def recording(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


@pytest.mark.parametrize("data, expected", [(b"\x00bytes", b"\x00bytes"), ("text é", "text é".encode()),
                                            (lambda p: p.write_bytes(b"by writer"), b"by writer")])
def test_atomic_write_writes_fsyncs_file_and_folder(tmp_path, monkeypatch, data, expected):
    calls = _fsync_calls(monkeypatch)
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    assert atomic_write(target, data) == target
    assert target.read_bytes() == expected
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left
    if os.path.exists("/proc/self/fd"):
        assert str(temporary_path(target)) in calls and str(tmp_path) in calls  # the file, then the folder
    else:
        assert len(calls) >= 1


def test_a_failure_mid_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half of the ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_failing_fsync_or_rename_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    monkeypatch.undo()

    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        atomic_write(target, "new")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_new_file_appears_only_complete(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda tmp: (tmp.write_text("part"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_replace_folder_swaps_in_the_finished_folder_and_fsyncs_its_files(tmp_path, monkeypatch):
    calls = _fsync_calls(monkeypatch)
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    tmp = tmp_path / ".tmp-step-1"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.json").write_text("a")
    (tmp / "sub" / "b.bin").write_bytes(b"b")
    assert replace_folder(tmp, final) == final
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["a.json", "sub", "sub/b.bin"]
    assert not tmp.exists()
    if os.path.exists("/proc/self/fd"):
        assert {str(tmp / "a.json"), str(tmp / "sub" / "b.bin"), str(tmp_path)} <= set(calls)


def test_generate_and_checkpoints_use_it():
    from diffusion_pref.commands import generate
    from diffusion_pref.training import checkpoint

    assert generate.atomic_write is fileio.atomic_write and checkpoint.replace_folder is fileio.replace_folder


# ---------------------------------------------------------------------------------------------------- suggest


def test_did_you_mean_names_the_closest_choice_or_nothing():
    assert did_you_mean("pickscor", ["clip", "pickscore", "hpsv2"]) == "did you mean 'pickscore'?"
    assert did_you_mean("dpp", ["dpo", "ipo", "kto"]) == "did you mean 'dpo'?"
    assert did_you_mean("train.max_step", ["train.max_steps", "train.seed"]) == "did you mean 'train.max_steps'?"
    assert did_you_mean("zzzz", ["dpo", "pickscore"]) == ""
    assert did_you_mean("x", []) == ""
    assert did_you_mean(3, [30, 4000]) == "did you mean '30'?"  # non-text words and choices compare as text


def test_one_cutoff_everywhere():
    # difflib ratio of "ab" to "ac" is 0.5: just at the cutoff, so suggested; "ab" to "cd" is 0: not.
    assert did_you_mean("ab", ["ac"]) == "did you mean 'ac'?" and did_you_mean("ab", ["cd"]) == ""
    from diffusion_pref.losses import UnknownLossError, get_loss
    from diffusion_pref.reward_models import unknown_reward_model

    with pytest.raises(UnknownLossError, match="Unknown loss 'zzzz'. Choices:"):
        get_loss("zzzz")
    assert unknown_reward_model("zzzz").startswith("unknown reward model 'zzzz'. Choices:")

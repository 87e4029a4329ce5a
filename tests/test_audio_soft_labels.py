"""SmPO/SPPO soft labels on audio pairs (Audio-alpaca layout, no score columns): every kept pair is scored with the
audio reward models of ``reward.models`` (the programmatic ``tones-fidelity``, CLAP) on its decoded waveforms at their
sample rate, the scores are stored beside the data cache and reused (``diffusion-pref cache`` and ``train``), and an
undecodable row is skipped and counted as training skips it (``data.on_bad_row``)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pref.config import load_config

SECONDS = 0.64  # 64 mel frames on the tiny Tango model
RATE = 16000


def write_tones_pairs(path: Path, n: int = 4, bad=None, scores=None):
    """Audio-alpaca parquet (prompt, chosen, rejected, strategy; WAV bytes in ``{"bytes", "path"}`` cells, as the
    tones quickstart and ``generate`` write them) without score columns. The winner is the tones-world rendering of
    its caption, the loser that of the next caption, so tones-fidelity separates them. ``bad``: row -> the
    "rejected" cell instead; ``scores``: (score_0 list, score_1 list) columns to add."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_pref.audio import wav_bytes
    from diffusion_pref.tones.render import render_batch, train_captions

    captions = train_captions()[: 7 * n : 7]  # spread over the kinds of captions
    chosen = render_batch(captions, list(range(n)))
    rejected = render_batch(captions[1:] + captions[:1], list(range(100, 100 + n)))
    bad = bad or {}
    rows = {"prompt": list(captions), "chosen": [], "rejected": [], "strategy": ["tones"] * n}
    for i in range(n):
        rows["chosen"].append({"bytes": wav_bytes(chosen[i], RATE), "path": f"c{i}.wav"})
        rows["rejected"].append(bad.get(i, {"bytes": wav_bytes(rejected[i], RATE), "path": f"r{i}.wav"}))
    if scores is not None:
        rows["score_0"], rows["score_1"] = scores
    pq.write_table(pa.table(rows), str(path))
    return path


def decoded(cell):
    """A WAV cell decoded independently of the data layer: soundfile, float32, as written."""
    import soundfile

    wave, rate = soundfile.read(io.BytesIO(cell["bytes"]), dtype="float32")
    return wave, rate


def read_rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()


def make_cfg(model_dir, data, out, *overrides, reward="{tones-fidelity: 1.0}"):
    return load_config(None, [
        f"model.pretrained={model_dir}", f"data.source={data}", f"data.audio_seconds={SECONDS}", "data.shuffle=false",
        "train.batch_size=2", "train.max_steps=1", "train.learning_rate=1e-3", "train.logger=none",
        "train.checkpoint_every=0", "model.lora_rank=2", "runtime.device=cpu", f"output.dir={out}",
        "loss.name=smpo", f"reward.models={reward}", *overrides,
    ])


@pytest.fixture(scope="module")
def tones_pairs(tmp_path_factory):
    return write_tones_pairs(tmp_path_factory.mktemp("tones-pairs") / "train.parquet")


def independent_tones_scores(path):
    """(winner scores, loser scores) by TonesFidelity on each decoded clip at its own rate, one clip per call."""
    from diffusion_pref.tones.rewards import TonesFidelity

    reward = TonesFidelity()
    s_w, s_l = [], []
    for row in read_rows(path):
        for cell, out in ((row["chosen"], s_w), (row["rejected"], s_l)):
            wave, rate = decoded(cell)
            out.append(float(reward.score([row["prompt"]], [wave], sample_rate=rate)[0]))
    return s_w, s_l


def test_smpo_on_audio_pairs_without_scores_labels_each_pair_by_tones_fidelity(tones_pairs, tiny_tango_dir,
                                                                               tmp_path):
    """Through the train command: the stored scores are TonesFidelity of the decoded waveforms (exactly: the same
    float32 per clip), p the SmPO formula over the data's min/max; never p = 1 for every pair."""
    from diffusion_pref.commands import train
    from diffusion_pref.soft_labels import SoftLabels

    train.run(make_cfg(tiny_tango_dir, tones_pairs, tmp_path / "run"))
    labels = SoftLabels.load(tmp_path / "run")
    assert labels.scores == "reward_model" and labels.rows.tolist() == [0, 1, 2, 3] and labels.skipped == 0
    s_w, s_l = independent_tones_scores(tones_pairs)
    assert labels.scores_w.tolist() == s_w and labels.scores_l.tolist() == s_l
    assert len(set(s_w + s_l)) > 1 and all(w >= lo for w, lo in zip(s_w, s_l))  # the losers' captions are wrong
    low, high = min(s_w + s_l), max(s_w + s_l)
    want = [1.0 / (1.0 + math.exp(-(w - lo) / (high - low))) for w, lo in zip(s_w, s_l)]
    assert labels.p.tolist() == pytest.approx(want, abs=1e-15)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["soft_labels"]["from"] == "reward_model" and summary["soft_labels"]["pairs"] == 4
    assert summary["soft_labels"]["p_one"] == 0


def test_the_cache_command_stores_audio_scores_and_training_reuses_them(tones_pairs, tiny_tango_dir, tmp_path,
                                                                        monkeypatch):
    from diffusion_pref.commands import cache
    from diffusion_pref.soft_labels import SoftLabels
    from diffusion_pref.tones.rewards import TonesFidelity
    from diffusion_pref.training.setup import Trainer

    flags = ("data.cache=true", f"data.cache_dir={tmp_path / 'cache'}")
    cache.run(make_cfg(tiny_tango_dir, tones_pairs, tmp_path / "cached", *flags))
    stored = SoftLabels.load(tmp_path / "cached")
    s_w, s_l = independent_tones_scores(tones_pairs)
    assert stored.scores == "reward_model" and stored.scores_w.tolist() == s_w and stored.scores_l.tolist() == s_l
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("manifest.json")]
    scores = [m for m in manifests if m.get("key", {}).get("kind") == "soft label scores"]
    assert len(scores) == 1 and scores[0]["pairs"] == 4 and scores[0]["units"].startswith("tones-fidelity")

    def not_again(*args, **kwargs):
        raise AssertionError("the audio scores stored by the cache command should have been reused")

    monkeypatch.setattr(TonesFidelity, "score", not_again)
    trainer = Trainer(make_cfg(tiny_tango_dir, tones_pairs, tmp_path / "train", *flags))
    assert trainer.soft_labels.p.tolist() == stored.p.tolist()
    assert trainer.train()["steps"] == 1


def test_an_undecodable_audio_row_is_skipped_and_counted_as_training_skips_it(tiny_tango_dir, tmp_path, monkeypatch):
    from diffusion_pref.data.pairs import DataError
    from diffusion_pref.soft_labels import SoftLabels
    from diffusion_pref.tones.rewards import TonesFidelity
    from diffusion_pref.training.setup import Trainer

    data = write_tones_pairs(tmp_path / "bad.parquet", n=4, bad={1: {"bytes": b"not audio", "path": "r1.wav"}})
    with pytest.raises(DataError, match=r"row 1 of row group 0 \(dataset row 1\), column rejected: audio could not "
                                        r"decode.*data\.on_bad_row=skip"):
        Trainer(make_cfg(tiny_tango_dir, data, tmp_path / "strict"))
    # one batch of all four rows: the scoring and the training step skip the same row, and both count it
    flags = ("data.on_bad_row=skip", "train.batch_size=4", f"data.cache_dir={tmp_path / 'cache'}")
    trainer = Trainer(make_cfg(tiny_tango_dir, data, tmp_path / "skip", *flags))
    labels = trainer.soft_labels
    assert labels.rows.tolist() == [0, 2, 3] and labels.skipped == 1
    assert SoftLabels.load(tmp_path / "skip").skipped == 1
    summary = trainer.train()
    assert summary["skipped_rows"] == 1
    rows = read_rows(data)
    s_w, s_l = [], []
    for k in (0, 2, 3):
        s_w.append(float(TonesFidelity().score([rows[k]["prompt"]], [decoded(rows[k]["chosen"])[0]], RATE)[0]))
        s_l.append(float(TonesFidelity().score([rows[k]["prompt"]], [decoded(rows[k]["rejected"])[0]], RATE)[0]))
    assert labels.scores_w.tolist() == s_w and labels.scores_l.tolist() == s_l

    def not_again(*args, **kwargs):
        raise AssertionError("the stored scores should have been reused")

    # another run on the same data reads the stored scores, with the skipped row still counted
    monkeypatch.setattr(TonesFidelity, "score", not_again)
    again = Trainer(make_cfg(tiny_tango_dir, data, tmp_path / "again", *flags)).soft_labels
    assert again.rows.tolist() == [0, 2, 3] and again.skipped == 1 and again.p.tolist() == labels.p.tolist()


def test_audio_at_a_rate_the_reward_does_not_take_is_an_error_naming_the_row(tiny_tango_dir, tmp_path):
    """tones-fidelity is a 16 kHz measure; a 22.05 kHz clip (fine for the model, which resamples) is named."""
    from diffusion_pref.audio import wav_bytes
    from diffusion_pref.training.setup import Trainer

    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)).astype(np.float32)
    data = write_tones_pairs(tmp_path / "rate.parquet", n=3, bad={2: {"bytes": wav_bytes(wave, 22050), "path": "x"}})
    with pytest.raises(ValueError, match=r"^soft labels: reward.models \(tones-fidelity\) could not score the loser "
                                         r"of .*row 2 of row group 0 \(dataset row 2\) \(1 clip\(s\) at 22050 Hz.*"
                                         r"sample_rate=22050") as err:
        Trainer(make_cfg(tiny_tango_dir, data, tmp_path / "run"))
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:clap. resampling audio")
def test_clap_scores_audio_pairs_for_soft_labels(tones_pairs, tiny_tango_dir, tmp_path):
    """CLAP (tiny weights) through the same path: the scores are CLAPScore.score of the decoded 16 kHz waveforms
    (resampled to CLAP's 48 kHz inside the scorer)."""
    from diffusion_pref.reward_models import load_reward_model
    from diffusion_pref.testing.rewards import save_tiny_clap
    from diffusion_pref.training.setup import Trainer

    clap_dir = save_tiny_clap(tmp_path / "clap")
    trainer = Trainer(make_cfg(tiny_tango_dir, tones_pairs, tmp_path / "run", f"reward.pretrained.clap={clap_dir}",
                               reward="{clap: 1.0}"))
    labels = trainer.soft_labels
    assert labels.scores == "reward_model" and labels.rows.tolist() == [0, 1, 2, 3]
    clap = load_reward_model("clap", pretrained=str(clap_dir), device="cpu")
    rows = read_rows(tones_pairs)
    s_w = clap.score([r["prompt"] for r in rows], [decoded(r["chosen"])[0] for r in rows], sample_rate=RATE)
    s_l = clap.score([r["prompt"] for r in rows], [decoded(r["rejected"])[0] for r in rows], sample_rate=RATE)
    # float32 cosines batched differently here: they agree to float32 rounding
    torch.testing.assert_close(torch.tensor(labels.scores_w, dtype=torch.float32), s_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(labels.scores_l, dtype=torch.float32), s_l, rtol=0, atol=1e-6)


def test_audio_pairs_with_score_columns_take_their_labels_from_the_columns_before_the_model_loads(tiny_tango_dir,
                                                                                                 tmp_path, monkeypatch):
    """As the tones quickstart writes them: no reward model runs, and the labels need no audio front end."""
    from diffusion_pref.data.pairs import PairSource
    from diffusion_pref.soft_labels import needs_front_end
    from diffusion_pref.tones.rewards import TonesFidelity
    from diffusion_pref.training.setup import Trainer

    data = write_tones_pairs(tmp_path / "scored.parquet", n=3, scores=([0.9, 0.8, 1.0], [0.2, 0.6, 0.4]))
    cfg = make_cfg(tiny_tango_dir, data, tmp_path / "run")
    assert not needs_front_end(PairSource(cfg.data), cfg.loss)
    unscored = make_cfg(tiny_tango_dir, write_tones_pairs(tmp_path / "plain.parquet", n=3), tmp_path / "x")
    assert needs_front_end(PairSource(unscored.data), unscored.loss)
    forced = make_cfg(tiny_tango_dir, data, tmp_path / "x", "loss.soft_label_scores=reward_model")
    assert needs_front_end(PairSource(forced.data), forced.loss)

    def no_reward(*args, **kwargs):
        raise AssertionError("score columns are there: no reward model should run")

    monkeypatch.setattr(TonesFidelity, "score", no_reward)
    labels = Trainer(cfg).soft_labels
    assert labels.scores == "dataset" and labels.scores_w.tolist() == [0.9, 0.8, 1.0]
    want = [1.0 / (1.0 + math.exp(-(w - lo) / 0.8)) for w, lo in ((0.9, 0.2), (0.8, 0.6), (1.0, 0.4))]
    assert labels.p.tolist() == pytest.approx(want, abs=1e-12)

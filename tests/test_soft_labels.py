"""Tests for diffusion_pref.soft_labels (SmPO per-pair soft labels) and their use in the smpo loss."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from diffusion_pref.losses import LOSSES
from diffusion_pref.soft_labels import (
    SoftLabels,
    compute_soft_labels,
    minmax_range,
    prepare_soft_labels,
    soft_label_probs,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg  # noqa: E402


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_soft_labels_from_known_scores_equal_a_hand_computation():
    s_w, s_l = [0.30, 0.10, 0.20, 0.25], [0.10, 0.30, 0.20, 0.20]
    low, high = minmax_range(s_w, s_l)
    assert (low, high) == (0.10, 0.30)
    # r' = (s - 0.1) / 0.2: gaps r'_w - r'_l = 1, -1, 0, 0.25
    want = [sigmoid(1.0), sigmoid(-1.0), 0.5, sigmoid(0.25)]
    assert soft_label_probs(s_w, s_l, low, high, "reward").tolist() == pytest.approx(want, abs=1e-12)
    want_human = [sigmoid(1.0), sigmoid(1.0), 0.5, sigmoid(0.25)]
    assert soft_label_probs(s_w, s_l, low, high, "human").tolist() == pytest.approx(want_human, abs=1e-12)


def test_the_smpo_code_pickscore_range_gives_its_table_of_multipliers():
    low, high = 0.11543526500463486, 0.28201571106910706  # hard-coded in the SmPO train.py
    p = soft_label_probs([0.21, 0.26, 0.20], [0.20, 0.21, 0.20], low, high)
    # 10 (2p - 1) for raw cosine gaps 0.01 and 0.05 (PickScore points 1 and 5), and 0 for equal scores
    assert (10 * (2 * p - 1)).tolist() == pytest.approx([0.30, 1.49, 0.0], abs=0.01)


def test_bad_scores_raise_clear_errors():
    with pytest.raises(ValueError, match="spread"):
        minmax_range([0.2, 0.2], [0.2, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        minmax_range([float("nan")], [0.1])
    with pytest.raises(ValueError, match="winner"):
        soft_label_probs([0.1], [0.2], 0.0, 1.0, winner="judge")


# --------------------------------------------------------------------------------------------- from a dataset


def _png(color):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [  # caption, label_0, score_0, score_1
    ("red", 1.0, 0.9, 0.1),  # human and reward agree, image 0 wins
    ("green", 0.0, 0.2, 0.6),  # agree, image 1 wins (the data layer swaps it to winner first)
    ("blue", 1.0, 0.3, 0.5),  # human prefers image 0, the reward prefers image 1
    ("tie", 0.5, 0.4, 0.4),  # a human tie: dropped by data.ties=drop, as in the SmPO code
]


@pytest.fixture
def pairs_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "caption": [r[0] for r in ROWS],
        "jpg_0": [_png((200, 0, 0)) for _ in ROWS],
        "jpg_1": [_png((0, 200, 0)) for _ in ROWS],
        "label_0": [r[1] for r in ROWS],
        "score_0": [r[2] for r in ROWS],
        "score_1": [r[3] for r in ROWS],
    })
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    return path


def _source(path):
    from diffusion_pref.config import load_config
    from diffusion_pref.data.pairs import PairSource

    return PairSource(load_config(None, [f"data.source={path}", "data.shuffle=false"]).data)


# kept rows 0, 1, 2; scores of the human winner / loser; range over kept rows [0.1, 0.9]
EXPECTED_W, EXPECTED_L = [0.9, 0.6, 0.3], [0.1, 0.2, 0.5]


def test_dataset_score_columns_give_per_row_labels_oriented_by_the_stored_winner(pairs_file):
    labels = compute_soft_labels(_source(pairs_file), winner="reward", scores="auto")
    assert labels.scores == "dataset" and labels.rows.tolist() == [0, 1, 2]
    assert labels.scores_w.tolist() == EXPECTED_W and labels.scores_l.tolist() == EXPECTED_L
    assert (labels.low, labels.high) == (0.1, 0.9)
    want = [sigmoid((w - l) / 0.8) for w, l in zip(EXPECTED_W, EXPECTED_L)]
    assert labels.p.tolist() == pytest.approx(want, abs=1e-12)
    assert labels.p[2] < 0.5  # the reward model disagrees with the human on row 2
    human = compute_soft_labels(_source(pairs_file), winner="human", scores="dataset")
    assert human.p.tolist() == pytest.approx([sigmoid(abs(w - l) / 0.8) for w, l in zip(EXPECTED_W, EXPECTED_L)])
    # one p per pair, looked up by global row id in any order; never one pair's p for the whole batch
    batch_p = labels.lookup(torch.tensor([2, 0, 1]))
    assert batch_p.dtype == torch.float32 and batch_p.tolist() == pytest.approx([want[2], want[0], want[1]], abs=1e-6)
    with pytest.raises(KeyError, match="row"):
        labels.lookup(torch.tensor([3]))  # the dropped tie has no label


class ScoreByCaption:
    """A reward model with known scores: the scores of ROWS, looked up by caption and image colour."""

    name = "known"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, images):
        self.calls += 1
        table = {r[0]: (r[2], r[3]) for r in ROWS}
        out = []
        for prompt, image in zip(prompts, images):
            is_image_0 = image.getpixel((0, 0))[0] > 100  # image 0 is red, image 1 green
            out.append(table[prompt][0 if is_image_0 else 1])
        return torch.tensor(out)


def test_reward_model_scores_match_the_score_columns_and_are_stored_once(pairs_file, tmp_path):
    reward = ScoreByCaption()
    run_dir = tmp_path / "run"
    labels = prepare_soft_labels(_source(pairs_file), run_dir, scores="reward_model", reward=reward, batch_size=2)
    from_columns = compute_soft_labels(_source(pairs_file), scores="dataset")
    assert labels.scores == "reward_model" and reward.calls == 2  # 3 kept pairs in batches of 2
    assert labels.p.tolist() == pytest.approx(from_columns.p.tolist(), abs=1e-6)
    meta = json.loads((run_dir / "soft_labels.json").read_text())
    assert meta["pairs"] == 3 and meta["low"] == pytest.approx(0.1) and meta["settings"]["reward"] == "known"
    # a resumed run reads the stored labels instead of scoring again
    again = prepare_soft_labels(_source(pairs_file), run_dir, scores="reward_model", reward=reward, batch_size=2)
    assert reward.calls == 2 and again.p.tolist() == pytest.approx(labels.p.tolist())
    loaded = SoftLabels.load(run_dir)
    assert loaded.rows.tolist() == labels.rows.tolist() and loaded.scores_w.tolist() == labels.scores_w.tolist()
    assert (loaded.low, loaded.high, loaded.winner, loaded.scores) == (labels.low, labels.high, "reward", "reward_model")
    assert loaded.lookup([1]).tolist() == pytest.approx([labels.p[1]], abs=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        prepare_soft_labels(_source(pairs_file), run_dir, winner="human", scores="reward_model", reward=reward)


def test_missing_scores_and_missing_reward_model_raise(tmp_path, pairs_file):
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_file).drop(["score_0", "score_1"])
    bare = tmp_path / "bare.parquet"
    pq.write_table(table, bare)
    with pytest.raises(ValueError, match="no score columns"):
        compute_soft_labels(_source(bare), scores="dataset")
    with pytest.raises(ValueError, match="reward model"):
        compute_soft_labels(_source(bare), scores="auto")


# ------------------------------------------------------------------------------------- use in the smpo loss


def _log_likelihoods(seed, pairs=5):
    g = torch.Generator().manual_seed(seed)
    return [(-torch.rand(pairs, generator=g)).requires_grad_(True) for _ in range(4)]


def test_pairs_with_equal_rewards_contribute_zero_gradient():
    policy_w, policy_l, ref_w, ref_l = _log_likelihoods(1, pairs=3)
    p = torch.tensor(soft_label_probs([0.2, 0.5, 0.3], [0.2, 0.1, 0.3], 0.0, 1.0), dtype=torch.float32)
    loss, _ = LOSSES["smpo"](policy_w, policy_l, ref_w, ref_l, beta=50.0, soft_label=p)
    loss.sum().backward()
    assert policy_w.grad[0] == 0 and policy_w.grad[2] == 0 and policy_l.grad[0] == 0  # equal rewards
    assert policy_w.grad[1] != 0  # the pair with a reward gap still learns
    torch.testing.assert_close(loss[0], torch.tensor(math.log(2.0)))


def test_smpo_is_unchanged_by_swapping_the_sides_with_p_to_one_minus_p():
    # why winner=reward needs no re-ordering of human-oriented pairs (see the soft_labels module docstring)
    policy_w, policy_l, ref_w, ref_l = _log_likelihoods(2)
    p = torch.tensor([0.2, 0.4, 0.5, 0.7, 0.95])
    a, _ = LOSSES["smpo"](policy_w, policy_l, ref_w, ref_l, beta=30.0, soft_label=p)
    b, _ = LOSSES["smpo"](policy_l, policy_w, ref_l, ref_w, beta=30.0, soft_label=1 - p)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ the recipes

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("recipe, beta, steps, grid_top, optimizer", [
    ("sd15_smpo.yaml", 1000.0, 5, 801, "adamw"),  # SmPO --beta_dpo 2000 (halved here)
    ("sdxl_smpo.yaml", 2500.0, 10, 901, "adafactor"),  # SmPO --beta_dpo 5000 (halved here)
])
def test_smpo_recipes_carry_the_papers_settings_with_their_source(recipe, beta, steps, grid_top, optimizer):
    from diffusion_pref.config import load_config
    from diffusion_pref.schedules import DDPMSchedule
    from diffusion_pref.trajectories import inversion_grid

    path = REPO_CONFIGS / recipe
    cfg = load_config(path)
    assert cfg.loss.name == "smpo" and cfg.loss.beta == beta and cfg.loss.params == {"gamma": 10.0}
    assert cfg.trajectory.kind == "renoise" and cfg.trajectory.steps == steps
    assert cfg.trajectory.renoise_iters == 1 and cfg.trajectory.average_window == [0, 2]
    # 8 GPUs x 1 x 128 = 1024 pairs per step, lr 1e-8 x 1024, 200 steps, warmup 100
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 1024
    assert cfg.train.learning_rate == pytest.approx(1.024e-5) and cfg.train.max_steps == 200
    assert cfg.train.warmup_steps == 100 and cfg.train.optimizer == optimizer
    assert cfg.data.caption_dropout == 0.2 and cfg.data.ties == "drop"
    # the grid of the SD scheduler config (scaled_linear, leading, steps_offset 1)
    sched = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    assert inversion_grid(sched, cfg.trajectory.steps)[-1] == grid_top
    text = path.read_text()
    assert "JaydenLyh/SmPO" in text and "2506.02698" in text  # the source is cited


def test_toy_smpo_recipe_loads():
    from diffusion_pref.config import load_config

    cfg = load_config(REPO_CONFIGS / "toy_train_smpo.yaml")
    assert cfg.model.pretrained == "toy" and cfg.data.source == "outputs/toy_generate"
    assert cfg.loss.name == "smpo" and cfg.trajectory.kind == "renoise" and cfg.trajectory.steps == 5


def test_soft_labels_for_run_uses_the_columns_without_loading_a_reward_model(pairs_file, tmp_path):
    from diffusion_pref.config import load_config
    from diffusion_pref.soft_labels import soft_labels_for_run

    # reward.models names a model whose weights are not here: it must not be loaded, the columns suffice
    cfg = load_config(None, [f"data.source={pairs_file}", f"output.dir={tmp_path / 'run'}",
                             "reward.models={pickscore: 1.0}"])
    labels = soft_labels_for_run(_source(pairs_file), cfg.output.dir, cfg.loss, cfg.reward)
    assert labels.scores == "dataset" and len(labels) == 3
    assert (tmp_path / "run" / "soft_labels.parquet").is_file()
    stored = json.loads((tmp_path / "run" / "soft_labels.json").read_text())
    assert stored["settings"]["reward"] == {"pickscore": 1.0} and stored["winner"] == "reward"
    # the loss.soft_label_* settings reach the computation
    cfg = load_config(None, [f"data.source={pairs_file}", f"output.dir={tmp_path / 'human'}",
                             "loss.soft_label_winner=human", "loss.soft_label_scores=dataset",
                             "loss.soft_label_range=[0.0, 2.0]"])
    human = soft_labels_for_run(_source(pairs_file), cfg.output.dir, cfg.loss, cfg.reward)
    assert (human.winner, human.scores, human.low, human.high) == ("human", "dataset", 0.0, 2.0)
    assert human.p.tolist() == pytest.approx([sigmoid(abs(w - l) / 2.0) for w, l in zip(EXPECTED_W, EXPECTED_L)])


# ------------------------------------------------------------------------------ units of a fixed score range


def _scored_pairs(path, scores):
    """A parquet of hard-labelled pairs (image 0 red, image 1 green, image 0 wins) with these score columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(scores)
    pq.write_table(pa.table({
        "caption": [f"pair {i}" for i in range(n)], "jpg_0": [_png((200, 0, 0))] * n,
        "jpg_1": [_png((0, 200, 0))] * n, "label_0": [1.0] * n,
        "score_0": [float(s[0]) for s in scores], "score_1": [float(s[1]) for s in scores],
    }), path)
    return path


def test_a_fixed_range_is_in_the_units_of_the_scores(tmp_path):
    from diffusion_pref.soft_labels import SMPO_PICKSCORE_RANGE, SMPO_PICKSCORE_RANGE_COSINE

    # PickScore points as our scorer returns them (100 x cosine): a one-point gap, a 10-point gap
    data = _scored_pairs(tmp_path / "pick.parquet", [(21.0, 20.0), (25.0, 15.0)])
    labels = compute_soft_labels(_source(data), scores="dataset", score_range=list(SMPO_PICKSCORE_RANGE))
    width = 0.28201571106910706 - 0.11543526500463486  # the SmPO code's range, raw cosine
    assert labels.p.tolist() == pytest.approx([sigmoid(0.01 / width), sigmoid(0.10 / width)], abs=1e-9)
    assert labels.p[0] == pytest.approx(0.515, abs=5e-4)  # not the 0.9975 of mixing the units
    # the raw-cosine range on these scores: an error naming the file and row, with the range in our units
    with pytest.raises(ValueError, match=r"pick\.parquet: row 0 of row group 0 \(dataset row 0\).*11\.5435"):
        compute_soft_labels(_source(data), scores="dataset", score_range=list(SMPO_PICKSCORE_RANGE_COSINE))


def test_out_of_range_scores_name_the_row_beyond_rounding_slack(tmp_path):
    from diffusion_pref.soft_labels import RANGE_SLACK

    # row 2's loser lies 2% of the width below the range [0, 1]; rows 0 and 1 inside or within the slack
    data = _scored_pairs(tmp_path / "s.parquet", [(0.5, 0.0), (1.0 + RANGE_SLACK / 2, 0.2), (0.7, -0.02)])
    with pytest.raises(ValueError, match=r"dataset row 2\).*loser's score -0\.02 is outside .*\[0, 1\]"):
        compute_soft_labels(_source(data), scores="dataset", score_range=[0.0, 1.0])
    ok = compute_soft_labels(_source(data), scores="dataset", score_range=[-0.05, 1.0])  # all inside
    assert ok.p[1] == pytest.approx(sigmoid((1.0 + RANGE_SLACK / 2 - 0.2) / 1.05))
    with pytest.raises(ValueError, match="empty"):
        compute_soft_labels(_source(data), scores="dataset", score_range=[1.0, 0.0])


# ------------------------------------------------------------------------- scores stored once, reused by runs


def test_reward_scores_are_stored_with_the_cache_and_reused_by_another_run(pairs_file, tmp_path):
    import pyarrow.parquet as pq

    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(pairs_file).drop(["score_0", "score_1"]), bare)
    reward, cache = ScoreByCaption(), tmp_path / "cache" / "scores"
    first = prepare_soft_labels(_source(bare), tmp_path / "run1", reward=reward, batch_size=2, reward_id="known",
                                score_cache_dir=cache)
    assert first.scores == "reward_model" and reward.calls == 2
    assert first.p.tolist() == pytest.approx([sigmoid((w - l) / 0.8) for w, l in zip(EXPECTED_W, EXPECTED_L)])
    # another run (other output folder, other winner rule) on the same data and reward model: no scoring
    second = prepare_soft_labels(_source(bare), tmp_path / "run2", winner="human", reward=reward, batch_size=2,
                                 reward_id="known", score_cache_dir=cache)
    assert reward.calls == 2
    assert second.scores_w.tolist() == pytest.approx(EXPECTED_W)
    assert second.scores_l.tolist() == pytest.approx(EXPECTED_L)
    assert second.p.tolist() == pytest.approx([sigmoid(abs(w - l) / 0.8) for w, l in zip(EXPECTED_W, EXPECTED_L)])
    # another reward model's name: its scores are not the stored ones
    prepare_soft_labels(_source(bare), tmp_path / "run3", reward=reward, batch_size=2, reward_id="other",
                        score_cache_dir=cache)
    assert reward.calls == 4


def test_summary_counts_the_pairs_with_p_one(pairs_file):
    from diffusion_pref.config import load_config
    from diffusion_pref.data.pairs import PairSource
    from diffusion_pref.soft_labels import soft_label_summary

    # labels 1, 0, 1 and a tie kept as 0.5: three hard pairs
    source = PairSource(load_config(None, [f"data.source={pairs_file}", "data.ties=soft"]).data)
    assert soft_label_summary(source) == {"from": "label", "pairs": 4, "p_one": 3, "p_mean": pytest.approx(3.5 / 4)}
    scored = soft_label_summary(_source(pairs_file), compute_soft_labels(_source(pairs_file), scores="dataset"))
    assert scored["from"] == "dataset" and scored["pairs"] == 3 and scored["p_one"] == 0


# ----------------------------------------------------------------------------------------------- in training

@pytest.fixture
def tiny_pickscore(tmp_path_factory):
    from diffusion_pref.testing.rewards import tiny_reward_kwargs

    return tiny_reward_kwargs("pickscore", tmp_path_factory.mktemp("rewards"))["pretrained"]


def test_smpo_without_score_columns_scores_the_pairs_with_the_recipes_reward_model(tiny_sd_dir, tiny_pickscore,
                                                                                     tmp_path, monkeypatch):
    """What the SmPO recipes do on Pick-a-Pic (no score columns): p from the reward model they name, scored once
    beside the data cache and reused by the next run, never p = 1 for every pair."""
    from diffusion_pref.reward_models import load_reward_model
    from diffusion_pref.reward_models.pickscore import PickScore
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    flags = ["loss.name=smpo", "train.max_steps=1", "reward.models={pickscore: 1.0}", "runtime.device=cpu",
             f"reward.pretrained.pickscore={tiny_pickscore}", f"data.cache_dir={tmp_path / 'cache'}"]
    trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "run1", *flags))
    labels = trainer.soft_labels
    assert labels is not None and labels.scores == "reward_model"
    # independently: score each pair's winner and loser with the same tiny PickScore, normalise, sigmoid
    pairs, _ = trainer.source.read(trainer.source.order(0))
    scorer = load_reward_model("pickscore", pretrained=tiny_pickscore, device="cpu")
    s_w = scorer.score([p.caption for p in pairs], [p.image_w for p in pairs])
    s_l = scorer.score([p.caption for p in pairs], [p.image_l for p in pairs])
    low, high = min(s_w.min(), s_l.min()).item(), max(s_w.max(), s_l.max()).item()
    want = torch.sigmoid((s_w - s_l).double() / (high - low)).float()
    got = labels.lookup(torch.tensor([p.row for p in pairs]))
    # scores near 10 in float32 (batched differently here) differ by ~1e-6; over a range of a few points p by less
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got != 1).all()
    trainer.train()
    summary = json.loads((tmp_path / "run1" / "train_summary.json").read_text())
    assert summary["soft_labels"]["from"] == "reward_model" and summary["soft_labels"]["p_one"] == 0

    def not_again(*args, **kwargs):
        raise AssertionError("the stored scores should have been reused")

    monkeypatch.setattr(PickScore, "score", not_again)
    again = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "run2", *flags))
    assert again.soft_labels.lookup(torch.tensor([p.row for p in pairs])).tolist() == got.tolist()


def test_smpo_hard_labels_only_when_asked_for_with_a_warning_and_counted(tiny_sd_dir, tmp_path, caplog):
    from diffusion_pref.config import ConfigError
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    # no score columns and a reward model whose weights are not here: stop, and say how to get soft labels
    with pytest.raises(ConfigError, match=r"no score columns.*score_0/score_1.*data\.soft_labels=label"):
        Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "none", "loss.name=smpo", "reward.models={pickscore: 1.0}",
                         f"reward.pretrained.pickscore={tmp_path / 'no-such-folder'}"))
    with caplog.at_level("WARNING"):
        trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "hard", "loss.name=smpo", "data.soft_labels=label",
                                   "train.max_steps=1"))
    assert any("p = 1" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    trainer.train()
    summary = json.loads((tmp_path / "hard" / "train_summary.json").read_text())
    assert summary["soft_labels"] == {"from": "label", "pairs": 4, "p_one": 4, "p_mean": 1.0}


def test_the_cache_command_scores_the_pairs_for_later_training_runs(tiny_sd_dir, tiny_pickscore, tmp_path,
                                                                    monkeypatch):
    """`diffusion-pref cache` scores the pairs once in one process; a (distributed) training run then reads them."""
    from diffusion_pref.commands import cache
    from diffusion_pref.reward_models.pickscore import PickScore
    from diffusion_pref.training.setup import Trainer

    data = write_pairs(tmp_path / "p.parquet", n=4)
    flags = ["loss.name=smpo", "reward.models={pickscore: 1.0}", "runtime.device=cpu",
             f"reward.pretrained.pickscore={tiny_pickscore}", f"data.cache_dir={tmp_path / 'cache'}"]
    cache.run(make_cfg(tiny_sd_dir, data, tmp_path / "cached", *flags))
    stored = SoftLabels.load(tmp_path / "cached")
    assert stored.scores == "reward_model" and len(stored) == 4

    def not_again(*args, **kwargs):
        raise AssertionError("the scores stored by the cache command should have been reused")

    monkeypatch.setattr(PickScore, "score", not_again)
    trainer = Trainer(make_cfg(tiny_sd_dir, data, tmp_path / "train", *flags))
    assert trainer.soft_labels.p.tolist() == stored.p.tolist()

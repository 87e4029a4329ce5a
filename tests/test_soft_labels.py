"""Tests for diffusion_pref.soft_labels (SmPO per-pair soft labels) and their use in the smpo loss."""

from __future__ import annotations

import io
import json
import math

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
    from diffusers import DDPMScheduler

    from diffusion_pref.config import load_config
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
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
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
    labels = soft_labels_for_run(cfg, _source(pairs_file))
    assert labels.scores == "dataset" and len(labels) == 3
    assert (tmp_path / "run" / "soft_labels.parquet").is_file()
    stored = json.loads((tmp_path / "run" / "soft_labels.json").read_text())
    assert stored["settings"]["reward"] == {"pickscore": 1.0} and stored["winner"] == "reward"
    # the loss.soft_label_* settings reach the computation
    cfg = load_config(None, [f"data.source={pairs_file}", f"output.dir={tmp_path / 'human'}",
                             "loss.soft_label_winner=human", "loss.soft_label_scores=dataset",
                             "loss.soft_label_range=[0.0, 2.0]"])
    human = soft_labels_for_run(cfg, _source(pairs_file))
    assert (human.winner, human.scores, human.low, human.high) == ("human", "dataset", 0.0, 2.0)
    assert human.p.tolist() == pytest.approx([sigmoid(abs(w - l) / 2.0) for w, l in zip(EXPECTED_W, EXPECTED_L)])

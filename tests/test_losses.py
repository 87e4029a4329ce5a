"""Tests for diffusion_pref.losses: hand-computed values, properties, the registry, and a TRL cross-check.

The expected values are written out per pair with Python's `math`, independently of the library code.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from diffusion_pref import losses as L
from diffusion_pref.losses import (
    LOSSES,
    REFERENCE_FREE,
    TAKES_SOFT_LABEL,
    RunningMean,
    UnknownLossError,
    check_loss_params,
    get_loss,
)

# Two pairs of log-likelihood estimates; chosen so that pair 0 has a positive and pair 1 a negative margin.
PW = [-0.10, -0.30]
PL = [-0.25, -0.05]
RW = [-0.15, -0.20]
RL = [-0.20, -0.10]
BETA = 2.0
SOFT = [0.9, 0.7]
PAIRED_LOSSES = sorted(LOSSES)


def t(values, dtype=torch.float32, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def inputs(dtype=torch.float32, grad=False):
    return [t(v, dtype, grad) for v in (PW, PL, RW, RL)]


def extras(name, pairs=2):
    """Per-pair inputs a loss requires (smpo needs its soft label)."""
    return {"soft_label": t(SOFT[:pairs] if pairs <= 2 else [0.8] * pairs)} if name == "smpo" else {}


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------ expected values, one pair at a time


def expected(name, beta=BETA, **params):
    """The per-pair loss of `name` on (PW, PL, RW, RL), from the paper formula, with plain floats."""
    out = []
    lw_all = [pw - rw for pw, rw in zip(PW, RW)]
    ll_all = [pl - rl for pl, rl in zip(PL, RL)]
    z0 = max(0.0, sum(lw_all + ll_all) / (2 * len(PW)))  # kto batch KL estimate
    for i in range(len(PW)):
        lw, ll = lw_all[i], ll_all[i]
        h = lw - ll
        if name == "dpo":
            v = -logsig(beta * h)
        elif name == "smpo":
            gamma = params.get("gamma", 10.0)
            v = -logsig(gamma * (2 * SOFT[i] - 1) * beta * h)
        elif name == "ipo":
            v = (h - 1 / (2 * beta)) ** 2
        elif name == "hinge":
            v = max(0.0, 1 - beta * h)
        elif name == "robust":
            e = params.get("flip_rate", 0.1)
            v = ((1 - e) * -logsig(beta * h) - e * -logsig(-beta * h)) / (1 - 2 * e)
        elif name == "cdpo":
            e = params.get("label_smoothing", 0.1)
            v = (1 - e) * -logsig(beta * h) + e * -logsig(-beta * h)
        elif name == "rpo":
            v = -logsig(beta * h) + params.get("alpha", 1.0) * -PW[i]
        elif name == "sft":
            v = -PW[i]
        elif name == "kto":
            v = (1 - sig(beta * (lw - z0))) + (1 - sig(beta * (z0 - ll)))
        elif name == "bco":
            d = params.get("reward_shift", 0.0)
            v = -logsig(beta * lw - d) - logsig(-(beta * ll - d))
        elif name == "sppo":
            v = (lw - 1 / (2 * beta)) ** 2 + (ll + 1 / (2 * beta)) ** 2
        elif name == "nca":
            v = -logsig(beta * lw) - 0.5 * logsig(-beta * lw) - 0.5 * logsig(-beta * ll)
        elif name == "apo_zero":
            v = (1 - sig(beta * lw)) + sig(beta * ll)
        elif name == "apo_down":
            v = sig(beta * lw) + (1 - sig(beta * h))
        elif name == "asft":
            lam = params.get("odds_weight", 0.1)
            # the odds form of the paper, not the simplified one the library uses
            pi_w, pi_l = math.exp(PW[i]), math.exp(PL[i])
            odds_w, odds_l = math.log(pi_w / (1 - pi_w)), math.log(pi_l / (1 - pi_l))
            v = -PW[i] - lam * (logsig(odds_w) + logsig(-odds_l))
        elif name == "redi":
            v = -params.get("winner_coef", 1.0) * PW[i] + params.get("loser_coef", 0.8) * PL[i]
        else:
            raise AssertionError(f"no expected formula for {name}")
        out.append(v)
    return out


def run(name, *args, beta=BETA, **kwargs):
    args = args or inputs()
    kwargs = {**extras(name, args[0].shape[0]), **kwargs}
    return LOSSES[name](*args, beta=beta, **kwargs)


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_hand_computed_value(name):
    loss, _ = run(name)
    assert loss.shape == (2,)
    assert loss.dtype == torch.float32
    assert loss.tolist() == pytest.approx(expected(name), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "name, params",
    [
        ("smpo", {"gamma": 3.0}),
        ("robust", {"flip_rate": 0.3}),
        ("cdpo", {"label_smoothing": 0.25}),
        ("rpo", {"alpha": 0.5}),
        ("bco", {"reward_shift": 0.05}),
        ("asft", {"odds_weight": 0.7}),
        ("redi", {"winner_coef": 0.5, "loser_coef": 0.2}),
        ("kto", {}),
    ],
)
def test_hand_computed_value_with_params(name, params):
    loss, _ = run(name, **params)
    assert loss.tolist() == pytest.approx(expected(name, **params), rel=1e-5, abs=1e-6)


def test_kto_weights_scale_each_side():
    loss, _ = run("kto", desirable_weight=2.0, undesirable_weight=0.5)
    lw = [pw - rw for pw, rw in zip(PW, RW)]
    ll = [pl - rl for pl, rl in zip(PL, RL)]
    z0 = max(0.0, (sum(lw) + sum(ll)) / 4)
    want = [2.0 * (1 - sig(BETA * (a - z0))) + 0.5 * (1 - sig(BETA * (z0 - b))) for a, b in zip(lw, ll)]
    assert loss.tolist() == pytest.approx(want, rel=1e-6)


def test_kto_z0_clamped_at_zero_and_positive_when_policy_ahead():
    # all log-ratios negative -> z0 = 0; all positive -> z0 = their mean
    _, metrics = run("kto", t([-1.0]), t([-1.0]), t([0.0]), t([0.0]))
    assert metrics["kl"].item() == 0.0
    _, metrics = run("kto", t([1.0]), t([3.0]), t([0.0]), t([0.0]))
    assert metrics["kl"].item() == pytest.approx(2.0)


def test_metrics_values_and_detached():
    pw, pl, rw, rl = inputs(grad=True)
    _, metrics = LOSSES["dpo"](pw, pl, rw, rl, beta=BETA)
    margins = [(a - c) - (b - d) for a, b, c, d in zip(PW, PL, RW, RL)]
    assert metrics["margin"].item() == pytest.approx(sum(margins) / 2)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)  # one positive, one negative margin
    assert metrics["reward_w"].item() == pytest.approx(BETA * sum(a - c for a, c in zip(PW, RW)) / 2, abs=1e-6)
    assert metrics["reward_l"].item() == pytest.approx(BETA * sum(b - d for b, d in zip(PL, RL)) / 2, abs=1e-6)
    for value in metrics.values():
        assert value.ndim == 0 and not value.requires_grad


def test_implicit_acc_counts_ties_half():
    # margins: +, 0, 0, -  -> (1 + 0.5 + 0.5 + 0) / 4
    _, metrics = LOSSES["dpo"](t([1.0, 0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0, 1.0]), t([0.0] * 4), t([0.0] * 4), beta=1.0)
    assert metrics["implicit_acc"].item() == pytest.approx(0.5)
    _, metrics = LOSSES["dpo"](t([1.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=1.0)
    assert metrics["implicit_acc"].item() == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_swapping_winner_and_loser_negates_margin(name):
    pw, pl, rw, rl = inputs()
    _, metrics = run(name, pw, pl, rw, rl)
    _, swapped = run(name, pl, pw, rl, rw)
    assert swapped["margin"].item() == pytest.approx(-metrics["margin"].item())
    assert swapped["reward_w"].item() == pytest.approx(metrics["reward_l"].item())
    assert swapped["reward_l"].item() == pytest.approx(metrics["reward_w"].item())
    assert swapped["implicit_acc"].item() == pytest.approx(1 - metrics["implicit_acc"].item())


def test_dpo_policy_equal_reference_gives_log2_and_half_accuracy():
    x = t([-0.3, -0.1, -0.7])
    y = t([-0.2, -0.5, -0.4])
    loss, metrics = LOSSES["dpo"](x, y, x.clone(), y.clone(), beta=2500.0)
    assert loss.tolist() == pytest.approx([math.log(2)] * 3)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["margin"].item() == 0.0


def test_dpo_beta_matches_original_diffusion_dpo_with_double_beta():
    # Salesforce / SDXL script: loss = -logsigmoid(-0.5 * beta_sdxl * (model_diff - ref_diff)) on MSEs
    mse_w, mse_l, ref_mse_w, ref_mse_l = [0.101, 0.099], [0.098, 0.102], [0.100, 0.100], [0.100, 0.101]
    ours, _ = LOSSES["dpo"](-t(mse_w), -t(mse_l), -t(ref_mse_w), -t(ref_mse_l), beta=2500.0)
    for i in range(2):
        inside = -0.5 * 5000.0 * ((mse_w[i] - mse_l[i]) - (ref_mse_w[i] - ref_mse_l[i]))
        assert ours[i].item() == pytest.approx(-logsig(inside), rel=1e-4)


def test_smpo_soft_label_one_equals_dpo_with_beta_times_gamma():
    pw, pl, rw, rl = inputs()
    smpo, _ = LOSSES["smpo"](pw, pl, rw, rl, beta=BETA, soft_label=t([1.0, 1.0]), gamma=4.0)
    dpo, _ = LOSSES["dpo"](pw, pl, rw, rl, beta=BETA * 4.0)
    torch.testing.assert_close(smpo, dpo)


def test_smpo_half_soft_label_gives_zero_gradient_for_that_pair_only():
    pw, pl, rw, rl = inputs(grad=True)
    loss, _ = LOSSES["smpo"](pw, pl, rw, rl, beta=BETA, soft_label=t([0.5, 0.9]))
    loss.sum().backward()
    assert loss[0].item() == pytest.approx(math.log(2))
    assert pw.grad[0].item() == 0.0 and pl.grad[0].item() == 0.0
    assert pw.grad[1].item() != 0.0 and pl.grad[1].item() != 0.0


def test_smpo_requires_soft_label_in_range():
    pw, pl, rw, rl = inputs()
    with pytest.raises(ValueError, match="soft_label"):
        LOSSES["smpo"](pw, pl, rw, rl, beta=BETA)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LOSSES["smpo"](pw, pl, rw, rl, beta=BETA, soft_label=t([1.2, 0.5]))


def test_robust_with_zero_flip_rate_equals_dpo():
    dpo, _ = run("dpo")
    robust, _ = run("robust", flip_rate=0.0)
    torch.testing.assert_close(robust, dpo)


def test_cdpo_with_zero_smoothing_equals_dpo():
    dpo, _ = run("dpo")
    cdpo, _ = run("cdpo", label_smoothing=0.0)
    torch.testing.assert_close(cdpo, dpo)


def test_sppo_soft_label_one_equals_hard_version():
    hard, _ = run("sppo")
    soft, _ = run("sppo", soft_label=t([1.0, 1.0]))
    torch.testing.assert_close(soft, hard)


@pytest.mark.parametrize("name", [n for n in PAIRED_LOSSES if n != "kto"])
def test_each_pair_uses_only_its_own_values(name):
    # Research code once used probs[0] for the whole batch; a batch must equal its pairs computed one by one.
    pw, pl, rw, rl = inputs()
    batch_loss, _ = run(name, pw, pl, rw, rl)
    for i in range(2):
        kwargs = {"soft_label": t([SOFT[i]])} if name == "smpo" else {}
        single, _ = LOSSES[name](pw[i : i + 1], pl[i : i + 1], rw[i : i + 1], rl[i : i + 1], beta=BETA, **kwargs)
        assert batch_loss[i].item() == pytest.approx(single.item(), rel=1e-6)


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_gradient_step_from_zero_margin_prefers_the_winner(name):
    # Catches sign errors: starting with policy == reference, one descent step must open a positive margin.
    ref_w, ref_l = t([-0.5, -0.3]), t([-0.4, -0.6])
    policy_w, policy_l = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
    loss, _ = run(name, policy_w, policy_l, ref_w, ref_l, beta=1.0)
    loss.sum().backward()
    grad_l = policy_l.grad if policy_l.grad is not None else torch.zeros(2)  # sft never reads the loser
    with torch.no_grad():
        step_w, step_l = policy_w - 0.01 * policy_w.grad, policy_l - 0.01 * grad_l
    _, metrics = run(name, step_w, step_l, ref_w, ref_l, beta=1.0)
    assert metrics["margin"].item() > 0
    assert metrics["implicit_acc"].item() == 1.0


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_finite_loss_and_gradients_in_bfloat16(name):
    # diffusion-scale inputs: -mse around 0.1 with differences around 1e-3, beta at its diffusion default
    pw = t([-0.101, -0.099, -0.5, -0.02], torch.bfloat16, grad=True)
    pl = t([-0.098, -0.102, -0.01, -0.6], torch.bfloat16, grad=True)
    rw = t([-0.100, -0.100, -0.3, -0.05], torch.bfloat16)
    rl = t([-0.100, -0.101, -0.02, -0.4], torch.bfloat16)
    kwargs = {"soft_label": t([0.9, 0.6, 0.5, 1.0])} if name == "smpo" else {}
    loss, metrics = LOSSES[name](pw, pl, rw, rl, beta=L.DIFFUSION_DEFAULT_BETA[name], **kwargs)
    loss.mean().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(pw.grad).all() and pw.grad.dtype == torch.bfloat16
    if name != "sft":  # sft never reads the loser
        assert torch.isfinite(pl.grad).all() and pl.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_per_pair_weight_scales_the_loss(name):
    weight = t([0.25, 3.0])
    plain, plain_metrics = run(name)
    weighted, metrics = run(name, weight=weight)
    torch.testing.assert_close(weighted, plain * weight)
    torch.testing.assert_close(weighted, t([v * w for v, w in zip(expected(name), [0.25, 3.0])]), rtol=1e-5, atol=1e-6)
    # the weight scales the loss only; what the metrics report about the pairs is unchanged
    assert metrics.pop("weight_mean").item() == pytest.approx(1.625)
    assert metrics.keys() == plain_metrics.keys()
    for key in metrics:
        assert torch.equal(metrics[key], plain_metrics[key]), key


def loss_and_grads(name, **kwargs):
    """The per-pair loss and the gradients of its sum with respect to policy_w and policy_l (zeros if unused)."""
    pw, pl, rw, rl = inputs(grad=True)
    loss, _ = run(name, pw, pl, rw, rl, **kwargs)
    loss.sum().backward()
    return loss.detach(), [g if g is not None else torch.zeros(2) for g in (pw.grad, pl.grad)]


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_unit_weight_is_exactly_the_unweighted_loss(name):
    plain, plain_grads = loss_and_grads(name)
    weighted, grads = loss_and_grads(name, weight=torch.ones(2))
    assert torch.equal(weighted, plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("name", PAIRED_LOSSES)
def test_weight_scales_each_pairs_gradient(name):
    # each pair's loss depends only on its own estimates (kto's z0 and bco's batch mean are detached), so the
    # gradient of sum(w * loss) with respect to pair i is w_i times the unweighted one
    weight = t([0.25, 3.0])
    _, plain_grads = loss_and_grads(name)
    _, grads = loss_and_grads(name, weight=weight)
    assert plain_grads[0].abs().sum() > 0
    for plain, weighted in zip(plain_grads, grads):
        torch.testing.assert_close(weighted, plain * weight)


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_unpaired_weight_is_per_item(name):
    pw, pl, rw, rl = inputs()
    items = (torch.cat([pw, pl]), None, torch.cat([rw, rl]), None)
    label = t([1, 1, 0, 0])
    weight = t([0.5, 2.0, 0.0, 1.5])
    plain, _ = LOSSES[name](*items, beta=BETA, label=label)
    weighted, metrics = LOSSES[name](*items, beta=BETA, label=label, weight=weight)
    assert weighted.shape == (4,)
    torch.testing.assert_close(weighted, plain * weight)
    assert metrics["weight_mean"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="`weight` has 2 entries"):
        LOSSES[name](*items, beta=BETA, label=label, weight=t([1.0, 1.0]))


@pytest.mark.parametrize(
    "weight, message",
    [
        ([1.0, -0.5], r"dpo: `weight` must be finite and >= 0 .*entry 1 is -0.5"),
        ([float("nan"), 1.0], r"dpo: `weight` must be finite and >= 0 .*entry 0 is nan"),
        ([1.0, float("inf")], r"entry 1 is inf"),
        ([1.0, 1.0, 1.0], r"dpo: `weight` has 3 entries but policy_w has 2"),
        ([[1.0, 1.0]], r"dpo: `weight` must have shape \[pairs\]"),
    ],
)
def test_bad_weight_is_refused_naming_the_entry(weight, message):
    with pytest.raises(ValueError, match=message):
        run("dpo", weight=t(weight))


def test_weight_is_in_every_loss_signature_and_not_a_config_parameter():
    import inspect

    for name, fn in LOSSES.items():
        param = inspect.signature(fn).parameters["weight"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None, name
        assert "weight" not in L.loss_params(name), name
    with pytest.raises(UnknownLossError, match="'weight' is not a loss parameter"):
        check_loss_params("dpo", {"weight": 1.0})


@pytest.mark.parametrize("name", ["dpo", "robust", "kto"])
def test_zero_weight_removes_gradient_of_that_pair(name):
    pw, pl, rw, rl = inputs(grad=True)
    loss, _ = run(name, pw, pl, rw, rl, weight=t([0.0, 1.0]))
    loss.sum().backward()
    assert pw.grad[0].item() == 0.0
    assert pw.grad[1].item() != 0.0


@pytest.mark.parametrize("name", ["sft", "asft", "redi"])
def test_reference_free_losses_accept_no_reference(name):
    pw, pl, rw, rl = inputs()
    with_ref, _ = run(name, pw, pl, rw, rl)
    without_ref, metrics = run(name, pw, pl, None, None)
    torch.testing.assert_close(without_ref, with_ref)
    assert metrics["margin"].item() == pytest.approx(sum(a - b for a, b in zip(PW, PL)) / 2)


@pytest.mark.parametrize("name", ["dpo", "kto", "bco", "nca"])
def test_losses_that_need_a_reference_refuse_none(name):
    pw, pl, _, rl = inputs()
    with pytest.raises(ValueError, match=r"ref_w.*reference-free loss \(asft, redi, sft\)"):
        LOSSES[name](pw, pl, None, rl, beta=BETA)


def test_the_missing_reference_hint_names_every_reference_free_loss():
    def accepts_no_reference(name):
        try:
            run(name, t(PW), t(PL), None, None)
        except ValueError:
            return False
        return True

    assert {name for name in LOSSES if accepts_no_reference(name)} == {"sft", "asft", "redi"} == REFERENCE_FREE


def test_the_declared_soft_label_losses_are_those_that_accept_one():
    def accepts_soft_label(name):
        try:
            run(name, t(PW), t(PL), t(RW), t(RL), soft_label=t([0.9] * len(PW)))
        except ValueError:
            return False
        return True

    assert {name for name in LOSSES if accepts_soft_label(name)} == TAKES_SOFT_LABEL


def test_asft_rejects_positive_log_likelihood():
    with pytest.raises(ValueError, match="<= 0"):
        LOSSES["asft"](t([0.1]), t([-0.2]), None, None, beta=1.0)


def test_asft_finite_when_loser_likelihood_is_one():
    pw, pl = t([-0.1], grad=True), t([0.0], grad=True)
    loss, _ = LOSSES["asft"](pw, pl, None, None, beta=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pl.grad).all()


def test_bad_inputs_name_the_argument():
    pw, pl, rw, rl = inputs()
    with pytest.raises(ValueError, match="policy_l"):
        LOSSES["dpo"](pw, pl[:1], rw, rl, beta=BETA)
    with pytest.raises(ValueError, match=r"\[pairs\]"):
        LOSSES["dpo"](pw[None], pl, rw, rl, beta=BETA)
    with pytest.raises(ValueError, match="beta"):
        LOSSES["dpo"](pw, pl, rw, rl, beta=0.0)
    with pytest.raises(ValueError, match="soft_label"):
        LOSSES["dpo"](pw, pl, rw, rl, beta=BETA, soft_label=t([0.9, 0.9]))
    with pytest.raises(ValueError, match="flip_rate"):
        LOSSES["robust"](pw, pl, rw, rl, beta=BETA, flip_rate=0.5)


# -------------------------------------------------------------------------------------------- kto / bco unpaired


def test_kto_unpaired_on_paired_items_matches_paired_sum():
    pw, pl, rw, rl = inputs()
    paired, paired_metrics = run("kto", pw, pl, rw, rl)
    items, item_metrics = LOSSES["kto"](
        torch.cat([pw, pl]), None, torch.cat([rw, rl]), None, beta=BETA, label=t([1, 1, 0, 0])
    )
    assert items.shape == (4,)
    torch.testing.assert_close(items[:2] + items[2:], paired)
    assert item_metrics["margin"].item() == pytest.approx(paired_metrics["margin"].item())
    assert item_metrics["reward_w"].item() == pytest.approx(paired_metrics["reward_w"].item())


def test_kto_unpaired_hand_value_and_metrics():
    policy, ref, label = [-0.1, -0.4, -0.2], [-0.3, -0.3, -0.1], [1, 0, 1]
    loss, metrics = LOSSES["kto"](t(policy), None, t(ref), None, beta=BETA, label=t(label))
    ratios = [p - r for p, r in zip(policy, ref)]  # 0.2, -0.1, -0.1
    z0 = max(0.0, sum(ratios) / 3)
    want = [(1 - sig(BETA * (x - z0))) if y else (1 - sig(BETA * (z0 - x))) for x, y in zip(ratios, label)]
    assert loss.tolist() == pytest.approx(want, rel=1e-5)
    # item 0 right (above z0, desirable), item 1 right (below, undesirable), item 2 wrong
    assert metrics["implicit_acc"].item() == pytest.approx(2 / 3)
    assert metrics["reward_w"].item() == pytest.approx(BETA * (0.2 - 0.1) / 2)
    assert metrics["reward_l"].item() == pytest.approx(BETA * -0.1)


def test_unpaired_metrics_of_an_empty_group_are_zero_and_groups_stay_apart():
    """An all-desirable batch reports reward_l = 0 (not NaN), and a huge value in one group does not leak into the
    other's mean (the means are taken on the device, without indexing by the mask)."""
    policy, ref = t([-0.1, -0.4]), t([-0.3, -0.3])
    _, metrics = LOSSES["kto"](policy, None, ref, None, beta=BETA, label=t([1, 1]))
    assert metrics["reward_l"].item() == 0.0
    assert metrics["reward_w"].item() == pytest.approx(BETA * (0.2 - 0.1) / 2)
    _, metrics = LOSSES["kto"](t([-0.1, float("-inf")]), None, t([-0.3, 0.0]), None, beta=BETA, label=t([1, 0]))
    assert metrics["reward_w"].item() == pytest.approx(BETA * 0.2)


def test_unpaired_mode_refuses_loser_inputs_and_bad_labels():
    pw, pl, rw, rl = inputs()
    with pytest.raises(ValueError, match="policy_l=None"):
        LOSSES["kto"](pw, pl, rw, rl, beta=BETA, label=t([1, 0]))
    with pytest.raises(ValueError, match="label"):
        LOSSES["bco"](pw, None, rw, None, beta=BETA, label=t([1, 2]))
    with pytest.raises(ValueError, match="label"):
        LOSSES["dpo"](pw, pl, rw, rl, beta=BETA, label=t([1, 0]))


def test_bco_unpaired_hand_value_and_batch_reward():
    policy, ref, label, delta = [-0.1, -0.4], [-0.3, -0.3], [1, 0], 0.1
    loss, metrics = LOSSES["bco"](t(policy), None, t(ref), None, beta=BETA, label=t(label), reward_shift=delta)
    r = [BETA * (p - q) for p, q in zip(policy, ref)]
    assert loss.tolist() == pytest.approx([-logsig(r[0] - delta), -logsig(-(r[1] - delta))], rel=1e-5)
    assert metrics["reward_batch_mean"].item() == pytest.approx(sum(r) / 2)


def test_bco_reports_batch_mean_reward_and_running_mean_tracks_it():
    _, metrics = run("bco")
    rewards = [BETA * (a - c) for a, c in zip(PW, RW)] + [BETA * (b - d) for b, d in zip(PL, RL)]
    assert metrics["reward_batch_mean"].item() == pytest.approx(sum(rewards) / 4)
    running = RunningMean()
    running.update(1.0, count=4)
    running.update(4.0, count=2)
    assert running.mean == pytest.approx((4 * 1.0 + 2 * 4.0) / 6)
    restored = RunningMean()
    restored.load_state_dict(running.state_dict())
    assert restored.mean == running.mean and restored.count == 6
    with pytest.raises(ValueError, match="finite"):
        running.update(float("nan"))


def test_declared_loss_state_feeds_the_loss_its_runtime_keywords_and_learns_from_its_metrics():
    """LOSS_STATE: what the trainer keeps for a stateful loss. The state's keywords are exactly the loss's run-time
    parameters (which a config may not set); bco's shift is the running mean over both sides of every pair."""
    from diffusion_pref.losses import _RUNTIME_PARAMS, LOSS_STATE, RewardShift

    assert set(LOSS_STATE) == set(_RUNTIME_PARAMS)
    for name, state_class in LOSS_STATE.items():
        assert set(state_class().loss_kwargs()) == set(_RUNTIME_PARAMS[name])
    state = LOSS_STATE["bco"]()
    assert isinstance(state, RewardShift) and state.loss_kwargs() == {"reward_shift": 0.0}
    _, metrics = run("bco", **state.loss_kwargs())
    state.observe({k: v.item() for k, v in metrics.items()}, pairs=len(PW))
    state.observe({"reward_batch_mean": 4.0}, pairs=1)  # a second step of one pair: weight 2 against 2 * 2
    first = metrics["reward_batch_mean"].item()
    assert state.loss_kwargs()["reward_shift"] == pytest.approx((2 * len(PW) * first + 2 * 4.0) / (2 * len(PW) + 2))
    restored = LOSS_STATE["bco"]()
    restored.load_state_dict(state.state_dict())
    assert restored.loss_kwargs() == state.loss_kwargs()


# ------------------------------------------------------------------------------------- registry and params check


def test_registry_lists_every_loss_of_the_issue():
    assert set(LOSSES) == {
        "dpo", "smpo", "ipo", "hinge", "robust", "cdpo", "rpo", "sft",
        "kto", "bco", "sppo", "nca", "apo_zero", "apo_down", "asft", "redi",
    }  # fmt: skip
    assert get_loss("ipo") is LOSSES["ipo"]
    assert set(L.DIFFUSION_DEFAULT_BETA) == set(LOSSES)


def test_unknown_loss_names_nearest_and_lists_choices():
    with pytest.raises(UnknownLossError) as info:
        get_loss("dpp")
    message = str(info.value)
    assert "did you mean 'dpo'" in message
    assert "apo_zero" in message and "smpo" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_unknown_loss_param_names_nearest_and_lists_valid():
    with pytest.raises(UnknownLossError) as info:
        check_loss_params("robust", {"flip_rat": 0.2})
    assert "did you mean 'flip_rate'" in str(info.value)
    assert "Valid parameters: flip_rate" in str(info.value)
    with pytest.raises(UnknownLossError, match="Valid parameters: desirable_weight, undesirable_weight"):
        check_loss_params("kto", {"desirable": 1.0})
    with pytest.raises(UnknownLossError, match="Valid parameters: none"):
        check_loss_params("dpo", {"gamma": 1.0})
    with pytest.raises(UnknownLossError, match="loss.beta"):
        check_loss_params("dpo", {"beta": 1.0})
    with pytest.raises(UnknownLossError, match="run time"):
        check_loss_params("bco", {"reward_shift": 1.0})


def test_check_loss_params_fills_defaults_and_checks_values():
    assert check_loss_params("smpo", {}) == {"gamma": 10.0}
    assert check_loss_params("redi", {"loser_coef": 0.5}) == {"winner_coef": 1.0, "loser_coef": 0.5}
    with pytest.raises(TypeError, match="flip_rate"):
        check_loss_params("robust", {"flip_rate": "0.1"})
    with pytest.raises(ValueError, match=r"flip_rate.*\[0.0, 0.5\)"):
        check_loss_params("robust", {"flip_rate": 0.6})
    with pytest.raises(ValueError, match="label_smoothing"):
        check_loss_params("cdpo", {"label_smoothing": -0.1})


def test_every_configurable_param_has_a_range_checked_by_config_and_loss():
    for name in LOSSES:
        assert set(L.loss_params(name)) == set(L._PARAM_RANGES.get(name, {})), name
    # the same range in both places: a config value the loss would refuse is refused at load time
    with pytest.raises(ValueError, match=r"desirable_weight.*\[0.0, inf\)"):
        check_loss_params("kto", {"desirable_weight": -1.0})
    with pytest.raises(ValueError, match=r"desirable_weight.*\[0.0, inf\)"):
        run("kto", desirable_weight=-1.0)


def test_every_configurable_param_is_accepted_by_its_loss():
    # check_loss_params and the function signatures must agree, or configs would pass and training would fail
    for name in LOSSES:
        params = check_loss_params(name, {})
        loss, _ = run(name, **params)
        assert loss.tolist() == pytest.approx(expected(name, **params), rel=1e-5, abs=1e-6)


def test_importing_losses_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, diffusion_pref.losses; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -------------------------------------------------------------------------------------------- diffusion helper


def test_denoising_log_likelihood_is_negative_mse_per_sample_in_float32():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.5]]], dtype=torch.bfloat16)
    target = torch.zeros_like(pred)
    ll = L.denoising_log_likelihood(pred, target)
    assert ll.dtype == torch.float32
    assert ll.tolist() == pytest.approx([-(1 + 4 + 9 + 16) / 4, -(0.25) / 4])
    with pytest.raises(ValueError, match="shape"):
        L.denoising_log_likelihood(pred, target[:1])


# ------------------------------------------------------------------------- cross-check against TRL 0.28 losses


def _trl():
    """TRL 0.28 exposes its losses as methods that only read a few attributes of `self` (no trainer needed)."""
    trl = pytest.importorskip("trl")
    if not trl.__version__.startswith("0.28"):
        pytest.skip(f"cross-check pinned to trl 0.28 (dpo_loss method API), found {trl.__version__}")
    import trl.import_utils as trl_imports

    # trl 0.28 expects transformers 4.x's `_is_package_available` (a bool); 5.x returns (bool, version), which
    # would make trl import optional packages it does not have.
    original = trl_imports._is_package_available

    def is_available(name, return_version=False):
        result = original(name)
        available, version = result if isinstance(result, tuple) else (result, None)
        return (available, version) if return_version else available

    trl_imports._is_package_available = is_available
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "importing from trl.experimental" is expected here
        from trl.experimental.kto.kto_trainer import KTOTrainer
    from trl.trainer.dpo_config import FDivergenceType
    from trl.trainer.dpo_trainer import DPOTrainer

    return DPOTrainer, KTOTrainer, FDivergenceType


# ours -> (TRL loss_type, TRL label_smoothing, our extra params)
TRL_DPO_EQUIVALENTS = {
    "dpo": ("sigmoid", 0.0, {}),
    "cdpo": ("sigmoid", 0.2, {"label_smoothing": 0.2}),
    "hinge": ("hinge", 0.0, {}),
    "ipo": ("ipo", 0.0, {}),
    "robust": ("robust", 0.2, {"flip_rate": 0.2}),
    "nca": ("nca_pair", 0.0, {}),
    "bco": ("bco_pair", 0.0, {"reward_shift": 0.3}),
    "sppo": ("sppo_hard", 0.0, {}),
    "apo_zero": ("apo_zero", 0.0, {}),
    "apo_down": ("apo_down", 0.0, {}),
}


def _random_pairs(seed, pairs=6):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(pairs, generator=g) for _ in range(4)]


@pytest.mark.parametrize("name", sorted(TRL_DPO_EQUIVALENTS))
def test_matches_trl_dpo_loss(name):
    DPOTrainer, _, FDivergenceType = _trl()
    loss_type, smoothing, params = TRL_DPO_EQUIVALENTS[name]
    pw, pl, rw, rl = _random_pairs(seed=len(name))
    fake_trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
        reference_free=False,
        f_divergence_type=FDivergenceType.REVERSE_KL,
        f_divergence_params=None,
        beta=1.7,
        label_smoothing=smoothing,
        # bco_pair updates then reads a running mean; freeze it at our shift
        running=types.SimpleNamespace(update=lambda value: None, mean=params.get("reward_shift", 0.0)),
    )
    trl_loss, trl_reward_w, trl_reward_l = DPOTrainer.dpo_loss(fake_trainer, pw, pl, rw, rl, loss_type=loss_type)
    ours, metrics = LOSSES[name](pw, pl, rw, rl, beta=1.7, **params)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    assert metrics["reward_w"].item() == pytest.approx(trl_reward_w.mean().item(), rel=1e-5)
    assert metrics["reward_l"].item() == pytest.approx(trl_reward_l.mean().item(), rel=1e-5)


@pytest.mark.parametrize("seed, shift", [(0, 0.0), (1, 0.5)])
def test_matches_trl_kto_loss(seed, shift):
    _, KTOTrainer, _ = _trl()
    pw, pl, rw, rl = _random_pairs(seed)
    pw, pl = pw + shift, pl + shift  # shift > 0 makes z0 positive, so the KL term is exercised
    fake_trainer = types.SimpleNamespace(
        calculate_KL=True,
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, device=torch.device("cpu")),
        beta=1.3,
        loss_type="kto",
        desirable_weight=1.5,
        undesirable_weight=0.75,
    )
    # our z0 is the batch mean over every item: hand TRL the same items as its "KL completions"
    trl_losses, _, _, trl_kl = KTOTrainer.kto_loss(
        fake_trainer, pw, pl, torch.cat([pw, pl]), rw, rl, torch.cat([rw, rl])
    )
    ours, metrics = LOSSES["kto"](pw, pl, rw, rl, beta=1.3, desirable_weight=1.5, undesirable_weight=0.75)
    pairs = pw.shape[0]
    # TRL returns one loss per item (winners then losers); ours sums the two items of a pair
    torch.testing.assert_close(ours, trl_losses[:pairs] + trl_losses[pairs:], rtol=1e-5, atol=1e-6)
    # Both are the float32 mean of the same 2 * pairs log-ratios, summed in another order (and by kernels of another
    # SIMD width on another CPU): a reordered sum of n terms moves by at most about n * eps * max |term|.
    terms = torch.cat([pw - rw, pl - rl])
    reorder = terms.numel() * torch.finfo(torch.float32).eps * terms.abs().max().item()
    assert metrics["kl"].item() == pytest.approx(float(trl_kl), abs=reorder)
    if shift:
        assert metrics["kl"].item() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smpo_takes_host_soft_labels_with_cuda_inputs():
    """Soft labels on the host with inputs on a GPU are copied over by the loss (the trainer moves them itself)."""
    from diffusion_pref.losses import LOSSES

    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (-torch.rand(4, generator=g) for _ in range(4))
    p = torch.tensor([0.9, 0.2, 0.5, 1.0])
    on_cpu, _ = LOSSES["smpo"](pw, pl, rw, rl, beta=100.0, soft_label=p)
    on_gpu, _ = LOSSES["smpo"](*(x.cuda() for x in (pw, pl, rw, rl)), beta=100.0, soft_label=p)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    on_device, _ = LOSSES["smpo"](*(x.cuda() for x in (pw, pl, rw, rl)), beta=100.0, soft_label=p.cuda())
    torch.testing.assert_close(on_device.cpu(), on_cpu)

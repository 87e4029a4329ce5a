"""Preference losses as pure functions, one registry, and the diffusion log-likelihood helper.

Every loss takes log-likelihood estimates of the winner and the loser under the policy and the reference,
``policy_w, policy_l, ref_w, ref_l`` (each ``[pairs]``), and returns ``(loss_per_pair, metrics)``: the loss
has shape ``[pairs]`` (the trainer reduces it) and ``metrics`` is a dict of detached scalar tensors with at
least ``implicit_acc``, ``margin``, ``reward_w`` and ``reward_l``.

    from diffusion_pref.losses import LOSSES, denoising_log_likelihood
    policy_w, policy_l = denoising_log_likelihood(pred, target).chunk(2)   # pred, target: [2B, C, H, W], [w; l]
    ref_w, ref_l = denoising_log_likelihood(ref_pred, target).chunk(2)
    loss_per_pair, metrics = LOSSES["dpo"](policy_w, policy_l, ref_w, ref_l, beta=2500.0)
    loss = loss_per_pair.mean()

What the estimate is:

- Language model: the (summed or length-normalised) token log-probability of the completion.
- Diffusion model: ``-mean_{C,H,W}(pred - target)^2`` at a timestep and noise shared by the two sides of a pair
  (:func:`denoising_log_likelihood`). This is the Diffusion-DPO ELBO term with ``T * omega(lambda_t)`` folded
  into beta, so "raise the log-likelihood" means "lower the denoising error".

Sign convention and beta (the same for every loss here). The log-ratio of one side is ``l = policy - ref`` and
the margin is ``h = l_w - l_l``. For diffusion, ``h = (ref_mse_w - mse_w) - (ref_mse_l - mse_l)``, which is the
``logits = ref_diff - model_diff`` of diffusers' ``train_diffusion_dpo.py``. So **our beta equals the diffusers
``train_diffusion_dpo.py`` beta (default 2500) and is half of the beta of the original Diffusion-DPO code and the
diffusers SDXL script** (they compute ``-0.5 * beta * (model_diff - ref_diff)``; their 5000 is our 2500).
For language models the usual beta is about 0.1 (TRL's default).

All losses compute in float32 whatever the input dtype (bfloat16 inputs keep their gradient path) because
``beta * h`` with beta in the thousands and ``h`` around 1e-4 loses most of its digits in bfloat16.

Per-pair weights: every loss takes ``weight`` (``[pairs]``, finite and >= 0, None = unweighted) and returns
``weight * loss_per_pair`` (plus ``metrics["weight_mean"]``); the registry applies it, the same way for every loss
(Sem-DPO's semantic weight, per-pair confidence). For kto and bco on unpaired data (``label`` given) the loss is per
item, so ``weight`` is per item too. The trainer's mean over pairs is not divided by the weights' sum: weights
below 1 also shrink the step, as in Sem-DPO's ``-E[W log sigmoid(beta h)]``.

Adding a loss: write one function with the common signature, add one line to :data:`LOSSES`, and add a test
against its formula in ``tests/test_losses.py``. Torch is imported inside functions so that importing this
module (the config layer calls :func:`check_loss_params`) stays cheap.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING, Any, Callable

from diffusion_pref.suggest import did_you_mean

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOSSES",
    "DIFFUSION_DEFAULT_BETA",
    "REFERENCE_FREE",
    "TAKES_SOFT_LABEL",
    "LOSS_STATE",
    "RewardShift",
    "RunningMean",
    "UnknownLossError",
    "check_loss_params",
    "denoising_log_likelihood",
    "get_loss",
    "loss_params",
]

Metrics = dict[str, "torch.Tensor"]

# Keyword-only parameters every loss shares. They come from the batch or from `loss.beta`, not from the
# loss-specific params dict that the config layer validates.
_COMMON_PARAMS = ("beta", "weight", "soft_label", "label")
# Parameters the trainer supplies at run time (running state), so a config file must not set them.
_RUNTIME_PARAMS = {"bco": ("reward_shift",)}


# What a loss reads beside the policy estimates, declared here so the trainer need not guess: the losses that take
# no reference model, and those that take a per-pair soft label P(winner preferred). Tests check both sets
# against what the functions accept.
REFERENCE_FREE = frozenset({"sft", "asft", "redi"})
TAKES_SOFT_LABEL = frozenset({"smpo", "sppo"})

_NEEDS_REFERENCE_HINT = (
    f"pass the reference model's estimates, or choose a reference-free loss ({', '.join(sorted(REFERENCE_FREE))})."
)


# --------------------------------------------------------------------------------------------- diffusion helper


def denoising_log_likelihood(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample log-likelihood estimate ``-mean over all non-batch dims of (pred - target)^2``, in float32.

    ``pred`` and ``target`` are ``[N, ...]`` (e.g. ``[2B, C, H, W]`` in the ``[w; l]`` layout); returns ``[N]``.
    float32 because the preference signal is a small difference of two MSEs, which bfloat16 would round away.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"denoising_log_likelihood: pred has shape {tuple(pred.shape)} but target has shape "
            f"{tuple(target.shape)}; they must match (both [N, ...] in the same [w; l] order)."
        )
    if pred.ndim < 2:
        raise ValueError(
            f"denoising_log_likelihood: expected [N, ...] with at least one non-batch dim, got shape "
            f"{tuple(pred.shape)}."
        )
    diff = pred.float() - target.float()
    return -diff.pow(2).mean(dim=tuple(range(1, diff.ndim)))


# ------------------------------------------------------------------------------------------------ shared pieces


def _as_float32(name: str, loss: str, value, pairs: int | None):
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{loss}: `{name}` must be a torch.Tensor of shape [pairs], got {type(value).__name__}.")
    if value.ndim != 1:
        raise ValueError(f"{loss}: `{name}` must have shape [pairs], got shape {tuple(value.shape)}.")
    if pairs is not None and value.shape[0] != pairs:
        raise ValueError(
            f"{loss}: `{name}` has {value.shape[0]} entries but policy_w has {pairs}; every per-pair input "
            "must have one entry per pair."
        )
    return value.float()


def _check_beta(loss: str, beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{loss}: beta must be a positive finite number, got {beta!r}.")
    return float(beta)


def _prepare(loss: str, policy_w, policy_l, ref_w, ref_l, beta, *, ref_optional: bool = False):
    """Validate shapes and beta; return float32 ``policy_w, policy_l, ref_w, ref_l, beta``.

    A missing reference (only allowed for reference-free losses) becomes zeros, so metrics read the policy's
    own log-likelihoods as the "log-ratios".
    """
    import torch

    beta = _check_beta(loss, beta)
    policy_w = _as_float32("policy_w", loss, policy_w, None)
    pairs = policy_w.shape[0]
    policy_l = _as_float32("policy_l", loss, policy_l, pairs)
    refs = []
    for name, ref in (("ref_w", ref_w), ("ref_l", ref_l)):
        if ref is None:
            if not ref_optional:
                raise ValueError(f"{loss}: `{name}` is None but this loss needs the reference log-likelihoods; "
                                 f"{_NEEDS_REFERENCE_HINT}")
            refs.append(torch.zeros_like(policy_w).detach())
        else:
            refs.append(_as_float32(name, loss, ref, pairs))
    return policy_w, policy_l, refs[0], refs[1], beta


def _reject_unused(loss: str, *, soft_label=None, label=None) -> None:
    # Passing a per-pair input that the chosen loss ignores is almost always a wiring mistake; say so.
    if soft_label is not None:
        raise ValueError(f"{loss}: `soft_label` was given but {loss} does not use it (smpo and sppo do).")
    if label is not None:
        raise ValueError(f"{loss}: `label` was given but {loss} does not use it (kto and bco do).")


def _pair_metrics(log_ratio_w, log_ratio_l, beta: float, **extra) -> Metrics:
    import torch

    with torch.no_grad():
        margin = (log_ratio_w - log_ratio_l).detach()
        metrics = {
            "implicit_acc": (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean(),
            "margin": margin.mean(),
            "reward_w": beta * log_ratio_w.detach().mean(),
            "reward_l": beta * log_ratio_l.detach().mean(),
        }
        metrics.update({k: v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in extra.items()})
    return metrics


def _check_weight(loss: str, weight, loss_per_pair):
    """Validated weights on the loss's device (the trainer hands them over on that device already)."""
    import torch

    weight = _as_float32("weight", loss, weight, loss_per_pair.shape[0])
    bad = (~torch.isfinite(weight)) | (weight < 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{loss}: `weight` must be finite and >= 0 for every pair (0 drops a pair); entry {index} is "
            f"{weight[index].item()!r}."
        )
    return weight.to(loss_per_pair.device, non_blocking=True)


def _with_weight(name: str, fn: Callable[..., tuple[Any, Metrics]]) -> Callable[..., tuple[Any, Metrics]]:
    """``fn`` plus the keyword ``weight``, the one place where per-pair weights are applied.

    A loss function computes its unweighted ``[pairs]`` loss; this multiplies it by ``weight`` (None: unweighted)
    and adds ``metrics["weight_mean"]``. Doing it here, not in each loss, keeps it the same for every loss.
    """

    @functools.wraps(fn)
    def weighted(*args, weight=None, **kwargs):
        loss, metrics = fn(*args, **kwargs)
        if weight is None:
            return loss, metrics
        weight = _check_weight(name, weight, loss)
        metrics["weight_mean"] = weight.detach().mean()
        return loss * weight, metrics

    # help() and inspect show `weight` beside the loss's own keywords.
    params = list(inspect.signature(fn).parameters.values())
    at = [param.name for param in params].index("beta") + 1
    params.insert(at, inspect.Parameter("weight", inspect.Parameter.KEYWORD_ONLY, default=None))
    weighted.__signature__ = inspect.signature(fn).replace(parameters=params)
    return weighted


def _soft_label(loss: str, soft_label, pairs: int, *, required: bool, device=None):
    """Validated soft labels on ``device`` (the trainer hands them over on that device already)."""
    if soft_label is None:
        if required:
            raise ValueError(
                f"{loss}: `soft_label` (P(winner preferred) per pair, shape [pairs]) is required; build it from "
                "the reward gap of each pair, e.g. sigmoid(r'_w - r'_l) on min-max-normalised rewards."
            )
        return None
    soft_label = _as_float32("soft_label", loss, soft_label, pairs)
    if bool(((soft_label < 0) | (soft_label > 1) | soft_label.isnan()).any()):
        raise ValueError(f"{loss}: `soft_label` must lie in [0, 1] (a probability), got {soft_label.tolist()}.")
    return soft_label.detach().to(device if device is not None else soft_label.device, non_blocking=True)


def _check_range(loss: str, name: str, value, low: float, high: float, *, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{loss}: `{name}` must be a finite number, got {value!r}.")
    too_high = value >= high if high_open else value > high
    if value < low or too_high:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{loss}: `{name}` must lie in [{low}, {high}{bracket}, got {value!r}.")
    return float(value)


_NON_NEGATIVE = (0.0, math.inf, True)
# Allowed [low, high] of each loss-specific parameter (True: high excluded). The loss checks its arguments and
# check_loss_params checks a config against the same table, so a bad value fails before any model is loaded.
_PARAM_RANGES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "smpo": {"gamma": _NON_NEGATIVE},
    "robust": {"flip_rate": (0.0, 0.5, True)},
    "cdpo": {"label_smoothing": (0.0, 0.5, False)},
    "rpo": {"alpha": _NON_NEGATIVE},
    "kto": {"desirable_weight": _NON_NEGATIVE, "undesirable_weight": _NON_NEGATIVE},
    "asft": {"odds_weight": _NON_NEGATIVE},
    "redi": {"winner_coef": _NON_NEGATIVE, "loser_coef": _NON_NEGATIVE},
}


def _param(loss: str, name: str, value) -> float:
    low, high, high_open = _PARAM_RANGES[loss][name]
    return _check_range(loss, name, value, low, high, high_open=high_open)


# ------------------------------------------------------------------------------------------------------- losses


def dpo(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """DPO, the sigmoid loss: ``-log sigmoid(beta * h)``, ``h = (policy_w - ref_w) - (policy_l - ref_l)``.

    Rafailov et al., arXiv 2305.18290, Eq. 7; for diffusion, Wallace et al. (Diffusion-DPO), arXiv 2311.12908,
    their final objective (Eq. 14; number not re-checked) with ``T * omega(lambda_t)`` folded into beta.
    Diffusion: pushes the policy's denoising error on the winner down relative to the reference, and on the
    loser up. Sign convention: our beta = diffusers ``train_diffusion_dpo.py`` beta (2500) = half of the
    original Diffusion-DPO / SDXL-script beta (5000 there = 2500 here).
    """
    import torch.nn.functional as F

    _reject_unused("dpo", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("dpo", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    loss = -F.logsigmoid(beta * (log_ratio_w - log_ratio_l))
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def smpo(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None, gamma=10.0):
    """SmPO (smoothed preference optimisation): ``-log sigmoid(gamma * (2p - 1) * beta * h)``, per pair.

    Lu et al., arXiv 2506.02698 (ICML 2025; equation number not checked). The geometric-mixture preference
    likelihood multiplies the DPO logit by ``2 alpha - gamma = gamma (2p - 1)``, with ``p = alpha / gamma`` =
    P(winner preferred) given per pair as ``soft_label`` (required). The SmPO code uses
    ``p = sigmoid(r'_w - r'_l)`` on min-max-normalised PickScores and gamma = 10. Each pair uses its own p,
    never one pair's value for the batch. p = 1 gives dpo with beta * gamma; p = 0.5 makes the logit 0, so the
    pair's loss is the constant log 2 with zero gradient.
    Diffusion: as dpo, with the push scaled by how confidently the reward model prefers the winner. The SmPO
    code's SD1.5 beta of 2000 is 1000 here (same halving as Diffusion-DPO). Sign convention: our beta =
    diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO / SDXL-script beta.
    """
    import torch.nn.functional as F

    _reject_unused("smpo", label=label)
    gamma = _param("smpo", "gamma", gamma)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("smpo", policy_w, policy_l, ref_w, ref_l, beta)
    p = _soft_label("smpo", soft_label, policy_w.shape[0], required=True, device=policy_w.device)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    scale = gamma * (2.0 * p - 1.0)  # [pairs]
    loss = -F.logsigmoid(scale * beta * (log_ratio_w - log_ratio_l))
    metrics = _pair_metrics(log_ratio_w, log_ratio_l, beta, soft_label_mean=p.mean())
    return loss, metrics


def ipo(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """IPO: ``(h - 1/(2*beta))^2``, beta playing the role of IPO's tau.

    Azar et al., arXiv 2310.12036, Eq. 17. TRL averages LM log-probs per token for IPO; pass length-normalised
    estimates to match. Diffusion: regresses the margin onto the absolute target ``1/(2 beta)`` (2e-4 at
    beta 2500), so beta must be tuned separately from dpo's; this is diffusers' ``--loss_type ipo``.
    Sign convention: our beta = diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    _reject_unused("ipo", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("ipo", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    loss = (log_ratio_w - log_ratio_l - 1.0 / (2.0 * beta)).pow(2)
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def hinge(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """Hinge (SLiC / RSO hinge-norm): ``max(0, 1 - beta * h)``; the margin is ``1/beta``.

    Zhao et al. (SLiC-HF), arXiv 2305.10425, the rank-calibration hinge term; Liu et al. (RSO), arXiv 2309.06657,
    the "hinge-norm" loss ``max(0, 1 - gamma h)`` with gamma = beta (equation numbers not checked). Diffusion:
    diffusers' ``--loss_type hinge``; pairs whose margin already exceeds ``1/beta`` contribute nothing. Sign
    convention: our beta = diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch

    _reject_unused("hinge", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("hinge", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    loss = torch.relu(1.0 - beta * (log_ratio_w - log_ratio_l))
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def robust(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None, flip_rate=0.1):
    """Robust DPO (rDPO): ``[(1-e) L(w,l) - e L(l,w)] / (1 - 2e)`` with ``L(w,l) = -log sigmoid(beta h)``.

    Chowdhury et al., arXiv 2403.00409, the de-biased loss (equation number not checked): unbiased under label
    flips with known rate e = ``flip_rate`` in [0, 0.5); the paper uses 0.1. Equals TRL ``robust``. flip_rate 0
    is dpo. The per-pair value can be negative; that is expected of an unbiased estimator.
    Diffusion: as dpo, de-biased for noisy human labels (Pick-a-Pic). Sign convention: our beta = diffusers
    ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch.nn.functional as F

    _reject_unused("robust", soft_label=soft_label, label=label)
    eps = _param("robust", "flip_rate", flip_rate)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("robust", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    logit = beta * (log_ratio_w - log_ratio_l)
    loss = ((1.0 - eps) * -F.logsigmoid(logit) - eps * -F.logsigmoid(-logit)) / (1.0 - 2.0 * eps)
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def cdpo(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None, label_smoothing=0.1):
    """Conservative DPO (label smoothing): ``-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)``.

    Mitchell, "A note on DPO with noisy preferences & relationship to IPO" (2023, no arXiv id):
    cDPO = ``(1-e) L_DPO(w,l) + e L_DPO(l,w)``, as discussed in rDPO (arXiv 2403.00409); equals TRL <= 0.28
    ``sigmoid`` with ``label_smoothing = e`` in [0, 0.5]. e = 0 is dpo. Unlike dpo, the optimum margin is finite
    (``log((1-e)/e) / beta``). Diffusion: as dpo, but stops pushing once the pair is separated by that margin.
    Sign convention: our beta = diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch.nn.functional as F

    _reject_unused("cdpo", soft_label=soft_label, label=label)
    eps = _param("cdpo", "label_smoothing", label_smoothing)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("cdpo", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    logit = beta * (log_ratio_w - log_ratio_l)
    loss = -(1.0 - eps) * F.logsigmoid(logit) - eps * F.logsigmoid(-logit)
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def rpo(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None, alpha=1.0):
    """RPO: dpo plus ``alpha`` times the winner's negative log-likelihood, ``-log sigmoid(beta h) - alpha policy_w``.

    Pang et al. (iterative reasoning preference optimisation), arXiv 2404.19733, the DPO + NLL loss with
    alpha = 1 (equation number not checked); Liu et al., arXiv 2405.16436, use the same form with alpha 0.005
    and beta 0.01. For LMs pass length-normalised winner log-probs if the NLL should be per token (as TRL's
    ``sft`` term is). Diffusion: dpo plus the plain denoising MSE on the winner (``-policy_w = mse_w``), which
    keeps the policy from drifting off the winners. Not "Relative Preference Optimization" (Diffusion-RPO).
    Sign convention: our beta = diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch.nn.functional as F

    _reject_unused("rpo", soft_label=soft_label, label=label)
    alpha = _param("rpo", "alpha", alpha)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("rpo", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    preference = -F.logsigmoid(beta * (log_ratio_w - log_ratio_l))
    nll_w = -policy_w
    loss = preference + alpha * nll_w
    metrics = _pair_metrics(log_ratio_w, log_ratio_l, beta, nll_w=nll_w.mean())
    return loss, metrics


def sft(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """SFT on winners: ``-policy_w`` (the loser and the reference do not enter the loss).

    Plain maximum likelihood (TRL ``loss_type="sft"``; the Diffusion-DPO code's ``--sft`` baseline,
    Wallace et al., arXiv 2311.12908, Sec. 5). ``ref_w``/``ref_l`` may be None (metrics then use the policy
    log-likelihoods as rewards); beta only scales the reported rewards. Diffusion: the ordinary denoising MSE on
    the winner images. Sign convention for the reported rewards: our beta = diffusers ``train_diffusion_dpo.py``
    beta = half the original Diffusion-DPO beta.
    """
    _reject_unused("sft", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare(
        "sft", policy_w, policy_l, ref_w, ref_l, beta, ref_optional=True
    )
    loss = -policy_w
    return loss, _pair_metrics(policy_w - ref_w, policy_l - ref_l, beta)


def _unpaired_metrics(log_ratio, desirable, z0, beta: float, **extra) -> Metrics:
    """Metrics for unpaired (labelled) data: reward_w / reward_l are the means over desirable / undesirable items.

    An empty group reports 0 so the trainer can average metrics without NaNs. implicit_acc counts an item as
    right when its log-ratio lies on its label's side of z0 (ties 0.5); margin is mean l(desirable) - mean
    l(undesirable).
    """
    import torch

    with torch.no_grad():
        log_ratio = log_ratio.detach()
        undesirable = ~desirable

        def group_mean(mask):  # computed on the device: no host read of the mask in the middle of a step
            return torch.where(mask, log_ratio, log_ratio.new_zeros(())).sum() / mask.sum().clamp(min=1)

        signed = torch.where(desirable, log_ratio - z0, z0 - log_ratio)
        mean_w, mean_l = group_mean(desirable), group_mean(undesirable)
        metrics = {
            "implicit_acc": (signed > 0).float().mean() + 0.5 * (signed == 0).float().mean(),
            "margin": mean_w - mean_l,
            "reward_w": beta * mean_w,
            "reward_l": beta * mean_l,
        }
        metrics.update({k: v.detach() for k, v in extra.items()})
    return metrics


def _unpaired_inputs(loss: str, policy_w, policy_l, ref_w, ref_l, beta, label):
    """Unpaired mode: items live in ``policy_w``/``ref_w`` ([n]); ``policy_l``/``ref_l`` must be None."""
    import torch

    if policy_l is not None or ref_l is not None:
        raise ValueError(
            f"{loss}: with `label` given the inputs are unpaired: put the n items in policy_w / ref_w and pass "
            "policy_l=None, ref_l=None (they would otherwise be silently ignored)."
        )
    beta = _check_beta(loss, beta)
    policy = _as_float32("policy_w", loss, policy_w, None)
    if ref_w is None:
        raise ValueError(f"{loss}: `ref_w` is None but this loss needs the reference log-likelihoods; "
                         f"{_NEEDS_REFERENCE_HINT}")
    ref = _as_float32("ref_w", loss, ref_w, policy.shape[0])
    label = _as_float32("label", loss, label, policy.shape[0])
    if not bool(((label == 0) | (label == 1)).all()):
        raise ValueError(f"{loss}: `label` must be 1 (desirable) or 0 (undesirable) per item, got {label.tolist()}.")
    return policy, ref, label.to(torch.bool), beta


def kto(
    policy_w,
    policy_l,
    ref_w,
    ref_l,
    *,
    beta,
    soft_label=None,
    label=None,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    """KTO: ``lambda_D (1 - sigmoid(beta (l_w - z0))) + lambda_U (1 - sigmoid(beta (z0 - l_l)))`` per pair.

    Ethayarajh et al., arXiv 2402.01306, Eq. 7 (per TRL's code comment) with loss ``lambda_y - v``; the constant
    ``lambda_y`` is dropped as in TRL. ``z0 = clamp(mean(policy - ref) over every item of the batch, min 0)``,
    detached: the batch KL estimate of Diffusion-KTO (Li et al., arXiv 2404.04465) instead of TRL's mismatched
    completions. z0 is this process's batch mean; under data parallelism it is not all-reduced.

    Paired data (``label`` None): winners are desirable, losers undesirable; z0 averages over all 2*pairs items;
    the per-pair loss is the **sum** of the winner's and the loser's term (TRL's KTOTrainer averages over the 2n
    items instead, i.e. half of our pair mean).

    Unpaired data (``label`` given, shape [n], 1 = desirable, 0 = undesirable): the n items are passed as
    ``policy_w``/``ref_w`` with ``policy_l=None, ref_l=None``; the returned loss is per item ([n]), z0 averages
    over the n items, and ``weight`` is per item. Metrics then report reward_w/reward_l as the mean reward of
    the desirable/undesirable items (0 for an empty group) and implicit_acc as the share of items on their
    label's side of z0.

    Diffusion: Diffusion-KTO with per-image likes/dislikes (its code defaults to beta 1000). Sign convention: our
    beta = diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch

    _reject_unused("kto", soft_label=soft_label)
    lam_d = _param("kto", "desirable_weight", desirable_weight)
    lam_u = _param("kto", "undesirable_weight", undesirable_weight)

    if label is not None:
        policy, ref, desirable, beta = _unpaired_inputs("kto", policy_w, policy_l, ref_w, ref_l, beta, label)
        log_ratio = policy - ref
        z0 = log_ratio.detach().mean().clamp(min=0)
        loss = torch.where(
            desirable,
            lam_d * (1.0 - torch.sigmoid(beta * (log_ratio - z0))),
            lam_u * (1.0 - torch.sigmoid(beta * (z0 - log_ratio))),
        )
        metrics = _unpaired_metrics(log_ratio, desirable, z0, beta, kl=z0)
        return loss, metrics

    policy_w, policy_l, ref_w, ref_l, beta = _prepare("kto", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    z0 = torch.cat([log_ratio_w, log_ratio_l]).detach().mean().clamp(min=0)
    loss_w = lam_d * (1.0 - torch.sigmoid(beta * (log_ratio_w - z0)))
    loss_l = lam_u * (1.0 - torch.sigmoid(beta * (z0 - log_ratio_l)))
    metrics = _pair_metrics(log_ratio_w, log_ratio_l, beta, kl=z0)
    return loss_w + loss_l, metrics


class RunningMean:
    """Running mean of scalar values weighted by count: the reward shift delta that bco needs.

    The trainer holds one (as :class:`RewardShift`, the state :data:`LOSS_STATE` declares for bco), passes
    ``reward_shift=running.mean`` to :func:`bco` and afterwards calls
    ``running.update(metrics["reward_batch_mean"], count=2 * pairs)``. This uses the shift of the previous
    batches (TRL <= 0.28 folds the current batch in first; the difference vanishes as batches accumulate).
    Under data parallelism, gather the batch means before updating so every rank holds the same delta.
    Save and restore it with ``state_dict`` / ``load_state_dict`` when checkpointing.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, value, count: int = 1) -> float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"RunningMean.update: value must be finite, got {value!r}.")
        if count <= 0:
            raise ValueError(f"RunningMean.update: count must be positive, got {count!r}.")
        self.count += count
        self.mean += (value - self.mean) * count / self.count
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean = float(state["mean"])
        self.count = int(state["count"])


class RewardShift(RunningMean):
    """:func:`bco`'s state across steps: the running mean of the implicit rewards, its ``reward_shift``.

    The state protocol of :data:`LOSS_STATE` (the trainer treats every stateful loss alike): ``loss_kwargs()``
    -> the keywords for the next call of the loss; ``observe(metrics, pairs)`` with one optimizer step's metrics
    as floats (means over the step, already gathered from every process) and the pairs the step saw in all;
    ``state_dict()`` / ``load_state_dict()`` for checkpoints.
    """

    def loss_kwargs(self) -> dict[str, float]:
        return {"reward_shift": self.mean}

    def observe(self, metrics: dict[str, float], pairs: int) -> None:
        self.update(metrics["reward_batch_mean"], count=2 * int(pairs))  # both sides of each pair


def bco(
    policy_w,
    policy_l,
    ref_w,
    ref_l,
    *,
    beta,
    soft_label=None,
    label=None,
    reward_shift=0.0,
):
    """BCO: ``-log sigmoid(beta l_w - delta) - log sigmoid(-(beta l_l - delta))`` per pair.

    Jung et al., arXiv 2404.04656 (binary classifier optimisation: the BCE on implicit rewards upper-bounds the DPO
    loss and the shift delta tightens the bound; equation numbers not checked). ``delta = reward_shift`` is the
    running mean of the implicit rewards ``beta * l`` held by the trainer in a :class:`RunningMean`; this function
    reports the current batch's mean reward over all items as ``metrics["reward_batch_mean"]`` for the update.
    Matches TRL <= 0.28 ``bco_pair`` (TRL HEAD drops delta). The prompt-distribution matching (UDM) of the paper is
    not implemented.

    Unpaired data (``label`` given): as in :func:`kto`, items in ``policy_w``/``ref_w``, ``policy_l=None``,
    ``ref_l=None``; desirable items get ``-log sigmoid(beta l - delta)``, undesirable ones
    ``-log sigmoid(-(beta l - delta))``; the loss is per item.

    Diffusion: a per-image classifier on the implicit reward: winners' denoising errors pushed below the
    reference by more than the average, losers' above. Sign convention: our beta = diffusers
    ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch
    import torch.nn.functional as F

    _reject_unused("bco", soft_label=soft_label)
    delta = float(reward_shift)
    if not math.isfinite(delta):
        raise ValueError(f"bco: reward_shift must be finite, got {reward_shift!r}.")

    if label is not None:
        policy, ref, desirable, beta = _unpaired_inputs("bco", policy_w, policy_l, ref_w, ref_l, beta, label)
        reward = beta * (policy - ref)
        loss = torch.where(desirable, -F.logsigmoid(reward - delta), -F.logsigmoid(-(reward - delta)))
        # An item is on its label's side when its reward is on that side of delta, i.e. l vs delta / beta.
        boundary = reward.new_tensor(delta / beta)
        metrics = _unpaired_metrics(policy - ref, desirable, boundary, beta, reward_batch_mean=reward.detach().mean())
        return loss, metrics

    policy_w, policy_l, ref_w, ref_l, beta = _prepare("bco", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    reward_w, reward_l = beta * log_ratio_w, beta * log_ratio_l
    loss = -F.logsigmoid(reward_w - delta) - F.logsigmoid(-(reward_l - delta))
    batch_mean = torch.cat([reward_w, reward_l]).detach().mean()
    metrics = _pair_metrics(log_ratio_w, log_ratio_l, beta, reward_batch_mean=batch_mean)
    return loss, metrics


def sppo(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """SPPO: ``(l_w - (P_w - 1/2)/beta)^2 + (l_l - (P_l - 1/2)/beta)^2`` with eta = 1/beta.

    Wu et al., arXiv 2405.00675, Eq. 4.7 of Algorithm 1 with the reference as the previous iterate pi_t.
    Without ``soft_label`` this is the hard version (P_w = 1, P_l = 0, targets +-1/(2 beta)) = TRL
    ``sppo_hard``. With ``soft_label`` p per pair, P_w = p and P_l = 1 - p (the pair's own win probability stands
    in for the win rate against the policy). Diffusion: regresses each side's log-ratio onto an absolute target
    (+-2e-4 at beta 2500), so beta must be tuned for it. Sign convention: our beta = diffusers
    ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    _reject_unused("sppo", label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("sppo", policy_w, policy_l, ref_w, ref_l, beta)
    p = _soft_label("sppo", soft_label, policy_w.shape[0], required=False, device=policy_w.device)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    if p is None:
        target_w, target_l = 0.5 / beta, -0.5 / beta
    else:
        target_w, target_l = (p - 0.5) / beta, (0.5 - p) / beta
    loss = (log_ratio_w - target_w).pow(2) + (log_ratio_l - target_l).pow(2)
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def nca(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """NCA (pairwise): ``-log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)``, ``r = beta * l``.

    Chen et al., arXiv 2402.05369 (noise contrastive alignment), the pairwise (K = 2) NCA objective (equation number
    not checked); equals TRL ``nca_pair``. Unlike dpo it acts on each side's absolute reward, so it does not let
    both likelihoods fall. Diffusion: raises the winner's implicit reward ``beta (ref_mse_w - mse_w)`` and keeps
    both rewards near 0 from above. Sign convention: our beta = diffusers ``train_diffusion_dpo.py`` beta = half the
    original Diffusion-DPO beta.
    """
    import torch.nn.functional as F

    _reject_unused("nca", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("nca", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    reward_w, reward_l = beta * log_ratio_w, beta * log_ratio_l
    loss = -F.logsigmoid(reward_w) - 0.5 * F.logsigmoid(-reward_w) - 0.5 * F.logsigmoid(-reward_l)
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def apo_zero(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """APO-zero: ``(1 - sigmoid(beta l_w)) + sigmoid(beta l_l)``.

    D'Oosterlinck et al., arXiv 2408.06266, Eq. 7; equals TRL ``apo_zero``. For when winners are better than
    the model's own outputs: raise the winner's likelihood, lower the loser's, each against the reference.
    Diffusion: winner's denoising error pushed below the reference's, loser's above. Sign convention: our beta =
    diffusers ``train_diffusion_dpo.py`` beta = half the original Diffusion-DPO beta.
    """
    import torch

    _reject_unused("apo_zero", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("apo_zero", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    loss = (1.0 - torch.sigmoid(beta * log_ratio_w)) + torch.sigmoid(beta * log_ratio_l)
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def apo_down(policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None):
    """APO-down: ``sigmoid(beta l_w) + (1 - sigmoid(beta h))``.

    D'Oosterlinck et al., arXiv 2408.06266, Eq. 8; equals TRL ``apo_down``. For when winners are worse than the
    model's own outputs: lower both likelihoods, the loser's more. Diffusion: both denoising errors rise above
    the reference, the loser's by more. Sign convention: our beta = diffusers ``train_diffusion_dpo.py`` beta =
    half the original Diffusion-DPO beta.
    """
    import torch

    _reject_unused("apo_down", soft_label=soft_label, label=label)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare("apo_down", policy_w, policy_l, ref_w, ref_l, beta)
    log_ratio_w, log_ratio_l = policy_w - ref_w, policy_l - ref_l
    loss = torch.sigmoid(beta * log_ratio_w) + (1.0 - torch.sigmoid(beta * (log_ratio_w - log_ratio_l)))
    return loss, _pair_metrics(log_ratio_w, log_ratio_l, beta)


def _log1mexp(x):
    """``log(1 - exp(x))`` for x < 0, stable at both ends (Maechler 2012); both branches clamped so no NaN grads."""
    import torch

    cutoff = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(torch.clamp(x, min=cutoff)))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=cutoff)))
    return torch.where(x > cutoff, near_zero, far)


def asft(
    policy_w, policy_l, ref_w, ref_l, *, beta, soft_label=None, label=None, odds_weight=0.1
):
    """ASFT (aligned SFT, reference-free): ``-(1 + lam) log pi_w - lam log(1 - pi_l)``, ``lam = odds_weight``.

    Wang et al., arXiv 2409.10571 (equation number not checked):
    ``-log pi(y_w) - lam [log sigmoid(r_odds(y_w)) + log sigmoid(-r_odds(y_l))]``
    with ``r_odds = log(pi / (1 - pi))``, which simplifies to the form above. ``log pi`` is the policy estimate
    and must be < 0 (pass length-normalised LM log-probs, as the paper does). The default lam = 0.1 follows ORPO
    and is not verified against the ASFT paper. ``ref_*`` may be None; beta only scales the reported rewards.
    Diffusion: ``pi = exp(-mse)``; raises the winner's likelihood and pushes the loser's error away from 0, which
    saturates once ``exp(-mse_l)`` is small. Estimates are clamped to at most -1e-6 so ``log(1 - pi_l)`` stays
    finite. Sign convention for rewards: our beta = diffusers ``train_diffusion_dpo.py`` beta = half the original
    Diffusion-DPO beta.
    """
    _reject_unused("asft", soft_label=soft_label, label=label)
    lam = _param("asft", "odds_weight", odds_weight)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare(
        "asft", policy_w, policy_l, ref_w, ref_l, beta, ref_optional=True
    )
    if bool((policy_w > 0).any() or (policy_l > 0).any()):
        raise ValueError(
            "asft: policy log-likelihoods must be <= 0 (log-probabilities); got a positive value. Pass "
            "length-normalised log-probs or denoising_log_likelihood(...)."
        )
    log_pi_l = policy_l.clamp(max=-1e-6)
    loss = -(1.0 + lam) * policy_w - lam * _log1mexp(log_pi_l)
    return loss, _pair_metrics(policy_w - ref_w, policy_l - ref_l, beta)


def redi(
    policy_w,
    policy_l,
    ref_w,
    ref_l,
    *,
    beta,
    soft_label=None,
    label=None,
    winner_coef=1.0,
    loser_coef=0.8,
):
    """REDI (reference-free): ``-winner_coef * policy_w + loser_coef * policy_l``.

    Xu et al., arXiv 2505.24850 (reinforcement distillation), the asymmetric REINFORCE-style objective on
    length-normalised log-probs (the authors' code, ``loss_type="reinforce"``; equation number not checked); its
    recipe uses 1.0 and 0.8. ``ref_*`` may be None; beta only scales the reported rewards.
    Diffusion: ``mse_w - 0.8 mse_l``; the loser term is unbounded, so run it briefly after SFT (as the paper does)
    or with a small learning rate. Sign convention for rewards: our beta = diffusers ``train_diffusion_dpo.py``
    beta = half the original Diffusion-DPO beta.
    """
    _reject_unused("redi", soft_label=soft_label, label=label)
    coef_w = _param("redi", "winner_coef", winner_coef)
    coef_l = _param("redi", "loser_coef", loser_coef)
    policy_w, policy_l, ref_w, ref_l, beta = _prepare(
        "redi", policy_w, policy_l, ref_w, ref_l, beta, ref_optional=True
    )
    loss = -coef_w * policy_w + coef_l * policy_l
    return loss, _pair_metrics(policy_w - ref_w, policy_l - ref_l, beta)


# ----------------------------------------------------------------------------------------------------- registry

LOSSES: dict[str, Callable[..., tuple[Any, Metrics]]] = {
    "dpo": dpo,
    "smpo": smpo,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "cdpo": cdpo,
    "rpo": rpo,
    "sft": sft,
    "kto": kto,
    "bco": bco,
    "sppo": sppo,
    "nca": nca,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "asft": asft,
    "redi": redi,
}
LOSSES = {name: _with_weight(name, fn) for name, fn in LOSSES.items()}

# Losses that carry state from step to step: the class the trainer makes one of (protocol: RewardShift). Its
# keywords are the loss's run-time parameters, which a config may not set.
LOSS_STATE: dict[str, type] = {"bco": RewardShift}

# Starting betas for image diffusion (our convention). Sourced: dpo (diffusers SD1.5 script), smpo (SmPO code's
# SD1.5 2000, halved), kto (Diffusion-KTO code default; its scale convention is assumed, not verified). The rest
# reuse dpo's 2500 untuned: their logit or target has the same scale as dpo's. LM runs want about 0.1.
# The trainer's loss.beta when the config leaves it unset (load_config writes the value into the config).
DIFFUSION_DEFAULT_BETA: dict[str, float] = {name: 2500.0 for name in LOSSES}
DIFFUSION_DEFAULT_BETA.update({"smpo": 1000.0, "kto": 1000.0})


class UnknownLossError(KeyError, ValueError):
    """An unknown loss or loss parameter name; the message names the nearest valid choice."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def get_loss(name: str) -> Callable[..., tuple[Any, Metrics]]:
    """Return the loss function registered as ``name``; an unknown name raises :class:`UnknownLossError`."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        hint = did_you_mean(name, LOSSES)
        raise UnknownLossError(
            f"Unknown loss {name!r}{'; ' + hint if hint else '.'} Choices: {', '.join(sorted(LOSSES))}."
        ) from None


def loss_params(name: str) -> dict[str, Any]:
    """The loss-specific parameters a config may set for ``name``, with their defaults."""
    fn = get_loss(name)
    runtime = _RUNTIME_PARAMS.get(name, ())
    return {
        param.name: param.default
        for param in inspect.signature(fn).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
        and param.name not in _COMMON_PARAMS
        and param.name not in runtime
    }


def check_loss_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate loss-specific ``params`` for loss ``name`` without touching torch; return them with defaults filled.

    Unknown names raise :class:`UnknownLossError` naming the nearest valid parameter and listing all valid ones;
    a non-numeric value raises ``TypeError``; an out-of-range value raises ``ValueError`` (the loss's own check).
    """
    valid = loss_params(name)
    for key, value in params.items():
        if key not in valid:
            listed = ", ".join(sorted(valid)) if valid else "none"
            if key in _COMMON_PARAMS:
                why = f". {key!r} is not a loss parameter: set it as loss.{key} or pass it per batch."
            elif key in _RUNTIME_PARAMS.get(name, ()):
                why = f". {key!r} is supplied by the trainer at run time and cannot be configured."
            else:
                hint = did_you_mean(key, valid)
                why = f"; {hint}" if hint else "."
            raise UnknownLossError(f"Unknown parameter {key!r} for loss {name!r}{why} Valid parameters: {listed}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"Loss {name!r} parameter {key!r} must be a number (like its default {valid[key]!r}), "
                f"got {type(value).__name__} {value!r}."
            )
    resolved = {**valid, **params}
    for key in _PARAM_RANGES.get(name, {}):
        _param(name, key, resolved[key])
    return resolved

"""Where the noisy latent x_t and its regression target come from, for a batch of preference pairs.

Layout: every tensor built here is ``[w; l]``, the B winners followed by the B losers (``[2B, ...]``), so the
trainer runs one UNet forward over the pair batch and splits with ``.chunk(2)``. The two sides of a pair share
their timestep (and, for ``forward``, their noise): Diffusion-DPO compares the denoising errors of winner and
loser, and sharing removes the noise and timestep variance from that difference (both reference codebases do this).

Kinds (one entry point, :func:`make_trajectory`):

- ``forward``: x_t from the forward process, ``schedule.add_noise(x0, noise, t)``, as in Diffusion-DPO.
- ``ddim``: x_t from deterministic DDIM inversion of x0 under a model (SmPO's "numerical upper bound": the
  trajectory the model itself would take, instead of random noise); Euler inversion for flow matching.
- ``renoise``: ReNoise inversion (Garibi et al., arXiv 2403.14602): each inversion step re-evaluates the model at
  its own output K times (a fixed-point iteration towards the exact DDIM inverse) and averages a window of
  those noise predictions; optional noise regularisation (patch-KL and auto-correlation). K = 1 with both
  predictions averaged is what the SmPO code runs.

Every function takes a :class:`~diffusion_pref.schedules.Schedule` (``backbone.schedule``): DDPM-type (epsilon,
v-prediction) or rectified flow; t are its integer indices. Below, abar_t stands for the level of index t, in
general ``x_t = a_t x0 + b_t eps`` (DDPM: a = sqrt(abar), b = sqrt(1 - abar); flow: a = 1 - sigma, b = sigma).

For the inversion kinds the target is the image-dependent "noise" of the inverted latent,
``tau_t = (x~_t - a_t x0) / b_t`` (or the v / flow velocity built from it, ``schedule.target``), so ``noise``
differs between winner and loser; t is still shared within a pair.

Inversion grid and the sampled t (a deliberate choice, see ``trajectory.t_mode``): t is drawn exactly as for
``forward`` (``schedule.sample_timesteps``); the grid is ``schedule.inversion_grid(steps)``, for DDPM
``DDIMInverseScheduler.set_timesteps(steps)`` of the model's scheduler config (SD1.5, steps=5: [1, 201, 401, 601,
801]). ``exact`` (default) inverts along the grid points below t and then
takes one more step to t itself, so x~_t sits at the noise level the UNet is told. ``grid_below`` stops at the
last grid point below t and feeds that latent as if it were at t: one step cheaper, but the target then mixes in
x0. This is what SmPO's loop does on diffusers >= 0.22, not what the released SmPO code computes: it pins
diffusers 0.20.0, whose ``DDIMInverseScheduler`` (changed in diffusers PR #5145, first released in 0.22.0) has
the timesteps [-199, 1, 201, 401, 601] for 5 steps, steps each source s to s + 200 and is called with the UNet
output at the source s (also at -199). ``smpo_released`` reproduces that arithmetic (:func:`released_smpo_steps`):
the loop runs over the sources s < t, the model is told s, a v-prediction output is read against the step's
source latent and abar_s, the clean latent has the scheduler's ``initial_alpha_cumprod`` (abar_0 = 0.99915 for
SD's ``set_alpha_to_one=false``), so x~ sits at the first grid point at or above t (capped at 801 for SD1.5, 901
for SDXL's 10 steps) and is fed as if it were at t. ``clip_sample`` is not applied (the SD and SDXL configs
switch it off), and the arithmetic stays float32 (the released code computes tau with fp16 abar). With an ideal
denoiser (x~_g = forward noising with noise eps) the target is tau_t = a x0 + b eps with, for SD1.5's 5-point
grid on average over t: grid_below a = 0.13, b = 0.76 (a = 0.16, b = 0.16 for t <= 201); smpo_released
a = -0.15, b = 1.26; exact tau_t = eps. For exact and grid_below x0 is the clean latent (abar = 1); diffusers' SD
configs put it at abar_0 = 0.99915 instead, a difference far below the inversion error. ``smpo_released`` is
DDPM-only.

Flow matching: a step holds the velocity fixed (Euler, ``z_g = z_s + (sigma_g - sigma_s) v``) where DDPM holds
the noise estimate (DDIM); ReNoise's fixed point is then the exact inverse of an Euler sampling step. The noise
regularisation is DDPM-only.

The model is called as ``predict_fn(x, t, cond)`` with x ``[n, C, H, W]``, t ``[n]``: at each step only the n <= 2B
samples whose inversion path is not finished yet, with the matching rows of ``cond`` (tensors, and dicts of
tensors, whose first dim is 2B are indexed; anything else is passed through), so a batch of pairs with different
t costs the mean number of steps, not the maximum. Inversion runs under no_grad and
in float32 arithmetic whatever the latent dtype. v-prediction outputs are turned into noise with the input
latent and the timestep the model was given, so a converged ReNoise step is the exact inverse of a DDIM
sampling step (diffusers' DDIMInverseScheduler uses the source latent's abar instead; both agree for epsilon).
Not implemented: ReNoise's noise correction (only for stochastic samplers) and its "first steps" special case
(with K = 1 and the default window it changes nothing).

The noise regularisation (only with ``noise_reg_steps > 0``) follows ReNoise's code (garibida/ReNoise-Inversion,
``noise_regularization``): per outer step one patch-KL step (gradient clipped to +-100), then ``ac_rolls``
auto-correlation steps; 1e-6 added to the patch variances; one random shift per channel and pyramid level; the KL
reference is the model's prediction on x0 forward-noised to the step's level with one noise drawn per inversion.
Differences: it regularises the noise estimate (for v-prediction the eps computed from v, where ReNoise takes
the raw model output), and a batch draws its shifts sample after sample (ReNoise inverts one image at a time).

Example::

    from diffusion_pref.schedules import DDPMSchedule
    from diffusion_pref.trajectories import make_trajectory
    traj = make_trajectory("renoise", DDPMSchedule(), latents_w, latents_l, steps=5, renoise_iters=1,
                           predict_fn=lambda x, t, c: unet(x, t, **c).sample, cond=cond,
                           generator=torch.Generator().manual_seed(0))
    pred = unet(traj.x_t, traj.t, **cond).sample        # [2B, C, H, W]
    policy_w, policy_l = denoising_log_likelihood(pred, traj.target).chunk(2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, get_args

from diffusion_pref.config import TMode, TrajectoryKind

from diffusion_pref.schedules import DDPMSchedule, Schedule

if TYPE_CHECKING:
    import torch

__all__ = [
    "ForwardTrajectory",
    "Trajectory",
    "ddim_sample",
    "forward_trajectory",
    "inversion_grid",
    "invert_grid",
    "invert_latents",
    "make_trajectory",
    "released_smpo_steps",
    "shared_noise_and_timesteps",
    "trajectory_options",
]

KINDS = get_args(TrajectoryKind)  # the choices are declared once, in diffusion_pref.config
T_MODES = get_args(TMode)


@dataclass
class ForwardTrajectory:
    """One pair batch in the ``[w; l]`` layout (every kind returns this)."""

    x_t: torch.Tensor  # [2B, C, H, W] noisy latents fed to the UNet
    t: torch.Tensor  # [2B] integer timesteps, t[i] == t[i + B]
    target: torch.Tensor  # [2B, C, H, W] schedule.target: epsilon, v or the flow velocity eps - x0
    noise: torch.Tensor  # [2B, C, H, W] forward: the shared noise; ddim/renoise: tau_t of each inverted latent


Trajectory = ForwardTrajectory  # the same record for every kind


def shared_noise_and_timesteps(latents_w: torch.Tensor, schedule: Schedule, generator=None, *,
                               process_index: int = 0, num_processes: int = 1):
    """Draw noise and timesteps for B pairs and repeat them for the two sides: ``([2B, ...], [2B])``.

    t from ``schedule.sample_timesteps`` (DDPM: ``t ~ U{0, ..., N - 1}``; flow: SD3's logit-normal), drawn after
    the noise. Noise is drawn in float32 on the generator's device (so a CPU generator gives the same numbers
    whatever the latents' device and dtype), then moved to the latents.

    Data parallel: every process passes the same generator state and its own ``process_index`` of
    ``num_processes``; the draw is made for the global micro-batch (``num_processes * B`` pairs) and this process
    keeps rows ``process_index::num_processes``, the pairs the loader gave it. So one process with 2B pairs sees
    exactly what two processes with B pairs see between them, and no two processes share their draws.
    """
    import torch

    if latents_w.ndim < 2:
        raise ValueError(
            f"shared_noise_and_timesteps: latents_w must be [B, ...], got shape {tuple(latents_w.shape)}."
        )
    if not 0 <= process_index < num_processes:
        raise ValueError(f"shared_noise_and_timesteps: process_index={process_index} is outside "
                         f"0..{num_processes - 1} (num_processes={num_processes}).")
    draw_device = generator.device if generator is not None else latents_w.device
    batch = latents_w.shape[0]
    global_batch = batch * num_processes
    noise_all = torch.randn((global_batch, *latents_w.shape[1:]), generator=generator, device=draw_device,
                            dtype=torch.float32)
    t_all = schedule.sample_timesteps(global_batch, generator, draw_device)
    noise_half = noise_all[process_index::num_processes]  # [B, ...]
    t_half = t_all[process_index::num_processes]  # [B]
    noise = torch.cat([noise_half, noise_half]).to(latents_w.device, latents_w.dtype, non_blocking=True)  # [2B, ...]
    t = torch.cat([t_half, t_half]).to(latents_w.device, non_blocking=True)  # [2B]
    return noise, t


def _check_pair_shapes(where: str, latents_w: torch.Tensor, latents_l: torch.Tensor) -> None:
    if latents_w.shape != latents_l.shape:
        raise ValueError(
            f"{where}: latents_w has shape {tuple(latents_w.shape)} but latents_l has "
            f"{tuple(latents_l.shape)}; the two sides of each pair must have the same latent shape."
        )


def forward_trajectory(
    schedule: Schedule, latents_w: torch.Tensor, latents_l: torch.Tensor, generator=None, *, process_index: int = 0,
    num_processes: int = 1,
) -> ForwardTrajectory:
    """Forward-noise winners and losers with shared noise and t: ``x_t = add_noise([x0_w; x0_l], noise, t)``.

    ``process_index`` / ``num_processes``: see :func:`shared_noise_and_timesteps`.
    """
    import torch

    _check_pair_shapes("forward_trajectory", latents_w, latents_l)
    x0 = torch.cat([latents_w, latents_l])  # [2B, C, H, W]
    noise, t = shared_noise_and_timesteps(latents_w, schedule, generator, process_index=process_index,
                                          num_processes=num_processes)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    return ForwardTrajectory(x_t=x_t, t=t, target=target, noise=noise)


# ------------------------------------------------------------------------------------------------ inversion


def inversion_grid(schedule: Schedule, steps: int) -> list[int]:
    """Ascending inversion timesteps: ``schedule.inversion_grid(steps)``.

    DDPM: ``DDIMInverseScheduler.set_timesteps(steps)`` on the config, diffusers' own spacing (``leading`` +
    ``steps_offset`` for SD), the grid the SmPO code and diffusers' inversion pipelines use (SD1.5, 5 steps:
    [1, 201, 401, 601, 801]). Flow: evenly spaced in the unshifted noise fraction up to pure noise.
    """
    return schedule.inversion_grid(steps)


def released_smpo_steps(schedule: Schedule, steps: int):
    """The inversion steps of diffusers 0.20.0's ``DDIMInverseScheduler`` (the version the SmPO code pins) on
    ``schedule``'s config (a :class:`DDPMSchedule`): ``(sources, targets, initial_abar)``.

    Step j maps the latent from ``sources[j]`` to ``targets[j] = sources[j] + T // steps`` and is told
    ``sources[j]``; the sources are the ``leading`` / ``trailing`` grid rolled by one, its first entry replaced by
    ``grid[0] - step_ratio`` (SD1.5, 5 steps: sources [-199, 1, 201, 401, 601], targets [1, 201, 401, 601, 801]).
    A negative source has the abar ``initial_abar`` (``DDIMInverseScheduler.initial_alpha_cumprod``: 1 with
    ``set_alpha_to_one``, else abar_0). Computed here rather than with the installed diffusers, whose scheduler
    since 0.22.0 steps along the grid itself.
    """
    import numpy as np

    if not isinstance(schedule, DDPMSchedule):
        raise ValueError(f"trajectory.t_mode=smpo_released reproduces diffusers 0.20's DDIM inversion and needs a "
                         f"DDPM-type schedule, not {schedule!r}; use t_mode=exact or grid_below.")
    config = schedule.config
    total, n = int(config.num_train_timesteps), int(steps)
    if not 1 <= n <= total:
        raise ValueError(f"trajectory.steps={steps} must be between 1 and the scheduler's {total} training timesteps.")
    spacing = getattr(config, "timestep_spacing", "leading")
    if spacing == "leading":
        ratio = total // n
        grid = (np.arange(0, n) * ratio).round().astype(np.int64) + int(getattr(config, "steps_offset", 0))
    elif spacing == "trailing":
        ratio = total / n
        grid = np.round(np.arange(total, 0, -ratio)[::-1]).astype(np.int64) - 1
    else:
        raise ValueError(f"trajectory.t_mode=smpo_released: the scheduler's timestep_spacing={spacing!r} is not one "
                         "that diffusers 0.20.0's DDIMInverseScheduler supports (leading, trailing).")
    sources = [int(grid[0] - ratio)] + [int(g) for g in grid[:-1]]
    targets = [src + total // n for src in sources]
    if targets[-1] > total - 1:
        raise ValueError(f"trajectory.t_mode=smpo_released: steps={steps} makes diffusers 0.20's last inversion "
                         f"step end at {targets[-1]}, past the last training timestep {total - 1}.")
    return sources, targets, schedule.initial_alpha_cumprod


def _levels(schedule: Schedule, t: torch.Tensor, ndim: int, clean=(1.0, 0.0)):
    """``(a, b)`` float32 ``[N, 1, ...]`` (``ndim`` dims) at indices ``t``; t < 0 stands for the clean latent, whose
    level is ``clean`` ((1, 0), or the schedule's ``clean`` for ``smpo_released``)."""
    import torch

    a, b = schedule.coefficients(t.clamp(min=0))
    negative = t < 0
    a = torch.where(negative, torch.full((), clean[0], device=t.device), a)
    b = torch.where(negative, torch.full((), clean[1], device=t.device), b)
    shape = (-1, *([1] * (ndim - 1)))
    return a.reshape(shape), b.reshape(shape)


def _patch_stats(x, patch: int = 4):
    # [N, C, H, W] -> per-patch mean and variance [N, C, P]
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch).flatten(4).flatten(2, 3)  # [N, C, P, patch^2]
    return patches.mean(-1), patches.var(-1)


def _patch_kl(eps, ref_eps, eps_var: float = 1e-6):
    """ReNoise's patch-KL term: per 4x4 patch and channel, |log(v1/v0) + (v0 + (m0 - m1)^2) / v1 - 1|, summed, with
    ``eps_var`` added to both variances (as ReNoise does)."""
    m0, v0 = _patch_stats(eps)
    m1, v1 = _patch_stats(ref_eps)
    v0, v1 = v0 + eps_var, v1 + eps_var
    return (v1.log() - v0.log() + (v0 + (m0 - m1) ** 2) / v1 - 1).abs().sum()


def _auto_correlation(eps, generator):
    """pix2pix-zero / ReNoise auto-correlation term over a pyramid (avg-pool by 2 until H <= 8), per sample and
    channel. Each sample, channel and level has its own random shift in [0, H/2), drawn sample by sample, channel
    by channel, levels innermost: ReNoise's order for its one sample."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = eps.shape
    sizes = [h]
    while sizes[-1] > 8 and min(h, w) >= 2:  # ReNoise stops at H <= 8; a pool needs 2 pixels
        h, w = h // 2, w // 2
        sizes.append(h)
    shifts = torch.tensor([[[int(torch.randint(0, max(size // 2, 1), (1,), generator=generator)) for size in sizes]
                            for _ in range(c)] for _ in range(n)], dtype=torch.long)  # [N, C, L], host draws
    shifts = shifts.to(eps.device)
    loss = eps.new_zeros(())
    noise = eps
    for level in range(len(sizes)):
        if level:
            noise = F.avg_pool2d(noise, kernel_size=2)
        hh, ww = noise.shape[2:]
        shift = shifts[:, :, level, None]  # [N, C, 1]
        # torch.roll with a per-(sample, channel) shift: out[i] = in[(i - shift) mod size]
        rows = (torch.arange(hh, device=eps.device) - shift) % hh  # [N, C, H]
        cols = (torch.arange(ww, device=eps.device) - shift) % ww  # [N, C, W]
        rolled_h = noise.gather(2, rows[..., None].expand(-1, -1, -1, ww))
        rolled_w = noise.gather(3, cols[:, :, None, :].expand(-1, -1, hh, -1))
        loss = loss + (noise * rolled_h).mean(dim=(2, 3)).pow(2).sum()
        loss = loss + (noise * rolled_w).mean(dim=(2, 3)).pow(2).sum()
    return loss


def _regularise(eps, ref_eps, reg: dict, generator):
    """ReNoise's editability regularisation of a noise estimate: per outer step, one clipped gradient step on the
    patch-KL term, then ``ac_rolls`` steps on the auto-correlation term (ReNoise's order)."""
    import torch

    with torch.enable_grad():
        for _ in range(reg["steps"]):
            if reg["lambda_kl"] > 0 and ref_eps is not None:
                var = eps.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(_patch_kl(var, ref_eps), var)
                eps = eps - reg["lambda_kl"] * grad.clamp(-100, 100)
            if reg["lambda_ac"] > 0:
                for _ in range(reg["ac_rolls"]):
                    var = eps.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(_auto_correlation(var, generator), var)
                    eps = eps - reg["lambda_ac"] * grad / reg["ac_rolls"]
    return eps.detach()


def _renoise_step(schedule: Schedule, predict, z_s, level_s, g, level_g, iters: int, window: Sequence[int],
                  reg: Optional[dict], ref_eps, generator, told=None):
    """One inversion step z_s -> z_g with K = ``iters`` renoise iterations (K = 0: plain DDIM / Euler inversion).

    Prediction k is made at the current estimate z_g^(k) (z_g^(0) = z_s) and read as the quantity the step holds
    (``schedule.held``: the noise estimate for DDPM, the velocity for flow); the next estimate is always a move
    from z_s: z_g^(k+1) = move(z_s, h(z_g^(k), g)), a fixed-point iteration for the implicit equation a DDIM /
    Euler sampling step would have to satisfy. The predictions with index in ``window`` are averaged for the
    final move. ``level_s`` / ``level_g``: the ``(a, b)`` of the two noise levels.

    ``told``: the timesteps the model is told instead of g, with a v-prediction output read against z_s and its
    level (diffusers 0.20's DDIMInverseScheduler, ``t_mode=smpo_released``).
    """
    start, end = int(window[0]), int(window[1])
    z_k, total, count, h = z_s, None, 0, None
    for k in range(iters + 1):
        if told is None:
            h = schedule.held(predict(z_k, g), z_k, *level_g)
        else:
            h = schedule.held(predict(z_k, told), z_s, *level_s)
        if start <= k < end:
            total = h if total is None else total + h
            count += 1
        if reg is not None and k >= start:
            h = _regularise(h, ref_eps, reg, generator)
        z_k = schedule.move_held(z_s, h, level_s, level_g)
    if count == 0:
        return z_k  # the window holds no prediction: the last iterate
    h_mean = total / count
    if reg is not None:
        h_mean = _regularise(h_mean, ref_eps, reg, generator)
    return schedule.move_held(z_s, h_mean, level_s, level_g)


def _paths(grid: Sequence[int], t: torch.Tensor, t_mode: str, released=None):
    """Per-sample ascending target timesteps ``[N, L]`` on t's device (padded with the last entry), their
    lengths ``[N]`` on the host, where the inversion loop decides which samples are still running, and (for
    ``smpo_released``, ``released`` = :func:`released_smpo_steps`) the source timesteps the model is told ``[N, L]``,
    else None."""
    import torch

    if t_mode not in T_MODES:
        raise ValueError(f"trajectory.t_mode={t_mode!r} is not one of {', '.join(T_MODES)}.")
    rows, told = [], []
    for ti in t.tolist():
        if t_mode == "smpo_released":  # SmPO's loop: every step whose source is below t
            steps = [(src, dst) for src, dst in zip(released[0], released[1]) if src < ti]
            rows.append([dst for _, dst in steps])
            told.append([src for src, _ in steps])
            continue
        path = [g for g in grid if g < ti]
        if t_mode == "exact":
            path.append(int(ti))
        rows.append(path)
    length = max(1, max(len(r) for r in rows))
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)

    def pad(table):
        return torch.tensor([r + [r[-1] if r else 0] * (length - len(r)) for r in table], dtype=torch.long,
                            device=t.device)

    return pad(rows), lengths, (pad(told) if told else None)


def _rows(value, index, n: int):
    """``value`` restricted to the samples in ``index``: tensors (also inside dicts) whose first dim is ``n``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim > 0 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _rows(v, index, n) for k, v in value.items()}
    return value


def _invert(schedule: Schedule, predict_fn, x0, cond, paths, lengths, *, renoise_iters=0, average_window=(0, 1),
            noise_reg=None, generator=None, start=None, start_t=None, told=None, clean=(1.0, 0.0), reg_noise=None):
    """Invert ``x0`` ``[N, ...]`` along per-sample paths (``lengths``: a CPU tensor); float32 result at each
    sample's last path entry.

    ``told`` ``[N, L]``: diffusers 0.20's arithmetic (``t_mode=smpo_released``): step j starts from the noise
    level of ``told[:, j]`` (the level ``clean`` where negative), whatever the latent's own, and the model is told
    ``told[:, j]``. ``reg_noise``: the noise of ReNoise's KL reference (drawn here, once, if None).

    Each step runs the model only on the samples whose path is not finished yet (their rows of ``cond`` too, for
    tensors and dicts of tensors with first dim N), so a batch costs the mean path length, not the longest.
    ``start`` / ``start_t``: resume from latents already inverted to timesteps ``start_t`` ``[N]`` (-1: clean)
    instead of from x0 (which still serves ReNoise's regularisation reference and the dtype).
    """
    import torch

    if noise_reg is not None and not isinstance(schedule, DDPMSchedule):
        raise ValueError(f"trajectory.noise_reg_steps > 0 (ReNoise's noise regularisation) needs a DDPM-type "
                         f"schedule, not {schedule!r}; set trajectory.noise_reg_steps=0.")
    dtype = x0.dtype
    n = x0.shape[0]
    z = x0.float() if start is None else start.float()
    source = (torch.full((n,), -1, dtype=torch.long, device=x0.device) if start_t is None  # -1: the clean latent
              else start_t.to(x0.device))
    if noise_reg is not None and noise_reg["lambda_kl"] > 0 and reg_noise is None:
        # ReNoise's KL reference noise: one draw for the whole inversion and batch
        draw_device = generator.device if generator is not None else x0.device
        reg_noise = torch.randn(x0.shape, generator=generator, device=draw_device).to(x0.device)
    # Which samples are still inverting is decided on the host: on a GPU, testing a device tensor at every step
    # would make the host wait for each UNet call before it may queue the next one.
    for j in range(paths.shape[1]):
        active_host = lengths > j  # [N]
        if not bool(active_host.any()):
            break
        active = active_host.to(x0.device, non_blocking=True)
        index = active_host.nonzero().squeeze(1).to(x0.device, non_blocking=True)
        every = index.numel() == n
        sub = (lambda v: v) if every else (lambda v: v[index])
        step_cond = cond if every else _rows(cond, index, n)
        g, z_s, x0_s = sub(paths[:, j]), sub(z), sub(x0.float())
        told_j = None if told is None else sub(told[:, j])
        level_s = _levels(schedule, sub(source) if told is None else told_j, z.ndim,
                          clean=(1.0, 0.0) if told is None else clean)
        level_g = _levels(schedule, g, z.ndim)

        def predict(x, timesteps):
            return predict_fn(x.to(dtype), timesteps, step_cond).float()

        ref_eps = None
        if reg_noise is not None and noise_reg is not None:
            # ReNoise's KL reference: the model's prediction on a forward-noised x0 at the same level.
            x_fwd = level_g[0] * x0_s + level_g[1] * sub(reg_noise)
            ref_eps = schedule.held(predict(x_fwd, g), x_fwd, *level_g)
        z_new = _renoise_step(schedule, predict, z_s, level_s, g, level_g, renoise_iters, average_window,
                              noise_reg, ref_eps, generator, told=told_j)
        if every:
            z = z_new
        else:
            z = z.clone()
            z[index] = z_new
        source = torch.where(active, paths[:, j], source)
    return z


def _check_options(renoise_iters, average_window, noise_reg_steps, noise_reg_ac_rolls):
    if int(renoise_iters) < 0:
        raise ValueError(f"trajectory.renoise_iters={renoise_iters} must be >= 0 (0 = plain DDIM inversion).")
    if len(average_window) != 2 or int(average_window[0]) < 0 or int(average_window[1]) < int(average_window[0]):
        raise ValueError(f"trajectory.average_window={list(average_window)} must be [start, end] with "
                         "0 <= start <= end "
                         "(prediction indices 0..renoise_iters, end exclusive), e.g. [0, 2].")
    if int(noise_reg_steps) < 0 or int(noise_reg_ac_rolls) < 1:
        raise ValueError("trajectory.noise_reg_steps must be >= 0 and trajectory.noise_reg_ac_rolls >= 1.")


def invert_latents(schedule: Schedule, predict_fn: Callable, x0: torch.Tensor, cond, timesteps: Sequence[int], *,
                   renoise_iters: int = 0, average_window: Sequence[int] = (0, 2), noise_reg_steps: int = 0,
                   noise_reg_lambda_kl: float = 0.065, noise_reg_lambda_ac: float = 20.0, noise_reg_ac_rolls: int = 5,
                   generator=None) -> torch.Tensor:
    """Invert clean latents ``x0`` ``[N, C, H, W]`` along ascending ``timesteps``; returns z at the last one (float32).

    ``renoise_iters=0`` is plain DDIM inversion (Euler for flow). Reconstruct with :func:`ddim_sample` on the same
    timesteps.
    """
    import torch

    _check_options(renoise_iters, average_window, noise_reg_steps, noise_reg_ac_rolls)
    if not timesteps or list(timesteps) != sorted(set(int(g) for g in timesteps)):
        raise ValueError(f"invert_latents: timesteps must be a non-empty ascending list, got {list(timesteps)}.")
    paths = torch.tensor([list(timesteps)] * x0.shape[0], dtype=torch.long, device=x0.device)
    lengths = torch.full((x0.shape[0],), len(timesteps), dtype=torch.long)
    reg = _reg_options(noise_reg_steps, noise_reg_lambda_kl, noise_reg_lambda_ac, noise_reg_ac_rolls)
    with torch.no_grad():
        return _invert(schedule, predict_fn, x0, cond, paths, lengths, renoise_iters=int(renoise_iters),
                       average_window=average_window, noise_reg=reg, generator=generator)


def invert_grid(kind: str, schedule: Schedule, predict_fn: Callable, x0: torch.Tensor, cond, *, steps: int = 50,
                renoise_iters: int = 1, average_window: Sequence[int] = (0, 2), noise_reg_steps: int = 0,
                noise_reg_lambda_kl: float = 0.065, noise_reg_lambda_ac: float = 20.0, noise_reg_ac_rolls: int = 5,
                generator=None, t_mode: str = "exact", **_unused) -> torch.Tensor:
    """Every point of the inversion grid at once: ``[N, G, C, H, W]`` float32, the latent inverted to
    ``inversion_grid(schedule, steps)[g]`` (``kind`` ddim or renoise, options as in :func:`make_trajectory`).

    With a model that does not change (the frozen reference), these are all a trajectory needs: pass them to
    :func:`make_trajectory` as ``inverted`` and ``grid_below`` / ``smpo_released`` cost no model call, ``exact``
    one step. The data cache stores them (``trajectory.cache_inverted``). ``t_mode``: exact and grid_below share
    one grid; ``smpo_released`` inverts with diffusers 0.20's arithmetic and stores the latent after each of its
    steps (at :func:`released_smpo_steps`' targets). ``_unused`` takes the options that do not apply here, so
    ``trajectory_options(cfg.trajectory)`` can be passed whole.
    """
    import torch

    if kind not in ("ddim", "renoise"):
        raise ValueError(f"invert_grid: kind must be ddim or renoise, got {kind!r}.")
    _check_options(renoise_iters, average_window, noise_reg_steps, noise_reg_ac_rolls)
    iters, window = (0, (0, 1)) if kind == "ddim" else (int(renoise_iters), average_window)
    reg = None if kind == "ddim" else _reg_options(noise_reg_steps, noise_reg_lambda_kl, noise_reg_lambda_ac,
                                                   noise_reg_ac_rolls)
    if t_mode not in T_MODES:
        raise ValueError(f"trajectory.t_mode={t_mode!r} is not one of {', '.join(T_MODES)}.")
    n = x0.shape[0]
    if t_mode == "smpo_released":
        sources, grid, _ = released_smpo_steps(schedule, steps)
    else:
        grid, sources = inversion_grid(schedule, steps), None
    reg_noise = None
    if reg is not None and reg["lambda_kl"] > 0:  # one KL reference noise for the whole inversion, as ReNoise
        draw_device = generator.device if generator is not None else x0.device
        reg_noise = torch.randn(x0.shape, generator=generator, device=draw_device).to(x0.device)
    z, source, points = x0.float(), torch.full((n,), -1, dtype=torch.long, device=x0.device), []
    with torch.no_grad():
        for j, g in enumerate(grid):  # one step at a time, keeping each grid point's latent
            target = torch.full((n, 1), g, dtype=torch.long, device=x0.device)
            told = None if sources is None else torch.full((n, 1), sources[j], dtype=torch.long, device=x0.device)
            z = _invert(schedule, predict_fn, x0, cond, target, torch.ones(n, dtype=torch.long),
                        renoise_iters=iters, average_window=window, noise_reg=reg, generator=generator,
                        start=z, start_t=source, told=told, clean=schedule.clean, reg_noise=reg_noise)
            source = target[:, 0]
            points.append(z)
    return torch.stack(points, dim=1)


def _reg_options(steps, lambda_kl, lambda_ac, ac_rolls):
    if int(steps) <= 0:
        return None
    return {"steps": int(steps), "lambda_kl": float(lambda_kl), "lambda_ac": float(lambda_ac),
            "ac_rolls": int(ac_rolls)}


def ddim_sample(schedule: Schedule, predict_fn: Callable, z: torch.Tensor, cond,
                timesteps: Sequence[int]) -> torch.Tensor:
    """Deterministic DDIM sampling (Euler for flow) from ``z`` at ``timesteps[-1]`` down the same grid to the clean
    latent (float32): each step is ``schedule.step_at`` with the output at the step's own source.

    A v-prediction output gives x0_hat = sqrt(abar) z - sqrt(1 - abar) v directly (as diffusers' DDIMScheduler
    computes it), with no division by sqrt(abar): zero-terminal-SNR schedules (abar = 0 at the last timestep) then
    sample fine. An epsilon output there does not determine x0 at all (diffusers divides by zero): refused.
    """
    import torch

    n = z.shape[0]
    steps = [int(g) for g in timesteps]
    if schedule.prediction_type == "epsilon":
        a_grid, _ = schedule.coefficients(torch.tensor(steps, dtype=torch.long))
        zero = [g for g, a in zip(steps, a_grid.tolist()) if a <= 0.0]
        if zero:
            raise ValueError(f"ddim_sample: abar is 0 at t={zero[0]} (a zero-terminal-SNR schedule), where an "
                             "epsilon-prediction model's output does not determine x0; use a v_prediction model or "
                             "a grid that ends below that timestep.")
    with torch.no_grad():
        z = z.float()
        for j in reversed(range(len(steps))):
            g = torch.full((n,), steps[j], dtype=torch.long, device=z.device)
            s = torch.full((n,), steps[j - 1] if j > 0 else -1, dtype=torch.long, device=z.device)
            output = predict_fn(z, g, cond).float()
            z = schedule.step_at(z, output, _levels(schedule, g, z.ndim), _levels(schedule, s, z.ndim))
    return z


def trajectory_options(traj_cfg) -> dict:
    """``cfg.trajectory`` -> the keyword options of :func:`make_trajectory` (everything but ``kind``)."""
    return {
        "steps": traj_cfg.steps,
        "t_mode": traj_cfg.t_mode,
        "renoise_iters": traj_cfg.renoise_iters,
        "average_window": list(traj_cfg.average_window),
        "noise_reg_steps": traj_cfg.noise_reg_steps,
        "noise_reg_lambda_kl": traj_cfg.noise_reg_lambda_kl,
        "noise_reg_lambda_ac": traj_cfg.noise_reg_lambda_ac,
        "noise_reg_ac_rolls": traj_cfg.noise_reg_ac_rolls,
    }


def make_trajectory(kind: str, schedule: Schedule, latents_w: torch.Tensor, latents_l: torch.Tensor, *,
                    predict_fn: Optional[Callable] = None, cond=None, generator=None, steps: int = 50,
                    t_mode: str = "exact", renoise_iters: int = 1, average_window: Sequence[int] = (0, 2),
                    noise_reg_steps: int = 0, noise_reg_lambda_kl: float = 0.065, noise_reg_lambda_ac: float = 20.0,
                    noise_reg_ac_rolls: int = 5, process_index: int = 0, num_processes: int = 1,
                    inverted: Optional[torch.Tensor] = None) -> Trajectory:
    """x_t, t, target and noise for B pairs (``[w; l]``), from the forward process or by inverting x0.

    ``predict_fn(x [n, C, H, W], t [n], cond) -> model output`` is needed for ``ddim`` / ``renoise``; ``cond`` is
    the ``[w; l]``-repeated conditioning, cut to the n samples still being inverted (see the module docstring).
    t is drawn exactly as for ``forward`` (the same generator gives the same t), also under data parallelism
    (``process_index`` / ``num_processes``, see :func:`shared_noise_and_timesteps`). ``ddim`` ignores the ReNoise
    options.

    ``inverted``: x0 already inverted to every grid point, ``[2B, G, C, H, W]`` from :func:`invert_grid` with the
    same kind and options and the model ``predict_fn`` stands for (e.g. read from the data cache). Each sample
    then starts from its last grid point below t: ``grid_below`` needs no model call, ``exact`` one step to t;
    ``smpo_released`` (``inverted`` made with that t_mode) takes the point its released loop ends at, no call.
    """
    import torch

    if kind not in KINDS:
        raise ValueError(f"trajectory.kind={kind!r} is not one of {', '.join(KINDS)}.")
    if kind == "forward":
        return forward_trajectory(schedule, latents_w, latents_l, generator=generator, process_index=process_index,
                                  num_processes=num_processes)
    if predict_fn is None:
        raise ValueError(f"trajectory.kind={kind} inverts x0 with the model: pass predict_fn(x_t, t, cond).")
    _check_pair_shapes("make_trajectory", latents_w, latents_l)
    _check_options(renoise_iters, average_window, noise_reg_steps, noise_reg_ac_rolls)
    if t_mode not in T_MODES:
        raise ValueError(f"trajectory.t_mode={t_mode!r} is not one of {', '.join(T_MODES)}.")
    released = released_smpo_steps(schedule, steps) if t_mode == "smpo_released" else None
    grid = inversion_grid(schedule, steps) if released is None else released[1]
    x0 = torch.cat([latents_w, latents_l])  # [2B, C, H, W]
    _, t = shared_noise_and_timesteps(latents_w, schedule, generator, process_index=process_index,
                                      num_processes=num_processes)
    if kind == "ddim":
        iters, window, reg = 0, (0, 1), None
    else:
        iters, window = int(renoise_iters), average_window
        reg = _reg_options(noise_reg_steps, noise_reg_lambda_kl, noise_reg_lambda_ac, noise_reg_ac_rolls)
    start = start_t = told = None
    if inverted is not None and (inverted.shape[:2] != (x0.shape[0], len(grid)) or inverted.shape[2:] != x0.shape[1:]):
        raise ValueError(f"make_trajectory: inverted has shape {tuple(inverted.shape)}, expected "
                         f"{(x0.shape[0], len(grid), *x0.shape[1:])} (the {len(grid)}-point grid of steps={steps}).")
    if inverted is None:
        paths, lengths, told = _paths(grid, t, t_mode, released)
    elif released is not None:
        # the released loop runs every step whose source is below t and ends at that step's target
        sources = torch.tensor(released[0], device=t.device)
        done = (sources[None, :] < t[:, None]).sum(1)  # [2B] steps run
        last = inverted.to(x0.device)[torch.arange(len(t), device=t.device), (done - 1).clamp(min=0)].float()
        start = torch.where((done > 0).reshape(-1, 1, 1, 1), last, x0.float())
        paths, lengths = t[:, None], torch.zeros(len(t), dtype=torch.long)
    else:
        grid_t = torch.tensor(grid, device=t.device)
        below = (grid_t[None, :] < t[:, None]).sum(1)  # [2B] grid points below t (their last is the start)
        clean = x0.float()
        start = torch.where((below > 0).reshape(-1, 1, 1, 1),
                            inverted.to(x0.device)[torch.arange(len(t), device=t.device), (below - 1).clamp(min=0)].float(),
                            clean)
        start_t = torch.where(below > 0, grid_t[(below - 1).clamp(min=0)], torch.full_like(t, -1))
        paths = t[:, None]  # exact: the one step left, from the grid point below t to t itself
        lengths = torch.ones(len(t), dtype=torch.long) if t_mode == "exact" else torch.zeros(len(t), dtype=torch.long)
    with torch.no_grad():
        x_t = _invert(schedule, predict_fn, x0, cond, paths, lengths, renoise_iters=iters, average_window=window,
                      noise_reg=reg, generator=generator, start=start, start_t=start_t, told=told,
                      clean=schedule.clean)  # [2B, C, H, W] float32
        a_t, b_t = _levels(schedule, t, x_t.ndim)
        tau = (x_t - a_t * x0.float()) / b_t
        target = schedule.target(x0.float(), tau, t)
    return Trajectory(x_t=x_t.to(x0.dtype), t=t, target=target.to(x0.dtype), noise=tau.to(x0.dtype))

"""Where the noisy latent x_t and its regression target come from, for a batch of preference pairs.

Layout: every tensor built here is ``[w; l]``, the B winners followed by the B losers (``[2B, ...]``), so the
trainer runs one UNet forward over the pair batch and splits with ``.chunk(2)``. The two sides of a pair share
their noise and their timestep: Diffusion-DPO compares the denoising errors of winner and loser, and sharing
removes the noise and timestep variance from that difference (both reference codebases do this).

Kinds:

- ``forward`` (here): x_t from the forward process, ``scheduler.add_noise(x0, noise, t)``, as in Diffusion-DPO.
- ``ddim`` / ``renoise`` (SmPO's inversion of x0 with the current model): a later issue.

Example::

    from diffusers import DDPMScheduler
    from diffusion_pref.trajectories import forward_trajectory
    traj = forward_trajectory(DDPMScheduler(), latents_w, latents_l, generator=torch.Generator().manual_seed(0))
    pred = unet(traj.x_t, traj.t, cond).sample          # [2B, C, H, W]
    policy_w, policy_l = denoising_log_likelihood(pred, traj.target).chunk(2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["ForwardTrajectory", "denoising_target", "forward_trajectory", "shared_noise_and_timesteps"]

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class ForwardTrajectory:
    """One forward-noised pair batch in the ``[w; l]`` layout."""

    x_t: torch.Tensor  # [2B, C, H, W] noisy latents fed to the UNet
    t: torch.Tensor  # [2B] integer timesteps, t[i] == t[i + B]
    target: torch.Tensor  # [2B, C, H, W] epsilon or v, per the scheduler's prediction_type
    noise: torch.Tensor  # [2B, C, H, W] the shared noise, noise[i] == noise[i + B]


def shared_noise_and_timesteps(latents_w: torch.Tensor, num_train_timesteps: int, generator=None):
    """Draw noise and timesteps for B pairs and repeat them for the two sides: ``([2B, ...], [2B])``.

    ``t ~ U{0, ..., num_train_timesteps - 1}``. Noise is drawn in float32 on the generator's device (so a CPU
    generator gives the same numbers whatever the latents' device and dtype), then moved to the latents.
    """
    import torch

    if latents_w.ndim < 2:
        raise ValueError(
            f"shared_noise_and_timesteps: latents_w must be [B, ...], got shape {tuple(latents_w.shape)}."
        )
    if int(num_train_timesteps) < 1:
        raise ValueError(f"shared_noise_and_timesteps: num_train_timesteps must be >= 1, got {num_train_timesteps}.")
    draw_device = generator.device if generator is not None else latents_w.device
    batch = latents_w.shape[0]
    noise_half = torch.randn(latents_w.shape, generator=generator, device=draw_device, dtype=torch.float32)
    t_half = torch.randint(0, int(num_train_timesteps), (batch,), generator=generator, device=draw_device)
    noise = torch.cat([noise_half, noise_half]).to(device=latents_w.device, dtype=latents_w.dtype)  # [2B, ...]
    t = torch.cat([t_half, t_half]).to(latents_w.device)  # [2B]
    return noise, t


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target for the UNet: the noise (``epsilon``) or ``v`` (``scheduler.get_velocity``)."""
    prediction_type = getattr(scheduler.config, "prediction_type", None)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(
        f"Unsupported scheduler prediction_type {prediction_type!r} in {type(scheduler).__name__}; supported: "
        f"{', '.join(SUPPORTED_PREDICTION_TYPES)}. Load a scheduler config with one of these prediction types."
    )


def forward_trajectory(
    scheduler, latents_w: torch.Tensor, latents_l: torch.Tensor, generator=None
) -> ForwardTrajectory:
    """Forward-noise winners and losers with shared noise and t: ``x_t = add_noise([x0_w; x0_l], noise, t)``."""
    import torch

    if latents_w.shape != latents_l.shape:
        raise ValueError(
            f"forward_trajectory: latents_w has shape {tuple(latents_w.shape)} but latents_l has "
            f"{tuple(latents_l.shape)}; the two sides of each pair must have the same latent shape."
        )
    x0 = torch.cat([latents_w, latents_l])  # [2B, C, H, W]
    noise, t = shared_noise_and_timesteps(latents_w, scheduler.config.num_train_timesteps, generator)
    x_t = scheduler.add_noise(x0, noise, t)
    target = denoising_target(scheduler, x0, noise, t)
    return ForwardTrajectory(x_t=x_t, t=t, target=target, noise=noise)

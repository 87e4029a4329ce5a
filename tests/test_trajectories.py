"""Tests for diffusion_pref.trajectories (forward kind): shared noise/t, x_t and targets against the closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_pref.losses import denoising_log_likelihood
from diffusion_pref.trajectories import (
    denoising_target,
    forward_trajectory,
    shared_noise_and_timesteps,
)

B, SHAPE = 3, (4, 2, 2)


def latents(seed):
    return torch.randn((B, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_noise_and_timesteps_shared_within_each_pair():
    noise, t = shared_noise_and_timesteps(latents(0), 1000, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (2 * B, *SHAPE) and t.shape == (2 * B,)
    torch.testing.assert_close(noise[:B], noise[B:], rtol=0, atol=0)
    assert torch.equal(t[:B], t[B:])
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    # different pairs get different noise (otherwise the "sharing" would be across the whole batch)
    assert not torch.equal(noise[0], noise[1])


def test_noise_is_reproducible_from_the_generator_and_follows_latent_dtype():
    a, ta = shared_noise_and_timesteps(latents(0), 1000, generator=torch.Generator().manual_seed(7))
    b, tb = shared_noise_and_timesteps(latents(0).bfloat16(), 1000, generator=torch.Generator().manual_seed(7))
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)
    assert torch.equal(ta, tb)


def _abar(scheduler, t):
    return scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1).double()


def test_forward_x_t_matches_closed_form_with_shared_noise_and_t():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0_w, x0_l = latents(0), latents(1)
    traj = forward_trajectory(scheduler, x0_w, x0_l, generator=torch.Generator().manual_seed(3))
    assert traj.x_t.shape == (2 * B, *SHAPE) and traj.t.shape == (2 * B,)
    assert torch.equal(traj.t[:B], traj.t[B:])
    torch.testing.assert_close(traj.noise[:B], traj.noise[B:], rtol=0, atol=0)
    x0 = torch.cat([x0_w, x0_l]).double()
    abar = _abar(scheduler, traj.t)
    want = abar.sqrt() * x0 + (1 - abar).sqrt() * traj.noise.double()
    torch.testing.assert_close(traj.x_t.double(), want, rtol=1e-5, atol=1e-5)
    # epsilon prediction: the target is the noise itself
    torch.testing.assert_close(traj.target, traj.noise, rtol=0, atol=0)


def test_v_prediction_target_matches_closed_form():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0_w, x0_l = latents(0), latents(1)
    traj = forward_trajectory(scheduler, x0_w, x0_l, generator=torch.Generator().manual_seed(4))
    x0 = torch.cat([x0_w, x0_l]).double()
    abar = _abar(scheduler, traj.t)
    want = abar.sqrt() * traj.noise.double() - (1 - abar).sqrt() * x0
    torch.testing.assert_close(traj.target.double(), want, rtol=1e-5, atol=1e-5)


def test_identical_winner_and_loser_give_identical_log_likelihoods():
    # with shared noise and t, a pair of identical images must score identically under any model
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = latents(5)
    traj = forward_trajectory(scheduler, x0, x0.clone(), generator=torch.Generator().manual_seed(6))
    pred = traj.x_t * 0.3  # any deterministic per-sample "model"
    ll_w, ll_l = denoising_log_likelihood(pred, traj.target).chunk(2)
    torch.testing.assert_close(ll_w, ll_l, rtol=0, atol=0)


def test_unsupported_prediction_type_and_shape_mismatch_raise():
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="sample")
    x0 = latents(0)
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        denoising_target(scheduler, x0, torch.randn_like(x0), torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="latents_l"):
        forward_trajectory(DDPMScheduler(num_train_timesteps=10), x0, x0[:1])

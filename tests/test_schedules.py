"""Tests for diffusion_pref.schedules: the DDPM and flow-matching noise arithmetic against diffusers' own schedulers,
analytic inversions, the training timestep distributions, and trajectories built on a flow schedule."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffusion_pref.schedules import DDPMSchedule, FlowMatchSchedule, schedule_from_scheduler
from diffusion_pref.trajectories import (
    ddim_sample,
    forward_trajectory,
    invert_grid,
    invert_latents,
    make_trajectory,
    shared_noise_and_timesteps,
)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
          set_alpha_to_one=False)
SHAPE = (4, 4, 4)


def randn(n, seed, dtype=torch.float32):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed)).to(dtype)


def flow_sigma(i, n=1000, shift=1.0):
    s = (i + 1) / n  # float64 reference of the contract's formula
    return shift * s / (1 + (shift - 1) * s)


# ------------------------------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddpm_add_noise_and_target_equal_diffusers(prediction_type, dtype):
    reference = DDPMScheduler(prediction_type=prediction_type, **{k: v for k, v in SD.items() if k != "set_alpha_to_one"})
    schedule = DDPMSchedule(reference.config)
    x0, noise = randn(8, 0, dtype), randn(8, 1, dtype)
    t = torch.tensor([0, 1, 17, 250, 500, 801, 998, 999])
    # same arithmetic as diffusers (abar in the sample dtype, then ** 0.5): bit for bit, also in bf16
    assert torch.equal(schedule.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    want = noise if prediction_type == "epsilon" else reference.get_velocity(x0, noise, t)
    assert torch.equal(schedule.target(x0, noise, t), want)
    assert schedule.prediction_type == prediction_type and schedule.num_train_timesteps == 1000
    # coefficients: float32 sqrt(abar), sqrt(1 - abar) against a float64 computation of the betas
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t]
    a, b = schedule.coefficients(t)
    assert a.dtype == b.dtype == torch.float32 and a.shape == t.shape
    torch.testing.assert_close(a.double(), abar.sqrt(), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.double(), (1 - abar).sqrt(), rtol=0, atol=1e-6)
    assert torch.equal(schedule.model_timestep(t), t)


def test_ddpm_clean_end_and_config_keys_follow_diffusers_ddim_inversion():
    sd = DDPMSchedule(DDIMScheduler(**SD).config)
    abar0 = float(DDPMScheduler(**{k: v for k, v in SD.items() if k != "set_alpha_to_one"}).alphas_cumprod[0])
    assert sd.clean[0] == pytest.approx(abar0 ** 0.5, abs=1e-7) and sd.clean[1] == pytest.approx((1 - abar0) ** 0.5)
    assert sd.initial_alpha_cumprod == pytest.approx(abar0)
    assert DDPMSchedule(num_train_timesteps=1000).clean == (1.0, 0.0)  # set_alpha_to_one defaults to true
    assert sd.inversion_grid(5) == [1, 201, 401, 601, 801]
    # keyword arguments override the config, also keys diffusers recorded as defaults
    v = DDPMSchedule(DDIMScheduler().config, prediction_type="v_prediction")
    assert v.prediction_type == v.config.prediction_type == "v_prediction"


def test_ddpm_timesteps_are_todays_random_stream():
    # shared_noise_and_timesteps draws the noise first, then t ~ U{0..N-1} with torch.randint on the same generator
    schedule = DDPMSchedule(num_train_timesteps=1000)
    latents = randn(5, 0)
    noise, t = shared_noise_and_timesteps(latents, schedule, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    want_noise = torch.randn((5, *SHAPE), generator=gen)
    want_t = torch.randint(0, 1000, (5,), generator=gen)
    assert torch.equal(noise[:5], want_noise) and torch.equal(t[:5], want_t) and torch.equal(t[5:], want_t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
@pytest.mark.parametrize("t_from, t_to", [(0, 400), (400, 999), (999, 3), (500, 100)])
def test_invert_step_with_the_true_output_lands_on_forward_noising(prediction_type, t_from, t_to):
    # x_s = a_s x0 + b_s eps and an output that is the truth at (x_s, s): DDIM / Euler is exact in both directions
    if prediction_type == "flow":
        schedule = FlowMatchSchedule(1000, shift=3.0)
    else:
        schedule = DDPMSchedule(DDIMScheduler(prediction_type=prediction_type, **SD).config)
    x0, eps = randn(3, 4).double(), randn(3, 5).double()
    s, g = torch.full((3,), t_from), torch.full((3,), t_to)
    a_s, b_s = (c.double().reshape(-1, 1, 1, 1) for c in schedule.coefficients(s))
    x_s = a_s * x0 + b_s * eps
    true_output = {"epsilon": eps, "v_prediction": a_s * eps - b_s * x0, "flow": eps - x0}[prediction_type]
    torch.testing.assert_close(schedule.target(x0, eps, s), true_output, rtol=1e-6, atol=1e-6)
    x0_hat, eps_hat = schedule.split(true_output.float(), x_s.float(), s)
    torch.testing.assert_close(x0_hat.double(), x0, rtol=0, atol=2e-4 if t_from == 999 else 1e-5)
    torch.testing.assert_close(eps_hat.double(), eps, rtol=0, atol=1e-5)
    moved = schedule.invert_step(x_s.float(), true_output.float(), s, g)
    want = schedule.add_noise(x0, eps, g)  # float64 arithmetic
    torch.testing.assert_close(moved.double(), want, rtol=0, atol=2e-4 if t_from == 999 else 1e-5)


# ------------------------------------------------------------------------------------------------- flow


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_add_noise_equals_scale_noise_and_target_is_the_velocity(shift, dtype):
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    schedule = schedule_from_scheduler(reference)
    assert isinstance(schedule, FlowMatchSchedule) and schedule.shift == shift and schedule.prediction_type == "flow"
    n = 1000
    # index i <-> diffusers' descending table entry n - 1 - i, bit for bit
    assert torch.equal(schedule.sigmas, reference.sigmas.flip(0))
    assert torch.equal(schedule.model_timestep(torch.arange(n)), reference.timesteps.flip(0))
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(schedule.coefficients(t)[1].double(),
                               torch.tensor([flow_sigma(i, n, shift) for i in t.tolist()], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    x0, noise = randn(6, 0, dtype), randn(6, 1, dtype)
    want = reference.scale_noise(x0, reference.timesteps[n - 1 - t], noise)
    assert torch.equal(schedule.add_noise(x0, noise, t), want)
    assert torch.equal(schedule.target(x0, noise, t), noise - x0)
    assert schedule.clean == (1.0, 0.0)
    assert schedule.inversion_grid(5) == [199, 399, 599, 799, 999]


def test_flow_ddim_sample_equals_diffusers_euler_steps():
    schedule = FlowMatchSchedule(1000, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    grid = schedule.inversion_grid(4)  # [249, 499, 749, 999]
    reference.set_timesteps(sigmas=[(g + 1) / 1000 for g in reversed(grid)])  # shifted there, as here
    torch.testing.assert_close(reference.timesteps, schedule.model_timestep(torch.tensor(grid)).flip(0))

    def model(x, t):  # a velocity that depends on the input and the timestep
        return 0.5 * torch.tanh(x) - t / 2000.0

    z = randn(2, 7)
    ours = ddim_sample(schedule, lambda x, t, c: model(x, schedule.model_timestep(t).reshape(-1, 1, 1, 1)), z, None,
                       grid)
    want = z
    for step_t in reference.timesteps:  # down the grid, the last step to sigma = 0
        want = reference.step(model(want, float(step_t)), step_t, want).prev_sample
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_flow_euler_inversion_of_a_linear_velocity_round_trips():
    # v(z, t) = c_t z. Plain Euler inversion s -> g: z_g = (1 + (sigma_g - sigma_s) c_g) z_s. The exact inverse of
    # the Euler sampling step g -> s solves z_s = z_g - (sigma_g - sigma_s) c_g z_g: z_g = z_s / (1 - d c_g), the
    # fixed point ReNoise converges to; sampling back from it lands on x0.
    schedule = FlowMatchSchedule(1000, shift=2.0)
    grid = [99, 399, 699, 999]
    c = {99: 0.3, 399: -0.4, 699: 0.5, 999: 0.2}

    def predict(x, t, cond):
        return torch.tensor([c[int(ti)] for ti in t]).reshape(-1, 1, 1, 1) * x

    x0 = randn(2, 3)
    plain_want, exact_want, sigma_s = x0.double(), x0.double(), 0.0
    for g in grid:
        d = flow_sigma(g, shift=2.0) - sigma_s
        plain_want = (1 + d * c[g]) * plain_want
        exact_want = exact_want / (1 - d * c[g])
        sigma_s = flow_sigma(g, shift=2.0)
    plain = invert_latents(schedule, predict, x0, None, grid)
    torch.testing.assert_close(plain.double(), plain_want, rtol=1e-5, atol=1e-5)
    exact = invert_latents(schedule, predict, x0, None, grid, renoise_iters=40, average_window=[40, 41])
    torch.testing.assert_close(exact.double(), exact_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddim_sample(schedule, predict, exact, None, grid), x0, rtol=1e-5, atol=1e-5)
    assert float((ddim_sample(schedule, predict, plain, None, grid) - x0).abs().max()) > 1e-2  # plain is approximate


def _normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _logit(p):
    return math.log(p / (1 - p))


def _mode_cdf(x, scale):
    # u = f(v) = 1 - v - scale (cos^2(pi v / 2) - 1 + v) decreases from 1 to 0: P(u <= x) = 1 - f^{-1}(x)
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 1 - mid - scale * (math.cos(math.pi * mid / 2) ** 2 - 1 + mid) > x:
            lo = mid
        else:
            hi = mid
    return 1 - (lo + hi) / 2


@pytest.mark.parametrize("sampling, params, cdf", [
    ("logit_normal", {}, lambda x: 0.0 if x <= 0 else 1.0 if x >= 1 else _normal_cdf(_logit(x))),
    ("logit_normal", {"logit_mean": 1.0, "logit_std": 0.5},
     lambda x: 0.0 if x <= 0 else 1.0 if x >= 1 else _normal_cdf((_logit(x) - 1.0) / 0.5)),
    ("mode", {"mode_scale": 1.29}, lambda x: _mode_cdf(x, 1.29)),
    ("uniform", {}, lambda x: min(max(x, 0.0), 1.0)),
])
def test_flow_timestep_histogram_follows_the_density(sampling, params, cdf):
    """Index i = floor(u N) has probability F((i + 1) / N) - F(i / N). Over 20 bins of 50 indices each count is
    Binomial(n, p): every bin within 5 standard deviations (a false alarm has probability < 20 * 6e-7)."""
    n, total, bins = 200_000, 1000, 20
    schedule = FlowMatchSchedule(total, shift=3.0, timestep_sampling=sampling, **params)
    t = schedule.sample_timesteps(n, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < total
    counts = torch.bincount(t // (total // bins), minlength=bins).double()
    width = total // bins
    for k in range(bins):
        p = cdf((k + 1) * width / total) - cdf(k * width / total)
        assert abs(float(counts[k]) - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (k, float(counts[k]), n * p)
    if params.get("logit_mean", 0.0) > 0:  # the paper's convention: a positive mean favours noisier levels
        assert float((t >= total // 2).double().mean()) > 0.75


def test_flow_uniform_sampling_is_the_ddpm_stream():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(FlowMatchSchedule(1000, timestep_sampling="uniform").sample_timesteps(64, gen(), "cpu"),
                       DDPMSchedule(num_train_timesteps=1000).sample_timesteps(64, gen(), "cpu"))


# ----------------------------------------------------------------------------------- schedule_from_scheduler


def test_schedule_from_scheduler_picks_the_family_and_refuses_what_it_cannot_do(tmp_path):
    for scheduler in (DDPMScheduler(), DDIMScheduler(**SD), EulerDiscreteScheduler(prediction_type="v_prediction")):
        schedule = schedule_from_scheduler(scheduler)
        assert isinstance(schedule, DDPMSchedule)
        assert schedule_from_scheduler(scheduler.config).prediction_type == scheduler.config.prediction_type
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.save_config(tmp_path)  # a config read from disk carries _class_name
    loaded = FlowMatchEulerDiscreteScheduler.load_config(tmp_path)
    assert isinstance(schedule_from_scheduler(loaded), FlowMatchSchedule)
    assert schedule_from_scheduler(flow.config).shift == 3.0  # no _class_name: shift and no betas
    assert schedule_from_scheduler(flow, logit_std=2.0).logit_std == 2.0
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        schedule_from_scheduler(DDPMScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="only apply to flow-matching"):
        schedule_from_scheduler(DDPMScheduler(), logit_std=2.0)
    with pytest.raises(ValueError, match="timestep_sampling='cosmap' is not one of"):
        FlowMatchSchedule(timestep_sampling="cosmap")
    with pytest.raises(ValueError, match="mode_scale"):
        FlowMatchSchedule(timestep_sampling="mode", mode_scale=3.0)
    with pytest.raises(ValueError, match="trajectory.steps=0"):
        FlowMatchSchedule().inversion_grid(0)


# ------------------------------------------------------------------------------------ trajectories on flow


def test_flow_forward_trajectory_is_add_noise_and_velocity():
    schedule = FlowMatchSchedule(1000, shift=3.0)
    x0_w, x0_l = randn(4, 0), randn(4, 1)
    traj = forward_trajectory(schedule, x0_w, x0_l, generator=torch.Generator().manual_seed(2))
    x0 = torch.cat([x0_w, x0_l])
    assert torch.equal(traj.t[:4], traj.t[4:])
    assert torch.equal(traj.x_t, schedule.add_noise(x0, traj.noise, traj.t))
    assert torch.equal(traj.target, traj.noise - x0)
    gen = torch.Generator().manual_seed(2)  # t: the logit-normal draw after the noise
    torch.randn((4, *SHAPE), generator=gen)
    assert torch.equal(traj.t[:4], schedule.sample_timesteps(4, gen, "cpu"))


@pytest.mark.parametrize("kind", ["ddim", "renoise"])
@pytest.mark.parametrize("t_mode", ["exact", "grid_below"])
def test_flow_inversion_with_a_perfect_velocity_reproduces_forward_noising(kind, t_mode):
    # v = noise - x0 is the true velocity everywhere on the straight path: Euler inversion is exact
    schedule = FlowMatchSchedule(1000, shift=3.0)
    pairs = 12
    x0_w, x0_l = randn(pairs, 0), randn(pairs, 1)
    x0 = torch.cat([x0_w, x0_l])
    noise = randn(2 * pairs, 9)
    velocity = noise - x0
    traj = make_trajectory(kind, schedule, x0_w, x0_l, predict_fn=lambda x, t, c: velocity[c],
                           cond=torch.arange(2 * pairs), steps=5, t_mode=t_mode,
                           generator=torch.Generator().manual_seed(11))
    grid = schedule.inversion_grid(5)
    reached = traj.t if t_mode == "exact" else torch.tensor(
        [max([g for g in grid if g < ti] or [-1]) for ti in traj.t.tolist()])
    for i, r in enumerate(reached.tolist()):
        want = x0[i] if r < 0 else schedule.add_noise(x0[i:i + 1], noise[i:i + 1], torch.tensor([r]))[0]
        torch.testing.assert_close(traj.x_t[i], want, rtol=1e-5, atol=1e-5)
    # target consistent with add_noise / target at the sampled t: x_t = add_noise(x0, tau, t), target = tau - x0
    torch.testing.assert_close(traj.x_t, schedule.add_noise(x0, traj.noise, traj.t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.target, schedule.target(x0, traj.noise, traj.t), rtol=1e-5, atol=1e-5)
    if t_mode == "exact":
        torch.testing.assert_close(traj.noise, noise, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traj.target, velocity, rtol=1e-4, atol=1e-4)
    # the cached-grid path gives the same trajectory
    inverted = invert_grid(kind, schedule, lambda x, t, c: velocity[c], x0, torch.arange(2 * pairs), steps=5)
    cached = make_trajectory(kind, schedule, x0_w, x0_l, predict_fn=lambda x, t, c: velocity[c],
                             cond=torch.arange(2 * pairs), steps=5, t_mode=t_mode, inverted=inverted,
                             generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(cached.x_t, traj.x_t, rtol=1e-5, atol=1e-5)


def test_flow_refuses_smpo_released_and_noise_regularisation():
    schedule = FlowMatchSchedule()
    x = randn(2, 0)
    with pytest.raises(ValueError, match="smpo_released .*DDPM-type schedule"):
        make_trajectory("ddim", schedule, x, x, predict_fn=lambda z, t, c: z, t_mode="smpo_released")
    with pytest.raises(ValueError, match="noise_reg_steps"):
        make_trajectory("renoise", schedule, x, x, predict_fn=lambda z, t, c: z, noise_reg_steps=1)

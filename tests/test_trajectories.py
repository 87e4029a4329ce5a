"""Tests for diffusion_pref.trajectories: forward noising, DDIM / ReNoise inversion, targets against closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_pref.losses import denoising_log_likelihood
from diffusion_pref.schedules import DDPMSchedule
from diffusion_pref.schedules import schedule_from_scheduler as S
from diffusion_pref.trajectories import (
    _auto_correlation,
    _patch_kl,
    _regularise,
    ddim_sample,
    forward_trajectory,
    inversion_grid,
    invert_grid,
    invert_latents,
    make_trajectory,
    released_smpo_steps,
    shared_noise_and_timesteps,
    trajectory_options,
)

B, SHAPE = 3, (4, 2, 2)
S1000 = DDPMSchedule(num_train_timesteps=1000)


def latents(seed):
    return torch.randn((B, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_noise_and_timesteps_shared_within_each_pair():
    noise, t = shared_noise_and_timesteps(latents(0), S1000, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (2 * B, *SHAPE) and t.shape == (2 * B,)
    torch.testing.assert_close(noise[:B], noise[B:], rtol=0, atol=0)
    assert torch.equal(t[:B], t[B:])
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    # different pairs get different noise (otherwise the "sharing" would be across the whole batch)
    assert not torch.equal(noise[0], noise[1])


def test_noise_is_reproducible_from_the_generator_and_follows_latent_dtype():
    a, ta = shared_noise_and_timesteps(latents(0), S1000, generator=torch.Generator().manual_seed(7))
    b, tb = shared_noise_and_timesteps(latents(0).bfloat16(), S1000, generator=torch.Generator().manual_seed(7))
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)
    assert torch.equal(ta, tb)


@pytest.mark.parametrize("kind", ["forward", "ddim"])
def test_processes_split_one_global_draw_like_the_loader_splits_pairs(kind):
    # 4 pairs on one process vs 2 processes with pairs 0::2 and 1::2 (the loader's split): every pair gets the
    # same t (and, for forward, the same noise) either way, so no two processes share their draws.
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0_w = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    x0_l = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    options = {} if kind == "forward" else {"predict_fn": lambda x, t, c: 0.1 * x, "steps": 5}

    def traj(rows, **dp):
        return make_trajectory(kind, S(scheduler), x0_w[rows], x0_l[rows], generator=torch.Generator().manual_seed(9),
                               **options, **dp)

    one = traj(slice(None))
    for rank in (0, 1):
        part = traj(slice(rank, None, 2), process_index=rank, num_processes=2)
        winners = list(range(rank, 4, 2))
        rows = winners + [4 + i for i in winners]  # [w; l] layout of this process's pairs
        assert torch.equal(part.t, one.t[rows])
        torch.testing.assert_close(part.x_t, one.x_t[rows])
        torch.testing.assert_close(part.target, one.target[rows])
    with pytest.raises(ValueError, match="process_index=2 is outside 0..1"):
        traj(slice(None), process_index=2, num_processes=2)


def _abar(scheduler, t):
    return scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1).double()


def test_forward_x_t_matches_closed_form_with_shared_noise_and_t():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0_w, x0_l = latents(0), latents(1)
    traj = forward_trajectory(S(scheduler), x0_w, x0_l, generator=torch.Generator().manual_seed(3))
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
    traj = forward_trajectory(S(scheduler), x0_w, x0_l, generator=torch.Generator().manual_seed(4))
    x0 = torch.cat([x0_w, x0_l]).double()
    abar = _abar(scheduler, traj.t)
    want = abar.sqrt() * traj.noise.double() - (1 - abar).sqrt() * x0
    torch.testing.assert_close(traj.target.double(), want, rtol=1e-5, atol=1e-5)


def test_identical_winner_and_loser_give_identical_log_likelihoods():
    # with shared noise and t, a pair of identical images must score identically under any model
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = latents(5)
    traj = forward_trajectory(S(scheduler), x0, x0.clone(), generator=torch.Generator().manual_seed(6))
    pred = traj.x_t * 0.3  # any deterministic per-sample "model"
    ll_w, ll_l = denoising_log_likelihood(pred, traj.target).chunk(2)
    torch.testing.assert_close(ll_w, ll_l, rtol=0, atol=0)


def test_unsupported_prediction_type_and_shape_mismatch_raise():
    x0 = latents(0)
    with pytest.raises(ValueError, match="epsilon, v_prediction"):
        S(DDPMScheduler(num_train_timesteps=10, prediction_type="sample"))
    with pytest.raises(ValueError, match="forward_trajectory: .*latents_l"):
        forward_trajectory(DDPMSchedule(num_train_timesteps=10), x0, x0[:1])
    with pytest.raises(ValueError, match="make_trajectory: .*latents_l"):
        make_trajectory("ddim", DDPMSchedule(num_train_timesteps=10), x0, x0[:1], predict_fn=lambda x, t, c: x)


# --------------------------------------------------------------------------------------------- inversion kinds
# Independent references: diffusers' DDIMInverseScheduler / DDIMScheduler steps, scheduler.add_noise, and
# closed-form inverses of a linear denoiser.


def sd_scheduler(**kw):
    # SD1.5's scheduler config: scaled_linear betas, leading spacing, steps_offset 1
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=False, **kw)


def test_inversion_grid_matches_the_smpo_sd15_and_sdxl_grids():
    assert inversion_grid(S(sd_scheduler()), 5) == [1, 201, 401, 601, 801]
    assert inversion_grid(S(sd_scheduler()), 10) == [1 + 100 * i for i in range(10)]
    with pytest.raises(ValueError, match="trajectory.steps"):
        inversion_grid(S(sd_scheduler()), 0)


def test_one_ddim_inversion_step_equals_diffusers_inverse_scheduler_step():
    from diffusers import DDIMInverseScheduler

    sched = sd_scheduler()
    inverse = DDIMInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(5)
    eps_fixed = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2))
    x0 = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3))

    def predict(x, t, c):  # a model that ignores its input
        return eps_fixed.expand_as(x)

    z201 = invert_latents(S(sched), predict, x0, None, [201])
    abar201 = sched.alphas_cumprod[201]
    # the first step leaves the clean latent (abar = 1), so its x0_hat is x0 itself
    torch.testing.assert_close(z201, abar201.sqrt() * x0 + (1 - abar201).sqrt() * eps_fixed, rtol=1e-5, atol=1e-5)
    z401 = invert_latents(S(sched), predict, x0, None, [201, 401])
    torch.testing.assert_close(z401, inverse.step(eps_fixed, 401, z201).prev_sample, rtol=1e-5, atol=1e-5)


def test_ddim_sample_step_equals_diffusers_ddim_scheduler_step():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(5)  # 801, 601, ..., 1; the last step goes to abar = 1, like our clean latent
    eps = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(4))
    z = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(5))
    ours = ddim_sample(S(sched), lambda x, t, c: eps.expand_as(x), z, None, [1, 201, 401, 601, 801])
    want = z
    for step_t in sched.timesteps:
        want = sched.step(eps, step_t, want).prev_sample
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_ddim_sample_on_a_zero_terminal_snr_v_prediction_schedule_equals_diffusers_and_is_finite():
    from diffusers import DDIMScheduler

    # the toy model's schedule: zero terminal SNR (abar_999 = 0), trailing spacing, v-prediction
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          prediction_type="v_prediction")
    assert float(sched.alphas_cumprod[999]) == 0.0
    sched.set_timesteps(5)  # 999, 799, ..., 199; the last step goes to abar = 1, like our clean latent
    grid = sorted(sched.timesteps.tolist())
    assert grid[-1] == 999
    z = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(5))

    def model(x, t):  # a v that depends on the input and the timestep
        return 0.5 * torch.tanh(x) - t / 2000.0

    ours = ddim_sample(S(sched), lambda x, t, c: model(x, t.float().reshape(-1, 1, 1, 1)), z, None, grid)
    want = z
    for step_t in sched.timesteps:
        want = sched.step(model(want, float(step_t)), step_t, want).prev_sample
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    # an epsilon model cannot give x0 where abar = 0: a clear error instead of NaN
    eps_sched = DDIMScheduler.from_config(sched.config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="abar is 0 at t=999"):
        ddim_sample(S(eps_sched), lambda x, t, c: x, z, None, grid)


def _constant_noise_predictor(noise):
    # a "perfect" denoiser for images that were noised with `noise`: DDIM inversion then reproduces add_noise
    return lambda x, t, c: noise


@pytest.mark.parametrize("t_mode", ["exact", "grid_below"])
def test_ddim_with_a_perfect_denoiser_reproduces_forward_noising_and_its_noise(t_mode):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, steps_offset=1)
    x0_w, x0_l = latents(0), latents(1)
    noise = torch.randn(2 * B, *SHAPE, generator=torch.Generator().manual_seed(9))
    calls = []

    def predict(x, t, c):  # c["ids"]: which samples of the [w; l] batch these rows are
        assert x.shape[0] == t.shape[0] == c["ids"].shape[0]
        calls.append((t.clone(), c["ids"].clone()))
        return noise[c["ids"]]

    gen = torch.Generator().manual_seed(11)
    cond = {"ids": torch.arange(2 * B), "unbatched": torch.zeros(3)}
    traj = make_trajectory("ddim", S(sched), x0_w, x0_l, predict_fn=predict, cond=cond, generator=gen, steps=5,
                           t_mode=t_mode)
    fwd = forward_trajectory(S(sched), x0_w, x0_l, generator=torch.Generator().manual_seed(11))
    assert torch.equal(traj.t, fwd.t) and torch.equal(traj.t[:B], traj.t[B:])  # t drawn exactly as for forward
    x0 = torch.cat([x0_w, x0_l])
    grid = [1, 201, 401, 601, 801]
    if t_mode == "exact":
        reached = traj.t
        torch.testing.assert_close(traj.noise, noise, rtol=1e-4, atol=1e-4)  # tau_t is the noise itself
        torch.testing.assert_close(traj.target, noise, rtol=1e-4, atol=1e-4)
    else:
        # the latent stops at the last grid point below t (x0 itself when none is), but is labelled t
        reached = torch.tensor([max([g for g in grid if g < ti] or [-1]) for ti in traj.t.tolist()])
    for i, r in enumerate(reached.tolist()):
        want = x0[i] if r < 0 else sched.add_noise(x0[i:i + 1], noise[i:i + 1], torch.tensor([r]))[0]
        torch.testing.assert_close(traj.x_t[i], want, rtol=1e-4, atol=1e-4)
    abar = _abar(sched, traj.t)
    tau = (traj.x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
    torch.testing.assert_close(traj.noise.double(), tau, rtol=1e-4, atol=1e-4)
    # each sample was run at each grid point below its t, in order (and at t itself last, in exact mode), and
    # only while it still needed a step
    for i, ti in enumerate(traj.t.tolist()):
        seen = [t[(ids == i).nonzero()].item() for t, ids in calls if bool((ids == i).any())]
        assert seen == [g for g in grid if g < ti] + ([ti] if t_mode == "exact" else [])


def test_released_smpo_steps_are_diffusers_020_inverse_scheduler_timesteps():
    # diffusers 0.20.0 DDIMInverseScheduler.set_timesteps: the leading/trailing grid, np.roll by one, first entry
    # int(grid[1] - step_ratio); step() maps s to s + T // n
    assert released_smpo_steps(S(sd_scheduler()), 5) == ([-199, 1, 201, 401, 601], [1, 201, 401, 601, 801],
                                                      pytest.approx(float(sd_scheduler().alphas_cumprod[0])))
    sources, targets, _ = released_smpo_steps(S(sd_scheduler()), 10)  # SmPO's SDXL setting
    assert sources == [-99] + [1 + 100 * i for i in range(9)] and targets == [1 + 100 * i for i in range(10)]
    # trailing, 3 steps: grid [332, 666, 999], ratio 333.33 -> int(-1.33) = -1; steps of 1000 // 3 = 333
    assert released_smpo_steps(S(sd_scheduler(timestep_spacing="trailing")), 3)[:2] == ([-1, 332, 666], [332, 665, 999])
    assert released_smpo_steps(S(DDPMScheduler()), 5)[2] == 1.0  # set_alpha_to_one defaults to true
    with pytest.raises(ValueError, match="timestep_spacing"):
        released_smpo_steps(S(sd_scheduler(timestep_spacing="linspace")), 5)


def _smpo_diffusers020(abar, initial, predict, x0, t, prediction_type, n=5, total=1000, offset=1):
    """Hand computation of the released SmPO inversion loop on diffusers 0.20.0 (float64, one sample): the
    timesteps of DDIMInverseScheduler.set_timesteps (leading), then for each s < t one ReNoise iteration,
    both noise predictions made at s and averaged, each DDIMInverseScheduler.step(out, s, z) of 0.20.0."""
    ratio = total // n
    grid = [i * ratio + offset for i in range(n)]
    timesteps = [grid[0] - ratio] + grid[:-1]

    def step(out, s, z):
        a_s = abar[s] if s >= 0 else initial
        a_p = abar[s + ratio]
        if prediction_type == "epsilon":
            x0_hat, eps = (z - (1 - a_s) ** 0.5 * out) / a_s ** 0.5, out
        else:
            x0_hat, eps = a_s ** 0.5 * z - (1 - a_s) ** 0.5 * out, a_s ** 0.5 * out + (1 - a_s) ** 0.5 * z
        return a_p ** 0.5 * x0_hat + (1 - a_p) ** 0.5 * eps

    z = x0
    for s in [ts for ts in timesteps if ts < t]:
        e1 = predict(z, s)
        e2 = predict(step(e1, s, z), s)
        z = step((e1 + e2) / 2, s, z)
    return z


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_smpo_released_reproduces_the_pinned_diffusers_020_loop(prediction_type):
    sched = sd_scheduler(prediction_type=prediction_type)
    abar = sched.alphas_cumprod.double()
    initial = float(abar[0])  # set_alpha_to_one=False, as in SD's config

    def model(x, s):  # nonlinear in x and strongly dependent on the timestep it is told (also negative ones)
        return 0.3 * torch.tanh(x) + (s + 250.0) / 1000.0 * x

    calls = []

    def predict(x, t, c):
        calls.append(t.clone())
        return model(x.double(), t.double().reshape(-1, 1, 1, 1)).float()

    pairs = 16
    x0_w, x0_l = torch.randn(2, pairs, *SHAPE, generator=torch.Generator().manual_seed(5))
    for seed in range(2):
        traj = make_trajectory("renoise", S(sched), x0_w, x0_l, predict_fn=predict, cond=None, steps=5,
                               t_mode="smpo_released", renoise_iters=1, average_window=[0, 2],
                               generator=torch.Generator().manual_seed(seed))
        x0 = torch.cat([x0_w, x0_l]).double()
        for i, ti in enumerate(traj.t.tolist()):
            want = _smpo_diffusers020(abar, initial, lambda z, s: model(z, float(s)), x0[i], ti, prediction_type)
            torch.testing.assert_close(traj.x_t[i].double(), want, rtol=1e-5, atol=1e-5)
            # the target: tau at the sampled t (not at the grid point the latent sits at)
            tau = (want - abar[ti].sqrt() * x0[i]) / (1 - abar[ti]).sqrt()
            torch.testing.assert_close(traj.noise[i].double(), tau, rtol=1e-4, atol=1e-4)
    assert min(int(c.min()) for c in calls) == -199  # the first step is told its source, -199


def test_smpo_released_latent_sits_at_the_grid_point_at_or_above_t():
    # a perfect denoiser of forward noise `noise` with x0 at abar = 1: exact DDIM inversion gives add_noise at
    # the grid point reached; with set_alpha_to_one=True the first source is the clean latent itself
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, steps_offset=1)
    x0_w, x0_l = torch.randn(2, 24, *SHAPE, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(48, *SHAPE, generator=torch.Generator().manual_seed(3))
    traj = make_trajectory("ddim", S(sched), x0_w, x0_l, predict_fn=lambda x, t, c: noise[c], cond=torch.arange(48),
                           steps=5, t_mode="smpo_released", generator=torch.Generator().manual_seed(4))
    x0 = torch.cat([x0_w, x0_l])
    assert bool((traj.t > 801).any()) and bool((traj.t <= 201).any())
    for i, ti in enumerate(traj.t.tolist()):
        reached = min([g for g in [1, 201, 401, 601, 801] if g >= ti] or [801])
        want = sched.add_noise(x0[i:i + 1], noise[i:i + 1], torch.tensor([reached]))[0]
        torch.testing.assert_close(traj.x_t[i], want, rtol=1e-4, atol=1e-4)


def test_inversion_v_prediction_target_is_the_velocity_of_tau():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0_w, x0_l = latents(0), latents(1)
    noise = torch.randn(2 * B, *SHAPE, generator=torch.Generator().manual_seed(9))

    def predict_v(x, t, c):  # the v that corresponds to eps = noise for this input at this t
        abar, eps = _abar(sched, t).float(), noise[c]
        return (abar.sqrt() * eps - (1 - abar).sqrt() * ((x - (1 - abar).sqrt() * eps) / abar.sqrt()))

    traj = make_trajectory("ddim", S(sched), x0_w, x0_l, predict_fn=predict_v, cond=torch.arange(2 * B), steps=5,
                           generator=torch.Generator().manual_seed(1))
    x0 = torch.cat([x0_w, x0_l]).double()
    abar = _abar(sched, traj.t)
    torch.testing.assert_close(traj.noise, noise, rtol=1e-3, atol=1e-3)
    want = abar.sqrt() * traj.noise.double() - (1 - abar).sqrt() * x0
    torch.testing.assert_close(traj.target.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_renoise_fixed_point_converges_to_the_exact_inverse_of_a_linear_denoiser(prediction_type):
    # eps(z, t) = c_t * z. The exact inverse step s -> g solves z_g = A z_s + Bc z_g (the DDIM sampling step from
    # z_g lands on z_s), so z_g = A z_s / (1 - B c); the renoise iteration is the fixed-point map of that equation.
    sched = sd_scheduler(prediction_type=prediction_type)
    grid = [1, 101, 201, 301]
    c = {1: 0.3, 101: -0.4, 201: 0.5, 301: 0.2}

    def eps_of(z, t):
        return torch.tensor([c[int(ti)] for ti in t]).reshape(-1, 1, 1, 1) * z

    def predict(x, t, cond):
        eps = eps_of(x, t)
        if prediction_type == "epsilon":
            return eps
        abar = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (eps - (1 - abar).sqrt() * x) / abar.sqrt()  # the v whose noise estimate is eps

    x0 = latents(3).double().float()
    want = x0.double()
    abar_s = torch.tensor(1.0, dtype=torch.float64)
    for g in grid:
        abar_g = sched.alphas_cumprod[g].double()
        a = abar_g.sqrt() / abar_s.sqrt()
        b = (1 - abar_g).sqrt() - abar_g.sqrt() * (1 - abar_s).sqrt() / abar_s.sqrt()
        want = a * want / (1 - b * c[g])
        abar_s = abar_g
    exact = invert_latents(S(sched), predict, x0, None, grid, renoise_iters=30, average_window=[30, 31])
    torch.testing.assert_close(exact.double(), want, rtol=1e-5, atol=1e-5)
    plain = invert_latents(S(sched), predict, x0, None, grid, renoise_iters=0)
    assert float((plain.double() - want).abs().max()) > 1e-2  # plain DDIM inversion is only approximate
    # and DDIM sampling from the exact inverse lands back on x0
    torch.testing.assert_close(ddim_sample(S(sched), predict, exact, None, grid), x0, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_sd():
    from diffusion_pref.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    ids = pipe.tokenizer(["a red cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]

    def predict(x, t, cond):
        return pipe.unet(x, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1)).sample

    return pipe, predict, hidden


# A partial inversion (to t = 151 on a 20-step grid): a random-weight UNet is a poor denoiser, so inverting to
# t ~ 1000, where x0_hat divides by sqrt(abar) ~ 0.07, amplifies its errors; on this range the errors measured
# (latent RMSE, x0 ~ N(0, 1), seeds 0-2): DDIM 0.008-0.013, ReNoise K=1 averaged (SmPO) about half of that,
# ReNoise K=4 2e-7 to 6e-7.
TINY_GRID = [1, 51, 101, 151]
DDIM_TOLERANCE = 0.03


def _rmse(a, b):
    return float(((a.float() - b.float()) ** 2).mean().sqrt())


def test_ddim_inversion_then_sampling_reconstructs_x0_on_a_tiny_sd(tiny_sd):
    pipe, predict, hidden = tiny_sd
    assert inversion_grid(S(pipe.scheduler), 20)[:4] == TINY_GRID
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = invert_latents(S(pipe.scheduler), predict, x0, hidden, TINY_GRID)
    assert _rmse(z, x0) > 0.1  # it did move away from x0
    ddim_error = _rmse(ddim_sample(S(pipe.scheduler), predict, z, hidden, TINY_GRID), x0)
    assert ddim_error < DDIM_TOLERANCE
    # ReNoise at the same number of inversion steps: the SmPO setting (K = 1, both predictions averaged) and
    # a converged one (K = 4, last prediction) both reconstruct better than plain DDIM inversion
    errors = {}
    for iters, window in ((1, [0, 2]), (4, [4, 5])):
        z_re = invert_latents(S(pipe.scheduler), predict, x0, hidden, TINY_GRID, renoise_iters=iters,
                              average_window=window)
        errors[iters] = _rmse(ddim_sample(S(pipe.scheduler), predict, z_re, hidden, TINY_GRID), x0)
    assert errors[1] < 0.6 * ddim_error
    assert errors[4] < 1e-3 * ddim_error


def test_renoise_trajectory_on_tiny_sd_has_pair_layout_and_consistent_target(tiny_sd):
    pipe, predict, hidden = tiny_sd
    from diffusers import DDPMScheduler as Ddpm

    sched = Ddpm.from_config(pipe.scheduler.config)
    x0_w, x0_l = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    traj = make_trajectory("renoise", S(sched), x0_w, x0_l, predict_fn=predict, cond=hidden, steps=5,
                           generator=torch.Generator().manual_seed(0))
    assert traj.x_t.shape == (2, 4, 8, 8) and torch.equal(traj.t[:1], traj.t[1:])
    assert not torch.equal(traj.noise[0], traj.noise[1])  # tau depends on the image, unlike forward noise
    abar = _abar(sched, traj.t).float()
    torch.testing.assert_close(traj.x_t, abar.sqrt() * torch.cat([x0_w, x0_l]) + (1 - abar).sqrt() * traj.noise,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traj.target, traj.noise)


@pytest.mark.parametrize("kind", ["ddim", "renoise"])
@pytest.mark.parametrize("t_mode", ["exact", "grid_below", "smpo_released"])
def test_pre_inverted_grid_gives_the_trajectory_of_inverting_on_the_fly(tiny_sd, kind, t_mode):
    """invert_grid + make_trajectory(inverted=...) is what the data cache runs: with the same model it must give
    the x_t, t and target of inverting in the step, for every t (many pairs: t on both sides of grid points)."""
    pipe, predict, hidden = tiny_sd
    from diffusers import DDPMScheduler as Ddpm

    sched = Ddpm.from_config(pipe.scheduler.config)
    pairs = 12
    x0_w, x0_l = torch.randn(2, pairs, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    options = {"steps": 5, "renoise_iters": 1, "average_window": [0, 2]}
    grid_latents = invert_grid(kind, S(sched), predict, torch.cat([x0_w, x0_l]), hidden, t_mode=t_mode, **options)
    assert grid_latents.shape == (2 * pairs, 5, 4, 8, 8) and grid_latents.dtype == torch.float32
    if t_mode != "smpo_released":  # the last grid point is plain inversion along the whole grid
        torch.testing.assert_close(grid_latents[:, -1], invert_latents(
            S(sched), predict, torch.cat([x0_w, x0_l]), hidden, inversion_grid(S(sched), 5),
            renoise_iters=0 if kind == "ddim" else 1, average_window=[0, 2]), rtol=1e-4, atol=1e-5)
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return predict(x, t, c)

    for seed in range(3):
        on_the_fly = make_trajectory(kind, S(sched), x0_w, x0_l, predict_fn=predict, cond=hidden, t_mode=t_mode,
                                     generator=torch.Generator().manual_seed(seed), **options)
        calls.clear()
        cached = make_trajectory(kind, S(sched), x0_w, x0_l, predict_fn=counting, cond=hidden, t_mode=t_mode,
                                 generator=torch.Generator().manual_seed(seed), inverted=grid_latents, **options)
        assert torch.equal(cached.t, on_the_fly.t)
        torch.testing.assert_close(cached.x_t, on_the_fly.x_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached.target, on_the_fly.target, rtol=1e-3, atol=1e-4)
        per_step = 1 if kind == "ddim" else 2  # model calls of one inversion step
        assert len(calls) == (per_step if t_mode == "exact" else 0)  # one step to t at most, on the whole batch


def test_pre_inverted_grid_of_the_wrong_size_is_refused(tiny_sd):
    pipe, predict, hidden = tiny_sd
    x0 = torch.randn(2, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="5-point grid"):
        make_trajectory("ddim", S(pipe.scheduler), x0[0], x0[1], predict_fn=predict, cond=hidden, steps=5,
                        inverted=torch.zeros(2, 4, 4, 8, 8))


def test_noise_regularisation_lowers_both_terms():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(2, 4, 16, 16, generator=gen).cumsum(-1) / 4  # strongly auto-correlated "noise"
    ref = torch.randn(2, 4, 16, 16, generator=gen)
    reg = {"steps": 4, "lambda_kl": 0.065, "lambda_ac": 20.0, "ac_rolls": 5}
    out = _regularise(smooth, ref, reg, torch.Generator().manual_seed(1))
    assert out.shape == smooth.shape and not out.requires_grad
    assert float(_patch_kl(out, ref)) < float(_patch_kl(smooth, ref))
    ac_before = _auto_correlation(smooth, torch.Generator().manual_seed(2))
    ac_after = _auto_correlation(out, torch.Generator().manual_seed(2))
    assert float(ac_after) < float(ac_before)


def _renoise_regularisation_reference(e, ref, lambda_kl, lambda_ac, steps, rolls, gen):
    """ReNoise's noise regularisation of one sample [1, C, H, W], written out from its description with plain
    loops: per outer step one KL step (gradient clipped to +-100), then `rolls` auto-correlation steps; the KL per
    channel and 4x4 patch with 1e-6 added to both variances; the auto-correlation per channel over a pyramid
    (avg-pool by 2 until H <= 8), one random shift in [0, H // 2) per channel and level."""
    import math

    import torch.nn.functional as F

    def kl(x, y):
        total = x.new_zeros(())
        for c in range(x.shape[1]):
            for i in range(0, x.shape[2], 4):
                for j in range(0, x.shape[3], 4):
                    a, b = x[0, c, i:i + 4, j:j + 4].reshape(-1), y[0, c, i:i + 4, j:j + 4].reshape(-1)
                    v0, v1 = a.var() + 1e-6, b.var() + 1e-6
                    total = total + (torch.log(v1 / v0) + (v0 + (a.mean() - b.mean()) ** 2) / v1 - 1).abs()
        return total

    def auto_corr(x):
        total = x.new_zeros(())
        for c in range(x.shape[1]):
            noise = x[:, c:c + 1]
            while True:
                shift = torch.randint(0, noise.shape[2] // 2, (1,), generator=gen).item()
                total = total + (noise * torch.roll(noise, shifts=shift, dims=2)).mean() ** 2
                total = total + (noise * torch.roll(noise, shifts=shift, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = F.avg_pool2d(noise, kernel_size=2)
        return total

    assert math.isfinite(lambda_kl)
    for _ in range(steps):
        var = e.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(kl(var, ref), var)
        e = e - lambda_kl * grad.clamp(-100, 100)
        for _ in range(rolls):
            var = e.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(auto_corr(var), var)
            e = e - lambda_ac * grad / rolls
    return e.detach()


def test_noise_regularisation_matches_renoise_written_out():
    gen = torch.Generator().manual_seed(0)
    eps = (torch.randn(1, 4, 32, 32, generator=gen).cumsum(-1) / 4).double()  # auto-correlated, 3 pyramid levels
    ref = torch.randn(1, 4, 32, 32, generator=gen).double()
    ref[0, 1, :4, :4] = 0.5  # a constant patch: variance 0, finite only with ReNoise's 1e-6
    reg = {"steps": 2, "lambda_kl": 0.065, "lambda_ac": 20.0, "ac_rolls": 3}
    ours = _regularise(eps, ref, reg, torch.Generator().manual_seed(7))
    want = _renoise_regularisation_reference(eps, ref, 0.065, 20.0, 2, 3, torch.Generator().manual_seed(7))
    assert torch.isfinite(ours).all() and float((ours - eps).abs().max()) > 1e-3  # it did move
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)


def test_renoise_kl_reference_noise_is_drawn_once_per_inversion():
    sched = sd_scheduler()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    calls = []

    def predict(x, t, c):
        calls.append((x.clone(), t.clone()))
        return 0.5 * x

    invert_latents(S(sched), predict, x0, None, [1, 201, 401], renoise_iters=1, noise_reg_steps=1,
                   generator=torch.Generator().manual_seed(0))
    assert len(calls) == 9  # per step: the KL reference, then the two renoise predictions
    noises = []
    for x_fwd, t in calls[::3]:  # x_fwd = sqrt(abar_g) x0 + sqrt(1 - abar_g) noise
        abar = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noises.append((x_fwd - abar.sqrt() * x0) / (1 - abar).sqrt())
    torch.testing.assert_close(noises[1], noises[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noises[2], noises[0], rtol=1e-4, atol=1e-4)


def test_renoise_with_regularisation_runs_through_make_trajectory():
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = make_trajectory("renoise", S(sched), x[0], x[1], predict_fn=lambda z, t, c: 0.5 * z, steps=5,
                           noise_reg_steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.x_t).all() and torch.isfinite(traj.target).all()


def test_trajectory_options_from_config_and_bad_options_raise():
    from diffusion_pref.config import load_config

    cfg = load_config(None, ["trajectory.kind=renoise", "trajectory.renoise_iters=3",
                             "trajectory.average_window=[2,4]", "trajectory.t_mode=grid_below"])
    opts = trajectory_options(cfg.trajectory)
    assert opts["renoise_iters"] == 3 and opts["average_window"] == [2, 4] and opts["t_mode"] == "grid_below"
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = latents(0)
    with pytest.raises(ValueError, match="predict_fn"):
        make_trajectory("ddim", S(sched), x, x)
    with pytest.raises(ValueError, match="average_window"):
        make_trajectory("renoise", S(sched), x, x, predict_fn=lambda z, t, c: z, average_window=[3, 1])
    with pytest.raises(ValueError, match="one of"):
        make_trajectory("backward", S(sched), x, x)
    # forward through the single entry point is forward_trajectory itself
    a = make_trajectory("forward", S(sched), x, latents(1), generator=torch.Generator().manual_seed(0))
    b = forward_trajectory(S(sched), x, latents(1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t)

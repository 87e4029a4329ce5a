"""Noise schedules behind one interface: DDPM-type models (epsilon and v-prediction) and rectified flow.

Timesteps outside this module are integer indices ``t`` in ``[0, N)`` (``N = num_train_timesteps``), larger =
noisier, for both families. A schedule knows the noise level of each index, ``x_t = a_t x0 + b_t eps``, the
regression target, what the denoiser is told (:meth:`Schedule.model_timestep`), how to read a model output as
(x0, eps) estimates, the deterministic step between levels (DDIM for DDPM, Euler for flow) and how training draws
its timesteps.

- :class:`DDPMSchedule`: ``a = sqrt(abar_t)``, ``b = sqrt(1 - abar_t)`` with ``abar`` the ``alphas_cumprod`` diffusers'
  ``DDPMScheduler`` builds from the checkpoint's scheduler config; target ``eps`` or ``v = a eps - b x0``; the model
  is told ``t``; t ~ U{0..N-1} drawn with ``torch.randint`` (the random stream the trainer has always used).
- :class:`FlowMatchSchedule`: ``sigma_i`` for index i: ``s = (i + 1) / N``, ``sigma = shift s / (1 + (shift - 1) s)``
  (``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting=False``), ``x_t = (1 - sigma) x0 + sigma eps``,
  target the velocity ``eps - x0``, the model is told ``sigma * N`` (SD3's transformer timestep). Training draws
  ``u`` from SD3's logit-normal (default mean 0, std 1; or ``uniform``, or SD3's ``mode`` density) and takes index
  ``floor(u N)``; the shift applies on top, as in diffusers' SD3 training script.

Example::

    from diffusion_pref.schedules import schedule_from_scheduler
    schedule = schedule_from_scheduler(pipe.scheduler)            # or its .config
    t = schedule.sample_timesteps(4, torch.Generator().manual_seed(0), "cpu")
    x_t = schedule.add_noise(x0, noise, t)
    loss = ((model(x_t, schedule.model_timestep(t)) - schedule.target(x0, noise, t)) ** 2).mean()
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Tuple

if TYPE_CHECKING:
    import torch

__all__ = ["DDPMSchedule", "FlowMatchSchedule", "Schedule", "schedule_from_scheduler"]

DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")


def _broadcast(c: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
    """``c`` of shape ``[N]`` (or a scalar) viewed as ``[N, 1, ..., 1]`` against ``like``."""
    c = c.flatten() if c.ndim else c
    return c.reshape(-1, *([1] * (like.ndim - 1))) if c.ndim else c


class Schedule:
    """The noise arithmetic of one model family; see the module docstring.

    Index-level API (``t``: LongTensor of indices): :meth:`coefficients`, :meth:`add_noise`, :meth:`target`,
    :meth:`model_timestep`, :meth:`split`, :meth:`invert_step`, :meth:`sample_timesteps`, :meth:`inversion_grid`.
    Coefficient-level primitives (``src`` / ``dst`` = ``(a, b)`` broadcastable tensors, so a caller can also
    use the clean end or other levels that are not an index): :meth:`split_at`, :meth:`step_at`, :meth:`held`,
    :meth:`move_held`.
    """

    num_train_timesteps: int
    prediction_type: str
    clean: Tuple[float, float]

    # -- subclasses implement -----------------------------------------------------------------------------
    def coefficients(self, t: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]:
        """``(a, b)`` float32, shaped like ``t``, on ``t.device``: ``x_t = a x0 + b eps``."""
        raise NotImplementedError

    def _coefficients_like(self, t: "torch.Tensor", x: "torch.Tensor"):
        """``(a, b)`` in ``x``'s dtype and device, broadcast against ``x`` (the arithmetic of diffusers' add_noise)."""
        raise NotImplementedError

    def target(self, x0: "torch.Tensor", noise: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError

    def model_timestep(self, t: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError

    def split_at(self, output, x, a, b):
        """``(x0_hat, eps_hat)`` from a model output made at ``x`` whose level is ``(a, b)``."""
        raise NotImplementedError

    def held(self, output, x, a, b):
        """The quantity the deterministic step keeps fixed, from an output made at ``x`` (level ``(a, b)``): the
        noise estimate for DDPM (DDIM), the velocity for flow (Euler)."""
        raise NotImplementedError

    def move_held(self, x, h, src, dst):
        """Move ``x`` from level ``src`` to ``dst`` keeping the :meth:`held` quantity ``h`` fixed (DDIM / Euler);
        with ``h`` read at ``x`` itself this is :meth:`step_at`."""
        raise NotImplementedError

    def sample_timesteps(self, n: int, generator=None, device=None) -> "torch.Tensor":
        raise NotImplementedError

    def inversion_grid(self, steps: int) -> list:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------
    def add_noise(self, x0: "torch.Tensor", noise: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """``x_t = a_t x0 + b_t noise`` in ``x0``'s dtype."""
        a, b = self._coefficients_like(t, x0)
        return a * x0 + b * noise

    def step_at(self, x, output, src, dst):
        """``a_dst x0_hat + b_dst eps_hat`` with ``(x0_hat, eps_hat) = split_at(output, x, *src)``."""
        x0_hat, eps_hat = self.split_at(output, x, *src)
        return dst[0] * x0_hat + dst[1] * eps_hat

    def _levels(self, t: "torch.Tensor", like: "torch.Tensor"):
        a, b = self.coefficients(t.to(like.device))
        return _broadcast(a, like), _broadcast(b, like)

    def split(self, output: "torch.Tensor", x_t: "torch.Tensor", t: "torch.Tensor"):
        """``(x0_hat, eps_hat)`` from a model output at ``x_t``, index ``t`` (float32 coefficients)."""
        return self.split_at(output, x_t, *self._levels(t, x_t))

    def invert_step(self, x: "torch.Tensor", output: "torch.Tensor", t_from: "torch.Tensor",
                    t_to: "torch.Tensor") -> "torch.Tensor":
        """``a_to x0_hat + b_to eps_hat`` from an output made at ``(x, t_from)``: a DDIM step for DDPM, an Euler step
        for flow, towards the clean end (sampling) or the noisy end (plain inversion)."""
        return self.step_at(x, output, self._levels(t_from, x), self._levels(t_to, x))

    def _check_steps(self, steps) -> int:
        total = int(self.num_train_timesteps)
        if not 1 <= int(steps) <= total:
            raise ValueError(f"trajectory.steps={steps} must be between 1 and the scheduler's {total} training "
                             "timesteps.")
        return int(steps)


class DDPMSchedule(Schedule):
    """DDPM-type (variance-preserving) schedule from a diffusers scheduler config (DDPM, DDIM, Euler, ... share
    the betas keys): ``DDPMSchedule(pipe.scheduler.config)`` or ``DDPMSchedule(num_train_timesteps=1000,
    prediction_type="v_prediction")``; keyword arguments override the config.

    ``config``: diffusers' ``DDPMScheduler`` config built from it (unknown keys such as ``set_alpha_to_one`` are
    kept): the inversion grid and SmPO's released arithmetic read its spacing keys.
    ``clean``: the level of the clean end in diffusers' DDIM inversion, ``sqrt(initial_alpha_cumprod)`` (1 with
    ``set_alpha_to_one``, else abar_0; SD's configs: 0.99915).
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None, **overrides):
        import torch
        from diffusers import DDIMInverseScheduler, DDPMScheduler

        merged = dict(config or {})
        merged.update(overrides)
        if "_use_default_values" in merged:  # diffusers rebuilds the keys listed there with the class's defaults
            merged["_use_default_values"] = [k for k in merged["_use_default_values"] if k not in overrides]
        prediction_type = merged.get("prediction_type", "epsilon")
        if prediction_type not in DDPM_PREDICTION_TYPES:
            raise ValueError(f"Unsupported scheduler prediction_type {prediction_type!r}; supported: "
                             f"{', '.join(DDPM_PREDICTION_TYPES)}. Load a scheduler config with one of these "
                             "prediction types.")
        scheduler = DDPMScheduler.from_config(merged)
        self.config = scheduler.config
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # [N] on the host
        # the clean end of diffusers' DDIM inversion: 1 with set_alpha_to_one, else abar_0
        self.initial_alpha_cumprod = float(DDIMInverseScheduler.from_config(self.config).initial_alpha_cumprod)
        initial = torch.tensor(self.initial_alpha_cumprod, dtype=torch.float32)
        self.clean = (float(initial.sqrt()), float((1 - initial).sqrt()))
        self._tables: dict = {}

    def __repr__(self) -> str:
        return f"DDPMSchedule(num_train_timesteps={self.num_train_timesteps}, prediction_type={self.prediction_type!r})"

    def _table(self, device, dtype=None) -> "torch.Tensor":
        import torch

        key = (str(device), dtype or torch.float32)
        if key not in self._tables:  # one copy per device and dtype, reused by every call
            self._tables[key] = self.alphas_cumprod.to(device=device, dtype=key[1])
        return self._tables[key]

    def coefficients(self, t):
        abar = self._table(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def _coefficients_like(self, t, x):
        # diffusers' DDPMScheduler.add_noise / get_velocity: abar in the sample's dtype, then ** 0.5
        abar = self._table(x.device, x.dtype)[t.to(x.device)]
        return _broadcast(abar ** 0.5, x), _broadcast((1 - abar) ** 0.5, x)

    def target(self, x0, noise, t):
        """The noise (``epsilon``) or ``v = a noise - b x0`` (diffusers' ``get_velocity``)."""
        if self.prediction_type == "epsilon":
            return noise
        a, b = self._coefficients_like(t, x0)
        return a * noise - b * x0

    def model_timestep(self, t):
        return t

    def split_at(self, output, x, a, b):
        if self.prediction_type == "epsilon":
            return (x - b * output) / a, output
        return a * x - b * output, a * output + b * x  # v: no division, fine at zero terminal SNR (a = 0)

    def held(self, output, x, a, b):
        if self.prediction_type == "epsilon":
            return output
        return a * output + b * x

    def move_held(self, x, h, src, dst):
        x0_hat = (x - src[1] * h) / src[0]
        return dst[0] * x0_hat + dst[1] * h

    def step_at(self, x, output, src, dst):
        if self.prediction_type == "epsilon":
            return self.move_held(x, output, src, dst)
        return super().step_at(x, output, src, dst)

    def sample_timesteps(self, n, generator=None, device=None):
        """t ~ U{0..N-1}: ``torch.randint`` on ``device`` (the generator's device when None)."""
        import torch

        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randint(0, self.num_train_timesteps, (int(n),), generator=generator, device=device)

    def inversion_grid(self, steps):
        """Ascending indices of ``DDIMInverseScheduler.set_timesteps(steps)`` on this config (diffusers' own
        spacing: SD1.5, 5 steps: [1, 201, 401, 601, 801])."""
        from diffusers import DDIMInverseScheduler

        steps = self._check_steps(steps)
        inverse = DDIMInverseScheduler.from_config(self.config)
        inverse.set_timesteps(steps)
        total = self.num_train_timesteps
        return sorted({min(max(int(g), 0), total - 1) for g in inverse.timesteps.tolist()})


class FlowMatchSchedule(Schedule):
    """Rectified flow (SD3): ``x_t = (1 - sigma_t) x0 + sigma_t eps``, target ``eps - x0``, see the module docstring.

    Training timesteps (:meth:`sample_timesteps`), SD3 paper section 3.1 (Esser et al., arXiv 2403.03206), with
    ``u`` the unshifted noise fraction (index ``floor(u N)``; larger = noisier, the paper's convention):

    - ``logit_normal``: ``u = sigmoid(logit_mean + logit_std * n)``, n ~ N(0, 1) (SD3: mean 0, std 1).
    - ``mode``: ``u = f(v) = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v)``, v ~ U(0, 1) (``mode_scale`` in
      [-1, 2 / (pi - 2)], where f is monotone; SD3's script default 1.29).
    - ``uniform``: index ~ U{0..N-1}.

    (diffusers' SD3 script indexes its descending timestep table with ``u``, so there a positive ``logit_mean``
    favours cleaner levels; here, as in the paper, noisier ones. With mean 0 the two agree in distribution.)
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, *, timestep_sampling: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        import torch

        if int(num_train_timesteps) < 1:
            raise ValueError(f"FlowMatchSchedule: num_train_timesteps must be >= 1, got {num_train_timesteps}.")
        if not float(shift) > 0:
            raise ValueError(f"FlowMatchSchedule: shift must be > 0, got {shift}.")
        if timestep_sampling not in FLOW_TIMESTEP_SAMPLING:
            raise ValueError(f"FlowMatchSchedule: timestep_sampling={timestep_sampling!r} is not one of "
                             f"{', '.join(FLOW_TIMESTEP_SAMPLING)}.")
        if not (math.isfinite(float(logit_std)) and float(logit_std) > 0 and math.isfinite(float(logit_mean))):
            raise ValueError(f"FlowMatchSchedule: logit_std must be > 0 and logit_mean finite, got "
                             f"logit_mean={logit_mean}, logit_std={logit_std}.")
        if not -1.0 <= float(mode_scale) <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"FlowMatchSchedule: mode_scale={mode_scale} must be in [-1, {2 / (math.pi - 2):.4f}] "
                             "(where SD3's mode density is monotone).")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.prediction_type = "flow"
        self.clean = (1.0, 0.0)
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        n = self.num_train_timesteps
        s = torch.arange(1, n + 1, dtype=torch.float32) / n  # FlowMatchEulerDiscreteScheduler's sigmas, ascending
        self.sigmas = self.shift * s / (1 + (self.shift - 1) * s)  # [N] on the host
        self._tables: dict = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **sampling) -> "FlowMatchSchedule":
        """From a ``FlowMatchEulerDiscreteScheduler`` config (its ``num_train_timesteps`` and ``shift``)."""
        if config.get("use_dynamic_shifting", False):
            raise ValueError("schedule_from_scheduler: the scheduler config has use_dynamic_shifting=true (a shift "
                             "that depends on the image size, as for Flux), which is not supported yet; use a config "
                             "with a fixed shift.")
        return cls(int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0)), **sampling)

    def __repr__(self) -> str:
        return (f"FlowMatchSchedule(num_train_timesteps={self.num_train_timesteps}, shift={self.shift}, "
                f"timestep_sampling={self.timestep_sampling!r})")

    def _table(self, device, dtype=None) -> "torch.Tensor":
        import torch

        key = (str(device), dtype or torch.float32)
        if key not in self._tables:
            self._tables[key] = self.sigmas.to(device=device, dtype=key[1])
        return self._tables[key]

    def coefficients(self, t):
        sigma = self._table(t.device)[t]
        return 1 - sigma, sigma

    def _coefficients_like(self, t, x):
        # diffusers' FlowMatchEulerDiscreteScheduler.scale_noise: sigma in the sample's dtype
        sigma = _broadcast(self._table(x.device, x.dtype)[t.to(x.device)], x)
        return 1.0 - sigma, sigma

    def target(self, x0, noise, t):
        """The velocity ``noise - x0``."""
        return noise - x0

    def model_timestep(self, t):
        """``sigma_t * N`` as float32 (``FlowMatchEulerDiscreteScheduler.timesteps``, what SD3's transformer gets)."""
        return self._table(t.device)[t] * self.num_train_timesteps

    def split_at(self, output, x, a, b):
        # x = a x0 + b eps with a + b = 1 and output = eps - x0
        return x - b * output, x + a * output

    def held(self, output, x, a, b):
        return output

    def move_held(self, x, h, src, dst):
        return x + (dst[1] - src[1]) * h  # Euler; equal to a_dst x0_hat + b_dst eps_hat

    def step_at(self, x, output, src, dst):
        return self.move_held(x, output, src, dst)

    def sample_timesteps(self, n, generator=None, device=None):
        import torch

        device = device if device is not None else (generator.device if generator is not None else "cpu")
        n, total = int(n), self.num_train_timesteps
        if self.timestep_sampling == "uniform":
            return torch.randint(0, total, (n,), generator=generator, device=device)
        if self.timestep_sampling == "logit_normal":
            normal = torch.randn((n,), generator=generator, device=device, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        else:
            v = torch.rand((n,), generator=generator, device=device, dtype=torch.float64)
            u = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        return (u * total).floor().long().clamp(0, total - 1)

    def inversion_grid(self, steps):
        """``steps`` indices evenly spaced in the unshifted noise fraction, ending at pure noise:
        ``round((k + 1) N / steps) - 1`` (N = 1000, 5 steps: [199, 399, 599, 799, 999])."""
        steps = self._check_steps(steps)
        total = self.num_train_timesteps
        return sorted({int(round((k + 1) * total / steps)) - 1 for k in range(steps)})


def _class_name(scheduler_or_config) -> Optional[str]:
    if hasattr(scheduler_or_config, "config") and not isinstance(scheduler_or_config, Mapping):
        return type(scheduler_or_config).__name__
    return dict(scheduler_or_config).get("_class_name")


def schedule_from_scheduler(scheduler_or_config, **sampling) -> Schedule:
    """A diffusers scheduler (or its config) -> its training :class:`Schedule`.

    ``FlowMatch*`` schedulers -> :class:`FlowMatchSchedule` (their ``shift``; ``sampling``: its timestep-sampling
    keyword arguments); every other (DDPM, DDIM, Euler, PNDM, ... : betas + prediction_type) -> :class:`DDPMSchedule`.
    A bare config without ``_class_name`` counts as flow when it has ``shift`` and no ``beta_schedule``.
    """
    config = scheduler_or_config.config if (hasattr(scheduler_or_config, "config")
                                             and not isinstance(scheduler_or_config, Mapping)) else scheduler_or_config
    config = dict(config)
    name = _class_name(scheduler_or_config)
    flow = name.startswith("FlowMatch") if name else ("shift" in config and "beta_schedule" not in config)
    if flow:
        return FlowMatchSchedule.from_config(config, **sampling)
    if sampling:
        raise ValueError(f"schedule_from_scheduler: {', '.join(sorted(sampling))} only apply to flow-matching "
                         f"schedules; {name or 'this config'} is DDPM-type (timesteps are drawn uniformly).")
    return DDPMSchedule(config)

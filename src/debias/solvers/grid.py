"""The noise levels a solver visits: a :class:`Grid` of ``steps`` network calls and one end point.

Spacings (where the points lie):

- discrete, :mod:`debias.solvers.timesteps`: ``even``, ``ddim``, ``linspace``, ``leading``,
  ``trailing`` — original integer timesteps of the chain;
- continuous, DPM-Solver's ``skip_type``: ``time_uniform``, ``logSNR``, ``time_quadratic`` — points
  of the continuous time t ∈ [1/T, 1] of the discrete chain (step k sits at t = (k + 1)/T), spread
  uniformly in t, in λ = log α − log σ, or in √t. There log α is the piecewise-linear interpolation
  of the chain's log α_k (DPM-Solver's ``NoiseScheduleVP('discrete')``) and the network is called
  at the FRACTIONAL timestep T·(t − 1/T) — e.g. 999, 899.1, …, 99.9 for 10 uniform steps of T = 1000.

End point (``denoise_to_zero``): with it the grid ends at σ = 0, so the last update returns the data
prediction of the last call and the sample carries no noise; without it the spacing supplies one
point more and the sample is x there (DPM-Solver's ``denoise_to_zero=False``, the paper's samplers:
they stop at t = 1/T, σ ≈ 0.01 on the linear schedule). For the discrete spacings of the multistep
solvers the two grids differ only in the end: diffusers' ``steps + 1`` points with the smallest
replaced by σ = 0.

Tables: ``float64`` (the chain's own tables) or ``float32``: log α built from float32 β and every
interpolation done in float32, as the original code did (``betas.float()`` before
``NoiseScheduleVP``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from debias.diffusion.schedule import Schedule
from debias.errors import DebiasError
from debias.catalog import CONTINUOUS_SPACINGS, SPACINGS
from debias.solvers.timesteps import select_timesteps
TABLES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Grid:
    """n + 1 noise levels, highest first: the network is called at points 0 … n−1 and the sample ends at
    point n. Per point: the network's timestep (NaN at a σ = 0 end), ᾱ, α, σ and λ = log α − log σ
    (+∞ at σ = 0), all float64; ``integral`` says every called timestep is an integer."""

    timesteps: tuple[float, ...]
    alphas_cumprod: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]
    integral: bool

    @property
    def steps(self) -> int:
        """The number of network calls."""
        return len(self.timesteps) - 1

    @property
    def to_zero(self) -> bool:
        """The grid ends at σ = 0."""
        return self.sigma[-1] == 0

    def model_timesteps(self, i: int, x: Tensor) -> Tensor:
        """The network's timestep at point i for a batch like ``x`` (B,): int64 if integral, else float64."""
        dtype = torch.int64 if self.integral else torch.float64
        return torch.full((x.shape[0],), self.timesteps[i], dtype=dtype, device=x.device)

    def chain(self) -> Schedule:
        """The points as a respaced chain (ascending, as guided-diffusion's ``SpacedDiffusion``), for DDPM
        and DDIM: without the end when it is σ = 0 (the chain's ᾱ before its first step is 1), else with
        the end as chain index 0."""
        points = slice(0, self.steps) if self.to_zero else slice(0, self.steps + 1)
        ac = torch.tensor(self.alphas_cumprod[points][::-1], dtype=torch.float64)
        ts = torch.tensor(self.timesteps[points][::-1], dtype=torch.int64 if self.integral else torch.float64)
        return Schedule.from_alphas_cumprod(ac, ts)


def make_grid(schedule: Schedule, steps: int, spacing: str = "even", *, multistep: bool = False,
              denoise_to_zero: bool = True, tables: str = "float64") -> Grid:
    """The grid of ``steps`` network calls that ``spacing`` places on ``schedule`` (see the module
    docstring); ``multistep`` selects diffusers' multistep variant of the discrete spacings.
    DebiasError for an unknown spacing or table type, or a step count the spacing cannot place."""
    if spacing not in SPACINGS:
        raise DebiasError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if tables not in TABLES:
        raise DebiasError(f"unknown table type {tables!r}; choose one of {', '.join(TABLES)}")
    if steps < 1:
        raise DebiasError(f"cannot sample with {steps} steps (choose at least 1)")
    count = steps if denoise_to_zero else steps + 1
    dtype = TABLES[tables]
    if spacing in CONTINUOUS_SPACINGS:
        points = _continuous_points(LogAlpha(schedule, dtype), count, spacing)
    elif dtype == torch.float64:
        points = _table_points(schedule, count, spacing, multistep and denoise_to_zero)
    else:
        kept = select_timesteps(schedule.num_timesteps, count, spacing, multistep=multistep and denoise_to_zero)[::-1]
        t = torch.tensor([(k + 1) / schedule.num_timesteps for k in kept], dtype=dtype)
        points = _levels(LogAlpha(schedule, dtype), t, timesteps=[float(k) for k in kept])
    if denoise_to_zero:
        points = [values + [end] for values, end in zip(points, (math.nan, 1.0, 1.0, 0.0, math.inf))]
    called = points[0][:steps]
    return Grid(*(tuple(values) for values in points), integral=all(float(t).is_integer() for t in called))


def _table_points(schedule: Schedule, count: int, spacing: str, multistep: bool) -> list[list[float]]:
    """Discrete points from the float64 tables themselves: [timesteps, ᾱ, α, σ, λ], highest noise first."""
    kept = select_timesteps(schedule.num_timesteps, count, spacing, multistep=multistep)[::-1]
    alpha = [float(schedule.alpha[k]) for k in kept]
    sigma = [float(schedule.sigma[k]) for k in kept]
    return [[float(k) for k in kept], [float(schedule.alphas_cumprod[k]) for k in kept], alpha, sigma,
            [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]]


class LogAlpha:
    """log α(t) of a discrete chain as a piecewise-linear function of t ∈ [1/T, 1] (knots t_k = (k + 1)/T),
    in the table dtype — DPM-Solver's ``NoiseScheduleVP('discrete')``."""

    def __init__(self, schedule: Schedule, dtype: torch.dtype):
        T = schedule.num_timesteps
        if dtype == torch.float32:  # the original: log α from float32 β, accumulated in float32
            self.y = 0.5 * torch.log(1 - schedule.betas.float()).cumsum(dim=0)
            self.t = torch.linspace(0.0, 1.0, T + 1)[1:]
        else:
            self.y = 0.5 * schedule.alphas_cumprod.log()
            self.t = torch.linspace(0.0, 1.0, T + 1, dtype=torch.float64)[1:]
        self.T, self.dtype = T, dtype

    @staticmethod
    def _interpolate(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
        """Piecewise-linear f(x) through (xp, yp), xp increasing, extended linearly beyond the ends."""
        j = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, len(xp) - 2)
        x0, x1, y0, y1 = xp[j], xp[j + 1], yp[j], yp[j + 1]
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def __call__(self, t: Tensor) -> Tensor:
        return self._interpolate(t, self.t, self.y)

    def lam(self, t: Tensor) -> Tensor:
        """λ(t) = log α − ½ log(1 − α²)."""
        log_alpha = self(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def inverse_lam(self, lam: Tensor) -> Tensor:
        """t(λ): log α = −½ log(1 + e^{−2λ}), then t by interpolation of the (decreasing) log α."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return self._interpolate(log_alpha, self.y.flip(0), self.t.flip(0))


def _continuous_points(log_alpha: LogAlpha, count: int, spacing: str) -> list[list[float]]:
    """``count`` points of continuous time from t = 1 down to t = 1/T (DPM-Solver's ``get_time_steps``)."""
    t_T, t_0, dtype = 1.0, 1.0 / log_alpha.T, log_alpha.dtype
    if spacing == "time_uniform":
        t = torch.linspace(t_T, t_0, count, dtype=dtype)
    elif spacing == "time_quadratic":
        t = torch.linspace(t_T ** 0.5, t_0 ** 0.5, count, dtype=dtype).pow(2)
    else:  # logSNR
        ends = log_alpha.lam(torch.tensor([t_T, t_0], dtype=dtype))
        t = log_alpha.inverse_lam(torch.linspace(float(ends[0]), float(ends[1]), count, dtype=dtype))
    return _levels(log_alpha, t)


def _levels(log_alpha: LogAlpha, t: Tensor, timesteps: list[float] | None = None) -> list[list[float]]:
    """[network timesteps, ᾱ, α, σ, λ] at continuous times ``t``, computed in the table dtype; the network's
    timesteps are T·(t − 1/T) unless given."""
    log_a = log_alpha(t)
    two_log_a = 2.0 * log_a
    sigma = torch.sqrt(1.0 - torch.exp(two_log_a))
    lam = log_a - 0.5 * torch.log(1.0 - torch.exp(two_log_a))
    if timesteps is None:
        timesteps = ((t - 1.0 / log_alpha.T) * log_alpha.T).tolist()
    return [timesteps, *(values.tolist() for values in (torch.exp(two_log_a), torch.exp(log_a), sigma, lam))]

"""Discrete-time variance-preserving noise schedules (DDPM / guided-diffusion conventions).

Notation: ᾱ_t = alphas_cumprod[t], α_t = √ᾱ_t, σ_t = √(1-ᾱ_t), SNR_t = ᾱ_t/(1-ᾱ_t),
x_t = α_t x0 + σ_t ε. All tables are float64 tensors of length T; they are cast to the data dtype
only when gathered for a batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor

from debias.catalog import SCHEDULES


def make_betas(name: str, steps: int) -> Tensor:
    """β_1..β_T for a named schedule, float64 (T,).

    - ``linear``: Ho et al. 2020, β from 1e-4 to 0.02, both scaled by 1000/T so that any T
      describes the same continuous process (guided-diffusion's ``get_named_beta_schedule``).
    - ``cosine``: Nichol & Dhariwal 2021, eq. (17): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008,
      β_t = min(1 - ᾱ(t)/ᾱ(t-1), 0.999).
    """
    if steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {steps}")
    if name == "linear":
        if steps < 20:
            raise ValueError(f"the linear schedule needs at least 20 steps (β_T = 0.02·1000/T must stay below 1), got {steps}")
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if name == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> list[int]:
    """Timesteps kept by guided-diffusion's even respacing (``space_timesteps`` semantics).

    ``section_counts`` is e.g. ``"50"`` (50 evenly strided steps including both ends), ``"10,15,20"``
    (the chain split into equal sections, each strided evenly), or ``"ddim50"`` (the fixed integer
    stride used by the DDIM paper). Returns the sorted original timesteps to keep.

    Within a section the k-th kept step is ``round(s_k)`` with s_k the float RUNNING SUM
    0 + stride + … + stride, not ``round(k * stride)``: guided-diffusion accumulates the fractional stride,
    and the two differ where s_k lands near a half-integer (e.g. 500 instead of the original's 499 at
    21 steps of 1000; 278 of the step counts 1…1000 keep a different step).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride  # accumulated, as the original (see above)
        start += size
    return sorted(set(kept))


class Schedule:
    """A (possibly respaced) discrete diffusion chain with all derived tables, float64 (T,).

    ``timestep_map[i]`` is the original timestep that chain index ``i`` stands for; it is what the
    network is conditioned on (identity for a full chain; int64, or float64 for a chain over fractional
    timesteps).
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None):
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map
        if not self.timestep_map.is_floating_point():
            self.timestep_map = self.timestep_map.to(torch.int64)
        ac = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alpha = ac.sqrt()
        self.sigma = (1.0 - ac).sqrt()
        self.snr = ac / (1.0 - ac)
        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, posterior_variance)   (Ho et al. eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - ac)
        # the variance is 0 at t = 0, so its log is clipped to the value at t = 1
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - ac)

    @classmethod
    def named(cls, name: str, steps: int) -> "Schedule":
        """The full chain of a named schedule (``linear`` or ``cosine``) with ``steps`` steps."""
        return cls(make_betas(name, steps))

    def respace(self, use_timesteps: Iterable[int]) -> "Schedule":
        """A shorter chain over ``use_timesteps`` with betas recomputed so that ᾱ is unchanged:
        β'_i = 1 - ᾱ_{k_i}/ᾱ_{k_{i-1}} (guided-diffusion's ``SpacedDiffusion``)."""
        kept = sorted(set(int(k) for k in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps - 1}]")
        return Schedule.from_alphas_cumprod(self.alphas_cumprod[kept], self.timestep_map[kept])

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, timestep_map: Tensor) -> "Schedule":
        """The chain with the given ᾱ (T,), decreasing, at the given timesteps: β_i = 1 - ᾱ_i/ᾱ_{i-1}, ᾱ_{-1} = 1."""
        ac = alphas_cumprod.to(torch.float64)
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return cls(1.0 - ac / prev, timestep_map)

    def to(self, device: torch.device | str) -> "Schedule":
        """A copy with every table on ``device``, so that gathering for a batch there never copies (or syncs)."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, name, value.to(device))
        return moved

    def gather(self, table: Tensor, t: Tensor, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``table[t]`` cast to x's dtype (or ``dtype``), on x's device, shaped (B, 1, ..., 1) to broadcast
        against x (B, ...)."""
        values = table.to(t.device)[t].to(dtype=dtype or x.dtype, device=x.device)
        return values.reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α_t x0 + σ_t ε. Shapes: x0, noise (B, C, H, W); t (B,) chain indices."""
        return self.gather(self.alpha, t, x0) * x0 + self.gather(self.sigma, t, x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), each (B, C, H, W)."""
        mean = self.gather(self.posterior_mean_coef1, t, xt) * x0 + self.gather(self.posterior_mean_coef2, t, xt) * xt
        var = self.gather(self.posterior_variance, t, xt).expand_as(xt)
        log_var = self.gather(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        return mean, var, log_var

"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with fixed or learned variance.

On a chain respaced to the selected timesteps (guided-diffusion's ``SpacedDiffusion``), each step
draws x_{t-1} ~ N(μ_θ(x_t, t), Σ_θ(x_t, t)), where μ_θ is the posterior mean q(x_{t-1} | x_t, x̂0)
(Ho et al. eq. 7) and Σ_θ is either β̃_t ("fixed small") or the learned interpolation between β_t
and β̃_t (Nichol & Dhariwal 2021, eq. 15) — see :func:`debias.diffusion.reverse.p_mean_variance`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from debias.diffusion.reverse import ReverseStep, p_mean_variance
from debias.diffusion.schedule import Schedule
from debias.samplers.noise import SampleNoise
from debias.samplers.timesteps import select_timesteps


def ddpm_step(model: Callable, chain: Schedule, x: Tensor, t: Tensor, target: str, learn_sigma: bool,
              clip_x0: bool = True, y: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, ReverseStep]:
    """One ancestral step x_t → x_{t-1} (guided-diffusion's ``p_sample``).

    ``x`` (B, C, H, W) sits at chain indices ``t`` (B,); the model sees the original timesteps
    ``chain.timestep_map[t]``. ``noise`` (B, C, H, W) is the standard normal z of Ho et al. Alg. 2
    (ignored where t == 0: the last step returns the mean). Returns x_{t-1} and p(x_{t-1} | x_t).
    """
    output = model(x, chain.timestep_map.to(x.device)[t], y)
    p = p_mean_variance(chain, output, x, t, target, learn_sigma, clip_x0)
    if noise is None:
        return p.mean, p
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return p.mean + nonzero * torch.exp(0.5 * p.log_variance) * noise, p


@torch.inference_mode()
def ddpm(model: Callable, x_T: Tensor, steps: int, schedule: Schedule, target: str, learn_sigma: bool,
         clip_x0: bool = True, y: Tensor | None = None, noise: SampleNoise | None = None,
         progress: Callable[[int, int], None] | None = None, *, spacing: str = "even") -> Tensor:
    """Ancestral sampling from x_T (B, C, H, W) with ``steps`` model calls; returns x0 samples (B, C, H, W).

    ``noise`` is required: one fresh draw per step (the last step's draw is discarded, as upstream).
    """
    if noise is None:
        raise ValueError("ddpm adds fresh noise at every step: pass a noise source (SampleNoise)")
    chain = schedule.respace(select_timesteps(schedule.num_timesteps, steps, spacing))
    x = x_T
    for done, i in enumerate(reversed(range(chain.num_timesteps)), start=1):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        x, _ = ddpm_step(model, chain, x, t, target, learn_sigma, clip_x0, y, noise.draw())
        if progress is not None:
            progress(done, chain.num_timesteps)
    return x

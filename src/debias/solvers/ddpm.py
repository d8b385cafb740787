"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with fixed or learned variance.

On a chain respaced to the selected timesteps (guided-diffusion's ``SpacedDiffusion``), each step
draws x_{t-1} ~ N(μ_θ(x_t, t), Σ_θ(x_t, t)), where μ_θ is the posterior mean q(x_{t-1} | x_t, x̂0)
(Ho et al. eq. 7) and Σ_θ is either β̃_t ("fixed small") or the learned interpolation between β_t
and β̃_t (Nichol & Dhariwal 2021, eq. 15) — see :func:`debias.diffusion.reverse.reverse_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from debias.diffusion.reverse import ReverseStep, reverse_step
from debias.diffusion.schedule import Schedule
from debias.solvers.denoiser import Denoiser
from debias.solvers.grid import Grid
from debias.solvers.noise import SampleNoise


def ddpm_step(denoiser: Denoiser, chain: Schedule, x: Tensor, t: Tensor,
              noise: Tensor | None = None) -> tuple[Tensor, ReverseStep]:
    """One ancestral step x_t → x_{t-1} (guided-diffusion's ``p_sample``).

    ``x`` (B, C, H, W) sits at indices ``t`` (B,) of the respaced ``chain``; the network sees the original
    timesteps ``chain.timestep_map[t]``. ``noise`` (B, C, H, W) is the standard normal z of Ho et al.
    Alg. 2 (ignored where t == 0: the last step returns the mean). Returns x_{t-1} and p(x_{t-1} | x_t).
    """
    alpha, sigma = (chain.gather(table, t, x, torch.float64) for table in (chain.alpha, chain.sigma))
    pred = denoiser(x, chain.timestep_map.to(x.device)[t], alpha, sigma)
    p = reverse_step(chain, pred.x0, pred.eps, pred.var, x, t)
    if noise is None:
        return p.mean, p
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return p.mean + nonzero * torch.exp(0.5 * p.log_variance) * noise, p


@torch.inference_mode()
def ddpm(denoiser: Denoiser, x_T: Tensor, grid: Grid, noise: SampleNoise,
         progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Ancestral sampling from x_T (B, C, H, W) through the points of ``grid`` (on its chain; a grid that
    ends at σ = 0 ends with the mean of the last step); returns the samples (B, C, H, W). ``noise`` gives
    one fresh draw per step (the last step's draw is discarded, as upstream)."""
    chain, x = grid.chain(), x_T
    last = 0 if grid.to_zero else 1
    for done, i in enumerate(range(chain.num_timesteps - 1, last - 1, -1), start=1):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        x, _ = ddpm_step(denoiser, chain, x, t, noise.draw())
        if progress is not None:
            progress(done, grid.steps)
    return x

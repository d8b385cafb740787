"""DDIM (Song et al. 2021), deterministic for η = 0, ancestral-like for η = 1.

On the chain respaced to the selected timesteps (ᾱ' = ᾱ at the kept steps, ᾱ'_prev = 1 before the
first), Song et al. eq. (12):

    x_{t-1} = √ᾱ_{t-1} x̂0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z,
    σ_t = η √((1 − ᾱ_{t-1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t-1})                          (eq. 16)

with x̂0 the (optionally clipped) data prediction and ε̂ re-derived from it, as in guided-diffusion's
``ddim_sample``; learned-variance channels are ignored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from debias.diffusion.schedule import Schedule
from debias.solvers.denoiser import Denoiser
from debias.solvers.grid import Grid
from debias.solvers.noise import SampleNoise


def ddim_step(denoiser: Denoiser, chain: Schedule, x: Tensor, t: Tensor, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM step x_t → x_{t-1}; ``x`` (B, C, H, W) at indices ``t`` (B,) of the respaced ``chain``.

    The network sees ``chain.timestep_map[t]``. ``noise`` (B, C, H, W) is z of eq. (12), needed iff η > 0
    (not added where t == 0).
    """
    alpha, sigma = (chain.gather(table, t, x, torch.float64) for table in (chain.alpha, chain.sigma))
    pred = denoiser(x, chain.timestep_map.to(x.device)[t], alpha, sigma)
    abar = chain.gather(chain.alphas_cumprod, t, x)
    abar_prev = chain.gather(chain.alphas_cumprod_prev, t, x)
    x_prev = abar_prev.sqrt() * pred.x0
    if eta == 0:
        return x_prev + (1 - abar_prev).sqrt() * pred.eps
    if noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise draw")
    sigma_t = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x_prev + (1 - abar_prev - sigma_t**2).sqrt() * pred.eps + nonzero * sigma_t * noise


@torch.inference_mode()
def ddim(denoiser: Denoiser, x_T: Tensor, grid: Grid, noise: SampleNoise | None,
         progress: Callable[[int, int], None] | None = None, *, eta: float) -> Tensor:
    """DDIM sampling from x_T (B, C, H, W) through the points of ``grid`` (on its chain: the last step
    goes to ᾱ = 1 when the grid ends at σ = 0); returns the samples (B, C, H, W).

    ``noise`` gives one draw per step when ``eta`` > 0.
    """
    chain, x = grid.chain(), x_T
    last = 0 if grid.to_zero else 1
    for done, i in enumerate(range(chain.num_timesteps - 1, last - 1, -1), start=1):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        x = ddim_step(denoiser, chain, x, t, eta, noise.draw() if eta > 0 else None)
        if progress is not None:
            progress(done, grid.steps)
    return x

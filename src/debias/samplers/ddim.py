"""DDIM (Song et al. 2021), deterministic for η = 0, ancestral-like for η = 1.

On the chain respaced to the selected timesteps (ᾱ' = ᾱ at the kept steps, ᾱ'_prev = 1 before the
first), Song et al. eq. (12):

    x_{t-1} = √ᾱ_{t-1} x̂0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z,
    σ_t = η √((1 − ᾱ_{t-1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t-1})                          (eq. 16)

with x̂0 the (optionally clipped) data prediction and ε̂ re-derived from it, as in guided-diffusion's
``ddim_sample``; learned-variance channels are ignored.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from debias.diffusion.reverse import predict_x0_eps
from debias.diffusion.schedule import Schedule
from debias.samplers.noise import SampleNoise
from debias.samplers.timesteps import select_timesteps


def ddim_step(model: Callable, chain: Schedule, x: Tensor, t: Tensor, target: str, learn_sigma: bool,
              clip_x0: bool = True, y: Tensor | None = None, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM step x_t → x_{t-1}; ``x`` (B, C, H, W) at chain indices ``t`` (B,).

    The model sees ``chain.timestep_map[t]``. ``noise`` (B, C, H, W) is z of eq. (12), needed iff η > 0
    (not added where t == 0).
    """
    output = model(x, chain.timestep_map.to(x.device)[t], y)
    pred_x0, pred_eps = predict_x0_eps(chain, output, x, t, target, learn_sigma, clip_x0)
    abar = chain.gather(chain.alphas_cumprod, t, x)
    abar_prev = chain.gather(chain.alphas_cumprod_prev, t, x)
    x_prev = abar_prev.sqrt() * pred_x0
    if eta == 0:
        return x_prev + (1 - abar_prev).sqrt() * pred_eps
    if noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise draw")
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x_prev + (1 - abar_prev - sigma**2).sqrt() * pred_eps + nonzero * sigma * noise


@torch.inference_mode()
def ddim(model: Callable, x_T: Tensor, steps: int, schedule: Schedule, target: str, learn_sigma: bool,
         clip_x0: bool = True, y: Tensor | None = None, noise: SampleNoise | None = None,
         progress: Callable[[int, int], None] | None = None, *, spacing: str = "even", eta: float = 0.0) -> Tensor:
    """DDIM sampling from x_T (B, C, H, W) with ``steps`` model calls; returns x0 samples (B, C, H, W).

    ``noise`` is needed iff ``eta`` > 0 (one draw per step).
    """
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 adds noise at every step: pass a noise source (SampleNoise)")
    chain = schedule.respace(select_timesteps(schedule.num_timesteps, steps, spacing))
    x = x_T
    for done, i in enumerate(reversed(range(chain.num_timesteps)), start=1):
        t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        x = ddim_step(model, chain, x, t, target, learn_sigma, clip_x0, y, eta, noise.draw() if eta > 0 else None)
        if progress is not None:
            progress(done, chain.num_timesteps)
    return x

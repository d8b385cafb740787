"""The training objective for any (target, weighting, learned variance).

    loss = w_target(SNR_t) · mean‖target − prediction‖²  [+ L_vb with the mean detached]

and with ``weighting: learned`` (:mod:`debias.diffusion.uncertainty`) the weighted term becomes
w/e^u · mse + u, u the head's learned log-variance at t.

The weight table comes from :func:`debias.diffusion.weighting.weight_table` (ε-space weight carried
into the target's space). With learned variance the VB term trains only the variance channels
("hybrid" loss, Nichol & Dhariwal 2021 §3.1, L_hybrid = L_simple + λ L_vb with λ = 1 after the
T/1000 rescaling of guided-diffusion's RESCALED_MSE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from debias.diffusion import targets
from debias.diffusion.reverse import split_output, vb_terms_bpd
from debias.diffusion.schedule import Schedule


@dataclass
class LossTerms:
    """Per-sample loss terms, each (B,)."""

    mse: Tensor   # unweighted MSE of the target, mean over pixels
    vb: Tensor    # variational-bound term in bits/dim (zeros without learned variance)
    loss: Tensor  # weights[t] · mse + vb (weights[t]/e^u · mse + u + vb when learned) — what is minimized


def diffusion_loss(schedule: Schedule, model_output: Tensor, x0: Tensor, noise: Tensor, t: Tensor,
                   target: str, weights: Tensor, learn_sigma: bool, log_variance: Tensor | None = None) -> LossTerms:
    """Loss terms for a batch.

    ``x0``, ``noise`` (B, C, H, W); ``t`` (B,) chain indices; ``model_output`` (B, C or 2C, H, W) is the
    network's output at x_t = q_sample(x0, t, noise); ``weights`` is the (T,) table of weights on the
    target's MSE; ``log_variance`` (B,) is the learned u of each sample's t (None: a fixed weighting).
    """
    alpha, sigma = schedule.gather(schedule.alpha, t, x0), schedule.gather(schedule.sigma, t, x0)
    pred, var_values = split_output(model_output, x0.shape[1], learn_sigma)
    regression_target = targets.target_from(target, x0, noise, alpha, sigma)
    mse = (regression_target - pred).pow(2).flatten(1).mean(1)
    if var_values is None:
        vb = torch.zeros_like(mse)
    else:
        xt = alpha * x0 + sigma * noise
        frozen = torch.cat([pred.detach(), var_values], dim=1)
        vb = vb_terms_bpd(schedule, frozen, x0, xt, t, target) * (schedule.num_timesteps / 1000.0)
    w = weights.to(device=t.device)[t].to(mse.dtype)
    if log_variance is None:
        return LossTerms(mse=mse, vb=vb, loss=w * mse + vb)
    u = log_variance.to(mse.dtype)
    return LossTerms(mse=mse, vb=vb, loss=w * mse * torch.exp(-u) + u + vb)


def timestep_buckets(t: Tensor, num_timesteps: int, buckets: int) -> Tensor:
    """Bucket index in [0, buckets) of each chain index t (B,), for per-timestep loss logs."""
    return torch.div(t * buckets, num_timesteps, rounding_mode="floor").clamp(max=buckets - 1)

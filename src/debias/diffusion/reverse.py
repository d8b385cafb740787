"""The model's reverse step p(x_{t-1} | x_t) and the variational-bound terms (Nichol & Dhariwal 2021).

A network output has C channels (the mean prediction, interpreted as ``target``) or, with learned
variance, 2C channels: the second half is v ∈ [-1, 1] interpolating the log-variance between the
two bounds β_t and β̃_t ("LEARNED_RANGE", Nichol & Dhariwal eq. 15):

    log Σ = frac · log β_t + (1 − frac) · log β̃_t,   frac = (v + 1)/2.

Fixed-variance models use β̃_t (the posterior variance, "fixed small").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from debias.diffusion import targets
from debias.diffusion.schedule import Schedule


@dataclass
class ReverseStep:
    """p(x_{t-1} | x_t) for a batch; every field is (B, C, H, W)."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    pred_eps: Tensor


def split_output(model_output: Tensor, channels: int, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    """Split a (B, C or 2C, H, W) network output into the mean prediction and the variance value v."""
    if not learn_sigma:
        return model_output, None
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"a learned-sigma model must output {2 * channels} channels, got {model_output.shape[1]}")
    return model_output[:, :channels], model_output[:, channels:]


def predict_x0_eps(schedule: Schedule, model_output: Tensor, xt: Tensor, t: Tensor, target: str,
                   learn_sigma: bool, clip_x0: bool = True) -> tuple[Tensor, Tensor]:
    """x̂0 and ε̂ (each (B, C, H, W)) of a network output at chain indices ``t``, as
    :func:`debias.diffusion.targets.x0_and_eps` gives them."""
    pred, _ = split_output(model_output, xt.shape[1], learn_sigma)
    alpha, sigma = schedule.gather(schedule.alpha, t, xt), schedule.gather(schedule.sigma, t, xt)
    return targets.x0_and_eps(target, pred, xt, alpha, sigma, clip_x0)


def reverse_step(schedule: Schedule, pred_x0: Tensor, pred_eps: Tensor, var_values: Tensor | None, xt: Tensor,
                 t: Tensor) -> ReverseStep:
    """p(x_{t-1} | x_t) given the data prediction x̂0 (already clipped if wanted) and ε̂, and the
    learned-variance values v (None: the fixed "small" variance β̃_t); each (B, C, H, W) at chain
    indices ``t`` (B,). The mean is the posterior mean q(x_{t-1} | x_t, x̂0) (Ho et al. eq. 7)."""
    if var_values is None:
        variance = schedule.gather(schedule.posterior_variance, t, xt).expand_as(xt)
        log_variance = schedule.gather(schedule.posterior_log_variance_clipped, t, xt).expand_as(xt)
    else:
        min_log = schedule.gather(schedule.posterior_log_variance_clipped, t, xt)
        max_log = schedule.gather(schedule.betas.log(), t, xt)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = log_variance.exp()
    mean, _, _ = schedule.q_posterior(pred_x0, xt, t)
    return ReverseStep(mean, variance, log_variance, pred_x0, pred_eps)


def p_mean_variance(schedule: Schedule, model_output: Tensor, xt: Tensor, t: Tensor, target: str,
                    learn_sigma: bool, clip_x0: bool = True) -> ReverseStep:
    """The reverse-step Gaussian for a network output (guided-diffusion's ``p_mean_variance``).

    ``xt`` (B, C, H, W) at chain indices ``t`` (B,); ``model_output`` (B, C or 2C, H, W). The x0 implied
    by the prediction is clipped to [-1, 1] when ``clip_x0``.
    """
    _, var_values = split_output(model_output, xt.shape[1], learn_sigma)
    pred_x0, pred_eps = predict_x0_eps(schedule, model_output, xt, t, target, learn_sigma, clip_x0)
    return reverse_step(schedule, pred_x0, pred_eps, var_values, xt, t)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) by the tanh approximation used by guided-diffusion (kept for exact parity)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log-likelihood of images in [-1, 1] quantized to 256 bins under N(means, e^{2 log_scales}),
    elementwise, in nats (Ho et al. 2020, §3.3, the decoder L_0)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(schedule: Schedule, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor, target: str) -> Tensor:
    """The variational-bound term L_t in bits/dim, (B,): KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)) for t > 0
    and the decoder NLL at t = 0 (Nichol & Dhariwal eq. 4-6). ``model_output`` has 2C channels."""
    true_mean, _, true_log_var = schedule.q_posterior(x0, xt, t)
    p = p_mean_variance(schedule, model_output, xt, t, target, learn_sigma=True, clip_x0=False)
    kl = normal_kl(true_mean, true_log_var, p.mean, p.log_variance).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)

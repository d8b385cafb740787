"""Multistep DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), orders 1–3.

Both integrate the probability-flow ODE exactly in its linear part, in the half-log-SNR
λ_t = log α_t − log σ_t of the discrete schedule (read from the table at the selected timesteps).
With h = λ_t − λ_s:

- ``dpmsolver`` (noise prediction ε̂, Lu et al. 2022a, Prop. 3.1):
  x_t = (α_t/α_s) x_s − α_t ∫ e^{−λ} ε̂ dλ, first order x_t = (α_t/α_s) x_s − σ_t (e^h − 1) ε̂;
- ``dpmsolver++`` (data prediction x̂0, Lu et al. 2022b):
  x_t = (σ_t/σ_s) x_s + σ_t ∫ e^{λ} x̂0 dλ, first order x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x̂0 (= DDIM).

Writing ĥ = −h (data) or +h (noise), φ₁ = e^ĥ − 1, φ₂ = φ₁/ĥ − 1, φ₃ = φ₂/ĥ − 1/2, the multistep
updates from the last model outputs m₀ (at s), m₁, m₂ with r₀ = (λ_s − λ_{s₁})/h, r₁ = (λ_{s₁} − λ_{s₂})/h,
D₁⁰ = (m₀ − m₁)/r₀, D₁¹ = (m₁ − m₂)/r₁ are

    order 1:  x_t = c x_s − k φ₁ m₀
    order 2:  x_t = c x_s − k φ₁ (m₀ + ½ D₁⁰)                       (DPM-Solver++(2M), Lu et al. 2022b, Alg. 2)
    order 3:  x_t = c x_s − k (φ₁ m₀ + φ₂ D₁ + φ₃ D₂),              (the authors' multistep third-order update)
              D₁ = D₁⁰ + r₀/(r₀ + r₁) (D₁⁰ − D₁¹),  D₂ = (D₁⁰ − D₁¹)/(r₀ + r₁)

with (c, k) = (σ_t/σ_s, α_t) for data and (α_t/α_s, σ_t) for noise prediction. The first-order part
c x_s − k φ₁ m₀ is, in both forms, the DDIM step α_t x̂0 + σ_t ε̂ (Lu et al. 2022a, §4.1), and is
computed so (no cancellation at tiny α_s). As in diffusers' ``lower_order_final=True`` the first steps
warm up with lower orders, runs of fewer than 15 steps take at most order 2 on the second-to-last
step, and the last step goes to σ = 0 (``final_sigmas_type="zero"``), where the update is the data
prediction x̂0 itself.

``clip_x0`` clamps x̂0 to [-1, 1] before it is used (for ``dpmsolver`` ε̂ is then re-derived from the
clamped x̂0): diffusers' ``thresholding=True`` with ``sample_max_value=1``, whose dynamic threshold is
then always 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from debias.diffusion import targets
from debias.diffusion.reverse import split_output
from debias.diffusion.schedule import Schedule
from debias.samplers.noise import SampleNoise
from debias.samplers.timesteps import select_timesteps

ALGORITHMS = ("dpmsolver", "dpmsolver++")


def solver_grid(schedule: Schedule, steps: int,
                spacing: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """The original timesteps a multistep solver visits, descending, and α, σ, λ there (float64 floats).

    Uses the multistep variant of the diffusers spacings (see :mod:`debias.samplers.timesteps`).
    """
    timesteps = select_timesteps(schedule.num_timesteps, steps, spacing, multistep=True)[::-1]
    alpha = [float(schedule.alpha[t]) for t in timesteps]
    sigma = [float(schedule.sigma[t]) for t in timesteps]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    return timesteps, alpha, sigma, lam


def data_prediction(model: Callable, x: Tensor, t: int, alpha: float, sigma: float, target: str,
                    learn_sigma: bool, clip_x0: bool, y: Tensor | None) -> Tensor:
    """x̂0(x_t, t) (B, C, H, W) from the model at original timestep ``t``, clamped to [-1, 1] if ``clip_x0``.

    Learned-variance channels are dropped: the ODE solvers only use the mean prediction.
    """
    output = model(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device), y)
    pred, _ = split_output(output, x.shape[1], learn_sigma)
    x0 = targets.x0_from(target, pred, x, alpha, sigma)
    return x0.clamp(-1, 1) if clip_x0 else x0


def step_order(order: int, i: int, n: int) -> int:
    """Order of step i of n (diffusers' multistep warm-up and ``lower_order_final`` rules)."""
    if i == n - 1:
        return 1
    if i == n - 2 and n < 15:
        return min(order, i + 1, 2)
    return min(order, i + 1)


@torch.inference_mode()
def dpm_solver(model: Callable, x_T: Tensor, steps: int, schedule: Schedule, target: str, learn_sigma: bool,
               clip_x0: bool = True, y: Tensor | None = None, noise: SampleNoise | None = None,
               progress: Callable[[int, int], None] | None = None, *, spacing: str = "even", order: int = 2,
               algorithm: str = "dpmsolver++") -> Tensor:
    """Multistep DPM-Solver(++) from x_T (B, C, H, W) with ``steps`` model calls; returns x0 (B, C, H, W).

    ``algorithm`` is ``dpmsolver`` (noise-prediction form) or ``dpmsolver++`` (data-prediction form);
    ``noise`` is unused (the solver is deterministic).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    timesteps, alpha, sigma, lam = solver_grid(schedule, steps, spacing)
    n = len(timesteps)
    x, history = x_T, []
    for i, t in enumerate(timesteps):
        x0 = data_prediction(model, x, t, alpha[i], sigma[i], target, learn_sigma, clip_x0, y)
        if i == n - 1:
            x = x0  # the step to σ = 0: x_0 = x̂0 in both forms
        else:
            eps = targets.eps_from("x0", x0, x, alpha[i], sigma[i])
            m = x0 if algorithm == "dpmsolver++" else eps
            history = (history + [m])[-3:]
            h = lam[i + 1] - lam[i]
            hh, k = (-h, alpha[i + 1]) if algorithm == "dpmsolver++" else (h, sigma[i + 1])
            # the first-order part c x_s − k φ₁ m₀ equals the DDIM step α_t x̂0 + σ_t ε̂ in both forms;
            # written so, the noise form avoids the cancellation (α_t/α_s) x_s − σ_t(e^h − 1) ε̂ at tiny α_s
            x = alpha[i + 1] * x0 + sigma[i + 1] * eps
            p = step_order(order, i, n)
            if p == 2:
                d1 = (m - history[-2]) / ((lam[i] - lam[i - 1]) / h)
                x = x - k * 0.5 * math.expm1(hh) * d1
            elif p == 3:
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                d1_0, d1_1 = (m - history[-2]) / r0, (history[-2] - history[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = math.expm1(hh) / hh - 1
                phi3 = phi2 / hh - 0.5
                x = x - k * (phi2 * d1 + phi3 * d2)
        if progress is not None:
            progress(i + 1, n)
    return x

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
computed so (no cancellation at tiny α_s). The first steps warm up with lower orders (order ≤ i + 1
at step i); with ``lower_order_final`` = L, runs of fewer than L steps also lower the order of their
last steps (order ≤ n − i: diffusers uses L = 15, the original DPM-Solver code L = 10). A step to
σ = 0 (a grid that ends there, diffusers' ``final_sigmas_type="zero"``) returns the data prediction x̂0.

``clip_x0`` clamps x̂0 to [-1, 1] before it is used (for ``dpmsolver`` ε̂ is then re-derived from the
clamped x̂0): diffusers' ``thresholding=True`` with ``sample_max_value=1``, whose dynamic threshold is
then always 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from debias.solvers.denoiser import Denoiser
from debias.solvers.grid import Grid
from debias.solvers.multistep import predict_at, step_order
from debias.solvers.noise import SampleNoise


@torch.inference_mode()
def dpm_solver(denoiser: Denoiser, x_T: Tensor, grid: Grid, noise: SampleNoise | None,
               progress: Callable[[int, int], None] | None = None, *, order: int, lower_order_final: int,
               algorithm: str) -> Tensor:
    """Multistep DPM-Solver(++) from x_T (B, C, H, W) through the points of ``grid`` (one network call
    each but the end); returns the samples (B, C, H, W).

    ``algorithm`` is ``dpmsolver`` (noise-prediction form) or ``dpmsolver++`` (data-prediction form);
    ``noise`` is unused (the solver is deterministic).
    """
    alpha, sigma, lam, n = grid.alpha, grid.sigma, grid.lam, grid.steps
    x, history = x_T, []
    for i in range(n):
        pred = predict_at(denoiser, x, grid, i)
        x0, eps = pred.x0, pred.eps
        if sigma[i + 1] == 0:
            x = x0  # the step to σ = 0: x_0 = x̂0 in both forms
        else:
            m = x0 if algorithm == "dpmsolver++" else eps
            history = (history + [m])[-3:]
            h = lam[i + 1] - lam[i]
            hh, k = (-h, alpha[i + 1]) if algorithm == "dpmsolver++" else (h, sigma[i + 1])
            # the first-order part c x_s − k φ₁ m₀ equals the DDIM step α_t x̂0 + σ_t ε̂ in both forms;
            # written so, the noise form avoids the cancellation (α_t/α_s) x_s − σ_t(e^h − 1) ε̂ at tiny α_s
            x = alpha[i + 1] * x0 + sigma[i + 1] * eps
            p = step_order(order, i, n, n < lower_order_final)
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

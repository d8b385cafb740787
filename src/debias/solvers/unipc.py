"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) plus a corrector (UniC) that reuses the
model evaluation the next step needs anyway, so a corrected step costs no extra network call.

Data-prediction form (diffusers' ``UniPCMultistepScheduler`` defaults: ``predict_x0=True``,
``lower_order_final=True``, ``disable_corrector=[]``, ``final_sigmas_type="zero"``, and the original
``UniPC.py``'s ``algorithm_type="data_prediction"``). With λ, h and
ĥ = −h as in DPM-Solver++, the update from s to t using the data predictions m₀ (at s) and earlier
m_k (at λ_{s_k}, r_k = (λ_{s_k} − λ_s)/h, D_k = (m_k − m₀)/r_k) is

    x_t = (σ_t/σ_s) x_s − α_t φ₁(ĥ) m₀ − α_t B(h) Σ_k ρ_k D_k,     φ₁(ĥ) = e^ĥ − 1,

with B(h) = ĥ (``bh1``) or e^ĥ − 1 (``bh2``), and ρ solving the order conditions
Σ_k ρ_k r_k^{j−1} = j! ψ_{j+1}(ĥ)/B(h), j = 1..K, where ψ₁ = φ₁ and ψ_{j+1} = ψ_j/ĥ − 1/j!.

- UniP-p (predictor) uses the p − 1 earlier outputs (K = p − 1);
- UniC-p (corrector) adds the fresh output m_t at the predicted x_t as a point with r = 1 (K = p) and
  recomputes x_t from x_s; the model output at the *uncorrected* x_t is kept for the next step.

For K = 1 both use ρ = ½, the simplification of the reference implementation. Warm-up steps lower
the order (p ≤ i + 1), and so do the final steps (p ≤ n − i), as in diffusers and the original code. The last step has no corrector (no network
call follows it); a step to σ = 0 returns the data prediction itself.
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


def uni_bh_update(x_s: Tensor, outputs: list[Tensor], lams: list[float], lam_t: float, alpha_t: float,
                  sigma_t: float, sigma_s: float, variant: str, m_t: Tensor | None = None) -> Tensor:
    """One UniP step (``m_t`` None) or UniC correction (``m_t`` given) from s to t.

    ``outputs`` (each (B, C, H, W)) are data predictions at half-log-SNRs ``lams``, oldest first; the
    last is m₀ at s. Returns x_t (B, C, H, W).
    """
    lam_s, m0 = lams[-1], outputs[-1]
    h = lam_t - lam_s
    hh = -h
    phi1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else phi1
    rks = [(lam - lam_s) / h for lam in lams[-2::-1]]
    ds = [(m - m0) / r for m, r in zip(outputs[-2::-1], rks)]
    if m_t is not None:
        rks.append(1.0)
        ds.append(m_t - m0)
    x_t = (sigma_t / sigma_s) * x_s - alpha_t * phi1 * m0
    if not ds:
        return x_t
    if len(ds) == 1:
        rhos = [0.5]
    else:
        psi, fact, b = phi1, 1, []
        for j in range(1, len(rks) + 1):
            psi = psi / hh - 1 / fact          # ψ_{j+1} = ψ_j/ĥ − 1/j!
            b.append(fact * psi / b_h)
            fact *= j + 1
        R = torch.tensor([[r ** j for r in rks] for j in range(len(rks))], dtype=torch.float64)
        rhos = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
    return x_t - alpha_t * b_h * sum(rho * d for rho, d in zip(rhos, ds))


@torch.inference_mode()
def unipc(denoiser: Denoiser, x_T: Tensor, grid: Grid, noise: SampleNoise | None,
          progress: Callable[[int, int], None] | None = None, *, order: int, variant: str) -> Tensor:
    """UniPC from x_T (B, C, H, W) through the points of ``grid`` (one network call each but the end);
    returns the samples (B, C, H, W).

    ``order`` 1–3 is the predictor order p (UniC-p raises the accuracy to p + 1); ``variant`` picks B(h).
    ``noise`` is unused (the solver is deterministic).
    """
    alpha, sigma, lam, n = grid.alpha, grid.sigma, grid.lam, grid.steps
    x, outputs, x_last, p_last = x_T, [], None, 0
    for i in range(n):
        m = predict_at(denoiser, x, grid, i).x0
        if sigma[i + 1] == 0:
            x = m  # the step to σ = 0 returns the data prediction
        else:
            if i > 0:  # UniC-p: correct x_i with m, the output the predictor below needs anyway
                x = uni_bh_update(x_last, outputs[-p_last:], lam[i - p_last:i], lam[i], alpha[i], sigma[i],
                                  sigma[i - 1], variant, m_t=m)
            outputs = (outputs + [m])[-order:]
            p = step_order(order, i, n, lower_final=True)
            x_last, p_last = x, p
            x = uni_bh_update(x, outputs[-p:], lam[i - p + 1:i + 1], lam[i + 1], alpha[i + 1], sigma[i + 1],
                              sigma[i], variant)
        if progress is not None:
            progress(i + 1, n)
    return x

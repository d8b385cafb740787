"""What the multistep solvers (DPM-Solver, UniPC) share: a prediction at a grid point and the order of a step."""

from __future__ import annotations

from torch import Tensor

from debias.solvers.denoiser import Denoiser, Prediction
from debias.solvers.grid import Grid


def predict_at(denoiser: Denoiser, x: Tensor, grid: Grid, i: int) -> Prediction:
    """The denoiser's predictions at x (B, C, H, W) on point i of ``grid``."""
    return denoiser(x, grid.model_timesteps(i, x), grid.alpha[i], grid.sigma[i])


def step_order(order: int, i: int, n: int, lower_final: bool) -> int:
    """Order of step i of n: warm-up (≤ i + 1) and, with ``lower_final``, lower final steps (≤ n − i)."""
    return min(order, i + 1, n - i) if lower_final else min(order, i + 1)

"""Post-hoc EMA: EDM2's power-function EMA profiles, tracked while training and recombined after it.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", §3 and App. C).
A power-function EMA of exponent γ holds, at step t, the average of the weights θ_τ (τ ≤ t) under

    p_t(τ) = (γ + 1) τ^γ / t^{γ+1},        σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3))          (eq. 123)

its width relative to its length; γ from σ_rel is the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ
+ (12 − σ_rel⁻²) (eq. 126, Algorithm 2). It is tracked with θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t,
β_t = (1 − 1/t)^{γ+1} (eq. 127), t counting updates from 1.

Training keeps two profiles (``train.phema_std``, EDM2's 0.05 and 0.10) and writes both every
``train.phema_every`` steps (``phema/phema-<step>.pt``). Any other σ_rel at a step t is then the
least-squares combination of the stored profiles: with the inner products ⟨p_a, p_b⟩ of profiles
(eq. 151), solve A x = b (A between the stored ones, b with the wanted one, Algorithm 3), normalise x
to sum 1, and average the stored weights with x — no retraining (:mod:`debias.posthoc` does it on the
files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from debias.catalog import PHEMA_STD_MAX
from debias.errors import DebiasError

PHEMA_DIR = "phema"  # the folder of a run's profile snapshots, phema-<step>.pt, beside its checkpoint or model



def exp_to_std(exp: float) -> float:
    """σ_rel of exponent γ (eq. 123)."""
    return float(np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3)))


def std_to_exp(std: float) -> float:
    """Exponent γ of σ_rel ∈ (0, PHEMA_STD_MAX) (eq. 126)."""
    check_std(std)
    t = std ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def check_std(std: float) -> float:
    """``std`` as a float if it is a valid σ_rel, else a DebiasError line."""
    if isinstance(std, bool) or not (isinstance(std, (int, float)) and 0 < std < PHEMA_STD_MAX):
        raise DebiasError(f"an EMA length σ_rel must be a number in (0, {PHEMA_STD_MAX:.4f}), got {std!r}")
    return float(std)


def profile_key(std: float) -> str:
    """The name of profile σ_rel among a checkpoint's EMAs, e.g. ``phema-0.05`` (exact: σ_rel reads back)."""
    return f"phema-{float(std)!r}"


def beta(std: float) -> Callable[[int], float]:
    """k (0-based update) → the decay β_{k+1} = (1 − 1/(k + 1))^{γ+1} of profile σ_rel (eq. 127)."""
    exp = std_to_exp(std)
    return lambda k: (1.0 - 1.0 / (k + 1)) ** (exp + 1)


def correlation(a_step: np.ndarray, a_exp: np.ndarray, b_step: np.ndarray, b_exp: np.ndarray) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of power-function profiles ending at steps a, b (eq. 151)."""
    ratio = a_step / b_step
    power = np.where(a_step < b_step, b_exp, -a_exp)
    return (a_exp + 1) * (b_exp + 1) * ratio ** power / ((a_exp + b_exp + 1) * np.maximum(a_step, b_step))


def coefficients(steps: Sequence[int], stds: Sequence[float], step: int, std: float) -> np.ndarray:
    """Weights x (n,) of stored profiles (steps[i], stds[i]) whose combination is closest, in L², to
    profile σ_rel ``std`` at ``step`` (Algorithm 3); they sum to 1."""
    s = np.asarray(steps, dtype=np.float64)
    e = np.array([std_to_exp(v) for v in stds])
    A = correlation(s[:, None], e[:, None], s[None, :], e[None, :])
    b = correlation(s, e, np.float64(step), np.float64(std_to_exp(std)))
    x = np.linalg.solve(A, b)
    return x / x.sum()

"""Conversions between the three prediction targets, given x_t = α x0 + σ ε.

- ``eps``: the noise ε;  ``x0``: the clean image;  ``v`` = α ε − σ x0 (Salimans & Ho 2022).
Since α² + σ² = 1:  x0 = α x_t − σ v,  ε = σ x_t + α v,  x0 = (x_t − σ ε)/α,  ε = (x_t − α x0)/σ.
``alpha`` and ``sigma`` broadcast against the images (e.g. (B, 1, 1, 1)).
"""

from __future__ import annotations

from torch import Tensor

TARGETS = ("eps", "x0", "v")


def check_target(target: str) -> str:
    """Return ``target`` if it is known, else raise ValueError naming the allowed values."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


def x0_from(target: str, pred: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The x0 implied by a prediction of ``target``."""
    if target == "eps":
        return (xt - sigma * pred) / alpha
    if target == "x0":
        return pred
    if target == "v":
        return alpha * xt - sigma * pred
    raise ValueError(f"unknown target {target!r}")


def eps_from(target: str, pred: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The ε implied by a prediction of ``target``."""
    if target == "eps":
        return pred
    if target == "x0":
        return (xt - alpha * pred) / sigma
    if target == "v":
        return sigma * xt + alpha * pred
    raise ValueError(f"unknown target {target!r}")


def target_from(target: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of kind ``target`` for a clean image x0 and its noise ε."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        return alpha * eps - sigma * x0
    raise ValueError(f"unknown target {target!r}")



def x0_and_eps(target: str, pred: Tensor, xt: Tensor, alpha: Tensor, sigma: Tensor,
               clip_x0: bool) -> tuple[Tensor, Tensor]:
    """x̂0 implied by a prediction of ``target`` (clamped to [-1, 1] when ``clip_x0``) and the ε̂ that
    goes with it: re-derived from x̂0, except for an unclipped ε-prediction, which is ε̂ itself."""
    x0 = x0_from(target, pred, xt, alpha, sigma)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    eps = eps_from("x0", x0, xt, alpha, sigma) if (clip_x0 or target != "eps") else pred
    return x0, eps

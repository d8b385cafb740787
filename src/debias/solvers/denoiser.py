"""The network as every solver sees it: x_t and a noise level in, x̂0 and ε̂ (and the variance) out.

A :class:`Denoiser` owns what turns a raw network output into predictions — the prediction target
(ε, x0 or v), the learned-variance channels, clipping of x̂0, and the class labels of the batch —
so that the solvers only do their update arithmetic (k-diffusion's ``model(x, sigma) -> denoised``
split). The solver supplies α and σ of the point it evaluates (from its respaced chain or grid, in
float64), so each solver keeps exactly the coefficients its equations use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from debias.diffusion import targets
from debias.diffusion.reverse import split_output
from debias.diffusion.schedule import Schedule


@dataclass(frozen=True)
class Prediction:
    """What the network says about x_t, each (B, C, H, W): x̂0 (clipped if asked), ε̂, and the
    learned-variance values v ∈ [-1, 1] (None for a fixed-variance model)."""

    x0: Tensor
    eps: Tensor
    var: Tensor | None


class Denoiser:
    """``network(x, t, y)`` → (B, C or 2C, H, W) predicting ``target``, as predictions of x0 and ε.

    Args:
        network: the model; called with x (B, C, H, W), model timesteps t (B,) and ``labels`` (B,) or None.
        schedule: the full training chain (solvers derive their timesteps and coefficients from it).
        target: what the network predicts: ``eps``, ``x0`` or ``v``.
        learn_sigma: the network has 2C output channels, the second half the variance values.
        clip_x0: clamp x̂0 to [-1, 1] (ε̂ is then re-derived from the clamped x̂0).
        labels: class labels (B,) of the batch for a class-conditional network, else None.
        formulas: ``debias`` (:func:`~debias.diffusion.targets.x0_and_eps`) or ``guided-diffusion``
            (:func:`~debias.diffusion.targets.predictions`, the original's arithmetic).
    """

    def __init__(self, network: Callable, schedule: Schedule, target: str, learn_sigma: bool,
                 clip_x0: bool = True, labels: Tensor | None = None, formulas: str = "debias"):
        self.network, self.schedule, self.target = network, schedule, targets.check_target(target)
        self.learn_sigma, self.clip_x0, self.labels, self.formulas = learn_sigma, clip_x0, labels, formulas

    def __call__(self, x: Tensor, t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Prediction:
        """Predictions at x (B, C, H, W) = α x0 + σ ε, the network conditioned on timesteps ``t`` (B,);
        ``alpha`` and ``sigma`` (numbers, or float64 broadcasting against x) are α and σ there."""
        pred, var = split_output(self.network(x, t, self.labels), x.shape[1], self.learn_sigma)
        if self.formulas == "guided-diffusion":
            x0, eps = targets.predictions(self.target, pred, x, alpha, sigma, self.clip_x0)
        else:
            if isinstance(alpha, Tensor):  # coefficients in float64, applied in x's dtype
                alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
            x0, eps = targets.x0_and_eps(self.target, pred, x, alpha, sigma, self.clip_x0)
        return Prediction(x0, eps, var)

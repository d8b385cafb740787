"""The training objective as one callable: what a training step minimises, given a network and a batch.

    L = E_{t ~ p, ε ~ N(0, I)} [ w(t) c(t) · ‖target(x0, ε, t) − net(x_t, t)‖² (/e^{u(t)} + u(t)) + L_vb ],
    x_t = α_t x0 + σ_t ε

with p the timestep density (:mod:`debias.diffusion.densities`), w the weight table of the recipe
(:mod:`debias.diffusion.weighting`), c(t) = 1/(T p(t)) with ``loss.importance_correction`` (densities.py,
eq. 1) and, for ``weighting: learned``, the log-variance u(t) of the uncertainty head that the network
module carries (:class:`debias.diffusion.uncertainty.WithUncertainty`). Like EDM2's loss class it owns
the schedule, the weights and the draws of t and ε, so the training loop keeps only the optimizer,
mixed precision, the EMA and the logs.

Timesteps and noise are drawn for the whole global batch from their own generators and sliced to this
rank's part (``micro``), so N processes draw exactly what one process draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from debias.config import Config
from debias.diffusion.densities import TimestepDensity
from debias.diffusion.losses import LossTerms, diffusion_loss
from debias.diffusion.schedule import Schedule
from debias.diffusion.weighting import weight_table

Network = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def recipe_weight_table(cfg: Config, schedule: Schedule) -> Tensor:
    """The recipe's weights (T,) float64 on the target's MSE (:func:`~debias.diffusion.weighting.weight_table`)."""
    return weight_table(cfg.weighting, schedule.snr.cpu(), cfg.target, cfg.loss)


class Objective:
    """``objective(net, x0, labels, generators)`` → per-sample :class:`LossTerms` of this rank's batch.

    Args:
        cfg: the recipe (target, weighting, ``loss``, ``model.learn_sigma``, ``train.batch_size``).
        schedule: the forward process, on the training device.
        density: where t is drawn (:class:`~debias.diffusion.densities.TimestepDensity`).
        micro: this rank's slice of the global batch.
    """

    def __init__(self, cfg: Config, schedule: Schedule, density: TimestepDensity, micro: slice):
        self.schedule, self.density, self.micro = schedule, density, micro
        self.target, self.learn_sigma = cfg.target, cfg.model.learn_sigma
        self.batch_size, self.correct = cfg.train.batch_size, cfg.loss.importance_correction
        self.weight_table = recipe_weight_table(cfg, schedule).to(schedule.alphas_cumprod.device)

    def __call__(self, net: Network, x0: Tensor, labels: Tensor | None,
                 generators: Mapping[str, torch.Generator]) -> tuple[LossTerms, Tensor]:
        """The loss terms (each (b,)) and the timesteps t (b,) of x0 (b, C, H, W), this rank's share of the
        global batch; ``net(x_t, t, labels)`` returns the network output and u(t) (or None)."""
        t = self.density.sample(self.batch_size, generators["timesteps"])[self.micro]
        noise = torch.randn((self.batch_size, *x0.shape[1:]), generator=generators["noise"],
                            device=x0.device)[self.micro]
        out, u = net(self.schedule.q_sample(x0, t, noise), t, labels)
        weights = self.weight_table
        if self.correct:  # E_p[w/(T p) L] = the uniform objective (densities.py, eq. 1)
            correction = self.density.correction()
            weights = weights * correction
        terms = diffusion_loss(self.schedule, out.float(), x0, noise, t, self.target, weights, self.learn_sigma, u)
        if self.density.adaptive:  # loss_second_moment learns from the loss without its correction
            self.density.update(t, terms.loss.detach() / correction[t] if self.correct else terms.loss.detach())
        return terms, t

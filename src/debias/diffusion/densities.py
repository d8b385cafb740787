"""Where training timesteps are drawn: a density p(t) over the discrete chain t = 0..T-1.

How often a noise level is trained (p) and how much its loss counts (the weighting w) are separate
choices. Drawing t ~ p and weighting the loss by w(t) / (T p(t)) is the uniform objective with weight w
in expectation, with another variance (Kingma & Gao 2023, "Understanding Diffusion Objectives", §4):

    E_{t~p}[ w(t) / (T p(t)) · L_t ] = (1/T) Σ_t w(t) L_t                                   (1)

``loss.importance_correction: true`` applies that factor; without it the density is part of the recipe
(e.g. EDM trains with its log-normal density and no correction).

The continuous densities are over log-SNR λ = log(ᾱ/(1-ᾱ)) and are mapped to the chain by the mass of
the λ-interval each discrete step owns (edges halfway between neighbouring λ_t, the ends open), so the
pmf sums to one exactly whatever the schedule:

- ``lognormal``: ln σ ~ N(P_mean, P_std²) as EDM (Karras et al. 2022, Table 1: P_mean = -1.2,
  P_std = 1.2); with σ² = 1/SNR, λ = -2 ln σ ~ N(-2 P_mean, (2 P_std)²). ``loc``/``scale`` give λ's.
- ``logistic``: ln σ ~ Logistic(loc, scale) as k-diffusion's ``rand_log_logistic``; over λ likewise.
- ``laplace``: λ ~ Laplace(μ, b), the log-SNR density of Hang et al. 2024 ("Improved Noise Schedule
  for Diffusion Training", their μ = 0, b = 0.5).
- ``loss_second_moment``: guided-diffusion's ``LossSecondMomentResampler`` (Nichol & Dhariwal 2021,
  §3.3): p(t) ∝ sqrt(E[L_t²]) over the last 10 losses seen at each t, mixed with 0.1 % uniform; uniform
  until every t has 10 losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from debias.catalog import TIMESTEP_DENSITIES, check_registry
from debias.runtime import Ranks, all_gathered

# λ's (loc, scale) when train.timestep_loc / timestep_scale are null
DEFAULTS = {"lognormal": (2.4, 2.4), "logistic": (2 * math.log(2.0), 1.0), "laplace": (0.0, 0.5)}
HISTORY = 10        # losses kept per timestep (guided-diffusion's history_per_term)
UNIFORM_MIX = 1e-3  # its uniform_prob


def _normal_cdf(x: Tensor, loc: float, scale: float) -> Tensor:
    return 0.5 * (1 + torch.erf((x - loc) / (scale * math.sqrt(2))))


def _logistic_cdf(x: Tensor, loc: float, scale: float) -> Tensor:
    return torch.sigmoid((x - loc) / scale)


def _laplace_cdf(x: Tensor, loc: float, scale: float) -> Tensor:
    z = (x - loc) / scale
    return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1 - 0.5 * torch.exp(-z.clamp(min=0)))


CDFS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "lognormal": _normal_cdf, "logistic": _logistic_cdf, "laplace": _laplace_cdf}


def log_snr_pmf(name: str, log_snr: Tensor, loc: float | None = None, scale: float | None = None) -> Tensor:
    """The pmf (T,) float64 over the chain of a continuous log-SNR density: each t gets the density's mass
    on the λ-interval between the midpoints to its neighbours (``log_snr`` (T,) decreasing in t)."""
    default_loc, default_scale = DEFAULTS[name]
    loc, scale = (default_loc if loc is None else loc), (default_scale if scale is None else scale)
    lam = log_snr.double()
    edges = torch.cat([lam.new_tensor([math.inf]), (lam[1:] + lam[:-1]) / 2, lam.new_tensor([-math.inf])])
    cdf = CDFS[name](edges, loc, scale)
    mass = (cdf[:-1] - cdf[1:]).clamp(min=0)
    return mass / mass.sum()


class TimestepDensity:
    """Draws the timesteps of a training batch and the factor 1/(T p(t)) of eq. (1).

    ``pmf()`` is p (T,) float64 at this moment; ``sample(n, generator)`` draws n timesteps (int64);
    ``update(t, losses)`` feeds this rank's per-sample losses to an adaptive density (all ranks call it);
    ``state()`` / ``load_state()`` carry its history in a checkpoint."""

    def __init__(self, name: str, log_snr: Tensor, device: torch.device, ranks: Ranks,
                 loc: float | None = None, scale: float | None = None):
        self.name, self.ranks, self.num_timesteps = name, ranks, len(log_snr)
        self.device, self.adaptive = device, name == "loss_second_moment"
        T = self.num_timesteps
        if name == "uniform":
            self._pmf = torch.full((T,), 1.0 / T, dtype=torch.float64, device=device)
        elif name == "loss_second_moment":  # the history lives on the CPU: its updates never wait on a GPU
            self.history = torch.zeros(T, HISTORY, dtype=torch.float64)
            self.counts = torch.zeros(T, dtype=torch.int64)
            self._pmf = None
        else:
            self._pmf = log_snr_pmf(name, log_snr, loc, scale).to(device)

    def pmf(self) -> Tensor:
        if self._pmf is not None:
            return self._pmf
        T = self.num_timesteps
        if bool((self.counts < HISTORY).any()):  # warm-up: uniform until every t has its history
            return torch.full((T,), 1.0 / T, dtype=torch.float64, device=self.device)
        weights = self.history.pow(2).mean(dim=1).sqrt()
        weights = weights / weights.sum() * (1 - UNIFORM_MIX)
        return (weights + UNIFORM_MIX / T).to(self.device)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        if self.name == "uniform":  # exactly the draws of a run before densities existed
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=self.device)
        return torch.multinomial(self.pmf(), n, replacement=True, generator=generator)

    def correction(self) -> Tensor:
        """1/(T p(t)) (T,) float32: the factor that makes the expected objective the uniform one, eq. (1)."""
        return (1.0 / (self.num_timesteps * self.pmf())).float()

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the losses (b,) seen at t (b,) on every rank, oldest first out (loss_second_moment)."""
        if not self.adaptive:
            return
        t = all_gathered(t, self.ranks).cpu()
        losses = all_gathered(losses.detach().double(), self.ranks).cpu()
        order = torch.argsort(t, stable=True)  # each t's losses in batch order, as guided-diffusion adds them
        seen, per_t = torch.unique_consecutive(t[order], return_counts=True)
        for ti, new in zip(seen.tolist(), torch.split(losses[order], per_t.tolist())):
            kept = torch.cat([self.history[ti, :int(self.counts[ti])], new])[-HISTORY:]  # oldest out first
            self.history[ti, :len(kept)] = kept
            self.counts[ti] = len(kept)

    def state(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()} if self.adaptive else {}

    def load_state(self, state: dict) -> None:
        if self.adaptive:
            self.history.copy_(state["history"])
            self.counts.copy_(state["counts"])


DENSITIES = ("uniform", *CDFS, "loss_second_moment")
check_registry(DENSITIES, TIMESTEP_DENSITIES, "timestep density")

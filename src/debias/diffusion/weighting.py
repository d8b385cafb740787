"""Loss weightings as small pure functions of SNR — the weight w(SNR) on the ε-space MSE.

The paper (Yu et al., ECCV 2024, §4) writes every objective as E_t[w(t) ‖ε − ε̂‖²]. A network that
predicts another target is trained on the same objective expressed in its own space, using
‖ε − ε̂‖² = SNR·‖x0 − x̂0‖² and ‖v − v̂‖² = (1 + SNR)·‖x0 − x̂0‖²:

    w_x0 = w · SNR,    w_v = w · SNR / (1 + SNR).

``constant`` is the one exception: unit weight on the chosen target's own MSE (the "simple" loss
of DDPM for ε, and the plain x0-/v-MSE baselines of the paper).

``learned`` is EDM2's uncertainty weighting (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", §5 "Loss weighting"): the base weighting ``loss.learned_base`` as w here,
divided in the loss by e^{u(t)} of a jointly trained head (:mod:`debias.diffusion.uncertainty`).

``weight_space: target`` repeats the original code literally instead: it multiplies the chosen
target's own MSE by w(SNR) unchanged, which in ε-space is the weight w/SNR for x0 and
w·(1 + SNR)/SNR for v (the same as ``eps`` for an ε-model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from debias import catalog
from debias.catalog import check_registry
from debias.config import WeightingParams
from debias.diffusion.targets import check_target


def constant(snr: Tensor, p: WeightingParams) -> Tensor:
    """w = 1: the plain MSE of the chosen target (Ho et al. 2020, L_simple, eq. 14)."""
    return torch.ones_like(snr)


def p2(snr: Tensor, p: WeightingParams) -> Tensor:
    """Perception-prioritized weighting, w = 1/(k + SNR)^γ (Choi et al. 2022, eq. 8)."""
    return 1.0 / (p.p2_k + snr) ** p.p2_gamma


def min_snr(snr: Tensor, p: WeightingParams) -> Tensor:
    """Min-SNR-γ, w = min(SNR, γ)/SNR = min(1, γ/SNR) on the ε-MSE (Hang et al. 2023, eq. 9)."""
    return torch.clamp(p.min_snr_gamma / snr, max=1.0)


def snr_weight(snr: Tensor, p: WeightingParams) -> Tensor:
    """w = 1/SNR, which is exactly the unweighted x0-MSE."""
    return 1.0 / snr


def debias(snr: Tensor, p: WeightingParams) -> Tensor:
    """The paper's debiased weighting, w = 1/√SNR (Yu et al. 2024, eq. 14)."""
    return 1.0 / snr.sqrt()


def max_snr(snr: Tensor, p: WeightingParams) -> Tensor:
    """Truncated SNR, L = max(SNR, 1)·‖x0 − x̂0‖² (Salimans & Ho 2022, §4), i.e. w = max(1, 1/SNR)."""
    return torch.clamp(1.0 / snr, min=1.0)


def sigmoid(snr: Tensor, p: WeightingParams) -> Tensor:
    """Sigmoid weighting, w = sigmoid(b − log SNR) on the ε-MSE (Kingma & Gao 2023, §5, eq. 19)."""
    return torch.sigmoid(p.sigmoid_bias - snr.log())


def edm(snr: Tensor, p: WeightingParams) -> Tensor:
    """EDM's λ(σ) = (σ² + σ_d²)/(σ σ_d)² on the x0-MSE with σ² = 1/SNR (Karras et al. 2022, Table 1),
    i.e. on the ε-MSE w = λ(σ)/SNR = 1 + 1/(σ_d² SNR)."""
    return 1.0 + 1.0 / (p.edm_sigma_data ** 2 * snr)


def learned(snr: Tensor, p: WeightingParams) -> Tensor:
    """EDM2's uncertainty weighting: the base weighting ``p.learned_base`` here; the loss divides it by the
    learned e^{u(t)} and adds u(t) (:func:`debias.diffusion.losses.diffusion_loss`)."""
    return WEIGHTINGS[base_weighting("learned", p)](snr, p)


WEIGHTINGS: dict[str, Callable[[Tensor, WeightingParams], Tensor]] = {
    "constant": constant,
    "p2": p2,
    "min_snr": min_snr,
    "snr": snr_weight,
    "debias": debias,
    "max_snr": max_snr,
    "sigmoid": sigmoid,
    "edm": edm,
    "learned": learned,
}
check_registry(WEIGHTINGS, catalog.WEIGHTINGS, "weighting")

WEIGHT_SPACES = catalog.WEIGHT_SPACES


def check_weighting(name: str) -> str:
    """Return ``name`` if it is a known weighting, else raise ValueError naming the allowed values."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
    return name


def base_weighting(name: str, params: WeightingParams) -> str:
    """The fixed weighting behind ``name``: ``params.learned_base`` for ``learned``, else ``name``."""
    if name != "learned":
        return name
    if params.learned_base not in WEIGHTINGS or params.learned_base == "learned":
        raise ValueError(f"loss.learned_base must be a fixed weighting, got {params.learned_base!r}")
    return params.learned_base


def eps_weight(name: str, snr: Tensor, params: WeightingParams = WeightingParams()) -> Tensor:
    """w(SNR) on the ε-space MSE, same shape and dtype as ``snr``."""
    return WEIGHTINGS[check_weighting(name)](snr, params)


def target_weight(name: str, snr: Tensor, target: str, params: WeightingParams = WeightingParams()) -> Tensor:
    """The weight applied to the MSE of ``target``: the one that makes the objective w(SNR)·‖ε − ε̂‖², or
    w(SNR) itself with ``params.weight_space == "target"`` (the original's literal weighting)."""
    check_target(target)
    w = eps_weight(name, snr, params)
    if base_weighting(name, params) == "constant" or target == "eps" or params.weight_space == "target":
        return w
    if target == "x0":
        return w * snr
    return w * snr / (1.0 + snr)


def weight_table(name: str, snr: Tensor, target: str, params: WeightingParams = WeightingParams()) -> Tensor:
    """Per-timestep weight table (T,) for training, float64.

    With ``params.normalize`` the applied weight is divided by its mean over the uniformly sampled
    timesteps, so a recipe's loss has the scale of the plain MSE; the paper does not normalize
    (debias has mean ≈ 17.8 on the 1000-step linear schedule).
    """
    w = target_weight(name, snr.to(torch.float64), target, params)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weighting {name!r} is not finite on this schedule")
    return w / w.mean() if params.normalize else w


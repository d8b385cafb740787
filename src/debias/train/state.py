"""The training state that is not the optimizer's: the random streams and the EMAs.

Every random draw comes from an explicit generator whose state is checkpointed (and the data order is a
function of (seed, step), :mod:`debias.data.order`), so a resumed run draws exactly what an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from debias.data.order import stream_seed
from debias.errors import DebiasError
from debias.phema import beta, profile_key


STREAMS = {"timesteps": 1, "noise": 2, "flip": 3}


def make_generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    return {name: torch.Generator(device).manual_seed(stream_seed(seed, k)) for name, k in STREAMS.items()}


class EMA:
    """Moving averages of a model's parameters, one per named decay schedule β(k) of update k (0-based):
    θ̂ ← β θ̂ + (1 − β) θ after every update (:func:`ema_decays` for ``train.ema``)."""

    def __init__(self, model: nn.Module, decays: dict[str, Callable[[int], float]]):
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.decays = decays
        self.shadows = {key: [p.detach().clone() for p in self.params] for key in decays}

    @torch.no_grad()
    def update(self, k: int) -> None:
        current = [p.detach() for p in self.params]
        for key, shadow in self.shadows.items():
            torch._foreach_lerp_(shadow, current, 1.0 - self.decays[key](k))

    def state_dicts(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        """{name: full model state dict with the averaged parameters} (CPU tensors)."""
        base = cpu_state(model)
        return {rate: {**base, **{n: s.detach().cpu() for n, s in zip(self.names, shadow)}}
                for rate, shadow in self.shadows.items()}

    @torch.no_grad()
    def load(self, states: dict[str, dict[str, Tensor]]) -> None:
        missing = set(self.shadows) - set(states)
        if missing:
            raise DebiasError(f"checkpoint has no EMA {sorted(missing)[0]}")
        for rate, shadow in self.shadows.items():
            torch._foreach_copy_(shadow, [states[rate][n] for n in self.names])


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as detached CPU tensors."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def ema_decays(kind: str, rates: list[float], warmup: bool, stds: list[float]) -> dict[str, Callable[[int], float]]:
    """The EMAs of ``train.ema``: ``traditional`` — one per rate (named by it, e.g. "0.999"), with warm-up
    β_k = min(rate, (1 + k)/(10 + k)) so short runs get a useful average; ``phema`` — EDM2's power-function
    profiles of σ_rel ``stds`` (:mod:`debias.phema`, named e.g. "phema-0.05")."""
    if kind == "phema":
        return {profile_key(std): beta(std) for std in stds}
    return {str(rate): (lambda k, r=rate: min(r, (1 + k) / (10 + k))) if warmup else (lambda k, r=rate: r)
            for rate in rates}

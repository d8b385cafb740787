"""The training state that is not the optimizer's: random streams, the data order, and the EMAs.

Every random draw comes from an explicit generator whose state is checkpointed, and the data order
is a per-epoch permutation seeded by (seed, epoch), so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from debias.errors import DebiasError
from debias.phema import beta, profile_key


def stream_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for random stream ``stream`` of run ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


STREAMS = {"timesteps": 1, "noise": 2, "flip": 3}


def make_generators(seed: int, device: torch.device) -> dict[str, torch.Generator]:
    return {name: torch.Generator(device).manual_seed(stream_seed(seed, k)) for name, k in STREAMS.items()}


class DataOrder:
    """Global batches of dataset indices.

    Step k takes positions k·B … k·B + B − 1 of the endless concatenation of per-epoch permutations;
    epoch e's permutation comes from a generator seeded by (seed, e). The order therefore depends
    only on (seed, step), which makes resuming exact without any state of its own.
    """

    def __init__(self, size: int, batch_size: int, seed: int, device: torch.device):
        self.size, self.batch_size, self.seed, self.device = size, batch_size, seed, device
        self._cache: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, 1000 + epoch))
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.size, generator=gen).to(self.device)
        return self._cache[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of the first sample of step ``step``."""
        return divmod(step * self.batch_size, self.size)

    def batch(self, step: int) -> Tensor:
        """Indices (B,) int64 of step ``step`` (0-based), on the order's device."""
        start, parts, left = step * self.batch_size, [], self.batch_size
        while left:
            epoch, offset = divmod(start, self.size)
            part = self.permutation(epoch)[offset:offset + left]
            parts.append(part)
            start, left = start + len(part), left - len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


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

"""The data order of a training run: a function of (seed, step) only."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def stream_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for random stream ``stream`` of run ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


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

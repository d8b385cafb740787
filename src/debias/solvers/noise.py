"""Per-sample randomness: sample ``i`` of a run with seed ``s`` draws only from its own generator.

Each sample owns a ``torch.Generator`` seeded from a hash of (stream, seed, index), so its initial
noise, every later noise draw and its class label depend only on (seed, i) — never on the batch
size, the batch a sample lands in, or how many processes share the work. Draws are made on the CPU
and then moved, so the same seed gives the same numbers on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor


def sample_seed(seed: int, index: int, stream: str = "noise") -> int:
    """A 63-bit generator seed for sample ``index`` of run ``seed`` (independent per ``stream``)."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SampleNoise:
    """Standard normal draws, one independent stream per sample.

    ``draw()`` returns the next (B, *shape) draw, row b coming from sample ``indices[b]``'s generator.
    The first draw is x_T; stochastic samplers call ``draw()`` once per step after that.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.indices = [int(i) for i in indices]
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self._generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def draw(self) -> Tensor:
        """The next draw for every sample, (B, *shape)."""
        rows = [torch.randn(self.shape, generator=g) for g in self._generators]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)


def sample_labels(seed: int, indices: Sequence[int], num_classes: int) -> Tensor:
    """A uniformly random class label per sample, (B,) int64, depending only on (seed, index)."""
    labels = [torch.randint(num_classes, (), generator=torch.Generator().manual_seed(sample_seed(seed, i, "label")))
              for i in indices]
    return torch.stack(labels) if labels else torch.zeros(0, dtype=torch.int64)

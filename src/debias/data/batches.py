"""The batches of a training run, by step: this rank's share of global batch k as floats on the device.

The order is :class:`DataOrder`'s, a function of (seed, step) only, so a resumed run reads exactly what an
uninterrupted one reads. Two ways to hold the set, the same batches bit for bit:

- in memory (:class:`InMemoryBatches`): the whole set as float32, on the device when it fits — the fastest
  path for the small sets of a laptop;
- streamed (:class:`StreamedBatches`): uint8 rows read by index from the prepared array
  (:meth:`debias.data.prepared.PreparedSet.read_rows`) by worker threads a few steps ahead, moved to the
  device and converted to float there. Memory per process is a few batches whatever the set's size, and
  every process of a node reads the one copy of the pixels in the page cache.

``train.data_loading``: ``memory``, ``stream``, or ``auto`` — on a GPU, the whole set on the device when its
float32 copy takes at most :data:`IN_MEMORY_BYTES` (there it saves the host-to-device copy of every batch),
else streamed: on a CPU both paths run at the same speed (benchmarks/BENCHMARKS.md), and streaming keeps each
process's memory flat. A set given as floats, not as a prepared array, is always in memory.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from debias.data.order import DataOrder
from debias.data.prepared import PreparedSet
from debias.data.sets import ImageDataset
from debias.images import from_uint8

IN_MEMORY_BYTES = 2**31  # float32 bytes up to which a set is held whole (on the device: the old rule)


class InMemoryBatches:
    """The whole set as float32 on the device if it fits in :data:`IN_MEMORY_BYTES`, else on the CPU."""

    def __init__(self, images: Tensor, labels: Tensor | None, seed: int, batch_size: int, micro: slice,
                 device: torch.device):
        home = device if images.element_size() * images.nelement() <= IN_MEMORY_BYTES else torch.device("cpu")
        self.images, self.device, self.micro = images.to(home), device, micro
        self.labels = None if labels is None else labels.to(home)
        self.order = DataOrder(len(images), batch_size, seed, home)
        self.waited = 0.0

    def get(self, k: int) -> tuple[Tensor, Tensor | None]:
        """x0 (b, C, H, W) float32 on the device and labels (b,) or None: this rank's share of global batch k."""
        idx = self.order.batch(k)[self.micro]
        y = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
        return self.images[idx].to(self.device, non_blocking=True), y

    def close(self) -> None:
        pass


class StreamedBatches:
    """uint8 rows of ``data`` read by ``workers`` threads ``ahead`` steps ahead of the step that needs them (0
    workers: read in the training thread); :attr:`waited` counts the seconds the training thread waited for them."""

    def __init__(self, data: PreparedSet, labels: Tensor | None, seed: int, batch_size: int, micro: slice,
                 device: torch.device, workers: int, ahead: int = 2):
        self.data, self.labels, self.micro, self.device = data, labels, micro, device
        self.order = DataOrder(len(data), batch_size, seed, torch.device("cpu"))
        self.pin = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers else None
        self.ahead = ahead if workers else 0
        self.pending: dict[int, Future] = {}
        self.waited = 0.0

    def _read(self, idx: Tensor) -> Tensor:
        rows = self.data.read_rows(idx)  # pread releases the GIL
        return rows.pin_memory() if self.pin else rows

    def _schedule(self, k: int) -> Future | None:
        if self.pool is None:
            return None
        if k not in self.pending:
            self.pending[k] = self.pool.submit(self._read, self.order.batch(k)[self.micro])
        return self.pending[k]

    def get(self, k: int) -> tuple[Tensor, Tensor | None]:
        """x0 (b, C, H, W) float32 on the device and labels (b,) or None: this rank's share of global batch k."""
        for upcoming in range(k, k + self.ahead + 1):
            self._schedule(upcoming)
        began = time.perf_counter()
        future = self.pending.pop(k, None)
        rows = future.result() if future is not None else self._read(self.order.batch(k)[self.micro])
        self.waited += time.perf_counter() - began
        for stale in [step for step in self.pending if step < k]:  # a restart at another step
            self.pending.pop(stale).cancel()
        idx = self.order.batch(k)[self.micro]
        y = None if self.labels is None else self.labels[idx].to(self.device, non_blocking=True)
        return from_uint8(rows.to(self.device, non_blocking=True)), y

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def training_batches(data: ImageDataset | PreparedSet, labels: Tensor | None, loading: str, seed: int, batch_size: int,
                     micro: slice, device: torch.device, workers: int) -> InMemoryBatches | StreamedBatches:
    """The batches of the images of ``data`` with ``labels`` (N,) (None: unconditional) for ``train.data_loading`` =
    ``loading``, ``train.num_workers`` = ``workers`` (see the module docstring)."""
    if isinstance(data, ImageDataset):
        return InMemoryBatches(data.images, labels, seed, batch_size, micro, device)
    fits = 4 * math.prod(data.image_shape) * len(data) <= IN_MEMORY_BYTES
    if loading == "memory" or (loading == "auto" and device.type == "cuda" and fits):
        return InMemoryBatches(from_uint8(data.pixels()), labels, seed, batch_size, micro, device)
    return StreamedBatches(data, labels, seed, batch_size, micro, device, workers)

"""Where and how a job runs: devices, precision, speed options, and the processes of a torchrun job.

One policy for training, sampling, FID and analysis:

- devices: ``cpu``, ``cuda`` (this process's GPU, ``LOCAL_RANK``), ``cuda:N`` or ``auto`` (CUDA when
  available, else the CPU) — :func:`resolve_device`;
- precision: ``fp32`` (TF32 matmuls and convolutions on CUDA), ``bf16`` or ``fp16`` autocast —
  :func:`autocast_dtype`; a network on CUDA runs channels-last — :func:`prepare_network`;
- processes: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins one process group (NCCL on
  CUDA, gloo on the CPU) — :func:`processes`; work is split into contiguous, balanced shards and
  gathered back in order — :func:`shard_bounds`, :func:`gather_shards` — so N processes give what one
  process gives; a job started by hand on a multi-GPU node relaunches itself under torchrun —
  :func:`relaunch_on_all_gpus` — on every visible GPU, or on its share of them (:mod:`debias.gpus`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from debias.catalog import PRECISIONS, check_registry
from debias.errors import DebiasError
from debias.gpus import claim_gpus

log = logging.getLogger(__name__)

# precision name -> autocast dtype (None: plain float32)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
check_registry(AUTOCAST_DTYPES, PRECISIONS, "precision")


# --------------------------------------------------------------------------- devices and precision

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (GPU ``local_rank``), ``cuda:N`` or ``auto`` as a usable device; DebiasError otherwise."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DebiasError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DebiasError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise DebiasError(f"device {name!r} requested but no CUDA device is available")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise DebiasError(f"CUDA device {index} requested but only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", index)


def autocast_dtype(precision: str, device: torch.device, *, fallback: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32).

    fp16 needs CUDA. Elsewhere it is an error, or with ``fallback`` bf16 and a warning: training
    params travel between machines (``train.devices: auto``), so a run configured for a GPU node still
    trains on a laptop, while a sampling call names its precision for the machine it runs on.
    """
    if precision not in AUTOCAST_DTYPES:
        raise DebiasError(f"unknown precision {precision!r}; choose one of {', '.join(AUTOCAST_DTYPES)}")
    if precision == "fp16" and device.type != "cuda":
        if not fallback:
            raise DebiasError("precision fp16 needs CUDA; use bf16 on the CPU")
        log.warning("warning: precision fp16 needs CUDA; using bf16 autocast on %s", device.type)
        return torch.bfloat16
    return AUTOCAST_DTYPES[precision]


def enable_tf32(device: torch.device) -> None:
    """On CUDA, TF32 matmuls and convolutions for float32 (guided-diffusion's Ampere defaults)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def prepare_network(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` on ``device``; on CUDA channels-last, with TF32 (:func:`enable_tf32`)."""
    network = network.to(device)
    if device.type == "cuda":
        enable_tf32(device)
        network = network.to(memory_format=torch.channels_last)
    return network


def compile_static(fn: Callable) -> Callable:
    """``torch.compile`` with static shapes: a shape change recompiles instead of tracing symbolic
    sizes, which inductor (torch 2.14, CPU, bf16) failed to lower for this UNet ('cannot determine
    truth value of Relational')."""
    return torch.compile(fn, dynamic=False)


class Autocast:
    """``network(x, t, y)`` under ``torch.autocast(dtype)``, returning float32 so the solvers' update
    arithmetic stays in float32."""

    def __init__(self, network: Callable, device: torch.device, dtype: torch.dtype):
        self.network, self.device_type, self.dtype = network, device.type, dtype

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.network(x, t, y).float()


def inference_network(network: Callable, device: torch.device, *, compile: bool = False,
                      precision: str = "fp32") -> Callable:
    """The callable samplers evaluate: ``network`` itself by default (float32), else compiled
    (``compile``, same math up to float reassociation) and/or under bf16/fp16 autocast (``precision``;
    fp16 needs CUDA). tests/test_speed_options.py measures the deviations from float32."""
    dtype = autocast_dtype(precision, device)
    fn = compile_static(network) if compile else network
    return fn if dtype is None else Autocast(fn, device, dtype)


# --------------------------------------------------------------------------- processes

@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of an initialised torch.distributed group, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()


@contextlib.contextmanager
def processes(devices: str) -> Iterator[tuple[Ranks, torch.device]]:
    """This process's ranks and device. Under torchrun (``WORLD_SIZE`` > 1) it joins the process group
    (NCCL on CUDA, gloo on the CPU) unless one exists, and leaves it at the end."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(devices, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        yield Ranks(), device
        return
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device
    finally:
        if owns:
            dist.destroy_process_group()


def shard_sizes(n: int, world: int, unit: int = 1) -> list[int]:
    """Balanced shard sizes of n items over ``world`` ranks, in whole ``unit``s of items (the last unit
    may be short): the first ceil(n / unit) mod world ranks get one unit more."""
    units, last = -(-n // unit), n % unit or unit
    base, extra = divmod(units, world)
    counts = [base + (rank < extra) for rank in range(world)]
    sizes = [count * unit for count in counts]
    if units:
        sizes[max(rank for rank, count in enumerate(counts) if count)] -= unit - last
    return sizes


def shard_bounds(n: int, ranks: Ranks | None = None, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (everything for a single process);
    with ``unit`` the shares are made of whole batches ``[k*unit, (k+1)*unit)``, so that every rank
    processes exactly the batches a single process would."""
    ranks = ranks or Ranks.current()
    sizes = shard_sizes(n, ranks.world, unit)
    start = sum(sizes[:ranks.rank])
    return start, start + sizes[ranks.rank]


def gather_shards(local: Tensor, n: int, device: torch.device, ranks: Ranks | None = None, unit: int = 1) -> Tensor:
    """All ranks' shards (rows of ``local``, this rank's :func:`shard_bounds` of n and ``unit``)
    concatenated in rank order, on the CPU; communicated on ``device`` (NCCL needs CUDA tensors)."""
    ranks = ranks or Ranks.current()
    if ranks.world == 1:
        return local.cpu()
    sizes = shard_sizes(n, ranks.world, unit)
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


def all_gathered(x: Tensor, ranks: Ranks) -> Tensor:
    """Every rank's ``x`` (the same shape on each) concatenated along axis 0 in rank order."""
    if ranks.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ranks.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduced(x: Tensor, ranks: Ranks) -> Tensor:
    """Sum of ``x`` over all ranks (a copy; ``x`` itself is unchanged)."""
    x = x.clone()
    if ranks.world > 1:
        dist.all_reduce(x)
    return x


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(compute: Callable[[], Any], ranks: Ranks, share: bool = True) -> Any:
    """``compute()`` on rank 0, its result broadcast to every rank if ``share`` (else None elsewhere).
    Its DebiasError is raised on every rank, so that no rank waits forever for one that failed."""
    result, error = None, None
    if ranks.main:
        try:
            result = compute()
        except DebiasError as err:
            error = str(err)
    error = broadcast(error, ranks)
    if error is not None:
        raise DebiasError(error)
    return broadcast(result, ranks) if share else result


def relaunch_on_all_gpus(devices: str, args: list[str]) -> None:
    """With ``devices`` cuda/auto and several visible GPUs, replace this process by torchrun running
    ``python <args>`` once per GPU; otherwise (or already under torchrun) return and run here. With
    ``DEBIAS_GPUS_PER_EXPERIMENT`` set, the visible GPUs are those this job claims first (:mod:`debias.gpus`)."""
    if devices == "cpu" or "WORLD_SIZE" in os.environ:
        return
    claim_gpus()
    if not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if gpus > 1:
        os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc-per-node={gpus}", *args])


@contextlib.contextmanager
def on_devices(devices: str, argv: list[str]) -> Iterator[tuple[Ranks, torch.device]]:
    """Run a job on ``devices``: with several visible GPUs (cuda/auto) relaunch this process's command line
    ``python argv`` under torchrun, one process per GPU (:func:`relaunch_on_all_gpus`); then join the process
    group (:func:`processes`) and yield (ranks, this rank's device)."""
    relaunch_on_all_gpus(devices, argv)
    with processes(devices) as (ranks, device):
        yield ranks, device

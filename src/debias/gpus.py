"""GPU shares: several jobs at once on one node, each on GPUs of its own.

With ``DEBIAS_GPUS_PER_EXPERIMENT=N`` in its environment (e.g. that of ``dvc queue start -j K``), a job
that would run on the GPUs first claims N of the visible ones: it locks one file per GPU
(:mod:`debias.locks`) in a folder of this machine, :func:`claim_folder`, waits while fewer than N are
free, and narrows ``CUDA_VISIBLE_DEVICES`` to its claim before CUDA starts — so that it, and the
torchrun it relaunches itself under, see only those. The claim lasts as long as the job (the locks
survive that exec and die with it, however it ends). Without the variable a job takes every visible
GPU, the default; where no GPU is visible it claims none and runs on the CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from debias.errors import DebiasError
from debias.locks import lock_file

log = logging.getLogger(__name__)

GPUS_ENV = "DEBIAS_GPUS_PER_EXPERIMENT"
POLL_SECONDS = 2.0  # how often a job waiting for GPUs looks again
UNSAFE = re.compile(r"[^\w.-]")  # in a GPU's name (an index, a GPU-/MIG- UUID), kept out of its lock file's name


def claim_folder() -> Path:
    """Where the claims live: one lock file per GPU, shared by this user's jobs on this machine (every
    workspace and project) and by nothing beyond it."""
    return Path(tempfile.gettempdir()) / f"debias-gpus-{os.getuid()}"


def gpus_per_experiment() -> int | None:
    """``DEBIAS_GPUS_PER_EXPERIMENT`` as a number of GPUs (None when unset or empty)."""
    value = os.environ.get(GPUS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise DebiasError(f"{GPUS_ENV}={value!r}: give the number of GPUs each experiment takes (1 or more)")
    return int(value)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices when it is unset),
    counted without starting CUDA (torch asks NVML until CUDA is initialised)."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",")[:count] if listed else [str(i) for i in range(count)]


@functools.cache
def claim_gpus() -> tuple[str, ...] | None:
    """Claim ``DEBIAS_GPUS_PER_EXPERIMENT`` of the visible GPUs for this process and the processes it execs
    (once per process; see the module docstring): the claimed GPUs, or None without the variable or a GPU."""
    wanted = gpus_per_experiment()
    gpus = visible_gpus() if wanted is not None else []
    if not gpus:
        return None
    if wanted > len(gpus):
        raise DebiasError(f"{GPUS_ENV}={wanted} but only {len(gpus)} GPU(s) are visible ({','.join(gpus)})")
    claim = _try_claim(gpus, wanted)
    if claim is None:
        log.info("note: waiting for %d of the GPUs %s to be free (%s=%d)", wanted, ",".join(gpus), GPUS_ENV, wanted)
    while claim is None:
        time.sleep(POLL_SECONDS)
        claim = _try_claim(gpus, wanted)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claim)
    if torch.cuda.device_count() != wanted:
        raise DebiasError(f"{GPUS_ENV}: CUDA started before GPUs {','.join(claim)} were claimed (is NVML missing?)")
    log.info("note: GPU(s) %s claimed for this experiment (%s=%d)", ",".join(claim), GPUS_ENV, wanted)
    return claim


def _try_claim(gpus: list[str], wanted: int) -> tuple[str, ...] | None:
    """Lock the first ``wanted`` free GPUs, or none (and hold nothing) when fewer are free."""
    held: dict[str, int] = {}
    for gpu in gpus:
        lock = lock_file(claim_folder() / f"gpu-{UNSAFE.sub('_', gpu)}.lock", wait=False)
        if lock is not None:
            held[gpu] = lock
        if len(held) == wanted:
            return tuple(held)
    for lock in held.values():
        os.close(lock)
    return None

"""Sampling to a file in chunks: bounded memory at any N, resumable after a kill, shared over processes.

The N samples of a run are cut into chunks of ``chunk_size`` indices. Each finished chunk is written
atomically as ``<start>-<stop>.npz`` into a chunk folder beside a ``settings.json`` that records
everything that determines the samples (:meth:`debias.sampling.Sampling.identity`: the checkpoint's
digest, solver, steps, seed, grid, options, precision, …, not the batch size or the number of
processes, which do not change a sample). A rerun with the same settings samples only the missing
chunks; with other settings the old chunks are deleted first, never mixed in. The output is then
assembled from the chunks as a stream (:func:`debias.images.write_images_npz`) and the chunk files removed.

Under torchrun every rank samples its share of the missing chunks and writes them itself (nothing is
gathered in memory); rank 0 assembles the output once all are written. SIGINT/SIGTERM (a
:class:`~debias.stopping.StopRequest`) stops a rank before its next network call, keeping every finished chunk.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch.distributed as dist

from debias.errors import DebiasError, Interrupted
from debias.images import NPZ_LAYOUTS, save_png_folder, save_png_grid, write_images_npz
from debias.io import atomic_folder, write_json
from debias.npz import members, open_member, write_npz
from debias.runtime import Ranks, on_main
from debias.sampling import Sampling
from debias.stopping import StopRequest, StopRequested

log = logging.getLogger(__name__)

SETTINGS = "settings.json"
# what an output file holds: the debias layout, guided-diffusion's batch layout, unrounded float32
KINDS = (*NPZ_LAYOUTS, "png", "folder")


def chunk_name(start: int, stop: int) -> str:
    return f"{start:08d}-{stop:08d}.npz"


class ChunkStore:
    """The chunk folder of one run of ``total`` samples (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict, total: int, chunk_size: int):
        if chunk_size < 1:
            raise DebiasError(f"the chunk size must be >= 1, got {chunk_size}")
        self.folder, self.settings, self.total = Path(folder), settings, total
        self.ranges = [range(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]

    def path(self, r: range) -> Path:
        return self.folder / chunk_name(r.start, r.stop)

    def complete(self, r: range) -> bool:
        """The chunk file exists and holds the right number of samples (else it is sampled again)."""
        try:
            member = members(self.path(r)).get("samples")
        except DebiasError:
            return False
        return member is not None and member.shape[0] == len(r)

    def prepare(self) -> list[tuple[int, int]]:
        """Start or resume: the (start, stop) of every chunk still to sample. Chunks of other settings
        are deleted; so are leftovers of a killed writer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        recorded = self.folder / SETTINGS
        try:
            same = json.loads(recorded.read_text()) == self.settings
        except (OSError, ValueError):
            same = False
        if not same:
            for old in self.folder.glob("*.npz"):
                old.unlink()
            write_json(recorded, self.settings)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return [(r.start, r.stop) for r in self.ranges if not self.complete(r)]

    def save(self, r: range, samples: np.ndarray) -> None:
        write_npz(self.path(r), {"samples": samples})

    def blocks(self) -> Iterator[np.ndarray]:
        """Every chunk's samples, in order (one chunk in memory at a time)."""
        for r in self.ranges:
            member = members(self.path(r))["samples"]
            yield np.array(open_member(self.path(r), member))


def assemble(store: ChunkStore, out: Path, kind: str, shape: tuple[int, ...]) -> None:
    """Write the output of ``kind`` from the chunks: streamed into an ``.npz`` (or the PNGs of a folder);
    a PNG grid needs all images at once."""
    if kind in NPZ_LAYOUTS:
        write_images_npz(out, store.blocks(), (store.total, *shape), kind)
    elif kind == "folder":
        def write(folder: Path) -> None:
            for r, block in zip(store.ranges, store.blocks()):
                save_png_folder(block, folder, indices=r)

        atomic_folder(out, write)
    elif kind == "png":
        save_png_grid(np.concatenate(list(store.blocks())), out)
    else:
        raise ValueError(f"unknown output kind {kind!r}")


def sample_to_file(sampling: Sampling, steps: int, num_samples: int, out: Path, kind: str, chunk_dir: Path,
                   chunk_size: int, progress: Callable[[int, int], None] | None = None, keep_chunks: bool = False,
                   stop: StopRequest | None = None) -> int:
    """Sample ``num_samples`` images at ``steps`` into ``out`` (of ``kind``, see :data:`KINDS`)
    through the chunk folder ``chunk_dir``; returns the number of chunks sampled by this call (all ranks).

    ``progress(done, total)`` counts this process's image steps. Every rank of a process
    group calls this; rank 0 writes ``out``, then deletes the chunk files unless ``keep_chunks`` (a job
    that writes several outputs keeps them until all are written: a kill during the last one must not
    cost the others; :func:`clear_chunks`). A signal caught by ``stop`` ends sampling before the next network
    call with :class:`~debias.errors.Interrupted`, naming the chunks on disk.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    ranks = Ranks.current()
    settings = {**sampling.identity(), "steps": steps, "num_samples": num_samples, "chunk_size": chunk_size,
                "kind": "float32" if kind == "float32" else "uint8"}
    store = ChunkStore(chunk_dir, settings, num_samples, chunk_size)
    missing = on_main(store.prepare, ranks)
    done = len(store.ranges) - len(missing)
    if ranks.main and done:
        log.info("%s: %d of %d chunks already sampled; sampling %s", out, done, len(store.ranges),
                 ", ".join(f"{a}-{b}" for a, b in missing) or "none")
    mine = [range(a, b) for a, b in missing[ranks.rank::ranks.world]]
    total = sum(len(r) for r in mine) * steps
    finished = 0

    def report(calls: int, base: int) -> None:
        if stop is not None:
            stop.check()
        if progress is not None:
            progress(base + calls, total)

    try:
        for r in mine:
            samples = sampling.samples(steps, list(r), lambda calls, _n, base=finished: report(calls, base))
            store.save(r, samples.numpy())
            finished += len(r) * steps
    except StopRequested as stopped:
        on_disk = sum(store.complete(r) for r in store.ranges)
        raise Interrupted(stopped.signum, f"interrupted ({stopped}): {on_disk} of {len(store.ranges)} chunks of {out} "
                                          f"are on disk in {chunk_dir}; run the same command again to resume") from None
    if ranks.world > 1:
        dist.barrier()
    if ranks.main:
        assemble(store, out, kind, tuple(sampling.model.image_shape))
        if not keep_chunks:
            clear_chunks(chunk_dir)
    if ranks.world > 1:
        dist.barrier()
    return len(missing)


def clear_chunks(chunk_dir: Path) -> None:
    """Delete the chunk files of a folder, keeping its recorded settings (the folder stays, as a DVC out)."""
    for chunk in Path(chunk_dir).glob("*.npz"):
        chunk.unlink(missing_ok=True)


def remove_chunks(chunk_dir: Path) -> None:
    """Delete a chunk folder (nothing to resume)."""
    shutil.rmtree(chunk_dir, ignore_errors=True)

"""Job `sample`: images from a checkpoint with one solver at one or more step counts, streamed to disk in
resumable chunks (:mod:`debias.streaming`), on every visible GPU."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from debias.config import Config, SampleConfig
from debias.errors import DebiasError
from debias.pipeline import MODEL, chunks_dir, samples_file
from debias.posthoc import sampling_checkpoint
from debias.progress import Progress
from debias.runtime import Ranks, on_devices
from debias.sampling import load_sampling, plan_for
from debias.stopping import StopRequest
from debias.streaming import clear_chunks, remove_chunks, sample_to_file


def sample_images(s: SampleConfig, solver: str, checkpoint: Path, outputs: Mapping[int, Path], chunks: Mapping[int, Path],
                  *, ranks: Ranks, device: torch.device, kind: str = "npz", overrides: Mapping[str, Any] | None = None,
                  class_labels: list[int] | None = None, init_noise: Tensor | None = None, float32: bool = False,
                  keep_chunk_folders: bool = False, label: str | None = None) -> None:
    """``s.num_samples`` images of ``solver`` (the sample params ``s``) at each step count of ``outputs`` ({steps: file}), through
    the chunk folders ``chunks`` ({steps: folder}) — from ``checkpoint``, or with ``sample.ema_std`` from the
    post-hoc EMA of that length rebuilt from the ``phema/`` folder beside it.

    The plan is the sample params with ``overrides`` (grid settings and solver options, which beat a preset),
    ``class_labels`` and ``float32`` (:func:`debias.sampling.plan_for`). ``kind`` is the output kind
    (:data:`debias.streaming.KINDS`). Chunk files are kept until every output is written (a kill during the
    last one costs none of the others); then the folders are emptied (``keep_chunk_folders``: the pipeline's
    persistent outs) or removed. SIGINT/SIGTERM stops before the next network call, the chunks on disk kept
    (:class:`~debias.errors.Interrupted`; a rerun resumes from them).
    """
    plan = plan_for(solver, s, class_labels=class_labels, float32=float32, **(overrides or {}))
    with sampling_checkpoint(checkpoint, s.ema_std) as path, StopRequest() as stop:
        sampling = load_sampling(path, plan, list(outputs), s.num_samples, init_noise=init_noise, device=str(device))
        for steps, out in outputs.items():
            with Progress(f"{label or solver} {steps} steps", "image steps", enabled=ranks.main) as progress:
                sample_to_file(sampling, steps, s.num_samples, out, kind, chunks[steps], s.chunk_size, progress,
                               keep_chunks=True, stop=stop)
    if ranks.main:
        for folder in chunks.values():
            (clear_chunks if keep_chunk_folders else remove_chunks)(folder)


def sample_stage(cfg: Config, argv: list[str]) -> None:
    """Stage ``sample@<solver>``: every step count of sample.steps into samples/<solver>/ (chunks/<solver>/ is
    the persistent out a killed run resumes from)."""
    if len(argv) != 2:
        raise DebiasError("usage: stages/sample.py SOLVER")
    solver = argv[1]
    with on_devices(cfg.sample.device, argv) as (ranks, device):
        sample_images(cfg.sample, solver, MODEL, {n: samples_file(solver, n) for n in cfg.sample.steps},
                      {n: chunks_dir(solver, n) for n in cfg.sample.steps}, ranks=ranks, device=device,
                      keep_chunk_folders=True, label=f"sample@{solver}")

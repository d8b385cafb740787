"""Sampling many images: per-sample seeds, batches, shards over processes, and trained checkpoints.

Sample ``i`` of a run with seed ``s`` depends only on (s, i) (its noise and, for a class-conditional
model, its label come from its own generators), so :func:`generate` gives the same images whatever
the batch size and however many processes share the work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from debias.config import SampleConfig
from debias.errors import DebiasError
from debias.images import to_uint8
from debias.models.factory import DiffusionModel, load_model
from debias.runtime import autocast_dtype, gather_shards, inference_network, prepare_network, resolve_device, shard_bounds
from debias.samplers import get_solver, sample, solver_options
from debias.samplers.denoiser import Denoiser
from debias.samplers.noise import SampleNoise, sample_labels
from debias.samplers.timesteps import select_timesteps


def labels_for(indices: Sequence[int], seed: int, num_classes: int | None,
               class_labels: Sequence[int] | None) -> Tensor | None:
    """Class labels (B,) for the given sample indices: ``class_labels`` cycled by sample index, or
    drawn per sample from (seed, index) for a class-conditional model; None for an unconditional one."""
    if num_classes is None:
        if class_labels:
            raise DebiasError("class labels were given but the model is not class-conditional")
        return None
    if not class_labels:
        return sample_labels(seed, indices, num_classes)
    bad = [c for c in class_labels if not 0 <= c < num_classes]
    if bad:
        raise DebiasError(f"class label {bad[0]} is out of range: the model has {num_classes} classes "
                          f"(0..{num_classes - 1})")
    return torch.tensor([class_labels[i % len(class_labels)] for i in indices], dtype=torch.int64)


def generate(model: DiffusionModel, solver: str, steps: int, num_samples: int, seed: int, batch_size: int, *,
             indices: Sequence[int] | None = None, class_labels: Sequence[int] | None = None, clip_x0: bool = True,
             spacing: str = "even", device: str | torch.device = "cpu",
             progress: Callable[[int, int], None] | None = None, **options) -> Tensor:
    """Sample images with ``solver``; returns uint8 (N, C, H, W) on the CPU, in the order of ``indices``.

    ``model.network`` (on ``device``) is called as ``network(x, t, y)``; ``indices`` are the sample
    indices to make (default ``range(num_samples)``). Labels: given ``class_labels`` are cycled over
    sample indices, else drawn per sample for a class-conditional model. ``progress(done, total)``
    counts network evaluations of this process over all its batches. ``options`` are the solver's
    (see :data:`debias.samplers.SOLVERS`). Under ``torch.distributed`` every rank samples a contiguous
    shard and the result is gathered, equal to a single process's.
    """
    indices = [int(i) for i in (range(num_samples) if indices is None else indices)]
    if batch_size < 1:
        raise DebiasError(f"batch size must be >= 1, got {batch_size}")
    solver_options(solver, options)
    labels_for([], seed, model.num_classes, class_labels)  # validate on every rank before any work
    device = torch.device(device)
    start, stop = shard_bounds(len(indices))
    local = indices[start:stop]
    batches = [local[i:i + batch_size] for i in range(0, len(local), batch_size)]
    total = len(batches) * steps
    images = []
    for b, batch in enumerate(batches):
        noise = SampleNoise(seed, batch, model.image_shape, device)
        labels = labels_for(batch, seed, model.num_classes, class_labels)
        denoiser = Denoiser(model.network, model.schedule, model.target, model.learn_sigma, clip_x0,
                            None if labels is None else labels.to(device))
        report = None if progress is None else (lambda done, _n, b=b: progress(b * steps + done, total))
        x0 = sample(solver, denoiser, noise.draw(), steps, spacing=spacing, noise=noise, progress=report, **options)
        images.append(to_uint8(x0))
    local_images = torch.cat(images) if images else torch.zeros((0, *model.image_shape), dtype=torch.uint8,
                                                                  device=device)
    return gather_shards(local_images, len(indices), device)


def options_of(solver: str, cfg: SampleConfig) -> dict:
    """The options ``solver`` takes, from the sample params: DDIM's η, the order, UniPC's variant."""
    values = {"eta": cfg.eta, "order": cfg.order, "variant": cfg.unipc_variant}
    return {key: values[key] for key in get_solver(solver).options}


def sample_checkpoint(path: str | Path, solver: str, cfg: SampleConfig, *, class_labels: Sequence[int] | None = None,
                      device: str = "cpu", progress: Callable[[int, int], None] | None = None,
                      **options) -> Iterator[tuple[int, Tensor]]:
    """(step count, uint8 (N, C, H, W) samples) for each of ``cfg.steps``, with the same seeds, from one
    load (and one compilation) of a checkpoint's model.

    Everything else comes from the sample params ``cfg``: ``num_samples``, ``seed``, ``batch_size``,
    ``clip_x0``, ``spacing``, ``ema``, ``precision``, ``compile``, and the solver's options
    (:func:`options_of`), which ``options`` override. Every problem a user can fix (unknown solver or
    option, too many steps, bad labels, a missing, corrupt or wrong-shape checkpoint) is a
    :class:`DebiasError`, raised before any sampling; the generator then yields step count by step count.
    """
    options = solver_options(solver, {**options_of(solver, cfg), **options})
    device = resolve_device(device)
    model = load_model(path, ema=cfg.ema)
    for n in cfg.steps:
        select_timesteps(model.schedule.num_timesteps, n, cfg.spacing, multistep=get_solver(solver).multistep)
    labels_for([], cfg.seed, model.num_classes, class_labels)
    autocast_dtype(cfg.precision, device)
    network = prepare_network(model.network, device)
    model = dataclasses.replace(model, network=inference_network(network, device, compile=cfg.compile,
                                                                 precision=cfg.precision))
    return _each_steps(model, solver, cfg, class_labels, device, progress, options)


def _each_steps(model: DiffusionModel, solver: str, cfg: SampleConfig, class_labels: Sequence[int] | None,
                device: torch.device, progress: Callable[[int, int], None] | None,
                options: dict) -> Iterator[tuple[int, Tensor]]:
    for n in cfg.steps:
        yield n, generate(model, solver, n, cfg.num_samples, cfg.seed, cfg.batch_size, class_labels=class_labels,
                          clip_x0=cfg.clip_x0, spacing=cfg.spacing, device=device, progress=progress, **options)

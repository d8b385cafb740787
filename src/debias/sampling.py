"""Sampling many images: per-sample seeds, batches, shards over processes, and trained checkpoints.

Sample ``i`` of a run with seed ``s`` depends only on (s, i) (its noise and, for a class-conditional
model, its label come from its own generators), so :func:`generate` gives the same images whatever
the batch size and however many processes share the work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from debias.config import SampleConfig
from debias.errors import DebiasError
from debias.images import to_uint8
from debias.io import file_sha256, tensor_sha256
from debias.models.factory import DiffusionModel, load_model
from debias.runtime import autocast_dtype, gather_shards, inference_network, prepare_network, resolve_device, shard_bounds
from debias.samplers import arithmetic_of, get_solver, sample, solver_grid, solver_options
from debias.samplers.denoiser import Denoiser
from debias.samplers.noise import SampleNoise, sample_labels
from debias.samplers.presets import preset_settings

log = logging.getLogger(__name__)


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


def sample_indices(model: DiffusionModel, solver: str, steps: int, indices: Sequence[int], seed: int,
                   batch_size: int, *, class_labels: Sequence[int] | None = None, clip_x0: bool = True,
                   spacing: str | None = None, denoise_to_zero: bool = True, arithmetic: str = "debias",
                   init_noise: Tensor | None = None, float32: bool = False, device: str | torch.device = "cpu",
                   progress: Callable[[int, int], None] | None = None, **options) -> Tensor:
    """Samples ``indices`` in this process with ``solver``: uint8 (n, C, H, W) on the CPU (with ``float32``:
    the solver's final x as float32, before clamping and rounding), in the order of ``indices``.

    ``model.network`` (on ``device``) is called as ``network(x, t, y)``. The grid: ``spacing`` (None:
    the solver's default) and ``denoise_to_zero`` (:func:`debias.samplers.grid.make_grid`);
    ``arithmetic``: :func:`debias.samplers.arithmetic_of` (the attention arithmetic is the network's);
    ``options`` are the solver's (:data:`debias.samplers.SOLVERS`). ``init_noise`` (M, C, H, W), if
    given, is x_T of sample i at row i (instead of its own first draw). Labels: given ``class_labels``
    are cycled over sample indices, else drawn per sample for a class-conditional model.
    ``progress(done, total)`` counts image steps (one network evaluation of one image) over all batches.
    """
    indices = [int(i) for i in indices]
    if batch_size < 1:
        raise DebiasError(f"batch size must be >= 1, got {batch_size}")
    solver_options(solver, options)
    labels_for([], seed, model.num_classes, class_labels)
    check_init_noise(init_noise, indices, model.image_shape)
    tables, formulas = arithmetic_of(solver, arithmetic)
    device = torch.device(device)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    total, samples = len(indices) * steps, []
    for b, batch in enumerate(batches):
        noise = SampleNoise(seed, batch, model.image_shape, device)
        x_T = noise.draw()
        if init_noise is not None:
            x_T = init_noise[batch].to(device=device, dtype=x_T.dtype)
        labels = labels_for(batch, seed, model.num_classes, class_labels)
        denoiser = Denoiser(model.network, model.schedule, model.target, model.learn_sigma, clip_x0,
                            None if labels is None else labels.to(device), formulas)
        report = None if progress is None else (
            lambda done, _n, first=b * batch_size, size=len(batch): progress((first * steps) + done * size, total))
        x = sample(solver, denoiser, x_T, steps, spacing=spacing, denoise_to_zero=denoise_to_zero, tables=tables,
                   noise=noise, progress=report, **options)
        samples.append(x.float().cpu() if float32 else to_uint8(x).cpu())
    if samples:
        return torch.cat(samples)
    return torch.zeros((0, *model.image_shape), dtype=torch.float32 if float32 else torch.uint8)


def generate(model: DiffusionModel, solver: str, steps: int, num_samples: int, seed: int, batch_size: int, *,
             indices: Sequence[int] | None = None, device: str | torch.device = "cpu", **kwargs) -> Tensor:
    """:func:`sample_indices` of ``indices`` (default ``range(num_samples)``) shared out over the ranks of
    an initialised ``torch.distributed`` group — whole batches each, gathered back in order, so the
    result equals a single process's (sample i depends only on (seed, i))."""
    indices = [int(i) for i in (range(num_samples) if indices is None else indices)]
    start, stop = shard_bounds(len(indices), unit=batch_size)
    local = sample_indices(model, solver, steps, indices[start:stop], seed, batch_size, device=device, **kwargs)
    return gather_shards(local.to(device), len(indices), torch.device(device), unit=batch_size)


def check_init_noise(init_noise: Tensor | None, indices: Sequence[int], image_shape: Sequence[int]) -> None:
    """DebiasError unless ``init_noise`` is None or a finite float tensor (M, C, H, W) with a row per index."""
    if init_noise is None:
        return
    if not init_noise.is_floating_point() or tuple(init_noise.shape[1:]) != tuple(image_shape) or init_noise.ndim != 4:
        raise DebiasError(f"the initial noise must be floats N x {' x '.join(map(str, image_shape))}, "
                          f"got {init_noise.dtype} {tuple(init_noise.shape)}")
    if indices and max(indices) >= len(init_noise):
        raise DebiasError(f"the initial noise has {len(init_noise)} rows but sample {max(indices)} was asked for")
    if not bool(torch.isfinite(init_noise).all()):
        raise DebiasError("the initial noise holds NaN or infinite values")


def settings_for(solver: str, cfg: SampleConfig, overrides: dict) -> tuple[dict, dict]:
    """(grid, clipping and arithmetic settings, solver options) for ``solver``: the sample params, replaced
    by the preset's (``cfg.preset``), replaced by ``overrides``; every option validated."""
    values = {"eta": cfg.eta, "order": cfg.order, "variant": cfg.unipc_variant,
              "lower_order_final": cfg.lower_order_final}
    settings = {"clip_x0": cfg.clip_x0, "spacing": None if cfg.spacing == "auto" else cfg.spacing,
                "denoise_to_zero": cfg.denoise_to_zero, "arithmetic": cfg.arithmetic,
                **{key: values[key] for key in get_solver(solver).options}}
    settings.update(preset_settings(cfg.preset, solver))
    settings.update(overrides)
    grid = {key: settings.pop(key) for key in ("clip_x0", "spacing", "denoise_to_zero", "arithmetic")}
    arithmetic_of(solver, grid["arithmetic"])
    return grid, solver_options(solver, settings)


@dataclass
class Sampler:
    """A checkpoint's model loaded, checked and prepared for one solver and its settings: what
    :meth:`samples` needs, and the :attr:`identity` of everything that determines the samples."""

    model: DiffusionModel
    solver: str
    cfg: SampleConfig
    kwargs: dict
    identity: dict

    def samples(self, steps: int, indices: Sequence[int], progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Samples ``indices`` at ``steps`` in this process (:func:`sample_indices`)."""
        return sample_indices(self.model, self.solver, steps, indices, self.cfg.seed, self.cfg.batch_size,
                              progress=progress, **self.kwargs)


def prepare_sampler(path: str | Path, solver: str, cfg: SampleConfig, *, class_labels: Sequence[int] | None = None,
                    init_noise: Tensor | None = None, float32: bool = False, device: str = "cpu",
                    **overrides) -> Sampler:
    """Load a checkpoint's model for ``solver`` with everything else from the sample params ``cfg`` —
    ``num_samples``, ``seed``, ``batch_size``, ``ema``, ``precision``, ``compile`` and the grid and solver
    settings (:func:`settings_for`), which ``overrides`` replace — on ``device`` (cpu, cuda, cuda:N, auto).

    Every problem a user can fix (unknown solver or option, too many steps, bad labels or initial noise,
    a missing, corrupt or wrong-shape checkpoint) is a :class:`DebiasError`, raised here, before any sampling.
    """
    settings, options = settings_for(solver, cfg, overrides)
    device = resolve_device(device)
    model = load_model(path, ema=cfg.ema)
    for n in cfg.steps:
        solver_grid(solver, model.schedule, n, settings["spacing"], denoise_to_zero=settings["denoise_to_zero"],
                    tables=arithmetic_of(solver, settings["arithmetic"])[0])
    labels_for([], cfg.seed, model.num_classes, class_labels)
    check_init_noise(init_noise, range(cfg.num_samples), model.image_shape)
    autocast_dtype(cfg.precision, device)
    schedule = f"{model.config.get('diffusion', {}).get('schedule')} schedule of {model.schedule.num_timesteps} steps"
    if cfg.preset == "upstream" and (model.target, schedule) != ("eps", "linear schedule of 1000 steps"):
        log.warning("note: the original code treats every model as an ε-predictor on the linear schedule of "
                    "1000 steps; this %s-model on the %s is sampled with its own target and schedule",
                    model.target, schedule)
    model.network.set_attention("einsum" if settings["arithmetic"] == "upstream" else "sdpa")
    network = prepare_network(model.network, device)
    model = dataclasses.replace(model, network=inference_network(network, device, compile=cfg.compile,
                                                                 precision=cfg.precision))
    identity = {"checkpoint_sha256": file_sha256(Path(path)), "solver": solver, "seed": cfg.seed, "ema": cfg.ema,
                "precision": cfg.precision, "compile": cfg.compile, "device": device.type, "float32": float32,
                "class_labels": list(class_labels or []), "image_shape": list(model.image_shape),
                "init_noise_sha256": None if init_noise is None else tensor_sha256(init_noise),
                **settings, **options}
    kwargs = dict(class_labels=class_labels, init_noise=init_noise, float32=float32, device=device, **settings,
                  **options)
    return Sampler(model, solver, cfg, kwargs, identity)


def sample_checkpoint(path: str | Path, solver: str, cfg: SampleConfig, *, progress: Callable[[int, int], None] | None = None,
                      **kwargs) -> Iterator[tuple[int, Tensor]]:
    """(step count, samples (N, C, H, W)) for each of ``cfg.steps``, with the same seeds, from one load
    (and one compilation) of a checkpoint's model, held in memory (for files of any size and resumable
    runs: :func:`debias.streaming.sample_to_file`); shared out over the ranks of a process group.
    ``kwargs`` as :func:`prepare_sampler`'s; DebiasErrors are raised before the first sample."""
    sampler = prepare_sampler(path, solver, cfg, **kwargs)
    return _each_steps(sampler, progress)


def _each_steps(sampler: Sampler, progress: Callable[[int, int], None] | None) -> Iterator[tuple[int, Tensor]]:
    cfg = sampler.cfg
    for n in cfg.steps:
        yield n, generate(sampler.model, sampler.solver, n, cfg.num_samples, cfg.seed, cfg.batch_size,
                          progress=progress, **sampler.kwargs)

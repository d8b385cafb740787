"""Sampling many images: one validated plan, per-sample seeds, batches, shards over processes.

A :class:`SamplingPlan` holds everything that decides sample ``i`` besides the model, the step count
and ``i`` itself — the solver, its grid and options, the seed, labels, precision — resolved once from
the sample params, a preset and explicit overrides (:func:`plan_for`) and validated there. It is then
passed down unchanged; step counts and sample counts are arguments of the calls that use them.

Sample ``i`` of a plan with seed ``s`` depends only on (s, i) (its noise and, for a class-conditional
model, its label come from its own generators), so :func:`generate` gives the same images whatever
the batch size and however many processes share the work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from debias.config import SampleConfig
from debias.errors import DebiasError
from debias.images import to_uint8
from debias.io import file_sha256, tensor_sha256
from debias.models.factory import DiffusionModel, load_model
from debias.runtime import autocast_dtype, gather_shards, inference_network, prepare_network, resolve_device, shard_bounds
from debias.solvers import arithmetic_of, get_solver, sample, solver_grid, solver_options
from debias.solvers.denoiser import Denoiser
from debias.solvers.noise import SampleNoise, sample_labels
from debias.solvers.presets import preset_settings

log = logging.getLogger(__name__)

GRID_SETTINGS = ("clip_x0", "spacing", "denoise_to_zero", "arithmetic")


@dataclass(frozen=True)
class SamplingPlan:
    """How one solver samples (see the module docstring). ``spacing`` None is the solver's default;
    ``options`` are the solver's own (η, order, …); ``class_labels`` are cycled over sample indices
    (empty: drawn per sample for a class-conditional model); ``float32`` keeps the solver's final x
    unrounded instead of uint8 images."""

    solver: str
    seed: int = 0
    batch_size: int = 128
    spacing: str | None = None
    denoise_to_zero: bool = True
    clip_x0: bool = True
    arithmetic: str = "debias"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ema: bool = True
    precision: str = "fp32"
    compile: bool = False
    class_labels: tuple[int, ...] = ()
    float32: bool = False

    def settings(self) -> dict[str, Any]:
        """Everything here that determines a sample (not the batch size, which never does)."""
        return {"solver": self.solver, "seed": self.seed, "ema": self.ema, "precision": self.precision,
                "compile": self.compile, "float32": self.float32, "class_labels": list(self.class_labels),
                **{key: getattr(self, key) for key in GRID_SETTINGS}, **self.options}


def plan_for(solver: str, cfg: SampleConfig = SampleConfig(), *, seed: int | None = None,
             batch_size: int | None = None, class_labels: Sequence[int] | None = None, float32: bool = False,
             **overrides: Any) -> SamplingPlan:
    """The plan of ``solver`` from the sample params ``cfg``, replaced by the preset's settings
    (``cfg.preset``), replaced by ``overrides`` (grid settings and solver options, e.g. ``spacing``,
    ``eta``); ``seed`` and ``batch_size`` replace the params'. Every value is checked here: an unknown
    solver, an option it does not take or a bad value is one DebiasError line."""
    get_solver(solver)
    params = {"clip_x0": cfg.clip_x0, "spacing": None if cfg.spacing == "auto" else cfg.spacing,
              "denoise_to_zero": cfg.denoise_to_zero, "arithmetic": cfg.arithmetic}
    values = {"eta": cfg.eta, "order": cfg.order, "variant": cfg.unipc_variant, "lower_order_final": cfg.lower_order_final}
    settings = {**params, **{key: values[key] for key in get_solver(solver).options}}
    settings.update(preset_settings(cfg.preset, solver))
    settings.update(overrides)
    grid = {key: settings.pop(key) for key in GRID_SETTINGS}
    arithmetic_of(solver, grid["arithmetic"])
    batch_size = cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise DebiasError(f"batch size must be >= 1, got {batch_size}")
    return SamplingPlan(solver=solver, seed=cfg.seed if seed is None else seed, batch_size=batch_size,
                        options=solver_options(solver, settings), ema=cfg.ema, precision=cfg.precision,
                        compile=cfg.compile, class_labels=tuple(int(c) for c in class_labels or ()), float32=float32,
                        **grid)


def labels_for(indices: Sequence[int], seed: int, num_classes: int | None,
               class_labels: Sequence[int]) -> Tensor | None:
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


def check_init_noise(init_noise: Tensor | None, count: int, image_shape: Sequence[int]) -> None:
    """DebiasError unless ``init_noise`` is None or a finite float tensor (M, C, H, W) with a row for
    each of ``count`` samples."""
    if init_noise is None:
        return
    if not init_noise.is_floating_point() or tuple(init_noise.shape[1:]) != tuple(image_shape) or init_noise.ndim != 4:
        raise DebiasError(f"the initial noise must be floats N x {' x '.join(map(str, image_shape))}, "
                          f"got {init_noise.dtype} {tuple(init_noise.shape)}")
    if count > len(init_noise):
        raise DebiasError(f"the initial noise has {len(init_noise)} rows but sample {count - 1} was asked for")
    if not bool(torch.isfinite(init_noise).all()):
        raise DebiasError("the initial noise holds NaN or infinite values")


def sample_indices(model: DiffusionModel, plan: SamplingPlan, steps: int, indices: Sequence[int], *,
                   init_noise: Tensor | None = None, device: str | torch.device = "cpu",
                   progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Samples ``indices`` at ``steps`` network calls in this process: uint8 (n, C, H, W) on the CPU (with
    ``plan.float32``: the solver's final x as float32, before clamping and rounding), in the order of
    ``indices``.

    ``model.network`` (on ``device``) is called as ``network(x, t, y)``. ``init_noise`` (M, C, H, W), if
    given, is x_T of sample i at row i (instead of its own first draw). ``progress(done, total)`` counts
    image steps (one network evaluation of one image) over all batches.
    """
    indices = [int(i) for i in indices]
    check_init_noise(init_noise, max(indices, default=-1) + 1, model.image_shape)
    tables, formulas = arithmetic_of(plan.solver, plan.arithmetic)
    device = torch.device(device)
    size = plan.batch_size
    total, samples = len(indices) * steps, []
    for b, start in enumerate(range(0, len(indices), size)):
        batch = indices[start:start + size]
        noise = SampleNoise(plan.seed, batch, model.image_shape, device)
        x_T = noise.draw()
        if init_noise is not None:
            x_T = init_noise[batch].to(device=device, dtype=x_T.dtype)
        labels = labels_for(batch, plan.seed, model.num_classes, plan.class_labels)
        denoiser = Denoiser(model.network, model.schedule, model.target, model.learn_sigma, plan.clip_x0,
                            None if labels is None else labels.to(device), formulas)
        report = None if progress is None else (
            lambda done, _n, first=start, n=len(batch): progress(first * steps + done * n, total))
        x = sample(plan.solver, denoiser, x_T, steps, spacing=plan.spacing, denoise_to_zero=plan.denoise_to_zero,
                   tables=tables, noise=noise, progress=report, **plan.options)
        samples.append(x.float().cpu() if plan.float32 else to_uint8(x).cpu())
    if samples:
        return torch.cat(samples)
    return torch.zeros((0, *model.image_shape), dtype=torch.float32 if plan.float32 else torch.uint8)


def generate(model: DiffusionModel, plan: SamplingPlan, steps: int, num_samples: int, *,
             indices: Sequence[int] | None = None, init_noise: Tensor | None = None,
             device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None) -> Tensor:
    """:func:`sample_indices` of ``indices`` (default ``range(num_samples)``) shared out over the ranks of
    an initialised ``torch.distributed`` group — whole batches each, gathered back in order, so the
    result equals a single process's (sample i depends only on (seed, i))."""
    indices = [int(i) for i in (range(num_samples) if indices is None else indices)]
    start, stop = shard_bounds(len(indices), unit=plan.batch_size)
    local = sample_indices(model, plan, steps, indices[start:stop], init_noise=init_noise, device=device,
                           progress=progress)
    return gather_shards(local.to(device), len(indices), torch.device(device), unit=plan.batch_size)


@dataclass
class Sampling:
    """A checkpoint's model loaded, checked and prepared on ``device`` for a plan: what :meth:`samples`
    needs, and the :meth:`identity` of everything that determines the samples."""

    model: DiffusionModel
    plan: SamplingPlan
    device: torch.device
    checkpoint_sha256: str
    init_noise: Tensor | None = None

    def samples(self, steps: int, indices: Sequence[int], progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Samples ``indices`` at ``steps`` in this process (:func:`sample_indices`)."""
        return sample_indices(self.model, self.plan, steps, indices, init_noise=self.init_noise, device=self.device,
                              progress=progress)

    def identity(self) -> dict[str, Any]:
        return {"checkpoint_sha256": self.checkpoint_sha256, "device": self.device.type,
                "image_shape": list(self.model.image_shape),
                "init_noise_sha256": None if self.init_noise is None else tensor_sha256(self.init_noise),
                **self.plan.settings()}


def load_sampling(path: str | Path, plan: SamplingPlan, steps: Sequence[int], num_samples: int, *,
                  init_noise: Tensor | None = None, device: str = "cpu") -> Sampling:
    """A checkpoint's model ready to sample ``num_samples`` images at each of ``steps`` under ``plan`` on
    ``device`` (cpu, cuda, cuda:N, auto).

    Every problem a user can fix (too many steps for the chain, bad labels or initial noise, a precision
    the device lacks, a missing, corrupt or wrong-shape checkpoint) is a :class:`DebiasError`, raised
    here, before any sampling.
    """
    device = resolve_device(device)
    model = load_model(path, ema=plan.ema)
    tables = arithmetic_of(plan.solver, plan.arithmetic)[0]
    for n in steps:
        solver_grid(plan.solver, model.schedule, n, plan.spacing, denoise_to_zero=plan.denoise_to_zero, tables=tables)
    labels_for([], plan.seed, model.num_classes, plan.class_labels)
    check_init_noise(init_noise, num_samples, model.image_shape)
    autocast_dtype(plan.precision, device)
    schedule = f"{model.config.get('diffusion', {}).get('schedule')} schedule of {model.schedule.num_timesteps} steps"
    if plan.arithmetic == "upstream" and (model.target, schedule) != ("eps", "linear schedule of 1000 steps"):
        log.warning("note: the original code treats every model as an ε-predictor on the linear schedule of "
                    "1000 steps; this %s-model on the %s is sampled with its own target and schedule",
                    model.target, schedule)
    model.network.set_attention("einsum" if plan.arithmetic == "upstream" else "sdpa")
    network = prepare_network(model.network, device)
    model = dataclasses.replace(model, network=inference_network(network, device, compile=plan.compile,
                                                                 precision=plan.precision))
    return Sampling(model, plan, device, file_sha256(Path(path)), init_noise)


def sample_checkpoint(path: str | Path, solver: str, cfg: SampleConfig, *, steps: Sequence[int] | None = None,
                      num_samples: int | None = None, seed: int | None = None,
                      class_labels: Sequence[int] | None = None, init_noise: Tensor | None = None,
                      float32: bool = False, device: str = "cpu", progress: Callable[[int, int], None] | None = None,
                      **overrides: Any) -> Iterator[tuple[int, Tensor]]:
    """(step count, samples (N, C, H, W)) for each of ``steps`` (default ``cfg.steps``), with the same seeds,
    from one load (and one compilation) of a checkpoint's model, held in memory (for files of any size
    and resumable runs: :func:`debias.streaming.sample_to_file`); shared out over the ranks of a process
    group. The plan is :func:`plan_for` of ``cfg`` with ``seed``, ``class_labels``, ``float32`` and
    ``overrides``; ``num_samples`` defaults to ``cfg.num_samples``. DebiasErrors are raised before the
    first sample."""
    steps = list(cfg.steps if steps is None else steps)
    num_samples = cfg.num_samples if num_samples is None else num_samples
    plan = plan_for(solver, cfg, seed=seed, class_labels=class_labels, float32=float32, **overrides)
    sampling = load_sampling(path, plan, steps, num_samples, init_noise=init_noise, device=device)
    return ((n, generate(sampling.model, plan, n, num_samples, init_noise=init_noise, device=sampling.device,
                         progress=progress)) for n in steps)

"""High-level sampling: batches of per-sample-seeded images, sharded over processes, and writers.

Sample ``i`` of a run with seed ``s`` depends only on (s, i) (its noise and, for a class-conditional
model, its label come from its own generators), so :func:`generate` gives the same images whatever
the batch size and however many processes share the work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from debias.checkpoints import atomic_write, load_checkpoint
from debias.config import AUTOCAST_DTYPES, SampleConfig
from debias.diffusion.schedule import Schedule
from debias.diffusion.targets import check_target
from debias.errors import DebiasError
from debias.samplers import MULTISTEP, OPTIONS, SampleNoise, check_options, get_sampler, sample_labels, select_timesteps

OUTPUT_SUFFIXES = (".png", ".npz")


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape) → uint8 in [0, 255], rounded and clamped."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _labels_for(indices: Sequence[int], seed: int, num_classes: int | None,
                class_labels: Sequence[int] | None) -> Tensor | None:
    """Class labels (B,) for the given sample indices: ``class_labels`` cycled by sample index, or
    drawn per sample from (seed, index) for a class-conditional model; None for an unconditional one."""
    if num_classes is None:
        if class_labels:
            raise ValueError("class labels were given but the model is not class-conditional")
        return None
    if not class_labels:
        return sample_labels(seed, indices, num_classes)
    bad = [c for c in class_labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class label {bad[0]} is out of range: the model has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    return torch.tensor([class_labels[i % len(class_labels)] for i in indices], dtype=torch.int64)


def _shard(indices: list[int]) -> tuple[list[int], int, int]:
    """This process's contiguous slice of ``indices``, the slice length every rank pads to, and the world size."""
    if not (dist.is_available() and dist.is_initialized()):
        return indices, len(indices), 1
    world, rank = dist.get_world_size(), dist.get_rank()
    per = math.ceil(len(indices) / world)
    return indices[rank * per:(rank + 1) * per], per, world


def generate(model: Callable, schedule: Schedule, target: str, learn_sigma: bool, solver: str, steps: int,
             num_samples: int, seed: int, batch_size: int, *, indices: Sequence[int] | None = None,
             class_labels: Sequence[int] | None = None, clip_x0: bool = True, spacing: str = "even",
             device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
             image_shape: Sequence[int] | None = None, num_classes: int | None = None,
             compile: bool = False, precision: str = "fp32", **solver_options) -> Tensor:
    """Sample images with ``solver``; returns uint8 (N, C, H, W) on the CPU, in the order of ``indices``.

    ``model`` (on ``device``) is called as ``model(x, t, y)`` with original timesteps; ``indices`` are
    the sample indices to make (default ``range(num_samples)``). ``image_shape`` (C, H, W) and
    ``num_classes`` default to the UNet's ``in_channels``/``image_size``/``num_classes``. Labels: given
    ``class_labels`` are cycled over sample indices, else drawn per sample for a class-conditional
    model. ``progress(done, total)`` counts model evaluations of this process over all its batches.
    Under ``torch.distributed`` every rank samples a contiguous slice and the result is all-gathered,
    equal to a single process's. ``compile`` and ``precision`` are speed options, see :func:`fast_model`.
    """
    indices = [int(i) for i in (range(num_samples) if indices is None else indices)]
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    sampler = get_sampler(solver)
    if image_shape is None:
        image_shape = (model.in_channels, model.image_size, model.image_size)
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
    _labels_for([], seed, num_classes, class_labels)  # validate on every rank before any work
    device = torch.device(device)
    model = fast_model(model, device, compile=compile, precision=precision)
    local, per, world = _shard(indices)
    batches = [local[i:i + batch_size] for i in range(0, len(local), batch_size)]
    total = len(batches) * steps
    images = []
    for b, batch in enumerate(batches):
        noise = SampleNoise(seed, batch, image_shape, device)
        labels = _labels_for(batch, seed, num_classes, class_labels)
        y = None if labels is None else labels.to(device)
        report = None if progress is None else (lambda done, _n, b=b: progress(b * steps + done, total))
        x0 = sampler(model, noise.draw(), steps, schedule, target, learn_sigma, clip_x0, y, noise, report,
                     spacing=spacing, **solver_options)
        images.append(to_uint8(x0))
    local_images = torch.cat(images) if images else torch.zeros((0, *image_shape), dtype=torch.uint8, device=device)
    if world == 1:
        return local_images.cpu()
    padded = torch.zeros((per, *image_shape), dtype=torch.uint8, device=device)
    padded[:len(local_images)] = local_images
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[:len(indices)].cpu()


class _Autocast:
    """``model(x, t, y)`` under ``torch.autocast(dtype)``, returning float32 so the solvers' update
    arithmetic stays in float32."""

    def __init__(self, model: Callable, device: torch.device, dtype: torch.dtype):
        self.model, self.device_type, self.dtype = model, device.type, dtype

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x, t, y).float()


def fast_model(model: Callable, device: torch.device, *, compile: bool = False, precision: str = "fp32") -> Callable:
    """The callable the samplers evaluate: ``model`` itself by default (float32; the caller decides TF32), else
    ``torch.compile``-d (``compile``, same math up to float reassociation) and/or run under
    bf16/fp16 autocast (``precision``; fp16 needs CUDA). See tests/test_speed_options.py for the
    measured deviations from float32."""
    check_precision(precision, device)
    # static shapes: a smaller last batch recompiles instead of tracing symbolic sizes, which
    # inductor (torch 2.14, CPU) failed to lower for this UNet's training graph
    fn = torch.compile(model, dynamic=False) if compile else model
    dtype = AUTOCAST_DTYPES[precision]
    return fn if dtype is None else _Autocast(fn, device, dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError unless ``precision`` is a known name that ``device`` can run (fp16 needs CUDA)."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(AUTOCAST_DTYPES)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on the CPU")


def solver_options(solver: str, cfg: SampleConfig) -> dict:
    """The options ``solver`` takes, from the sample params: DDIM's η, the order, UniPC's variant."""
    values = {"eta": cfg.eta, "order": cfg.order, "variant": cfg.unipc_variant}
    return {key: values[key] for key in OPTIONS[solver]}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) as a usable device; DebiasError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DebiasError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DebiasError(f"device {name!r} requested but no CUDA device is available")
    return device


def sample_checkpoint(path: str | Path, solver: str, steps: int, num_samples: int, seed: int = 0,
                      batch_size: int = 64, **options) -> Tensor:
    """Sample a checkpoint's model (its first EMA unless ``ema`` is False); uint8 (N, C, H, W).
    Options as in :func:`sample_checkpoint_steps`."""
    return next(sample_checkpoint_steps(path, solver, [steps], num_samples, seed, batch_size, **options))[1]


def sample_checkpoint_steps(path: str | Path, solver: str, steps: Sequence[int], num_samples: int, seed: int = 0,
                            batch_size: int = 64, *, class_labels: Sequence[int] | None = None,
                            spacing: str = "even", clip_x0: bool = True, ema: bool = True, device: str = "cpu",
                            progress: Callable[[int, int], None] | None = None, compile: bool = False,
                            precision: str = "fp32", **solver_options) -> Iterator[tuple[int, Tensor]]:
    """(step count, uint8 (N, C, H, W) samples) for each of ``steps``, with the same seeds, from one
    load (and one compilation) of a checkpoint's model — its first EMA unless ``ema`` is False.

    On CUDA the model runs channels-last with TF32 matmuls; ``compile`` and ``precision`` as in
    :func:`fast_model`.

    The schedule, T, target and learned variance come from the checkpoint's config. Every problem a
    user can fix (unknown solver or option, too many steps, bad labels, a missing, corrupt or
    wrong-shape checkpoint) is a :class:`DebiasError`, raised before any sampling.
    """
    from debias.models.factory import model_from_checkpoint

    try:
        check_options(solver, solver_options)
    except ValueError as err:
        raise DebiasError(str(err)) from None
    if num_samples < 1 or batch_size < 1 or seed < 0:
        raise DebiasError("the number of samples and the batch size must be >= 1 and the seed >= 0")
    device = resolve_device(device)
    ckpt = load_checkpoint(path)
    try:
        diffusion, target = ckpt.config["diffusion"], check_target(ckpt.config["target"])
        schedule = Schedule.named(diffusion["schedule"], int(diffusion["steps"]))
        learn_sigma = bool(ckpt.config["model"]["learn_sigma"])
    except (KeyError, TypeError, ValueError) as err:
        raise DebiasError(f"{path}: the stored config has no usable diffusion/target/model settings ({err})") from None
    model = model_from_checkpoint(ckpt, ema=ema, source=str(path))
    if model.out_channels != model.in_channels * (2 if learn_sigma else 1):
        raise DebiasError(f"{path}: config learn_sigma={learn_sigma} does not match the model's "
                          f"{model.out_channels} output channels")
    try:
        for n in steps:
            select_timesteps(schedule.num_timesteps, n, spacing, multistep=solver in MULTISTEP)
        _labels_for([], seed, model.num_classes, class_labels)
    except ValueError as err:
        raise DebiasError(str(err)) from None
    try:
        check_precision(precision, device)
    except ValueError as err:
        raise DebiasError(str(err)) from None
    model = model.to(device)
    if device.type == "cuda":
        from debias.training import enable_fast_math

        enable_fast_math(device)
        model = model.to(memory_format=torch.channels_last)
    fn = fast_model(model, device, compile=compile, precision=precision)
    image_shape = (model.in_channels, model.image_size, model.image_size)
    for n in steps:
        yield n, generate(fn, schedule, target, learn_sigma, solver, n, num_samples, seed, batch_size,
                          class_labels=class_labels, clip_x0=clip_x0, spacing=spacing, device=device,
                          progress=progress, image_shape=image_shape, num_classes=model.num_classes,
                          **solver_options)


def _as_numpy(images: Tensor | np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) with C ∈ {1, 3} as a numpy array, validated."""
    arr = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {arr.dtype} {arr.shape}")
    return arr


def _save_png(array_hwc: np.ndarray, path: Path) -> None:
    """Write an (H, W, C) uint8 array as a PNG, atomically (grey for C = 1)."""
    image = Image.fromarray(array_hwc[..., 0] if array_hwc.shape[-1] == 1 else array_hwc)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_png_grid(images: Tensor | np.ndarray, path: str | Path, nrow: int | None = None, padding: int = 2) -> None:
    """Tile uint8 (N, C, H, W) images into one PNG, ``nrow`` per row (default ⌈√N⌉), black ``padding``."""
    arr = _as_numpy(images)
    n, c, h, w = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = np.zeros((padding + rows * (h + padding), padding + nrow * (w + padding), c), dtype=np.uint8)
    for k in range(n):
        top, left = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = arr[k].transpose(1, 2, 0)
    _save_png(grid, Path(path))


def save_png_folder(images: Tensor | np.ndarray, directory: str | Path, indices: Sequence[int] | None = None) -> None:
    """One PNG per image, ``{index:06d}.png`` in ``directory`` (index defaults to 0..N-1), each atomic."""
    arr = _as_numpy(images)
    indices = range(len(arr)) if indices is None else indices
    for index, image in zip(indices, arr):
        _save_png(image.transpose(1, 2, 0), Path(directory) / f"{int(index):06d}.png")


def save_npz(images: Tensor | np.ndarray, path: str | Path) -> None:
    """Save uint8 (N, C, H, W) images as ``images`` in an .npz file, atomically."""
    arr = _as_numpy(images)
    atomic_write(path, lambda f: np.savez(f, images=arr))


def load_npz(path: str | Path) -> Tensor:
    """The uint8 (N, C, H, W) ``images`` of an .npz written by :func:`save_npz`; DebiasError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"samples file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise DebiasError(f"{path} has no 'images' array (found: {', '.join(data.files) or 'nothing'})")
            arr = data["images"]
    except (OSError, ValueError, EOFError) as err:
        raise DebiasError(f"{path} is not a readable .npz file ({str(err).splitlines()[0][:200]})") from None
    try:
        return torch.from_numpy(_as_numpy(arr))
    except ValueError as err:
        raise DebiasError(f"{path}: {err}") from None


def writer_for(out: str | Path | None, out_dir: str | Path | None) -> Callable[[Tensor], Path]:
    """Validate an output choice and return ``write(images) -> path``.

    Exactly one of ``out`` (a ``.png`` grid or an ``.npz`` file) and ``out_dir`` (a folder of PNGs).
    """
    if (out is None) == (out_dir is None):
        raise DebiasError("give exactly one of --out (a .png grid or .npz file) and --out-dir (a folder of PNGs)")
    if out_dir is not None:
        directory = Path(out_dir)
        if directory.exists() and not directory.is_dir():
            raise DebiasError(f"--out-dir {directory} exists and is not a folder")

        def write_folder(images: Tensor) -> Path:
            save_png_folder(images, directory)
            return directory

        return write_folder
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DebiasError(f"--out {path}: unknown output kind {suffix or '(no suffix)'!r}; use .png (a grid) or .npz")
    save = save_png_grid if suffix == ".png" else save_npz

    def write_file(images: Tensor) -> Path:
        save(images, path)
        return path

    return write_file

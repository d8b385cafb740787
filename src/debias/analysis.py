"""The paper's evidence, measured: x0 bias per timestep and colour shift vs sampling steps.

Yu et al. (2024, §3) show that the constant-weighted ε-loss gives a biased estimate of x0,
worst at high noise (small SNR), because x̂0 = (x_t − σ ε̂)/α amplifies ε-errors by σ/α = 1/√SNR.
Sampling with few steps leans on exactly those estimates, which shows up as a colour/brightness
shift of the samples. These functions measure both for any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from debias.config import SampleConfig
from debias.errors import DebiasError
from debias.figures import plot_lines, save_sample_rows
from debias.images import ImageArray
from debias.io import write_tsv
from debias.metrics.features import Features, FeatureStats
from debias.metrics.scores import compute_metrics
from debias.models.factory import DiffusionModel
from debias.progress import Report
from debias.runtime import Ranks, gather_shards, shard_bounds
from debias.solvers.denoiser import Denoiser
from debias.sampling import sample_checkpoint


@dataclass
class BiasRow:
    """x̂0 error statistics at one timestep; ``bias`` is the signed mean error per channel (C,)."""

    t: int
    snr: float
    mse: float
    bias: list[float]

    @property
    def bias_norm(self) -> float:
        return sum(b * b for b in self.bias) ** 0.5


def evaluation_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps spread evenly over [0, T-1], both ends included."""
    count = min(count, num_timesteps)
    if count == 1:
        return [num_timesteps - 1]
    return sorted({round(i * (num_timesteps - 1) / (count - 1)) for i in range(count)})


@torch.inference_mode()
def x0_bias_per_timestep(model: DiffusionModel, images: Tensor, timesteps: Sequence[int], seed: int = 0,
                         batch_size: int = 256, labels: Tensor | None = None,
                         device: str | torch.device = "cpu", progress: Report | None = None) -> list[BiasRow]:
    """For real images x0 (N, C, H, W) in [-1, 1] and each t: noise them, predict x̂0 (unclipped), and
    report the mean squared error and the signed mean error per channel (the bias) over all images.

    ``model.network`` runs on ``device``. Under ``torch.distributed`` every rank takes whole batches of
    the images; the per-batch sums are gathered and added in batch order, as one process adds them, so
    the result is bitwise one process's. ``progress(done, total)`` counts timesteps."""
    schedule, rows, ranks = model.schedule, [], Ranks.current()
    first, last = shard_bounds(len(images), ranks, unit=batch_size)
    num_batches = -(-len(images) // batch_size)
    for t_value in timesteps:
        gen = torch.Generator().manual_seed(seed * 100_003 + int(t_value))
        noise = torch.randn(images.shape, generator=gen, dtype=images.dtype)
        partial = [torch.zeros(0, 1 + images.shape[1], dtype=torch.float64, device=device)]  # Σ err², Σ err per channel
        for start in range(first, last, batch_size):
            stop = min(start + batch_size, last)
            x0 = images[start:stop].to(device)
            t = torch.full((len(x0),), int(t_value), dtype=torch.long, device=device)
            xt = schedule.q_sample(x0, t, noise[start:stop].to(device))
            y = None if labels is None else labels[start:stop].to(device)
            denoiser = Denoiser(model.network, schedule, model.target, model.learn_sigma, clip_x0=False, labels=y)
            alpha, sigma = schedule.gather(schedule.alpha, t, xt), schedule.gather(schedule.sigma, t, xt)
            err = (denoiser(xt, schedule.timestep_map.to(device)[t], alpha, sigma).x0 - x0).double()
            partial.append(torch.cat([err.pow(2).sum().reshape(1), err.sum(dim=(0, 2, 3))]).reshape(1, -1))
        sums = torch.zeros(1 + images.shape[1], dtype=torch.float64)
        for batch_sums in gather_shards(torch.cat(partial), num_batches, torch.device(device), ranks):
            sums += batch_sums
        sq_sum, err_sum = sums[0], sums[1:]
        per_channel = images.numel() / images.shape[1]
        rows.append(BiasRow(t=int(t_value), snr=float(schedule.snr[int(t_value)]),
                            mse=float(sq_sum / images.numel()), bias=(err_sum / per_channel).tolist()))
        if progress is not None:
            progress(len(rows), len(timesteps))
    return rows


def channel_means(images: Tensor | ImageArray) -> Tensor:
    """Per-channel mean of uint8 (N, C, H, W) images — a tensor, or an :class:`~debias.images.ImageArray` read
    block by block — or of float images, as float64 (C,), in [0, 1] for uint8. (Sums of uint8 values are exact
    in float64, so the blocks give exactly the mean of the whole.)"""
    if isinstance(images, ImageArray):
        sums = sum(block.sum(dim=(0, 2, 3), dtype=torch.float64) for block in images.blocks())
        return sums / (len(images) * images.image_shape[1] * images.image_shape[2]) / 255.0
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    return images.double().mean(dim=(0, 2, 3)) / scale


@dataclass
class ShiftRow:
    """Colour statistics of samples drawn with ``steps`` steps; ``shift`` = sample mean − data mean per channel."""

    steps: int
    mean: list[float]
    shift: list[float]

    @property
    def shift_norm(self) -> float:
        return sum(s * s for s in self.shift) ** 0.5


def color_shift(samples_by_steps: dict[int, Tensor], data_mean: Tensor) -> list[ShiftRow]:
    """Per-channel mean of uint8 samples (N, C, H, W) for each step count, minus the data mean (C,) in [0, 1]."""
    rows = []
    for steps, samples in sorted(samples_by_steps.items()):
        mean = channel_means(samples)
        rows.append(ShiftRow(steps=steps, mean=mean.tolist(), shift=(mean - data_mean.double()).tolist()))
    return rows


def bias_table(rows: Sequence[BiasRow]) -> list[dict]:
    """Plot-ready records (one per timestep) with one bias column per channel."""
    return [{"t": r.t, "log_snr": round(float(torch.tensor(r.snr).log()), 6), "mse": r.mse, "bias_norm": r.bias_norm,
             **{f"bias_c{c}": b for c, b in enumerate(r.bias)}} for r in rows]


def shift_table(rows: Sequence[ShiftRow]) -> list[dict]:
    """Plot-ready records (one per step count) with per-channel mean and shift columns."""
    return [{"steps": r.steps, "shift_norm": r.shift_norm, **{f"shift_c{c}": s for c, s in enumerate(r.shift)},
             **{f"mean_c{c}": m for c, m in enumerate(r.mean)}} for r in rows]


def write_bias_analysis(model: DiffusionModel, images: Tensor, labels: Tensor | None, *, timesteps: int, seed: int,
                        batch_size: int, tsv: Path, png: Path, device: str | torch.device = "cpu",
                        progress: Report | None = None) -> list[dict]:
    """x̂0 error per timestep of a model (its network on ``device``) on real images (N, C, H, W) in
    [-1, 1]: TSV + figure, written by rank 0; ``progress(done, total)`` counts timesteps."""
    if labels is None and model.num_classes:
        raise DebiasError("the model is class-conditional; the images need labels")
    rows = x0_bias_per_timestep(model, images, evaluation_timesteps(model.schedule.num_timesteps, timesteps),
                                seed=seed, batch_size=batch_size, labels=labels if model.num_classes else None,
                                device=device, progress=progress)
    table = bias_table(rows)
    if Ranks.current().main:
        write_tsv(tsv, table)
        ts = [r["t"] for r in table]
        plot_lines(png, {"‖bias‖ (signed mean error)": (ts, [r["bias_norm"] for r in table]),
                         "MSE": (ts, [r["mse"] for r in table])},
                   title=f"x̂0 error per timestep ({model.config.get('weighting')}, {model.target})", xlabel="t",
                   ylabel="x̂0 error", logy=True)
    return table


def write_color_analysis(checkpoint: Path, data_mean: Tensor, solver: str, cfg: SampleConfig, *, steps: Sequence[int],
                         num_samples: int, seed: int, tsv: Path, png: Path, grid_png: Path, device: str = "cpu",
                         progress: Report | None = None) -> list[dict]:
    """Colour shift vs sampling steps: ``num_samples`` samples of ``solver`` (the sample params ``cfg``, with
    ``seed``) at each of ``steps``, the same seeds at every step count: TSV, curve and the Figure-1-style grid
    (one row of the first 8 seeds per step count), written by rank 0; ``progress(done, total)`` counts the
    network evaluations of each step count in turn."""
    samples = dict(sample_checkpoint(checkpoint, solver, cfg, steps=steps, num_samples=num_samples, seed=seed,
                                     device=device, progress=progress))
    table = shift_table(color_shift(samples, data_mean))
    if Ranks.current().main:
        write_tsv(tsv, table)
        plot_lines(png, {"‖mean shift‖": ([r["steps"] for r in table], [r["shift_norm"] for r in table])},
                   title=f"colour shift vs sampling steps ({solver})", xlabel="sampling steps",
                   ylabel="‖sample mean − data mean‖", logx=True)
        save_sample_rows(grid_png, {f"{n} steps": images[:8] for n, images in samples.items()})
    return table


def write_fid_vs_training(snapshots: Sequence[Path], reference: Features | FeatureStats, solver: str, cfg: SampleConfig,
                          *, steps: int, num_samples: int, seed: int, eval_options: dict, tsv: Path, png: Path,
                          device: str = "cpu", progress: Report | None = None) -> list[dict]:
    """FID of each training snapshot (``step_<k>.pt``): ``num_samples`` samples of ``solver`` (the sample params
    ``cfg``, with ``seed``) at ``steps``: TSV + curve, written by rank 0; ``progress(done, total)`` counts
    snapshots."""
    rows = []
    for path in sorted(snapshots):
        _, images = next(sample_checkpoint(path, solver, cfg, steps=[steps], num_samples=num_samples, seed=seed,
                                           device=device))
        result = compute_metrics(images, reference, metrics=("fid",), device=device, **eval_options)
        rows.append({"train_step": int(path.stem.removeprefix("step_")), "fid": result["fid"]})
        if progress is not None:
            progress(len(rows), len(snapshots))
    if Ranks.current().main:
        write_tsv(tsv, rows)
        plot_lines(png, {"FID": ([r["train_step"] for r in rows], [r["fid"] for r in rows])},
                   title=f"FID vs training ({solver}, {steps} steps)", xlabel="training step", ylabel="FID")
    return rows

"""Training throughput, FLOPs, MFU and peak memory of the real training step — ours vs the original.

    python benchmarks/train_throughput.py --device cpu --configs c,d --baseline
    python benchmarks/train_throughput.py --device cpu --configs d --precision bf16 --baseline
    python benchmarks/train_throughput.py --device cuda --configs e --precision bf16 --compile --baseline

Each config runs :meth:`debias.train.loop.Trainer.step` (data slice, noise, forward, hybrid loss,
backward, clipping, fused AdamW, EMA) on random images. With ``--baseline`` a second trainer with the
same config runs the ORIGINAL: its model code paths (``baseline_unet.make_baseline``: forced
checkpointing and einsum attention in every attention block, float32 GroupNorm casts) stepped by its
training loop (``baseline_unet.UpstreamTrainer``: numpy timestep sampling, per-step ``.item()`` loss
and norm logging, AdamW's per-parameter loop, per-parameter EMA), always in float32 and uncompiled
as the original ran; its steps are interleaved one for one with ours in this process, so both see
the same machine load, and the ratio of the two medians is printed.

Images/s is the median over the timed steps after warm-up. GFLOP/step is 3x the forward pass
counted by ``FlopCounterMode`` on the original's einsum attention (so attention is counted, and the
original's recomputation is not: both models are credited the same useful work). MFU divides the
achieved FLOP/s by a matmul peak measured in the same run (2048x2048 matmuls in the training
precision). Warm-up is the wall time of the untimed first steps (with
``--compile``: mostly compilation). Peak memory is CUDA max-allocated during one step, or on CPU the process's peak RSS
during one step (VmHWM reset before it; both trainers are resident when ``--baseline``).
Config ``e`` (the paper's CelebA-HQ 256x256 model) runs on CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baseline_unet import UpstreamTrainer, make_baseline
from common import CONFIGS, add_common_args, config_for, config_names, forward_flops, peak_memory_mib, \
    reset_peak_memory, run_configs, speedup_row, start, sync
from debias.config import Config
from debias.data.datasets import ImageDataset
from debias.models.factory import unet_kwargs_for
from debias.runtime import Ranks
from debias.train.loop import Trainer, run_logs

# The original's training throughput on the 2-core CPU this project is developed on (fp32, AdamW,
# median of a few steps, 2026-11-25): the reference the issue asks us to beat by 1.5x.
REFERENCE_IMAGES_PER_S = {"b": 540.0, "c": 120.0, "d": 12.6}


def random_dataset(cfg: Config, n: int) -> ImageDataset:
    shape = (n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return ImageDataset(images=torch.rand(shape) * 2 - 1, labels=torch.zeros(n, dtype=torch.int64), num_classes=1)


def make_trainer(cfg: Config, device: torch.device, log_dir: Path, dataset: ImageDataset,
                 trainer_class: type[Trainer] = Trainer) -> Trainer:
    return trainer_class(cfg, dataset, unet_kwargs_for(cfg, dataset.num_classes), device, Ranks(),
                         run_logs(cfg, log_dir, device, Ranks()))


def timed_step(trainer: Trainer, k: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    trainer.step(k)
    sync(device)
    return time.perf_counter() - start


def step_memory(trainer: Trainer, k: int, device: torch.device) -> float:
    reset_peak_memory(device)
    trainer.step(k)
    sync(device)
    return peak_memory_mib(device)


def bench(name: str, args: argparse.Namespace, device: torch.device, peak: float) -> list[str]:
    overrides = CONFIGS[name][1]
    cfg = config_for(overrides, device, args.precision, args.compile)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = random_dataset(cfg, 4 * cfg.train.batch_size)
        torch.manual_seed(0)
        trainer = make_trainer(cfg, device, Path(tmp) / "ours", dataset)
        if args.channels_last:
            trainer.model.to(memory_format=torch.channels_last)
        runs = {"ours": trainer}
        if args.baseline:
            base = make_trainer(config_for(overrides, device, "fp32", False), device, Path(tmp) / "orig", dataset,
                                UpstreamTrainer)
            base.model.load_state_dict(trainer.model.state_dict())
            runs["original"] = base
            make_baseline(base.model)
        shape = (cfg.train.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        x = torch.randn(shape, device=device)
        t = torch.randint(0, cfg.diffusion.steps, (shape[0],), device=device)
        flops = 3 * forward_flops(trainer.model, x, t)
        params = sum(p.numel() for p in trainer.network.parameters())
        warmup = {}
        for label, run in runs.items():
            start = time.perf_counter()
            for k in range(args.warmup):
                run.step(k)
            sync(device)
            warmup[label] = time.perf_counter() - start
        memory = {label: step_memory(run, args.warmup, device) for label, run in runs.items()}
        times: dict[str, list[float]] = {label: [] for label in runs}
        for k in range(args.warmup + 1, args.warmup + 1 + args.steps):
            for label, run in runs.items():  # interleaved: both see the same machine load
                times[label].append(timed_step(run, k, device))
    rows, medians = [], {}
    for label in runs:
        seconds = medians[label] = statistics.median(times[label])
        achieved = flops / seconds
        images = cfg.train.batch_size / seconds
        ref = REFERENCE_IMAGES_PER_S.get(name) if device.type == "cpu" else None  # CPU figures
        vs_ref = f"{images / ref:6.2f}x" if ref and label == "ours" else f"{'':>7}"
        rows.append(f"{name:<2} {label:<9} {params / 1e6:7.2f}M {cfg.train.batch_size:5d} {images:10.1f} "
                    f"{flops / 1e9:9.2f} {achieved / 1e9:9.1f} {100 * achieved / peak:6.1f}% {memory[label]:9.0f} "
                    f"{warmup[label]:8.1f} {vs_ref}  {CONFIGS[name][0]}")
    if args.baseline:
        rows.append(speedup_row(f"{name:<2}", medians))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_configs="a,b,c,d")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the original's code paths (fp32, eager), interleaved, and print the ratio")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config (and per model)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    args = parser.parse_args()
    names = config_names(parser, args)
    device, peak = start(args, f"original: fp32 eager; median of {args.steps} steps after {args.warmup} warm-up")
    header = (f"{'':<2} {'model':<9} {'params':>8} {'batch':>5} {'images/s':>10} {'GFLOP/st':>9} {'GFLOP/s':>9} "
              f"{'MFU':>7} {'peak MiB':>9} {'warm-up':>8} {'vs ref':>7}  config")
    run_configs(names, device, header, lambda name: bench(name, args, device, peak))


if __name__ == "__main__":
    main()

"""Training throughput, FLOPs, MFU and peak memory of the real training step — ours vs the original.

    python benchmarks/train_throughput.py --device cpu --configs c,d --baseline
    python benchmarks/train_throughput.py --device cpu --configs d --precision bf16 --baseline
    python benchmarks/train_throughput.py --device cuda --configs e --precision bf16 --compile --baseline

Each config runs :meth:`debias.training.Trainer.step` (data slice, noise, forward, hybrid loss,
backward, clipping, fused AdamW, EMA) on random images. With ``--baseline`` a second trainer with the
same config runs the ORIGINAL's code paths (``baseline_unet.make_baseline``: forced checkpointing
and einsum attention in every attention block, float32 GroupNorm casts), always in float32 and
uncompiled as the original ran; its steps are interleaved one for one with ours in this process, so
both see the same machine load, and the ratio of the two medians is printed.

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
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from baseline_unet import make_baseline
from debias.config import Config, config_from_dict
from debias.data import ImageDataset
from debias.models.factory import unet_kwargs_for
from debias.models.unet import UNetModel
from debias.training import Ranks, Trainer, enable_fast_math, select_device

# The original's training throughput on the 2-core CPU this project is developed on (fp32, AdamW,
# median of a few steps, 2026-11-25): the reference the issue asks us to beat by 1.5x.
REFERENCE_IMAGES_PER_S = {"b": 540.0, "c": 120.0, "d": 12.6}

CONFIGS: dict[str, tuple[str, dict]] = {
    "a": ("digits default 8x8x1, 32ch [1,2], attn 4, bs 128", {}),
    "b": ("8x8x3, 32ch [1,2], attn 4, bs 128, learned sigma",
          {"data": {"image_size": 8, "channels": 3},
           "model": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [4], "learn_sigma": True},
           "train": {"batch_size": 128}}),
    "c": ("16x16x3, 32ch [1,2,2], attn 8, bs 64",
          {"data": {"image_size": 16, "channels": 3},
           "model": {"model_channels": 32, "channel_mult": [1, 2, 2], "attention_resolutions": [8]},
           "train": {"batch_size": 64}}),
    "d": ("32x32x3, 64ch [1,2,2,2], attn 16, 1 res block, bs 32",
          {"data": {"image_size": 32, "channels": 3},
           "model": {"model_channels": 64, "channel_mult": [1, 2, 2, 2], "attention_resolutions": [16],
                     "num_res_blocks": 1},
           "train": {"batch_size": 32}}),
    "e": ("CelebA-HQ 256x256x3 (paper), 128ch [1,1,2,2,4,4], attn 16, 64/head, 1 res block, updown, "
          "scale-shift, learned sigma, bs 16 (CUDA only)",
          {"data": {"image_size": 256, "channels": 3},
           "model": {"model_channels": 128, "channel_mult": [1, 1, 2, 2, 4, 4], "attention_resolutions": [16],
                     "num_head_channels": 64, "num_res_blocks": 1, "resblock_updown": True,
                     "use_scale_shift_norm": True, "learn_sigma": True},
           "train": {"batch_size": 16}}),
}
GPU_ONLY = {"e"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` FLOP/s of an n×n matmul in the training precision (fp16/bf16 → that dtype)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type != "cuda" and dtype == torch.float16:
        dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def forward_flops(model: UNetModel, x: torch.Tensor, t: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted on the original's einsum attention (SDPA kernels may go uncounted)."""
    counted = make_baseline(copy.deepcopy(model)).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        counted(x, t)
    return counter.get_total_flops()


def random_dataset(cfg: Config, n: int) -> ImageDataset:
    shape = (n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return ImageDataset(images=torch.rand(shape) * 2 - 1, labels=torch.zeros(n, dtype=torch.int64), num_classes=1)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_trainer(cfg: Config, device: torch.device, log_dir: Path, dataset: ImageDataset) -> Trainer:
    return Trainer(cfg, dataset, unet_kwargs_for(cfg, dataset.num_classes), device, Ranks(), log_dir)


def config_for(overrides: dict, device: torch.device, precision: str, compile: bool) -> Config:
    return config_from_dict({**overrides, "train": {**overrides.get("train", {}), "precision": precision,
                                                    "compile": compile, "devices": device.type}})


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
            base = make_trainer(config_for(overrides, device, "fp32", False), device, Path(tmp) / "orig", dataset)
            base.model.load_state_dict(trainer.model.state_dict())
            runs["original"] = base
            make_baseline(base.model)
        shape = (cfg.train.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        x = torch.randn(shape, device=device)
        t = torch.randint(0, cfg.diffusion.steps, (shape[0],), device=device)
        flops = 3 * forward_flops(trainer.model, x, t)
        params = sum(p.numel() for p in trainer.params)
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
        rows.append(f"{name:<2} ours/original speed-up (same process, interleaved): "
                    f"{medians['original'] / medians['ours']:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--channels-last", action="store_true",
                        help="our model in channels-last memory format (always on for CUDA)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the original's code paths (fp32, eager), interleaved, and print the ratio")
    parser.add_argument("--configs", default="a,b,c,d", help="comma-separated subset of a,b,c,d,e (e: CUDA only)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config (and per model)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = select_device(args.device, 0)
    enable_fast_math(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, args.precision)
    print(f"torch {torch.__version__} on {name}; ours: precision {args.precision}, compile {args.compile}, "
          f"channels_last {args.channels_last or device.type == 'cuda'}; original: fp32 eager; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048x2048, {args.precision}); "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':<2} {'model':<9} {'params':>8} {'batch':>5} {'images/s':>10} {'GFLOP/st':>9} {'GFLOP/s':>9} "
          f"{'MFU':>7} {'peak MiB':>9} {'warm-up':>8} {'vs ref':>7}  config")
    for config_name in names:
        if config_name in GPU_ONLY and device.type != "cuda":
            print(f"{config_name:<2} skipped: {CONFIGS[config_name][0]} needs a GPU")
            continue
        for row in bench(config_name, args, device, peak):
            print(row, flush=True)


if __name__ == "__main__":
    main()

"""Training throughput, FLOPs, MFU and peak memory of the real training step on this machine.

    python benchmarks/train_throughput.py --device cpu --configs a,b
    python benchmarks/train_throughput.py --device cuda --precision bf16 --compile

Each config runs :meth:`debias.training.Trainer.step` (data slice, noise, forward, hybrid loss,
backward, clipping, AdamW, EMA) on random images. Images/s is the median over the timed steps after
warm-up. GFLOP/step is counted by ``FlopCounterMode`` over one whole step (forward + backward);
MFU divides the achieved FLOP/s by a matmul peak measured in the same run (2048×2048 matmuls in the
training precision). Peak memory is CUDA max-allocated, or the process's peak RSS on CPU (reset per
config where Linux allows it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from debias.config import Config, config_from_dict
from debias.data import ImageDataset
from debias.models.factory import unet_kwargs_for
from debias.training import Ranks, Trainer, enable_fast_math, select_device

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
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` FLOP/s of an n×n matmul in the training precision (fp16/bf16 → that dtype on CUDA)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type != "cuda":
        dtype = torch.float32 if precision != "bf16" else torch.bfloat16
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


def step_flops(cfg: Config, device: torch.device, log_dir: Path) -> int:
    """FLOPs of one training step (forward + backward), counted on an uncompiled trainer."""
    trainer = make_trainer(config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "compile": False}}),
                           device, log_dir)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(0)
    return counter.get_total_flops()


def make_trainer(cfg: Config, device: torch.device, log_dir: Path) -> Trainer:
    dataset = random_dataset(cfg, 4 * cfg.train.batch_size)
    return Trainer(cfg, dataset, unet_kwargs_for(cfg, dataset.num_classes), device, Ranks(), log_dir)


def bench(name: str, overrides: dict, args: argparse.Namespace, device: torch.device, peak: float) -> str:
    raw = {**overrides, "train": {**overrides.get("train", {}), "precision": args.precision,
                                  "compile": args.compile, "devices": device.type}}
    cfg = config_from_dict(raw)
    with tempfile.TemporaryDirectory() as tmp:
        flops = step_flops(cfg, device, Path(tmp))
        reset_peak_memory(device)
        trainer = make_trainer(cfg, device, Path(tmp))
        params = sum(p.numel() for p in trainer.params)
        for k in range(args.warmup):
            trainer.step(k)
        times = []
        for k in range(args.warmup, args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            trainer.step(k)
            sync(device)
            times.append(time.perf_counter() - start)
        memory = peak_memory_mib(device)
    seconds = statistics.median(times)
    achieved = flops / seconds
    return (f"{name:<2} {params / 1e6:7.2f}M {cfg.train.batch_size:5d} {cfg.train.batch_size / seconds:10.1f} "
            f"{flops / 1e9:9.2f} {achieved / 1e9:9.1f} {100 * achieved / peak:6.1f}% {memory:9.0f}  "
            f"{CONFIGS[name][0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--configs", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")

    device = select_device(args.device, 0)
    enable_fast_math(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, args.precision)
    print(f"torch {torch.__version__} on {name}; precision {args.precision}; compile {args.compile}; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048x2048)")
    print(f"{'':<2} {'params':>8} {'batch':>5} {'images/s':>10} {'GFLOP/st':>9} {'GFLOP/s':>9} {'MFU':>7} "
          f"{'peak MiB':>9}  config")
    for config_name in names:
        print(bench(config_name, CONFIGS[config_name][1], args, device, peak), flush=True)


if __name__ == "__main__":
    main()

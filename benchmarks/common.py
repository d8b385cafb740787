"""What the benchmark scripts share: the configs, device set-up, the matmul peak, FLOP counting and
peak memory.

Every script prints one header line (torch, device, threads, the speed options and the matmul peak
measured in the same run, which doubles as a load indicator on a shared machine) and then one row
per measurement.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from baseline_unet import make_baseline
from debias.config import Config, config_from_dict
from debias.models.unet import UNetModel
from debias.runtime import AUTOCAST_DTYPES, PRECISIONS, enable_tf32, resolve_device

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
    "f": ("64x64x3, 32ch [1,2,2,2], attn 16, 1 res block, bs 32",
          {"data": {"image_size": 64, "channels": 3},
           "model": {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "attention_resolutions": [16],
                     "num_res_blocks": 1},
           "train": {"batch_size": 32}}),
}
GPU_ONLY = {"e"}


def add_common_args(parser: argparse.ArgumentParser, default_configs: str | None) -> None:
    """--device and --threads; unless ``default_configs`` is None also --configs and our speed options
    --precision, --compile and --channels-last."""
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    if default_configs is None:
        return
    parser.add_argument("--configs", default=default_configs,
                        help=f"comma-separated subset of {','.join(CONFIGS)} ({','.join(sorted(GPU_ONLY))}: CUDA only)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--channels-last", action="store_true", help="our model channels-last (always on CUDA)")


def config_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    return names


def start(args: argparse.Namespace, what: str) -> tuple[torch.device, float]:
    """Threads, device and fast math as the library sets them; prints the header line and returns
    (device, matmul peak FLOP/s in our precision: ``args.precision``, else fp32)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    enable_tf32(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = getattr(args, "precision", "fp32")
    peak = matmul_peak(device, precision)
    options = f"; ours: precision {precision}, compile {args.compile}, " \
              f"channels_last {args.channels_last or device.type == 'cuda'}" if hasattr(args, "compile") else ""
    print(f"torch {torch.__version__} on {name}{options}; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(2048x2048, {precision}); {what}")
    return device, peak


def run_configs(names: list[str], device: torch.device, header: str, bench: Callable[[str], list[str]]) -> None:
    """Print the table ``header``, then ``bench(name)``'s rows for every config (GPU-only ones skipped off CUDA)."""
    print(header)
    for name in names:
        if name in GPU_ONLY and device.type != "cuda":
            print(f"{name:<2} skipped: {CONFIGS[name][0]} needs a GPU")
            continue
        for row in bench(name):
            print(row, flush=True)


def speedup_row(prefix: str, medians: dict[str, float]) -> str:
    """The closing row of a comparison: the original's median time over ours."""
    return f"{prefix} ours/original speed-up (same process, interleaved): {medians['original'] / medians['ours']:.2f}x"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` FLOP/s of an n×n matmul in ``precision`` (fp16 is measured as bf16 off CUDA)."""
    dtype = AUTOCAST_DTYPES[precision] or torch.float32
    if device.type != "cuda" and dtype == torch.float16:
        dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        began = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - began)
    return 2 * n**3 / min(times)


def forward_flops(model: UNetModel, x: torch.Tensor, t: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted on the original's einsum attention (SDPA kernels may go uncounted)."""
    counted = make_baseline(copy.deepcopy(model)).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        counted(x, t)
    return counter.get_total_flops()


def config_for(overrides: dict, device: torch.device, precision: str, compile: bool) -> Config:
    return config_from_dict({**overrides, "train": {**overrides.get("train", {}), "precision": precision,
                                                    "compile": compile, "devices": device.type}})


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max-allocated, or on CPU the process's peak RSS (since the last reset where Linux allows it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

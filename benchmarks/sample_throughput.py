"""Sampling throughput per solver and per network evaluation (NFE) — ours vs the original.

    python benchmarks/sample_throughput.py --device cpu --configs b,c,d --solvers ddim
    python benchmarks/sample_throughput.py --device cpu --configs d --precision bf16
    python benchmarks/sample_throughput.py --device cuda --configs e --precision bf16 --compile

Each (config, solver) runs :func:`debias.sampling.generate` — the library's sampling path, per-sample
noise generators, ``torch.inference_mode`` and all — on a freshly initialised UNet, for our model
(with the chosen speed options: ``--precision``, ``--compile``, channels-last on CUDA) and for the
ORIGINAL's code paths on the same weights (``baseline_unet.make_baseline``: einsum attention,
float32 GroupNorm casts; float32, eager), the two interleaved run by run in this process. Reported:
the median over ``--reps`` timed runs (after one warm-up run each, whose wall time is shown:
with ``--compile`` mostly compilation) as images/s and ms per NFE, the
achieved GFLOP/s and MFU (forward FLOPs counted by ``FlopCounterMode`` x NFE; matmul peak measured
in this run in the sampling precision), the peak memory of one run (CUDA max-allocated, or the
process's peak RSS on CPU, VmHWM reset first; both models resident) and the speed-up ours/original.
Config ``e`` (the paper's CelebA-HQ 256x256 model) runs on CUDA only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from baseline_unet import make_baseline
from debias.diffusion.schedule import Schedule
from debias.models.factory import unet_kwargs_for
from debias.models.unet import UNetModel
from debias.sampling import fast_model, generate
from debias.training import enable_fast_math, select_device
from train_throughput import CONFIGS, GPU_ONLY, config_for, forward_flops, matmul_peak, peak_memory_mib, \
    reset_peak_memory, sync

SOLVERS = ("ddim", "ddpm", "dpmsolver++", "unipc")
DEFAULT_BATCH = {"a": 64, "b": 64, "c": 64, "d": 16, "e": 16}


def run_once(fn, model: UNetModel, schedule: Schedule, learn_sigma: bool, solver: str, steps: int, n: int,
             device: torch.device) -> float:
    """Seconds for one ``generate`` call of n images in one batch."""
    sync(device)
    start = time.perf_counter()
    generate(fn, schedule, "eps", learn_sigma, solver, steps, n, 0, n, device=device,
             image_shape=(model.in_channels, model.image_size, model.image_size), num_classes=None)
    sync(device)
    return time.perf_counter() - start


def bench(name: str, args: argparse.Namespace, device: torch.device, peak: float) -> list[str]:
    cfg = config_for(CONFIGS[name][1], device, args.precision, args.compile)
    n = args.n or DEFAULT_BATCH[name]
    torch.manual_seed(0)
    model = UNetModel(**unet_kwargs_for(cfg, None)).to(device).eval().requires_grad_(False)
    original = make_baseline(copy.deepcopy(model))
    if device.type == "cuda" or args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fns = {"ours": fast_model(model, device, compile=args.compile, precision=args.precision)}
    if not args.no_baseline:
        fns["original"] = original
    schedule = Schedule.named(cfg.diffusion.schedule, cfg.diffusion.steps)
    shape = (n, model.in_channels, model.image_size, model.image_size)
    flops_per_nfe = forward_flops(model, torch.randn(shape, device=device),
                                  torch.randint(0, cfg.diffusion.steps, (n,), device=device))
    rows = []
    for solver in args.solvers.split(","):
        memory, warmup, times = {}, {}, {label: [] for label in fns}
        for label, fn in fns.items():  # warm-up run (compilation, allocator), measuring peak memory
            reset_peak_memory(device)
            warmup[label] = run_once(fn, model, schedule, cfg.model.learn_sigma, solver, args.steps, n, device)
            memory[label] = peak_memory_mib(device)
        for _ in range(args.reps):
            for label, fn in fns.items():  # interleaved: both see the same machine load
                times[label].append(run_once(fn, model, schedule, cfg.model.learn_sigma, solver, args.steps, n,
                                             device))
        medians = {label: statistics.median(ts) for label, ts in times.items()}
        for label, seconds in medians.items():
            achieved = flops_per_nfe * args.steps / seconds
            rows.append(f"{name:<2} {solver:<11} {label:<9} {n:5d} {args.steps:4d} {n / seconds:9.2f} "
                        f"{1000 * seconds / args.steps:9.1f} {achieved / 1e9:9.1f} {100 * achieved / peak:6.1f}% "
                        f"{memory[label]:9.0f} {warmup[label]:8.1f}")
        if "original" in medians:
            rows.append(f"{name:<2} {solver:<11} ours/original speed-up (same process, interleaved): "
                        f"{medians['original'] / medians['ours']:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--channels-last", action="store_true", help="our model channels-last (always on CUDA)")
    parser.add_argument("--configs", default="b,c,d", help="comma-separated subset of a,b,c,d,e (e: CUDA only)")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated subset of {', '.join(SOLVERS)}")
    parser.add_argument("--steps", type=int, default=20, help="NFE per sample (solver steps)")
    parser.add_argument("--n", type=int, default=None, help="images per run, one batch (default per config)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per model and solver")
    parser.add_argument("--no-baseline", action="store_true", help="time only our model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    bad = [s for s in args.solvers.split(",") if s not in SOLVERS]
    if bad:
        parser.error(f"unknown solver {bad[0]!r}; choose from {', '.join(SOLVERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = select_device(args.device, 0)
    enable_fast_math(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak(device, args.precision)
    print(f"torch {torch.__version__} on {name}; ours: precision {args.precision}, compile {args.compile}, "
          f"channels_last {args.channels_last or device.type == 'cuda'}; original: fp32 eager; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (2048x2048, {args.precision}); median of {args.reps} runs")
    print(f"{'':<2} {'solver':<11} {'model':<9} {'batch':>5} {'NFE':>4} {'images/s':>9} {'ms/NFE':>9} "
          f"{'GFLOP/s':>9} {'MFU':>7} {'peak MiB':>9} {'warm-up':>8}")
    for config_name in names:
        if config_name in GPU_ONLY and device.type != "cuda":
            print(f"{config_name:<2} skipped: {CONFIGS[config_name][0]} needs a GPU")
            continue
        for row in bench(config_name, args, device, peak):
            print(row, flush=True)


if __name__ == "__main__":
    main()

"""Sampling throughput per solver and per network evaluation (NFE) — ours vs the original.

    python benchmarks/sample_throughput.py --device cpu --configs b,c,d --solvers ddim
    python benchmarks/sample_throughput.py --device cpu --configs d --precision bf16
    python benchmarks/sample_throughput.py --device cuda --configs e --precision bf16 --compile

Each (config, solver) samples one batch from a freshly initialised UNet, ours and the ORIGINAL on
the same weights, the two interleaved run by run in this process:

- ours: :func:`debias.sampling.generate` — the library's sampling path, per-sample noise generators,
  ``torch.inference_mode`` and all — with the chosen speed options (``--precision``, ``--compile``,
  channels-last on CUDA);
- the original: the UNet on upstream's code paths (``baseline_unet.make_baseline``: einsum attention,
  float32 GroupNorm casts; float32, eager); for DDIM in upstream's own loop
  (``baseline_unet.upstream_ddim``: ``no_grad``, the full ``p_mean_variance`` and a noise draw per
  step). DDPM, DPM-Solver++ and UniPC run the original's UNet in our solvers (guided-diffusion has no
  DPM-Solver or UniPC; its DDPM step is the one ours reproduces), so those rows compare the network only.

Reported:
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
from collections.abc import Callable

import torch

from baseline_unet import make_baseline, upstream_ddim
from common import CONFIGS, add_common_args, config_for, config_names, forward_flops, peak_memory_mib, \
    reset_peak_memory, run_configs, speedup_row, start, sync
from debias.diffusion.schedule import Schedule
from debias.models.factory import DiffusionModel, unet_kwargs_for
from debias.models.unet import UNetModel
from debias.runtime import inference_network
from debias.sampling import generate, plan_for

SOLVERS = ("ddim", "ddpm", "dpmsolver++", "unipc")
DEFAULT_BATCH = {"a": 64, "b": 64, "c": 64, "d": 16, "e": 16}


def sampler_for(label: str, fn, schedule: Schedule, learn_sigma: bool, solver: str, steps: int,
                shape: tuple[int, ...], device: torch.device) -> Callable[[], object]:
    """A no-argument call that samples one batch of ``shape`` with ``solver`` as ``label`` would."""
    if label == "original" and solver == "ddim":
        return lambda: upstream_ddim(fn, shape, steps, schedule, learn_sigma)
    model = DiffusionModel(fn, schedule, "eps", learn_sigma, shape[1:])
    plan = plan_for(solver, seed=0, batch_size=shape[0])  # the sample params' defaults for this solver
    return lambda: generate(model, plan, steps, shape[0], device=device)


def run_once(sample: Callable[[], object], device: torch.device) -> float:
    """Seconds for one ``sample()``."""
    sync(device)
    began = time.perf_counter()
    sample()
    sync(device)
    return time.perf_counter() - began


def bench(name: str, args: argparse.Namespace, device: torch.device, peak: float) -> list[str]:
    cfg = config_for(CONFIGS[name][1], device, args.precision, args.compile)
    n = args.n or DEFAULT_BATCH[name]
    torch.manual_seed(0)
    model = UNetModel(**unet_kwargs_for(cfg, None)).to(device).eval().requires_grad_(False)
    original = make_baseline(copy.deepcopy(model))
    if device.type == "cuda" or args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fns = {"ours": inference_network(model, device, compile=args.compile, precision=args.precision)}
    if not args.no_baseline:
        fns["original"] = original
    schedule = Schedule.named(cfg.diffusion.schedule, cfg.diffusion.steps)
    shape = (n, model.in_channels, model.image_size, model.image_size)
    flops_per_nfe = forward_flops(model, torch.randn(shape, device=device),
                                  torch.randint(0, cfg.diffusion.steps, (n,), device=device))
    rows = []
    for solver in args.solvers.split(","):
        samplers = {label: sampler_for(label, fn, schedule, cfg.model.learn_sigma, solver, args.steps, shape, device)
                    for label, fn in fns.items()}
        memory, warmup, times = {}, {}, {label: [] for label in fns}
        for label, sample in samplers.items():  # warm-up run (compilation, allocator), measuring peak memory
            reset_peak_memory(device)
            warmup[label] = run_once(sample, device)
            memory[label] = peak_memory_mib(device)
        for _ in range(args.reps):
            for label, sample in samplers.items():  # interleaved: both see the same machine load
                times[label].append(run_once(sample, device))
        medians = {label: statistics.median(ts) for label, ts in times.items()}
        for label, seconds in medians.items():
            achieved = flops_per_nfe * args.steps / seconds
            rows.append(f"{name:<2} {solver:<11} {label:<9} {n:5d} {args.steps:4d} {n / seconds:9.2f} "
                        f"{1000 * seconds / args.steps:9.1f} {achieved / 1e9:9.1f} {100 * achieved / peak:6.1f}% "
                        f"{memory[label]:9.0f} {warmup[label]:8.1f}")
        if "original" in medians:
            rows.append(speedup_row(f"{name:<2} {solver:<11}", medians))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_configs="b,c,d")
    parser.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated subset of {', '.join(SOLVERS)}")
    parser.add_argument("--steps", type=int, default=20, help="NFE per sample (solver steps)")
    parser.add_argument("--n", type=int, default=None, help="images per run, one batch (default per config)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per model and solver")
    parser.add_argument("--no-baseline", action="store_true", help="time only our model")
    args = parser.parse_args()
    names = config_names(parser, args)
    bad = [s for s in args.solvers.split(",") if s not in SOLVERS]
    if bad:
        parser.error(f"unknown solver {bad[0]!r}; choose from {', '.join(SOLVERS)}")
    device, peak = start(args, f"original: fp32 eager; median of {args.reps} runs")
    header = (f"{'':<2} {'solver':<11} {'model':<9} {'batch':>5} {'NFE':>4} {'images/s':>9} {'ms/NFE':>9} "
              f"{'GFLOP/s':>9} {'MFU':>7} {'peak MiB':>9} {'warm-up':>8}")
    run_configs(names, device, header, lambda name: bench(name, args, device, peak))


if __name__ == "__main__":
    main()

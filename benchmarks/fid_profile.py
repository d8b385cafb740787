"""Where the time of Inception feature extraction goes, and what each speed option pays (CPU or CUDA).

    python benchmarks/fid_profile.py --device cpu --size 32 --batch 16

1. An operator profile (``torch.profiler``) of one batch through torch-fidelity's own module, the
   same module channels-last, and ours (:class:`debias.metrics.extractor.FastInception`), grouped:
   convolutions, pooling, batch norm, the resize to 299x299, concatenation, ReLU, the rest.
2. Ours at several batch sizes, with 1 and all threads, and under ``torch.compile`` (warm-up timed).
"""

import argparse
import copy
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from common import add_common_args, start, sync
from debias.metrics.extractor import exact_float32
from debias.metrics.inception import extractor, fidelity_extractor, resolve_inception_weights

GROUPS = {"convolution": ("convolution",), "pooling": ("pool",), "batch norm": ("batch_norm",),
          "resize": ("index", "sub", "mul", "add", "mm", "div"), "concatenation": ("cat",), "relu": ("clamp", "relu")}


def group_of(op: str) -> str:
    return next((group for group, keys in GROUPS.items() if any(key in op for key in keys)), "rest")


def profile_groups(model, x, device) -> dict[str, float]:
    """Self time (s) of one forward pass per group of operators."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), exact_float32(device):
        model(x)
        with profile(activities=activities) as prof:
            model(x)
            sync(device)
    totals = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and not event.key.startswith("aten::_"):
            totals[group_of(event.key)] += (event.self_device_time_total if device.type == "cuda"
                                            else event.self_cpu_time_total) / 1e6
    return totals


def rate(fn, x, device, reps: int = 3) -> float:
    """Best images/s of ``reps`` passes of ``fn(x)`` after one warm-up."""
    with torch.inference_mode(), exact_float32(device):
        fn(x)
        best = float("inf")
        for _ in range(reps):
            sync(device)
            began = time.perf_counter()
            fn(x)
            sync(device)
            best = min(best, time.perf_counter() - began)
    return len(x) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_configs=None)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", default="8,16,32,64,128")
    args = parser.parse_args()
    device, _ = start(args, "operator profile, then batch sizes, threads and torch.compile")
    weights = resolve_inception_weights()
    fidelity = fidelity_extractor(weights.path, ("2048",), str(device))
    ours = extractor(weights.path, ("2048",), str(device))
    models = {"torch-fidelity": fidelity,
              "torch-fidelity channels-last": copy.deepcopy(fidelity).to(memory_format=torch.channels_last),
              "ours": ours}
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    groups = [*GROUPS, "rest"]
    print(f"| extractor (batch {args.batch}, {args.size}x{args.size}) | total s | " + " | ".join(groups) + " |")
    print("|---|---:|" + "---:|" * len(groups))
    for name, model in models.items():
        totals = profile_groups(model, x, device)
        total = sum(totals.values())
        print(f"| {name} | {total:.2f} | " + " | ".join(f"{totals[g]:.2f} ({100 * totals[g] / total:.0f} %)"
                                                      for g in groups) + " |", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        xb = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
        print(f"ours, batch {batch}: {rate(ours, xb, device):.1f} images/s", flush=True)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        print(f"ours, batch {args.batch}, 1 thread: {rate(ours, x, device):.1f} images/s", flush=True)
        torch.set_num_threads(threads)
        print(f"ours, batch {args.batch}, {threads} threads: {rate(ours, x, device):.1f} images/s", flush=True)
    compiled = torch.compile(ours, dynamic=False)
    began = time.perf_counter()
    with torch.inference_mode(), exact_float32(device):
        compiled(x)
    warm_up = time.perf_counter() - began
    print(f"ours + torch.compile, batch {args.batch}: {rate(compiled, x, device):.1f} images/s "
          f"(warm-up {warm_up:.0f} s, again for every new batch shape) vs eager {rate(ours, x, device):.1f}")


if __name__ == "__main__":
    main()

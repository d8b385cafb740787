"""Throughput of Inception feature extraction (the cost of FID/KID/PR): images/s, GFLOP/s, MFU, memory.

    python benchmarks/fid_throughput.py --device cpu --n 256 --size 32 --batch 64

Random uint8 images (N, C, size, size) go through :func:`debias.metrics.features.extract_features` (torch-
fidelity's inception-v3-compat extractor, every image resized to 299x299 inside, float32). One
warm-up batch, excluded from the timing, builds the extractor and counts the FLOPs per image with
``FlopCounterMode``; MFU divides the achieved FLOP/s by the fp32 matmul peak measured in this run.
Peak memory: CUDA max-allocated, or the process's peak RSS on CPU, during the timed pass.
"""

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import add_common_args, peak_memory_mib, reset_peak_memory, start, sync
from debias.metrics.features import extract_features
from debias.metrics.inception import resolve_inception_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_configs=None)
    parser.add_argument("--n", type=int, default=256, help="images to extract")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--weights", default=None, help="Inception weights file (default: offline resolution)")
    args = parser.parse_args()
    device, peak = start(args, "one timed pass after a warm-up batch")
    weights = resolve_inception_weights(args.weights)
    images = torch.randint(0, 256, (args.n, args.channels, args.size, args.size), dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with counter:  # warm-up: builds the extractor
        extract_features(images[: args.batch], weights, args.batch, str(device))
    flops_per_image = counter.get_total_flops() / min(args.batch, args.n)
    sync(device)
    reset_peak_memory(device)
    began = time.perf_counter()
    extract_features(images, weights, args.batch, str(device))
    sync(device)
    seconds = time.perf_counter() - began
    achieved = flops_per_image * args.n / seconds
    print(f"{args.n} images {args.channels}x{args.size}x{args.size}, batch {args.batch}, weights {weights.source} "
          f"{weights.sha256[:12]}: {seconds:.1f} s, {args.n / seconds:.1f} images/s, "
          f"{flops_per_image / 1e9:.2f} GFLOP/image, {achieved / 1e9:.1f} GFLOP/s, MFU {100 * achieved / peak:.1f}%, "
          f"peak {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main()

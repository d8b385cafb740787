"""Throughput of Inception feature extraction (the cost of FID/KID/PR) on this machine.

    python benchmarks/fid_throughput.py --n 256 --size 32 --batch 64 --device cpu

Random uint8 images (N, C, size, size) go through torch-fidelity's inception-v3-compat extractor
(resized to 299x299 inside); one warm-up batch is excluded from the timing.
"""

import argparse
import time

import torch

from debias.metrics import extract_features, resolve_inception_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images to extract")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=None, help="Inception weights file (default: offline resolution)")
    args = parser.parse_args()

    weights = resolve_inception_weights(args.weights)
    images = torch.randint(0, 256, (args.n, args.channels, args.size, args.size), dtype=torch.uint8)
    extract_features(images[: args.batch], weights, args.batch, args.device)  # warm-up, builds the extractor
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    extract_features(images, weights, args.batch, args.device)
    seconds = time.perf_counter() - start
    print(
        f"{args.n} images {args.channels}x{args.size}x{args.size}, batch {args.batch}, {args.device} "
        f"({torch.get_num_threads()} threads), weights {weights.source} {weights.sha256[:12]}: "
        f"{seconds:.1f} s, {args.n / seconds:.1f} images/s"
    )


if __name__ == "__main__":
    main()

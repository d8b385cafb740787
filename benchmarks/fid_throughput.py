"""Throughput of Inception feature extraction (the cost of FID/KID/PR): torch-fidelity's own module
against ours (:class:`debias.metrics.extractor.FastInception`), images/s, GFLOP/s, MFU, memory.

    python benchmarks/fid_throughput.py --device cpu --n 256 --size 32 --batch 16 --fidelity-batch 64 --reps 3

Random uint8 images (N, C, size, size) are resized to 299x299 inside and go through both extractors,
pass by pass interleaved (so both see the same machine load), ours in batches of ``--batch`` and
torch-fidelity's in batches of ``--fidelity-batch`` (default: the same; 64 was the former default). A warm-up
batch, excluded from the timing, counts the FLOPs per image with ``FlopCounterMode`` (torch-fidelity's
module: the same convolutions); MFU divides the achieved FLOP/s by the fp32 matmul peak measured in
this run. Prints each pass, the medians, the speed-up and the largest relative feature difference.
Peak memory: CUDA max-allocated, or the process's peak RSS on CPU.
"""

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import add_common_args, peak_memory_mib, start, sync
from debias.metrics.extractor import exact_float32
from debias.metrics.inception import extractor, fidelity_extractor, resolve_inception_weights


def features(model: torch.nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Pool features (N, 2048) of uint8 images (N, 3, H, W), batch by batch."""
    with torch.inference_mode(), exact_float32(device):
        return torch.cat([model(images[i:i + batch].to(device))[0].cpu() for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_configs=None)
    parser.add_argument("--n", type=int, default=256, help="images per pass")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--fidelity-batch", type=int, default=None, help="torch-fidelity's batch size")
    parser.add_argument("--reps", type=int, default=3, help="timed passes of each extractor")
    parser.add_argument("--weights", default=None, help="Inception weights file (default: offline resolution)")
    args = parser.parse_args()
    device, peak = start(args, f"{args.reps} interleaved passes after a warm-up batch")
    weights = resolve_inception_weights(args.weights)
    images = torch.randint(0, 256, (args.n, 3, args.size, args.size), dtype=torch.uint8)
    models = {"torch-fidelity": fidelity_extractor(weights.path, ("2048",), str(device)),
              "ours": extractor(weights.path, ("2048",), str(device))}
    batches = {"torch-fidelity": args.fidelity_batch or args.batch, "ours": args.batch}
    counter = FlopCounterMode(display=False)
    with counter:
        features(models["torch-fidelity"], images[:args.batch], args.batch, device)
    features(models["ours"], images[:args.batch], args.batch, device)
    flops_per_image = counter.get_total_flops() / min(args.batch, args.n)
    print(f"{args.n} images 3x{args.size}x{args.size}, batches {batches}, weights {weights.source} "
          f"{weights.sha256[:12]}, {flops_per_image / 1e9:.2f} GFLOP/image")
    seconds: dict[str, list[float]] = {name: [] for name in models}
    outputs = {}
    for rep in range(args.reps):
        for name, model in models.items():
            sync(device)
            began = time.perf_counter()
            outputs[name] = features(model, images, batches[name], device)
            sync(device)
            seconds[name].append(time.perf_counter() - began)
            print(f"  pass {rep + 1} {name:<15} {args.n / seconds[name][-1]:6.1f} images/s", flush=True)
    for name, times in seconds.items():
        rate = args.n / statistics.median(times)
        achieved = rate * flops_per_image
        print(f"{name:<15} {rate:6.1f} images/s, {achieved / 1e9:.1f} GFLOP/s, MFU {100 * achieved / peak:.1f}%")
    theirs = outputs["torch-fidelity"].double()
    deviation = ((outputs["ours"].double() - theirs).abs().max() / theirs.abs().max()).item()
    print(f"speed-up {statistics.median(seconds['torch-fidelity']) / statistics.median(seconds['ours']):.2f}x; "
          f"largest feature difference {deviation:.1e} of the largest feature; peak {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main()

"""Training throughput from the prepared set's memory map against the whole set in memory, same run, interleaved.

    python benchmarks/data_throughput.py --device cpu --configs d,f --n 2048 --steps 20 --warmup 3
    python benchmarks/data_throughput.py --device cuda --configs e --precision bf16 --n 2560 --steps 20

For each config a prepared set of ``--n`` random images (random bytes, the config's image shape) is
written with :func:`debias.data.prepared.write_prepared` into a temporary folder (timed: MB/s) and
opened with :func:`~debias.data.prepared.open_prepared`. Two :class:`debias.train.loop.Trainer` are
built on the same config and the same set — ``train.data_loading=memory`` (the whole set as float32,
on the device when it takes at most 2 GiB, else on the CPU) and ``train.data_loading=stream`` (uint8
rows gathered from the memory map by ``--workers`` threads a few steps ahead, converted on the device)
— with the same seed, hence the same weights and the same batches. After ``--warmup`` untimed steps
each, their steps are timed one for one, interleaved, so both see the same machine load.

Printed per config: images/s of each (batch / median step time), the ratio stream/memory (also as the
median of the per-step ratios, steps k of both: robust to load that drifts during the run), and the
fraction of the streamed trainer's step time spent waiting for its data (``batches.waited``: the
training thread blocked on a read that the workers had not finished). The set was just written, so
its pages are in the page cache: this is the steady state of a set that fits in RAM, not a cold
read from disk.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import CONFIGS, add_common_args, config_for, config_names, run_configs, start
from debias.data.prepared import PreparedSet, write_prepared
from debias.data.sets import ImageBlocks
from debias.models.factory import unet_kwargs_for
from debias.runtime import Ranks
from debias.train.loop import Trainer, run_logs
from train_throughput import timed_step

LOADINGS = ("memory", "stream")


def random_prepared(folder: Path, n: int, shape: tuple[int, int, int], block: int = 256, seed: int = 0) -> PreparedSet:
    """A prepared set of ``n`` images of random bytes, written block by block."""
    rng = np.random.default_rng(seed)
    row = math.prod(shape)

    def blocks():
        for first in range(0, n, block):
            count = min(block, n - first)
            yield np.frombuffer(rng.bytes(count * row), dtype=np.uint8).reshape(count, *shape), None

    return write_prepared(folder, ImageBlocks(n, shape, blocks()), {"random": {"n": n, "shape": list(shape), "seed": seed}})


def bench(name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    overrides = CONFIGS[name][1]
    cfgs = {loading: config_for({**overrides, "train": {**overrides.get("train", {}), "data_loading": loading,
                                                        "num_workers": args.workers}},
                                device, args.precision, args.compile)
            for loading in LOADINGS}
    cfg = cfgs["memory"]
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    batch = cfg.train.batch_size
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        began = time.perf_counter()
        prepared = random_prepared(Path(tmp) / "prepared", args.n, shape)
        written = time.perf_counter() - began
        megabytes = args.n * math.prod(shape) / 1e6
        trainers = {loading: Trainer(c, prepared, unet_kwargs_for(c, prepared.num_classes), device, Ranks(),
                                     run_logs(c, Path(tmp) / loading, device, Ranks()))
                    for loading, c in cfgs.items()}
        home = trainers["memory"].batches.images.device
        try:
            for k in range(args.warmup):
                for trainer in trainers.values():
                    trainer.step(k)
            times: dict[str, list[float]] = {loading: [] for loading in trainers}
            waited_before = trainers["stream"].batches.waited
            for k in range(args.warmup, args.warmup + args.steps):
                for loading, trainer in trainers.items():  # interleaved: both see the same machine load
                    times[loading].append(timed_step(trainer, k, device))
            waited = trainers["stream"].batches.waited - waited_before
        finally:
            for trainer in trainers.values():
                trainer.batches.close()
    rates = {loading: batch / statistics.median(ts) for loading, ts in times.items()}
    paired = statistics.median(m / s for m, s in zip(times["memory"], times["stream"]))  # step k vs step k
    waiting = waited / sum(times["stream"])
    return [f"{name:<2} {args.n:6d} {megabytes:8.1f} {megabytes / written:7.0f} {batch:5d} {str(home):>6} "
            f"{rates['memory']:10.2f} {rates['stream']:10.2f} {rates['stream'] / rates['memory']:8.3f} "
            f"{100 * waiting:8.2f}%  {CONFIGS[name][0]}",
            f"{name:<2} stream/memory {rates['stream'] / rates['memory']:.3f} (images/s {rates['stream']:.2f} vs "
            f"{rates['memory']:.2f}, same process, interleaved; median of the per-step ratios {paired:.3f}); "
            f"streamed path waited for data "
            f"{100 * waiting:.2f}% of its step time; step times s: memory "
            f"{' '.join(f'{t:.3f}' for t in times['memory'])}; stream {' '.join(f'{t:.3f}' for t in times['stream'])}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_configs="d,f")
    parser.add_argument("--n", type=int, default=2048, help="images in the prepared set")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each trainer first")
    parser.add_argument("--workers", type=int, default=2, help="train.num_workers of the streamed trainer")
    parser.add_argument("--tmp", default=None, help="folder for the temporary prepared set (default: the system's)")
    args = parser.parse_args()
    names = config_names(parser, args)
    device, _ = start(args, f"memory vs stream, median of {args.steps} interleaved steps after {args.warmup} "
                            f"warm-up; {args.workers} reader threads")
    header = (f"{'':<2} {'N':>6} {'set MB':>8} {'MB/s wr':>7} {'batch':>5} {'in-mem':>6} {'memory/s':>10} "
              f"{'stream/s':>10} {'ratio':>8} {'waited':>9}  config (images/s; in-mem: where the float set lives)")
    run_configs(names, device, header, lambda name: bench(name, args, device))


if __name__ == "__main__":
    main()

"""Memory of the data path as the training set grows: the prepare and train stage jobs, `debias train`, and
two torchrun ranks sharing the pixels through the page cache.

    python benchmarks/data_memory.py --sizes 1000,16000 --cache /tmp/debias-memory-pngs

For each N of ``--sizes`` a folder of N random-colour 64x64 PNGs (every pixel a random RGB value; generated
once into ``--cache``, the smaller folders hard links to the first files of the largest) is the training
set (``data.name: folder``, 64x64x3, the default model with four levels, channel_mult [1,2,2,2] and attention
at 8x8, ``train.batch_size`` 16). Every measurement is a
fresh process in a scratch folder with its own params.yaml, run outside DVC exactly as dvc.yaml's
``cmd`` runs it; its peak RSS is the kernel's (``ru_maxrss`` from ``wait4``), and the RSS sampled every
50 ms is split at its largest into anonymous memory (private: heap, tensors) and file-backed pages
(shared libraries, and any mapped pages of the page cache — shared by every process that maps
them and reclaimable; a kernel with large page-cache folios maps far more than the rows read, about
1 MB per random row on the 6.18 kernel these figures were taken on):

- ``prepare``: ``python stages/prepare.py`` — the prepare stage job: the folder decoded block by block
  into data/prepared/ (the prepared set), plus the FID reference features of
  ``eval.reference_images`` = 16 of its images (the Inception on the CPU: memory that does not grow
  with N; 16 instead of 400 keeps each run short);
- ``train stream`` / ``train memory``: ``python stages/train.py`` — the train stage job, 2 steps on that
  prepared set with ``train.data_loading=stream`` (rows read with pread) and, for comparison, ``=memory``
  (the whole set as float32 in the process: the old path);
- ``debias train``: ``python -m debias train --out run`` on the folder, 2 steps,
  ``train.data_loading=stream`` (it prepares ``prepared-<digest>/`` beside the run first);
- ``torchrun stream`` / ``torchrun memory``: ``torchrun --nproc-per-node 2`` of the train stage job
  (gloo on the CPU), 2 steps. In ``stream`` each rank first reads every image once as training reads
  them (``read_rows``: what it would have done after an epoch; 2 steps alone read 16 rows per rank).
  Each rank's RSS and proportional set size (PSS, /proc/<pid>/smaps_rollup) and those of any images.npy
  mapping (/proc/<pid>/smaps) are sampled every 0.2 s; the rows show both ranks at the same sample, the
  one where together they held the most (largest total RSS). The pixels are one copy in the page cache,
  read by both ranks and held by neither.

Printed: one row per (measurement, N), the growth from the smallest to the largest N (target: at most
64 MB for the streamed paths), and an extrapolation to the paper's datasets at 256x256.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE, CHANNELS, BATCH = 64, 3, 16
MB = 1e6
DATASETS = {"CelebA-HQ": 30_000, "FFHQ": 70_000, "ImageNet": 1_281_167}  # at 256x256x3 in the paper


def make_pngs(cache: Path, sizes: list[int]) -> dict[int, Path]:
    """Folders of N random-colour PNGs, cached: the largest generated once, the others hard links into it."""
    import numpy as np
    from PIL import Image

    largest = max(sizes)
    pool = cache / f"pngs-{largest}"
    if not (pool / ".complete").exists():
        pool.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        began = time.perf_counter()
        for i in range(largest):
            pixels = rng.integers(0, 256, (SIZE, SIZE, CHANNELS), dtype=np.uint8)
            Image.fromarray(pixels).save(pool / f"img_{i:06d}.png", compress_level=1)
        (pool / ".complete").touch()
        print(f"generated {largest} PNGs in {pool} in {time.perf_counter() - began:.0f} s", flush=True)
    folders = {largest: pool}
    for n in sizes:
        if n == largest:
            continue
        folder = cache / f"pngs-{n}"
        if not (folder / ".complete").exists():
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                target = folder / f"img_{i:06d}.png"
                if not target.exists():
                    os.link(pool / f"img_{i:06d}.png", target)
            (folder / ".complete").touch()
        folders[n] = folder
    return folders


def write_params(folder: Path, images: Path, loading: str) -> None:
    """params.yaml of the repository with the data, eval and train settings of this benchmark."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name="folder", path=str(images), image_size=SIZE, channels=CHANNELS)
    params["model"].update(channel_mult=[1, 2, 2, 2], attention_resolutions=[8])  # the default UNet, for 64x64
    params["eval"].update(reference_images=16, kid_subset_size=8, device="cpu")  # KID subsets within the 16
    params["train"].update(steps=2, batch_size=BATCH, log_every=1, checkpoint_every=2, snapshot_steps=[],
                           devices="cpu", data_loading=loading, warmup_steps=0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def status_mb(pid: int, keys: tuple[str, ...] = ("RssAnon", "RssFile")) -> dict[str, float] | None:
    """``keys`` of /proc/<pid>/status in MB (None once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 / MB for line in lines if line.split(":")[0] in keys}
    return values or None


def peak_rss(cmd: list[str], cwd: Path, log: Path, every: float = 0.05) -> dict[str, float]:
    """Run ``cmd`` in ``cwd`` (output to ``log``); in MB its peak RSS (``peak``, the kernel's ru_maxrss) and, at
    the largest RSS sampled every ``every`` s, its anonymous part (``anon``: heap, private to the process) and
    its file-backed part (``file``: mapped files — shared libraries and the memory map's page-cache pages,
    shared with other processes and reclaimable). RuntimeError if it fails."""
    best = {"RssAnon": 0.0, "RssFile": 0.0}
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                now = status_mb(process.pid)
                if now and sum(now.values()) > sum(best.values()):
                    best.update(now)
                time.sleep(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({process.returncode}); see {log}")
    return {"peak": usage.ru_maxrss * 1024 / MB, "anon": best["RssAnon"], "file": best["RssFile"]}


def _fields(text: str) -> dict[str, float]:
    """The ``Name: value kB`` lines of an smaps block, in MB."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            values[parts[0].rstrip(":")] = int(parts[1]) * 1024 / MB
    return values


def memory_of(pid: int) -> dict[str, float] | None:
    """RSS, PSS and VmHWM of the process, and RSS/PSS of its images.npy mapping(s), in MB (None once it is gone)."""
    try:
        rollup = _fields(Path(f"/proc/{pid}/smaps_rollup").read_text())
        smaps = Path(f"/proc/{pid}/smaps").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    image_rss = image_pss = 0.0
    block: list[str] = []
    for line in [*smaps.splitlines(), "00000000-00000000 end"]:
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):  # a new mapping's header line
            if block and block[0].rstrip().endswith("images.npy"):
                fields = _fields("\n".join(block[1:]))
                image_rss += fields.get("Rss", 0.0)
                image_pss += fields.get("Pss", 0.0)
            block = [line]
        else:
            block.append(line)
    hwm = next((int(line.split()[1]) * 1024 / MB for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)
    return {"rss": rollup.get("Rss", 0.0), "pss": rollup.get("Pss", 0.0), "hwm": hwm,
            "image_rss": image_rss, "image_pss": image_pss}


def ranks_of(parent: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers under ``parent``."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def torchrun_pss(cmd: list[str], cwd: Path, log: Path, every: float = 0.2) -> dict[int, dict[str, float]]:
    """Run ``cmd`` (torchrun) and sample its ranks' memory every ``every`` s; returns {rank: memory} at the sample
    where the ranks together held the most (the largest total RSS, both alive), each with ``hwm`` its peak RSS."""
    ticks: list[dict[int, dict[str, float]]] = []
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                now = {rank: memory_of(pid) for rank, pid in ranks_of(process.pid).items()}
                now = {rank: m for rank, m in now.items() if m is not None}
                if now:
                    ticks.append(now)
                time.sleep(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = process.wait()
        done.set()
        sampler.join()
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {log}")
    world = max(len(t) for t in ticks)
    best = max((t for t in ticks if len(t) == world), key=lambda t: sum(m["rss"] for m in t.values()))
    for rank, m in best.items():
        m["hwm"] = max(t[rank]["hwm"] for t in ticks if rank in t)
    return best


def touched_train_stage() -> None:
    """The train stage job with each process first reading every image once, as it trains (``read_rows``), in
    batches of 256 — what it would have done after an epoch (run under torchrun by :func:`main`)."""
    sys.path.insert(0, str(REPO / "src"))
    import debias.jobs.train as job
    from debias.pipeline import run_stage

    import torch

    opened = job.open_prepared

    def open_and_read(folder):
        prepared = opened(folder)
        total = sum(int(prepared.read_rows(torch.arange(a, min(a + 256, len(prepared)))).sum(dtype=torch.int64))
                    for a in range(0, len(prepared), 256))
        print(f"rank {os.environ.get('RANK')}: read all {len(prepared)} images as training reads them ({total})",
              flush=True)
        return prepared

    job.open_prepared = open_and_read
    run_stage(job.train_stage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,16000", help="comma-separated set sizes N")
    parser.add_argument("--cache", default="/tmp/debias-memory-pngs", help="where the PNG folders are kept")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new one under --cache)")
    parser.add_argument("--only", default=None, help="comma-separated subset of the measurements (by their names)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each single-process measurement (median kept)")
    parser.add_argument("--touched-train-stage", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.touched_train_stage:
        touched_train_stage()
        return
    sizes = sorted(int(n) for n in args.sizes.split(","))
    cache = Path(args.cache)
    folders = make_pngs(cache, sizes)
    work = Path(args.work) if args.work else cache / f"work-{os.getpid()}"
    py = sys.executable
    stage = lambda name: [py, str(REPO / "stages" / f"{name}.py")]  # noqa: E731
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    wanted = None if args.only is None else set(args.only.split(","))
    rows: dict[str, dict[int, list[dict[str, float]]]] = {}
    ranks: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; sizes {sizes}; 64x64x3 PNGs; scratch {work}",
          flush=True)
    for n in sizes:
        images = folders[n]
        base = work / f"n{n}"
        stage_dir = base / "stage"  # prepare, then the train stage jobs on its data/prepared
        single = {
            "prepare": (stage_dir, "stream", stage("prepare")),
            "train stream": (stage_dir, "stream", stage("train")),
            "train memory": (stage_dir, "memory", stage("train")),
            "debias train": (base / "cli", "stream", [py, "-m", "debias", "train", "--out", "run", "--no-progress"]),
        }
        for name, (folder, loading, cmd) in single.items():
            if wanted is not None and name not in wanted:
                continue
            write_params(folder, images, loading)
            for _ in range(args.repeat):
                for leftover in ("checkpoints", "logs", "models", "run"):  # every run starts afresh
                    subprocess.run(["rm", "-rf", str(folder / leftover)], check=True)
                if name == "debias train":  # it prepares the folder beside the run: not reused from a former run
                    subprocess.run(f"rm -rf {folder}/prepared-* {folder}/.prepared-*", shell=True, check=True)
                began = time.perf_counter()
                m = peak_rss(cmd, folder, folder / f"{name.replace(' ', '_')}.log")
                rows.setdefault(name, {}).setdefault(n, []).append(m)
                print(f"{name:<16} N={n:6d}  peak RSS {m['peak']:7.0f} MB (at the sampled peak: anonymous {m['anon']:6.0f} MB, "
                      f"file-backed {m['file']:5.0f} MB)  ({time.perf_counter() - began:.0f} s)", flush=True)
        for name, loading, cmd in (("torchrun stream", "stream", [*torchrun, __file__, "--touched-train-stage"]),
                                   ("torchrun memory", "memory", [*torchrun, *stage("train")[1:]])):
            if wanted is not None and name not in wanted:
                continue
            write_params(stage_dir, images, loading)
            for leftover in ("checkpoints", "logs", "models"):
                subprocess.run(["rm", "-rf", str(stage_dir / leftover)], check=True)
            began = time.perf_counter()
            best = ranks.setdefault(name, {})[n] = torchrun_pss(cmd, stage_dir, stage_dir / f"{name.replace(' ', '_')}.log")
            for rank, m in sorted(best.items()):
                print(f"{name:<16} N={n:6d}  rank {rank}: RSS {m['rss']:6.0f} MB, PSS {m['pss']:6.0f} MB, "
                      f"peak RSS {m['hwm']:6.0f} MB; images.npy mapped: RSS {m['image_rss']:5.0f} MB, "
                      f"PSS {m['image_pss']:5.0f} MB", flush=True)
            print(f"{name:<16} N={n:6d}  both ranks: RSS {sum(m['rss'] for m in best.values()):6.0f} MB, "
                  f"PSS {sum(m['pss'] for m in best.values()):6.0f} MB; the uint8 set is "
                  f"{n * CHANNELS * SIZE * SIZE / MB:.0f} MB ({time.perf_counter() - began:.0f} s)", flush=True)

    first, last = sizes[0], sizes[-1]
    added = (last - first) * CHANNELS * SIZE * SIZE
    print(f"\ngrowth from N={first} to N={last} ({last - first} more images: +{added / MB:.0f} MB as uint8, "
          f"+{4 * added / MB:.0f} MB as float32); target for the streamed paths: <= 64 MB")
    median = lambda runs, key: statistics.median(m[key] for m in runs)  # noqa: E731
    for name, runs in rows.items():
        if first in runs and last in runs:
            growth = median(runs[last], "peak") - median(runs[first], "peak")
            verdict = "" if name.endswith("memory") else ("  ok" if growth <= 64 else "  ABOVE TARGET")
            spread = "" if args.repeat == 1 else " (medians of {}; peaks {} / {})".format(
                args.repeat, " ".join(f"{m['peak']:.0f}" for m in runs[first]),
                " ".join(f"{m['peak']:.0f}" for m in runs[last]))
            print(f"  {name:<16} {median(runs[first], 'peak'):7.0f} -> {median(runs[last], 'peak'):7.0f} MB peak RSS: "
                  f"{growth:+7.0f} MB{verdict}; at the sampled peak: anonymous {median(runs[last], 'anon') - median(runs[first], 'anon'):+5.0f}"
                  f" MB, file-backed {median(runs[last], 'file') - median(runs[first], 'file'):+5.0f} MB{spread}")
    for name, per_size in ranks.items():
        if first in per_size and last in per_size:
            for kind in ("pss", "rss"):
                a = sum(m[kind] for m in per_size[first].values())
                b = sum(m[kind] for m in per_size[last].values())
                print(f"  {name:<16} both ranks' {kind.upper()}: {a:7.0f} -> {b:7.0f} MB: {b - a:+7.0f} MB")

    if "train stream" in rows and first in rows["train stream"] and last in rows["train stream"]:
        runs = rows["train stream"]
        measured = (median(runs[last], "peak") - median(runs[first], "peak")) * MB / (last - first)
        print(f"\nextrapolation to 256x256x3 (196608 bytes an image) for one training process, streamed: what the code "
              f"holds per image is two epochs' permutations (16 bytes) + labels (8 bytes, if any) = 24 bytes/image; "
              f"read as a slope, the train stage's measured growth is {measured:.0f} bytes/image (within the "
              f"allocator's run-to-run noise, so a loose upper bound)")
        for dataset, count in DATASETS.items():
            print(f"  {dataset:<10} N={count:>9,}: streamed +{24 * count / MB:5.1f} MB per process (measured-slope bound "
                  f"+{max(measured, 24) * count / MB:5.0f} MB); the pixels {count * 196608 / 1e9:6.1f} GB uint8 once per "
                  f"machine (page cache, shared by all ranks; read from disk where RAM is short); in memory "
                  f"+{4 * count * 196608 / 1e9:7.1f} GB float32 in every process")

if __name__ == "__main__":
    main()

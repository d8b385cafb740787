"""Start-up time of the `debias` CLI: the median wall time of 5 runs of each command.

    python benchmarks/startup.py                       # this checkout (python -m debias)
    python benchmarks/startup.py --src /tmp/old/src    # another checkout's sources, for a before/after

Each run is a fresh interpreter, as a user's shell starts it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["--version"], ["sample", "--help"], ["config"], ["info"])


def median_seconds(args: list[str], env: dict, runs: int) -> float | None:
    """The median wall time of ``debias ARGS``, or None if that checkout has no such command."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "debias", *args], env=env, capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            return None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="put this source folder first on PYTHONPATH")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, **({"PYTHONPATH": args.src} if args.src else {})}
    for command in COMMANDS:
        seconds = median_seconds(command, env, args.runs)
        shown = f"{seconds:.3f} s (median of {args.runs})" if seconds is not None else "(not in this checkout)"
        print(f"debias {' '.join(command):<14} {shown}")


if __name__ == "__main__":
    main()

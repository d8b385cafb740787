#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes; every step has its own time limit, 11.5 minutes in all):
# training, sampling and FID throughput of the paper's CelebA-HQ 256x256 model (config e) in fp32 vs
# bf16 vs bf16 + compile, ours vs the original side by side; a check that the training step makes no
# host syncs; a torchrun (NCCL, world size 1) smoke run of `debias train` on a tiny config; and the
# real-scale paths (benchmarks/stream_check.sh): 2000 samples at 256x256 streamed to disk in chunks,
# killed and resumed under torchrun, and their FID read chunk by chunk.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU; results in $OUT
#   DRY_RUN=1 bash benchmarks/gpu_check.sh       # the same steps on the CPU with tiny sizes (script check)
#
# Installs nothing: it uses .venv/bin/python when the repository carries a .venv, else `python` from
# PATH. Every step has its own time limit and its output goes to $OUT/<step>.txt (default ./gpu_out);
# $OUT/summary.txt lists each step's exit status and the result lines. A failing step does not stop
# the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=python
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if [ "${DRY_RUN:-0}" = 1 ]; then
  # time limits x5: a shared 2-core CPU is far slower than a GPU even at these tiny sizes
  DEV=cpu; CFG=a; STEPS=2; WARM=1; REPS=1; NSAMP=4; FIDN=8; FIDB=8; FIDSIZE=32; COMPILE_OK=0; SCALE=5
  STREAM=(40 16 8)  # samples, chunk size, batch size
else
  DEV=cuda; CFG=e; STEPS=10; WARM=3; REPS=3; NSAMP=16; FIDN=1024; FIDB=128; FIDSIZE=256; COMPILE_OK=1; SCALE=1
  STREAM=(2000 500 100)
fi

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to $OUT/NAME.txt, record rc
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - began)) s: $*" >> "$SUMMARY"
  grep -E "speed-up|images/s|^ *[a-e] |trained steps|host syncs|HOST SYNC|bitwise|chunks|fid|Error|error" "$OUT/$name.txt" | tail -n 20 >> "$SUMMARY"
}

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  nproc
  grep -m1 "model name" /proc/cpuinfo
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" >> "$SUMMARY"

TRAIN=(benchmarks/train_throughput.py --device "$DEV" --configs "$CFG" --steps "$STEPS" --warmup "$WARM")
SAMPLE=(benchmarks/sample_throughput.py --device "$DEV" --configs "$CFG" --reps "$REPS" --n "$NSAMP")

# training: ours (fp32 / bf16 / bf16 + compile) vs the original (fp32, eager), interleaved
step train_fp32 60 "$PY" "${TRAIN[@]}" --baseline
step train_bf16 60 "$PY" "${TRAIN[@]}" --baseline --precision bf16
if [ "$COMPILE_OK" = 1 ]; then
  step train_bf16_compile 80 "$PY" "${TRAIN[@]}" --precision bf16 --compile
fi
# sampling: DDIM 20 steps (all four solvers in fp32), ours vs the original
step sample_fp32 45 "$PY" "${SAMPLE[@]}"
step sample_bf16 30 "$PY" "${SAMPLE[@]}" --solvers ddim --precision bf16
if [ "$COMPILE_OK" = 1 ]; then
  step sample_bf16_compile 60 "$PY" "${SAMPLE[@]}" --solvers ddim --precision bf16 --compile --no-baseline
fi
# FID feature extraction (Inception-v3 at 299x299)
step fid 25 "$PY" benchmarks/fid_throughput.py --device "$DEV" --n "$FIDN" --batch "$FIDB" --size "$FIDSIZE"
# no host syncs inside the training step (torch.cuda sync debug mode raises on any)
if [ "$DEV" = cuda ]; then
  step sync_check 45 "$PY" - <<'PYEOF'
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
# torchrun smoke test: NCCL on the GPU (gloo on the CPU), world size 1, tiny config, 20 steps
SMOKE="$OUT/torchrun_smoke"
rm -rf "$SMOKE"
DEVICES=$([ "$DEV" = cuda ] && echo cuda || echo cpu)
step torchrun_smoke 40 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m debias train \
  --out "$SMOKE" --no-progress -S train.steps=20 -S train.batch_size=32 -S train.log_every=10 \
  -S train.checkpoint_every=20 -S "train.snapshot_steps=[]" -S train.devices="$DEVICES" -S train.precision=bf16
if [ -f "$SMOKE/train_log.tsv" ]; then cp "$SMOKE/train_log.tsv" "$OUT/torchrun_train_log.tsv"; fi
rm -rf "$SMOKE"

# real scale: sampling streamed in chunks, a kill and a resume under torchrun, FID from the .npz
step stream 240 bash benchmarks/stream_check.sh "$PY" "$CFG" "${STREAM[@]}"

echo "done $(date -u)" >> "$SUMMARY"
cat "$SUMMARY"

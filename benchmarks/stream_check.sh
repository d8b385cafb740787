#!/usr/bin/env bash
# The real-scale paths on one machine (called by benchmarks/gpu_check.sh; runs on a CPU with small N):
#
#   bash benchmarks/stream_check.sh PYTHON CONFIG N CHUNK BATCH [INCEPTION_WEIGHTS]
#
# A fresh checkpoint of benchmarks/common.py's CONFIG is sampled with DDIM, 10 steps, bf16, into an
# .npz of N images streamed in chunks of CHUNK: once uninterrupted (timed: images/s), once killed
# mid-way and resumed under torchrun (world size 1: NCCL on a GPU), which must give the same file
# bit for bit; then `debias fid` of the first N/2 samples of both files, read batch by batch from the
# .npz (identical sets: FID 0 up to float rounding, whatever the weights — so INCEPTION_WEIGHTS, passed to
# `debias fid --weights`, may be benchmarks/random_inception.py's random ones where the real ones cannot
# travel). Files live in a temporary folder removed at the end.
set -uo pipefail
PY=$1 CFG=$2 N=$3 CHUNK=$4 BATCH=$5 WEIGHTS=${6:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" benchmarks/make_checkpoint.py "$CFG" "$WORK/model.pt" || exit 1
# (eval.kid_subset_size: the params' check refuses sample.num_samples below it, even for `debias sample`)
SAMPLE=(-m debias sample "$WORK/model.pt" --solver ddim --steps 10 -n "$N" --chunk-size "$CHUNK"
        --batch-size "$BATCH" --precision bf16 -S "eval.kid_subset_size=$((N < 100 ? N : 100))")

began=$SECONDS
"$PY" "${SAMPLE[@]}" --out "$WORK/a.npz" || exit 1
seconds=$((SECONDS - began > 0 ? SECONDS - began : 1))
echo "uninterrupted: $N images in $seconds s: $((N / seconds)) images/s (with start-up)"

# kill the second run once about half of the first run's time has passed
timeout -s KILL "$(( (seconds + 1) / 2 ))" "$PY" "${SAMPLE[@]}" --out "$WORK/b.npz"
echo "killed: $(ls "$WORK/.b.npz.chunks" 2>/dev/null | grep -c npz) of $(( (N + CHUNK - 1) / CHUNK )) chunks were on disk"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "${SAMPLE[@]}" --out "$WORK/b.npz" 2>&1 \
  | grep -E "chunks|samples|rror"
cmp "$WORK/a.npz" "$WORK/b.npz" && echo "resumed under torchrun: bitwise the uninterrupted file"

FID=(-m debias fid "$WORK/a.npz" "$WORK/b.npz" --max-images $((N / 2)) --metric fid --batch-size "$BATCH")
if [ -n "$WEIGHTS" ]; then
  FID+=(--weights "$WEIGHTS")
  echo "fid below: Inception weights $WEIGHTS (if random: only FID = 0 for identical sets means anything)"
fi
"$PY" "${FID[@]}"

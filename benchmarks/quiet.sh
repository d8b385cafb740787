#!/usr/bin/env bash
# quiet.sh LOG CMD...: wait (at most 2 minutes) for the 1-minute load average to drop below 1.0,
# then run CMD and write to LOG its output framed by the start/end time and load, as quoted in
# BENCHMARKS.md. Example:
#   cd benchmarks && ./quiet.sh /tmp/train_fp32.txt python train_throughput.py --device cpu --configs c,d --baseline
set -u
log=$1
shift
for _ in $(seq 12); do
  load=$(cut -d' ' -f1 /proc/loadavg)
  if awk "BEGIN { exit !($load < 1.0) }"; then break; fi
  sleep 10
done
{
  echo "# $(date -u) load at start: $(cat /proc/loadavg)"
  echo "# $*"
  "$@" 2>&1
  echo "# $(date -u) load at end: $(cat /proc/loadavg)"
} > "$log"

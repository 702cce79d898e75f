#!/usr/bin/env bash
# Compares two rzab-dataplane builds back to back on this machine: for each write ratio, runs
# a fresh 3-node shm cluster (1 worker each, 32-byte values, 1M keys) with build A, then with
# build B, RUNS times, and prints a markdown table of cluster M ops/s (the sum of the three
# nodes' completed operations per second). Back to back, so that a noisy machine still gives
# a fair comparison.
#
#   scripts/compare-builds.sh BIN_A BIN_B [--seconds 3] [--runs 2] [--ratios "0 50 500 1000"]
#
# Build an older commit for BIN_A with, e.g.:
#   git worktree add /tmp/old COMMIT && (cd /tmp/old && cargo build --release --bin rzab-dataplane)
set -euo pipefail
(($# >= 2)) || { sed -n '2,11p' "$0"; exit 2; }
bin_a=$1 bin_b=$2; shift 2
seconds=3 runs=2 ratios="0 50 500 1000"
while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --ratios) ratios="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cluster=cmp$$
logs=$(mktemp -d)
trap 'pkill -TERM -f "rzab-dataplane --cluster $cluster" 2>/dev/null || true; rm -rf "$logs" /dev/shm/rzab-$cluster-n* /dev/shm/rzab-fabric-$cluster' EXIT
# one_run BIN RATIO: prints the cluster's M ops/s.
one_run() {
  rm -f /dev/shm/rzab-fabric-$cluster
  for n in 0 1 2; do
    "$1" --cluster "$cluster" --node "$n" --nodes 3 --duration "$seconds" \
      --knob stats_interval_ms=60000 --write-ratio "$2" >"$logs/$n.log" 2>&1 &
  done
  wait
  python3 - "$logs" <<'PY'
import json, sys
found = []
for n in range(3):
    for line in open(f"{sys.argv[1]}/{n}.log"):
        if line.startswith("summary "):
            found.append(json.loads(line[8:]))
print("failed" if len(found) != 3 else f"{sum((s['reads'] + s['writes']) / s['seconds'] for s in found) / 1e6:.2f}")
PY
}
echo "3 nodes, shm, 1 worker each, 32 B values, $seconds s per run; cluster M ops/s, A = $bin_a, B = $bin_b"
echo "| writes | A | B |"
echo "|---|---|---|"
for ratio in $ratios; do
  a=() b=()
  for ((run = 0; run < runs; run++)); do
    a+=("$(one_run "$bin_a" "$ratio")")
    b+=("$(one_run "$bin_b" "$ratio")")
  done
  joined_a=$(IFS=,; echo "${a[*]}") joined_b=$(IFS=,; echo "${b[*]}")
  echo "| $(python3 -c "print(f'{$ratio/10:g}%')") | ${joined_a//,/, } | ${joined_b//,/, } |"
done

#!/usr/bin/env bash
# The README's first command: builds rzab in release mode and runs a local cluster of N nodes
# (one rzab-dataplane process each) until Ctrl-C or --duration, printing each node's live stats
# line every second. Everything it starts is stopped on exit; its shared-memory files are removed.
#
#   scripts/run-local.sh [--nodes 3] [--workers 1] [--transport shm|udp] [--write-ratio 50]
#                        [--duration SECONDS] [--cluster NAME] [-- extra rzab-dataplane options]
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=3 workers=1 transport=shm write_ratio=50 duration=0 cluster=local
extra=()
while (($#)); do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --transport) transport="$2"; shift 2 ;;
    --write-ratio) write_ratio="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --cluster) cluster="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v cargo >/dev/null; then
  echo "cargo is needed: install Rust from https://rustup.rs" >&2
  exit 1
fi
echo "==> building rzab (release)"
cargo build --release --bins -q

pids=()
logs=$(mktemp -d)
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ((n = 0; n < nodes; n++)); do
    grep -h '^summary' "$logs/node$n.log" 2>/dev/null | sed "s/^/node $n /" || true
    rm -f "/dev/shm/rzab-$cluster-n$n"
  done
  rm -f "/dev/shm/rzab-fabric-$cluster"
  rm -rf "$logs"
}
trap cleanup EXIT INT TERM

rm -f "/dev/shm/rzab-fabric-$cluster"
for ((n = 0; n < nodes; n++)); do
  ./target/release/rzab-dataplane --cluster "$cluster" --node "$n" --nodes "$nodes" \
    --workers "$workers" --transport "$transport" --write-ratio "$write_ratio" \
    --duration "$duration" --knob stats_interval_ms=1000 "${extra[@]}" >"$logs/node$n.log" 2>&1 &
  pids+=($!)
done
echo "==> $nodes nodes started (cluster $cluster, $transport, $workers worker(s) each); Ctrl-C stops them"
for ((n = 0; n < nodes; n++)); do echo "    node $n: control block /dev/shm/rzab-$cluster-n$n"; done

# Print each node's newest stats line once a second until every node has exited.
while :; do
  sleep 1
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=$((alive + 1)); done
  for ((n = 0; n < nodes; n++)); do
    line=$(grep -E 'ops/s|^Error|error:' "$logs/node$n.log" | tail -n 1 || true)
    [ -n "$line" ] && echo "$line"
  done
  ((alive == 0)) && break
  echo "--"
done
for ((n = 0; n < nodes; n++)); do
  if grep -q -E '^Error|^error' "$logs/node$n.log"; then
    echo "node $n failed:"; cat "$logs/node$n.log"; exit 1
  fi
done

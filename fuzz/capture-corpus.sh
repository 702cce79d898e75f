#!/usr/bin/env bash
# Refreshes the seed corpora in fuzz/corpus/ from real runs: builds rzab-dataplane (release),
# runs a short local 3-node cluster over shm and then over udp (loopback) with
# --capture-corpus, then one over shm with injected loss in which follower 2 is killed and
# restarted (so that NACKs, repeats, HELLO replies and SNAPSHOT chunks are captured too),
# then one with one worker per node in which the leader is killed (so that VOTE datagrams and
# the discovery HELLOs of an election are captured; of that run only wire_decode's vote and
# hello files are kept, as its pipelines differ from the capture configuration's), and keeps what the nodes recorded: received datagrams by kind
# (wire_decode), each node's received sequence (pipeline_input), the nodes' endpoint records
# (endpoint_decode) and their knob values (knobs_parse). Files named regression-* (inputs that
# once crashed a target) are kept; earlier captured files are replaced.
#
# The cluster runs in the capture configuration the harnesses decode with
# (rzab_dataplane::fuzzing::CAPTURE): cluster fuzzcap, run id fuzzcap, 3 nodes, 2 workers,
# values of 32 and 4096 bytes in turn (--value-size 4096 --value-mix 32,4096, so the capture holds
# batched small transactions and fragmented large ones), 1024 keys, window 1024, 32 sessions, and over udp the published test secret
# CAPTURE.secret (so that the harnesses can check the MACs). Change both together.
#
#   fuzz/capture-corpus.sh [--seconds 2] [--transports "shm udp"] [--no-restart] [--no-failover]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=2 transports="shm udp" restart=yes failover=yes
while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --transports) transports="$2"; shift 2 ;;
    --no-restart) restart=no; shift ;;
    --no-failover) failover=no; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

corpus=fuzz/corpus
targets=(wire_decode pipeline_input endpoint_decode knobs_parse)
echo "==> building rzab-dataplane (release)"
cargo build --release --bin rzab-dataplane -q
bin=target/release/rzab-dataplane

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

captured=$work/captured
secret=$work/secret
printf '%s' "fuzzcap: a published test secret" >"$secret"
chmod 600 "$secret"
for transport in $transports; do
  echo "==> 3-node cluster over $transport for ${seconds}s, capturing"
  base=$((30000 + ($$ % 1000) * 10))
  pids=()
  # shm datagrams are sealed with CRC32C, udp ones with the MAC.
  sealing=()
  [ "$transport" = udp ] && sealing=(--cluster-secret-file "$secret")
  for node in 0 1 2; do
    "$bin" --cluster fuzzcap --run-id fuzzcap --node "$node" --nodes 3 --workers 2 \
      --value-size 4096 --value-mix 32,4096 --keys 1024 "${sealing[@]}" \
      --window 1024 --sessions 32 --write-ratio 300 --transport "$transport" \
      --duration "$seconds" --join-timeout 30 --shm-dir "$work" \
      --control-block "$work/block-$transport-$node" \
      --udp-port-base "$base" --multicast-port $((base + 9)) \
      --knob stats_interval_ms=60000 --capture-corpus "$captured" \
      >"$work/$transport-$node.log" 2>&1 &
    pids+=($!)
  done
  for index in "${!pids[@]}"; do
    if ! wait "${pids[$index]}"; then
      echo "node $index over $transport failed:" >&2
      cat "$work/$transport-$index.log" >&2
      exit 1
    fi
  done
  pids=()
  grep -h "captured" "$work/$transport-"*.log | sed 's/^/    /'
done

if [ "$restart" = yes ]; then
  # Loss brings NACKs and repeats; a follower killed and started again brings the leader's
  # HELLO replies and SNAPSHOT chunks, and a catch-up sequence for pipeline_input.
  echo "==> 3-node cluster over shm with 2% loss, follower 2 killed and restarted, capturing"
  pids=()
  node_args() {
    echo --cluster fuzzcap --run-id fuzzcap --node "$1" --nodes 3 --workers 2 --value-size 4096 --value-mix 32,4096 --keys 1024 \
      --window 1024 --sessions 32 --write-ratio 300 --transport shm --duration "$2" \
      --join-timeout 30 --shm-dir "$work" --control-block "$work/block-restart-$1" \
      --inject-loss 2 --inject-duplicate 1 --inject-reorder 1 \
      --knob stats_interval_ms=60000 --capture-corpus "$captured"
  }
  for node in 0 1 2; do
    # shellcheck disable=SC2046 # node_args prints words without spaces in them
    "$bin" $(node_args "$node" $((seconds * 2 + 2))) >"$work/restart-$node.log" 2>&1 &
    pids+=($!)
  done
  sleep 1
  kill -KILL "${pids[2]}"
  wait "${pids[2]}" 2>/dev/null || true
  # shellcheck disable=SC2046
  "$bin" $(node_args 2 "$seconds") >"$work/restart-2b.log" 2>&1 &
  pids[2]=$!
  for index in "${!pids[@]}"; do
    if ! wait "${pids[$index]}"; then
      echo "node $index of the restart run failed:" >&2
      cat "$work/restart-$index.log" "$work/restart-2b.log" >&2
      exit 1
    fi
  done
  pids=()
  grep -h "captured\|caught up" "$work/restart-"*.log | sed 's/^/    /'
fi

if [ "$failover" = yes ]; then
  echo "==> 3-node cluster over shm, one worker, leader 0 killed, capturing votes"
  pids=()
  for node in 0 1 2; do
    "$bin" --cluster fuzzcap --run-id fuzzcap --node "$node" --nodes 3 --workers 1 \
      --value-size 4096 --value-mix 32,4096 --keys 1024 --window 1024 --sessions 32 \
      --write-ratio 300 --transport shm --duration $((seconds + 2)) --join-timeout 30 \
      --shm-dir "$work" --control-block "$work/block-failover-$node" \
      --knob stats_interval_ms=60000 --capture-corpus "$work/failover" \
      >"$work/failover-$node.log" 2>&1 &
    pids+=($!)
  done
  sleep 1
  kill -KILL "${pids[0]}"
  wait "${pids[0]}" 2>/dev/null || true
  for index in 1 2; do
    if ! wait "${pids[$index]}"; then
      echo "node $index of the failover run failed:" >&2
      cat "$work/failover-$index.log" >&2
      exit 1
    fi
  done
  pids=()
  grep -h "leads epoch" "$work/failover-"*.log | sed 's/^/    /'
  mkdir -p "$captured/wire_decode"
  find "$work/failover/wire_decode" -type f \( -name 'vote-*' -o -name 'hello-*' \) \
    -exec cp {} "$captured/wire_decode/" \;
fi

for target in "${targets[@]}"; do
  mkdir -p "$corpus/$target"
  find "$corpus/$target" -type f ! -name 'regression-*' -delete
  if [ -d "$captured/$target" ]; then
    cp "$captured/$target"/* "$corpus/$target/"
  fi
  printf '%-16s %4d files %6s\n' "$target" "$(find "$corpus/$target" -type f | wc -l)" \
    "$(du -sh "$corpus/$target" | cut -f1)"
done

#!/usr/bin/env bash
# The README's first command: runs a local rzab cluster until Ctrl-C (or --duration).
#
#   scripts/run-local.sh [options] [-- extra rzab-dataplane options]
#
#   --nodes N            nodes, each a data plane and a control plane (default 3)
#   --workers W          worker threads (pipelines) per node (default 1)
#   --transport T        shm, udp or verbs (default shm; verbs builds with --features verbs)
#   --write-ratio R      share of writes in per-mille (default 50), or in percent as 5%
#   --duration S         seconds to run, 0 until Ctrl-C (default 0)
#   --cluster NAME       cluster name (default local)
#   --registry-port P    memcached port (default: the first free one from 11211)
#   --rest-port-base P   node n's REST and /metrics on 127.0.0.1:(P + n) (default 7100)
#   --prometheus         also run a Prometheus (dashboards/prometheus.yml) and print its URL
#   --bin-dir DIR        use the binaries in DIR instead of building (release) first
#   --keep-logs          keep the run directory (logs, Prometheus data) at the end
#   -h, --help           this help
#
# Installs memcached (and curl, and prometheus with --prometheus) with apt-get when missing,
# builds in release mode, starts memcached on a free loopback port and, per node,
# `rzab-dataplane --peers control-plane` and `rzab-controlplane` with one fresh --generation.
# It prints every node's REST and metrics URL, then one line a second computed from the
# control planes' /metrics: cluster throughput, reads and writes, average batch size per
# message type, and whether broadcasts go by multicast or unicast. On Ctrl-C, SIGTERM, the end
# of --duration or a failure it stops every process it started, prints each data plane's
# summary and removes the cluster's /dev/shm files.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

nodes=3 workers=1 transport=shm write_ratio=50 duration=0 cluster=local
registry_port="" rest_port_base=7100 prometheus=0 bin_dir="" keep_logs=0
extra=()
while (($#)); do
  case "$1" in
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --workers) need_value "$@"; workers=$2; shift 2 ;;
    --transport) need_value "$@"; transport=$2; shift 2 ;;
    --write-ratio) need_value "$@"; write_ratio=$2; shift 2 ;;
    --duration) need_value "$@"; duration=$2; shift 2 ;;
    --cluster) need_value "$@"; cluster=$2; shift 2 ;;
    --registry-port) need_value "$@"; registry_port=$2; shift 2 ;;
    --rest-port-base) need_value "$@"; rest_port_base=$2; shift 2 ;;
    --prometheus) prometheus=1; shift ;;
    --bin-dir) need_value "$@"; bin_dir=$2; shift 2 ;;
    --keep-logs) keep_logs=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

check_int --nodes "$nodes" 1 16
check_int --workers "$workers" 1 16
check_int --duration "$duration" 0 31536000
if [[ "$write_ratio" =~ ^([0-9]+)%$ ]]; then
  check_int --write-ratio "${BASH_REMATCH[1]}" 0 100
  write_ratio=$((BASH_REMATCH[1] * 10))
fi
check_int "--write-ratio (per-mille; or N%)" "$write_ratio" 0 1000
case "$transport" in
  shm|udp|verbs) ;;
  *) die "--transport $transport: expected shm, udp or verbs" ;;
esac
[[ "$cluster" =~ ^[A-Za-z0-9_-]{1,32}$ ]] || die "--cluster $cluster: 1 to 32 letters, digits, - or _"
[ -z "$registry_port" ] || check_int --registry-port "$registry_port" 1 65535
check_int --rest-port-base "$rest_port_base" 1 $((65535 - nodes + 1))

# --- prerequisites -------------------------------------------------------------------------
memcached_bin=$(command -v memcached || true)
[ -n "$memcached_bin" ] || [ ! -x /usr/bin/memcached ] || memcached_bin=/usr/bin/memcached
if [ -z "$memcached_bin" ]; then
  apt_install "the control planes exchange endpoints through memcached" memcached
  memcached_bin=$(command -v memcached || echo /usr/bin/memcached)
fi
command -v curl >/dev/null || apt_install "the live line reads the control planes' /metrics" curl
if ((prometheus)); then
  command -v prometheus >/dev/null || apt_install "--prometheus" prometheus
fi

if [ -n "$bin_dir" ]; then
  if [ ! -x "$bin_dir/rzab-dataplane" ] || [ ! -x "$bin_dir/rzab-controlplane" ]; then
    die "--bin-dir $bin_dir: rzab-dataplane and rzab-controlplane not found there"
  fi
else
  command -v cargo >/dev/null || die "cargo is needed: install Rust from https://rustup.rs" 1
  features=()
  [ "$transport" != verbs ] || features=(--features rzab-dataplane/verbs)
  echo "==> cargo build --release --bins ${features[*]}"
  cargo build --release --bins "${features[@]}"
  bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi

for ((n = 0; n < nodes; n++)); do
  if port_in_use 127.0.0.1 $((rest_port_base + n)); then
    die "127.0.0.1:$((rest_port_base + n)) is in use (another rzab-controlplane?): stop it or pass --rest-port-base" 1
  fi
done
for ((n = 0; n < nodes; n++)); do
  # A running data plane holds an flock on its control block.
  [ ! -e "/dev/shm/rzab-$cluster-n$n" ] || flock -n "/dev/shm/rzab-$cluster-n$n" true ||
    die "cluster $cluster is already running here (/dev/shm/rzab-$cluster-n$n is locked): pass --cluster" 1
done

# --- processes and their cleanup ------------------------------------------------------------
run_dir=$(mktemp -d -t rzab-local.XXXXXX)
dataplanes=() controlplanes=() others=()

# Sends SIGTERM to the given pids, waits up to 10 s for them, then SIGKILLs what is left.
stop_pids() {
  local pid deadline
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  deadline=$((SECONDS + 10))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  trap '' INT TERM
  echo "==> stopping"
  # Data planes first (they drain and print their summaries), then the rest.
  stop_pids "${dataplanes[@]}"
  stop_pids "${controlplanes[@]}" "${others[@]}"
  for ((n = 0; n < nodes; n++)); do
    sed -n 's/^summary /node '"$n"' summary: /p' "$run_dir/dataplane-$n.log" 2>/dev/null || true
    rm -f "/dev/shm/rzab-$cluster-n$n"
  done
  rm -f "/dev/shm/rzab-fabric-$cluster"
  if ((keep_logs)); then
    echo "logs kept in $run_dir"
  else
    rm -rf "$run_dir"
  fi
  echo "==> stopped: every process this script started has exited"
  exit "$status"
}
trap cleanup EXIT
# Ctrl-C reaches the data planes too (same process group), so they may stop before this
# script notices the signal: the loops below check this status, and a data plane that exits
# cleanly is taken as the end of the run.
catch_stop_signals

# Shows why a process failed and exits.
fail_with_log() {
  echo "error: $1 (last lines of $2):" >&2
  tail -n 20 "$2" >&2 || true
  exit 1
}

rm -f "/dev/shm/rzab-fabric-$cluster"
for ((n = 0; n < nodes; n++)); do rm -f "/dev/shm/rzab-$cluster-n$n"; done

registry_port=${registry_port:-$(free_port 11211)}
port_in_use 127.0.0.1 "$registry_port" && die "--registry-port $registry_port is in use" 1
memcached_args=(-l 127.0.0.1 -p "$registry_port" -U 0 -m 64 -t 1)
[ "$(id -u)" -ne 0 ] || memcached_args+=(-u root)
"$memcached_bin" "${memcached_args[@]}" >"$run_dir/memcached.log" 2>&1 &
others+=($!)
wait_listening 127.0.0.1 "$registry_port" "${others[0]}" ||
  fail_with_log "memcached did not start on 127.0.0.1:$registry_port" "$run_dir/memcached.log"
generation=$(now_ns)
echo "==> registry: memcached on 127.0.0.1:$registry_port; run generation $generation"
# The generation is the data planes' run id too (datagrams of an earlier run are dropped);
# udp datagrams are sealed with a MAC keyed by a secret made for this run.
sealing=(--run-id "$generation")
if [ "$transport" = udp ]; then
  (umask 077 && head -c 32 /dev/urandom >"$run_dir/cluster-secret")
  sealing+=(--cluster-secret-file "$run_dir/cluster-secret")
fi

for ((n = 0; n < nodes; n++)); do
  "$bin_dir/rzab-dataplane" --cluster "$cluster" --node "$n" --nodes "$nodes" \
    --workers "$workers" --transport "$transport" --peers control-plane \
    --write-ratio "$write_ratio" --duration "$duration" "${sealing[@]}" "${extra[@]}" \
    >"$run_dir/dataplane-$n.log" 2>&1 &
  dataplanes+=($!)
  "$bin_dir/rzab-controlplane" --cluster "$cluster" --node "$n" \
    --registry "127.0.0.1:$registry_port" --generation "$generation" \
    --listen "127.0.0.1:$((rest_port_base + n))" >"$run_dir/controlplane-$n.log" 2>&1 &
  controlplanes+=($!)
done
urls=()
for ((n = 0; n < nodes; n++)); do
  urls+=("http://127.0.0.1:$((rest_port_base + n))")
  wait_listening 127.0.0.1 $((rest_port_base + n)) "${controlplanes[n]}" ||
    fail_with_log "rzab-controlplane of node $n did not start" "$run_dir/controlplane-$n.log"
done

echo "==> $nodes nodes (cluster $cluster, $transport, $workers worker(s) each, writes $write_ratio per-mille); logs in $run_dir"
for ((n = 0; n < nodes; n++)); do
  role=follower
  ((n > 0)) || role=leader
  echo "    node $n ($role): REST ${urls[n]}/v1/status  ${urls[n]}/v1/knobs  metrics ${urls[n]}/metrics"
done
echo "    change a knob on every node: curl -X PATCH '${urls[0]}/v1/knobs?scope=cluster' -H 'Content-Type: application/json' -d '{\"multicast\": false}'"

if ((prometheus)); then
  prometheus_port=$(free_port 9090)
  mkdir -p "$run_dir/prometheus"
  # dashboards/prometheus.yml with this run's targets and cluster name.
  awk -v targets="$(for url in "${urls[@]}"; do echo "${url#http://}"; done)" -v cluster="$cluster" '
    /^ *- targets:/ { print; indent = $0; sub(/-.*/, "", indent)
                      n = split(targets, list, "\n")
                      for (i = 1; i <= n; i++) print indent "    - " list[i]
                      skipping = 1; next }
    skipping && /^ *- [0-9.]+:[0-9]+ *$/ { next }
    { skipping = 0 }
    /^ *cluster: / { sub(/cluster: .*/, "cluster: " cluster) }
    { print }' dashboards/prometheus.yml >"$run_dir/prometheus/prometheus.yml"
  prometheus --config.file="$run_dir/prometheus/prometheus.yml" \
    --storage.tsdb.path="$run_dir/prometheus/data" \
    --web.listen-address="127.0.0.1:$prometheus_port" >"$run_dir/prometheus.log" 2>&1 &
  others+=($!)
  wait_listening 127.0.0.1 "$prometheus_port" "${others[-1]}" ||
    fail_with_log "prometheus did not start" "$run_dir/prometheus.log"
  echo "    prometheus: http://127.0.0.1:$prometheus_port (import dashboards/rzab.json into Grafana with this as its data source)"
fi
echo "    pids: data planes ${dataplanes[*]}; control planes ${controlplanes[*]}; memcached$( ((prometheus)) && echo ", prometheus") ${others[*]}"

# --- wait for the cluster, then one live line a second -------------------------------------
# Which data plane exited, if any (prints its node number).
exited_dataplane() {
  local n
  for ((n = 0; n < nodes; n++)); do
    kill -0 "${dataplanes[n]}" 2>/dev/null || { echo "$n"; return 0; }
  done
  return 1
}

echo "==> waiting for the control planes to exchange endpoints through memcached"
deadline=$((SECONDS + 90))
while :; do
  totals=$(scrape_totals "${urls[@]}")
  read -r -a fields <<<"$totals"
  ((fields[13] < nodes)) || break
  if n=$(exited_dataplane); then
    fail_with_log "the data plane of node $n exited before the cluster came up" "$run_dir/dataplane-$n.log"
  fi
  ((SECONDS < deadline)) || fail_with_log "the cluster did not come up within 90 s" "$run_dir/controlplane-0.log"
  sleep 0.2
  check_stop
done
echo "==> cluster running$( ((duration)) && echo " for $duration s" || echo "; Ctrl-C stops it")"

before=$totals
before_ns=$(now_ns)
while :; do
  sleep 1 || true
  check_stop
  if n=$(exited_dataplane); then
    wait "${dataplanes[n]}" && code=0 || code=$?
    check_stop
    if ((code != 0)); then
      fail_with_log "the data plane of node $n exited with status $code" "$run_dir/dataplane-$n.log"
    fi
    if ((duration)); then
      echo "==> --duration $duration s is over"
    else
      echo "==> the data plane of node $n stopped (signalled); stopping the cluster"
    fi
    break
  fi
  now=$(scrape_totals "${urls[@]}")
  now_time=$(now_ns)
  live_line "$(awk -v a="$before_ns" -v b="$now_time" 'BEGIN { print (b - a) / 1e9 }')" "$nodes" "$before" "$now"
  before=$now
  before_ns=$now_time
done

#!/usr/bin/env bash
# Runs rzab on real RDMA machines: one node per host (node n on the n-th host; node 0 leads),
# each a `rzab-dataplane --transport verbs --peers control-plane` and a `rzab-controlplane`,
# started over ssh and meeting through one memcached on the registry host.
#
#   scripts/run-cluster.sh --hosts H0,H1,H2 --registry-host H --device mlx5_0 [options] [-- extra rzab-dataplane options]
#
#   --hosts LIST          comma-separated hosts (ssh names that also resolve on every host)
#   --registry-host H     the host that runs memcached (started and stopped by this script)
#   --registry-port P     memcached port (default 11211)
#   --device NAME         RDMA device as `ibv_devinfo` shows it (hca_id), e.g. mlx5_0
#   --transport T         verbs (default); udp (kernel UDP between the hosts, no RDMA); shm
#                         (every host is this machine: for trying the script, e.g. with the
#                         hosts 127.0.0.1,127.0.0.2,127.0.0.3)
#   --ib-port N           the device's port (default 1)
#   --gid-index N         GID index (default 0; RoCE v2 usually needs another: see show_gids)
#   --workers W           worker threads per node (default 1)
#   --write-ratio R       share of writes in per-mille (default 50), or in percent as 5%
#   --duration S          seconds to run, 0 until Ctrl-C (default 0)
#   --cluster NAME        cluster name (default rdma)
#   --rest-port P         each control plane's REST and /metrics on HOST:P (default 7100)
#   --bin-dir DIR         where both binaries are on every host, built with
#                         `cargo build --release --features verbs` (default: this checkout's
#                         target/release, for a shared file system)
#   --run-dir DIR         logs and pid files on every host (default /tmp/rzab-CLUSTER)
#   --ssh CMD             the ssh command (default: ssh -o BatchMode=yes -o ConnectTimeout=10)
#   --allow-no-hugepages  only warn when a host has no free 2 MiB huge pages
#   --check               check the prerequisites on every host and stop
#   --skip-checks         start without checking
#   --dry-run             print every command (checks, start, stop) instead of running it
#   -h, --help            this help
#
# Prerequisites, checked on every host before anything starts (and explained when missing):
# ibv_devinfo (package ibverbs-utils) lists the device and its port is PORT_ACTIVE; on
# InfiniBand a subnet manager has given the port a LID (PORT_INIT means none runs: start
# opensm on one host or enable the switch's SM; `sminfo` names the SM); free huge pages for the
# store (vm.nr_hugepages); a locked-memory limit that lets verbs register buffers; the
# binaries; memcached on the registry host.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

hosts_list="" registry_host="" registry_port=11211 device="" ib_port=1 gid_index=0 transport=verbs
workers=1 write_ratio=50 duration=0 cluster=rdma rest_port=7100 bin_dir="$PWD/target/release"
run_dir="" ssh_command="ssh -o BatchMode=yes -o ConnectTimeout=10" allow_no_hugepages=0
mode=run extra=()
while (($#)); do
  case "$1" in
    --hosts) need_value "$@"; hosts_list=$2; shift 2 ;;
    --registry-host) need_value "$@"; registry_host=$2; shift 2 ;;
    --registry-port) need_value "$@"; registry_port=$2; shift 2 ;;
    --device) need_value "$@"; device=$2; shift 2 ;;
    --transport) need_value "$@"; transport=$2; shift 2 ;;
    --ib-port) need_value "$@"; ib_port=$2; shift 2 ;;
    --gid-index) need_value "$@"; gid_index=$2; shift 2 ;;
    --workers) need_value "$@"; workers=$2; shift 2 ;;
    --write-ratio) need_value "$@"; write_ratio=$2; shift 2 ;;
    --duration) need_value "$@"; duration=$2; shift 2 ;;
    --cluster) need_value "$@"; cluster=$2; shift 2 ;;
    --rest-port) need_value "$@"; rest_port=$2; shift 2 ;;
    --bin-dir) need_value "$@"; bin_dir=$2; shift 2 ;;
    --run-dir) need_value "$@"; run_dir=$2; shift 2 ;;
    --ssh) need_value "$@"; ssh_command=$2; shift 2 ;;
    --allow-no-hugepages) allow_no_hugepages=1; shift ;;
    --check) mode=check; shift ;;
    --skip-checks) mode=run-unchecked; shift ;;
    --dry-run) mode=dry-run; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$hosts_list" ] || die "--hosts is required, e.g. --hosts node0,node1,node2"
[ -n "$registry_host" ] || die "--registry-host is required (the host that runs memcached)"
case "$transport" in
  verbs) [ -n "$device" ] || die "--device is required: the RDMA device as ibv_devinfo shows it (hca_id), e.g. mlx5_0" ;;
  udp|shm) device=${device:--} ;;
  *) die "--transport $transport: expected verbs, udp or shm" ;;
esac
IFS=, read -r -a hosts <<<"$hosts_list"
nodes=${#hosts[@]}
((nodes >= 1 && nodes <= 16)) || die "--hosts lists $nodes hosts: 1 to 16 expected"
safe='^[A-Za-z0-9._@-]+$'
for host in "${hosts[@]}" "$registry_host"; do
  [[ "$host" =~ $safe ]] || die "host '$host': expected a host name or address"
done
[[ "$device" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--device $device: expected a device name such as mlx5_0"
[ "$transport" = verbs ] || [ "$device" = - ] || die "--device is for --transport verbs only"
check_int --registry-port "$registry_port" 1 65535
check_int --ib-port "$ib_port" 1 255
check_int --gid-index "$gid_index" 0 255
check_int --workers "$workers" 1 16
check_int --duration "$duration" 0 31536000
check_int --rest-port "$rest_port" 1 65535
if [[ "$write_ratio" =~ ^([0-9]+)%$ ]]; then
  check_int --write-ratio "${BASH_REMATCH[1]}" 0 100
  write_ratio=$((BASH_REMATCH[1] * 10))
fi
check_int "--write-ratio (per-mille; or N%)" "$write_ratio" 0 1000
[[ "$cluster" =~ ^[A-Za-z0-9_-]{1,32}$ ]] || die "--cluster $cluster: 1 to 32 letters, digits, - or _"
run_dir=${run_dir:-/tmp/rzab-$cluster}
for path in "$bin_dir" "$run_dir"; do
  [[ "$path" =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "$path: expected an absolute path without spaces"
done
read -r -a ssh <<<"$ssh_command"
for arg in "${extra[@]}"; do
  [[ "$arg" =~ ^[A-Za-z0-9._=,:/+-]*$ ]] || die "extra data-plane option '$arg': unsupported characters"
done

# The prerequisite checks, run on each host (sent to `bash -s` over ssh).
# remote_checks NAME ROLES DEVICE PORT BIN_DIR ALLOW_NO_HUGEPAGES; ROLES: node, rdma (the RDMA
# device), registry, joined by +.
remote_checks() {
  local name=$1 roles=$2 device=$3 port=$4 bin_dir=$5 allow_no_hugepages=$6 failed=0 info state layer
  ok() { echo "  ok: $*"; }
  warn() { echo "  warning: $*"; }
  fail() { echo "  FAILED: $*"; failed=1; }
  echo "$name ($(hostname), $roles):"
  if [[ "$roles" == *registry* ]]; then
    if command -v memcached >/dev/null || [ -x /usr/bin/memcached ]; then
      ok "memcached (registry)"
    else
      fail "memcached not found on the registry host: apt-get install memcached"
    fi
  fi
  [[ "$roles" == *node* ]] || return "$failed"
  if [[ "$roles" != *rdma* ]]; then
    :
  elif ! command -v ibv_devinfo >/dev/null; then
    fail "ibv_devinfo not found: install the RDMA user-space tools (Debian/Ubuntu: apt-get install ibverbs-utils rdma-core; RHEL: dnf install libibverbs-utils rdma-core)"
  elif ! info=$(ibv_devinfo -d "$device" -i "$port" 2>&1); then
    fail "device $device port $port not found by ibv_devinfo ($(echo "$info" | head -n 1)); devices here: $(ibv_devinfo -l 2>/dev/null | tail -n +2 | xargs echo)"
  else
    state=$(echo "$info" | awk '$1 == "state:" { print $2; exit }')
    layer=$(echo "$info" | awk '$1 == "link_layer:" { print $2; exit }')
    case "$state" in
      PORT_ACTIVE) ok "$device port $port is PORT_ACTIVE (link layer ${layer:-unknown})" ;;
      PORT_INIT|PORT_ARMED)
        fail "$device port $port is $state: the link is up but no subnet manager has configured the port. InfiniBand needs one SM on the fabric: run opensm on one host (apt-get install opensm; systemctl start opensm) or enable the managed switch's SM, then check with sminfo" ;;
      PORT_DOWN) fail "$device port $port is PORT_DOWN: no link (cable, switch port, or the port's link type); see ibstat and ibv_devinfo -v" ;;
      *) fail "$device port $port: state '${state:-unknown}' (ibv_devinfo -d $device -i $port); PORT_ACTIVE is needed" ;;
    esac
    if [ "$layer" = InfiniBand ] && [ "$state" = PORT_ACTIVE ]; then
      local sm_lid lid
      sm_lid=$(echo "$info" | awk '$1 == "sm_lid:" { print $2; exit }')
      lid=$(echo "$info" | awk '$1 == "port_lid:" { print $2; exit }')
      if [ "${sm_lid:-0}" = 0 ] || [ "${lid:-0}" = 0 ]; then
        fail "no subnet manager: port_lid ${lid:-?}, sm_lid ${sm_lid:-?}. Start opensm on one host of the fabric (or the switch's SM); multicast groups need it too"
      elif command -v sminfo >/dev/null && ! sminfo >/dev/null 2>&1; then
        warn "sminfo could not query the subnet manager (sm_lid $sm_lid): it may need root"
      else
        ok "subnet manager at LID $sm_lid, port LID $lid"
      fi
    elif [ "$layer" = Ethernet ]; then
      ok "RoCE: no subnet manager needed; the GID index (--gid-index) must name a RoCE v2 GID of this port (show_gids)"
    fi
  fi
  local meminfo=${RZAB_MEMINFO:-/proc/meminfo} total free
  total=$(awk '$1 == "HugePages_Total:" { print $2 }' "$meminfo")
  free=$(awk '$1 == "HugePages_Free:" { print $2 }' "$meminfo")
  if [ "${free:-0}" -gt 0 ]; then
    ok "huge pages: $free of ${total:-0} free"
  else
    local explain="no free 2 MiB huge pages (HugePages_Total ${total:-0}, free ${free:-0}): the store then falls back to normal pages and runs slower. Reserve some: sysctl -w vm.nr_hugepages=1024 (2 GiB; persist it in /etc/sysctl.d/)"
    if [ "$allow_no_hugepages" = 1 ]; then warn "$explain"; else fail "$explain, or pass --allow-no-hugepages"; fi
  fi
  local memlock
  memlock=$(ulimit -l)
  if [[ "$roles" != *rdma* ]]; then
    :
  elif [ "$memlock" = unlimited ] || [ "$memlock" -ge 1048576 ]; then
    ok "locked memory limit: $memlock"
  else
    warn "locked memory limit is $memlock KiB: registering RDMA buffers may fail; raise it (ulimit -l unlimited, or memlock in /etc/security/limits.conf)"
  fi
  local binary
  for binary in rzab-dataplane rzab-controlplane; do
    if [ -x "$bin_dir/$binary" ]; then
      ok "$bin_dir/$binary"
    else
      fail "$bin_dir/$binary not found: build with cargo build --release --features verbs and put the binaries there (or pass --bin-dir)"
    fi
  done
  return "$failed"
}

# Single-quotes a string for a remote shell.
quote() {
  local text=${1//\'/\'\\\'\'}
  printf "'%s'" "$text"
}

# Runs (or, with --dry-run, prints) a command on a host.
remote() {
  local host=$1 command=$2
  if [ "$mode" = dry-run ]; then
    echo "${ssh[*]} $host $(quote "$command")"
  else
    "${ssh[@]}" "$host" "$command" </dev/null
  fi
}

check_host() {
  local host=$1 roles=$2
  local arguments="$host $roles $device $ib_port $bin_dir $allow_no_hugepages"
  if [ "$mode" = dry-run ]; then
    echo "${ssh[*]} $host bash -s -- $arguments  # stdin: remote_checks from scripts/run-cluster.sh"
    return 0
  fi
  # shellcheck disable=SC2016 # "$@" is for the remote bash
  { declare -f remote_checks; echo 'remote_checks "$@"'; } | "${ssh[@]}" "$host" bash -s -- "$arguments"
}

run_checks() {
  local host failed=0 checked=()
  echo "==> checking the prerequisites on ${hosts[*]}$([[ " ${hosts[*]} " == *" $registry_host "* ]] || echo " and $registry_host")"
  local node_roles=node
  [ "$transport" != verbs ] || node_roles=node+rdma
  for host in "${hosts[@]}"; do
    [[ " ${checked[*]} " != *" $host "* ]] || continue
    checked+=("$host")
    if [ "$host" = "$registry_host" ]; then
      check_host "$host" "$node_roles+registry" || failed=1
    else
      check_host "$host" "$node_roles" || failed=1
    fi
  done
  if [[ " ${checked[*]} " != *" $registry_host "* ]]; then
    check_host "$registry_host" registry || failed=1
  fi
  return "$failed"
}

if [ "$mode" = check ]; then
  run_checks && echo "==> every host is ready" && exit 0
  echo "==> some prerequisites are missing (see FAILED above)" >&2
  exit 1
fi

generation=$(now_ns)
registry="$registry_host:$registry_port"
# The address a host's control plane listens on (its first IPv4 address for its name).
listen_of() {
  echo "\$(getent ahostsv4 $1 | awk 'NR == 1 { print \$1 }'):$rest_port"
}

# The data planes' transport options.
case "$transport" in
  verbs) transport_options="--transport verbs --verbs-device $device --verbs-port $ib_port --verbs-gid-index $gid_index" ;;
  shm) transport_options="--transport shm" ;;
  udp)
    addresses=()
    for host in "${hosts[@]}"; do
      address=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')
      [ -n "$address" ] || die "--transport udp: $host has no IPv4 address here" 1
      addresses+=("$address")
    done
    transport_options="--transport udp --udp-hosts $(IFS=,; echo "${addresses[*]}")"
    ;;
esac
# Every data plane of the run gets its run id; over udp also a secret made for this run,
# written on each host by its start command (readable by its owner only), which keys the
# datagrams' MAC. A dry run shows a placeholder instead of the secret.
sealing_options="--run-id $generation"
secret_setup=""
if [ "$transport" = udp ]; then
  secret=$(head -c 32 /dev/urandom | base64 -w0)
  [ "$mode" != dry-run ] || secret="<32 random bytes, base64>"
  secret_setup="(umask 077 && echo '$secret' | base64 -d >cluster-secret) && "
  sealing_options+=" --cluster-secret-file $run_dir/cluster-secret"
fi

start_commands() {
  local n=$1 host=${hosts[$1]}
  local dataplane="$bin_dir/rzab-dataplane --cluster $cluster --node $n --nodes $nodes --workers $workers $transport_options --peers control-plane --write-ratio $write_ratio --duration $duration${extra[*]:+ ${extra[*]}} $sealing_options"
  local controlplane
  controlplane="$bin_dir/rzab-controlplane --cluster $cluster --node $n --registry $registry --generation $generation --listen $(listen_of "$host")"
  echo "mkdir -p $run_dir && cd $run_dir && $secret_setup(nohup $dataplane >dataplane-$n.log 2>&1 & echo \$! >dataplane-$n.pid) && (nohup $controlplane >controlplane-$n.log 2>&1 & echo \$! >controlplane-$n.pid)"
}

registry_command="mkdir -p $run_dir && cd $run_dir && (nohup \$(command -v memcached || echo /usr/bin/memcached) -l $registry_host -p $registry_port -U 0 -m 64 -t 2 \$([ \$(id -u) -ne 0 ] || echo -u root) >memcached.log 2>&1 & echo \$! >memcached.pid)"
# stop_command "NAMES" [NODE]: SIGTERM the processes of the pid files NAMES.pid, wait up to 10 s
# for them to drain and print their summaries, SIGKILL what is left, and remove NODE's control
# block (and the shm fabric).
stop_command() {
  local names=$1 block=""
  (($# < 2)) || block=" /dev/shm/rzab-$cluster-n$2"
  [ -z "$block" ] || [ "$transport" != shm ] || block+=" /dev/shm/rzab-fabric-$cluster"
  echo "cd $run_dir 2>/dev/null && for name in $names; do [ -f \$name.pid ] && kill -TERM \$(cat \$name.pid) 2>/dev/null; done; for _ in \$(seq 100); do alive=0; for name in $names; do [ -f \$name.pid ] && kill -0 \$(cat \$name.pid) 2>/dev/null && alive=1; done; [ \$alive = 0 ] && break; sleep 0.1; done; for name in $names; do [ -f \$name.pid ] && kill -KILL \$(cat \$name.pid) 2>/dev/null; rm -f \$name.pid$block; done; true"
}

if [ "$mode" = dry-run ]; then
  echo "# 1. prerequisites on every host"
  run_checks
  echo "# 2. the registry"
  remote "$registry_host" "$registry_command"
  echo "# 3. a data plane and a control plane per host (generation $generation)"
  for ((n = 0; n < nodes; n++)); do remote "${hosts[n]}" "$(start_commands "$n")"; done
  echo "# 4. REST and metrics"
  for ((n = 0; n < nodes; n++)); do echo "curl http://${hosts[n]}:$rest_port/v1/status  # node $n, metrics at /metrics"; done
  echo "# 5. stop (Ctrl-C, --duration, or a failure)"
  for ((n = 0; n < nodes; n++)); do remote "${hosts[n]}" "$(stop_command "dataplane-$n controlplane-$n" "$n")"; done
  remote "$registry_host" "$(stop_command memcached)"
  exit 0
fi

if [ "$mode" = run ]; then
  run_checks || die "some prerequisites are missing (see FAILED above; --skip-checks starts anyway)" 1
fi
command -v curl >/dev/null || apt_install "the live line reads the control planes' /metrics" curl

started=()
cleanup() {
  local status=$? n
  trap - EXIT INT TERM
  trap '' INT TERM
  echo "==> stopping"
  for n in "${started[@]}"; do
    remote "${hosts[n]}" "$(stop_command "dataplane-$n controlplane-$n" "$n")" &
  done
  wait || true
  for n in "${started[@]}"; do
    remote "${hosts[n]}" "sed -n 's/^summary /node $n summary: /p' $run_dir/dataplane-$n.log" || true
  done
  remote "$registry_host" "$(stop_command memcached)" || true
  echo "==> stopped; logs are in $run_dir on every host"
  exit "$status"
}
trap cleanup EXIT
catch_stop_signals

echo "==> registry: memcached on $registry; run generation $generation"
remote "$registry_host" "$registry_command"
for ((n = 0; n < nodes; n++)); do
  started+=("$n")
  remote "${hosts[n]}" "$(start_commands "$n")"
done
urls=()
for ((n = 0; n < nodes; n++)); do
  urls+=("http://${hosts[n]}:$rest_port")
  echo "    node $n on ${hosts[n]}: REST ${urls[n]}/v1/status  metrics ${urls[n]}/metrics"
done
echo "    Prometheus targets (as in dashboards/prometheus.yml):$(for host in "${hosts[@]}"; do printf ' %s:%s' "$host" "$rest_port"; done)"

echo "==> waiting for the control planes to exchange endpoints through memcached"
deadline=$((SECONDS + 120))
while :; do
  totals=$(scrape_totals "${urls[@]}")
  read -r -a fields <<<"$totals"
  ((fields[13] < nodes)) || break
  ((SECONDS < deadline)) ||
    die "the cluster did not come up within 120 s: see $run_dir/*.log on the hosts (curl ${urls[0]}/v1/status)" 1
  sleep 0.5
  check_stop
done
echo "==> cluster running$( ((duration)) && echo " for $duration s" || echo "; Ctrl-C stops it")"
before=$totals
before_ns=$(now_ns)
end=$((SECONDS + duration))
while :; do
  sleep 1 || true
  check_stop
  now=$(scrape_totals "${urls[@]}")
  now_time=$(now_ns)
  live_line "$(awk -v a="$before_ns" -v b="$now_time" 'BEGIN { print (b - a) / 1e9 }')" "$nodes" "$before" "$now"
  before=$now
  before_ns=$now_time
  read -r -a fields <<<"$now"
  if ((duration && SECONDS >= end)); then
    echo "==> --duration $duration s is over"
    break
  fi
  ((fields[0] > 0)) || die "no control plane answers any more" 1
done

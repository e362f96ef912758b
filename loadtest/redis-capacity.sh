#!/usr/bin/env bash
# What Redis carries for the cluster (BENCHMARKS.md, "Redis capacity").
#
#   loadtest/redis-capacity.sh single|cluster NODES [OUT_DIR]
#
# Starts a private redis-server (single) or a private Redis Cluster of
# MASTERS masters without replicas (cluster; default 3), pinned to the
# first core when the machine has more than one (REPLICAS=1: each
# master gets a replica, on that core too, and every publish waits for it,
# the gateway's --redis-wait-replicas 1), and runs the harness's
# `redis-capacity` scenario (NODES fan-out engines, every one in every
# room, publishing as fast as Redis acknowledges) on the other cores.
# SECONDS_MEASURED (default 10), ROOMS (default 256), IN_FLIGHT (default
# 256) and LOADTEST_BIN tune it. Loopback only; everything it starts is
# stopped when it ends.
set -euo pipefail

shape=${1:?usage: $0 single|cluster NODES [out_dir]}
nodes=${2:?usage: $0 single|cluster NODES [out_dir]}
out=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
loadtest=${LOADTEST_BIN:-$root/target/release/chatgate-loadtest}
masters=${MASTERS:-3}
replicas=${REPLICAS:-0}
work=$(mktemp -d)
redis_pid=""

redis_cpu=()
harness_cpu=()
if (($(nproc) > 1)); then
  redis_cpu=(taskset -c 0)
  harness_cpu=(taskset -c "1-$(($(nproc) - 1))")
fi

cleanup() {
  if [[ -n $redis_pid ]]; then kill -TERM "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  [[ -f $work/cluster/pids ]] && "$root/loadtest/redis-cluster.sh" stop "$work/cluster"
  rm -rf "$work"
}
trap cleanup EXIT

servers=()
case $shape in
single)
  ((replicas == 0)) || { echo "REPLICAS needs the cluster shape" >&2; exit 2; }
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "${redis_cpu[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" --logfile "$work/redis.log" &
  redis_pid=$!
  waited=0
  until redis-cli -p "$port" ping >/dev/null 2>&1; do
    kill -0 "$redis_pid" 2>/dev/null && ((waited++ < 400)) || { echo "redis-server did not start" >&2; exit 1; }
    sleep 0.05
  done
  url="redis://127.0.0.1:$port"
  servers=(--server "$url")
  ;;
cluster)
  url=$("${redis_cpu[@]}" "$root/loadtest/redis-cluster.sh" start "$work/cluster" "$masters" "$replicas")
  # Every server of the URL, then the masters among them (asked each,
  # until the roles `redis-cli --cluster create` gave have settled).
  all=${url#redis-cluster://}
  all=${all//\?node=/ }
  all=${all//&node=/ }
  for _ in $(seq 200); do
    servers=()
    for s in $all; do
      [[ $(redis-cli -h "${s%:*}" -p "${s#*:}" role | head -1) == master ]] && servers+=(--server "redis://$s")
    done
    ((${#servers[@]} == 2 * masters)) && break
    sleep 0.05
  done
  ((${#servers[@]} == 2 * masters)) || { echo "found $((${#servers[@]} / 2)) of $masters masters" >&2; exit 1; }
  ;;
*) echo "unknown shape $shape" >&2; exit 2 ;;
esac

outs=()
[[ -n $out ]] && outs=(--out "$out")
echo "redis-capacity: $shape, $nodes engine(s)"
"${harness_cpu[@]}" "$loadtest" --redis-url "$url" "${outs[@]}" redis-capacity \
  --engine-url "$url" "${servers[@]}" --nodes "$nodes" --wait-replicas "$replicas" \
  --rooms "${ROOMS:-256}" --in-flight "${IN_FLIGHT:-256}" --seconds "${SECONDS_MEASURED:-10}"

#!/usr/bin/env bash
# A throwaway Redis Cluster on loopback for measurements.
#
#   loadtest/redis-cluster.sh start DIR [MASTERS] [REPLICAS]   prints the gateway URL
#   loadtest/redis-cluster.sh stop DIR                         stops its servers (by PID)
#
# Servers keep nothing on disk beyond DIR, listen on spare ports of
# 127.0.0.1 and are joined with `redis-cli --cluster create`.
set -euo pipefail

cmd=${1:?usage: $0 start|stop DIR [masters] [replicas]}
dir=${2:?usage: $0 start|stop DIR [masters] [replicas]}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case $cmd in
start)
  masters=${3:-3}
  replicas=${4:-1}
  mkdir -p "$dir"
  : >"$dir/pids"
  seeds=()
  for ((i = 0; i < masters * (1 + replicas); i++)); do
    port=$(free_port)
    bus=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/nodes-$i.conf" --cluster-node-timeout 2000 \
      --cluster-port "$bus" --save '' --appendonly no --dir "$dir" \
      --logfile "$dir/redis-$i.log" >/dev/null &
    echo $! >>"$dir/pids"
    waited=0
    until redis-cli -p "$port" ping >/dev/null 2>&1; do
      ((waited++ < 400)) || { echo "redis-server on $port did not start" >&2; tail -5 "$dir/redis-$i.log" >&2; exit 1; }
      sleep 0.05
    done
    seeds+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${seeds[@]}" --cluster-replicas "$replicas" --cluster-yes >"$dir/create.log"
  for seed in "${seeds[@]}"; do
    waited=0
    until redis-cli -p "${seed#*:}" cluster info | grep -q cluster_state:ok; do
      ((waited++ < 600)) || { echo "the cluster is not ok on $seed" >&2; exit 1; }
      sleep 0.05
    done
  done
  # Replicas first copy their master's data (a full sync): until their
  # link is up, a write waiting for a replica (WAIT) times out.
  waited=0
  until
    up=0
    for seed in "${seeds[@]}"; do
      redis-cli -p "${seed#*:}" info replication | grep -q master_link_status:up && up=$((up + 1))
    done
    ((up == masters * replicas))
  do
    ((waited++ < 1200)) || { echo "$up of $((masters * replicas)) replicas in sync" >&2; exit 1; }
    sleep 0.05
  done
  url="redis-cluster://${seeds[0]}"
  sep='?'
  for seed in "${seeds[@]:1}"; do url+="${sep}node=$seed"; sep='&'; done
  echo "$url"
  ;;
stop)
  while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$dir/pids"
  # Gone before the caller removes their directory.
  while read -r pid; do
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  done <"$dir/pids"
  ;;
*)
  echo "unknown command $cmd" >&2
  exit 2
  ;;
esac

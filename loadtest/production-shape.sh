#!/usr/bin/env bash
# The chat mix on the shapes a deployment runs, with what each component
# spent per action (BENCHMARKS.md, "Production shape").
#
#   loadtest/production-shape.sh SHAPE [CONNECTIONS] [OUT_DIR]
#
# SHAPE: memory   one node, in-memory store
#        postgres one node on Postgres (a fresh schema, dropped afterwards)
#        cluster  three nodes on Postgres + Redis (a private redis-server)
#
# Needs release builds (`cargo build --release -p chatgate-gateway -p
# chatgate-loadtest`); GATEWAY_BIN and LOADTEST_BIN pick other binaries
# (to compare builds), POSTGRES_URL another database (default: the local
# server, database test), PG_EXTRA_OPTIONS more URL-encoded server
# options for the gateways' sessions (e.g. `%20-cenable_seqscan%3Don`).
# Everything listens on loopback and is stopped when the run ends.
set -euo pipefail

shape=${1:?usage: $0 memory|postgres|cluster [connections] [out_dir]}
connections=${2:-3000}
out=${3:-}
seconds=${SECONDS_OF_CHAT:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
gateway=${GATEWAY_BIN:-$root/target/release/chatgate}
loadtest=${LOADTEST_BIN:-$root/target/release/chatgate-loadtest}
pg_base=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
work=$(mktemp -d)
schema="shape_$$"
pids=()
redis_pid=""

cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -n $redis_pid ]]; then kill -TERM "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if [[ $shape != memory ]]; then psql -q "$pg_base" -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The issue's limits, the same for every shape.
limits=(--messages-per-minute 600 --requests-per-second 1000 --request-burst 1000)
probe=()
db=()
if [[ $shape != memory ]]; then
  psql -q "$pg_base" -c "CREATE SCHEMA $schema" >/dev/null
  db_url="$pg_base?options=-csearch_path%3D$schema${PG_EXTRA_OPTIONS:-}"
  db=(--database-url "$db_url")
  probe+=(--postgres-url "$pg_base")
fi
nodes=1
cluster=()
if [[ $shape == cluster ]]; then
  nodes=3
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" --logfile "$work/redis.log" &
  redis_pid=$!
  until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.05; done
  cluster=(--cluster --redis-url "redis://127.0.0.1:$rport/0")
  probe+=(--redis-url "redis://127.0.0.1:$rport")
elif [[ $shape != memory && $shape != postgres ]]; then
  echo "unknown shape $shape" >&2
  exit 2
fi

urls=()
for ((i = 0; i < nodes; i++)); do
  port=$(free_port)
  node_id=()
  [[ $shape == cluster ]] && node_id=(--node-id "n$i")
  "$gateway" --listen "127.0.0.1:$port" "${limits[@]}" "${db[@]}" "${cluster[@]}" "${node_id[@]}" \
    >"$work/gw$i.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q "chatgate listening on" "$work/gw$i.log" && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/gw$i.log" >&2; exit 1; }
    sleep 0.05
  done
  grep -q "chatgate listening on" "$work/gw$i.log" || { echo "node $i did not start" >&2; exit 1; }
  urls+=(--url "ws://127.0.0.1:$port/ws")
  probe+=(--metrics-url "http://127.0.0.1:$port/metrics" --gateway-pid "${pids[-1]}")
done

outs=()
[[ -n $out ]] && outs=(--out "$out")
echo "shape $shape: $nodes node(s), $connections connections, $seconds s"
"$loadtest" "${urls[@]}" "${probe[@]}" --workers 2 "${outs[@]}" \
  chat --connections "$connections" --room-size 20 --seconds "$seconds"

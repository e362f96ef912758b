#!/usr/bin/env bash
# Cross-node fan-out as the cluster grows (BENCHMARKS.md, "Scale-out").
#
#   loadtest/scale-out.sh NODES PLACEMENT [OUT_DIR]
#
# NODES gateway processes (in-memory store each) on one private
# redis-server, and one fan-out run at the same total rate whatever NODES
# is: ROOMS rooms (default 64) of MEMBERS members (default 10), RATE
# messages/s per room (default 10), SECONDS_OF_FANOUT seconds (default 20).
# PLACEMENT: rooms   every member of a room on one node (room r on node
#                    r mod NODES): a node should pay for its own rooms only
#            spread  each room's members spread over every node: every
#                    node is interested in every room
# Prints per-node gateway CPU and Redis's cost per message (command time,
# calls, bytes out); OUT_DIR gets the JSON report. GATEWAY_BIN and
# LOADTEST_BIN pick other builds (to compare). Loopback only; everything
# it starts is stopped when it ends.
set -euo pipefail

nodes=${1:?usage: $0 NODES rooms|spread [out_dir]}
placement=${2:?usage: $0 NODES rooms|spread [out_dir]}
out=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
gateway=${GATEWAY_BIN:-$root/target/release/chatgate}
loadtest=${LOADTEST_BIN:-$root/target/release/chatgate-loadtest}
rooms=${ROOMS:-64}
members=${MEMBERS:-10}
rate=${RATE:-10}
seconds=${SECONDS_OF_FANOUT:-20}
work=$(mktemp -d)
pids=()
redis_pid=""

cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -n $redis_pid ]]; then kill -TERM "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case $placement in
  rooms) where=(--rooms-on-one-node) ;;
  spread) where=() ;;
  *) echo "unknown placement $placement" >&2; exit 2 ;;
esac

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
redis_pid=$!
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.05; done

urls=()
probe=(--redis-url "redis://127.0.0.1:$rport")
for ((i = 0; i < nodes; i++)); do
  port=$(free_port)
  "$gateway" --listen "127.0.0.1:$port" --cluster --redis-url "redis://127.0.0.1:$rport/0" \
    --node-id "n$i" --messages-per-minute 100000 --requests-per-second 100000 \
    --request-burst 100000 --threads 1 >"$work/gw$i.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q "chatgate listening on" "$work/gw$i.log" && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/gw$i.log" >&2; exit 1; }
    sleep 0.05
  done
  grep -q "chatgate listening on" "$work/gw$i.log" || { echo "node $i did not start" >&2; exit 1; }
  urls+=(--url "ws://127.0.0.1:$port/ws")
  probe+=(--gateway-pid "${pids[-1]}")
done

outs=()
[[ -n $out ]] && outs=(--out "$out")
echo "scale-out: $nodes node(s), $placement, $rooms rooms x $members at $rate/s per room, $seconds s"
"$loadtest" "${urls[@]}" "${probe[@]}" --workers 1 "${outs[@]}" \
  fanout --rooms "$rooms" --members "$members" --seconds "$seconds" "${where[@]}" --rate "$rate"

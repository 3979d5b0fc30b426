#!/usr/bin/env bash
# Side-by-side measurement of moonx-ws and the peer servers, in one run.
#
# Server pinned to core 0; load client and the mock Kafka broker on core 1.
# Every step is bounded in time. Results: one JSON line per measurement in
# perf/out/<stamp>/, and a summary table on stdout.
#
# Usage: perf/compare.sh [servers...]   (default: moonx-ws rust-tokio)
#   servers: moonx-ws, moonx-ws-base (the build at BASE_BIN), rust-tokio,
#            go-gorilla, node-ws
#   PEERS_DIR   where the peers were copied and built (default /tmp/peers)
#   RUNS        repetitions of each measurement (default 3; the median is reported)
#   FANOUT_SECS measured seconds per fan-out run (default 10; the markets run too)
#   MARKETS_RATE updates/s of the markets run (default 10: 10k connections x 5
#               of 1000 Zipf-popular markets, 10% also on prices, ~2,800-3,100
#               deliveries per update, so ~30k deliveries/s. Here the
#               rust-tokio peer used 48-54% of its core at 10/s (15-17.5 us
#               per delivery, two runs) and 73% at 20/s, all passing: 10/s
#               is well below its saturation)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
RUNS=${RUNS:-3}
FANOUT_SECS=${FANOUT_SECS:-10}
MARKETS_RATE=${MARKETS_RATE:-10}
SECRET=loadtest-secret
PORT=3101
servers=("${@:-moonx-ws rust-tokio}")
read -r -a servers <<< "${servers[*]}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=perf/out/$stamp
root=$PWD
mkdir -p "$out"

source perf/common.sh
build_release

cleanup() { pkill -P $$ 2>/dev/null || true; [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null || true; }
trap cleanup EXIT

start_server() {
  local name=$1
  # A fresh broker for every server process: the mock cluster looks up a
  # fetch offset by scanning every message set it holds, so a broker that
  # served the earlier runs would cost the load core more in later ones.
  if [ -n "${BROKER_PID:-}" ]; then
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
  fi
  start_broker "$out"
  case "$name" in
    moonx-ws)
      start_moonx $PORT "$out/$name.log"
      return
      ;;
    moonx-ws-base)
      # Another build of moonx-ws (BASE_BIN), e.g. the commit before a
      # change, measured in the same run: a before/after table.
      MOONX_BIN="${BASE_BIN:?set BASE_BIN to the moonx-ws binary of the other build}" \
        start_moonx $PORT "$out/$name.log"
      return
      ;;
    rust-tokio)
      env PORT=$PORT JWT_SECRET=$SECRET KAFKA_BROKERS="$BROKERS" \
        taskset -c 0 "$PEERS_DIR/rust-tokio/target/release/rust-tokio-peer" > "$out/$name.log" 2>&1 &
      ;;
    go-gorilla)
      env PORT=$PORT JWT_SECRET=$SECRET KAFKA_BROKERS="$BROKERS" GOMAXPROCS=1 \
        taskset -c 0 "$PEERS_DIR/go-gorilla/go-gorilla-peer" > "$out/$name.log" 2>&1 &
      ;;
    node-ws)
      (cd "$PEERS_DIR/node-ws" && env PORT=$PORT JWT_SECRET=$SECRET KAFKA_BROKERS="$BROKERS" \
        taskset -c 0 node server.js > "$root/$out/$name.log" 2>&1) &
      ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 200); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    sleep 0.05
  done
  # env and taskset exec the server, so $! is its PID; node runs under a subshell.
  if [ "$name" = node-ws ]; then SERVER_PID=$(pgrep -n -P "$SERVER_PID" node || echo "$SERVER_PID"); fi
  sleep 3 # let the consumer join and position
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
  sleep 1
}

measure() { # name label args...
  # A run that fails its verdict (exit 1) still prints its result, which
  # summarize.py counts and flags; a run that printed none is marked.
  local name=$1 label=$2 f lines; shift 2
  f="$out/$name.$label.jsonl"
  lines=0
  [ -f "$f" ] && lines=$(wc -l < "$f")
  taskset -c 1 timeout 300 "$LT" "$@" --server 127.0.0.1:$PORT --jwt-secret $SECRET --server-pid "$SERVER_PID" --quiet --json \
    >> "$f" || true
  [ "$(wc -l < "$f")" -gt "$lines" ] || echo "{\"error\":\"$name $label: no result\"}" >> "$f"
}

# Runs interleave the servers, in reverse order every other round (A B,
# B A, A B, ...): this machine's speed drifts over a half-hour compare, and
# grouped runs put all of one drift on one server (perf/RESULTS.md, the
# low-rate rows).
for run in $(seq "$RUNS"); do
  order=("${servers[@]}")
  if [ $((run % 2)) = 0 ]; then
    order=()
    for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[$i]}"); done
  fi
  for name in "${order[@]}"; do
    echo "== $name run $run/$RUNS" >&2
    start_server "$name"
    measure "$name" connect10k connect -c 10000 --sources 64 --hold 3
    stop_server
    start_server "$name"
    measure "$name" fanout200 fanout --brokers "$BROKERS" -c 5000 -r 200 -d "$FANOUT_SECS" --sources 64
    # A fresh process: a server that fell behind at 200/s still holds its backlog.
    stop_server
    start_server "$name"
    measure "$name" fanout10 fanout --brokers "$BROKERS" -c 5000 -r 10 -d "$FANOUT_SECS" --sources 64
    stop_server
    # Per-market fan-out (market channels; the scenario's defaults: 10k
    # connections x 5 of 1000 markets over 4 chains, Zipf s = 1.1, 10% on prices).
    # A server without market channels fails it at set-up (subscribe refused).
    start_server "$name"
    measure "$name" markets markets --brokers "$BROKERS" -r "$MARKETS_RATE" -d "$FANOUT_SECS" --sources 64
    stop_server
  done
done

python3 perf/summarize.py "$out"
echo "raw results: $out" >&2

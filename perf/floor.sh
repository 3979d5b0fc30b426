#!/usr/bin/env bash
# CPU per new connection of moonx-ws, the rust-tokio peer and the kernel
# floor (loadtest/examples/floor.rs: accept, three reads, three canned
# writes), alternating in one run. Server on core 0, load on core 1.
#
# Usage: perf/floor.sh [servers...]   (default: floor moonx-ws rust-tokio)
#   RUNS        alternations (default 5; the median is reported)
#   PEERS_DIR   where the peers were built (default /tmp/peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
RUNS=${RUNS:-5}
PORT=3108
servers=("${@:-floor moonx-ws rust-tokio}")
read -r -a servers <<< "${servers[*]}"
out=perf/out/floor-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

source perf/common.sh
build_release
cargo build --release --quiet -p moonx-loadtest --example floor
cleanup() { pkill -P $$ 2>/dev/null || true; }
trap cleanup EXIT
start_broker "$out"

for run in $(seq "$RUNS"); do
  for name in "${servers[@]}"; do
    case "$name" in
      floor)
        PORT=$PORT taskset -c 0 target/release/examples/floor > "$out/floor.log" 2>&1 &
        SERVER_PID=$!
        wait_port $PORT
        ;;
      moonx-ws) start_moonx $PORT "$out/moonx-ws.log" ;;
      rust-tokio)
        env PORT=$PORT JWT_SECRET=loadtest-secret KAFKA_BROKERS="$BROKERS" \
          taskset -c 0 "$PEERS_DIR/rust-tokio/target/release/rust-tokio-peer" > "$out/rust-tokio.log" 2>&1 &
        SERVER_PID=$!
        wait_port $PORT
        sleep 2
        ;;
      *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    taskset -c 1 timeout 120 "$LT" connect -c 10000 --sources 64 --hold 1 --server 127.0.0.1:$PORT \
      --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --json >> "$out/$name.jsonl"
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    sleep 1
  done
done

python3 - "$out" "${servers[@]}" <<'PY'
import json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"{'server':<12} {'CPU µs/new conn (median)':>26}  runs")
for n in names:
    runs = [json.loads(l) for l in open(f"{out}/{n}.jsonl") if l.strip()]
    cpu = [r["server"]["cpu_us_per_connection"] for r in runs if r.get("server") and not r["failures"]]
    print(f"{n:<12} {statistics.median(cpu) if cpu else float('nan'):>26.1f}  {', '.join(f'{c:.0f}' for c in cpu)}")
PY
echo "raw results: $out" >&2

#!/usr/bin/env bash
# The kernel floor beside moonx-ws and the rust-tokio peer, alternating in
# one run. Server on core 0, load and broker on core 1.
#
# connect: CPU per new connection; the floor (loadtest/examples/floor.rs)
#   accepts, reads three messages and writes three canned replies.
# fanout: CPU per delivery and latency of `fanout -c 5000 -r RATE`; the floor
#   consumes Kafka, frames each update once and writes the frames to every
#   subscriber in io_uring batches, a sweep at most every FLUSH_MS (moonx-ws
#   runs with its saturated wait at FLUSH_MS, unstretched: WS_COALESCE_MAX_MS=4*FLUSH_MS
#   and WS_BENCH_SWEEP_SHARE_PCT=100).
#   Fresh broker per server process.
#
# Usage: perf/floor.sh [servers...]   (default: floor moonx-ws rust-tokio)
#   SCENARIO    connect (default) or fanout
#   RATE        fanout updates/s (default 200); FLUSH_MS (default 40)
#   SECS        fanout measured seconds (default 8)
#   RUNS        alternations (default 5; the median is reported)
#   PEERS_DIR   where the peers were built (default /tmp/peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
RUNS=${RUNS:-5}
SCENARIO=${SCENARIO:-connect}
RATE=${RATE:-200}
FLUSH_MS=${FLUSH_MS:-40}
PORT=3108
servers=("${@:-floor moonx-ws rust-tokio}")
read -r -a servers <<< "${servers[*]}"
out=perf/out/floor-$SCENARIO-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

source perf/common.sh
build_release
cargo build --release --quiet -p moonx-loadtest --example floor
cleanup() { pkill -P $$ 2>/dev/null || true; }
trap cleanup EXIT
[ "$SCENARIO" = connect ] && start_broker "$out"

for run in $(seq "$RUNS"); do
  for name in "${servers[@]}"; do
    if [ "$SCENARIO" = fanout ]; then start_broker "$out"; fi
    case "$name" in
      floor)
        env PORT=$PORT FLUSH_MS="$FLUSH_MS" \
          KAFKA_BROKERS="$([ "$SCENARIO" = fanout ] && echo "$BROKERS")" \
          taskset -c 0 target/release/examples/floor > "$out/floor.log" 2>&1 &
        SERVER_PID=$!
        wait_port $PORT
        [ "$SCENARIO" = fanout ] && sleep 2
        ;;
      moonx-ws) start_moonx $PORT "$out/moonx-ws.log" WS_COALESCE_MAX_MS=$((FLUSH_MS * 4)) WS_BENCH_SWEEP_SHARE_PCT=100 ;;
      rust-tokio) start_rust_tokio $PORT "$out/rust-tokio.log" ;;
      *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    if [ "$SCENARIO" = fanout ]; then
      taskset -c 1 timeout 120 "$LT" fanout --brokers "$BROKERS" -c 5000 -r "$RATE" -d "${SECS:-8}" --sources 64 \
        --server 127.0.0.1:$PORT --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --quiet --json >> "$out/$name.jsonl" || true
    else
      taskset -c 1 timeout 120 "$LT" connect -c 10000 --sources 64 --hold 1 --server 127.0.0.1:$PORT \
        --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --quiet --json >> "$out/$name.jsonl" || true
    fi
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    if [ "$SCENARIO" = fanout ]; then kill "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true; fi
    sleep 1
  done
done

python3 - "$out" "$SCENARIO" "${servers[@]}" <<'PY'
import json, statistics, sys
out, scenario, names = sys.argv[1], sys.argv[2], sys.argv[3:]
med = lambda xs: statistics.median(xs) if xs else float("nan")
if scenario == "connect":
    print(f"{'server':<12} {'CPU µs/new conn (median)':>26}  runs")
else:
    print(f"{'server':<12} {'CPU µs/delivery':>16} {'p50 ms':>8} {'p99 ms':>8}  runs (CPU / p99)")
for n in names:
    runs = [json.loads(l) for l in open(f"{out}/{n}.jsonl") if l.strip()]
    if scenario == "connect":
        cpu = [r["server"]["cpu_us_per_connection"] for r in runs if r.get("server") and not r["failures"]]
        print(f"{n:<12} {med(cpu):>26.1f}  {', '.join(f'{c:.0f}' for c in cpu)}")
    else:
        ok = [r for r in runs if r.get("server") and r["gaps"] == 0 and r["measured"] == r["expected_measured"]]
        cpu = [r["server"]["cpu_us_per_delivery"] for r in ok]
        p50 = [r["latency"]["p50_us"] / 1e3 for r in ok]
        p99 = [r["latency"]["p99_us"] / 1e3 for r in ok]
        pairs = ", ".join(f"{c:.3f} / {p:.1f}" for c, p in zip(cpu, p99))
        print(f"{n:<12} {med(cpu):>16.3f} {med(p50):>8.1f} {med(p99):>8.1f}  {pairs} ({len(ok)} of {len(runs)} complete)")
PY
echo "raw results: $out" >&2

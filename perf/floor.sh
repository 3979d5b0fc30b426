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
#   RUNS        rounds (default 6); each round runs every server once, in
#               the reverse order of the round before (an even count
#               gives each order as often). Reported: each
#               server's median, and (connect) its CPU divided by
#               rust-tokio's in the same round: the median of those ratios
#               and their range. Paired by round, the ratio is steadier than
#               a ratio of medians when the machine's speed drifts. The
#               `kafka` column is the part spent by the server's librdkafka
#               threads (an idle consumer's fetching, not set-up work);
#               the ratio is given with and without it.
#   MOONX_BIN   the moonx-ws binary to measure (default: this tree's release
#               build)
#   PEERS_DIR   where the peers were built (default /tmp/peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
RUNS=${RUNS:-6}
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
  order=("${servers[@]}")
  if [ $((run % 2)) -eq 0 ]; then
    order=(); for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[$i]}"); done
  fi
  for name in "${order[@]}"; do
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
      result=$(taskset -c 1 timeout 120 "$LT" fanout --brokers "$BROKERS" -c 5000 -r "$RATE" -d "${SECS:-8}" --sources 64 \
        --server 127.0.0.1:$PORT --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --quiet --json) || true
    else
      result=$(taskset -c 1 timeout 120 "$LT" connect -c 10000 --sources 64 --hold 1 --server 127.0.0.1:$PORT \
        --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --quiet --json) || true
    fi
    # One line per round even when the tool printed nothing (killed by the
    # timeout, say), so that rounds stay paired across servers.
    [ -n "$result" ] || result='{}'
    printf '%s\n' "$result" >> "$out/$name.jsonl"
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    if [ "$SCENARIO" = fanout ]; then kill "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true; fi
    sleep 1
  done
done

python3 - "$out" "$SCENARIO" "${servers[@]}" <<'PY'
import json, statistics, sys
out, scenario, names = sys.argv[1], sys.argv[2], sys.argv[3:]
med = lambda xs: statistics.median(xs) if xs else float("nan")
per_round, without = {}, {}
if scenario == "connect":
    print(f"{'server':<12} {'CPU µs/new conn (median)':>26} {'user':>6} {'system':>7} {'kafka':>6}  runs")
else:
    print(f"{'server':<12} {'CPU µs/delivery':>16} {'p50 ms':>8} {'p99 ms':>8}  runs (CPU / p99)")
for n in names:
    runs = [json.loads(l) for l in open(f"{out}/{n}.jsonl") if l.strip()]
    if scenario == "connect":
        # None for a failed round (or one whose server exited), so rounds
        # stay paired across servers.
        ok = [r["server"] if r.get("server") and not r.get("failures") and "cpu_us_per_connection" in r["server"]
              else None for r in runs]
        per_round[n] = [s["cpu_us_per_connection"] if s else None for s in ok]
        cpu = [c for c in per_round[n] if c is not None]
        user = [s["cpu_user_us_per_connection"] for s in ok if s and "cpu_user_us_per_connection" in s]
        system = [s["cpu_system_us_per_connection"] for s in ok if s and "cpu_system_us_per_connection" in s]
        kafka = [s.get("cpu_kafka_client_us_per_connection") if s else None for s in ok]
        without[n] = [c - k if c is not None and k is not None else None for c, k in zip(per_round[n], kafka)]
        kafka = [k for k in kafka if k is not None]
        print(f"{n:<12} {med(cpu):>26.1f} {med(user):>6.1f} {med(system):>7.1f} {med(kafka):>6.1f}  {', '.join(f'{c:.0f}' for c in cpu)}")
    else:
        ok = [r for r in runs if r.get("server") and r["gaps"] == 0 and r["measured"] == r["expected_measured"]]
        cpu = [r["server"]["cpu_us_per_delivery"] for r in ok]
        p50 = [r["latency"]["p50_us"] / 1e3 for r in ok]
        p99 = [r["latency"]["p99_us"] / 1e3 for r in ok]
        pairs = ", ".join(f"{c:.3f} / {p:.1f}" for c, p in zip(cpu, p99))
        print(f"{n:<12} {med(cpu):>16.3f} {med(p50):>8.1f} {med(p99):>8.1f}  {pairs} ({len(ok)} of {len(runs)} complete)")
peer = per_round.get("rust-tokio")
for n in names:
    if peer is None or n == "rust-tokio":
        continue
    ratios = [a / b for a, b in zip(per_round[n], peer) if a is not None and b]
    if ratios:
        print(f"{n} / rust-tokio, same round: median {med(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f} "
              f"({len(ratios)} rounds; ratio of the medians {med([c for c in per_round[n] if c is not None]) / med([c for c in peer if c is not None]):.2f})")
    # The same without each server's Kafka client threads (their idle
    # fetching is not set-up work); zero for a server with none (the floor).
    bare = [a / b for a, b in zip(without[n], without["rust-tokio"]) if a is not None and b]
    if bare:
        print(f"  without the Kafka clients' threads: median {med(bare):.2f}, range {min(bare):.2f}-{max(bare):.2f}")
PY
echo "raw results: $out" >&2

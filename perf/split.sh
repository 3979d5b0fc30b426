#!/usr/bin/env bash
# Where the 5000 x RATE fan-out latency goes: `fanout --arrival-stamps`
# against moonx-ws at each WS_BENCH_SWEEP_SHARE_PCT given and the rust-tokio peer,
# alternating in one run. The kernel's receive stamps split each latency
# into publish -> in the client's socket (the server's part) and socket ->
# parsed (the load client's lag). The stamps cost the client ~15% more CPU,
# so these runs are a diagnostic beside perf/compare.sh, not its figures.
# Server on core 0, load and a fresh broker per server process on core 1.
#
# Usage: perf/split.sh [servers...]   (default: moonx-ws:65 moonx-ws:100 rust-tokio)
#   moonx-ws:N  moonx-ws with WS_BENCH_SWEEP_SHARE_PCT=N
#   RATE        updates/s (default 200); SECS measured seconds (default 8)
#   RUNS        alternations (default 3; the median is reported)
#   PEERS_DIR   where the peers were built (default /tmp/peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR=${PEERS_DIR:-/tmp/peers}
RUNS=${RUNS:-3}
RATE=${RATE:-200}
PORT=3109
servers=("${@:-moonx-ws:65 moonx-ws:100 rust-tokio}")
read -r -a servers <<< "${servers[*]}"
out=perf/out/split-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

source perf/common.sh
build_release
cleanup() { pkill -P $$ 2>/dev/null || true; }
trap cleanup EXIT

for run in $(seq "$RUNS"); do
  for name in "${servers[@]}"; do
    start_broker "$out"
    case "$name" in
      moonx-ws:*) start_moonx $PORT "$out/$name.log" WS_BENCH_SWEEP_SHARE_PCT="${name#moonx-ws:}" ;;
      rust-tokio) start_rust_tokio $PORT "$out/rust-tokio.log" ;;
      *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    taskset -c 1 timeout 120 "$LT" fanout --brokers "$BROKERS" -c 5000 -r "$RATE" -d "${SECS:-8}" --sources 64 \
      --server 127.0.0.1:$PORT --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --arrival-stamps --quiet --json \
      >> "$out/$name.jsonl" || true
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    kill "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
    sleep 1
  done
done

python3 - "$out" "${servers[@]}" <<'PY'
import json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"{'server':<14} {'CPU µs/deliv':>12} {'p99 ms':>7} {'server p99':>10} {'lag p50':>8} {'lag p99':>8} {'client CPU':>10}  runs")
for n in names:
    runs = [json.loads(l) for l in open(f"{out}/{n}.jsonl") if l.strip()]
    ok = [r for r in runs if r.get("server") and r["gaps"] == 0 and r["measured"] == r["expected_measured"]]
    col = lambda f: [f(r) for r in ok]
    cpu = col(lambda r: r["server"]["cpu_us_per_delivery"])
    p99 = col(lambda r: r["latency"]["p99_us"] / 1e3)
    srv = col(lambda r: r["latency_to_socket"]["p99_us"] / 1e3)
    lag50 = col(lambda r: r["client_lag"]["p50_us"] / 1e3)
    lag99 = col(lambda r: r["client_lag"]["p99_us"] / 1e3)
    ccpu = col(lambda r: r["client_cpu_utilisation"])
    print(f"{n:<14} {med(cpu):>12.3f} {med(p99):>7.1f} {med(srv):>10.1f} {med(lag50):>8.2f} {med(lag99):>8.1f} {med(ccpu):>10.2f}"
          f"  {len(ok)} of {len(runs)} complete")
PY
echo "raw results: $out" >&2

#!/usr/bin/env bash
# Soak: connection churn plus a bounded-rate fan-out for SOAK_SECS (default
# 3600), sampling the server's RSS, open file descriptors, threads and
# connection count every 10 s into perf/out/soak-*/samples.csv, then checking
# that they return to their baseline once the load stops and that the
# fan-out saw zero gaps. Not in CI. Usage: SOAK_SECS=3600 perf/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SOAK_SECS:-3600}
out=perf/out/soak-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$out"
cargo build --release --quiet -p moonx-ws -p moonx-loadtest
LT=target/release/moonx-loadtest
trap 'pkill -P $$ 2>/dev/null || true' EXIT
taskset -c 1 "$LT" broker --duration $((secs + 600)) --address-file "$out/broker" > /dev/null 2>&1 &
for _ in $(seq 100); do [ -s "$out/broker" ] && break; sleep 0.1; done
B=$(cat "$out/broker")
env KAFKA_BROKERS="$B" KAFKA_FETCH_WAIT_MAX_MS=5 JWT_SECRET=loadtest-secret WS_SHARDS=1 WEBSOCKET_SERVICE_HOST=127.0.0.1 \
  WEBSOCKET_SERVICE_PORT=3106 RATE_LIMIT_MAX_CONNECTIONS_PER_IP=100000 WS_MAX_CONNECTIONS=19000 LOG_LEVEL=warn \
  taskset -c 0 target/release/moonx-ws > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/3106) 2>/dev/null && break; sleep 0.05; done
sleep 2
sample() {
  local rss fds thr conns
  rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  fds=$(ls /proc/$pid/fd | wc -l)
  thr=$(awk '/Threads/ {print $2}' /proc/$pid/status)
  conns=$(curl -s 127.0.0.1:3106/connections | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
  echo "$(date +%s),$1,$rss,$fds,$thr,$conns" >> "$out/samples.csv"
}
echo "time,phase,rss_kb,fds,threads,connections" > "$out/samples.csv"
sample baseline
# Steady fan-out: 1000 subscribers x 20 updates/s for the whole soak.
taskset -c 1 "$LT" fanout --server 127.0.0.1:3106 --brokers "$B" -c 1000 -r 20 -d "$secs" --warmup 1 --drain 10 \
  --jwt-secret loadtest-secret --deadline $((secs + 300)) --json > "$out/fanout.json" &
fan=$!
# Churn: 500 connections opened, authenticated, subscribed and dropped, over and over.
end=$((SECONDS + secs))
( while [ $SECONDS -lt $end ]; do
    taskset -c 1 "$LT" connect --server 127.0.0.1:3106 -c 500 --hold 1 --jwt-secret loadtest-secret --json >> "$out/churn.jsonl" 2>/dev/null || true
  done ) &
churn=$!
while kill -0 $fan 2>/dev/null; do sleep 10; sample load; done
wait $churn 2>/dev/null || true
sleep 5
sample after
python3 - "$out" <<'PY'
import csv, json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = list(csv.DictReader(open(out / "samples.csv")))
base, after = rows[0], rows[-1]
fan = json.load(open(out / "fanout.json"))
churn = [json.loads(l) for l in open(out / "churn.jsonl") if l.strip()]
peak_rss = max(int(r["rss_kb"]) for r in rows)
print(f"soak: {len(churn)} churn rounds ({sum(c['connections'] for c in churn)} connections), fan-out gaps {fan['gaps']}, duplicates {fan['duplicates']}, measured {fan['measured']}/{fan['expected_measured']}")
print(f"  baseline rss {base['rss_kb']} KB, fds {base['fds']}, threads {base['threads']}, connections {base['connections']}")
print(f"  peak rss {peak_rss} KB")
print(f"  after    rss {after['rss_kb']} KB, fds {after['fds']}, threads {after['threads']}, connections {after['connections']}")
ok = fan["gaps"] == 0 and fan["duplicates"] == 0 and after["fds"] == base["fds"] and after["threads"] == base["threads"] and after["connections"] == base["connections"]
print("  result:", "OK" if ok else "CHECK")
sys.exit(0 if ok else 1)
PY

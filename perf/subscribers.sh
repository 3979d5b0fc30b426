#!/usr/bin/env bash
# Kafka-to-socket latency and deliveries/s per core at several subscriber
# counts (moonx-ws alone, one pinned shard). Usage: perf/subscribers.sh [rate]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-100}
out=perf/out/subs-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$out"
cargo build --release --quiet -p moonx-ws -p moonx-loadtest
LT=target/release/moonx-loadtest
trap 'pkill -P $$ 2>/dev/null || true' EXIT
taskset -c 1 "$LT" broker --duration 3600 --address-file "$out/broker" > /dev/null 2>&1 &
for _ in $(seq 100); do [ -s "$out/broker" ] && break; sleep 0.1; done
B=$(cat "$out/broker")
env KAFKA_BROKERS="$B" KAFKA_FETCH_WAIT_MAX_MS=5 JWT_SECRET=loadtest-secret WS_SHARDS=1 WEBSOCKET_SERVICE_HOST=127.0.0.1 \
  WEBSOCKET_SERVICE_PORT=3104 RATE_LIMIT_MAX_CONNECTIONS_PER_IP=100000 WS_MAX_CONNECTIONS=19000 LOG_LEVEL=warn \
  taskset -c 0 target/release/moonx-ws > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/3104) 2>/dev/null && break; sleep 0.05; done
sleep 2
echo "| subscribers | updates/s | deliveries/s | server CPU (core) | CPU µs/delivery | p50 / p99 / p99.9 ms | gaps |"
echo "|---|---|---|---|---|---|---|"
for n in ${COUNTS:-1000 5000 10000}; do
  taskset -c 1 timeout 300 "$LT" fanout --server 127.0.0.1:3104 --brokers "$B" -c "$n" -r "$rate" -d "${FANOUT_SECS:-8}" \
    --sources 64 --jwt-secret loadtest-secret --server-pid "$pid" --json > "$out/$n.json"
  python3 -c "
import json,sys; r=json.load(open('$out/$n.json')); l=r['latency']; s=r['server']
print(f\"| {r['subscribers']} | {r['rate_per_s']} | {r['deliveries_per_s']:,.0f} | {s['cpu_utilisation']*100:.0f}% | {s['cpu_us_per_delivery']:.2f} | {l['p50_us']/1e3:.1f} / {l['p99_us']/1e3:.1f} / {l['p999_us']/1e3:.1f} | {r['gaps']} |\")"
done

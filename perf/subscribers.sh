#!/usr/bin/env bash
# Kafka-to-socket latency and deliveries/s per core at several subscriber
# counts (moonx-ws alone, one pinned shard). Usage: perf/subscribers.sh [rate]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-100}
out=perf/out/subs-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$out"
source perf/common.sh
build_release
trap 'pkill -P $$ 2>/dev/null || true' EXIT
start_broker "$out"
B=$BROKERS
start_moonx 3104 "$out/server.log"
pid=$SERVER_PID
echo "| subscribers | updates/s | deliveries/s | server CPU (core) | CPU µs/delivery | p50 / p99 / p99.9 ms | gaps |"
echo "|---|---|---|---|---|---|---|"
for n in ${COUNTS:-1000 5000 10000}; do
  taskset -c 1 timeout 300 "$LT" fanout --server 127.0.0.1:3104 --brokers "$B" -c "$n" -r "$rate" -d "${FANOUT_SECS:-8}" \
    --sources 64 --jwt-secret loadtest-secret --server-pid "$pid" --quiet --json > "$out/$n.json" || true
  python3 -c "
import json,sys; r=json.load(open('$out/$n.json')); l=r['latency']; s=r['server']
print(f\"| {r['subscribers']} | {r['rate_per_s']} | {r['deliveries_per_s']:,.0f} | {s['cpu_utilisation']*100:.0f}% | {s['cpu_us_per_delivery']:.2f} | {l['p50_us']/1e3:.1f} / {l['p99_us']/1e3:.1f} / {l['p999_us']/1e3:.1f} | {r['gaps']} |\")"
done

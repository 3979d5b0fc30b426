#!/usr/bin/env bash
# Does the shape scale? The same load per shard, with one shard on one core
# and with two shards on two cores: 2500 subscribers per shard at each rate.
# Reports deliveries per server CPU-second for both and their ratio (the
# issue's bar: within 10%). With two shards the load client and the broker
# share the two cores with the server (there is no third core here); the
# server's CPU is still only its own (/proc/PID/stat). LOAD_FLOATS=1 lets
# the client float over both cores in the one-shard case too.
# Usage: perf/scaling.sh [rates...]   (default: 10 100; ~1 min per point)
set -euo pipefail
cd "$(dirname "$0")/.."
rates=("${@:-10 100}")
read -r -a rates <<< "${rates[*]}"
out=perf/out/scaling-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$out"
source perf/common.sh
build_release
trap 'pkill -P $$ 2>/dev/null || true' EXIT
start_broker "$out"
per_shard=${PER_SHARD:-2500}
for rate in "${rates[@]}"; do
  for shards in 1 2; do
    if [ "$shards" = 1 ]; then cpus=0; load="taskset -c 1"; else cpus=0,1; load=""; fi
    # LOAD_FLOATS=1: the client floats over both cores in both cases (like for like).
    if [ "${LOAD_FLOATS:-0}" = 1 ]; then load=""; fi
    WS_SHARDS=$shards SERVER_CPUS=$cpus start_moonx 3109 "$out/server-$shards-$rate.log"
    $load timeout 300 "$LT" fanout --server 127.0.0.1:3109 --brokers "$BROKERS" -c $((per_shard * shards)) -r "$rate" \
      -d "${FANOUT_SECS:-10}" --sources 64 --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --quiet --json \
      | sed "s/^{/{\"shards\":$shards,\"rate\":$rate,/" >> "$out/scaling.jsonl" || true
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  done
done
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "scaling.jsonl").read_text().splitlines() if l.strip()]
by = {(r["shards"], r["rate"]): r for r in rows}
print("| updates/s | shards | subscribers | deliveries/s | server CPU µs/delivery | deliveries per CPU-second | vs one shard | p99 ms | gaps |")
print("|---|---|---|---|---|---|---|---|---|")
for (shards, rate), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    cpu = r["server"]["cpu_us_per_delivery"]
    per_cpu_s = 1e6 / cpu if cpu else float("nan")
    one = by.get((1, rate))
    ratio = per_cpu_s / (1e6 / one["server"]["cpu_us_per_delivery"]) if one else float("nan")
    print(f"| {rate} | {shards} | {r['subscribers']} | {r['deliveries_per_s']:,.0f} | {cpu:.2f} | {per_cpu_s:,.0f} | {ratio:.2f} | {r['latency']['p99_us']/1e3:.1f} | {r['gaps']} |")
PY
echo "raw results: $out" >&2

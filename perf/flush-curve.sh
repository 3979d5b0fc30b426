#!/usr/bin/env bash
# The latency/CPU trade of WS_BENCH_FLUSH_INTERVAL_US under 5000 subscribers x
# 200 updates/s: one fan-out run per interval, then perf/flush-curve.png
# (p99 latency against server CPU per delivery) and a table. The fixed
# interval alone: WS_COALESCE_MAX_MS=0 (no saturation pacing on top).
# Usage: perf/flush-curve.sh [intervals in µs...]   (bounded: ~25 s per point)
set -euo pipefail
cd "$(dirname "$0")/.."
intervals=("${@:-0 1000 2000 5000 10000 20000}")
read -r -a intervals <<< "${intervals[*]}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=perf/out/curve-$stamp
mkdir -p "$out"
source perf/common.sh
build_release
trap 'pkill -P $$ 2>/dev/null || true' EXIT
start_broker "$out"
for us in "${intervals[@]}"; do
  start_moonx 3102 "$out/server-$us.log" WS_BENCH_FLUSH_INTERVAL_US="$us" WS_COALESCE_MAX_MS=0
  pid=$SERVER_PID
  taskset -c 1 timeout 300 "$LT" fanout --server 127.0.0.1:3102 --brokers "$BROKERS" -c 5000 -r 200 -d "${FANOUT_SECS:-10}" \
    --sources 64 --jwt-secret loadtest-secret --server-pid "$pid" --quiet --json | sed "s/^{/{\"flush_interval_us\":$us,/" >> "$out/curve.jsonl" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
# The rust-tokio peer in the same run, as the reference point of the bar.
peer=${PEERS_DIR:-/tmp/peers}/rust-tokio/target/release/rust-tokio-peer
if [ -x "$peer" ]; then
  env PORT=3102 JWT_SECRET=loadtest-secret KAFKA_BROKERS="$BROKERS" taskset -c 0 "$peer" > "$out/peer.log" 2>&1 &
  pid=$!
  wait_port 3102 && sleep 3
  taskset -c 1 timeout 300 "$LT" fanout --server 127.0.0.1:3102 --brokers "$BROKERS" -c 5000 -r 200 -d "${FANOUT_SECS:-10}" \
    --sources 64 --jwt-secret loadtest-secret --server-pid "$pid" --quiet --json >> "$out/peer.jsonl" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
fi
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "curve.jsonl").read_text().splitlines() if l.strip()]
print("| WS_BENCH_FLUSH_INTERVAL_US | CPU µs/delivery | p50 ms | p99 ms | p99.9 ms | delivered/s | gaps |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    l = r["latency"]
    print(f"| {r['flush_interval_us']} | {r['server']['cpu_us_per_delivery']:.3f} | {l['p50_us']/1e3:.1f} | {l['p99_us']/1e3:.1f} | {l['p999_us']/1e3:.1f} | {r['deliveries_per_s']:,.0f} | {r['gaps']} |")
peer = None
if (out / "peer.jsonl").exists():
    lines = [l for l in (out / "peer.jsonl").read_text().splitlines() if l.strip()]
    if lines:
        peer = json.loads(lines[-1])
        l = peer["latency"]
        print(f"| rust-tokio peer | {peer['server']['cpu_us_per_delivery']:.3f} | {l['p50_us']/1e3:.1f} | {l['p99_us']/1e3:.1f} | {l['p999_us']/1e3:.1f} | {peer['deliveries_per_s']:,.0f} | {peer['gaps']} |")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [r["server"]["cpu_us_per_delivery"] for r in rows]
    ys = [r["latency"]["p99_us"] / 1e3 for r in rows]
    plt.figure(figsize=(7, 4.5))
    plt.plot(xs, ys, "o-", label="moonx-ws (WS_BENCH_FLUSH_INTERVAL_US)")
    for r, x, y in zip(rows, xs, ys):
        plt.annotate(f"{r['flush_interval_us'] // 1000} ms", (x, y), textcoords="offset points", xytext=(5, 5))
    if peer:
        px, py = peer["server"]["cpu_us_per_delivery"], peer["latency"]["p99_us"] / 1e3
        plt.plot([px], [py], "rx", markersize=10, label="rust-tokio peer")
        plt.axvline(0.7 * px, color="r", ls=":", lw=1)
        plt.axhline(0.7 * py, color="r", ls=":", lw=1)
        plt.fill_between([0, 0.7 * px], 0, 0.7 * py, color="g", alpha=0.1, label="≤ 0.7× the peer on both")
        plt.xlim(left=min(xs + [px]) * 0.8)
        plt.ylim(bottom=0)
    plt.xlabel("server CPU per delivery (µs)")
    plt.ylabel("p99 publish→receive latency (ms)")
    plt.title("5000 subscribers × 200 updates/s, one core")
    plt.grid(True, alpha=0.3)
    plt.legend(fontsize=8)
    plt.tight_layout()
    plt.savefig(out / "flush-curve.png", dpi=120)
    print(f"plot: {out / 'flush-curve.png'} (copy it to perf/flush-curve.png to publish)")
except ImportError:
    print("(matplotlib not installed: no plot)")
PY

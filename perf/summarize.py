#!/usr/bin/env python3
"""Median-of-runs table from perf/compare.sh output (one JSONL per server and scenario)."""
import json, pathlib, statistics, sys

out = pathlib.Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("*.jsonl")):
    name, label = f.stem.split(".", 1)
    runs = [json.loads(l) for l in f.read_text().splitlines() if l.strip().startswith("{")]
    runs = [r for r in runs if "error" not in r]
    if runs:
        rows.setdefault(name, {})[label] = runs

def med(runs, *path):
    vals = []
    for r in runs:
        v = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else float("nan")

def worst(runs, key):
    """The largest count over the runs (a correctness count: one bad run shows)."""
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return f"{max(vals):.0f}" if vals else "-"

def markets_label():
    """`markets 10000x5/1000 at 8/s`, from the settings of the first markets run."""
    for s in rows.values():
        for r in s.get("markets", []):
            st = r.get("settings", {})
            return f"markets {st.get('connections')}x{st.get('per_connection')}/{st.get('markets')} at {st.get('rate')}/s"
    return "markets"

print("| server | fanout 5000x200/s delivered/s | CPU µs/delivery | p50 / p99 / p99.9 ms | gaps | fanout 5000x10/s CPU µs/delivery | p50 / p99 ms "
      f"| {markets_label()} delivered/s | CPU µs/delivery | p50 / p99 ms | lost / leaked / dup (worst run) "
      "| 10k idle RSS B/conn | CPU µs/conn | conn/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, s in rows.items():
    f2, f1, c, mk = s.get("fanout200", []), s.get("fanout10", []), s.get("connect10k", []), s.get("markets", [])
    print(f"| {name} | {med(f2,'deliveries_per_s'):,.0f} | {med(f2,'server','cpu_us_per_delivery'):.3f} | "
          f"{med(f2,'latency','p50_us')/1000:.1f} / {med(f2,'latency','p99_us')/1000:.1f} / {med(f2,'latency','p999_us')/1000:.1f} | "
          f"{med(f2,'gaps'):.0f} | {med(f1,'server','cpu_us_per_delivery'):.2f} | "
          f"{med(f1,'latency','p50_us')/1000:.1f} / {med(f1,'latency','p99_us')/1000:.1f} | "
          f"{med(mk,'deliveries_per_s'):,.0f} | {med(mk,'server','cpu_us_per_delivery'):.2f} | "
          f"{med(mk,'latency','p50_us')/1000:.1f} / {med(mk,'latency','p99_us')/1000:.1f} | "
          f"{worst(mk,'lost')} / {worst(mk,'leaked')} / {worst(mk,'duplicates')} | "
          f"{med(c,'server','rss_bytes_per_connection'):,.0f} | {med(c,'server','cpu_us_per_connection'):.0f} | {med(c,'connections_per_s'):,.0f} |")
print(f"\n(median of {max((len(v) for s in rows.values() for v in s.values()), default=0)} runs each)")
# Runs whose verdict failed (lost or duplicated deliveries, refused or
# closed connections, ...) still count above; say which and why.
for name, s in rows.items():
    for label, runs in s.items():
        for i, r in enumerate(runs):
            v = r.get("verdict") or {}
            if v.get("pass") is False:
                print(f"- {name} {label} run {i + 1} FAILED: {'; '.join(v.get('reasons', []))}")

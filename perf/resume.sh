#!/usr/bin/env bash
# The reconnect storm of issue 19: 5000 private connections (a user each)
# drop together while 2000 private updates/s flow, stay away 2 s, then all
# reconnect at once and resume with `since`, beside 1000 observers on
# prices (100/s). Per run: the time until every client recovered, the
# Kafka messages the server read for the replays, how many of them it had
# read before (target: none, each read at most once per instance), and
# per message in the replayed range (which ends at the last update
# replayed: the server reads on to where its feed stood when the last
# resume began, so this is a little above 1), lost and duplicated
# private updates (target: none), and the observers' price p99 during the
# storm against the baseline before it (target: at most 1.5x), and the
# server's share of the price p99 (from its ingest stamp to receipt). One fresh
# server per run; with RUNS=3 the medians are the figures. The tool's
# thread that drives the storm runs at nice 10 (`--storm-nice`), so on the
# core the tool shares with the broker its own storm work does not delay
# the observers' reads it measures.
#
# The private producer lingers 100 ms (batches of ~50): the mock broker
# sends one record batch per partition per fetch, where a real broker
# sends up to max.partition.fetch.bytes, so one-message batches would
# measure the mock's round trips, not the server (LINGER_MS changes it).
#
# Usage: perf/resume.sh   (RUNS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PORT=3111
out=perf/out/resume-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
source perf/common.sh
build_release
trap 'pkill -P $$ 2>/dev/null || true' EXIT
for run in $(seq "$RUNS"); do
  # A fresh broker per run: runs on one mock broker (which keeps every
  # message it is given) got slower one after another (the baseline's p99
  # rose run after run, 14 -> 42 ms over five), so runs were not alike.
  mkdir -p "$out/broker-$run"
  start_broker "$out/broker-$run"
  start_moonx $PORT "$out/moonx-ws-$run.log"
  taskset -c 1 timeout 300 "$LT" resume -c 5000 --observers 1000 --sources 64 --linger-ms "${LINGER_MS:-100}" --price-rate "${PRICE_RATE:-100}" --brokers "$BROKERS" \
    --server 127.0.0.1:$PORT --jwt-secret loadtest-secret --server-pid "$SERVER_PID" \
    --threshold 'reread<=0' --threshold 'p99_ratio<=1.5' --quiet --json >> "$out/resume.jsonl" 2>> "$out/resume.err" || true
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  kill "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
done
python3 - "$out/resume.jsonl" <<'PY'
import json, sys, statistics
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def ms(us): return None if us is None else us / 1e3
def fmt(x, f="{:.1f}"): return "-" if x is None else f.format(x)
rows = []
print("| run | recovered | every client recovered (ms) | recover p50 / p99 (ms) | read for replays (again) / range | ratio | lost / dup / gaps / misrouted | price p99 baseline / storm (ms) | storm p99: drop and away / reconnect and after (ms) | p99 ratio | server's share p99: baseline / away / reconnect (ms) | server CPU baseline / storm | verdict |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for i, r in enumerate(runs, 1):
    rs, rp, pv, pr, s = r["resume"], r["replay"], r["private"], r["prices"], r["server"] or {}
    row = {
        "recover_all": rs["recover_all_ms"], "read_ratio": rp["read_ratio"], "reread": rp.get("read_again"), "p99_ratio": pr["p99_ratio"],
        "p99_baseline": ms(pr["baseline"]["p99_us"]), "p99_storm": ms(pr["storm"]["p99_us"]),
        "lost": pv["lost"], "dup": pv["duplicates"],
    }
    rows.append(row)
    share = pr.get("server_share", {})
    cpu = lambda k: fmt(None if s.get(k) is None else s[k] * 100, "{:.0f}%")
    verdict = "PASS" if r["verdict"]["pass"] else "FAIL: " + "; ".join(r["verdict"]["reasons"])
    print(f"| {i} | {rs['recovered']}/{rs['resumes']} (not {rs['not_recovered']}, failed {rs['failed']}) "
          f"| {fmt(rs['recover_all_ms'])} | {fmt(ms(rs['recover']['p50_us']))} / {fmt(ms(rs['recover']['p99_us']))} "
          f"| {fmt(rp['read_for_replays'], '{}')} ({fmt(rp.get('read_again'), '{}')}) / {rp['replayed_range']} | {fmt(rp['read_ratio'], '{:.2f}')}x "
          f"| {pv['lost']} / {pv['duplicates']} / {pv['gaps']} / {pv['misrouted']} "
          f"| {fmt(row['p99_baseline'])} / {fmt(row['p99_storm'])} "
          f"| {fmt(ms(pr.get('storm_away', {}).get('p99_us')))} / {fmt(ms(pr.get('storm_reconnect', {}).get('p99_us')))} "
          f"| {fmt(pr['p99_ratio'], '{:.2f}')}x "
          f"| {' / '.join(fmt(ms(share.get(k, {}).get('p99_us'))) for k in ('baseline', 'storm_away', 'storm_reconnect'))} "
          f"| {cpu('cpu_utilisation_baseline')} / {cpu('cpu_utilisation_storm')} | {verdict} |")
def median(k):
    xs = [r[k] for r in rows if r[k] is not None]
    return statistics.median(xs) if xs else None
print()
print(f"median of {len(rows)} runs: every client recovered in {fmt(median('recover_all'))} ms; "
      f"read again {fmt(median('reread'), '{}')} (target: none); read/range {fmt(median('read_ratio'), '{:.2f}')}x; "
      f"lost {fmt(median('lost'), '{}')}, duplicated {fmt(median('dup'), '{}')} (target: none); "
      f"price p99 baseline {fmt(median('p99_baseline'))} ms, storm {fmt(median('p99_storm'))} ms, "
      f"{fmt(median('p99_ratio'), '{:.2f}')}x (target <= 1.5)")
PY
echo "raw results: $out" >&2

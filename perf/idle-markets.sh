#!/usr/bin/env bash
# Idle memory of connections holding market channels: 10,000 connections,
# each subscribed to the same five markets (`connect` gives every
# connection one list), held idle; the server's RSS growth per connection.
# One fresh server per run; with RUNS=3 the median is the figure.
#
# Usage: perf/idle-markets.sh   (RUNS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
PORT=3102
out=perf/out/idle-markets-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
source perf/common.sh
build_release
trap 'pkill -P $$ 2>/dev/null || true' EXIT
start_broker "$out"
for run in $(seq "$RUNS"); do
  start_moonx $PORT "$out/moonx-ws.log"
  # Five markets per connection. What a connection costs (five entries in
  # subscriber lists, its own list of five topics) is the same whichever
  # markets they are and however they are shared.
  channels=()
  for m in 1 2 3 4 5; do channels+=(--channel "prices:$((run % 4 + 1)):T$((run * 10 + m))"); done
  taskset -c 1 timeout 300 "$LT" connect -c 10000 --sources 64 --hold 5 "${channels[@]}" \
    --server 127.0.0.1:$PORT --jwt-secret loadtest-secret --server-pid "$SERVER_PID" --quiet --json >> "$out/idle.jsonl" || true
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
done
python3 - "$out/idle.jsonl" <<'PY'
import json, sys, statistics
rss = [json.loads(l)["server"]["rss_bytes_per_connection"] for l in open(sys.argv[1])]
print("idle RSS B/conn, 5 markets each:", [round(r) for r in rss], "median", round(statistics.median(rss)))
PY

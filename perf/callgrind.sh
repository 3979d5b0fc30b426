#!/usr/bin/env bash
# Instruction counts of the hot paths under callgrind (hardware counters are
# not available here; instruction counts are deterministic where time is
# not). Runs examples/hot_paths.rs twice per path (N and 2N iterations) and
# reports the difference per iteration, so start-up work cancels out; then
# where to find each run's per-function breakdown.
# Usage: perf/callgrind.sh [paths...]   (default: all; ~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
paths=("${@:-upgrade frame message ingest fanout}")
read -r -a paths <<< "${paths[*]}"
out=perf/out/callgrind-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$out"
cargo build --release --quiet --example hot_paths
bin=target/release/examples/hot_paths
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'; }
echo "| path | instructions per iteration | per |"
echo "|---|---|---|"
for p in "${paths[@]}"; do
  case $p in fanout) n=20; per="delivery (1000 subscribers)"; div=1000 ;; *) n=2000; per="call"; div=1 ;; esac
  valgrind --tool=callgrind --callgrind-out-file="$out/$p.small" "$bin" "$p" "$n" > /dev/null 2>&1
  valgrind --tool=callgrind --callgrind-out-file="$out/$p.big" "$bin" "$p" $((2 * n)) > /dev/null 2>&1
  a=$(total "$out/$p.small"); b=$(total "$out/$p.big")
  echo "| $p | $(( (b - a) / n / div )) | $per |"
done
echo
echo "per-function self cost of a run: callgrind_annotate $out/<path>.big | head -40"

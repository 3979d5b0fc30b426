#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each). Not in CI.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain the
# sanitizer flags are allowed with RUSTC_BOOTSTRAP=1.
# Usage: fuzz/run.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
export RUSTC_BOOTSTRAP=1
for t in upgrade frames client_message kafka_value; do
  echo "== $t (${secs}s)"
  mkdir -p "corpus-work/$t"
  # New inputs go to the first (ignored) directory; corpus/ keeps the small seed set.
  cargo fuzz run "$t" "corpus-work/$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -3
done

#!/usr/bin/env bash
# Runs every test: `cargo test --workspace` (the service and the load tool),
# then the end-to-end tests of both once more with the server parking idle
# connections at every chance.
#
# What it installs, and only when missing (Debian packages, without their
# recommended extras):
#   redis-server  the Redis tests start real servers on free ports
#   chromium      tests/browser.rs drives /docs in headless Chromium
#   util-linux    tests/descriptors.rs runs the server under prlimit
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages, no recommends) for the tests"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo test --workspace "$@"
# The end-to-end tests once more with idle connections parked at every
# chance (docs/tuning.md, "Reading and idle connections"), so every behaviour is also checked across
# park and resume. `--workspace` (not `-p moonx-ws`) keeps the first pass's
# feature set, so nothing is built a second time.
MOONX_TEST_PARK_IDLE_MS=1 cargo test --workspace --test '*' "$@"

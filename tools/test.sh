#!/usr/bin/env bash
# Runs every test. The Redis tests start a real redis-server on a free port,
# the browser test a headless Chromium and the descriptor-limit test uses
# prlimit, so these are installed from Debian's packages first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test drives Debian's headless Chromium.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# The descriptor-limit test runs the server under util-linux's prlimit.
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages) for the tests"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo test --workspace "$@"
# The end-to-end tests once more with idle connections parked at every
# chance (README "Parking"), so every behaviour is also checked across
# park and resume.
MOONX_TEST_PARK_IDLE_MS=1 cargo test -p moonx-ws --test '*' "$@"

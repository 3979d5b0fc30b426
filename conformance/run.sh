#!/usr/bin/env bash
# RFC 6455 conformance: Autobahn's fuzzingclient cases (sections 1-7, 9, 10),
# run by kosoku (a Python 3 runner of Autobahn's own case files) against
# examples/autobahn_echo.rs, which uses the service's real upgrade parser,
# frame codec and assembler. The behaviour of every case is compared with
# conformance/expected.json; any change fails. Bounded: ~10 s.
# Usage: conformance/run.sh [--update]   (--update rewrites expected.json)
set -euo pipefail
cd "$(dirname "$0")/.."
# kosoku lives in a virtual environment of its own (target/conformance-venv),
# never in the system Python.
venv=target/conformance-venv
if ! "$venv/bin/python" -c "import kosoku" 2>/dev/null; then
  echo "installing kosoku (PyPI) into $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 needs python3-venv for this.
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q kosoku
fi
# --workspace: the tests' feature set, so nothing is built again.
cargo build --quiet --workspace --example autobahn_echo
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/debug/examples/autobahn_echo --port "$port" > /dev/null 2>&1 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
out=$(mktemp -d)
cases=()
for s in 1 2 3 4 5 6 7 9 10; do cases+=(-i "$s.*"); done
timeout 600 "$venv/bin/python" -c "import sys; from kosoku._cli import main; sys.argv[0] = 'kosoku'; sys.exit(main())" -p 4 "${cases[@]}" -o "$out" "127.0.0.1:$port" > "$out/run.log" 2>&1 || { cat "$out/run.log"; exit 1; }
python3 - "$out/index.json" conformance/expected.json "${1:-}" <<'PY'
import json, sys, collections
got_all = json.load(open(sys.argv[1]))
got = {k: {"behavior": v["behavior"], "behaviorClose": v["behaviorClose"]} for k, v in next(iter(got_all.values())).items()}
key = lambda c: [int(x) for x in c.split(".")]
got = dict(sorted(got.items(), key=lambda kv: key(kv[0])))
if sys.argv[3] == "--update":
    json.dump(got, open(sys.argv[2], "w"), indent=1)
    print(f"expected.json updated ({len(got)} cases)")
    sys.exit(0)
want = json.load(open(sys.argv[2]))
counts = collections.Counter(v["behavior"] for v in got.values())
print(f"autobahn: {len(got)} cases: " + ", ".join(f"{n} {b}" for b, n in sorted(counts.items())))
bad = [c for c, v in got.items() if v["behavior"] not in ("OK", "NON-STRICT", "INFORMATIONAL")]
changed = sorted(set(got) ^ set(want)) + [c for c in got if c in want and got[c] != want[c]]
for c in changed:
    print(f"  changed: {c}: expected {want.get(c)}, got {got.get(c)}")
for c in bad:
    print(f"  failed: {c}: {got[c]}")
sys.exit(1 if bad or changed else 0)
PY

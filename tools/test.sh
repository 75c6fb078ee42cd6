#!/usr/bin/env bash
# The test suite with everything it needs, on a fresh machine (the README's second command):
#   - nats-server (Debian's package) for the cluster tests,
#   - chromium (Debian's package) for the demo page test (tests/browser.rs),
#   - a Python virtual environment with `websockets` for the README's Python example,
# then `cargo test` with any arguments given. Nothing is skipped: a test whose tool is
# missing fails and names this script. (The variables it sets do not start with
# `TICKGATE_`: the server refuses unknown `TICKGATE_*` variables, and the tests start it.)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

if ! command -v nats-server >/dev/null 2>&1; then
  echo "tools/test.sh: installing nats-server (Debian package)" >&2
  as_root apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q nats-server >/dev/null
fi
export TG_TEST_NATS_SERVER=${TG_TEST_NATS_SERVER:-$(command -v nats-server)}

if [[ -z ${TG_TEST_CHROMIUM:-} ]] && ! command -v chromium >/dev/null 2>&1; then
  echo "tools/test.sh: installing chromium (Debian package)" >&2
  as_root apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q chromium >/dev/null
fi
export TG_TEST_CHROMIUM=${TG_TEST_CHROMIUM:-$(command -v chromium)}

VENV="$ROOT/target/py"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import websockets' 2>/dev/null; then
  echo "tools/test.sh: creating $VENV with websockets" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'websockets>=14,<16'
fi
export TG_TEST_PYTHON="$VENV/bin/python"

exec cargo test "$@"

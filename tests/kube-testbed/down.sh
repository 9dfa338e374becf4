#!/usr/bin/env bash
# Tears down the test bed started by up.sh (SIGTERM, then waits for its teardown).
set -euo pipefail
STATE=${UNDERSTUDY_TESTBED_STATE:-/tmp/understudy-testbed}
[[ -f $STATE/pid ]] || { echo "no test bed is up (no $STATE/pid)" >&2; exit 1; }
pid=$(cat "$STATE/pid")
if kill "$pid" 2>/dev/null; then
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
fi
rm -rf "$STATE"
echo "test bed down"

#!/usr/bin/env bash
# Brings up the two-cluster test bed (primary and standby, one node each with CSI storage) in
# the background and prints their kubeconfigs. Needs root; builds what is missing first.
#   tests/kube-testbed/up.sh      then   KUBECONFIG=$STATE/primary.kubeconfig kubectl get nodes
#   tests/kube-testbed/down.sh    tears both down and leaves the host as it was.
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=${UNDERSTUDY_TESTBED_STATE:-/tmp/understudy-testbed}
if [[ -f $STATE/pid ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
  echo "the test bed is already up (pid $(cat "$STATE/pid")); kubeconfigs in $STATE" >&2
  exit 1
fi
mkdir -p "$STATE"
rm -f "$STATE/ready"
cargo build --quiet -p understudy-e2e --bin understudy-testbed
nohup target/debug/understudy-testbed "$STATE" >"$STATE/log" 2>&1 &
echo $! >"$STATE/pid"
while [[ ! -f $STATE/ready ]]; do
  if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
    echo "the test bed failed to start:" >&2
    tail -30 "$STATE/log" >&2
    exit 1
  fi
  sleep 0.5
done
grep -E '^(primary|standby|both)' "$STATE/log"

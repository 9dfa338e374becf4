#!/usr/bin/env bash
# Failback cost: `tests/bench/failback.sh [SIZE_GIB] [STANDBY_PERCENT]` (defaults 4 and 1).
#
# A volume of SIZE_GIB (bench-volume's mix: 40% random, 40% text, 20% zero) is replicated once;
# the standby's copy is rebuilt from that point (`write --image`), STANDBY_PERCENT of its blocks
# are overwritten (the application running there) and 0.1% of the old primary's (writes it made
# after its last point). The standby's volume is cut into the standby's store as a group of its
# own, and the old primary is brought to it twice: by a full writer (`write --device`) and by a
# basis writer (`write --basis`). Prints, per way: blocks and bytes fetched, seconds; both must
# leave the old primary byte for byte the standby's volume.
#
# Uses the agents of target/debug (the dev profile is optimized); BENCH_BIN=dir for others.
set -euo pipefail
SIZE=${1:-4}
PCT=${2:-1}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/bench/debug-agents.sh"
W=$(mktemp -d "${BENCH_DIR:-/tmp}/understudy-failback.XXXXXX")
TPID=""
cleanup() {
  if [ -n "$TPID" ]; then kill -9 "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null; fi || true
  rm -rf "$W"
}
trap cleanup EXIT

"$B/target-agent" init --dir "$W/t" >"$W/tfp" 2>/dev/null
"$B/source-agent" init --dir "$W/s" >"$W/sfp" 2>/dev/null
"$B/target-agent" pair --dir "$W/t" --peer "$(cat "$W/sfp")" 2>/dev/null
"$B/source-agent" pair --dir "$W/s" --peer "$(cat "$W/tfp")" 2>/dev/null
"$B/target-agent" serve --dir "$W/t" --listen 127.0.0.1:0 --ready-file "$W/ready" 2>>"$W/t.log" &
TPID=$!
while [ ! -s "$W/ready" ]; do sleep 0.05; done
ADDR=$(cat "$W/ready")

cycle() { # GROUP IMAGE
  "$B/source-agent" run --dir "$W/s" --group "$1" --target "$ADDR" --volume "vol=$2" --once --json >/dev/null 2>>"$W/s.log"
}
ticket() { # GROUP OUT
  "$B/target-agent" ticket --dir "$W/t" --group "$1" --volume vol --target "$ADDR" --out "$2" 2>/dev/null
}
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

"$B/bench-volume" create "$W/primary.img" --size-gib "$SIZE" >/dev/null
cycle app "$W/primary.img"
ticket app "$W/app.ticket"
"$B/target-agent" write --ticket "$W/app.ticket" --image "$W/standby.img" >/dev/null
"$B/bench-volume" mutate "$W/standby.img" --percent "$PCT" --seed 3 >/dev/null
"$B/bench-volume" mutate "$W/primary.img" --percent 0.1 --seed 4 >/dev/null
cycle back "$W/standby.img"
ticket back "$W/back.ticket"

cp --sparse=always "$W/primary.img" "$W/old.img"
for way in full basis; do
  cp --sparse=always "$W/old.img" "$W/primary.img"
  args=(--device "$W/primary.img")
  [ "$way" = basis ] && args+=(--basis)
  drop_caches
  start=$(date +%s.%N)
  "$B/target-agent" write --ticket "$W/back.ticket" "${args[@]}" >"$W/$way.json" 2>>"$W/w.log"
  end=$(date +%s.%N)
  cmp -s "$W/primary.img" "$W/standby.img" || { echo "$way: the old primary is NOT the standby's volume" >&2; exit 1; }
  printf '%-6s %8s blocks fetched (%s MiB), %8s matched, %6.1f s\n' "$way" \
    "$(field "$W/$way.json" blocks)" "$(( $(field "$W/$way.json" bytes_written) >> 20 ))" \
    "$(field "$W/$way.json" blocks_matched)" "$(echo "$end $start" | awk '{print $1 - $2}')"
done

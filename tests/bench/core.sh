#!/usr/bin/env bash
# Replication-core benchmark: one volume of SIZE GiB (default 4) of 64 KiB blocks, ~40% random,
# ~40% log-like text, ~20% zero, from a fixed seed. Cases: initial full sync, incremental after a
# 1% change, incremental after a 10% change, failover rebuild. Prints wall time, volume throughput,
# chunk and UDP bytes on the wire, CPU time and peak RSS of each agent, on loopback.
# Usage: tests/bench/core.sh [SIZE_GIB]      (BENCH_DIR=/path to choose where the data goes)
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${1:-4}
cargo build --release --quiet -p source-agent -p target-agent -p understudy-e2e --bins
B=$PWD/target/release
W=$(mktemp -d "${BENCH_DIR:-/tmp}/understudy-bench.XXXXXX")
TPID=""
cleanup() { if [ -n "$TPID" ]; then kill -9 "$TPID" 2>/dev/null || true; fi; rm -rf "$W"; }
trap cleanup EXIT

"$B/target-agent" init --dir "$W/t" >"$W/tfp" 2>/dev/null
"$B/source-agent" init --dir "$W/s" >"$W/sfp" 2>/dev/null
"$B/target-agent" pair --dir "$W/t" --peer "$(cat "$W/sfp")" 2>/dev/null
"$B/source-agent" pair --dir "$W/s" --peer "$(cat "$W/tfp")" 2>/dev/null
"$B/bench-volume" create "$W/vol.img" --size-gib "$SIZE"

drop_caches() { sync; if ! (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then DROPPED=no; fi; }
DROPPED=yes
start_target() {
  rm -f "$W/ready"
  "$B/target-agent" serve --dir "$W/t" --listen 127.0.0.1:0 --ready-file "$W/ready" 2>>"$W/t.log" &
  TPID=$!
  while [ ! -s "$W/ready" ]; do sleep 0.05; done
}
stop_target() { # prints "peak_rss_kb cpu_seconds" of the target
  local hwm ticks
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$TPID/status")
  ticks=$(awk '{print $14 + $15}' "/proc/$TPID/stat")
  kill -9 "$TPID"; wait "$TPID" 2>/dev/null || true; TPID=""
  echo "$hwm $(echo "$ticks $(getconf CLK_TCK)" | awk '{printf "%.2f", $1 / $2}')"
}
cycle() { # case name
  start_target
  drop_caches
  /usr/bin/time -f '%M %e %U %S' -o "$W/time.$1" "$B/source-agent" run --dir "$W/s" --group bench \
    --target "$(cat "$W/ready")" --volume "vol=$W/vol.img" --once --json >"$W/report.$1" 2>>"$W/s.log"
  stop_target >"$W/target.$1"
}

cycle initial
"$B/bench-volume" mutate "$W/vol.img" --percent 1 --seed 2 >/dev/null
cycle incr1
"$B/bench-volume" mutate "$W/vol.img" --percent 10 --seed 3 >/dev/null
cycle incr10
drop_caches
/usr/bin/time -f '%M %e %U %S' -o "$W/time.failover" "$B/target-agent" failover --dir "$W/t" --group bench \
  --out "$W/out" --json >"$W/report.failover" 2>>"$W/t.log"
cmp -s "$W/out/volumes/vol.img" "$W/vol.img" && EXACT=yes || EXACT=NO

python3 - "$W" "$SIZE" "$DROPPED" "$EXACT" <<'PY'
import json, sys, os
w, size, dropped, exact = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
gib = size * 1024**3
def tm(case):
    rss, wall, user, sys_ = open(f"{w}/time.{case}").read().split()
    return int(rss), float(wall), float(user) + float(sys_)
print(f"# Understudy core benchmark: {size} GiB volume, loopback, page cache dropped: {dropped}")
print(f"# machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024**3} GiB RAM")
print()
print("| case | wall s | volume GiB/s | chunk bytes sent | UDP bytes sent | source CPU s | source peak RSS MiB | target CPU s | target peak RSS MiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for case, label in [("initial", "initial full sync"), ("incr1", "incremental, 1% changed"), ("incr10", "incremental, 10% changed")]:
    r = json.loads(open(f"{w}/report.{case}").read().strip().splitlines()[-1])
    rss, wall, cpu = tm(case)
    trss, tcpu = open(f"{w}/target.{case}").read().split()
    print(f"| {label} | {wall:.2f} | {gib / wall / 1024**3:.2f} | {r['bytes_sent']:,} | {r['wire_bytes_sent']:,} | {cpu:.2f} | {rss / 1024:.0f} | {tcpu} | {int(trss) / 1024:.0f} |")
rss, wall, cpu = tm("failover")
f = json.loads(open(f"{w}/report.failover").read())
print(f"| failover rebuild (+ read-back verify), bit-exact: {exact}, report ok: {f['ok']} | {wall:.2f} | {gib / wall / 1024**3:.2f} | - | - | - | - | {cpu:.2f} | {rss / 1024:.0f} |")
PY

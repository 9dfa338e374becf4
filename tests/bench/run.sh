#!/usr/bin/env bash
# Understudy against rsync and restic, on the same data in the same run (docs/benchmarks.md).
#
# One volume of SIZE GiB (default 4) of 64 KiB blocks from a fixed seed: ~40% random, ~40% log
# text, ~20% zero. Cases: initial full sync, incremental after 1% and then 10% of the blocks are
# overwritten, and the rebuild of the volume from the replica. Peers, over loopback:
#   rsync-inplace    rsync daemon, --inplace --no-whole-file
#   rsync-inplace-z  the same with -z
#   rsync-volsync    rsync daemon with the flags of VolSync's rsync-tls mover: -aAhHSxz
#   restic           backup to a local repository, restore for the rebuild
# Physical limits in the same run: dd read and write with direct I/O, raw loopback TCP (iperf3).
# Then a 1 Gbit/s link profile: Understudy with its own cap (--bandwidth-limit-mbit 1000) against
# rsync --bwlimit, for the three sync cases. Last, cost against capacity: a 1 TiB sparse image
# holding 64 MiB of random data (64 runs of 1 MiB, spread evenly), synced, then again after
# 1 MiB of it changed (profile sparse-1tib).
#
# Usage: tests/bench/run.sh [SIZE_GIB]
#   BENCH_DIR=/path   where the data goes (default /tmp; needs ~6x SIZE free)
#   BENCH_NO_LINK=1   skip the 1 Gbit/s profile
#   BENCH_OUT=dir     where results.jsonl, report.md and benchmark.png go (default: printed only)
#   BENCH_ONLY=understudy  only Understudy's cases (loopback, rebuild, 1 TiB sparse): no peers
#   BENCH_NO_TIB=1    skip the 1 TiB sparse case
#   BENCH_BIN=dir     use the agents and bench tools in dir instead of building them (to measure
#                     another build, e.g. an earlier commit's, in the same conditions)
# Needs root for apt (rsync, restic, iperf3, fonts) and to drop the page cache; without root the
# page cache stays and the report says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SIZE=${1:-4}

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
for p in rsync:rsync restic:restic iperf3:iperf3 /usr/bin/time:time; do
  need "${p%%:*}" || missing+=("${p##*:}")
done
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The agents alone (without the test crate's crash points), then the bench tools.
if [ -n "${BENCH_BIN:-}" ]; then
  B=$BENCH_BIN
else
  cargo build --release --quiet -p source-agent -p target-agent
  cargo build --release --quiet -p understudy-e2e --bin bench-volume --bin bench-report
  B=$ROOT/target/release
fi

W=$(mktemp -d "${BENCH_DIR:-/tmp}/understudy-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do pkill -KILL -P "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
R=$W/results.jsonl
: >"$R"

DROPPED=yes
drop_caches() { sync; if ! (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then DROPPED=no; fi; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# "wall user sys maxrss_kib" of a /usr/bin/time output file
timed() { /usr/bin/time -f '%e %U %S %M' -o "$1" "${@:2}"; }
rec() { echo "$1" >>"$R"; }
# record PROFILE TOOL CASE TIMEFILE_SOURCE [TARGET_CPU TARGET_RSS_KIB] WIRE_BYTES
record() {
  local profile=$1 tool=$2 case=$3 tf=$4 tcpu=$5 trss=$6 wire=$7
  read -r wall user sys rss <"$tf"
  rec "{\"profile\":\"$profile\",\"tool\":\"$tool\",\"case\":\"$case\",\"wall\":$wall,\"cpu_src\":$(echo "$user $sys" | awk '{print $1+$2}'),\"rss_src_kib\":$rss,\"cpu_tgt\":$tcpu,\"rss_tgt_kib\":$trss,\"wire\":$wire}"
}

# ---- the volume -------------------------------------------------------------------------------
FRESH=no
make_volume() { # (again from the seed, unless no case ran on it since)
  [ "$FRESH" = yes ] && return
  "$B/bench-volume" create "$W/vol.img" --size-gib "$SIZE" >"$W/vol.json"
  rec "{\"volume\":$(cat "$W/vol.json"),\"size_gib\":$SIZE}"
  FRESH=yes
}
mutate() { # CASE PERCENT SEED
  "$B/bench-volume" mutate "$W/vol.img" --percent "$2" --seed "$3" >"$W/mut.json"
  rec "{\"mutation\":\"$1\",\"of\":$(cat "$W/mut.json")}"
}

# ---- physical limits --------------------------------------------------------------------------
limits() {
  drop_caches
  timed "$W/t.ddr" dd if="$W/vol.img" of=/dev/null bs=4M iflag=direct status=none
  read -r wall _ <"$W/t.ddr"
  rec "{\"limit\":\"dd_read_direct\",\"bytes\":$((SIZE << 30)),\"seconds\":$wall}"
  head -c 1G /dev/urandom >"$W/pattern" # non-zero data, in the page cache
  timed "$W/t.ddw" sh -c "for i in \$(seq 0 $((SIZE - 1))); do dd if='$W/pattern' of='$W/ddw.img' bs=4M oflag=direct conv=notrunc seek=\$((i * 256)) status=none; done"
  read -r wall _ <"$W/t.ddw"
  rec "{\"limit\":\"dd_write_direct\",\"bytes\":$((SIZE << 30)),\"seconds\":$wall}"
  rm -f "$W/pattern" "$W/ddw.img"
  local p; p=$(port)
  iperf3 -s -1 -B 127.0.0.1 -p "$p" >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 0.5
  iperf3 -c 127.0.0.1 -p "$p" -n "$((SIZE << 30))" -J >"$W/iperf.json"
  python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]["sum_received"]; print(json.dumps({"limit":"tcp_loopback","bytes":e["bytes"],"seconds":e["seconds"]}))' "$W/iperf.json" >>"$R"
}

# ---- Understudy -------------------------------------------------------------------------------
TPID=""
us_pair() {
  rm -rf "$W/t" "$W/s"
  "$B/target-agent" init --dir "$W/t" >"$W/tfp" 2>/dev/null
  "$B/source-agent" init --dir "$W/s" >"$W/sfp" 2>/dev/null
  "$B/target-agent" pair --dir "$W/t" --peer "$(cat "$W/sfp")" 2>/dev/null
  "$B/source-agent" pair --dir "$W/s" --peer "$(cat "$W/tfp")" 2>/dev/null
}
us_target_start() {
  rm -f "$W/ready"
  "$B/target-agent" serve --dir "$W/t" --listen 127.0.0.1:0 --ready-file "$W/ready" 2>>"$W/t.log" &
  TPID=$!; PIDS+=("$TPID")
  while [ ! -s "$W/ready" ]; do sleep 0.05; done
}
us_target_stop() { # prints "cpu_seconds peak_rss_kib"
  local hwm ticks
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$TPID/status")
  ticks=$(awk '{print $14 + $15}' "/proc/$TPID/stat")
  kill -9 "$TPID"; wait "$TPID" 2>/dev/null || true; TPID=""
  echo "$(echo "$ticks $(getconf CLK_TCK)" | awk '{printf "%.2f", $1 / $2}') $hwm"
}
us_sync() { # PROFILE CASE [source args]
  us_target_start
  drop_caches
  timed "$W/t.us" "$B/source-agent" run --dir "$W/s" --group bench --target "$(cat "$W/ready")" \
    --volume "vol=$W/vol.img" --once --json "${@:3}" >"$W/us.json" 2>>"$W/s.log"
  read -r tcpu trss < <(us_target_stop)
  local wire; wire=$(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(r["wire_bytes_sent"]+r["wire_bytes_received"])' "$W/us.json")
  record "$1" understudy "$2" "$W/t.us" "$tcpu" "$trss" "$wire"
}
us_rebuild() {
  rm -rf "$W/out"
  drop_caches
  timed "$W/t.usf" "$B/target-agent" failover --dir "$W/t" --group bench --out "$W/out" --json >"$W/usf.json" 2>>"$W/t.log"
  cmp -s "$W/out/volumes/vol.img" "$W/vol.img" || { echo "Understudy rebuild is NOT bit-exact" >&2; exit 1; }
  read -r wall user sys rss <"$W/t.usf"
  rec "{\"profile\":\"loopback\",\"tool\":\"understudy\",\"case\":\"rebuild\",\"wall\":$wall,\"cpu_src\":0,\"rss_src_kib\":0,\"cpu_tgt\":$(echo "$user $sys" | awk '{print $1+$2}'),\"rss_tgt_kib\":$rss,\"wire\":0}"
  rm -rf "$W/out"
}

# ---- rsync ------------------------------------------------------------------------------------
RSPORT=$(port)
cat >"$W/rsyncd.conf" <<EOF
use chroot = no
uid = $(id -u)
gid = $(id -g)
log file = $W/rsyncd.log
[rs]
path = $W/rs
read only = no
EOF
mkdir -p "$W/rs"
rs_sync() { # PROFILE TOOL CASE [rsync flags]
  local profile=$1 tool=$2 case=$3
  mkdir -p "$W/rs/$profile-$tool"
  /usr/bin/time -f '%e %U %S %M' -o "$W/t.rsd" rsync --daemon --no-detach --config="$W/rsyncd.conf" --address=127.0.0.1 --port="$RSPORT" &
  local d=$!; PIDS+=("$d")
  until rsync "rsync://127.0.0.1:$RSPORT/" >/dev/null 2>&1; do sleep 0.05; done
  drop_caches
  timed "$W/t.rs" rsync "${@:4}" --stats --no-h "$W/vol.img" "rsync://127.0.0.1:$RSPORT/rs/$profile-$tool/vol.img" >"$W/rs.out"
  pkill -TERM -P "$d"; wait "$d" 2>/dev/null || true
  cmp -s "$W/vol.img" "$W/rs/$profile-$tool/vol.img" || { echo "rsync copy differs" >&2; exit 1; }
  local sent recv
  sent=$(awk -F': ' '/^Total bytes sent/ {gsub(",", "", $2); print $2}' "$W/rs.out")
  recv=$(awk -F': ' '/^Total bytes received/ {gsub(",", "", $2); print $2}' "$W/rs.out")
  read -r _ du ds drss < <(tail -1 "$W/t.rsd")
  record "$profile" "$tool" "$case" "$W/t.rs" "$(echo "$du $ds" | awk '{print $1+$2}')" "$drss" "$((sent + recv))"
}
rs_case() { # PROFILE TOOL FLAGS... CASE (the case last, as series passes it)
  local n=$# case=${!#}
  rs_sync "$1" "$2" "$case" "${@:3:$((n - 3))}"
}

# ---- restic -----------------------------------------------------------------------------------
export RESTIC_PASSWORD=understudy-bench RESTIC_REPOSITORY=$W/restic RESTIC_CACHE_DIR=$W/restic-cache
repo_bytes() { du -sb "$W/restic" | cut -f1; }
restic_backup() { # CASE (a new repository at the initial case)
  if [ "$1" = initial ]; then rm -rf "$W/restic"; restic init >/dev/null; fi
  local before; before=$(repo_bytes)
  drop_caches
  timed "$W/t.rb" restic backup --quiet "$W/vol.img" >/dev/null
  record loopback restic "$1" "$W/t.rb" 0 0 "$(($(repo_bytes) - before))"
}
restic_restore() {
  rm -rf "$W/rr"
  drop_caches
  timed "$W/t.rr" restic restore latest --target "$W/rr" >/dev/null
  cmp -s "$W/rr$W/vol.img" "$W/vol.img" || { echo "restic restore differs" >&2; exit 1; }
  read -r wall user sys rss <"$W/t.rr"
  rec "{\"profile\":\"loopback\",\"tool\":\"restic\",\"case\":\"rebuild\",\"wall\":$wall,\"cpu_src\":0,\"rss_src_kib\":0,\"cpu_tgt\":$(echo "$user $sys" | awk '{print $1+$2}'),\"rss_tgt_kib\":$rss,\"wire\":0}"
  rm -rf "$W/rr"
}

# ---- the run ----------------------------------------------------------------------------------
# Tool by tool, each on the volume made again from the seed and changed by the same mutations,
# so that only one replica at a time takes disk space (about 3x SIZE besides the volume).
free_kib=$(df -k --output=avail "$W" | tail -1)
if [ "$free_kib" -lt $((SIZE * 3 * 1024 * 1024)) ]; then
  echo "not enough free space in $W: need about $((SIZE * 3)) GiB, have $((free_kib / 1024 / 1024)) GiB (set BENCH_DIR)" >&2
  exit 1
fi
rec "{\"machine\":{\"cpus\":$(nproc),\"model\":\"$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)\",\"mem_gib\":$(awk '/MemTotal/ {printf "%d", $2/1048576}' /proc/meminfo),\"kernel\":\"$(uname -r)\"}}"
# series TITLE SYNC_FUNCTION [args]: initial, then incremental after 1% and after 10% changed.
series() {
  make_volume
  for step in "initial - -" "incr1 1 2" "incr10 10 3"; do
    read -r case pct seed <<<"$step"
    echo "== $1: $case" >&2
    [ "$pct" = - ] || mutate "$case" "$pct" "$seed"
    FRESH=no
    "${@:2}" "$case"
  done
}
# The 1 TiB sparse image: 64 MiB of data in 64 runs of 1 MiB, 16 GiB apart; then 1 MiB changes.
tib_series() {
  rm -f "$W/vol.img"; FRESH=no
  truncate -s 1T "$W/vol.img"
  for i in $(seq 0 63); do
    head -c 1M /dev/urandom | dd of="$W/vol.img" bs=1M seek=$((i * 16384)) conv=notrunc status=none
  done
  us_pair
  echo "== 1 TiB sparse: initial" >&2
  us_sync sparse-1tib initial
  head -c 1M /dev/urandom | dd of="$W/vol.img" bs=1M seek=$((7 * 16384)) conv=notrunc status=none
  echo "== 1 TiB sparse: 1 MiB changed" >&2
  us_sync sparse-1tib incr1mib
  rm -rf "$W/t" "$W/s" "$W/vol.img"
}
us_loop() { us_sync loopback "$1"; }
us_link() { us_sync 1gbit "$1" --bandwidth-limit-mbit 1000; }
echo "== volume and limits" >&2
make_volume
limits
us_pair
series "Understudy, loopback" us_loop
echo "== Understudy: rebuild" >&2
us_rebuild
rm -rf "$W/t" "$W/s"
if [ "${BENCH_ONLY:-}" = understudy ]; then
  BENCH_NO_LINK=1
else
series "restic" restic_backup
echo "== restic: restore" >&2
restic_restore
rm -rf "$W/restic"
for tool in "rsync-inplace --inplace --no-whole-file" "rsync-inplace-z --inplace --no-whole-file -z" "rsync-volsync -aAhHSxz"; do
  read -r name flags <<<"$tool"
  # shellcheck disable=SC2086
  series "$name, loopback" rs_case loopback "$name" $flags
  rm -rf "$W/rs/loopback-$name"
done
fi
if [ -z "${BENCH_NO_LINK:-}" ]; then
  us_pair
  series "Understudy, 1 Gbit/s" us_link
  rm -rf "$W/t" "$W/s"
  for tool in "rsync-inplace --inplace --no-whole-file" "rsync-inplace-z --inplace --no-whole-file -z"; do
    read -r name flags <<<"$tool"
    # shellcheck disable=SC2086
    series "$name, 1 Gbit/s" rs_case 1gbit "$name" $flags --bwlimit=122070
    rm -rf "$W/rs/1gbit-$name"
  done
fi
[ -n "${BENCH_NO_TIB:-}" ] || tib_series
rec "{\"page_cache_dropped\":\"$DROPPED\"}"

if [ -n "${BENCH_OUT:-}" ]; then
  mkdir -p "$BENCH_OUT"
  cp "$R" "$BENCH_OUT/results.jsonl"
  "$B/bench-report" "$R" --chart "$BENCH_OUT/benchmark.png" | tee "$BENCH_OUT/report.md"
else
  "$B/bench-report" "$R" --chart "$W/benchmark.png"
fi

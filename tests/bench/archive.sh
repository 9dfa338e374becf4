#!/usr/bin/env bash
# Archive tier cost: `tests/bench/archive.sh [SIZE_GIB] [MODES]` (default 4, "plain sealed").
#
# Each mode runs on its own: plain archives as the store has it; sealed with an archive key
# (--archive-key-file: every frame sealed with AES-256-GCM before upload, opened on restore).
#
# A volume of SIZE_GIB (bench-volume's mix: 40% random, 40% text, 20% zero) is replicated once
# into a target agent that archives into versitygw on 127.0.0.1 (posix backend, a directory of
# its own, rounds every 5 s). Prints: the initial sync's time; the archive's lag behind it
# (bytes not yet in the bucket, sampled each second: the largest, and the time from the commit
# until the bucket held the point); the archive's upload throughput (bytes uploaded over the time
# from the sync's start to the point archived); and the time to rebuild the whole store from
# the bucket into an empty directory (`archive restore`, page cache dropped first), which must
# then pass `verify`.
#
# Uses the agents of target/debug (the dev profile is optimized); BENCH_BIN=dir for others.
set -euo pipefail
SIZE=${1:-4}
MODES=${2:-plain sealed}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/bench/debug-agents.sh"
VGW=$("$ROOT/tests/s3-server/build.sh")
W=$(mktemp -d "${BENCH_DIR:-/tmp}/understudy-archive.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
metric() { curl -s "http://$METRICS/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

export AWS_ACCESS_KEY_ID=understudy-bench AWS_SECRET_ACCESS_KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
S3PORT=$(free_port)
mkdir -p "$W/s3/data" "$W/s3/meta"
"$VGW" --port "127.0.0.1:$S3PORT" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" \
  posix --sidecar "$W/s3/meta" "$W/s3/data" >"$W/s3.log" 2>&1 &
PIDS+=($!)
until curl -s -o /dev/null "http://127.0.0.1:$S3PORT/"; do sleep 0.1; done
curl -sf -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
  "http://127.0.0.1:$S3PORT/bench" >/dev/null
ARCHIVE=(--archive-bucket bench --archive-endpoint "http://127.0.0.1:$S3PORT" --archive-path-style)
"$B/bench-volume" create "$W/vol.img" --size-gib "$SIZE" >/dev/null
head -c 32 /dev/urandom | base64 >"$W/archive.key"

run_mode() {
mode=$1
M=$W/$mode
mkdir -p "$M"
KEY=()
[ "$mode" = sealed ] && KEY=(--archive-key-file "$W/archive.key")
ARCHIVE_M=("${ARCHIVE[@]}" --archive-prefix "$mode")

"$B/target-agent" init --dir "$M/t" >"$M/tfp" 2>/dev/null
"$B/source-agent" init --dir "$M/s" >"$M/sfp" 2>/dev/null
"$B/target-agent" pair --dir "$M/t" --peer "$(cat "$M/sfp")" 2>/dev/null
"$B/source-agent" pair --dir "$M/s" --peer "$(cat "$M/tfp")" 2>/dev/null
METRICS=127.0.0.1:$(free_port)
"$B/target-agent" serve --dir "$M/t" --listen 127.0.0.1:0 --ready-file "$M/ready" \
  --metrics-addr "$METRICS" "${ARCHIVE_M[@]}" "${KEY[@]}" --archive-every 5s 2>>"$M/t.log" &
TPID=$!
PIDS+=($TPID)
while [ ! -s "$M/ready" ]; do sleep 0.05; done
ADDR=$(cat "$M/ready")

sync
start=$(now)
"$B/source-agent" run --dir "$M/s" --group app --target "$ADDR" --volume "vol=$W/vol.img" --once --json >/dev/null 2>>"$M/s.log" &
SRC=$!
max_behind=0
while kill -0 "$SRC" 2>/dev/null; do
  b=$(metric understudy_archive_bytes_behind); b=${b:-0}
  [ "$b" -gt "$max_behind" ] && max_behind=$b
  sleep 1
done
wait "$SRC"
committed=$(now)
until [ "$(metric understudy_archive_points_behind)" = 0 ] && \
      "$B/target-agent" archive list "${ARCHIVE_M[@]}" 2>/dev/null | grep -q "app/1"; do
  b=$(metric understudy_archive_bytes_behind); b=${b:-0}
  [ "$b" -gt "$max_behind" ] && max_behind=$b
  sleep 0.5
done
archived=$(now)
uploaded=$(metric understudy_archive_uploaded_bytes_total)
stored=$(du -sb "$M/t/store/packs" | cut -f1)

sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
r0=$(now)
"$B/target-agent" archive restore --dir "$M/r" "${ARCHIVE_M[@]}" "${KEY[@]}" >/dev/null 2>>"$M/r.log"
r1=$(now)
"$B/target-agent" verify --dir "$M/r" >/dev/null

kill -9 "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true
awk -v mode="$mode" -v s="$start" -v c="$committed" -v a="$archived" -v u="$uploaded" -v st="$stored" \
    -v mb="$max_behind" -v r0="$r0" -v r1="$r1" -v g="$SIZE" 'BEGIN {
  printf "%s archive: volume %d GiB, store %.0f MiB of packs\n", mode, g, st / 1048576
  printf "initial sync        %7.1f s\n", c - s
  printf "archive lag         %7.1f s after the commit, at most %.0f MiB not yet in the bucket\n", a - c, mb / 1048576
  printf "archive throughput  %7.1f MB/s (%.0f MiB uploaded from the sync start to the point archived)\n", u / (a - s) / 1e6, u / 1048576
  printf "restore from bucket %7.1f s (%.1f MB/s), verify passed\n", r1 - r0, st / (r1 - r0) / 1e6
}'
}

for m in $MODES; do run_mode "$m"; done

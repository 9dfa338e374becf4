#!/usr/bin/env bash
# Runs every cargo-fuzz target of common/fuzz for a while each (docs/reliability.md, Fuzzing).
#   tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# Default: 20 s per target (the CI smoke). The long runs in the docs use 600. Needs a nightly
# toolchain and cargo-fuzz; installs both when missing. Findings (crashing inputs) are left in
# common/fuzz/artifacts/<target>/ and make the script fail.
set -euo pipefail
cd "$(dirname "$0")/../../common"
secs=${1:-20}
shift || true
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
# The fuzz workspace builds against the product's dependency versions: start from the main lock
# file (cargo then adds libfuzzer-sys and drops what the fuzz targets do not use).
cp ../Cargo.lock fuzz/Cargo.lock
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  log=$(mktemp)
  if ! cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=262144 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t FAILED (input saved under common/fuzz/artifacts/$t/)" >&2
    rm -f "$log"
    exit 1
  fi
  runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' || echo "?")
  echo "fuzz: $t ok, $runs executions in ${secs} s, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs"
  rm -f "$log"
done

# Sourced by tests/bench/failback.sh and archive.sh, with ROOT set: B is the directory of the
# agents and bench-volume, target/debug built now (the dev profile is optimized), or $BENCH_BIN.
if [ -n "${BENCH_BIN:-}" ]; then
  B=$BENCH_BIN
else
  (cd "$ROOT" && cargo build --quiet -p source-agent -p target-agent && cargo build --quiet -p understudy-e2e --bin bench-volume)
  B=$ROOT/target/debug
fi

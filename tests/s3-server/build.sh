#!/usr/bin/env bash
# Builds the test S3 server, versitygw (posix backend), from its published Go module with this
# machine's Go toolchain, and caches it outside the repository. Only the first run builds; later
# runs print the path. The archive tests (understudy_e2e::s3) start one per test on 127.0.0.1.
#
#   tests/s3-server/build.sh      # build if missing, print the binary's path
#
# The binary is ${UNDERSTUDY_S3_CACHE:-~/.cache/understudy/s3}/versitygw-<version>/versitygw.
set -euo pipefail

VERSITYGW_VERSION=v1.8.0   # github.com/versity/versitygw: multipart, conditional writes, SigV4
ROOT=${UNDERSTUDY_S3_CACHE:-$HOME/.cache/understudy/s3}
OUT=$ROOT/versitygw-$VERSITYGW_VERSION

if [[ -x $OUT/versitygw ]]; then
  echo "$OUT/versitygw"
  exit 0
fi
if ! command -v go >/dev/null; then
  echo "test S3 server: 'go' is not on PATH; install Go to build versitygw" >&2
  exit 1
fi
mkdir -p "$OUT"
echo "test S3 server: building versitygw $VERSITYGW_VERSION" >&2
GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$OUT" \
  go install -trimpath -ldflags=-s "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
"$OUT/versitygw" --version >/dev/null 2>&1 || true
echo "$OUT/versitygw"

#!/usr/bin/env bash
# Builds the Kubernetes test bed (etcd, kube-apiserver, kube-controller-manager) from
# their published Go modules with this machine's Go toolchain, and caches the binaries
# outside the repository. Only the first run builds; later runs print the cache path.
#
#   tests/kube-testbed/build.sh          # build if missing, print the directory
#
# The directory is ${UNDERSTUDY_TESTBED_CACHE:-~/.cache/understudy/testbed}/<versions>/
# and holds: etcd, kube-apiserver, kube-controller-manager, crd/ (snapshot CRDs).
# The Rust helper (understudy-e2e::kube) finds it the same way.
set -euo pipefail

K8S_VERSION=v1.36.3          # k8s.io/kubernetes; kube 5 / k8s-openapi 0.29 (feature v1_36)
STAGING_VERSION=v0.36.3      # the k8s.io/* staging modules published with it
ETCD_VERSION=v3.6.16         # go.etcd.io/etcd/server/v3
SNAPSHOTTER_VERSION=v8.6.0   # github.com/kubernetes-csi/external-snapshotter/client/v8 (config/crd)

# Staging modules that k8s.io/kubernetes replaces with ./staging/src/...: outside that
# repository they must be pinned to the published versions instead.
STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client cri-streaming csi-translation-lib
  dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
  kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
  pod-security-admission streaming)

ROOT=${UNDERSTUDY_TESTBED_CACHE:-$HOME/.cache/understudy/testbed}
OUT=$ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION

complete() {
  [[ -x $OUT/etcd && -x $OUT/kube-apiserver && -x $OUT/kube-controller-manager \
     && -f $OUT/crd/.complete ]]
}

if complete; then
  echo "$OUT"
  exit 0
fi

if ! command -v go >/dev/null; then
  echo "kube test bed: 'go' is not on PATH; install Go (1.26 or newer) to build etcd and kube-apiserver" >&2
  exit 1
fi

mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

log() { echo "kube test bed: $*" >&2; }

build_etcd() {
  [[ -x $OUT/etcd ]] && return
  log "building etcd $ETCD_VERSION"
  mkdir -p "$WORK/etcd"
  cat >"$WORK/etcd/main.go" <<'GO'
// Command etcd is the etcd server, built from the published server module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$WORK/etcd" && go mod init understudy.local/testbed/etcd >/dev/null 2>&1 \
    && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2 \
    && go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" . >&2)
  mv "$OUT/etcd.tmp" "$OUT/etcd"
}

build_kube() {
  [[ -x $OUT/kube-apiserver && -x $OUT/kube-controller-manager ]] && return
  log "building kube-apiserver and kube-controller-manager $K8S_VERSION (first run only; several minutes)"
  mkdir -p "$WORK/kube"
  {
    echo "module understudy.local/testbed/kube"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    for m in "${STAGING[@]}"; do echo "	k8s.io/$m => k8s.io/$m $STAGING_VERSION"; done
    echo ")"
  } >"$WORK/kube/go.mod"
  cat >"$WORK/kube/tools.go" <<'GO'
//go:build tools

// Package tools pins the commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean"
  (cd "$WORK/kube" && go mod tidy -e >&2 \
    && go build -trimpath -ldflags "$ldflags" -o "$OUT/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2 \
    && go build -trimpath -ldflags "$ldflags" -o "$OUT/kube-controller-manager.tmp" k8s.io/kubernetes/cmd/kube-controller-manager >&2)
  mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
  mv "$OUT/kube-controller-manager.tmp" "$OUT/kube-controller-manager"
}

fetch_crds() {
  [[ -f $OUT/crd/.complete ]] && return
  log "fetching the snapshot CRDs (external-snapshotter client $SNAPSHOTTER_VERSION)"
  local dir
  dir=$(cd "$WORK" && go mod download -json "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [[ -d $dir/config/crd ]] || { log "no config/crd in $dir"; exit 1; }
  mkdir -p "$OUT/crd"
  cp "$dir"/config/crd/*.yaml "$OUT/crd/"
  chmod u+w "$OUT"/crd/*.yaml
  rm -f "$OUT/crd/kustomization.yaml"
  touch "$OUT/crd/.complete"
}

build_etcd
build_kube
fetch_crds
complete || { log "incomplete build in $OUT"; exit 1; }
echo "$OUT"

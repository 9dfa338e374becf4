#!/usr/bin/env bash
# Builds the Kubernetes test bed (etcd, kube-apiserver, kube-controller-manager) from
# their published Go modules with this machine's Go toolchain, and caches the binaries
# outside the repository. Only the first run builds; later runs print the cache path.
#
#   tests/kube-testbed/build.sh          # build if missing, print the directory
#   tests/kube-testbed/build.sh --node   # also the node and storage parts (below)
#
# The directory is ${UNDERSTUDY_TESTBED_CACHE:-~/.cache/understudy/testbed}/<versions>/
# and holds: etcd, kube-apiserver, kube-controller-manager, crd/ (snapshot CRDs).
# With --node also: kubelet, kube-scheduler, the CSI sidecars (csi-provisioner,
# csi-snapshotter, snapshot-controller, csi-snapshot-metadata), csi-sanity, node-crd/ (group-snapshot and
# SnapshotMetadataService CRDs of the sidecars' versions), and containerd, runc, the CNI
# plugins and busybox installed from Debian packages when missing.
# The Rust helper (understudy-e2e::kube) finds it the same way.
set -euo pipefail

K8S_VERSION=v1.36.3          # k8s.io/kubernetes; kube 5 / k8s-openapi 0.29 (feature v1_36)
STAGING_VERSION=v0.36.3      # the k8s.io/* staging modules published with it
ETCD_VERSION=v3.6.16         # go.etcd.io/etcd/server/v3
SNAPSHOTTER_VERSION=v8.6.0   # github.com/kubernetes-csi/external-snapshotter/client/v8 (config/crd)
# The node and storage parts (--node); versions measured in ../shared/testbed-notes.md.
PROVISIONER_VERSION=v6.4.0   # github.com/kubernetes-csi/external-provisioner/v6
SIDECAR_SNAPSHOTTER=v8.7.0   # github.com/kubernetes-csi/external-snapshotter/v8 (+ client/v8)
SNAPSHOT_METADATA=v1.0.0     # github.com/kubernetes-csi/external-snapshot-metadata (+ client)
CSI_TEST=v5.4.0              # github.com/kubernetes-csi/csi-test/v5 (csi-sanity, checks the test CSI driver)
NODE=0
[[ ${1:-} == --node ]] && NODE=1

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

NODE_BINS=(kubelet kube-scheduler csi-provisioner csi-snapshotter snapshot-controller csi-snapshot-metadata csi-sanity)
complete_node() {
  local b
  for b in "${NODE_BINS[@]}"; do [[ -x $OUT/$b ]] || return 1; done
  [[ -f $OUT/node-crd/.complete ]] && node_packages_present
}
node_packages_present() {
  command -v containerd >/dev/null && command -v runc >/dev/null && [[ -x /usr/lib/cni/bridge ]] \
    && command -v busybox >/dev/null
}

if complete && { [[ $NODE == 0 ]] || complete_node; }; then
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
  kube_module
  local ldflags b
  ldflags=$(kube_ldflags)
  for b in kube-apiserver kube-controller-manager; do
    (cd "$WORK/kube" && go build -trimpath -ldflags "$ldflags" -o "$OUT/$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2)
    mv "$OUT/$b.tmp" "$OUT/$b"
  done
}

# The module of k8s.io/kubernetes commands, shared by the API server and the node builds (one
# Go build cache: the node binaries reuse most of what the API server compiled).
kube_module() {
  [[ -f $WORK/kube/go.mod ]] && return
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
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  (cd "$WORK/kube" && go mod tidy -e >&2)
}

kube_ldflags() {
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  echo "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean"
}

build_node_kube() {
  [[ -x $OUT/kubelet && -x $OUT/kube-scheduler ]] && return
  log "building kubelet and kube-scheduler $K8S_VERSION (first run only)"
  kube_module
  local ldflags b
  ldflags=$(kube_ldflags)
  for b in kubelet kube-scheduler; do
    (cd "$WORK/kube" && go build -trimpath -ldflags "$ldflags" -o "$OUT/$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2)
    mv "$OUT/$b.tmp" "$OUT/$b"
  done
}

# Builds commands of a published module from a wrapper module. Replace lines of the upstream
# module (./client) mean nothing outside its repository, so the wrapper pins those modules.
#   build_wrapped NAME MODULE@VERSION "REPLACE LINES" CMD_PATH...
build_wrapped() {
  local name=$1 modver=$2 replaces=$3
  shift 3
  local missing=0 c
  for c in "$@"; do [[ -x $OUT/$(basename "$c") ]] || missing=1; done
  [[ $missing == 0 ]] && return
  log "building $name ($modver)"
  local dir=$WORK/$name
  mkdir -p "$dir"
  {
    echo "module understudy.local/testbed/$name"
    echo
    echo "go 1.26.0"
    echo
    echo "require ${modver%@*} ${modver#*@}"
    [[ -n $replaces ]] && printf '\nreplace (\n%s\n)\n' "$replaces"
  } >"$dir/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "// Package tools pins the commands this module builds."
    echo "package tools"
    echo
    echo "import ("
    for c in "$@"; do echo "	_ \"$c\""; done
    echo ")"
  } >"$dir/tools.go"
  (cd "$dir" && go mod tidy -e >&2)
  for c in "$@"; do
    local b
    b=$(basename "$c")
    # Each of these commands keeps its version in main.version ("unknown" unless set).
    (cd "$dir" && go build -trimpath -ldflags "-s -w -X main.version=${modver#*@}" -o "$OUT/$b.tmp" "$c" >&2)
    mv "$OUT/$b.tmp" "$OUT/$b"
  done
}

build_sidecars() {
  build_wrapped provisioner "github.com/kubernetes-csi/external-provisioner/v6@$PROVISIONER_VERSION" "" \
    github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
  build_wrapped snapshotter "github.com/kubernetes-csi/external-snapshotter/v8@$SIDECAR_SNAPSHOTTER" \
    "	github.com/kubernetes-csi/external-snapshotter/client/v8 => github.com/kubernetes-csi/external-snapshotter/client/v8 $SIDECAR_SNAPSHOTTER" \
    github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
    github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
  build_wrapped snapshot-metadata "github.com/kubernetes-csi/external-snapshot-metadata@$SNAPSHOT_METADATA" \
    "	github.com/kubernetes-csi/external-snapshot-metadata/client => github.com/kubernetes-csi/external-snapshot-metadata/client $SNAPSHOT_METADATA" \
    github.com/kubernetes-csi/external-snapshot-metadata/cmd/csi-snapshot-metadata
  build_wrapped csi-test "github.com/kubernetes-csi/csi-test/v5@$CSI_TEST" "" \
    github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
}

module_dir() {
  (cd "$WORK" && go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
}

# The CRDs of the sidecars' own versions: snapshots and group snapshots, and the
# SnapshotMetadataService (cbt.storage.k8s.io).
fetch_node_crds() {
  [[ -f $OUT/node-crd/.complete ]] && return
  log "fetching the group-snapshot and SnapshotMetadataService CRDs"
  local snap cbt
  snap=$(module_dir "github.com/kubernetes-csi/external-snapshotter/client/v8@$SIDECAR_SNAPSHOTTER")
  cbt=$(module_dir "github.com/kubernetes-csi/external-snapshot-metadata/client@$SNAPSHOT_METADATA")
  [[ -d $snap/config/crd && -f $cbt/config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml ]] \
    || { log "CRDs not found in $snap or $cbt"; exit 1; }
  mkdir -p "$OUT/node-crd"
  cp "$snap"/config/crd/*.yaml "$cbt/config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml" "$OUT/node-crd/"
  chmod u+w "$OUT"/node-crd/*.yaml
  rm -f "$OUT/node-crd/kustomization.yaml"
  touch "$OUT/node-crd/.complete"
}

install_node_packages() {
  node_packages_present && return
  log "installing containerd, runc, the CNI plugins and busybox from Debian packages"
  if [[ $(id -u) != 0 ]]; then
    log "installing packages needs root: run as root, or install containerd runc containernetworking-plugins busybox-static"
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    containerd runc containernetworking-plugins busybox-static >&2
}

fetch_crds() {
  [[ -f $OUT/crd/.complete ]] && return
  log "fetching the snapshot CRDs (external-snapshotter client $SNAPSHOTTER_VERSION)"
  local dir
  dir=$(module_dir "github.com/kubernetes-csi/external-snapshotter/client/v8@$SNAPSHOTTER_VERSION")
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
if [[ $NODE == 1 ]]; then
  install_node_packages
  build_node_kube
  build_sidecars
  fetch_node_crds
  complete_node || { log "incomplete node build in $OUT"; exit 1; }
fi
echo "$OUT"

#!/usr/bin/env bash
# Runs every test of kips: formatting, lints, unit and integration tests, the network-namespace
# suite of `kips init-net`, the end-to-end suites on a real control plane (kube-apiserver,
# kube-controller-manager and etcd, built from pinned Go modules and cached under .cache/), and
# the node suite on a real node (kubelet, kube-proxy, kube-scheduler, containerd; images built
# by scripts/images.sh).
#
# Installs what the tests need on a fresh Debian machine (iptables, iproute2, runc, the CNI
# plugins, conntrack, busybox-static, binutils, Node and npm from Debian; the control plane,
# the node and helm from the Go module proxy; Microsoft's hyco-ws from npm for the relay
# bridge's interop suite). CI runs exactly this, with CI=true, under which no suite may skip
# itself.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }
started=$SECONDS

step "system packages"
missing=()
need() { # package path...
  local package=$1 path
  shift
  for path in "$@"; do [[ -e $path ]] || { missing+=("$package"); return; }; done
}
need iproute2 /usr/sbin/ip /usr/bin/ip
need iptables /usr/sbin/iptables-legacy /usr/sbin/iptables-nft
# The test node (tests/support/node.rs): runc needs cgo, so it is Debian's, as are the CNI
# plugins; busybox-static goes into the test client image, strip into every image.
need runc /usr/sbin/runc
need containernetworking-plugins /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap
need conntrack /usr/sbin/conntrack
need busybox-static /bin/busybox
need binutils /usr/bin/strip
need util-linux /usr/bin/unshare /usr/bin/nsenter
if [[ -e /bin/busybox ]] && ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
# The relay bridge's interop suite runs Microsoft's hyco-ws (tests/interop).
need nodejs /usr/bin/node
need npm /usr/bin/npm
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "the tests need ${missing[*]} (Debian packages) and root to install them" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step "control plane (kube-apiserver, kube-controller-manager, etcd, helm) and node (kubelet, kube-proxy, kube-scheduler, kubectl, containerd) binaries"
# In parallel: containerd, etcd and helm compile beside Kubernetes; the two Kubernetes builds
# take turns (a lock in the scripts), so the second reuses the first's packages.
built=$(mktemp -d)
trap 'rm -rf "$built"' EXIT
tests/controlplane/build.sh >"$built/controlplane" &
cp_pid=$!
tests/node/build.sh >"$built/node" &
node_pid=$!
ok=1
wait "$cp_pid" || ok=0
wait "$node_pid" || ok=0
[[ $ok == 1 ]] || { echo "building the test binaries failed (output above)" >&2; exit 1; }
KIPS_E2E_BIN_DIR=$(tail -n 1 "$built/controlplane")
KIPS_NODE_BIN_DIR=$(tail -n 1 "$built/node")
export KIPS_E2E_BIN_DIR KIPS_NODE_BIN_DIR

step "npm packages of the bridge interop suite (hyco-ws, from tests/interop/package-lock.json)"
# npm's cache lives under the ignored .cache/; node_modules under tests/interop/ is ignored too.
(cd tests/interop && npm_config_cache="$PWD/../../.cache/npm" npm ci --no-audit --no-fund --prefer-offline)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test (unit, integration, netns, end-to-end, node)"
cargo test --all-targets --locked

step "all tests passed in $((SECONDS - started))s"

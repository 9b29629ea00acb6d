#!/usr/bin/env bash
# Runs every test of kips: formatting, lints, unit and integration tests, the network-namespace
# suite of `kips init-net`, and the end-to-end suites on a real control plane (kube-apiserver,
# kube-controller-manager and etcd, built from pinned Go modules and cached under .cache/).
#
# Installs what the tests need on a fresh Debian machine (iptables and iproute2 from Debian,
# the control plane and helm from the Go module proxy, Node and Microsoft's hyco-ws from npm
# for the relay bridge's interop suite). CI runs exactly this, with CI=true, under which no
# suite may skip itself.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }
started=$SECONDS

step "system packages"
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
{ command -v iptables-legacy >/dev/null 2>&1 && command -v iptables-nft >/dev/null 2>&1; } || missing+=(iptables)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "the tests need ${missing[*]} (Debian packages) and root to install them" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step "control plane binaries (kube-apiserver, kube-controller-manager, etcd, helm)"
KIPS_E2E_BIN_DIR=$(tests/controlplane/build.sh | tail -n 1)
export KIPS_E2E_BIN_DIR

step "npm packages of the bridge interop suite (hyco-ws, from tests/interop/package-lock.json)"
# npm's cache lives under the ignored .cache/; node_modules under tests/interop/ is ignored too.
(cd tests/interop && npm_config_cache="$PWD/../../.cache/npm" npm ci --no-audit --no-fund --prefer-offline)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test (unit, integration, netns, end-to-end)"
cargo test --all-targets --locked

step "all tests passed in $((SECONDS - started))s"

#!/usr/bin/env bash
# Builds the pinned binaries of the test node (tests/support/node.rs):
#   kubelet, kube-proxy, kube-scheduler, kubectl  from k8s.io/kubernetes, pinned by the SAME
#       module as the control plane (../controlplane/kubernetes: tool directives), stamped
#       with its version like the control plane (../controlplane/kube-version.sh);
#   containerd, ctr, containerd-shim-runc-v2       from github.com/containerd/containerd/v2,
#       pinned by containerd/go.mod beside this script (CGO off, -tags no_btrfs).
# runc, the CNI plugins, conntrack and iptables come from Debian (scripts/test.sh installs
# them): runc needs cgo.
#
# Output: <repo>/.cache/node/<key>/bin, where <key> hashes this script, the modules' files and
# `go version`. A build happens only when the key changes; the last line on stdout is always
# the bin dir. Timings and diagnostics go to stderr. `build.sh --key` prints the key only.
# Go's caches are the control plane's (<repo>/.cache/go; KIPS_CACHE_DIR overrides the folder).
#
# Safe to run beside tests/controlplane/build.sh (scripts/test.sh does): containerd starts at
# once, while the Kubernetes build waits for the control plane's (a shared lock), then reuses
# every package the two have in common instead of compiling it a second time.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cp_dir=$root/tests/controlplane
cache=${KIPS_CACHE_DIR:-$root/.cache}

say() { echo "node: $*" >&2; }

command -v go >/dev/null || { say "go is not installed (needs Go >= 1.26)"; exit 1; }

# As tests/controlplane/build.sh: never download a toolchain, never touch the user's
# workspace or module cache, never edit go.mod/go.sum.
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0
export GOFLAGS="-mod=readonly -modcacherw -buildvcs=false"
export GOMODCACHE=$cache/go/mod GOCACHE=$cache/go/build
unset GOOS GOARCH GOEXPERIMENT

key=$(
  { go version; cd "$root"; sha256sum tests/node/build.sh tests/node/containerd/go.mod \
      tests/node/containerd/go.sum tests/controlplane/kube-version.sh \
      tests/controlplane/kubernetes/go.mod tests/controlplane/kubernetes/go.sum; } |
    sha256sum | cut -c1-16
)
out=$cache/node/$key
if [[ ${1:-} == --key ]]; then echo "$key"; exit 0; fi

binaries=(kubelet kube-proxy kube-scheduler kubectl containerd ctr containerd-shim-runc-v2)
if [[ -f $out/bin/.complete ]]; then
  say "binaries up to date ($key)"
  echo "$out/bin"
  exit 0
fi

mkdir -p "$cache/node" "$cache/go"
exec 9>"$cache/node/.lock"
flock 9 # one builder at a time (test binaries may run in parallel)
if [[ -f $out/bin/.complete ]]; then
  say "binaries built by another process ($key)"
  echo "$out/bin"
  exit 0
fi
rm -rf "$cache/node"/.tmp.* # leftovers of builders that were killed (we hold the lock)

tmp=$(mktemp -d "$cache/node/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin" "$tmp/logs"

modver() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$1"; }
k8s=$(modver "$cp_dir/kubernetes/go.mod" k8s.io/kubernetes)
containerd=$(modver "$here/containerd/go.mod" github.com/containerd/containerd/v2)
# shellcheck source=../controlplane/kube-version.sh
source "$cp_dir/kube-version.sh"
kver=$(kube_version_ldflags "$cp_dir/kubernetes/go.mod")
cver=""
for v in "Version=$containerd" "Revision=$containerd" "Package=github.com/containerd/containerd/v2"; do
  cver+=" -X github.com/containerd/containerd/v2/version.$v"
done

build() { # name module-dir ldflags go-build-args...
  local name=$1 dir=$2 ldflags=$3 t0=$SECONDS
  shift 3
  if go -C "$dir" build -trimpath -ldflags="-s -w $ldflags" -o "$tmp/bin/" "$@" \
    >"$tmp/logs/$name.log" 2>&1; then
    say "built $name in $((SECONDS - t0))s"
  else
    say "building $name FAILED; log:"
    tail -n 60 "$tmp/logs/$name.log" >&2
    return 1
  fi
}

say "building kubelet, kube-proxy, kube-scheduler, kubectl ($k8s) and containerd ($containerd) into $out"
say "(cold builds take several minutes; caches in $cache/go)"
t0=$SECONDS
pids=()
build containerd "$here/containerd" "$cver" -tags no_btrfs \
  github.com/containerd/containerd/v2/cmd/containerd \
  github.com/containerd/containerd/v2/cmd/ctr \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 &
pids+=($!)
(
  exec 8>"$cache/go/kubernetes.lock" # shared with tests/controlplane/build.sh
  flock 8
  build kubernetes "$cp_dir/kubernetes" "$kver" k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
) &
pids+=($!)
ok=1
for pid in "${pids[@]}"; do wait "$pid" || ok=0; done
[[ $ok == 1 ]] || { say "build failed after $((SECONDS - t0))s"; exit 1; }

for b in "${binaries[@]}"; do
  [[ -x $tmp/bin/$b ]] || { say "missing $b after build"; exit 1; }
done
touch "$tmp/bin/.complete"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
for d in "$cache/node"/*/; do # keep only the current key (~350 MB each)
  [[ ${d%/} == "$out" ]] || rm -rf "${d%/}"
done
say "build took $((SECONDS - t0))s"
echo "$out/bin"

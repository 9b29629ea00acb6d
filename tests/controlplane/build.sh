#!/usr/bin/env bash
# Builds the pinned control-plane binaries used by the end-to-end suite:
#   etcd, kube-apiserver, kube-controller-manager (Kubernetes + etcd) and helm.
#
# Versions are pinned by the go.mod/go.sum files of the modules beside this script:
#   kubernetes/  k8s.io/kubernetes (tool directives for the control-plane commands, and for
#                the node's, which tests/node/build.sh builds)
#   etcd/        go.etcd.io/etcd/server/v3 (a two-line main around etcdmain)
#   helm/        helm.sh/helm/v3 (tool directive for cmd/helm)
#
# Output: <repo>/.cache/controlplane/<key>/bin, where <key> hashes this script, the
# modules' files and `go version`. A build happens only when the key changes; the last
# line on stdout is always the bin dir. Timings and diagnostics go to stderr.
# `build.sh --key` prints the key only.
#
# Everything Go writes lives under <repo>/.cache/go (module and build caches), so CI can
# cache the single folder .cache. Override the folder with KIPS_CACHE_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cache=${KIPS_CACHE_DIR:-$root/.cache}

say() { echo "controlplane: $*" >&2; }

command -v go >/dev/null || { say "go is not installed (needs Go >= 1.26)"; exit 1; }

# Never download a toolchain (the go lines say 1.26.0: an older local Go fails clearly),
# never touch the user's workspace or module cache, never edit go.mod/go.sum.
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0
export GOFLAGS="-mod=readonly -modcacherw -buildvcs=false"
export GOMODCACHE=$cache/go/mod GOCACHE=$cache/go/build
unset GOOS GOARCH GOEXPERIMENT

key=$(
  cd "$here"
  { go version; sha256sum build.sh kube-version.sh kubernetes/go.mod kubernetes/go.sum \
      etcd/go.mod etcd/go.sum etcd/*.go helm/go.mod helm/go.sum; } | sha256sum | cut -c1-16
)
out=$cache/controlplane/$key
if [[ ${1:-} == --key ]]; then echo "$key"; exit 0; fi # e.g. for a CI cache key

if [[ -f $out/bin/.complete ]]; then
  say "binaries up to date ($key)"
  echo "$out/bin"
  exit 0
fi

mkdir -p "$cache/controlplane"
exec 9>"$cache/controlplane/.lock"
flock 9 # one builder at a time (test binaries may run in parallel)
if [[ -f $out/bin/.complete ]]; then
  say "binaries built by another process ($key)"
  echo "$out/bin"
  exit 0
fi
# Leftovers of builders that were killed (we hold the lock, so nobody owns them).
rm -rf "$cache/controlplane"/.tmp.*

tmp=$(mktemp -d "$cache/controlplane/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin" "$tmp/logs"

modver() { awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$here/$1/go.mod"; }
k8s=$(modver kubernetes k8s.io/kubernetes) # v1.36.3
helm=$(modver helm helm.sh/helm/v3)        # v3.22.0
helm_k8s=$(modver helm k8s.io/client-go)   # v0.X.Y -> Kubernetes 1.X, as helm's Makefile does
helm_k8s_minor=${helm_k8s#v0.}; helm_k8s_minor=${helm_k8s_minor%%.*}

# What hack/lib/version.sh and helm's Makefile stamp in; the module zips carry dummies.
# shellcheck source=kube-version.sh
source "$here/kube-version.sh"
kver=$(kube_version_ldflags "$here/kubernetes/go.mod")
hver="-X helm.sh/helm/v3/internal/version.version=$helm -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  hver+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$helm_k8s_minor"
done

build() { # name module ldflags packages...
  local name=$1 dir=$2 ldflags=$3 t0=$SECONDS
  shift 3
  if go -C "$here/$dir" build -trimpath -ldflags="-s -w $ldflags" -o "$tmp/bin/" "$@" \
    >"$tmp/logs/$name.log" 2>&1; then
    say "built $name in $((SECONDS - t0))s"
  else
    say "building $name FAILED; log:"
    tail -n 60 "$tmp/logs/$name.log" >&2
    return 1
  fi
}

say "building etcd, kube-apiserver, kube-controller-manager ($k8s) and helm ($helm) into $out"
say "(cold builds take several minutes; caches in $cache/go)"
t0=$SECONDS
# The three modules download and compile in parallel: downloads overlap compilation and
# the (single-threaded) links overlap each other. The caches are safe for concurrent use.
pids=()
# tests/node/build.sh compiles the same Kubernetes packages for the node: one Kubernetes
# build at a time, so the later one reuses the build cache instead of compiling them twice.
mkdir -p "$cache/go"
(
  exec 8>"$cache/go/kubernetes.lock"
  flock 8
  build kubernetes kubernetes "$kver" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager
) &
pids+=($!)
build etcd etcd "" . &
pids+=($!)
build helm helm "$hver" helm.sh/helm/v3/cmd/helm &
pids+=($!)
ok=1
for pid in "${pids[@]}"; do wait "$pid" || ok=0; done
[[ $ok == 1 ]] || { say "build failed after $((SECONDS - t0))s"; exit 1; }

for b in etcd kube-apiserver kube-controller-manager helm; do
  [[ -x $tmp/bin/$b ]] || { say "missing $b after build"; exit 1; }
done
touch "$tmp/bin/.complete"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
# Keep only the current key: each set of binaries is ~250 MB.
for d in "$cache/controlplane"/*/; do
  [[ ${d%/} == "$out" ]] || rm -rf "${d%/}"
done
say "build took $((SECONDS - t0))s"
echo "$out/bin"

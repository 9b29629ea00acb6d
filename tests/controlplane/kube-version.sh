# Sourced by tests/controlplane/build.sh and tests/node/build.sh: the -X flags that stamp a
# Kubernetes binary with the version of the pinned k8s.io/kubernetes module (what
# hack/lib/version.sh stamps in; the module zips carry v0.0.0-master), so both scripts stamp
# the control plane and the node alike.
#
# kube_version_ldflags <go.mod of the module that pins k8s.io/kubernetes>
kube_version_ldflags() {
  local version minor flags="" p
  version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$1")
  [[ -n $version ]] || { echo "no k8s.io/kubernetes version in $1" >&2; return 1; }
  minor=${version#v*.}
  minor=${minor%%.*}
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  echo "$flags"
}

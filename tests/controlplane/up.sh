#!/usr/bin/env bash
# Starts a throw-away control plane (etcd, kube-apiserver, kube-controller-manager) on
# loopback, for poking at by hand; the Rust harness (tests/support/control_plane.rs) does
# the same with the same flags. No kubelet, no scheduler: pods stay Pending.
#
#   tests/controlplane/up.sh [DIR]      # DIR defaults to a new temp dir
#   export KUBECONFIG=DIR/kubeconfig    # printed when ready; Ctrl-C stops everything
#
# Needs openssl and curl (certificates and readiness checks).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$("$here/build.sh" | tail -n 1)
dir=${1:-$(mktemp -d /tmp/kips-controlplane.XXXXXX)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cd "$dir"

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(freeport) peer_port=$(freeport) api_port=$(freeport) kcm_port=$(freeport)

# --- certificates: one CA signs the apiserver serving cert and the admin client cert ---
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=kips-e2e-ca -keyout ca.key -out ca.crt
ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kube-apiserver \
  -keyout apiserver.key -out apiserver.csr
ossl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out apiserver.crt \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.0.1\nextendedKeyUsage=serverAuth')
ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/O=system:masters/CN=kips-e2e-admin' \
  -keyout admin.key -out admin.csr
ossl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out admin.crt \
  -extfile <(printf 'extendedKeyUsage=clientAuth')
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
ossl pkey -in sa.key -pubout -out sa.pub

b64() { base64 -w0 "$1"; }
cat >kubeconfig <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kips-e2e
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $(b64 ca.crt)
users:
- name: kips-e2e-admin
  user:
    client-certificate-data: $(b64 admin.crt)
    client-key-data: $(b64 admin.key)
contexts:
- name: kips-e2e
  context: {cluster: kips-e2e, user: kips-e2e-admin}
current-context: kips-e2e
EOF

pids=()
# SIGKILL: a throw-away cluster needs no graceful shutdown (the apiserver's can take a minute).
cleanup() { kill -KILL "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin/etcd" --name=e2e --data-dir="$dir/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-cluster="e2e=http://127.0.0.1:$peer_port" \
  --unsafe-no-fsync --log-level=warn >etcd.log 2>&1 &
pids+=($!)

"$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" --storage-backend=etcd3 \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
  --tls-cert-file=apiserver.crt --tls-private-key-file=apiserver.key --client-ca-file=ca.crt \
  --service-account-key-file=sa.pub --service-account-signing-key-file=sa.key \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --authorization-mode=Node,RBAC --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --enable-priority-and-fairness=false --endpoint-reconciler-type=none --profiling=false --cert-dir="$dir/apiserver-certs" \
  >kube-apiserver.log 2>&1 &
pids+=($!)

alive() {
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "a process died; logs in $dir" >&2; tail -n 20 "$dir"/*.log >&2; exit 1; }
  done
}
wait_ok() { # what url curl-args...
  local what=$1 url=$2
  shift 2
  until [[ $(curl -s "$@" "$url" 2>/dev/null) == ok ]]; do
    alive
    ((SECONDS - t0 < 60)) || { echo "$what not ready after 60s; logs in $dir" >&2; exit 1; }
    sleep 0.1
  done
}
t0=$SECONDS
wait_ok kube-apiserver "https://127.0.0.1:$api_port/readyz" --cacert ca.crt --cert admin.crt --key admin.key

# Started once the apiserver is ready: it exits if the apiserver is not healthy within 10s.
"$bin/kube-controller-manager" --kubeconfig=kubeconfig \
  --controllers=deployment-controller,replicaset-controller,statefulset-controller,daemonset-controller,serviceaccount-controller,serviceaccount-token-controller,namespace-controller,garbage-collector-controller,root-ca-certificate-publisher-controller \
  --service-account-private-key-file=sa.key --root-ca-file=ca.crt --use-service-account-credentials=false \
  --leader-elect=false --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$dir/kcm-certs" \
  --profiling=false >kube-controller-manager.log 2>&1 &
pids+=($!)
wait_ok kube-controller-manager "https://127.0.0.1:$kcm_port/healthz" -k

echo "control plane ready in $((SECONDS - t0))s; logs in $dir" >&2
echo "export KUBECONFIG=$dir/kubeconfig"
wait -n

#!/usr/bin/env bash
# Builds kips' container images as tarballs (OCI image layout and docker-archive in one file),
# without a Docker engine or a registry: each image is one layer, assembled from files of this
# machine into a directory and written by images/ocitar (Go, standard library only).
#
#   scripts/images.sh [--out DIR] [--kips BINARY] [IMAGE...]
#
# IMAGE (default: kips kips-init; `test` = the four test images; `all` = everything):
#   kips            ghcr.io/kips-dev/kips:<version>       the kips binary (webhook, bridge);
#                                                        user 65532, ENTRYPOINT kips, CMD webhook
#   kips-init       ghcr.io/kips-dev/kips-init:<version>  kips plus iptables, nft and legacy
#                                                        (/usr/sbin in PATH), run as kips-init
#   pause           kips.test/pause:v1                    the test node's sandbox image
#   test-app        kips.test/app:v1                      testapp serve: "cluster <pod>" on :8080
#   bridge-standin  kips.test/bridge-standin:v1           testapp serve: "sidecar <pod>" on
#                                                        :15100, user 65532 (kips-bridge stand-in)
#   test-client     kips.test/client:v1                   busybox (sh, nc) and testapp get
#
# <version> is what `kips --version` prints, the tag kips injects by default. The kips binary
# is `cargo build --release --locked --bin kips` unless --kips names one (the node tests pass
# their own build). It is linked against glibc (this toolchain has no musl target), so the
# image carries the shared libraries `ldd` names, and so do iptables' binaries and plugins.
# Output: DIR/<IMAGE>.tar (default target/images), one line per image on stdout:
# `<IMAGE> <name:tag> <tarball>`. Import with `ctr -n k8s.io images import <tarball>`,
# `skopeo copy oci-archive:<tarball> ...`, `podman load` or `docker load`.
#
# Needs: bash, coreutils, ldd, strip (binutils), Go >= 1.26 (for ocitar, pause, testapp), and
# for the images that carry them: iptables (kips-init), busybox-static (test-client), Debian's
# ca-certificates (optional, kips). As root, each image's binaries are also run inside its own
# root filesystem (chroot, in a fresh network namespace) before it is written.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cache=${KIPS_CACHE_DIR:-$root/.cache}
out=$root/target/images
kips=""
images=()

say() { echo "images: $*" >&2; }
die() { say "$*"; exit 1; }

while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --kips) kips=${2:?--kips needs a binary}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) images+=("$1"); shift ;;
  esac
done
((${#images[@]})) || images=(kips kips-init)
expanded=()
for i in "${images[@]}"; do
  case $i in
    all) expanded+=(kips kips-init pause test-app bridge-standin test-client) ;;
    test) expanded+=(pause test-app bridge-standin test-client) ;;
    kips | kips-init | pause | test-app | bridge-standin | test-client) expanded+=("$i") ;;
    *) die "unknown image '$i' (kips, kips-init, pause, test-app, bridge-standin, test-client, test, all)" ;;
  esac
done
images=("${expanded[@]}")
wants() { local i; for i in "${images[@]}"; do [[ $i == "$1" ]] && return 0; done; return 1; }

command -v go >/dev/null || die "go is not installed (needs Go >= 1.26 for images/ocitar)"
command -v strip >/dev/null || die "strip is not installed (Debian package binutils)"
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
export GOCACHE=$cache/go/build GOMODCACHE=$cache/go/mod
unset GOOS GOARCH

mkdir -p "$out"
out=$(cd "$out" && pwd -P)
work=$(mktemp -d "${TMPDIR:-/tmp}/kips-images.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The Go programs: ocitar (runs here), pause and testapp (go into images).
go -C "$root/images" build -trimpath -ldflags="-s -w" -o "$work/bin/" ./ocitar ./pause ./testapp

if wants kips || wants kips-init; then
  if [[ -z $kips ]]; then
    say "building kips (cargo build --release --locked --bin kips)"
    cargo build --release --locked --bin kips --manifest-path "$root/Cargo.toml" >&2
    kips=$root/target/release/kips
  fi
  [[ -x $kips ]] || die "$kips is not an executable"
  version=$("$kips" --version | awk '{ print $2 }')
  [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || die "unexpected version from $kips --version: $version"
fi

# rootfs DIR: an empty Debian-like (merged /usr) tree with /tmp, /etc/passwd and /etc/group.
rootfs() {
  local r=$1
  mkdir -p "$r"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc,tmp,run,var}
  ln -s usr/bin "$r/bin"
  ln -s usr/sbin "$r/sbin"
  ln -s usr/lib "$r/lib"
  ln -s usr/lib64 "$r/lib64"
  chmod 1777 "$r/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$r/etc/group"
}

# Copies a host path (file or symlink chain) to the same place in the merged-/usr rootfs.
place() { # rootfs host-path [dest-path]
  local r=$1 src=$2 dest=${3:-$2}
  case $dest in /lib/* | /lib64/* | /bin/* | /sbin/*) dest=/usr$dest ;; esac
  mkdir -p "$r$(dirname "$dest")"
  cp -L "$src" "$r$dest"
}

# Copies the shared libraries (and the loader) an ELF file needs, as ldd resolves them here.
libs() { # rootfs elf...
  local r=$1 lib
  shift
  while read -r lib; do
    place "$r" "$lib"
  done < <(ldd "$@" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u)
}

# Runs a command inside the rootfs when we are root (a fresh network namespace: nothing here
# touches the host's), as a check that the image's binaries really run there.
check() { # rootfs what command...
  local r=$1 what=$2
  shift 2
  if [[ $(id -u) -ne 0 ]]; then
    say "not root: $what not checked inside its root filesystem"
    return 0
  fi
  if ! unshare --net chroot "$r" "$@" >"$work/check.log" 2>&1; then
    cat "$work/check.log" >&2
    die "$what does not run inside its image: chroot $r $*"
  fi
}

write() { # image name rootfs ocitar-flags...
  local image=$1 name=$2 r=$3
  shift 3
  "$work/bin/ocitar" -o "$out/$image.tar" -name "$name" -rootfs "$r" \
    -label "org.opencontainers.image.source=https://github.com/kips-dev/kips" "$@" >/dev/null
  echo "$image $name $out/$image.tar"
}

path=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

kips_into() { # rootfs
  install -D -m 0755 "$kips" "$1/usr/local/bin/kips"
  strip --strip-debug "$1/usr/local/bin/kips"
  libs "$1" "$1/usr/local/bin/kips"
}

for image in "${images[@]}"; do
  r=$work/$image
  rootfs "$r"
  case $image in
    kips)
      kips_into "$r"
      if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
        place "$r" /etc/ssl/certs/ca-certificates.crt # for `kips bridge` (Azure Relay over TLS)
      else
        say "no /etc/ssl/certs/ca-certificates.crt (Debian ca-certificates): kips image without CA bundle"
      fi
      check "$r" "kips" /usr/local/bin/kips --version
      write kips "ghcr.io/kips-dev/kips:$version" "$r" -entrypoint '["/usr/local/bin/kips"]' \
        -cmd '["webhook"]' -user 65532:65532 -env "$path" -expose 8443/tcp
      ;;
    kips-init)
      kips_into "$r"
      for multi in xtables-nft-multi xtables-legacy-multi; do
        [[ -x /usr/sbin/$multi ]] || die "/usr/sbin/$multi is missing (Debian package iptables)"
        place "$r" "/usr/sbin/$multi"
      done
      # What `kips init-net` runs, for both families and backends; plain iptables is nft.
      for family in iptables ip6tables; do
        for verb in "" -save -restore; do
          ln -s xtables-nft-multi "$r/usr/sbin/$family-nft$verb"
          ln -s xtables-legacy-multi "$r/usr/sbin/$family-legacy$verb"
          ln -s xtables-nft-multi "$r/usr/sbin/$family$verb"
        done
      done
      mkdir -p "$r/usr/lib/x86_64-linux-gnu"
      xt=$(dirname "$(ldd /usr/sbin/xtables-nft-multi | awk '/libxtables/ { print $3 }')")/xtables
      [[ -d $xt ]] || die "no iptables extensions in $xt"
      cp -rL "$xt" "$r/usr/lib/x86_64-linux-gnu/xtables"
      libs "$r" /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi "$xt"/*.so
      for f in /etc/protocols /etc/services /etc/ethertypes; do [[ -f $f ]] && place "$r" "$f"; done
      check "$r" "kips-init's kips" /usr/local/bin/kips --version
      check "$r" "kips-init's iptables-nft" /usr/sbin/iptables-nft-save -t nat
      check "$r" "kips-init's iptables-legacy" /usr/sbin/iptables-legacy-save -t nat
      check "$r" "kips-init's ip6tables-nft" /usr/sbin/ip6tables-nft-save -t nat
      write kips-init "ghcr.io/kips-dev/kips-init:$version" "$r" \
        -entrypoint '["/usr/local/bin/kips"]' -cmd '["init-net","--help"]' -env "$path"
      ;;
    pause)
      install -m 0755 "$work/bin/pause" "$r/pause"
      write pause kips.test/pause:v1 "$r" -entrypoint '["/pause"]' -user 65535:65535
      ;;
    test-app)
      install -m 0755 "$work/bin/testapp" "$r/usr/local/bin/testapp"
      write test-app kips.test/app:v1 "$r" -entrypoint '["/usr/local/bin/testapp","serve"]' \
        -env "$path" -env ANSWER=cluster -env LISTEN=:8080 -expose 8080/tcp
      ;;
    bridge-standin)
      # kips-bridge's stand-in: the arguments kips gives the sidecar (-x ..., -L ...) are
      # ignored (and shown at /args); it answers on the first listen port kips picks.
      install -m 0755 "$work/bin/testapp" "$r/usr/local/bin/testapp"
      write bridge-standin kips.test/bridge-standin:v1 "$r" \
        -entrypoint '["/usr/local/bin/testapp","serve"]' -user 65532:65532 \
        -env "$path" -env ANSWER=sidecar -env LISTEN=0.0.0.0:15100 -expose 15100/tcp
      ;;
    test-client)
      bb=$(command -v busybox || true)
      [[ -n $bb ]] || die "busybox is missing (Debian package busybox-static)"
      ldd "$bb" >/dev/null 2>&1 && die "$bb is dynamically linked: install busybox-static"
      install -m 0755 "$bb" "$r/usr/bin/busybox"
      for applet in sh ash cat echo ls sleep nc printf timeout env hostname ip ifconfig; do
        ln -s busybox "$r/usr/bin/$applet"
      done
      install -m 0755 "$work/bin/testapp" "$r/usr/local/bin/testapp"
      check "$r" "test-client's sh and nc" /usr/bin/sh -c 'command -v nc && command -v testapp'
      write test-client kips.test/client:v1 "$r" -cmd '["/usr/bin/sleep","86400"]' -env "$path"
      ;;
  esac
  rm -rf "$r"
done

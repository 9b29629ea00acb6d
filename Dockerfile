# syntax=docker/dockerfile:1.7
#
# kips images, from one build of the `kips` binary (static, musl):
#
#   docker build -t ghcr.io/kips-dev/kips:0.1.0 .                          # the webhook (default target)
#   docker build -t ghcr.io/kips-dev/kips-init:0.1.0 --target kips-init .  # kips + iptables
#
# `kips` runs on distroless/static as the numeric non-root user 65532: no shell, no
# package manager, nothing but the binary and CA certificates. `kips-init` is the init
# container of iptables port mode (`kips init-net`); it needs iptables in both flavours
# (nft and legacy: it uses whichever the node's kernel tables are in), so it is Debian.

ARG RUST_VERSION=1.95
ARG ALPINE_VERSION=3.22

# ---- build: a static binary (musl is Alpine's libc; rustc links it statically) ----
FROM rust:${RUST_VERSION}-alpine${ALPINE_VERSION} AS build
# ring (rustls' crypto) compiles C and assembly.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kips \
 && install -D -m 0755 target/release/kips /out/kips \
 && strip /out/kips \
 && /out/kips --version

# ---- kips-init: the same binary plus iptables (nft and legacy) ----
FROM debian:bookworm-slim AS kips-init
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && iptables-nft --version && iptables-legacy --version
COPY --from=build /out/kips /usr/local/bin/kips
# The injected container sets its own user (root with only NET_ADMIN and NET_RAW) and
# arguments (`init-net --redirect ...`).
ENTRYPOINT ["/usr/local/bin/kips"]
CMD ["init-net", "--help"]

# ---- kips: the webhook (last stage, so the default target) ----
FROM gcr.io/distroless/static-debian12:nonroot AS kips
COPY --from=build /out/kips /usr/local/bin/kips
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["/usr/local/bin/kips"]
CMD ["webhook"]

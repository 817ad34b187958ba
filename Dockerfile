# syntax=docker/dockerfile:1
# Ember image from source (needs registry access for the base images).
# Without a registry, scripts/build-image.sh assembles an equivalent image
# from binaries built on the host (same user, paths, ports, HEALTHCHECK, CMD).
#
#   docker build -t ember:local .
#   docker run --rm ember:local ps-server --help
#
# The rust image must be at least the newest rust-version in Cargo.lock
# (zip 9.x: 1.89); 1.95 built the committed lock file.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------- builder
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# release: fully optimised; dev: the workspace's test/training profile
# (what scripts/build-image.sh packages from target/debug).
ARG CARGO_PROFILE=release
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    cargo build --locked --profile "${CARGO_PROFILE}" --bins \
      -p ember-ps -p ember-worker -p ember-cluster; \
    dir=target/$([ "${CARGO_PROFILE}" = dev ] && echo debug || echo "${CARGO_PROFILE}"); \
    mkdir -p /out; \
    cp "$dir/ps-server" "$dir/worker" "$dir/ember" "$dir/ember-data" /out/; \
    rustc --edition 2021 -C opt-level=2 -o /out/ember-healthcheck deploy/docker/healthcheck.rs

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim
# fonts-dejavu-core: text in curves.png (ember train).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends fonts-dejavu-core; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --gid 10001 ember; \
    useradd --uid 10001 --gid 10001 --home-dir /var/lib/ember --no-create-home \
      --shell /usr/sbin/nologin ember; \
    mkdir -p /var/lib/ember/checkpoints /var/lib/ember/runs; \
    chown -R 10001:10001 /var/lib/ember
COPY --from=builder /out/ /usr/local/bin/
ENV EMBER_BIN_DIR=/usr/local/bin \
    HOME=/var/lib/ember \
    RUST_BACKTRACE=1
USER 10001:10001
WORKDIR /var/lib/ember
# 50051: gRPC (ps-server --listen), 9100: Prometheus /metrics (--metrics-addr).
EXPOSE 50051 9100
# Probes a ps-server on the default ports (gRPC TCP connect + GET /metrics);
# containers running `ember train` or `worker` should disable it.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["ember-healthcheck"]
LABEL org.opencontainers.image.title="ember" \
      org.opencontainers.image.description="Ember parameter-server trainer for DIN/DIEN CTR models" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["ps-server", "--help"]

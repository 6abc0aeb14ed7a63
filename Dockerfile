# syntax=docker/dockerfile:1
#
# The worker image: one static binary on an empty base.
#
#   docker build -t worker --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Stages: `chef` (toolchain + musl), `planner` (dependency recipe from the
# manifests), `deps` (dependencies only: this layer is reused until Cargo.toml
# or Cargo.lock change), `build` (the worker itself), `runtime` (scratch +
# CA certificates + the binary, running as an unprivileged user).
# The same image serves every mode: TASK_DATA set runs one task (ACI),
# otherwise it polls (`worker poll`), WORKER_MODE=job leases one message.

ARG TARGET=x86_64-unknown-linux-musl

# Keep the Rust version in step with the toolchain CI tests with.
# Not pinned by digest: the digest of this tag could not be looked up or
# verified where this file was last changed (no registry access), and a
# made-up one would break every build. To pin it, resolve it once with
#   docker buildx imagetools inspect rust:1.95.0-slim-bookworm --format '{{json .Manifest.Digest}}'
# and write FROM rust:1.95.0-slim-bookworm@sha256:<digest>. The runtime stage
# is scratch (nothing to pin); musl-tools and cargo-chef are pinned by version.
FROM rust:1.95.0-slim-bookworm AS chef
ARG TARGET
# musl-gcc builds the C parts (aws-lc-sys, ring) for the static target.
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add "${TARGET}" \
    && cargo install cargo-chef --locked --version 0.1.78
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TERM_COLOR=never
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS deps
ARG TARGET
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --target "${TARGET}" --bin worker --recipe-path recipe.json

FROM deps AS build
ARG TARGET
COPY . .
RUN cargo build --release --locked --target "${TARGET}" --bin worker \
    && cp "target/${TARGET}/release/worker" /worker \
    && mkdir -p /rootfs/etc /rootfs/tmp \
    && echo 'worker:x:65532:65532:worker:/nonexistent:/sbin/nologin' > /rootfs/etc/passwd \
    && echo 'worker:x:65532:' > /rootfs/etc/group

FROM scratch AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
# CI passes the repository URL; local builds leave it empty.
ARG SOURCE=
LABEL org.opencontainers.image.title="worker" \
      org.opencontainers.image.description="Runs tasks from Azure Storage Queues: one task per container (TASK_DATA) or a polling consumer" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /rootfs/etc/passwd /rootfs/etc/group /etc/
COPY --from=build --chown=65532:65532 --chmod=1777 /rootfs/tmp /tmp
COPY --from=build /worker /usr/local/bin/worker
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    WORKER_LOG_FORMAT=json
USER 65532:65532
# For Docker and Compose (the VPS): reaches every configured queue. ACI
# ignores image health checks; a task container there simply runs and exits.
HEALTHCHECK --interval=60s --timeout=15s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/worker", "check"]
ENTRYPOINT ["/usr/local/bin/worker"]

# syntax=docker/dockerfile:1
# Both images from one build: `docker build --target operator -t mcp-credentials/operator .` and
# `docker build --target sidecar -t mcp-credentials/sidecar .`. Multi-stage: the toolchain stays in
# the builder; the runtime is distroless (glibc, CA roots, no shell), non-root (uid 65532).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY core core
COPY operator operator
COPY sidecar sidecar
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mcp-credentials-operator -p mcp-credentials-sidecar \
    && mkdir -p /out \
    && cp target/release/mcp-credentials-operator target/release/mcp-credentials-sidecar /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=builder /out/mcp-credentials-operator /usr/local/bin/mcp-credentials-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mcp-credentials-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=builder /out/mcp-credentials-sidecar /usr/local/bin/mcp-credentials-sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mcp-credentials-sidecar"]

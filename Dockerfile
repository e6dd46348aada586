# Both images from one Dockerfile, with no base image to pull: each is FROM scratch with one static
# (musl) binary, the CA roots of the building host and a non-root user (uid 65532). The binaries are
# built on the host first (a builder stage would need a registry's Rust image):
#
#   rustup target add x86_64-unknown-linux-musl      # once; Debian: apt-get install musl-tools
#   cargo build --release --locked --target x86_64-unknown-linux-musl \
#       -p mcp-credentials-operator -p mcp-credentials-sidecar
#   cp /etc/ssl/certs/ca-certificates.crt target/ca-certificates.crt
#   buildah bud --target operator -t mcp-credentials/operator:dev .   # or docker build / podman build
#   buildah bud --target sidecar -t mcp-credentials/sidecar:dev .
#
# tests/images/build runs exactly these (and the e2e test's agent image). .dockerignore keeps the
# context to the three files copied here.

FROM scratch AS operator
COPY target/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY target/x86_64-unknown-linux-musl/release/mcp-credentials-operator /usr/local/bin/mcp-credentials-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mcp-credentials-operator"]

FROM scratch AS sidecar
COPY target/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY target/x86_64-unknown-linux-musl/release/mcp-credentials-sidecar /usr/local/bin/mcp-credentials-sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mcp-credentials-sidecar"]

//! The sidecar's environment as the operator's injector writes it and the sidecar reads it: the
//! variable names and the ports. The sidecar's `config` pairs each name with its default and the
//! reason for it; the injector sets the ones a pod needs. Both use these constants, so renaming a
//! variable breaks both builds.

/// The proxy's port on loopback.
pub const PROXY_PORT: u16 = 7007;
/// The admin port (metrics, and probes with details): on loopback unless a pod opts in.
pub const ADMIN_PORT: u16 = 7008;
/// The probe port on the pod IP: `/healthz` and `/readyz`, a status and nothing else.
pub const PROBE_PORT: u16 = 7009;

/// Where the proxy listens (`127.0.0.1:<PROXY_PORT>`).
pub const LISTEN: &str = "MCP_SIDECAR_LISTEN";
/// Where `/metrics`, `/healthz` and `/readyz` listen.
pub const ADMIN_LISTEN: &str = "MCP_SIDECAR_ADMIN_LISTEN";
/// Where only `/healthz` and `/readyz` listen (empty: nowhere).
pub const PROBE_LISTEN: &str = "MCP_SIDECAR_PROBE_LISTEN";
/// The credentials the pod needs: `name` or `name=secret-name`, comma-separated.
pub const CREDENTIALS: &str = "MCP_SIDECAR_CREDENTIALS";
/// The operator's report endpoint.
pub const REPORT_URL: &str = "MCP_SIDECAR_REPORT_URL";
/// The PEM CA bundle trusted for the report endpoint.
pub const REPORT_CA: &str = "MCP_SIDECAR_REPORT_CA";

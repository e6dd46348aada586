//! Logging: one `init()`. `MCP_SIDECAR_LOG` (or `RUST_LOG`) filters, default `info`; JSON lines when
//! `MCP_SIDECAR_LOG_FORMAT=json` (in a pod), text otherwise (on a laptop).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = std::env::var("MCP_SIDECAR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if std::env::var("MCP_SIDECAR_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

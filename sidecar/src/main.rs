//! `mcp-credentials-sidecar`: the proxy in a pod (credentials from the Kubernetes API or files), or
//! `mcp-credentials-sidecar standalone <mcpcredentials.yaml> [<secrets-dir>]` on a laptop, and
//! `mcp-credentials-sidecar login <credential> <mcpcredentials.yaml> <secrets-dir>` to sign one in.

use std::process::ExitCode;

use mcp_credentials_core::process::shutdown_signal;
use mcp_credentials_sidecar::{
    config::{self, Config},
    error::error_chain,
    run, telemetry,
};

fn main() -> ExitCode {
    telemetry::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("login") {
        return login(&args[1..]);
    }
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("mcp-credentials-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    // A single-threaded event loop; `run` starts one more per further worker thread and deals agent
    // connections among them (no work stealing, no hand-offs between threads).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "mcp-credentials-sidecar failed");
            ExitCode::FAILURE
        }
    }
}

/// `login`: one sign-in, with the same loopback opt-in for discovery as standalone mode.
fn login(args: &[String]) -> ExitCode {
    mcp_credentials_core::process::install_crypto_provider();
    let (name, default) = config::DISCOVERY_ALLOW_LOOPBACK;
    let allow_loopback = std::env::var(name).unwrap_or_else(|_| default.to_owned()) == "true";
    let policy = mcp_credentials_core::source::OutboundPolicy { allow_loopback };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(mcp_credentials_sidecar::login::main(args, policy))
}

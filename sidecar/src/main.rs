//! `mcp-credentials-sidecar`: the proxy in a pod (credentials from the Kubernetes API or files), or
//! `mcp-credentials-sidecar standalone <mcpcredentials.yaml> [<secrets-dir>]` on a laptop.

use std::process::ExitCode;

use mcp_credentials_core::process::shutdown_signal;
use mcp_credentials_sidecar::{config::Config, error::error_chain, run, telemetry};

fn main() -> ExitCode {
    telemetry::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
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

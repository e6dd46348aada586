//! The operator binary: `crd` prints the CRDs; without a subcommand it runs the operator.
use clap::{Parser, Subcommand};

/// Keeps every McpCredential's Secret fresh.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: mcp_credentials_operator::Config,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (the source of `crds/`).
    Crd,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", mcp_credentials_core::crds_yaml());
        return std::process::ExitCode::SUCCESS;
    }
    mcp_credentials_operator::init_telemetry(&args.config.log_format);
    match mcp_credentials_operator::run(args.config, mcp_credentials_operator::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "the operator stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

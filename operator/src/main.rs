//! The operator binary: `crd` prints the CRDs.
use clap::{Parser, Subcommand};

/// Keeps every McpCredential's Secret fresh.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (the source of `crds/`).
    Crd,
}

fn main() {
    match Args::parse().command {
        Command::Crd => print!("{}", mcp_credentials_core::crds_yaml()),
    }
}

//! The mcp-credentials operator: keeps every McpCredential's Secret fresh.
//!
//! [`Config`] is the command line (every flag has an environment fallback); [`run`] serves
//! `/metrics`, `/healthz` and `/readyz`, waits for the leader Lease, then runs the controller until
//! shutdown. This file is the index of the modules; the process itself is [`server`].

/// Roles and RoleBindings so each service account reads only the Secrets it may use.
pub mod access;
/// The validating webhook: an McpCredential asks nothing its author may not do (SubjectAccessReview).
pub mod admission;
/// The webhook's self-managed CA and serving certificate, rotated before expiry.
pub mod certs;
/// The command line: every flag, with its environment fallback.
pub mod config;
/// Reconciling McpCredentials into Secrets.
pub mod controller;
/// The watch of McpCredentials both controllers run on, trimmed to what they read.
pub mod credentials;
/// Test fixtures.
#[cfg(test)]
mod fixtures;
/// What the injection webhook does to a pod, as pure functions.
pub mod inject;
/// The JWKS and OpenID discovery endpoints for minted JWTs.
pub mod jwks;
/// The signing keys of minted JWTs, in a Secret the leader rotates.
pub mod keys;
/// Lease-based leader election.
pub mod leader;
/// Prometheus metrics.
pub mod metrics;
/// Sidecar reports of rejected credentials: `POST /v1/report` on the webhook's listener.
pub mod report;
/// The process: telemetry, the metrics listener, leader election, the controller, the drain.
pub mod server;
/// The mutating admission webhook that injects the sidecar.
pub mod webhook;

pub use config::Config;
pub use server::{init_telemetry, run, shutdown_signal};

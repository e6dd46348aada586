//! Standalone mode: McpCredential YAML plus local secret files, with core's credential sources run
//! in-process. Not implemented yet: it waits for `mcp_credentials_core::source`.

use std::{path::Path, sync::Arc};

use super::Store;

/// Why standalone mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// Not implemented yet.
    #[error("standalone mode is not implemented yet")]
    NotImplemented,
}

/// Loads the McpCredentials and starts a task that keeps each one fresh.
pub async fn start(
    _store: Arc<Store>,
    _credentials_file: &Path,
    _secrets_dir: &Path,
) -> Result<tokio::task::JoinHandle<()>, StandaloneError> {
    Err(StandaloneError::NotImplemented)
}

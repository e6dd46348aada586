//! What both binaries do as processes: wait for SIGTERM or Ctrl-C, print an error with its causes,
//! choose the TLS crypto provider.

/// Resolves on SIGTERM (how the kubelet stops a container) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// An error and its causes on one line, `outer: cause: root cause`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut e = self.0.source();
        while let Some(cause) = e {
            write!(f, ": {cause}")?;
            e = cause.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a string.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    ErrorChain(e).to_string()
}

/// Several rustls crypto providers are compiled in (kube: ring, reqwest: its default): choose ring,
/// once per process (later calls do nothing).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("writing the status")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_prints_with_its_causes() {
        let e = Outer(std::io::Error::other("connection reset"));
        assert_eq!(error_chain(&e), "writing the status: connection reset");
    }
}

//! The mcp-credentials sidecar: a streaming reverse proxy on 127.0.0.1 that attaches the current
//! credential for each MCP upstream, with its credential store and admin listener.

use std::{future::Future, net::SocketAddr};

use axum::{Router, serve::ListenerExt};
use tokio::{net::TcpListener, sync::watch};

pub mod admin;
pub mod config;
pub mod credential;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod report;
pub mod store;
pub mod telemetry;

use crate::{
    config::{Config, StoreConfig},
    metrics::Metrics,
    proxy::Proxy,
    store::Store,
};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The upstream client could not be built (TLS roots).
    #[error("cannot build the upstream client")]
    Client(#[from] proxy::ClientError),
    /// The Kubernetes client could not be configured.
    #[error("cannot connect to the Kubernetes API (set MCP_SIDECAR_CREDENTIALS_DIR to read files instead)")]
    Kubernetes(#[source] kube::Error),
    /// Standalone mode could not load its McpCredentials.
    #[error("standalone mode")]
    Standalone(#[from] store::standalone::StandaloneError),
    /// Reports to the operator cannot be sent.
    #[error("reports to the operator")]
    Report(#[from] report::ReportError),
}

/// Selects ring as rustls' process-wide provider. Dependencies enable both ring and aws-lc-rs, and
/// then the kube client cannot pick one by itself. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves the proxy and the admin listener until `shutdown` completes, then lets open requests and
/// streams finish for the configured grace period.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    install_crypto_provider();
    let required: Vec<String> = match &config.store {
        // Standalone mode serves exactly the credentials of its file.
        StoreConfig::Standalone { credentials_file, .. } => store::standalone::load(credentials_file)?
            .iter()
            .map(kube::ResourceExt::name_any)
            .collect(),
        _ => config.credentials.iter().map(|w| w.name.clone()).collect(),
    };
    let store = Store::new(required);
    let metrics = Metrics::register();
    proxy::set_replay_wait(config.replay_wait);
    let client = proxy::upstream_client(&config.client)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { addr, source })
    };
    let proxy_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;

    let source = match &config.store {
        StoreConfig::Kubernetes { namespace } => {
            let client = kube::Client::try_default().await.map_err(RunError::Kubernetes)?;
            let namespace = namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            // The operator renews what an upstream rejected; standalone mode renews in-process.
            if let Some(settings) = &config.report {
                let reporter = report::Reporter::new(settings.clone(), &namespace, metrics.clone())?;
                tokio::spawn(reporter.run(store.clone()));
            }
            tokio::spawn(store::kubernetes::run(
                store.clone(),
                client,
                namespace,
                config.credentials.clone(),
            ))
        }
        StoreConfig::Files { dir } => tokio::spawn(store::files::run(
            store.clone(),
            dir.clone(),
            config.file_poll_interval,
        )),
        StoreConfig::Standalone {
            credentials_file,
            secrets_dir,
            discovery_allow_loopback,
        } => {
            let policy = mcp_credentials_core::source::OutboundPolicy {
                allow_loopback: *discovery_allow_loopback,
            };
            store::standalone::start(store.clone(), credentials_file, secrets_dir, policy).await?
        }
    };

    tracing::info!(proxy = %config.listen, admin = %config.admin_listen, credentials = ?store.names(), "serving");
    let proxy = Proxy {
        store: store.clone(),
        client,
        metrics: metrics.clone(),
        max_header_bytes: config.max_header_bytes,
    };
    let (stop, stopped) = watch::channel(false);
    let servers = futures_util::future::join(
        serve(proxy_listener, proxy::app(proxy), stopped.clone()),
        serve(admin_listener, admin::app(store, metrics), stopped),
    );
    tokio::pin!(servers);
    tokio::select! {
        _ = &mut servers => {}
        () = shutdown => {
            tracing::info!(grace = ?config.shutdown_grace, "shutting down: finishing open requests");
            let _ = stop.send(true);
            if tokio::time::timeout(config.shutdown_grace, servers).await.is_err() {
                tracing::warn!("grace period over: closing the streams still open");
            }
        }
    }
    source.abort();
    Ok(())
}

/// Serves `app` on `listener` until `stop` turns true, then waits for open connections.
pub async fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    // Small requests and SSE events go out at once instead of waiting for Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "listener failed");
    }
}

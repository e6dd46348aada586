//! Shared by the integration tests: a sidecar serving on 127.0.0.1 with a store the test controls.

#![allow(dead_code)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use mcp_credentials_sidecar::{
    credential::Credential,
    metrics::Metrics,
    proxy::{self, ClientSettings, Proxy},
    serve,
    store::Store,
};
use tokio::sync::watch;

/// Credential data for `upstream` with `X-API-Key: key`.
pub fn credential(upstream: &str, key: &str, version: &str, expires_at: Option<&str>) -> Credential {
    let mut data = BTreeMap::from([
        ("upstream".to_owned(), upstream.as_bytes().to_vec()),
        ("header.X-API-Key".to_owned(), key.as_bytes().to_vec()),
        ("version".to_owned(), version.as_bytes().to_vec()),
    ]);
    if let Some(at) = expires_at {
        data.insert("expires-at".to_owned(), at.as_bytes().to_vec());
    }
    Credential::from_data(&data).unwrap()
}

/// A sidecar listening on 127.0.0.1; it stops when dropped.
pub struct Sidecar {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its credentials.
    pub store: Arc<Store>,
    /// Its metrics.
    pub metrics: Metrics,
    _stop: watch::Sender<bool>,
}

/// A sidecar serving credential `name` for `upstream` with `X-API-Key: key`.
pub async fn sidecar(name: &str, upstream: &str, key: &str) -> Sidecar {
    let store = Store::new([name.to_owned()]);
    store.set(name, credential(upstream, key, "1", None));
    sidecar_with_store(store).await
}

/// A sidecar serving whatever `store` holds.
pub async fn sidecar_with_store(store: Arc<Store>) -> Sidecar {
    sidecar_on(store, true).await
}

/// A sidecar serving `store`, with the HTTP/1.1 fast path on or off (every request on hyper's path).
pub async fn sidecar_on(store: Arc<Store>, http1_fast_path: bool) -> Sidecar {
    sidecar_trusting(store, http1_fast_path, None).await
}

/// [`sidecar_on`], trusting the CA certificates in `extra_ca_file` too.
pub async fn sidecar_trusting(
    store: Arc<Store>,
    http1_fast_path: bool,
    extra_ca_file: Option<std::path::PathBuf>,
) -> Sidecar {
    mcp_credentials_sidecar::install_crypto_provider();
    let client = proxy::upstream_client(&ClientSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(30),
        extra_ca_file,
    })
    .unwrap();
    let metrics = Metrics::register();
    let app = proxy::app(Proxy {
        store: store.clone(),
        client,
        metrics: metrics.clone(),
        max_header_bytes: 65536,
        header_read_timeout: std::time::Duration::from_secs(60),
        http1_fast_path,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(listener, app, stopped));
    Sidecar {
        url,
        store,
        metrics,
        _stop: stop,
    }
}

//! An HTTPS upstream with a private CA: the sidecar trusts it through `extra_ca_file` (on top of the
//! system roots), negotiates HTTP/2 by ALPN, pools the connection, and attaches the credential there too.
//! The HTTP/1.1 fast path speaks HTTP/1.1 over TLS to an upstream that offers both, and hands an
//! HTTP/2-only upstream's requests to the pool.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mcp_credentials_sidecar::{
    metrics::Metrics,
    proxy::{self, ClientSettings, Proxy},
    serve,
    store::Store,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

mod common;

/// Answers `<HTTP version> <X-API-Key>`.
async fn answer(request: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let key = request
        .headers()
        .get("x-api-key")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Ok(Response::new(Full::from(format!(
        "{:?} {key}",
        request.version()
    ))))
}

#[tokio::test]
async fn an_https_upstream_with_an_extra_ca_is_reached_over_http2() {
    let (upstream, ca_file, mut connections) = upstream(&[b"h2", b"http/1.1"], "pool").await;

    let store = Store::new(["secure".to_owned()]);
    store.set("secure", common::credential(&upstream, "tls-key", "1", None));
    let client = proxy::upstream_client(&ClientSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(30),
        extra_ca_file: Some(ca_file.clone()),
    })
    .unwrap();
    let app = proxy::app(Proxy {
        store,
        client,
        metrics: Metrics::register(),
        max_header_bytes: 65536,
        header_read_timeout: std::time::Duration::from_secs(60),
        // The pool's behaviour; the fast path offers only HTTP/1.1 (the tests below).
        http1_fast_path: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(serve(listener, app, stopped));

    for _ in 0..3 {
        let body = reqwest::get(format!("{sidecar}/secure/mcp"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "HTTP/2.0 tls-key");
    }
    connections.recv().await.unwrap();
    assert!(
        connections.try_recv().is_err(),
        "three requests shared one pooled HTTP/2 connection"
    );
    std::fs::remove_file(&ca_file).unwrap();
}

#[test]
fn an_unreadable_extra_ca_file_is_an_error_naming_it() {
    let e = proxy::upstream_client(&ClientSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(30),
        extra_ca_file: Some("/nonexistent/ca.pem".into()),
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

/// An HTTPS upstream offering `alpn`, answering like [`answer`]: its URL, the CA file to trust
/// (named by `tag`, one per test), and one message per accepted TCP connection.
async fn upstream(
    alpn: &[&[u8]],
    tag: &str,
) -> (
    String,
    std::path::PathBuf,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    mcp_credentials_sidecar::install_crypto_provider();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca_file = std::env::temp_dir().join(format!("mcp-sidecar-ca-{}-{tag}.pem", std::process::id()));
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certified.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der())),
            )
            .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (connections_tx, connections) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = connections_tx.send(());
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service_fn(answer))
                    .await;
            });
        }
    });
    (url, ca_file, connections)
}

/// Three GETs on one agent connection, through a fast-path sidecar trusting `ca_file`: the answers
/// and the handoff counts.
async fn three_gets(upstream: &str, ca_file: std::path::PathBuf) -> (Vec<String>, String) {
    let store = Store::new(["secure".to_owned()]);
    store.set("secure", common::credential(upstream, "tls-key", "1", None));
    let sidecar = common::sidecar_trusting(store, true, Some(ca_file.clone())).await;
    let client = reqwest::Client::new();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = client
            .get(format!("{}/secure/mcp", sidecar.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.text().await.unwrap());
    }
    std::fs::remove_file(&ca_file).unwrap();
    let metrics = sidecar.metrics.render(&sidecar.store);
    let handoffs = metrics
        .lines()
        .filter(|l| l.starts_with("mcp_credentials_sidecar_http1_handoffs_total{"))
        .collect::<Vec<_>>()
        .join("\n");
    (bodies, handoffs)
}

#[tokio::test]
async fn the_fast_path_speaks_http1_over_tls_to_an_upstream_offering_both() {
    let (url, ca_file, mut connections) = upstream(&[b"h2", b"http/1.1"], "both").await;
    let (bodies, handoffs) = three_gets(&url, ca_file).await;
    assert_eq!(bodies, ["HTTP/1.1 tls-key"; 3]);
    assert_eq!(handoffs, "", "nothing handed to the hyper path");
    connections.recv().await.unwrap();
    assert!(
        connections.try_recv().is_err(),
        "one upstream connection for the agent connection"
    );
}

#[tokio::test]
async fn an_http2_only_upstream_is_served_by_the_pool_without_a_failed_request() {
    let (url, ca_file, _connections) = upstream(&[b"h2"], "h2-only").await;
    let (bodies, handoffs) = three_gets(&url, ca_file).await;
    assert_eq!(bodies, ["HTTP/2.0 tls-key"; 3]);
    assert!(
        handoffs.contains("reason=\"http2_upstream\"} 1"),
        "the agent connection went to the hyper path once: {handoffs}"
    );
}

//! Replay after the upstream rejects the credential: the sidecar asks its source for a new one, waits
//! briefly, and sends a small request once more; otherwise the upstream's 401 reaches the agent.

use std::sync::{Arc, Mutex};

use axum::{Router, body::Bytes, extract::State, response::IntoResponse};
use http::{HeaderMap, StatusCode};

mod common;

/// An upstream that accepts only `key-2`, echoes the body and records the keys it saw.
async fn upstream() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .fallback(
            |State(seen): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap, body: Bytes| async move {
                let key = headers
                    .get("x-api-key")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                seen.lock().unwrap().push(key.clone());
                if key != "key-2" {
                    return (
                        StatusCode::UNAUTHORIZED,
                        [("www-authenticate", r#"Bearer error="invalid_token""#)],
                        Bytes::new(),
                    )
                        .into_response();
                }
                body.into_response()
            },
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Plays the credential source: on a renewal request, publishes `key-2`.
fn renew_on_request(sidecar: &common::Sidecar, upstream: &str) {
    let store = sidecar.store.clone();
    let upstream = upstream.to_owned();
    let mut requests = store.refresh_requests();
    tokio::spawn(async move {
        while let Ok(request) = requests.recv().await {
            assert_eq!(request.reason.as_str(), "invalid_token");
            store.set(&request.name, common::credential(&upstream, "key-2", "2", None));
        }
    });
}

async fn post(sidecar: &common::Sidecar, body: Vec<u8>) -> (StatusCode, Bytes) {
    let r = reqwest::Client::new()
        .post(format!("{}/demo/mcp", sidecar.url))
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status(), r.bytes().await.unwrap())
}

#[tokio::test]
async fn a_rejected_small_request_is_replayed_once_with_the_renewed_credential() {
    let (url, seen) = upstream().await;
    let sidecar = common::sidecar("demo", &url, "key-1").await;
    renew_on_request(&sidecar, &url);
    let (status, body) = post(
        &sidecar,
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        &body[..],
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        "the same body was replayed"
    );
    assert_eq!(*seen.lock().unwrap(), ["key-1", "key-2"]);
}

#[tokio::test]
async fn without_a_new_credential_the_upstreams_401_reaches_the_agent() {
    let (url, seen) = upstream().await;
    let sidecar = common::sidecar("demo", &url, "key-1").await;
    let (status, _) = post(&sidecar, b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(*seen.lock().unwrap(), ["key-1"]);
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_never_replayed() {
    let (url, seen) = upstream().await;
    let sidecar = common::sidecar("demo", &url, "key-1").await;
    renew_on_request(&sidecar, &url);
    let (status, _) = post(&sidecar, vec![b'x'; (1 << 20) + 1]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(*seen.lock().unwrap(), ["key-1"]);
}

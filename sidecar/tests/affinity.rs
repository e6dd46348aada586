//! Each HTTP/1 agent connection keeps its own upstream connections: requests of one agent connection
//! reuse them (one per upstream), two agent connections never share one, and a connection the
//! upstream closed is replaced.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};

mod common;

/// An upstream that answers with the number of the connection the request came on, and closes the
/// connection after answering when asked to (`/close`).
async fn upstream() -> (String, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let answer = move |request: Request<Incoming>| async move {
                    assert_eq!(request.headers()["x-api-key"], "key");
                    let mut response = Response::new(Full::new(Bytes::from(number.to_string())));
                    if request.uri().path().ends_with("/close") {
                        response
                            .headers_mut()
                            .insert("connection", "close".parse().unwrap());
                    }
                    Ok::<_, Infallible>(response)
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(answer))
                    .await;
            });
        }
    });
    (url, accepted)
}

async fn get(client: &reqwest::Client, url: String) -> String {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

#[tokio::test]
async fn an_agent_connection_keeps_its_own_upstream_connection() {
    let (upstream, accepted) = upstream().await;
    let sidecar = common::sidecar("demo", &upstream, "key").await;
    let url = |path: &str| format!("{}/demo{path}", sidecar.url);
    // reqwest keeps one connection per client for sequential requests.
    let first = reqwest::Client::builder().http1_only().build().unwrap();
    let second = reqwest::Client::builder().http1_only().build().unwrap();

    for _ in 0..3 {
        assert_eq!(get(&first, url("/a")).await, "1");
    }
    for _ in 0..3 {
        assert_eq!(
            get(&second, url("/a")).await,
            "2",
            "never the first agent's connection"
        );
    }
    assert_eq!(get(&first, url("/a")).await, "1");

    // The upstream closes the connection after this answer: the next request gets a new one.
    assert_eq!(get(&first, url("/close")).await, "1");
    assert_eq!(get(&first, url("/a")).await, "3");
    assert_eq!(get(&first, url("/a")).await, "3");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn one_agent_connection_keeps_a_connection_to_each_upstream_it_uses() {
    let (one, accepted_one) = upstream().await;
    let (two, accepted_two) = upstream().await;
    let store = mcp_credentials_sidecar::store::Store::new(["one".to_owned(), "two".to_owned()]);
    store.set("one", common::credential(&one, "key", "1", None));
    store.set("two", common::credential(&two, "key", "1", None));
    let sidecar = common::sidecar_with_store(store).await;
    let agent = reqwest::Client::builder().http1_only().build().unwrap();
    for _ in 0..3 {
        for name in ["one", "two"] {
            assert_eq!(get(&agent, format!("{}/{name}/a", sidecar.url)).await, "1");
        }
    }
    assert_eq!(accepted_one.load(Ordering::SeqCst), 1);
    assert_eq!(accepted_two.load(Ordering::SeqCst), 1);
}

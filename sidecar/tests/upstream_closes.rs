//! Upstreams that end their connections under load (issue 17): nginx sends an HTTP/2 GOAWAY after
//! 1,000 requests on a connection, HTTP/2 servers refuse streams (`REFUSED_STREAM`), and HTTP/1.1
//! servers close keep-alive connections after some requests. A request the upstream never received
//! is sent again on another connection, so the agent never sees a 502 for it, and every request
//! reaches the upstream exactly once (counted there, by its unique body).

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use mcp_credentials_sidecar::{
    metrics::Metrics,
    proxy::{self, ClientSettings, Proxy},
    serve,
    store::Store,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};

mod common;

/// How many times the upstream received each request body.
type Received = Arc<Mutex<HashMap<Bytes, u32>>>;

fn count(received: &Received, body: Bytes) {
    *received.lock().unwrap().entry(body).or_default() += 1;
}

/// A TLS acceptor offering `alpn`, and the CA file that makes the sidecar trust it.
fn tls(alpn: &[&[u8]], tag: &str) -> (tokio_rustls::TlsAcceptor, PathBuf) {
    mcp_credentials_sidecar::install_crypto_provider();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca_file = std::env::temp_dir().join(format!("mcp-sidecar-closes-{tag}-{}.pem", std::process::id()));
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certified.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der())),
            )
            .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca_file)
}

/// A server's TCP connection that closes the way nginx's `lingering_close` does: after its FIN it
/// reads and drops what the client still sends, until the client closes too. A socket closed with
/// unread bytes resets the connection, and the client then loses the frames it had not read yet
/// (the GOAWAY saying which streams were not processed among them): the proxy could no longer
/// tell that those requests were not processed.
struct Lingering(Option<tokio::net::TcpStream>);

impl Drop for Lingering {
    fn drop(&mut self) {
        if let Some(mut tcp) = self.0.take() {
            tokio::spawn(async move {
                let _ = tcp.shutdown().await;
                let mut sink = [0; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    while matches!(tcp.read(&mut sink).await, Ok(1..)) {}
                })
                .await;
            });
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().unwrap()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.0.as_mut().unwrap()).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().unwrap()).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().unwrap()).poll_shutdown(cx)
    }
}

/// How an HTTP/2 upstream ends its streams and connections.
#[derive(Clone, Copy)]
struct H2Behaviour {
    /// After this many requests on a connection it sends GOAWAY (graceful: the streams it names as
    /// processed are answered, later ones are not).
    goaway_after: usize,
    /// Every this-many-th stream is reset with `REFUSED_STREAM` before anything of it is read.
    refuse_every: Option<usize>,
    /// Whether a request already refused (by its path and query) may be refused again: when not,
    /// each request is refused at most once, so that the bounded resends always suffice.
    refuse_again: bool,
}

/// An HTTPS upstream speaking only HTTP/2 (raw `h2`, so GOAWAY and refusals are explicit), echoing
/// each request body. Returns its URL, the counts, the CA file and how many streams were opened.
async fn h2_upstream(behaviour: H2Behaviour, tag: &str) -> (String, Received, PathBuf, Arc<AtomicUsize>) {
    let (acceptor, ca_file) = tls(&[b"h2"], tag);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let received = Received::default();
    let counts = received.clone();
    let opened = Arc::new(AtomicUsize::new(0));
    let all_streams = opened.clone();
    let refused = Arc::new(Mutex::new(HashSet::new()));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counts = counts.clone();
            let all_streams = all_streams.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(Lingering(Some(tcp))).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                let mut streams = 0;
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    streams += 1;
                    all_streams.fetch_add(1, Ordering::SeqCst);
                    if behaviour.refuse_every.is_some_and(|k| streams % k == 0)
                        && (refused.lock().unwrap().insert(request.uri().to_string())
                            || behaviour.refuse_again)
                    {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let counts = counts.clone();
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut data = Vec::new();
                        while let Some(chunk) = body.data().await {
                            let Ok(chunk) = chunk else { return };
                            let _ = body.flow_control().release_capacity(chunk.len());
                            data.extend_from_slice(&chunk);
                        }
                        let data = Bytes::from(data);
                        count(&counts, data.clone());
                        let response = http::Response::builder()
                            .header("content-type", "text/plain")
                            .header("content-length", data.len())
                            .body(())
                            .unwrap();
                        if let Ok(mut send) = respond.send_response(response, data.is_empty()) {
                            let _ = send.send_data(data, true);
                        }
                    });
                    if streams == behaviour.goaway_after {
                        conn.graceful_shutdown();
                    }
                }
            });
        }
    });
    (url, received, ca_file, opened)
}

/// Serves HTTP/1.1 on `io`: requests with a `Content-Length` body, each echoed; the connection is
/// closed after `close_after` answers, the last one saying `Connection: close` (as nginx does at
/// `keepalive_requests`). An upstream that closes without saying so can cross a request already on
/// its way: that request may have been read (RFC 9112 §9.3.1 forbids sending a POST again then), so
/// it can cost a 502 on every path, and is not tested here.
async fn h1_connection(mut io: impl AsyncRead + AsyncWrite + Unpin, close_after: usize, counts: Received) {
    let mut read = Vec::new();
    for answered in 1..=close_after {
        let head_end = loop {
            if let Some(i) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut buf = [0; 8192];
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&read[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while read.len() < head_end + length {
            let mut buf = [0; 8192];
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
        let body = Bytes::copy_from_slice(&read[head_end..head_end + length]);
        read.drain(..head_end + length);
        count(&counts, body.clone());
        let close = if answered == close_after {
            "connection: close\r\n"
        } else {
            ""
        };
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{close}\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        if io.write_all(&answer).await.is_err() {
            return;
        }
    }
    let _ = io.shutdown().await;
}

/// A plain-http HTTP/1.1 upstream closing each connection after `close_after` answers.
async fn h1_upstream(close_after: usize) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Received::default();
    let counts = received.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(h1_connection(tcp, close_after, counts.clone()));
        }
    });
    (url, received)
}

/// An HTTPS upstream speaking only HTTP/1.1 (the pool's HTTP/1 connections), closing each
/// connection after `close_after` answers.
async fn h1_tls_upstream(close_after: usize, tag: &str) -> (String, Received, PathBuf) {
    let (acceptor, ca_file) = tls(&[b"http/1.1"], tag);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let received = Received::default();
    let counts = received.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    h1_connection(tls, close_after, counts).await;
                }
            });
        }
    });
    (url, received, ca_file)
}

/// A sidecar for `upstream` trusting `ca_file`, with the fast path on or off.
async fn sidecar(
    upstream: &str,
    ca_file: Option<PathBuf>,
    http1_fast_path: bool,
) -> (String, watch::Sender<bool>) {
    let (url, stop, _) = sidecar_with_metrics(upstream, ca_file, http1_fast_path).await;
    (url, stop)
}

/// [`sidecar`], and its metrics.
async fn sidecar_with_metrics(
    upstream: &str,
    ca_file: Option<PathBuf>,
    http1_fast_path: bool,
) -> (String, watch::Sender<bool>, Metrics) {
    mcp_credentials_sidecar::install_crypto_provider();
    let store = Store::new(["up".to_owned()]);
    store.set("up", common::credential(upstream, "key", "1", None));
    let client = proxy::upstream_client(&ClientSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(30),
        extra_ca_file: ca_file,
    })
    .unwrap();
    let metrics = Metrics::register();
    let app = proxy::app(Proxy {
        store,
        client,
        metrics: metrics.clone(),
        max_header_bytes: 65536,
        header_read_timeout: Duration::from_secs(60),
        http1_fast_path,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/up/mcp", listener.local_addr().unwrap());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(listener, app, stopped));
    (url, stop, metrics)
}

/// Sends `workers` × `each` POSTs (each worker on its own keep-alive connection to the sidecar,
/// one request after the other) and checks every answer and the upstream's counts.
async fn drive(url: &str, received: &Received, workers: usize, each: usize) {
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let mut failures = Vec::new();
            for i in 0..each {
                let body = format!(r#"{{"jsonrpc":"2.0","id":"{worker}-{i}","method":"tools/list"}}"#);
                // A query naming the request, so that an upstream can tell it from the others.
                let response = client
                    .post(format!("{url}?{worker}-{i}"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let text = response.text().await.unwrap();
                if status != 200 || text != body {
                    failures.push(format!("{worker}-{i}: {status} {text}"));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        workers * each,
        &failures[..failures.len().min(5)]
    );
    let received = received.lock().unwrap();
    let twice: Vec<_> = received.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "requests the upstream received more than once: {twice:?}"
    );
    assert_eq!(
        received.len(),
        workers * each,
        "every request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_sending_goaway_under_load_costs_no_request() {
    let behaviour = H2Behaviour {
        goaway_after: 20,
        refuse_every: None,
        refuse_again: false,
    };
    let (upstream, received, ca_file, _) = h2_upstream(behaviour, "goaway").await;
    let (url, _stop) = sidecar(&upstream, Some(ca_file.clone()), true).await;
    drive(&url, &received, 24, 50).await;
    std::fs::remove_file(&ca_file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_http2_streams_are_sent_again() {
    let behaviour = H2Behaviour {
        goaway_after: 0,
        refuse_every: Some(5),
        refuse_again: false,
    };
    let (upstream, received, ca_file, opened) = h2_upstream(behaviour, "refused").await;
    let (url, _stop, metrics) = sidecar_with_metrics(&upstream, Some(ca_file.clone()), true).await;
    drive(&url, &received, 8, 25).await;
    let resends = metrics
        .upstream_resends
        .with_label_values(&["up", "refused_stream"])
        .get();
    let opened = opened.load(Ordering::SeqCst) as u64;
    assert!(resends > 0, "streams were refused");
    assert_eq!(
        resends,
        opened - 200,
        "every stream but the first of each request was a resend"
    );
    std::fs::remove_file(&ca_file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_http1_upstream_closing_pooled_connections_costs_no_request() {
    let (upstream, received, ca_file) = h1_tls_upstream(10, "h1").await;
    let (url, _stop) = sidecar(&upstream, Some(ca_file.clone()), true).await;
    drive(&url, &received, 8, 40).await;
    std::fs::remove_file(&ca_file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http1_upstream_closing_connections_costs_no_request_on_the_fast_path() {
    let (upstream, received) = h1_upstream(10).await;
    let (url, _stop) = sidecar(&upstream, None, true).await;
    drive(&url, &received, 8, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http1_upstream_closing_connections_costs_no_request_on_the_hyper_path() {
    let (upstream, received) = h1_upstream(10).await;
    let (url, _stop) = sidecar(&upstream, None, false).await;
    drive(&url, &received, 8, 40).await;
}

/// An upstream refusing every stream: a request whose body the sidecar kept goes out three times
/// (two resends, counted), then the agent gets the 502; one whose body streams (chunked: not kept,
/// and part of it may be gone) goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_bounded_and_a_streamed_body_is_not_sent_again() {
    let behaviour = H2Behaviour {
        goaway_after: 0,
        refuse_every: Some(1),
        refuse_again: true,
    };
    let (upstream, _, ca_file, opened) = h2_upstream(behaviour, "always").await;
    let (url, _stop, metrics) = sidecar_with_metrics(&upstream, Some(ca_file.clone()), true).await;
    let response = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(opened.load(Ordering::SeqCst), 3, "sent once and again twice");
    let resends = metrics
        .upstream_resends
        .with_label_values(&["up", "refused_stream"]);
    assert_eq!(resends.get(), 2);

    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut agent = tokio::net::TcpStream::connect(&address).await.unwrap();
    agent
        .write_all(
            format!(
                "POST /up/mcp HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
                 transfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    agent.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        opened.load(Ordering::SeqCst),
        4,
        "the streamed request went out once"
    );
    assert_eq!(resends.get(), 2, "and was not sent again");
    std::fs::remove_file(&ca_file).unwrap();
}

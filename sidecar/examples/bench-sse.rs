//! The benchmark's SSE client: `bench-sse <url>` reads the stream of `bench-upstream /sse` and prints
//! the per-event latency (receive time minus the send time in the event) as `p50_us p99_us max_us events`.
//! An `https://` URL is verified against the CA in the PEM file `$BENCH_CA`.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rustls_pki_types::{CertificateDer, pem::PemObject};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::args().nth(1).expect("usage: bench-sse <url>");
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(ca) = std::env::var("BENCH_CA") {
        for cert in CertificateDer::pem_file_iter(&ca).expect("read $BENCH_CA") {
            roots
                .add(cert.expect("parse $BENCH_CA"))
                .expect("a CA certificate");
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let request = hyper::Request::get(url)
        .header("accept", "text/event-stream")
        .header("x-api-key", "bench-key")
        .body(Empty::new())
        .unwrap();
    let mut body = client.request(request).await.expect("connect").into_body();
    let mut latencies = Vec::new();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("stream").into_data() else {
            continue;
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        pending.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if let Some(sent) = event
                .trim()
                .strip_prefix("data: ")
                .and_then(|s| s.parse::<u128>().ok())
            {
                latencies.push((now.saturating_sub(sent) / 1000) as u64);
            }
        }
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "{} {} {} {}",
        at(0.5),
        at(0.99),
        latencies.last().unwrap(),
        latencies.len()
    );
}

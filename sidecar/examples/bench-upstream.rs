//! The benchmark's upstream: answers `ok` only when `X-API-Key: bench-key` arrived (so every proxy
//! is proven to inject the header), and `/sse?n=<events>&ms=<interval>` streams events whose data is
//! the send time in Unix nanoseconds, for per-event latency.
//! `bench-upstream <addr> [<threads>] [--tls <cert.pem> <key.pem> <h1|h2>]`: with `--tls`, TLS 1.3
//! only (session resumption on, rustls' defaults), offering HTTP/1.1 by ALPN, or HTTP/2 first with `h2`.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::{TlsAcceptor, rustls};

type Body = BoxBody<Bytes, Infallible>;

async fn handle(request: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    if request
        .headers()
        .get("x-api-key")
        .is_none_or(|k| k != "bench-key")
    {
        return Ok(Response::builder()
            .status(401)
            .body(Full::from("no key\n").boxed())
            .unwrap());
    }
    if request.uri().path().ends_with("/sse") {
        let query = request.uri().query().unwrap_or_default().to_owned();
        let param = |name: &str, default: u64| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(default)
        };
        let (n, ms) = (param("n", 100), param("ms", 10));
        let events = stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {now}\n\n")))),
                i + 1,
            ))
        });
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .header("x-accel-buffering", "no")
            .body(BodyExt::boxed(StreamBody::new(events)))
            .unwrap());
    }
    Ok(Response::new(Full::from("ok\n").boxed()))
}

/// The TLS acceptor of `--tls <cert> <key> <h1|h2>`.
fn acceptor(cert: &str, key: &str, alpn: &str) -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(cert)
        .expect("read the certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse the certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("read the key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
    config.alpn_protocols = match alpn {
        "h2" => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        "h1" => vec![b"http/1.1".to_vec()],
        other => panic!("--tls takes h1 or h2, not {other}"),
    };
    TlsAcceptor::from(Arc::new(config))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (positional, tls) = match args.iter().position(|a| a == "--tls") {
        Some(i) => {
            let [cert, key, alpn] = &args[i + 1..] else {
                panic!("usage: bench-upstream <addr> [<threads>] [--tls <cert> <key> <h1|h2>]");
            };
            (&args[..i], Some(acceptor(cert, key, alpn)))
        }
        None => (&args[..], None),
    };
    let addr = positional
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:18080".into());
    let threads = positional.get(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    Some(tls) => match tls.accept(tcp).await {
                        Ok(stream) => {
                            server
                                .serve_connection(TokioIo::new(stream), service_fn(handle))
                                .await
                        }
                        Err(_) => return,
                    },
                    None => {
                        server
                            .serve_connection(TokioIo::new(tcp), service_fn(handle))
                            .await
                    }
                };
            });
        }
    });
}

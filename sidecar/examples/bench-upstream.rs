//! The benchmark's upstream: answers `ok` only when `X-API-Key: bench-key` arrived (so every proxy
//! is proven to inject the header), and `/sse?n=<events>&ms=<interval>` streams events whose data is
//! the send time in Unix nanoseconds, for per-event latency. `bench-upstream <addr> [<threads>]`.

use std::{
    convert::Infallible,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};

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

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18080".into());
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(2);
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
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(handle))
                    .await;
            });
        }
    });
}

//! One way to serve an HTTP listener that anyone on the network may reach (the operator's webhook,
//! metrics and JWKS, the sidecar's admin and probe ports): a bounded number of connections, a
//! deadline for the TLS handshake and for every request head, and idle connections closed. Without
//! these, idle or half-sent connections pile up until the process runs out of memory.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper::{Request, Response, body::Incoming, service::Service};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
    time::Instant,
};

/// How much a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once. At the cap, a new connection evicts the oldest one that has no
    /// request in flight (idle or still sending its head, as nginx reuses idle connections), or is
    /// closed when every connection is busy.
    pub max_connections: usize,
    /// A request head (HTTP/1) must arrive within this long of the connection opening or of the
    /// previous answer: slow-loris protection, and the keep-alive limit of HTTP/1 connections.
    pub header_read_timeout: Duration,
    /// The TLS handshake (or whatever `handshake` does) must finish within this long.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 with GOAWAY), and so
    /// is one that has not even said which protocol it speaks.
    pub idle_timeout: Duration,
}

/// The peer of a connection, put in every request's extensions (for per-client rate limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// Serves `service` on `listener` within `limits` until `shutdown` resolves, then lets the open
/// connections finish their requests (HTTP/1 and HTTP/2, as the client chooses). `handshake` turns
/// an accepted TCP connection into the stream HTTP runs on (TLS, or the connection itself); `None`
/// closes it.
pub async fn serve<H, HF, IO, S, B>(
    listener: TcpListener,
    limits: Limits,
    handshake: H,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(TcpStream) -> HF,
    HF: Future<Output = Option<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let open = Arc::new(Open::default());
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // At the cap: make room by closing the oldest connection that is doing nothing.
            Err(_) if open.evict_oldest_idle() => {
                match tokio::time::timeout(Duration::from_secs(1), permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => continue,
                }
            }
            Err(_) => {
                tracing::debug!(%peer, max, "connection limit reached; connection closed");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = open.add();
        let handshaking = handshake(tcp);
        let (builder, service, open, mut stopping) =
            (builder.clone(), service.clone(), open.clone(), stopping.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let guard = Registered {
                open: &open,
                conn: &conn,
            };
            let Ok(Some(io)) = tokio::time::timeout(limits.handshake_timeout, handshaking).await else {
                return;
            };
            let service = Tracked {
                inner: service,
                conn: conn.clone(),
                peer: Peer(peer),
            };
            let http = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(http);
            tokio::select! {
                _ = http.as_mut() => return,
                // Evicted to make room: it has nothing in flight, so nothing is lost.
                () = conn.evicted.notified() => return,
                () = conn.idle_for(limits.idle_timeout) => {}
                _ = stopping.wait_for(|s| *s) => {}
            }
            // Idle or stopping: HTTP/1 closes once the answer in flight is written, HTTP/2 says GOAWAY.
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_read_timeout, http).await;
            drop(guard);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it is done.
    let _ = permits.acquire_many(max as u32).await;
}

/// A failed accept: a connection reset before it was accepted is nothing; anything else (out of
/// file descriptors) is logged, and accepting pauses so the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The open connections, oldest first.
#[derive(Default)]
struct Open {
    next: AtomicUsize,
    conns: Mutex<BTreeMap<usize, Arc<Conn>>>,
}

impl Open {
    fn add(&self) -> Arc<Conn> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            evicted: Notify::new(),
        });
        self.conns
            .lock()
            .expect("connections lock")
            .insert(id, conn.clone());
        conn
    }

    /// Tells the oldest connection with no request in flight to close; false when all are busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut conns = self.conns.lock().expect("connections lock");
        let Some(id) = conns
            .values()
            .find(|c| c.in_flight.load(Ordering::Relaxed) == 0)
            .map(|c| c.id)
        else {
            return false;
        };
        if let Some(conn) = conns.remove(&id) {
            conn.evicted.notify_one();
        }
        true
    }
}

/// Removes a connection from [`Open`] when its task ends.
struct Registered<'a> {
    open: &'a Open,
    conn: &'a Arc<Conn>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.open
            .conns
            .lock()
            .expect("connections lock")
            .remove(&self.conn.id);
    }
}

/// One connection's activity.
struct Conn {
    id: usize,
    in_flight: AtomicUsize,
    /// When the connection opened or its last request was answered.
    last_active: Mutex<Instant>,
    evicted: Notify,
}

impl Conn {
    /// Resolves once the connection has had nothing in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let since = *self.last_active.lock().expect("activity lock");
            tokio::time::sleep_until(since + idle).await;
            let now_since = *self.last_active.lock().expect("activity lock");
            if self.in_flight.load(Ordering::Relaxed) == 0 && now_since == since {
                return;
            }
        }
    }
}

/// The service, counting the requests in flight on its connection and telling it the peer.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
    peer: Peer,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer);
        self.conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let done = InFlight(self.conn.clone());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(done);
            answer
        })
    }
}

/// One request in flight; its end (answered or cancelled) makes the connection idle again.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_active.lock().expect("activity lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_idle_connection_makes_room_and_a_busy_one_is_kept() {
        let open = Open::default();
        let (a, b) = (open.add(), open.add());
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        assert!(open.evict_oldest_idle());
        assert!(open.conns.lock().unwrap().contains_key(&a.id));
        assert!(!open.conns.lock().unwrap().contains_key(&b.id));
        assert!(!open.evict_oldest_idle(), "only a busy connection is left");
    }
}

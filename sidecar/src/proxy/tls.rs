//! TLS to upstreams, one connector for both paths: rustls with the client's trust roots, `h2` and
//! `http/1.1` offered by ALPN, the handshake bounded by the connect timeout.
//!
//! The pool (hyper's client) connects through [`UpstreamConnector`]. The HTTP/1.1 fast path opens
//! its own connections with [`UpstreamConnector::connect_own`]: an upstream that answers `http/1.1`
//! (or nothing) is spoken to on the fast path; one that picks HTTP/2 is remembered, its fresh
//! connection is left for the pool (whose next connect to that upstream takes it, so no handshake is
//! wasted), and its requests go to the pool, which multiplexes them.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use http::{
    Uri,
    uri::{Authority, Scheme},
};
use hyper_util::{
    client::legacy::connect::{Connected as PoolConnected, Connection, HttpConnector},
    rt::TokioIo,
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tower::ServiceExt;

use super::UpstreamError;

/// A TLS connection to an upstream.
type Tls = Box<TlsStream<TcpStream>>;

/// A connection to an upstream: plain TCP, or TLS over it.
pub(crate) enum OwnIo {
    Plain(TcpStream),
    Tls(Tls),
}

/// What the fast path's connect gave.
pub(crate) enum Connected {
    Io(OwnIo),
    /// The upstream speaks HTTP/2: the request (never sent) belongs to the pool.
    Http2,
}

/// A connection left by the fast path for the pool is taken only this fresh.
const PARKED_FOR: Duration = Duration::from_secs(10);

/// Connects to upstreams, for the pool (as a `Service<Uri>`) and for the fast path.
#[derive(Clone)]
pub(crate) struct UpstreamConnector {
    tcp: HttpConnector,
    tls: TlsConnector,
    handshake_timeout: Duration,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Upstreams that chose HTTP/2; never asked again in this process.
    http2: RwLock<HashSet<Authority>>,
    /// At most one fresh HTTP/2 connection per upstream, opened by the fast path, for the pool.
    parked: Mutex<HashMap<Authority, (Instant, Tls)>>,
}

impl UpstreamConnector {
    /// `tcp` connects (timeout, `TCP_NODELAY`, any scheme); `tls` holds the trust roots and versions.
    pub(crate) fn new(
        tcp: HttpConnector,
        mut tls: rustls::ClientConfig,
        handshake_timeout: Duration,
    ) -> Self {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        UpstreamConnector {
            tcp,
            tls: TlsConnector::from(Arc::new(tls)),
            handshake_timeout,
            shared: Arc::default(),
        }
    }

    /// Whether `authority` chose HTTP/2 (its requests belong to the pool).
    pub(crate) fn is_http2(&self, authority: &Authority) -> bool {
        self.shared.http2.read().is_ok_and(|set| set.contains(authority))
    }

    /// A TCP connection to `scheme://authority` (the scheme gives the default port).
    pub(crate) async fn tcp(
        &self,
        scheme: Scheme,
        authority: &Authority,
    ) -> Result<TcpStream, UpstreamError> {
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        Ok(self.tcp.clone().oneshot(uri).await?.into_inner())
    }

    /// A new connection for the fast path.
    pub(crate) async fn connect_own(
        &self,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Connected, UpstreamError> {
        if *scheme != Scheme::HTTPS {
            return Ok(Connected::Io(OwnIo::Plain(
                self.tcp(Scheme::HTTP, authority).await?,
            )));
        }
        if self.is_http2(authority) {
            return Ok(Connected::Http2);
        }
        let (tls, http2) = self.handshake(authority).await?;
        if !http2 {
            return Ok(Connected::Io(OwnIo::Tls(tls)));
        }
        if let Ok(mut parked) = self.shared.parked.lock() {
            parked.insert(authority.clone(), (Instant::now(), tls));
        }
        Ok(Connected::Http2)
    }

    /// TCP then TLS to `authority`, the certificate checked for its host name (or address);
    /// `true` when the upstream chose HTTP/2 (then remembered).
    async fn handshake(&self, authority: &Authority) -> Result<(Tls, bool), UpstreamError> {
        let tcp = self.tcp(Scheme::HTTPS, authority).await?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())?;
        let tls = tokio::time::timeout(self.handshake_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| "the upstream's TLS handshake took longer than the connect timeout")??;
        let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        if http2 && let Ok(mut set) = self.shared.http2.write() {
            set.insert(authority.clone());
        }
        Ok((Box::new(tls), http2))
    }

    fn take_parked(&self, authority: &Authority) -> Option<Tls> {
        let (at, tls) = self.shared.parked.lock().ok()?.remove(authority)?;
        (at.elapsed() < PARKED_FOR).then_some(tls)
    }
}

/// A pool connection: HTTP/2 when the upstream chose it by ALPN.
pub(crate) struct PoolIo {
    io: TokioIo<OwnIo>,
    http2: bool,
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = PoolIo;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<PoolIo, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or("the upstream URI has no authority")?
                .clone();
            let (io, http2) = if uri.scheme() == Some(&Scheme::HTTPS) {
                match this.take_parked(&authority) {
                    Some(tls) => (OwnIo::Tls(tls), true),
                    None => {
                        let (tls, http2) = this.handshake(&authority).await?;
                        (OwnIo::Tls(tls), http2)
                    }
                }
            } else {
                (OwnIo::Plain(this.tcp(Scheme::HTTP, &authority).await?), false)
            };
            Ok(PoolIo {
                io: TokioIo::new(io),
                http2,
            })
        })
    }
}

impl Connection for PoolIo {
    fn connected(&self) -> PoolConnected {
        let connected = PoolConnected::new();
        if self.http2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for PoolIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PoolIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl OwnIo {
    /// Whether an idle connection can carry a request: nothing to read (a readable idle connection
    /// is closed, or holds stray bytes) and no error. Never waits.
    pub(crate) fn is_idle_and_open(&mut self) -> bool {
        match self {
            OwnIo::Plain(tcp) => {
                matches!(tcp.try_read(&mut [0; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // TLS records that carry no data (session tickets, key updates) are taken in by rustls
            // and leave the stream pending; data, close_notify, EOF or an error end it.
            OwnIo::Tls(tls) => {
                let mut byte = [0; 1];
                let mut buf = ReadBuf::new(&mut byte);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(tls.as_mut()).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for OwnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OwnIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            OwnIo::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for OwnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OwnIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            OwnIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OwnIo::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            OwnIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            OwnIo::Plain(tcp) => tcp.is_write_vectored(),
            OwnIo::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OwnIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            OwnIo::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OwnIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            OwnIo::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The scheme's default port, which the upstream's Host leaves out (as the pool's client does).
pub(crate) fn default_port(scheme: &Scheme) -> u16 {
    if *scheme == Scheme::HTTPS { 443 } else { 80 }
}

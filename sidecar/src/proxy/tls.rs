//! TLS to upstreams, one connector for both paths: rustls with the client's trust roots, the
//! handshake bounded by the connect timeout.
//!
//! The pool (hyper's client) connects through [`UpstreamConnector`], offering `h2` and `http/1.1`
//! by ALPN. The HTTP/1.1 fast path opens its own connections with
//! [`UpstreamConnector::connect_own`], offering `http/1.1` only, as nginx does: an HTTP/1.1 agent
//! connection's requests pass as bytes over it, at about a third of the instructions per request
//! of hyper's HTTP/2 client (`sidecar/bench/RESULTS.md`). An upstream that refuses that handshake
//! and picks HTTP/2 when offered both speaks only HTTP/2: it is remembered, and its requests go to
//! the pool.

use std::{
    collections::HashSet,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, RwLock},
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
    /// The upstream speaks only HTTP/2: the request (never sent) belongs to the pool.
    Http2,
}

/// Connects to upstreams, for the pool (as a `Service<Uri>`) and for the fast path.
#[derive(Clone)]
pub(crate) struct UpstreamConnector {
    tcp: HttpConnector,
    /// `h2` and `http/1.1`, for the pool.
    tls: TlsConnector,
    /// `http/1.1` only, for the fast path.
    tls_http1: TlsConnector,
    handshake_timeout: Duration,
    /// Upstreams that refused HTTP/1.1; not asked again in this process.
    http2_only: Arc<RwLock<HashSet<Authority>>>,
}

impl UpstreamConnector {
    /// `tcp` connects (timeout, `TCP_NODELAY`, any scheme); `tls` holds the trust roots and versions.
    pub(crate) fn new(
        tcp: HttpConnector,
        mut tls: rustls::ClientConfig,
        handshake_timeout: Duration,
    ) -> Self {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls_http1 = TlsConnector::from(Arc::new(tls.clone()));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        UpstreamConnector {
            tcp,
            tls: TlsConnector::from(Arc::new(tls)),
            tls_http1,
            handshake_timeout,
            http2_only: Arc::default(),
        }
    }

    /// Whether `authority` speaks only HTTP/2 (its requests belong to the pool).
    fn is_http2_only(&self, authority: &Authority) -> bool {
        self.http2_only.read().is_ok_and(|set| set.contains(authority))
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
        if self.is_http2_only(authority) {
            return Ok(Connected::Http2);
        }
        let refused = match self.handshake(&self.tls_http1, authority).await {
            Ok(tls) => return Ok(Connected::Io(OwnIo::Tls(tls))),
            Err(e) => e,
        };
        // An HTTP/2-only upstream ends the handshake with `no_application_protocol`, or just closes
        // (the alert is not always delivered). Asked again as the pool asks, an upstream that then
        // picks HTTP/2 is remembered for the pool; one that picks HTTP/1.1 (the first failure was
        // passing) is used here; one that fails again fails with the first error.
        match self.handshake(&self.tls, authority).await {
            Ok(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                if let Ok(mut set) = self.http2_only.write() {
                    set.insert(authority.clone());
                }
                Ok(Connected::Http2)
            }
            Ok(tls) => Ok(Connected::Io(OwnIo::Tls(tls))),
            Err(_) => Err(refused),
        }
    }

    /// TCP then TLS to `authority`, the certificate checked for its host name (or address).
    async fn handshake(&self, tls: &TlsConnector, authority: &Authority) -> Result<Tls, UpstreamError> {
        let tcp = self.tcp(Scheme::HTTPS, authority).await?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())?;
        match tokio::time::timeout(self.handshake_timeout, tls.connect(name, tcp)).await {
            Ok(tls) => Ok(Box::new(tls?)),
            Err(_) => Err("the upstream's TLS handshake took longer than the connect timeout".into()),
        }
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
                let tls = this.handshake(&this.tls, &authority).await?;
                let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                (OwnIo::Tls(tls), http2)
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

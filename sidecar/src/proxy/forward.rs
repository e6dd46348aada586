//! The last step: send the request to the upstream and stream the answer back. Bodies flow frame by
//! frame both ways; only a small request body is kept ([`replay::keep`]), so that the request can
//! go out again after a 401 or when the upstream did not process it ([`Resend`]). An HTTP/1 agent
//! connection keeps its own upstream connection for plain-http upstreams (no pool lookup, no task
//! per request, and MCP sessions stay on one connection); HTTPS upstreams share a pool (HTTP/2 by
//! ALPN). The HTTP/1.1 fast path keeps its own connections to both kinds, opened here too (see
//! [`super::tls`]).

use std::{
    error::Error as StdError,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, Version, header, uri::Scheme};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use mcp_credentials_core::{
    process::ErrorChain,
    report::{Reason, Rejection},
};
use prometheus::IntCounterVec;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::time::Instant;

use super::{
    Local, Proxy, Routed,
    measure::Handles,
    own, replay, route,
    sse::{self, EndpointRewrite},
    strip::strip_answer_headers,
    tls::{Connected, UpstreamConnector},
};
use crate::{credential::Credential, error::ProxyError};

/// Why an upstream exchange failed (logged, never sent to the agent).
pub type UpstreamError = Box<dyn StdError + Send + Sync>;

/// The client to every upstream: a pool (HTTP/1.1 and HTTP/2 by ALPN) and the plain TCP connector
/// that agent connections use for their own upstream connections.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Client<UpstreamConnector, Body>,
    connector: UpstreamConnector,
    idle_timeout: Duration,
}

/// The connection behind an [`Own`], driven by the agent connection's task.
pub(crate) type OwnConnection = http1::Connection<hyper_util::rt::TokioIo<tokio::net::TcpStream>, Body>;

/// An agent connection's own HTTP/1.1 connection to a plain-http upstream.
pub(crate) struct Own {
    authority: http::uri::Authority,
    host: HeaderValue,
    sender: http1::SendRequest<Body>,
    /// When its last request started (an idle period is at least as long as measured from there).
    last_used: Instant,
}

impl own::Own for Own {
    fn last_used(&self) -> Instant {
        self.last_used
    }
}

/// Settings of the upstream client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Close pooled connections idle this long.
    pub pool_idle_timeout: Duration,
    /// A PEM file of extra CA certificates to trust besides the system roots.
    pub extra_ca_file: Option<PathBuf>,
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The extra CA file could not be read or parsed.
    #[error("cannot read the extra CA certificates from {path}")]
    ExtraCa {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate was rejected by rustls.
    #[error("the extra CA file {path} holds a certificate rustls rejects")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// No trust root at all: no system roots and no extra CA.
    #[error("no CA certificates: the system has none and no extra CA file is set")]
    NoRoots,
    /// The TLS configuration was refused.
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// Builds the client: rustls with the system roots plus `extra_ca_file`, HTTP/2 by ALPN.
pub fn upstream_client(settings: &ClientSettings) -> Result<UpstreamClient, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped: the extra CA may be all this deployment needs.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &settings.extra_ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| ClientError::ExtraCa {
                path: path.clone(),
                source,
            })?;
        for cert in certs {
            roots.add(cert).map_err(|source| ClientError::BadCa {
                path: path.clone(),
                source,
            })?;
        }
    }
    if roots.is_empty() {
        return Err(ClientError::NoRoots);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    let connector = UpstreamConnector::new(http, tls, settings.connect_timeout);
    let pool = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector.clone());
    Ok(UpstreamClient {
        pool,
        connector,
        idle_timeout: settings.pool_idle_timeout,
    })
}

impl UpstreamClient {
    /// Sends `request` (absolute URI): on the agent connection's own upstream connection when there is
    /// `local` state and the upstream is plain http, otherwise through the pool. A request the
    /// upstream provably did not process is sent again (see [`Resend`]).
    async fn send(
        &self,
        local: Option<&Mutex<Local>>,
        request: Request<Body>,
        now: Instant,
        resend: &Resend<'_>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        match local {
            Some(local) if request.uri().scheme() == Some(&Scheme::HTTP) => {
                self.send_own(local, request, now, resend).await
            }
            _ => Box::pin(self.send_pooled(request, resend)).await,
        }
    }

    /// Sends `request` through the pool, and again on another stream or connection (at most
    /// [`RESENDS`] times) while the failure proves that the upstream did not process it (see
    /// [`unprocessed`]): an HTTP/2 upstream ending its connection (GOAWAY: nginx does after 1,000
    /// requests) or refusing the stream, or a connection that closed before the request was started
    /// on it. The pool itself already sends again what it never started on a reused connection.
    async fn send_pooled(
        &self,
        mut request: Request<Body>,
        resend: &Resend<'_>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        // A body that streams is not kept: part of it may be gone already and it cannot be read
        // again, so whatever happens to it stands (the agent gets a 502 and may retry itself).
        let Some(body) = resend.body else {
            return Ok(self.pool.request(request).await?);
        };
        let head = (
            request.method().clone(),
            request.uri().clone(),
            request.headers().clone(),
        );
        let mut resends = 0;
        loop {
            match self.pool.request(request).await {
                Ok(response) => return Ok(response),
                Err(e) => match unprocessed(&e) {
                    Some(reason) if resends < RESENDS => {
                        tracing::debug!(credential = %resend.credential, error = %ErrorChain(&e), reason, "the upstream did not process the request; sending it again");
                        resend.count(reason);
                        resends += 1;
                        request = Request::new(Body::from(body.clone()));
                        *request.method_mut() = head.0.clone();
                        *request.uri_mut() = head.1.clone();
                        *request.headers_mut() = head.2.clone();
                    }
                    _ => return Err(e.into()),
                },
            }
        }
    }

    async fn send_own(
        &self,
        local: &Mutex<Local>,
        request: Request<Body>,
        now: Instant,
        resend: &Resend<'_>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        let authority = uri.authority.take().ok_or("the upstream URI has no authority")?;
        // HTTP/1.1 sends the origin form and the upstream's Host.
        parts.uri = Uri::from(uri.path_and_query.take().ok_or("the upstream URI has no path")?);
        let reusable = {
            let mut local = local.lock().expect("connection state");
            own::take(
                &mut local.upstream,
                |own| own.authority == authority,
                now,
                self.idle_timeout,
            )
        };
        let mut request = Request::from_parts(parts, body);
        let mut own = match reusable {
            Some(mut own) => match own.sender.ready().await {
                Ok(()) => {
                    request.headers_mut().insert(header::HOST, own.host.clone());
                    match own.sender.try_send_request(request).await {
                        Ok(response) => return Ok(keep(local, own, response, now)),
                        // The upstream closed the idle connection before reading the request: it
                        // was never sent, so it goes out once more on a new connection.
                        Err(mut e) => match e.take_message() {
                            Some(unsent) => {
                                resend.count(NOT_SENT);
                                request = unsent;
                            }
                            None => return Err(e.into_error().into()),
                        },
                    }
                    Box::pin(self.connect(local, authority)).await?
                }
                Err(_) => Box::pin(self.connect(local, authority)).await?,
            },
            None => Box::pin(self.connect(local, authority)).await?,
        };
        request.headers_mut().insert(header::HOST, own.host.clone());
        let response = own.sender.send_request(request).await?;
        Ok(keep(local, own, response, now))
    }

    /// How long an idle upstream connection is kept.
    pub(super) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// A TCP connection to a plain-http upstream, with the pool's connect timeout and `TCP_NODELAY`.
    pub(super) async fn connect_plain(
        &self,
        authority: &http::uri::Authority,
    ) -> Result<tokio::net::TcpStream, UpstreamError> {
        self.connector.tcp(Scheme::HTTP, authority).await
    }

    /// A connection of the HTTP/1.1 fast path's own: plain TCP, or TLS offering HTTP/2 and 1.1.
    pub(super) async fn connect_own(
        &self,
        scheme: &Scheme,
        authority: &http::uri::Authority,
    ) -> Result<Connected, UpstreamError> {
        self.connector.connect_own(scheme, authority).await
    }

    /// Opens a new connection; callers box this rare, large future so that every request's own
    /// future stays small (hyper moves it, and moving costs its size).
    /// The connection is driven by the agent connection's task (it joins `local`'s list).
    async fn connect(
        &self,
        local: &Mutex<Local>,
        authority: http::uri::Authority,
    ) -> Result<Own, UpstreamError> {
        let io = hyper_util::rt::TokioIo::new(self.connect_plain(&authority).await?);
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        {
            let mut local = local.lock().expect("connection state");
            local.driving.push(connection);
            local.opened = true;
        }
        let host = HeaderValue::from_str(host(&Scheme::HTTP, &authority))?;
        Ok(Own {
            authority,
            host,
            sender,
            last_used: Instant::now(),
        })
    }
}

/// How many times a request is sent again while the upstream did not process it: an upstream
/// refusing every attempt is failing, and the agent hears so.
const RESENDS: usize = 2;

/// The `reason` of a resend because the request was never started on its connection.
const NOT_SENT: &str = "not_sent";

/// What a request needs to be sent again, and where that is counted.
pub(super) struct Resend<'a> {
    /// The whole body, when it was kept in memory ([`replay::keep`]); without it only a request whose
    /// body hyper still holds, unsent, goes out again.
    pub body: Option<&'a Bytes>,
    /// The credential (a metric label).
    pub credential: &'a str,
    /// `upstream_resends_total`.
    pub counter: &'a IntCounterVec,
}

impl Resend<'_> {
    fn count(&self, reason: &str) {
        self.counter.with_label_values(&[self.credential, reason]).inc();
    }
}

/// Why `error` proves that the upstream never processed the request, so that sending it again
/// cannot run it twice, or `None` when it may have (a connection that closed after the request was
/// written, even partly, a timeout, an answer that broke off: never sent again):
/// - `not_sent`: hyper canceled the request before starting to write it (its connection closed
///   or was not ready);
/// - `refused_stream`: an HTTP/2 upstream reset the stream with `REFUSED_STREAM`, which says that
///   it did no processing (RFC 9113 §8.7);
/// - `goaway`: an HTTP/2 upstream's GOAWAY. h2 gives a stream the peer's GOAWAY only when the
///   stream's id is above the GOAWAY's last stream id, or when the stream was opened after it (a
///   stream at or below the last id keeps running, and fails with an I/O error if the connection
///   ends first); either way the upstream did not process it (RFC 9113 §6.8).
fn unprocessed(error: &(dyn StdError + 'static)) -> Option<&'static str> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            let refused = e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM);
            return match e.is_remote() {
                true if e.is_go_away() => Some("goaway"),
                true if refused => Some("refused_stream"),
                _ => None,
            };
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return Some(NOT_SENT);
        }
        cause = e.source();
    }
    None
}

/// The Host an upstream gets: like the pool's client, without the port when it is the default.
pub(super) fn host<'a>(scheme: &Scheme, authority: &'a http::uri::Authority) -> &'a str {
    match authority.port_u16() {
        Some(port) if port == super::tls::default_port(scheme) => authority.host(),
        _ => authority.as_str(),
    }
}

pub(super) async fn forward(
    proxy: &Proxy,
    local: Option<&Mutex<Local>>,
    handles: &Handles,
    routed: Routed,
    mut used: Arc<Credential>,
    request: Request<Body>,
) -> Response {
    let Routed {
        name,
        upstream_uri: Some(uri),
        ..
    } = routed
    else {
        return ProxyError::BadPath("it matches no route").into_response();
    };
    let (mut parts, body) = request.into_parts();
    // The agent's URI, for the legacy SSE transport's `endpoint` (resolved against the upstream path).
    let agent_uri = std::mem::replace(&mut parts.uri, uri);
    let is_get = parts.method == Method::GET;
    // The connection decides between HTTP/1.1 and HTTP/2; the agent's version says nothing about it.
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    // Small bodies are kept, so the request can be sent again after the upstream rejects the credential.
    let (body, kept) = match replay::keep(body).await {
        Ok(kept) => kept,
        Err(e) => return e.into_response(),
    };
    let again = kept.map(|bytes| (parts.method.clone(), parts.headers.clone(), bytes));
    let resend = Resend {
        body: again.as_ref().map(|(_, _, bytes)| bytes),
        credential: &name,
        counter: &proxy.metrics.upstream_resends,
    };
    let started = Instant::now();
    // Dropping this future (the agent went away) drops the upstream request: that is the cancellation.
    let result = proxy
        .client
        .send(local, http::Request::from_parts(parts, body), started, &resend)
        .await;
    handles.upstream_duration.observe(started.elapsed().as_secs_f64());
    let mut response = match result {
        Ok(response) => response,
        Err(source) => return ProxyError::Upstream { name, source }.into_response(),
    };
    let challenges = response.headers().get_all(header::WWW_AUTHENTICATE);
    let reason = rejection_reason(response.status(), || challenges.iter().map(HeaderValue::as_bytes));
    let scope = challenged_scope(reason, challenges.iter().map(HeaderValue::as_bytes));
    let newer = match reason {
        Some(reason) => replay::after_rejection(proxy, &name, &used, (reason, scope), again.is_some()).await,
        None => None,
    };
    if let (Some(newer), Some((method, mut headers, bytes))) = (newer, again) {
        // To the newer credential's upstream, which may have changed since the request was routed:
        // the first URI may name a host the newer credential was never meant for.
        let uri = match route::upstream_uri(&newer, &agent_uri) {
            Ok(uri) => uri,
            Err(e) => return e.into_response(),
        };
        for (header, _) in &used.headers {
            headers.remove(header);
        }
        for (header, value) in &newer.headers {
            headers.insert(header.clone(), value.clone());
        }
        let mut request = http::Request::new(Body::from(bytes.clone()));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        tracing::info!(credential = %name, version = %newer.version, "replaying once with the new credential");
        let resend = Resend {
            body: Some(&bytes),
            credential: &name,
            counter: &proxy.metrics.upstream_resends,
        };
        let result = Box::pin(proxy.client.send(local, request, Instant::now(), &resend)).await;
        response = match result {
            Ok(response) => response,
            Err(source) => return ProxyError::Upstream { name, source }.into_response(),
        };
        // The answer, and any legacy `endpoint` in it, is the newer credential's upstream's.
        used = newer;
    }
    let (mut parts, body) = response.into_parts();
    strip_answer_headers(&mut parts.headers);
    let is_sse = is_get
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| sse::is_event_stream(v.as_bytes()));
    // A GET stream may be the legacy HTTP+SSE transport: its `endpoint` event must point back
    // through the sidecar, resolved against the upstream path of this request.
    let body = match is_sse
        .then(|| route::upstream_uri(&used, &agent_uri).ok())
        .flatten()
    {
        Some(uri) => {
            // Rewriting changes the length (the fast path re-frames the stream as chunked too).
            parts.headers.remove(header::CONTENT_LENGTH);
            Body::new(
                EndpointRewrite::new(body, &name, used.upstream.clone(), uri.path().to_owned())
                    .counting(proxy.metrics.sse_events_too_large.with_label_values(&[&name])),
            )
        }
        None => Body::new(body),
    };
    Response::from_parts(parts, body)
}

/// Puts the connection back for the agent connection's next request (it is ready again once this
/// response's body has been read to the end).
fn keep(
    local: &Mutex<Local>,
    mut own: Own,
    response: http::Response<Incoming>,
    started: Instant,
) -> http::Response<Incoming> {
    own.last_used = started;
    own::put(&mut local.lock().expect("connection state").upstream, own);
    response
}

/// Why the upstream refused the credential, from its status and `WWW-Authenticate` values
/// (RFC 6750 §3.1); both paths use it.
pub(super) fn rejection_reason<'a, I: Iterator<Item = &'a [u8]>>(
    status: StatusCode,
    challenges: impl Fn() -> I,
) -> Option<Rejection> {
    Rejection::of(status.as_u16(), challenges)
}

/// The `scope` of a 403 `insufficient_scope` Bearer challenge (what a step-up asks for, SEP-2350);
/// `None` for any other rejection. Both paths use it.
pub(super) fn challenged_scope<'a>(
    reason: Option<Rejection>,
    challenges: impl Iterator<Item = &'a [u8]>,
) -> Option<String> {
    if reason != Some(Rejection::Curable(Reason::InsufficientScope)) {
        return None;
    }
    let values: Vec<&str> = challenges.filter_map(|v| std::str::from_utf8(v).ok()).collect();
    mcp_credentials_core::source::discovery::bearer_param(values, "scope")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_upstream_said_it_did_not_process_counts_as_unprocessed() {
        // h2 errors the sidecar made itself, even with the refusal's code, prove nothing.
        let local = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert_eq!(unprocessed(&local), None);
        let broken = std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "stream closed because of a broken pipe",
        );
        assert_eq!(unprocessed(&broken), None);
        let wrapped: UpstreamError = Box::new(broken);
        assert_eq!(unprocessed(wrapped.as_ref()), None);
    }
}

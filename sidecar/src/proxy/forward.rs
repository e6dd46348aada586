//! The last step: send the request to the upstream and stream the answer back. Bodies flow frame by
//! frame both ways; nothing is buffered. An HTTP/1 agent connection keeps its own upstream connection
//! for plain-http upstreams (no pool lookup, no task per request, and MCP sessions stay on one
//! connection); HTTPS upstreams share a pool (one TLS handshake, HTTP/2 by ALPN).

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
use http::{HeaderValue, Method, Request, StatusCode, Uri, Version, header, uri::Scheme};
use hyper::{body::Incoming, client::conn::http1};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use mcp_credentials_core::report::{Reason, Rejection};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::time::Instant;
use tower::ServiceExt;

use super::{
    Local, Proxy, Routed, measure::Handles, replay, route, sse::EndpointRewrite, strip::strip_answer_headers,
};
use crate::{credential::Credential, error::ProxyError};

/// Why an upstream exchange failed (logged, never sent to the agent).
pub type UpstreamError = Box<dyn StdError + Send + Sync>;

/// The client to every upstream: a pool (HTTP/1.1 and HTTP/2 by ALPN) and the plain TCP connector
/// that agent connections use for their own upstream connections.
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Client<HttpsConnector<HttpConnector>, Body>,
    tcp: HttpConnector,
    idle_timeout: Duration,
}

/// How many upstreams one agent connection keeps a connection to: an agent's HTTP client may send
/// requests for several credentials over one keep-alive connection to the sidecar.
pub(super) const MAX_OWN: usize = 8;

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
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http.clone());
    let pool = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    Ok(UpstreamClient {
        pool,
        tcp: http,
        idle_timeout: settings.pool_idle_timeout,
    })
}

impl UpstreamClient {
    /// Sends `request` (absolute URI): on the agent connection's own upstream connection when there is
    /// `local` state and the upstream is plain http, otherwise through the pool.
    async fn send(
        &self,
        local: Option<&Mutex<Local>>,
        request: Request<Body>,
        now: Instant,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        match local {
            Some(local) if request.uri().scheme() == Some(&Scheme::HTTP) => {
                self.send_own(local, request, now).await
            }
            _ => Ok(self.pool.request(request).await?),
        }
    }

    async fn send_own(
        &self,
        local: &Mutex<Local>,
        request: Request<Body>,
        now: Instant,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let (mut parts, body) = request.into_parts();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        let authority = uri.authority.take().ok_or("the upstream URI has no authority")?;
        // HTTP/1.1 sends the origin form and the upstream's Host.
        parts.uri = Uri::from(uri.path_and_query.take().ok_or("the upstream URI has no path")?);
        let reusable = {
            let mut local = local.lock().expect("connection state");
            let found = local.upstream.iter().position(|own| own.authority == authority);
            found
                .map(|i| local.upstream.swap_remove(i))
                .filter(|own| now.saturating_duration_since(own.last_used) < self.idle_timeout)
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
                            Some(unsent) => request = unsent,
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
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        Ok(self.tcp.clone().oneshot(uri).await?.into_inner())
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
        let host = HeaderValue::from_str(host(&authority))?;
        Ok(Own {
            authority,
            host,
            sender,
            last_used: Instant::now(),
        })
    }
}

/// The Host an upstream gets: like the pool's client, without the port when it is the default.
pub(super) fn host(authority: &http::uri::Authority) -> &str {
    match authority.port_u16() {
        Some(80) => authority.host(),
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
    let started = Instant::now();
    // Dropping this future (the agent went away) drops the upstream request: that is the cancellation.
    let result = proxy
        .client
        .send(local, http::Request::from_parts(parts, body), started)
        .await;
    handles.upstream_duration.observe(started.elapsed().as_secs_f64());
    let mut response = match result {
        Ok(response) => response,
        Err(source) => return ProxyError::Upstream { name, source }.into_response(),
    };
    let challenges = response.headers().get_all(header::WWW_AUTHENTICATE);
    let reason = rejection_reason(response.status(), || challenges.iter().map(HeaderValue::as_bytes));
    let scope = challenged_scope(reason, challenges.iter().map(HeaderValue::as_bytes));
    if let Some(reason) = reason {
        proxy
            .metrics
            .upstream_rejections
            .with_label_values(&[&name, reason.as_str()])
            .inc();
    }
    if let (Some(reason), Some((method, mut headers, bytes))) = (reason, again)
        && replay::worth_replaying(&proxy.store, &name, reason)
        && let Some(newer) = Box::pin(replay::newer_credential(
            &proxy.store,
            &name,
            &used,
            reason,
            scope,
        ))
        .await
    {
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
        let mut request = http::Request::new(Body::from(bytes));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        tracing::info!(credential = %name, version = %newer.version, "replaying once with the new credential");
        response = match Box::pin(proxy.client.send(local, request, Instant::now())).await {
            Ok(response) => response,
            Err(source) => return ProxyError::Upstream { name, source }.into_response(),
        };
        // The answer, and any legacy `endpoint` in it, is the newer credential's upstream's.
        used = newer;
    }
    let (mut parts, body) = response.into_parts();
    strip_answer_headers(&mut parts.headers);
    let is_sse = is_get
        && parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| {
            v.as_bytes()
                .trim_ascii_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
        });
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
    let upstream = &mut local.lock().expect("connection state").upstream;
    if upstream.len() == MAX_OWN {
        // The one used least recently goes (its connection closes).
        if let Some(oldest) = (0..upstream.len()).min_by_key(|&i| upstream[i].last_used) {
            upstream.swap_remove(oldest);
        }
    }
    upstream.push(own);
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

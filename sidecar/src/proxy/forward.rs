//! The handler at the bottom of the stack: send the request to the upstream with the pooled client
//! and stream the answer back. Bodies flow frame by frame both ways; nothing is buffered.

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use http::{HeaderMap, Method, StatusCode, Version, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::time::Instant;

use super::{Proxy, Routed, replay, sse::EndpointRewrite, strip::strip_connection_headers};
use crate::error::ProxyError;

/// The pooled HTTP/1.1 + HTTP/2 (ALPN) client to every upstream.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

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

/// Builds the pooled client: rustls with the system roots plus `extra_ca_file`, HTTP/2 by ALPN.
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
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

pub(super) async fn forward(State(proxy): State<Arc<Proxy>>, mut request: Request) -> Response {
    let Some(Routed {
        name,
        slot,
        upstream_uri: Some(uri),
    }) = request.extensions_mut().remove::<Routed>()
    else {
        return ProxyError::BadPath("it matches no route").into_response();
    };
    let (mut parts, body) = request.into_parts();
    // A GET stream may be the legacy HTTP+SSE transport; its relative `endpoint` resolves against this path.
    let get_path = (parts.method == Method::GET).then(|| uri.path().to_owned());
    parts.uri = uri;
    // The pooled connection decides between HTTP/1.1 and HTTP/2; the agent's version says nothing about it.
    parts.version = Version::HTTP_11;
    parts.extensions = Default::default();
    // Small bodies are kept, so the request can be sent again after the upstream rejects the credential.
    let (body, kept) = match replay::keep(body).await {
        Ok(kept) => kept,
        Err(e) => return e.into_response(),
    };
    let again = kept.map(|bytes| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
            bytes,
        )
    });
    let started = Instant::now();
    // Dropping this future (the agent went away) drops the upstream request: that is the cancellation.
    let result = proxy.client.request(http::Request::from_parts(parts, body)).await;
    proxy
        .metrics
        .upstream_duration
        .with_label_values(&[&name])
        .observe(started.elapsed().as_secs_f64());
    let mut response = match result {
        Ok(response) => response,
        Err(source) => return ProxyError::Upstream { name, source }.into_response(),
    };
    let reason = rejection_reason(response.status(), response.headers());
    if let Some(reason) = reason {
        proxy
            .metrics
            .upstream_rejections
            .with_label_values(&[&name, reason])
            .inc();
    }
    if let (true, Some((method, uri, mut headers, bytes)), Some(used)) =
        (replay::worth_replaying(reason), again, slot.current.as_ref())
        && let Some(newer) = replay::newer_credential(&proxy.store, &name, used, reason).await
    {
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
        response = match proxy.client.request(request).await {
            Ok(response) => response,
            Err(source) => return ProxyError::Upstream { name, source }.into_response(),
        };
    }
    let (mut parts, body) = response.into_parts();
    strip_connection_headers(&mut parts.headers);
    let is_sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
    let body = match (get_path, slot.current) {
        // The legacy transport's `endpoint` event must point back through the sidecar.
        (Some(path), Some(credential)) if is_sse => Body::new(EndpointRewrite::new(
            body,
            &name,
            credential.upstream.clone(),
            path,
        )),
        _ => Body::new(body),
    };
    Response::from_parts(parts, body)
}

/// Why the upstream refused the credential, from its status and `WWW-Authenticate` (RFC 6750 §3.1).
fn rejection_reason(status: StatusCode, headers: &HeaderMap) -> Option<&'static str> {
    if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
        return None;
    }
    let challenge = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    Some(if challenge.contains("invalid_token") {
        "invalid_token"
    } else if challenge.contains("insufficient_scope") {
        "insufficient_scope"
    } else {
        "other"
    })
}

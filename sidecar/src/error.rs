//! The one place that turns a refused or failed request into an HTTP response. Bodies are JSON an agent
//! (or a person reading its logs) can act on; they name the credential and the reason, never a token,
//! an upstream error's internals or a header value.

use std::sync::Arc;

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode};
use jiff::Timestamp;
use serde_json::json;

/// Header on every response the sidecar makes itself, so an agent can tell a sidecar 404 or 503 from
/// the upstream's own (MCP gives 404 a meaning: the session is gone).
pub const SIDECAR_ERROR_HEADER: &str = "x-mcp-credentials-error";

/// Why the sidecar answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The first path segment names no configured credential.
    #[error(
        "no credential is configured for this path; use /<credential>/<path> with one of the listed names"
    )]
    UnknownCredential {
        /// Every configured credential name.
        configured: Vec<String>,
    },
    /// The path could reach outside the upstream (dot segments, encoded slashes, backslashes).
    #[error("the request path is not allowed: {0}")]
    BadPath(&'static str),
    /// An absolute-form or authority-form request target (`GET http://host/ HTTP/1.1`, CONNECT).
    #[error("the sidecar is a reverse proxy for configured upstreams only; send origin-form requests")]
    NotAForwardProxy,
    /// The `Host` is not a loopback name: a web page reached the sidecar through DNS rebinding.
    #[error("the Host header must name this machine (127.0.0.1 or localhost)")]
    ForeignHost,
    /// The `Origin` is a web site: browsers must not reach the sidecar from other sites.
    #[error("requests from web origins other than this machine are refused")]
    ForeignOrigin,
    /// `Origin: null`: a sandboxed, `file:` or redirected page, which any web site can produce.
    #[error(
        "requests with Origin: null are refused: browsers send it from sandboxed and file: pages, which any web site can make"
    )]
    NullOrigin,
    /// A browser marked the request `Sec-Fetch-Site: cross-site` and it has no loopback `Origin`.
    #[error(
        "the browser marked this request cross-site (Sec-Fetch-Site): web pages of other sites must not reach the sidecar"
    )]
    CrossSite,
    /// TRACE or TRACK: the upstream would echo the request, attached credential included.
    #[error("{method} is refused: an upstream that honours it would echo the attached credential back")]
    MethodNotAllowed {
        /// The method, as its standard name.
        method: &'static str,
    },
    /// The agent's request body could not be read to the end.
    #[error("the request body could not be read")]
    RequestBody,
    /// The request headers exceed the configured limit.
    #[error("the request headers are larger than {limit} bytes")]
    HeadersTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The credential is configured but has never been loaded.
    #[error("credential {name} is not available yet")]
    CredentialUnavailable {
        /// The credential.
        name: Arc<str>,
        /// Why loading it failed, when known.
        last_failure: Option<Arc<str>>,
    },
    /// The current credential has expired and no newer one has arrived.
    #[error("credential {name} expired at {expired_at} and has not been renewed")]
    CredentialExpired {
        /// The credential.
        name: Arc<str>,
        /// When it expired.
        expired_at: Timestamp,
        /// Why the last refresh failed, when known.
        last_failure: Option<Arc<str>>,
    },
    /// The upstream could not be reached or broke the exchange before answering.
    #[error("the upstream of credential {name} could not be reached")]
    Upstream {
        /// The credential.
        name: Arc<str>,
        /// The cause, logged here and never sent to the agent.
        #[source]
        source: crate::proxy::UpstreamError,
    },
}

impl ProxyError {
    /// A short stable name, used as the JSON `error` and in metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ProxyError::UnknownCredential { .. } => "unknown_credential",
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::NotAForwardProxy => "not_a_forward_proxy",
            ProxyError::ForeignHost => "foreign_host",
            ProxyError::ForeignOrigin => "foreign_origin",
            ProxyError::NullOrigin => "null_origin",
            ProxyError::CrossSite => "cross_site_request",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::RequestBody => "request_body",
            ProxyError::CredentialUnavailable { .. } => "credential_unavailable",
            ProxyError::CredentialExpired { .. } => "credential_expired",
            ProxyError::Upstream { .. } => "upstream_unreachable",
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownCredential { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadPath(_) | ProxyError::NotAForwardProxy | ProxyError::RequestBody => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ForeignHost
            | ProxyError::ForeignOrigin
            | ProxyError::NullOrigin
            | ProxyError::CrossSite => StatusCode::FORBIDDEN,
            // Without `Allow` (RFC 9110 §15.5.6 asks for one): the sidecar does not know which methods
            // the upstream takes, and naming some would be a guess. The JSON body says what was refused.
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::CredentialUnavailable { .. } | ProxyError::CredentialExpired { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.category(), "message": self.to_string() });
        match &self {
            ProxyError::UnknownCredential { configured } => body["credentials"] = json!(configured),
            ProxyError::CredentialUnavailable { name, last_failure } => {
                body["credential"] = json!(name.as_ref());
                body["lastFailure"] = json!(last_failure.as_deref());
            }
            ProxyError::CredentialExpired {
                name,
                expired_at,
                last_failure,
            } => {
                body["credential"] = json!(name.as_ref());
                body["expiredAt"] = json!(expired_at.to_string());
                body["lastFailure"] = json!(last_failure.as_deref());
            }
            ProxyError::Upstream { name, source } => {
                body["credential"] = json!(name.as_ref());
                // The cause stays in the log: it can name internal addresses.
                tracing::warn!(credential = %name, error = %source, "upstream unreachable");
            }
            _ => {}
        }
        let mut response = (self.status(), Json(body)).into_response();
        response
            .headers_mut()
            .insert(SIDECAR_ERROR_HEADER, HeaderValue::from_static(self.category()));
        response
    }
}

pub use mcp_credentials_core::process::error_chain;

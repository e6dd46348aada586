//! Layer: strip whatever credential the agent sent, and the headers that belong to the agent's
//! connection (Host and hop-by-hop headers), on every method. The MCP headers pass untouched.

use axum::{extract::Request, middleware::Next, response::Response};
use http::{HeaderMap, header};

use super::Routed;

pub(super) async fn strip(mut request: Request, next: Next) -> Response {
    let attached = request
        .extensions()
        .get::<Routed>()
        .and_then(|r| r.slot.current.clone());
    let headers = request.headers_mut();
    strip_connection_headers(headers);
    // The agent's Host names the sidecar; the client sets the upstream's from the URI.
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::COOKIE);
    if let Some(credential) = attached {
        for (name, _) in &credential.headers {
            headers.remove(name);
        }
    }
    next.run(request).await
}

/// Removes hop-by-hop headers and every header the `Connection` header names (RFC 9110 §7.6.1).
/// Allocates only when a `Connection` header is present.
pub(super) fn strip_connection_headers(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
            .filter(|s| !s.is_empty())
            .collect();
        for name in named {
            headers.remove(name.as_str());
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The hop-by-hop headers of RFC 9110 §7.6.1, plus the non-standard ones still seen in the wild.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "proxy-connection",
];

//! Layer: strip whatever credential the agent sent, and the headers that belong to the agent's
//! connection (Host and hop-by-hop headers), on every method. The MCP headers pass untouched.

use axum::{extract::Request, middleware::Next, response::Response};
use http::{HeaderMap, header};

use super::Routed;
use crate::credential::is_hop_by_hop;

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
pub(super) fn strip_connection_headers(headers: &mut HeaderMap) {
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
    let hop: Vec<_> = headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in hop {
        headers.remove(name);
    }
}

//! Step: strip whatever credential the agent sent, and the headers that belong to the agent's
//! connection (Host and hop-by-hop headers), on every method. The MCP headers pass untouched.

use http::{HeaderMap, HeaderName, header};

/// Strips the agent's credentials and connection headers. The headers of the credential about to be
/// attached need no removal here: attaching replaces every value the agent sent under their names
/// (`HeaderMap::insert`), and a request that gets no credential is not forwarded at all.
pub(super) fn strip(headers: &mut HeaderMap) {
    strip_connection_headers(headers);
    // The agent's Host names the sidecar; the upstream's is set from the URI.
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::COOKIE);
}

/// Removes hop-by-hop headers and every header the `Connection` header names (RFC 9110 §7.6.1).
/// One pass over the names when there are none (the usual case); allocates only when a
/// `Connection` header is present.
pub(super) fn strip_connection_headers(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
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

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// The hop-by-hop headers of RFC 9110 §7.6.1, plus the non-standard ones still seen in the wild.
pub(super) const HOP_BY_HOP: [&str; 9] = [
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("mcp-session-id", "s".parse().unwrap());
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("mcp-session-id"));
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/event-stream".parse().unwrap());
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1);
    }
}

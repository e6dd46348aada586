//! Step: strip whatever credential the agent sent, and the headers that belong to the agent's
//! connection (Host and hop-by-hop headers), on every method. The MCP headers pass untouched. On the
//! way back, the upstream's connection headers and cookies are stripped from its answer.

use http::{HeaderMap, header};

use crate::credential::{HOP_BY_HOP, is_hop_by_hop};

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

/// Whether `name` (any case) is a hop-by-hop header of [`HOP_BY_HOP`]; compared without allocating,
/// for the fast path, which sees header names as the agent or upstream spelled them.
pub(super) fn is_hop_by_hop_name(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.len() == name.len() && name.eq_ignore_ascii_case(h))
}

/// Answer headers the agent never gets, besides connection headers: cookies the upstream sets.
/// A session credential's cookies live in the credential store (the operator or standalone mode
/// keeps them fresh); a cookie an upstream sets after bearer or API-key auth is a credential too.
/// Either way the agent must not hold one (no token passthrough, in this direction either).
pub(super) const WITHHELD_ANSWER_HEADERS: [&str; 2] = ["set-cookie", "set-cookie2"];

/// Whether the agent must not see answer header `name` (any case; compared without allocating):
/// a hop-by-hop header or one of [`WITHHELD_ANSWER_HEADERS`]. Both paths' answer filter. The
/// headers a `Connection` header names are the callers' own check (they need the whole head).
pub(super) fn is_withheld_answer_header(name: &str) -> bool {
    is_hop_by_hop_name(name)
        || WITHHELD_ANSWER_HEADERS
            .iter()
            .any(|h| h.len() == name.len() && name.eq_ignore_ascii_case(h))
}

/// Strips an upstream answer's headers for the agent: connection headers (and those `Connection`
/// names), then [`WITHHELD_ANSWER_HEADERS`]. One pass over the names when there is nothing to strip.
pub(super) fn strip_answer_headers(headers: &mut HeaderMap) {
    if !headers.keys().any(|n| is_withheld_answer_header(n.as_str())) {
        return;
    }
    strip_connection_headers(headers);
    for name in WITHHELD_ANSWER_HEADERS {
        headers.remove(name);
    }
}

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

    #[test]
    fn an_answer_loses_its_cookies_and_connection_headers_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", "sid=secret; Path=/".parse().unwrap());
        h.append("set-cookie", "other=1".parse().unwrap());
        h.insert("set-cookie2", "sid=secret".parse().unwrap());
        h.insert("connection", "X-Private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("mcp-session-id", "s".parse().unwrap());
        strip_answer_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("mcp-session-id"));
        for name in ["Set-Cookie", "SET-COOKIE2", "Transfer-Encoding", "keep-alive"] {
            assert!(is_withheld_answer_header(name), "{name}");
        }
        for name in ["Set-Cookies", "Cookie", "WWW-Authenticate", "Mcp-Session-Id"] {
            assert!(!is_withheld_answer_header(name), "{name}");
        }
    }
}

//! Layer: refuse request targets that only a forward proxy would accept, methods that would echo the
//! attached credential back (TRACE, TRACK), requests a web page made (through DNS rebinding, a
//! non-loopback `Host` or `Origin`; or from another site, `Origin: null` or `Sec-Fetch-Site:
//! cross-site`: the sidecar attaches credentials, so a browser must never reach it from another site),
//! and header sections larger than the limit, before anything else looks at the request. The fast
//! path ([`super::h1`]) runs the same checks, through the same functions.

use http::{Request, Version, header};

use super::Proxy;
use crate::error::ProxyError;

pub(super) fn guard<B>(proxy: &Proxy, request: &Request<B>) -> Result<(), ProxyError> {
    check_method(request.method().as_str())?;
    // HTTP/2 always carries :authority, so only HTTP/1 absolute-form targets are refused. Either way the
    // target's authority is never used: the upstream comes from configuration alone.
    let http1 = matches!(
        request.version(),
        Version::HTTP_10 | Version::HTTP_11 | Version::HTTP_09
    );
    if http1 && request.uri().authority().is_some() {
        return Err(ProxyError::NotAForwardProxy);
    }
    if !request
        .headers()
        .get(header::HOST)
        .is_none_or(|h| is_loopback_authority(h.as_bytes()))
        || !request
            .uri()
            .authority()
            .is_none_or(|a| is_loopback_authority(a.as_str().as_bytes()))
    {
        return Err(ProxyError::ForeignHost);
    }
    check_browser(
        request.headers().get(header::ORIGIN).map(|v| v.as_bytes()),
        request.headers().get("sec-fetch-site").map(|v| v.as_bytes()),
    )?;
    let size: usize = request
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if size > proxy.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            limit: proxy.max_header_bytes,
        });
    }
    Ok(())
}

/// The method rule of both paths. CONNECT is a forward proxy's method. TRACE (and Microsoft's TRACK)
/// ask the upstream to echo the request back, attached credential included: never forwarded. Methods
/// are case-sensitive (RFC 9110 §9.1), but some servers are not, so `trace` is refused as well.
/// Compared without allocating: this runs on every request.
pub(super) fn check_method(method: &str) -> Result<(), ProxyError> {
    if method.len() != 5 && method.len() != 7 {
        return Ok(());
    }
    if method == "CONNECT" {
        return Err(ProxyError::NotAForwardProxy);
    }
    for echoing in ["TRACE", "TRACK"] {
        if method.eq_ignore_ascii_case(echoing) {
            return Err(ProxyError::MethodNotAllowed { method: echoing });
        }
    }
    Ok(())
}

/// The browser rule of both paths, from the request's first `Origin` and `Sec-Fetch-Site` values.
///
/// - An `Origin` that is a web site other than this machine: refused (DNS rebinding, CSRF).
/// - `Origin: null`: refused. Browsers send it from sandboxed iframes, `file:` and `data:` pages and
///   after cross-origin redirects, so any web site can produce it; no MCP client sends it.
/// - A loopback `Origin` (a page served from this machine, such as a local MCP inspector): allowed,
///   whatever `Sec-Fetch-Site` says (a page on `localhost:3000` is cross-site to `127.0.0.1:7007`).
/// - No `Origin` and `Sec-Fetch-Site: cross-site`: refused. Browsers leave `Origin` out of GETs
///   that are not CORS requests (`<img src>`, `<script src>`, links and other navigations), but every
///   current browser marks them with `Sec-Fetch-Site`; a request another site made is `cross-site`.
///   `same-origin`, `same-site` (only this machine is the sidecar's site) and `none` (the user typed
///   the URL) pass.
///
/// Non-browser MCP clients (SDKs, agents, curl) send neither header and are not affected. A browser
/// too old to send `Sec-Fetch-Site` (before 2023 for Safari) can still make a GET without `Origin`
/// whose answer the page cannot read; its side effects are the upstream's.
pub(super) fn check_browser(origin: Option<&[u8]>, fetch_site: Option<&[u8]>) -> Result<(), ProxyError> {
    match origin {
        Some(b"null") => Err(ProxyError::NullOrigin),
        Some(origin) if !is_loopback_origin(origin) => Err(ProxyError::ForeignOrigin),
        Some(_) => Ok(()),
        None if fetch_site.is_some_and(|s| s.trim_ascii().eq_ignore_ascii_case(b"cross-site")) => {
            Err(ProxyError::CrossSite)
        }
        None => Ok(()),
    }
}

/// `localhost`, `*.localhost`, a loopback IPv4 address or `[::1]`, with an optional port.
pub(super) fn is_loopback_authority(authority: &[u8]) -> bool {
    // The usual Host, without parsing.
    if authority.starts_with(b"127.0.0.1") && matches!(authority.get(9), None | Some(b':')) {
        return true;
    }
    let Ok(authority) = std::str::from_utf8(authority) else {
        return false;
    };
    let host = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, _)) => return ip.parse::<std::net::Ipv6Addr>().is_ok_and(|ip| ip.is_loopback()),
            None => return false,
        },
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    // Compared without allocating: this runs on every request.
    let suffix = host
        .len()
        .checked_sub(".localhost".len())
        .and_then(|i| host.get(i..));
    host.eq_ignore_ascii_case("localhost")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case(".localhost"))
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An `Origin` of a page served from this machine (`http://localhost:3000`), or `null`, which names no
/// site (and which [`check_browser`] refuses before asking this).
pub(super) fn is_loopback_origin(origin: &[u8]) -> bool {
    if origin == b"null" {
        return true;
    }
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|authority| is_loopback_authority(authority.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_and_origins_pass() {
        for ok in [
            "127.0.0.1:7007",
            "localhost",
            "LOCALHOST:1",
            "agent.localhost:7007",
            "127.1.2.3",
            "[::1]:7007",
        ] {
            assert!(is_loopback_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "evil.example:7007",
            "169.254.169.254",
            "[::2]:80",
            "localhost.evil.example",
            "10.0.0.1:7007",
        ] {
            assert!(!is_loopback_authority(bad.as_bytes()), "{bad}");
        }
        assert!(is_loopback_origin(b"http://localhost:3000"));
        assert!(is_loopback_origin(b"null"));
        assert!(!is_loopback_origin(b"https://evil.example"));
        assert!(!is_loopback_origin(b"http://127.0.0.1.evil.example"));
    }

    #[test]
    fn a_null_origin_and_cross_site_browser_requests_are_refused() {
        let refused = |origin: Option<&str>, site: Option<&str>| {
            check_browser(origin.map(str::as_bytes), site.map(str::as_bytes))
                .err()
                .map(|e| e.category())
        };
        assert_eq!(refused(Some("null"), None), Some("null_origin"));
        assert_eq!(refused(Some("null"), Some("same-origin")), Some("null_origin"));
        assert_eq!(refused(None, Some("cross-site")), Some("cross_site_request"));
        assert_eq!(refused(None, Some(" Cross-Site")), Some("cross_site_request"));
        assert_eq!(
            refused(Some("https://evil.example"), None),
            Some("foreign_origin")
        );
        // A page of this machine, and requests no other site made (or no browser at all), pass.
        assert_eq!(refused(Some("http://localhost:3000"), Some("cross-site")), None);
        for site in [None, Some("same-origin"), Some("same-site"), Some("none")] {
            assert_eq!(refused(None, site), None, "{site:?}");
        }
    }

    #[test]
    fn trace_and_track_are_refused_in_any_case_and_other_methods_pass() {
        for method in ["TRACE", "TRACK", "trace", "Track"] {
            assert!(
                matches!(check_method(method), Err(ProxyError::MethodNotAllowed { .. })),
                "{method}"
            );
        }
        assert!(matches!(
            check_method("CONNECT"),
            Err(ProxyError::NotAForwardProxy)
        ));
        for method in [
            "GET", "POST", "DELETE", "OPTIONS", "PATCH", "TRACES", "TRAC", "PUT",
        ] {
            assert!(check_method(method).is_ok(), "{method}");
        }
    }
}

//! Layer: refuse request targets that only a forward proxy would accept, requests a web page made
//! through DNS rebinding (a non-loopback `Host` or `Origin`: the sidecar attaches credentials, so a
//! browser must never reach it from another site), and header sections larger than the limit, before
//! anything else looks at the request.

use http::{Method, Request, Version, header};

use super::Proxy;
use crate::error::ProxyError;

pub(super) fn guard<B>(proxy: &Proxy, request: &Request<B>) -> Result<(), ProxyError> {
    // HTTP/2 always carries :authority, so only HTTP/1 absolute-form targets are refused. Either way the
    // target's authority is never used: the upstream comes from configuration alone.
    let http1 = matches!(
        request.version(),
        Version::HTTP_10 | Version::HTTP_11 | Version::HTTP_09
    );
    if request.method() == Method::CONNECT || (http1 && request.uri().authority().is_some()) {
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
    if let Some(origin) = request.headers().get(header::ORIGIN)
        && !is_loopback_origin(origin.as_bytes())
    {
        return Err(ProxyError::ForeignOrigin);
    }
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

/// An `Origin` of a page served from this machine (`http://localhost:3000`), or `null` (not a site).
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
}

//! The agent's request: parsed once, checked with the hyper path's guard, route and strip
//! functions, and rewritten with the credential into the upstream head ([`plan`]).

use super::*;

/// Header lines parsed per message; hyper's limit too, so a request over it goes to hyper's refusal.
pub(super) const MAX_HEADERS: usize = 100;

/// Parses the request at the start of `read` and, when the fast path forwards it, writes its
/// upstream head to `out`: the upstream's path and Host, the agent's headers minus its credentials
/// and connection headers, then the credential's headers (`with` for a replay, else the current one).
pub(super) fn plan(
    proxy: &Proxy,
    cached: Option<&Arc<Handles>>,
    read: &[u8],
    with: Option<&Arc<Credential>>,
    out: &mut Vec<u8>,
) -> Plan {
    if read.is_empty() {
        return Plan::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(read, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        // hyper answers a head over the limit (431) or a malformed one (400).
        Ok(httparse::Status::Partial) if read.len() <= proxy.max_header_bytes + (8 << 10) => {
            return Plan::Partial;
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Plan::Hyper("headers_too_large");
        }
        // HTTP/2's preface, or not HTTP at all.
        Err(_) => return Plan::Hyper("not_http1"),
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version) else {
        return Plan::Hyper("not_http1");
    };
    // Step 1, guard: the method rule, and origin-form targets only (no absolute form, no `*`).
    if guard::check_method(method).is_err()
        || !target.starts_with('/')
        || !target.bytes().all(is_plain_target_byte)
    {
        return Plan::Hyper("request_target");
    }
    // Step 2, route.
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let Ok((name, rest)) = route::split(path) else {
        return Plan::Hyper("request_target");
    };
    if name.is_empty() {
        return Plan::Hyper("request_target");
    }
    let credential = match with {
        Some(c) => c.clone(),
        None => match proxy.store.get(name).map(|slot| slot.current) {
            Some(Some(c)) => c,
            Some(None) => return Plan::Hyper("credential_unavailable"),
            None => return Plan::Hyper("unknown_credential"),
        },
    };
    // Step 4's refusal (expired) is the hyper path's. An HTTPS upstream that speaks only HTTP/2 is
    // the pool's too: found when this path connects (`Conn::connect`), not looked up per request.
    if credential.is_expired_now() {
        return Plan::Hyper("credential_unavailable");
    }
    let handles = Handles::of(&proxy.metrics, name, cached);
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    credential.upstream.push_path(rest, query, out);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(
        forward::host(&credential.upstream.scheme, &credential.upstream.authority).as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let is_get = method == "GET";
    let mut sse = false;
    let mut size = 0;
    let mut body_len = None;
    let mut close = false;
    // The first values, as the hyper path's guard reads them (`HeaderMap::get`).
    let (mut origin, mut fetch_site) = (None, None);
    // Steps 1 and 3 over the headers: guard Host and Origin, strip credentials and connection headers.
    for header in request.headers.iter() {
        let (name, value) = (header.name, header.value);
        size += name.len() + value.len() + 4;
        match RequestHeader::of(name) {
            RequestHeader::Host if is_loopback_authority(value) => continue,
            RequestHeader::Origin => _ = origin.get_or_insert(value),
            RequestHeader::SecFetchSite => _ = fetch_site.get_or_insert(value),
            RequestHeader::Credential => continue,
            RequestHeader::ContentLength => match (parse_length(value), body_len) {
                (Some(n), None) => body_len = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Plan::Hyper("content_length"),
            },
            RequestHeader::Connection => {
                for token in value.split(|&b| b == b',') {
                    match token.trim_ascii() {
                        b"" => {}
                        t if t.eq_ignore_ascii_case(b"keep-alive") => {}
                        t if t.eq_ignore_ascii_case(b"close") => close = true,
                        // It names other headers to drop: the hyper path's strip handles that.
                        _ => return Plan::Hyper("connection_header"),
                    }
                }
                continue;
            }
            RequestHeader::Accept if is_get && contains(value, b"text/event-stream") => sse = true,
            RequestHeader::Accept | RequestHeader::Other => {}
            RequestHeader::Host | RequestHeader::Hyper => {
                return Plan::Hyper("request_header");
            }
        }
        // Step 4 replaces whatever the agent sent under the credential's header names.
        if credential
            .headers
            .iter()
            .any(|(n, _)| n.as_str().as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        header_line(out, name.as_bytes(), value);
    }
    if size > proxy.max_header_bytes {
        return Plan::Hyper("headers_too_large");
    }
    // The guard's browser rule; its refusal is the hyper path's.
    if guard::check_browser(origin, fetch_site).is_err() {
        return Plan::Hyper("request_header");
    }
    let body_len = body_len.unwrap_or(0);
    // Larger bodies stream through the hyper path (and are never replayed).
    if body_len as u64 > replay::MAX_BODY {
        return Plan::Hyper("large_body");
    }
    // Step 4: attach.
    for (name, value) in &credential.headers {
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let sse_path = sse.then(|| {
        let mut path = Vec::new();
        credential.upstream.push_path(rest, None, &mut path);
        String::from_utf8_lossy(&path).into_owned()
    });
    Plan::Forward(Planned {
        head_len,
        body_len,
        credential,
        handles,
        head_method: method == "HEAD",
        // (TRACE is idempotent too, but never forwarded.)
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        close,
        sse_path,
    })
}

/// What the fast path does with a request header, by name.
pub(super) enum RequestHeader {
    Host,
    Origin,
    SecFetchSite,
    /// `Authorization` and `Cookie`: never forwarded.
    Credential,
    ContentLength,
    Connection,
    Accept,
    /// Hop-by-hop headers, `Transfer-Encoding` and `Expect`: the hyper path handles them.
    Hyper,
    Other,
}

impl RequestHeader {
    fn of(name: &str) -> Self {
        let is = |lower: &str| name.eq_ignore_ascii_case(lower);
        match name.len() {
            4 if is("host") => Self::Host,
            6 if is("origin") => Self::Origin,
            6 if is("cookie") => Self::Credential,
            6 if is("accept") => Self::Accept,
            6 if is("expect") => Self::Hyper,
            13 if is("authorization") => Self::Credential,
            14 if is("content-length") => Self::ContentLength,
            14 if is("sec-fetch-site") => Self::SecFetchSite,
            10 if is("connection") => Self::Connection,
            2 | 7 | 10 | 16 | 17 | 18 | 19 if is_hop_by_hop_name(name) => Self::Hyper,
            _ => Self::Other,
        }
    }
}

/// Bytes a request target may hold on the fast path: unreserved, sub-delims, `:@/?%` (RFC 3986).
/// Anything else goes to the hyper path, which accepts or refuses it.
pub(super) fn is_plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A Content-Length value: digits only.
pub(super) fn parse_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

pub(super) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

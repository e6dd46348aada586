//! Layer: route `/<credential>/<rest>` to `<upstream>/<rest>`. The upstream URI is built here from
//! configuration alone; the request's Host, authority and scheme are never used, and paths that could
//! climb out of the upstream's path (dot segments, with `;` parameters or percent-encoded; encoded
//! slashes; double encoding) are refused.

use std::sync::Arc;

use http::Uri;

use super::{Proxy, measure::Handles};
use crate::{credential::Credential, error::ProxyError, store::Slot};

/// The routing decision, for the steps after this one.
pub(super) struct Routed {
    /// The credential's name.
    pub name: Arc<str>,
    /// Its metric handles.
    pub handles: Arc<Handles>,
    /// The credential as it was when the request arrived; the whole request (and its stream) uses it.
    pub slot: Slot,
    /// The upstream URI; `None` when the credential has never been loaded (attach answers 503).
    pub upstream_uri: Option<Uri>,
}

/// Routes `uri`; `cached` are the handles of the credential this agent connection used last.
pub(super) fn route(proxy: &Proxy, uri: &Uri, cached: Option<Arc<Handles>>) -> Result<Routed, ProxyError> {
    let (name, rest) = split(uri.path())?;
    let Some(slot) = proxy.store.get(name).filter(|_| !name.is_empty()) else {
        return Err(ProxyError::UnknownCredential {
            configured: proxy.store.names(),
        });
    };
    let handles = Handles::of(&proxy.metrics, name, cached.as_ref());
    let upstream_uri = match &slot.current {
        Some(c) => Some(join(c, rest, uri.query())?),
        None => None,
    };
    Ok(Routed {
        name: handles.name.clone(),
        handles,
        slot,
        upstream_uri,
    })
}

/// The URI on `credential`'s upstream of an agent `uri` that [`route`] accepted. A replay with a newer
/// credential is sent here again: the newer credential's upstream may not be the one routed to first.
pub(super) fn upstream_uri(credential: &Credential, uri: &Uri) -> Result<Uri, ProxyError> {
    let (_, rest) = split(uri.path())?;
    join(credential, rest, uri.query())
}

fn join(credential: &Credential, rest: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    credential
        .upstream
        .join(rest, query)
        .map_err(|_| ProxyError::BadPath("it does not form a valid upstream URI"))
}

/// Splits `/<name><rest>` (`name` may be empty) and checks that `rest` stays below the upstream's path.
pub(super) fn split(path: &str) -> Result<(&str, &str), ProxyError> {
    let path = path
        .strip_prefix('/')
        .ok_or(ProxyError::BadPath("it does not start with /"))?;
    let (name, rest) = match path.find('/') {
        Some(i) => path.split_at(i),
        None => (path, ""),
    };
    check_rest(rest)?;
    Ok((name, rest))
}

/// Refuses what an upstream (or a proxy in front of it) could decode into a different path. Also the
/// check that keeps a rewritten legacy SSE endpoint below `/<credential>/` ([`super::sse`]).
/// Allocation-free unless a segment holds a `%`.
pub(super) fn check_rest(rest: &str) -> Result<(), ProxyError> {
    if rest.contains('\\') {
        return Err(ProxyError::BadPath("it contains a backslash"));
    }
    for segment in rest.split('/') {
        if segment.contains('%') {
            check_encoded(segment.as_bytes())?;
        } else if is_dot_segment(segment.as_bytes()) {
            return Err(DOT_SEGMENT);
        }
    }
    Ok(())
}

const DOT_SEGMENT: ProxyError = ProxyError::BadPath("it contains a . or .. segment");

/// `.` or `..`, once `;` parameters are cut off: Tomcat, Jetty and Spring read `..;x` as `..`.
fn is_dot_segment(segment: &[u8]) -> bool {
    let name = segment.split(|&b| b == b';').next().unwrap_or_default();
    name == b"." || name == b".."
}

/// A segment with escapes, decoded once as the upstream would: no slash, backslash or NUL may come
/// out, nor a dot segment; and what comes out must not decode again (`%252e`, `%%32%65`), since a
/// proxy or framework in front of the upstream may decode a second time.
fn check_encoded(segment: &[u8]) -> Result<(), ProxyError> {
    let decoded = percent_decode(segment);
    if decoded.iter().any(|&b| b == b'/' || b == b'\\') {
        return Err(ProxyError::BadPath("it contains an encoded slash or backslash"));
    }
    if decoded.contains(&0) {
        return Err(ProxyError::BadPath("it contains an encoded NUL"));
    }
    if is_dot_segment(&decoded) {
        return Err(DOT_SEGMENT);
    }
    if decoded.windows(3).any(is_escape) {
        return Err(ProxyError::BadPath("it is percent-encoded twice"));
    }
    Ok(())
}

fn is_escape(w: &[u8]) -> bool {
    w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit()
}

/// `%XX` decoded; a `%` without two hex digits after it stays as it is.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes.get(i..i + 3) {
            Some(w) if is_escape(w) => {
                let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(w[1]) << 4 | hex(w[2]));
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_splits_into_credential_and_rest() {
        assert_eq!(split("/github").unwrap(), ("github", ""));
        assert_eq!(split("/github/").unwrap(), ("github", "/"));
        assert_eq!(split("/github/mcp/x").unwrap(), ("github", "/mcp/x"));
        assert_eq!(split("/").unwrap(), ("", ""));
    }

    #[test]
    fn paths_that_could_climb_out_of_the_upstream_are_refused() {
        for path in [
            "/github/../admin",
            "/github/a/..",
            "/github/./x",
            "/github/%2e%2e/admin",
            "/github/%2E./admin",
            "/github/.%2e",
            "/github/a%2Fb",
            "/github/a%2f..%2fb",
            "/github/a%5cb",
            "/github/a\\b",
            "/github/a%00",
        ] {
            assert!(
                matches!(split(path), Err(ProxyError::BadPath(_))),
                "{path} was accepted"
            );
        }
        // Dots inside a segment are ordinary characters.
        assert!(split("/github/v1.2/..x/a..b").is_ok());
    }

    #[test]
    fn dot_segments_with_parameters_or_escapes_and_double_encoding_are_refused() {
        for path in [
            "/cred/..;/other",
            "/cred/..;jsessionid=1/other",
            "/cred/.;/x",
            "/cred/a/..;",
            "/cred/%2e%2e;/other",
            "/cred/..%3b/other",
            "/cred/%2e;x/y",
            "/cred/%2e",
            "/cred/%252e%252e/other",
            "/cred/%252E./other",
            "/cred/a%252fb",
            "/cred/a%252Fb",
            "/cred/a%255cb",
            "/cred/a%2500",
            "/cred/%%32%65%%32%65/other",
            "/cred/a%5Cb",
        ] {
            assert!(
                matches!(split(path), Err(ProxyError::BadPath(_))),
                "{path} was accepted"
            );
        }
        // Parameters, escapes and a lone % that change no path pass.
        for path in [
            "/cred/a;v=1/b",
            "/cred/...;/x",
            "/cred/file%20name",
            "/cred/100%",
            "/cred/50%off",
            "/cred/%7Euser/a.b",
        ] {
            assert!(split(path).is_ok(), "{path} was refused");
        }
    }
}

//! Layer: route `/<credential>/<rest>` to `<upstream>/<rest>`. The upstream URI is built here from
//! configuration alone; the request's Host, authority and scheme are never used, and paths that could
//! climb out of the upstream's path (dot segments, encoded slashes) are refused.

use std::sync::Arc;

use http::Uri;

use super::{Proxy, measure::Handles};
use crate::{error::ProxyError, store::Slot};

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
    let handles = match cached {
        Some(h) if *h.name == *name => h,
        _ => Arc::new(Handles::new(&proxy.metrics, name)),
    };
    let upstream_uri = match &slot.current {
        Some(c) => Some(
            c.upstream
                .join(rest, uri.query())
                .map_err(|_| ProxyError::BadPath("it does not form a valid upstream URI"))?,
        ),
        None => None,
    };
    Ok(Routed {
        name: handles.name.clone(),
        handles,
        slot,
        upstream_uri,
    })
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

/// Refuses what an upstream (or a proxy in front of it) could decode into a different path.
fn check_rest(rest: &str) -> Result<(), ProxyError> {
    if rest.contains('\\') {
        return Err(ProxyError::BadPath("it contains a backslash"));
    }
    if rest.contains('%') {
        let lower = rest.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return Err(ProxyError::BadPath("it contains an encoded slash or backslash"));
        }
        if lower.contains("%00") {
            return Err(ProxyError::BadPath("it contains an encoded NUL"));
        }
    }
    for segment in rest.split('/') {
        // Only a segment of 1 to 6 bytes can decode to `.` or `..` (`%2e%2e` is the longest).
        if segment.len() > 6 || !segment.starts_with(['.', '%']) {
            continue;
        }
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(ProxyError::BadPath("it contains a . or .. segment"));
        }
    }
    Ok(())
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
}

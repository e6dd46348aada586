//! One credential as the proxy uses it, parsed from the Secret contract (`header.<Name>`, `upstream`,
//! `expires-at`, `version`), whichever store the data came from.

use std::{collections::BTreeMap, fmt};

use http::{HeaderName, HeaderValue, Uri, uri::Scheme};
use jiff::Timestamp;
use mcp_credentials_core::secret::{CredentialData, DataError};

/// The current credential for one upstream.
#[derive(Clone)]
pub struct Credential {
    /// Where requests for this credential go.
    pub upstream: Upstream,
    /// The headers to attach, values marked sensitive so they never reach a `Debug` print.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// When the credential stops being valid; `None` when it does not expire.
    pub expires_at: Option<Timestamp>,
    /// Changes on every new credential.
    pub version: String,
    /// When this sidecar first saw this version (for the credential-age metric).
    pub loaded_at: Timestamp,
}

impl fmt::Debug for Credential {
    // Header values are secrets: only their names are printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("upstream", &self.upstream.to_string())
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            )
            .field("expires_at", &self.expires_at)
            .field("version", &self.version)
            .finish()
    }
}

impl Credential {
    /// True when the credential must not be sent any more at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// True when the credential must not be sent any more; reads the clock only when it expires at all
    /// (it runs for every proxied request).
    pub fn is_expired_now(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= Timestamp::now())
    }

    /// Parses the data of a credential Secret (or the files of a projected volume): the contract's
    /// reader in core, then what the proxy needs of it (valid header names and values, an upstream URL).
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, InvalidCredential> {
        let read = CredentialData::from_entries(data.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        let upstream = Upstream::parse(read.upstream)?;
        let expires_at = read
            .expires_at
            .map(|at| Timestamp::try_from(at).map_err(|_| DataError::ExpiresAt))
            .transpose()?;
        let mut headers = Vec::with_capacity(read.headers.len());
        for (name, value) in read.headers {
            let name =
                HeaderName::try_from(name).map_err(|_| InvalidCredential::HeaderName(name.to_owned()))?;
            if is_hop_by_hop(&name) || name == http::header::HOST {
                return Err(InvalidCredential::HeaderName(name.to_string()));
            }
            let mut value = HeaderValue::from_bytes(value)
                .map_err(|_| InvalidCredential::HeaderValue(name.to_string()))?;
            value.set_sensitive(true);
            headers.push((name, value));
        }
        Ok(Credential {
            upstream,
            headers,
            expires_at,
            version: read.version.to_owned(),
            loaded_at: Timestamp::now(),
        })
    }
}

/// Why credential data was rejected. Never carries a header value.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InvalidCredential {
    /// The data does not follow the Secret contract (core's reader says how).
    #[error(transparent)]
    Data(#[from] DataError),
    /// A `header.<Name>` key names an invalid or connection-level header.
    #[error("header.{0} is not a header the sidecar may set")]
    HeaderName(String),
    /// A header value holds bytes a header cannot carry.
    #[error("the value of header.{0} is not a valid header value")]
    HeaderValue(String),
    /// `upstream` is not an absolute http(s) URL without query or fragment.
    #[error("upstream is not an absolute http or https URL without query, fragment or user info")]
    Upstream,
}

/// An upstream base URL: `<scheme>://<authority><base_path>`; requests append to the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port, without user info.
    pub authority: http::uri::Authority,
    /// The path, without a trailing slash (empty for the root).
    pub base_path: String,
    /// Whether the configured URL ended with a slash (`/<credential>` then maps to it exactly).
    pub trailing_slash: bool,
}

impl Upstream {
    /// Parses an upstream URL.
    pub fn parse(url: &str) -> Result<Self, InvalidCredential> {
        let uri: Uri = url.parse().map_err(|_| InvalidCredential::Upstream)?;
        let scheme = uri.scheme().cloned().ok_or(InvalidCredential::Upstream)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(InvalidCredential::Upstream);
        }
        let authority = uri.authority().cloned().ok_or(InvalidCredential::Upstream)?;
        if authority.as_str().contains('@') || uri.query().is_some() || url.contains('#') {
            return Err(InvalidCredential::Upstream);
        }
        let path = uri.path();
        Ok(Upstream {
            scheme,
            authority,
            base_path: path.trim_end_matches('/').to_owned(),
            trailing_slash: path.ends_with('/') && path.len() > 1,
        })
    }

    /// The upstream URI for `rest` (the request path after `/<credential>`, empty or starting with
    /// `/`) and the query. `rest` must already be checked by the router.
    pub fn join(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut path = Vec::with_capacity(self.base_path.len() + rest.len() + 2);
        self.push_path(rest, query, &mut path);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

impl Upstream {
    /// Appends the upstream path and query of [`join`](Self::join) to `out`.
    pub fn push_path(&self, rest: &str, query: Option<&str>, out: &mut Vec<u8>) {
        out.extend_from_slice(self.base_path.as_bytes());
        if rest.is_empty() {
            if self.trailing_slash || self.base_path.is_empty() {
                out.push(b'/');
            }
        } else {
            out.extend_from_slice(rest.as_bytes());
        }
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slash = if self.trailing_slash { "/" } else { "" };
        write!(
            f,
            "{}://{}{}{}",
            self.scheme, self.authority, self.base_path, slash
        )
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the non-standard
/// ones still seen in the wild: never forwarded either way, and never a credential's header. The
/// one list both paths and the credential parser use.
pub const HOP_BY_HOP: [&str; 9] = [
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

/// Whether `name` is one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Builders for credential data in tests.
    use mcp_credentials_core::secret::{HEADER_KEY_PREFIX, UPSTREAM_KEY, VERSION_KEY};

    use super::*;

    /// Secret data for an upstream with one header.
    pub fn data(upstream: &str, header: &str, value: &str) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            (UPSTREAM_KEY.to_owned(), upstream.as_bytes().to_vec()),
            (format!("{HEADER_KEY_PREFIX}{header}"), value.as_bytes().to_vec()),
            (VERSION_KEY.to_owned(), b"1".to_vec()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use mcp_credentials_core::secret::EXPIRES_AT_KEY;

    use super::{fixtures::data, *};

    #[test]
    fn secret_data_becomes_a_credential_with_sensitive_values() {
        let mut d = data("https://mcp.example.com/mcp", "Authorization", "Bearer abc\n");
        d.insert(EXPIRES_AT_KEY.into(), b"2030-01-01T00:00:00Z".to_vec());
        let c = Credential::from_data(&d).unwrap();
        assert_eq!(c.headers[0].0, "authorization");
        assert_eq!(c.headers[0].1, "Bearer abc");
        assert!(c.headers[0].1.is_sensitive());
        assert!(!format!("{c:?}").contains("abc"));
        assert!(!c.is_expired("2029-12-31T23:59:59Z".parse().unwrap()));
        assert!(c.is_expired("2030-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn invalid_data_is_rejected_without_echoing_values() {
        let bad = |k: &str, v: &str| {
            let mut d = data("https://mcp.example.com/mcp", "Authorization", "Bearer abc");
            d.insert(k.into(), v.as_bytes().to_vec());
            Credential::from_data(&d).unwrap_err()
        };
        assert_eq!(
            bad("expires-at", "tomorrow"),
            InvalidCredential::Data(DataError::ExpiresAt)
        );
        assert_eq!(bad("upstream", "ftp://x/"), InvalidCredential::Upstream);
        assert_eq!(bad("upstream", "https://u:p@x/"), InvalidCredential::Upstream);
        assert_eq!(
            bad("header.Host", "evil"),
            InvalidCredential::HeaderName("host".into())
        );
        assert_eq!(
            bad("header.X-Key", "a\u{7}b"),
            InvalidCredential::HeaderValue("x-key".into())
        );
    }

    #[test]
    fn paths_are_appended_to_the_upstream_path() {
        let u = Upstream::parse("https://mcp.example.com/mcp").unwrap();
        assert_eq!(u.join("", None).unwrap(), "https://mcp.example.com/mcp");
        assert_eq!(
            u.join("/sse", Some("a=1")).unwrap(),
            "https://mcp.example.com/mcp/sse?a=1"
        );
        let u = Upstream::parse("https://mcp.example.com/mcp/").unwrap();
        assert_eq!(u.join("", None).unwrap(), "https://mcp.example.com/mcp/");
        let u = Upstream::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!(u.join("", None).unwrap(), "http://127.0.0.1:9000/");
        assert_eq!(
            u.join("/messages/", None).unwrap(),
            "http://127.0.0.1:9000/messages/"
        );
    }
}

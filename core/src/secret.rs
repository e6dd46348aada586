//! The Secret contract: one Secret per McpCredential, written by the operator, read by the sidecar.
//! Changing a name here is a breaking change between operator and sidecar versions.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The Secret `type` of every credential Secret.
pub const SECRET_TYPE: &str = "mcpcredentials.dev/credential";

/// Label set on every object the operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "mcp-credentials";
/// Label naming the McpCredential a Secret belongs to.
pub const CREDENTIAL_LABEL: &str = "mcpcredentials.dev/credential";

/// Prefix of the data keys holding header values: `header.Authorization` = `Bearer eyJ...`.
pub const HEADER_KEY_PREFIX: &str = "header.";
/// Data key holding the upstream URL.
pub const UPSTREAM_KEY: &str = "upstream";
/// Data key holding the expiry as RFC 3339; absent when the credential does not expire.
pub const EXPIRES_AT_KEY: &str = "expires-at";
/// Data key that changes on every new credential.
pub const VERSION_KEY: &str = "version";

/// Suffix of the default Secret name: `<credential-name>-mcp-credential`.
pub const DEFAULT_SECRET_SUFFIX: &str = "-mcp-credential";

/// The Secret name for a credential: `spec.secretName`, or the default derived from its name.
pub fn secret_name(credential_name: &str, spec_secret_name: Option<&str>) -> String {
    match spec_secret_name {
        Some(name) => name.to_owned(),
        None => format!("{credential_name}{DEFAULT_SECRET_SUFFIX}"),
    }
}

/// One credential as its Secret's data holds it: `header.<Name>` (one or more), `upstream`,
/// `expires-at` (RFC 3339, whole seconds; absent when it does not expire) and `version`. The one
/// writer ([`CredentialData::to_data`]: the operator and standalone mode) and the one reader
/// ([`CredentialData::from_entries`]: the sidecar's stores and the operator reading back what it
/// wrote). It borrows from the data it was read from; `Debug` prints header names only.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialData<'a> {
    /// Where requests go (not yet checked as a URL: the sidecar does that).
    pub upstream: &'a str,
    /// Header names and values to attach (a value has no trailing newline).
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// When the credential stops being valid, in whole seconds.
    pub expires_at: Option<SystemTime>,
    /// Changes with every new credential.
    pub version: &'a str,
}

/// Why a credential Secret's data was refused. Never carries a value.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DataError {
    /// A required key is absent.
    #[error("the key {0:?} is missing")]
    Missing(&'static str),
    /// A key that must be text is not UTF-8.
    #[error("the key {0:?} is not UTF-8")]
    NotUtf8(&'static str),
    /// `expires-at` is not RFC 3339.
    #[error("expires-at is not an RFC 3339 timestamp")]
    ExpiresAt,
    /// No `header.<Name>` key.
    #[error("no header.<Name> key: nothing to attach")]
    NoHeader,
}

impl<'a> CredentialData<'a> {
    /// The data to write.
    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut data: BTreeMap<String, Vec<u8>> = self
            .headers
            .iter()
            .map(|(name, value)| (format!("{HEADER_KEY_PREFIX}{name}"), value.to_vec()))
            .collect();
        data.insert(UPSTREAM_KEY.to_owned(), self.upstream.as_bytes().to_vec());
        data.insert(VERSION_KEY.to_owned(), self.version.as_bytes().to_vec());
        if let Some(at) = self.expires_at {
            data.insert(EXPIRES_AT_KEY.to_owned(), rfc3339_seconds(at).into_bytes());
        }
        data
    }

    /// Reads a credential from its data's entries (key, value), whichever map they come from.
    /// Text values are trimmed; a header value loses one trailing newline (files written by hand).
    pub fn from_entries(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Self, DataError> {
        let (mut upstream, mut expires_at, mut version) = (None, None, None);
        let mut headers = Vec::new();
        for (key, value) in entries {
            let text = |key: &'static str| {
                std::str::from_utf8(value)
                    .map(str::trim)
                    .map_err(|_| DataError::NotUtf8(key))
            };
            match key {
                UPSTREAM_KEY => upstream = Some(text(UPSTREAM_KEY)?),
                EXPIRES_AT_KEY => expires_at = Some(text(EXPIRES_AT_KEY)?),
                VERSION_KEY => version = Some(text(VERSION_KEY)?),
                _ => {
                    if let Some(name) = key.strip_prefix(HEADER_KEY_PREFIX) {
                        headers.push((name, value.strip_suffix(b"\n").unwrap_or(value)));
                    }
                }
            }
        }
        let upstream = upstream.ok_or(DataError::Missing(UPSTREAM_KEY))?;
        let expires_at = expires_at
            .filter(|s| !s.is_empty())
            .map(|s| {
                let at: jiff::Timestamp = s.parse().map_err(|_| DataError::ExpiresAt)?;
                u64::try_from(at.as_second())
                    .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
                    .map_err(|_| DataError::ExpiresAt)
            })
            .transpose()?;
        if headers.is_empty() {
            return Err(DataError::NoHeader);
        }
        Ok(CredentialData {
            upstream,
            headers,
            expires_at,
            version: version.unwrap_or_default(),
        })
    }
}

impl std::fmt::Debug for CredentialData<'_> {
    // Header values are secrets: only their names are printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialData")
            .field("upstream", &self.upstream)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .field("expires_at", &self.expires_at.map(rfc3339_seconds))
            .field("version", &self.version)
            .finish()
    }
}

/// `t` as RFC 3339 in whole seconds (UTC): the form of `expires-at`.
pub fn rfc3339_seconds(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let written = CredentialData {
            upstream: "https://mcp.example.com/mcp",
            headers: vec![("Authorization", b"Bearer abc")],
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
            version: "v1",
        };
        let data = written.to_data();
        assert_eq!(data["expires-at"], b"2030-03-17T17:46:40Z");
        assert_eq!(data["header.Authorization"], b"Bearer abc");
        let read =
            CredentialData::from_entries(data.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
        assert_eq!(read, written);
        assert!(!format!("{read:?}").contains("abc"));
    }

    #[test]
    fn bad_data_is_refused_naming_the_key() {
        let read =
            |pairs: &[(&'static str, &'static [u8])]| CredentialData::from_entries(pairs.iter().copied());
        assert_eq!(read(&[("header.X", b"v")]), Err(DataError::Missing("upstream")));
        assert_eq!(read(&[("upstream", b"https://x")]), Err(DataError::NoHeader));
        assert_eq!(
            read(&[
                ("upstream", b"https://x"),
                ("header.X", b"v"),
                ("expires-at", b"soon")
            ]),
            Err(DataError::ExpiresAt)
        );
        assert_eq!(
            read(&[("upstream", b"\xff"), ("header.X", b"v")]),
            Err(DataError::NotUtf8("upstream"))
        );
        let ok = read(&[
            ("upstream", b" https://x\n"),
            ("header.X", b"v\n"),
            ("expires-at", b""),
        ])
        .unwrap();
        assert_eq!(
            (ok.upstream, ok.headers[0].1, ok.expires_at),
            ("https://x", &b"v"[..], None)
        );
    }

    #[test]
    fn secret_name_defaults_to_the_credential_name_with_a_suffix() {
        assert_eq!(secret_name("github", None), "github-mcp-credential");
        assert_eq!(secret_name("github", Some("gh-token")), "gh-token");
    }
}

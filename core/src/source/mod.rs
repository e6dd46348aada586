//! Credential sources: how to obtain each kind of credential, shared by the operator and the
//! sidecar's standalone mode (which runs them in-process, without a cluster).
//!
//! The public API, in full:
//!
//! ```ignore
//! use mcp_credentials_core::source::{self, SecretResolver, ResolveError, Issued, SourceError};
//! use mcp_credentials_core::{SecretKeyRef, SecretString};
//!
//! // 1. Tell the sources where referenced secrets live (a Kubernetes Secret, a local file, ...).
//! struct Files(std::path::PathBuf);
//! impl SecretResolver for Files {
//!     async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
//!         std::fs::read_to_string(self.0.join(&r.name).join(&r.key))
//!             .map(|s| SecretString::new(s.trim_end()))
//!             .map_err(|_| ResolveError::NotFound { name: r.name.clone(), key: r.key.clone() })
//!     }
//! }
//!
//! // 2. Obtain a credential (one token request at most) with the safe outbound client.
//! let http = source::http_client(std::time::Duration::from_secs(15))?;
//! let issued: Issued = source::obtain("github", &cred.spec, &Files(dir), &http).await?;
//! //   issued.token, issued.not_before, issued.expires_at (None: does not expire),
//! //   issued.rotated_refresh_token (Some: persist it BEFORE using the new token).
//!
//! // 3. The header to attach: ("Authorization", "Bearer ...") unless spec.inject says otherwise.
//! let (name, value) = source::header(&cred.spec, &issued);
//!
//! // 4. When to renew, and how long to wait after a failure: `crate::timing`.
//! let renew_at = issued.expires_at.map(|exp| timing::renewal_time(issued.not_before, exp, cred.spec.refresh.as_ref(), "ns/name"));
//! // On Err(e): e.category() is "transient_error" | "invalid_grant" | "config_error";
//! // invalid_grant is terminal until the referenced secret changes; e.to_string() holds no secret.
//! ```
//!
//! Sources implemented: `oauth2` (clientCredentials, refreshToken; client_secret_basic,
//! client_secret_post, private_key_jwt, none), `apiKey`, `jwt` (minted with
//! [`SecretResolver::signing_key`]), `githubApp` and `session` (imported cookies, form login;
//! its liveness check is [`session::check`]). `tokenExchange` returns [`SourceError::Unsupported`].

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

use crate::{McpCredentialSpec, SecretKeyRef, SecretString};

/// The `githubApp` source.
pub mod github_app;
/// The `jwt` source and the JWT signing shared by every signing source.
pub mod jwt;
pub mod oauth2;
/// The `session` source: cookies and their liveness check (parsers public for the property tests).
pub mod session;
/// Parsing token endpoint answers and JWT claims (public for the property tests).
pub mod token_response;

pub use token_response::{TokenResponse, parse_token_response};

/// Looks up the value of a key in a Secret the credential references.
pub trait SecretResolver: Send + Sync {
    /// The value of `r.key` in the Secret `r.name`.
    fn get(&self, r: &SecretKeyRef) -> impl Future<Output = Result<SecretString, ResolveError>> + Send;

    /// The current key for minting `jwt` tokens with `alg`. Default: none (this process does not mint).
    fn signing_key(
        &self,
        alg: crate::JwtAlgorithm,
    ) -> impl Future<Output = Result<jwt::SigningKey, ResolveError>> + Send {
        let _ = alg;
        std::future::ready(Err(ResolveError::NoSigningKey))
    }
}

/// Why a referenced secret could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The Secret or its key does not exist.
    #[error("secret {name:?} has no key {key:?} (or does not exist)")]
    NotFound {
        /// The Secret's name.
        name: String,
        /// The key.
        key: String,
    },
    /// Reading failed for another reason (API server unreachable, permission denied...).
    #[error("reading secret {name:?} failed: {reason}")]
    Unavailable {
        /// The Secret's name.
        name: String,
        /// Why, without any secret value.
        reason: String,
    },
    /// This process has no JWT signing keys (the operator mints only with `--jwks-listen`).
    #[error(
        "this process does not mint JWTs: run the operator with --jwks-listen (the Helm chart does), \
         or standalone mode"
    )]
    NoSigningKey,
}

/// A credential just obtained from a source.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The credential itself (access token, API key).
    pub token: SecretString,
    /// When it became valid (whole seconds).
    pub not_before: SystemTime,
    /// When it expires (whole seconds); `None` when it does not expire.
    pub expires_at: Option<SystemTime>,
    /// A new refresh token the server issued (rotation). Persist it before publishing `token`:
    /// the old one may already be revoked.
    pub rotated_refresh_token: Option<SecretString>,
}

/// Why obtaining a credential failed. Messages never contain credential material.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The spec names a source this version cannot obtain yet.
    #[error("source {0} is not supported by this version")]
    Unsupported(&'static str),
    /// The spec is incomplete or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A referenced secret could not be read.
    #[error(transparent)]
    ResolveSecret(#[from] ResolveError),
    /// The client assertion for private_key_jwt could not be signed.
    #[error("signing the client assertion failed (is oauth2.privateKey a PEM RSA or EC P-256 key?): {0}")]
    SignAssertion(String),
    /// A JWT (minted token, GitHub App JWT) could not be signed.
    #[error("signing the JWT with {field} failed (is it a PEM RSA or EC P-256 private key?): {reason}")]
    SignJwt {
        /// The key, as the user names it (`githubApp.privateKey`).
        field: &'static str,
        /// Why, without key material.
        reason: String,
    },
    /// The server refused the configured credential (a GitHub App key, a session): the message
    /// names the field to fix.
    #[error("{message}")]
    Rejected {
        /// The status condition reason, such as `InstallationNotFound` or `SessionExpired`.
        reason: &'static str,
        /// What happened and how to fix it, without credential material.
        message: String,
    },
    /// The token endpoint could not be reached or did not answer in time.
    #[error("token request to {endpoint} failed: {reason}")]
    FetchToken {
        /// Scheme, host and path of the token endpoint.
        endpoint: String,
        /// Why (timeout, connection refused...).
        reason: String,
    },
    /// The server rejected the refresh token (or other grant): the user must re-authorize.
    #[error("the authorization server rejected the grant (invalid_grant){}", describe(.0))]
    InvalidGrant(Option<String>),
    /// The server answered an OAuth error other than invalid_grant.
    #[error("the authorization server answered HTTP {status} {error}{}", describe(.description))]
    OAuthError {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The `error_description`, shortened.
        description: Option<String>,
    },
    /// The server answered an error status without an OAuth error body.
    #[error("the token endpoint answered HTTP {0}")]
    HttpStatus(u16),
    /// The response body is not a valid token response.
    #[error("bad token response: {0}")]
    BadResponse(String),
    /// The issued token is a JWT whose `aud` is not the requested resource.
    #[error(
        "the issued token's audience {actual:?} does not include the requested resource {expected:?} (set oauth2.quirks.acceptAudiences to allow it)"
    )]
    AudienceMismatch {
        /// The requested resource.
        expected: String,
        /// The token's `aud`.
        actual: Vec<String>,
    },
}

fn describe(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl SourceError {
    /// The metric label and status reason family: `transient_error`, `invalid_grant` or `config_error`.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidGrant(_) => "invalid_grant",
            Self::FetchToken { .. } | Self::BadResponse(_) => "transient_error",
            Self::HttpStatus(s) | Self::OAuthError { status: s, .. } if *s >= 500 || *s == 429 => {
                "transient_error"
            }
            Self::OAuthError { error, .. } if error == "temporarily_unavailable" || error == "slow_down" => {
                "transient_error"
            }
            Self::ResolveSecret(ResolveError::Unavailable { .. }) => "transient_error",
            Self::HttpStatus(_)
            | Self::OAuthError { .. }
            | Self::Unsupported(_)
            | Self::Config(_)
            | Self::ResolveSecret(_)
            | Self::SignAssertion(_)
            | Self::SignJwt { .. }
            | Self::Rejected { .. }
            | Self::AudienceMismatch { .. } => "config_error",
        }
    }

    /// A CamelCase reason for a status condition or an event.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsupported(_) => "UnsupportedSource",
            Self::Config(_) => "InvalidConfiguration",
            Self::ResolveSecret(ResolveError::NoSigningKey) => "NoSigningKey",
            Self::ResolveSecret(_) => "SecretUnavailable",
            Self::SignAssertion(_) => "ClientAssertionFailed",
            Self::SignJwt { .. } => "SigningFailed",
            Self::Rejected { reason, .. } => reason,
            Self::FetchToken { .. } => "TokenEndpointUnreachable",
            Self::InvalidGrant(_) => "InvalidGrant",
            Self::OAuthError { .. } => "TokenEndpointRejected",
            Self::HttpStatus(_) => "TokenEndpointError",
            Self::BadResponse(_) => "BadTokenResponse",
            Self::AudienceMismatch { .. } => "AudienceMismatch",
        }
    }
}

/// The kind of source, as shown in `status.source`: `oauth2/clientCredentials`, `apiKey`, ...
pub fn kind(spec: &McpCredentialSpec) -> &'static str {
    let s = &spec.source;
    if let Some(o) = &s.oauth2 {
        return match o.grant {
            crate::OAuth2Grant::ClientCredentials => "oauth2/clientCredentials",
            crate::OAuth2Grant::RefreshToken => "oauth2/refreshToken",
        };
    }
    if let Some(t) = &s.token_exchange {
        return match t.grant {
            crate::ExchangeGrant::TokenExchange => "tokenExchange/tokenExchange",
            crate::ExchangeGrant::JwtBearer => "tokenExchange/jwtBearer",
        };
    }
    if s.jwt.is_some() {
        "jwt"
    } else if s.github_app.is_some() {
        "githubApp"
    } else if s.api_key.is_some() {
        "apiKey"
    } else if s.session.is_some() {
        "session"
    } else {
        "none"
    }
}

/// Every Secret key the source reads (to watch them, and to notice when they change).
pub fn referenced_secrets(spec: &McpCredentialSpec) -> Vec<&SecretKeyRef> {
    let s = &spec.source;
    let mut out = Vec::new();
    if let Some(o) = &s.oauth2 {
        out.extend(
            o.client_secret
                .iter()
                .chain(&o.private_key)
                .chain(&o.refresh_token),
        );
    }
    if let Some(a) = &s.api_key {
        out.push(&a.secret_key_ref);
    }
    if let Some(t) = &s.token_exchange {
        out.extend(t.client_secret.iter().chain(&t.subject.secret_key_ref));
    }
    if let Some(g) = &s.github_app {
        out.push(&g.private_key);
    }
    if let Some(sess) = &s.session {
        if let Some(c) = &sess.cookies {
            out.push(&c.secret_key_ref);
        }
        if let Some(f) = &sess.form_login {
            out.push(&f.username);
            out.push(&f.password);
        }
    }
    out
}

/// Obtains a credential for the McpCredential `name` from its source: at most one token request.
pub async fn obtain(
    name: &str,
    spec: &McpCredentialSpec,
    secrets: &impl SecretResolver,
    http: &reqwest::Client,
) -> Result<Issued, SourceError> {
    if let Some(o) = &spec.source.oauth2 {
        return oauth2::obtain(name, spec, o, secrets, http).await;
    }
    if let Some(a) = &spec.source.api_key {
        let key = secrets.get(&a.secret_key_ref).await?;
        if key.is_empty() {
            return Err(SourceError::Config(format!(
                "apiKey: key {:?} of secret {:?} is empty",
                a.secret_key_ref.key, a.secret_key_ref.name
            )));
        }
        return Ok(Issued {
            token: key,
            not_before: crate::timing::truncate(SystemTime::now()),
            expires_at: None,
            rotated_refresh_token: None,
        });
    }
    if let Some(j) = &spec.source.jwt {
        return jwt::obtain(spec, j, secrets).await;
    }
    if let Some(g) = &spec.source.github_app {
        return github_app::obtain(g, secrets, http).await;
    }
    if let Some(s) = &spec.source.session {
        return session::obtain(spec, s, secrets, http).await;
    }
    Err(SourceError::Unsupported(kind(spec)))
}

/// The header to attach and its exact value: `spec.inject`, or the source's default
/// (`Authorization: Bearer {token}`; a bare `{token}` for an API key in another header; `Cookie:
/// {token}` for a session).
pub fn header(spec: &McpCredentialSpec, issued: &Issued) -> (String, SecretString) {
    let inject = spec.inject.clone().unwrap_or_default();
    let session = spec.source.session.is_some();
    let name = inject
        .header
        .unwrap_or_else(|| if session { "Cookie" } else { "Authorization" }.to_owned());
    let format = inject.format.unwrap_or_else(|| {
        if (session || spec.source.api_key.is_some()) && !name.eq_ignore_ascii_case("authorization") {
            "{token}".to_owned()
        } else {
            "Bearer {token}".to_owned()
        }
    });
    (
        name,
        SecretString::new(format.replace("{token}", issued.token.expose())),
    )
}

/// The outbound HTTP client for token endpoints: rustls, no redirects (a token request must not be
/// replayed elsewhere), bounded connect and total time (a hanging server is a timeout, not a hang).
pub fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .user_agent(concat!("mcp-credentials/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A map-backed resolver for unit tests.
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    pub struct MapResolver(pub HashMap<(String, String), String>, pub Option<jwt::SigningKey>);

    impl MapResolver {
        pub fn with(mut self, name: &str, key: &str, value: &str) -> Self {
            self.0.insert((name.into(), key.into()), value.into());
            self
        }

        pub fn with_signing_key(mut self, key: jwt::SigningKey) -> Self {
            self.1 = Some(key);
            self
        }
    }

    impl SecretResolver for MapResolver {
        async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
            self.0
                .get(&(r.name.clone(), r.key.clone()))
                .map(|v| SecretString::new(v.clone()))
                .ok_or_else(|| ResolveError::NotFound {
                    name: r.name.clone(),
                    key: r.key.clone(),
                })
        }

        async fn signing_key(&self, alg: crate::JwtAlgorithm) -> Result<jwt::SigningKey, ResolveError> {
            self.1
                .clone()
                .filter(|k| k.algorithm == alg)
                .ok_or(ResolveError::NoSigningKey)
        }
    }
}

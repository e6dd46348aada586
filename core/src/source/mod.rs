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
//! // 2. Obtain a credential (one token request at most). The context holds the HTTP clients
//! //    (a guarded one for URLs learned from metadata) and the discovery cache: make one, share it.
//! let ctx = source::SourceContext::new(std::time::Duration::from_secs(15), OutboundPolicy::default())?;
//! let issued: Issued = source::obtain("github", &cred.spec, &Files(dir), &ctx).await?;
//! //   ctx.discovered(&cred.spec): what discovery found, when no token URL is configured.
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
//! client_secret_post, private_key_jwt, none), `tokenExchange` (RFC 8693 token exchange and the
//! RFC 7523 JWT-bearer grant; the subject from a service account or a Secret; cross-app access:
//! the subject exchanged for an ID-JAG at the identity provider first), `apiKey`, `jwt`
//! (minted with [`SecretResolver::signing_key`]), `githubApp` and `session` (imported cookies, form
//! login; its liveness check is [`session::check`]). Either token source discovers its token
//! endpoint when none is configured.

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

use crate::{McpCredentialSpec, SecretKeyRef, SecretString};

/// Finding a token endpoint from the upstream's metadata (RFC 9728, RFC 8414, OpenID Connect).
pub mod discovery;
/// The `githubApp` source.
pub mod github_app;
/// The `jwt` source and the JWT signing shared by every signing source.
pub mod jwt;
pub mod oauth2;
/// Checks and limits for every URL learned from a server.
pub mod outbound;
/// The `session` source: cookies and their liveness check (parsers public for the property tests).
pub mod session;
/// Signing in (authorization code with PKCE, client registration, the device grant) and what a
/// sign-in stores.
pub mod sign_in;
/// The `tokenExchange` source: RFC 8693 token exchange and the RFC 7523 JWT-bearer grant.
pub mod token_exchange;
/// Parsing token endpoint answers and JWT claims (public for the property tests).
pub mod token_response;

pub use outbound::OutboundPolicy;
pub use token_response::{TokenResponse, parse_token_response};

/// Looks up the value of a key in a Secret the credential references.
pub trait SecretResolver: Send + Sync {
    /// The value of `r.key` in the Secret `r.name`.
    fn get(&self, r: &SecretKeyRef) -> impl Future<Output = Result<SecretString, ResolveError>> + Send;

    /// A token of the service account `name` (in the credential's namespace) with `audience`,
    /// valid `expiration_seconds`: what the TokenRequest API issues. Only a resolver inside a
    /// cluster can; the default says so.
    fn service_account_token(
        &self,
        name: &str,
        _audience: &str,
        _expiration_seconds: i64,
    ) -> impl Future<Output = Result<SecretString, ResolveError>> + Send {
        let name = name.to_owned();
        async move {
            Err(ResolveError::ServiceAccountToken {
                name,
                reason: "this environment cannot issue service-account tokens (there is no cluster); \
                         use tokenExchange.subject.secretKeyRef instead"
                    .into(),
                transient: false,
            })
        }
    }

    /// The namespace of the McpCredential being obtained: every `jwt` token minted for it is bound
    /// to it ([`jwt::Binding`]). Default: `None`, only right where there are no namespaces
    /// (standalone mode); a resolver inside a cluster must say.
    fn namespace(&self) -> Option<&str> {
        None
    }

    /// The authorization server answered the refresh of `r` with a new refresh token: called as
    /// soon as the answer is read, before the access token is checked, and also when the access
    /// token is then refused (audience, expiry, a bad `expires_in`): a server that rotates has
    /// already revoked the old one, so the new one must be kept until it is written back.
    /// Default: nothing (the caller persists [`Issued::rotated_refresh_token`]).
    fn refresh_token_rotated(&self, r: &SecretKeyRef, token: &SecretString) {
        let _ = (r, token);
    }

    /// The command a person runs to sign the McpCredential `credential` in (shown in the
    /// messages of a credential that needs a sign-in). Default: none (the message says what is
    /// missing, not how to run the command here).
    fn sign_in_command(&self, credential: &str) -> Option<String> {
        let _ = credential;
        None
    }

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
    /// A service-account token could not be issued.
    #[error("requesting a token for service account {name:?} failed: {reason}")]
    ServiceAccountToken {
        /// The service account's name.
        name: String,
        /// Why.
        reason: String,
        /// True when trying again later may work (the API server did not answer).
        transient: bool,
    },
    /// The Secret is of a type the operator never reads as an input: a credential of the cluster
    /// itself (a service-account or bootstrap token), which a source would send to the URL the
    /// credential's author chose. Terminal until the spec names another Secret.
    #[error(
        "secret {name:?} is of type {type_}, which the operator never reads: it would send a cluster \
         credential wherever this McpCredential says. Reference a Secret of another type; for a service \
         account's identity use tokenExchange.subject.serviceAccount (a short-lived token for one audience)"
    )]
    RefusedType {
        /// The Secret's name.
        name: String,
        /// Its `type`.
        type_: String,
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
    /// A sign-in credential has no usable grant: never signed in, the grant revoked
    /// (`invalid_grant`), or the protected resource moved to another authorization server.
    /// Terminal until the sign-in's Secret changes.
    #[error("{why}; a person must sign in{}", command.as_deref().map(|c| format!(": run `{c}`")).unwrap_or_default())]
    SignInRequired {
        /// What is missing, without secret values.
        why: String,
        /// The command to run, when the process knows it.
        command: Option<String>,
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
    /// No token endpoint is configured and discovery found none.
    #[error("no tokenUrl is set and discovering the token endpoint of {upstream} failed: {failure}")]
    Discovery {
        /// The upstream (scheme, host, port and path).
        upstream: String,
        /// What was tried, and why each failed.
        failure: discovery::Failure,
    },
    /// The authorization server refused the service-account token as a subject: it does not
    /// trust the cluster's issuer or that audience. Not terminal: the next attempt uses a new token.
    #[error(
        "the authorization server rejected the service-account token (invalid_grant){}; check that it trusts the \
         cluster's service-account issuer and expects the audience in subject.serviceAccount.audience",
        describe(.0)
    )]
    SubjectRejected(Option<String>),
    /// The administrator's JWT policy does not let the credential's namespace mint for this
    /// audience. Nothing was minted.
    #[error(
        "jwt audience {audience:?} is not allowed for namespace {namespace:?} by the operator's JWT policy ({}); \
         a cluster administrator can allow it under audiences.{namespace} in the operator's --jwt-policy-file \
         (Helm value jwt.audiencePolicy)",
        allowed_list(.allowed)
    )]
    AudienceNotAllowed {
        /// The credential's namespace.
        namespace: String,
        /// The audience asked for (`jwt.audience`, else `spec.upstream`).
        audience: String,
        /// The patterns the policy allows this namespace.
        allowed: Vec<String>,
    },
    /// Obtaining the credential took longer than the operator's refresh deadline and was given up
    /// (transient: the next attempt backs off like any other).
    #[error(
        "the refresh did not finish within {seconds}s and was given up; the servers it talks to are too slow \
         or do not answer (the operator's --refresh-timeout)"
    )]
    RefreshTimedOut {
        /// The deadline, in seconds.
        seconds: u64,
    },
    /// Cross-app access: exchanging the subject token for an ID-JAG at the identity provider
    /// failed; the cause is classified like any token request's failure.
    #[error(
        "exchanging the subject token for an ID-JAG at the identity provider (tokenExchange.crossAppAccess.tokenUrl) \
         failed: {0}"
    )]
    IdentityProvider(Box<SourceError>),
    /// The issued token is a JWT whose `aud` is not the requested resource.
    #[error(
        "the issued token's audience {actual:?} does not include the requested resource {expected:?} (set quirks.acceptAudiences to allow it)"
    )]
    AudienceMismatch {
        /// The requested resource.
        expected: String,
        /// The token's `aud`.
        actual: Vec<String>,
    },
}

fn allowed_list(allowed: &[String]) -> String {
    if allowed.is_empty() {
        "it allows this namespace no audience".to_owned()
    } else {
        format!("it allows this namespace {}", allowed.join(", "))
    }
}

fn describe(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl SourceError {
    /// The metric label and status reason family: `transient_error`, `invalid_grant` or `config_error`.
    pub fn category(&self) -> &'static str {
        match self {
            Self::IdentityProvider(e) => e.category(),
            Self::InvalidGrant(_) | Self::SignInRequired { .. } => "invalid_grant",
            Self::FetchToken { .. } | Self::BadResponse(_) | Self::RefreshTimedOut { .. } => {
                "transient_error"
            }
            Self::HttpStatus(s) | Self::OAuthError { status: s, .. } if *s >= 500 || *s == 429 => {
                "transient_error"
            }
            Self::OAuthError { error, .. } if error == "temporarily_unavailable" || error == "slow_down" => {
                "transient_error"
            }
            Self::ResolveSecret(ResolveError::Unavailable { .. }) => "transient_error",
            Self::ResolveSecret(ResolveError::ServiceAccountToken { transient: true, .. }) => {
                "transient_error"
            }
            Self::Discovery { failure, .. } if failure.transient => "transient_error",
            Self::HttpStatus(_)
            | Self::Discovery { .. }
            | Self::SubjectRejected(_)
            | Self::OAuthError { .. }
            | Self::Unsupported(_)
            | Self::Config(_)
            | Self::ResolveSecret(_)
            | Self::SignAssertion(_)
            | Self::SignJwt { .. }
            | Self::Rejected { .. }
            | Self::AudienceNotAllowed { .. }
            | Self::AudienceMismatch { .. } => "config_error",
        }
    }

    /// A CamelCase reason for a status condition or an event.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::IdentityProvider(e) => e.reason(),
            Self::Unsupported(_) => "UnsupportedSource",
            Self::Config(_) => "InvalidConfiguration",
            Self::ResolveSecret(ResolveError::ServiceAccountToken { .. }) => "ServiceAccountTokenFailed",
            Self::ResolveSecret(ResolveError::NoSigningKey) => "NoSigningKey",
            Self::ResolveSecret(ResolveError::RefusedType { .. }) => "SecretTypeRefused",
            Self::ResolveSecret(_) => "SecretUnavailable",
            Self::Discovery { .. } => "DiscoveryFailed",
            Self::SubjectRejected(_) => "SubjectTokenRejected",
            Self::SignAssertion(_) => "ClientAssertionFailed",
            Self::SignJwt { .. } => "SigningFailed",
            Self::Rejected { reason, .. } => reason,
            Self::FetchToken { .. } => "TokenEndpointUnreachable",
            Self::RefreshTimedOut { .. } => "RefreshTimedOut",
            Self::InvalidGrant(_) => "InvalidGrant",
            Self::SignInRequired { .. } => "SignInRequired",
            Self::OAuthError { .. } => "TokenEndpointRejected",
            Self::HttpStatus(_) => "TokenEndpointError",
            Self::BadResponse(_) => "BadTokenResponse",
            Self::AudienceMismatch { .. } => "AudienceMismatch",
            Self::AudienceNotAllowed { .. } => "AudienceNotAllowed",
        }
    }

    /// True when a token endpoint answered or was tried: the request counts as a token request.
    pub fn reached_token_endpoint(&self) -> bool {
        if let Self::IdentityProvider(e) = self {
            return e.reached_token_endpoint();
        }
        matches!(
            self,
            Self::FetchToken { .. }
                | Self::InvalidGrant(_)
                | Self::OAuthError { .. }
                | Self::HttpStatus(_)
                | Self::BadResponse(_)
                | Self::SubjectRejected(_)
                | Self::AudienceMismatch { .. }
        )
    }
}

/// The kind of source, as shown in `status.source`: `oauth2/clientCredentials`, `apiKey`, ...
pub fn kind(spec: &McpCredentialSpec) -> &'static str {
    let s = &spec.source;
    if let Some(o) = &s.oauth2 {
        return match o.grant {
            crate::OAuth2Grant::ClientCredentials => "oauth2/clientCredentials",
            crate::OAuth2Grant::RefreshToken => "oauth2/refreshToken",
            crate::OAuth2Grant::AuthorizationCode => "oauth2/authorizationCode",
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

/// Every Secret key the source of the McpCredential `name` reads (to watch them, and to notice
/// when they change); a sign-in credential's include the keys its sign-in writes.
pub fn referenced_secrets(name: &str, spec: &McpCredentialSpec) -> Vec<SecretKeyRef> {
    let s = &spec.source;
    let mut out: Vec<&SecretKeyRef> = Vec::new();
    let mut signed_in = Vec::new();
    if let Some(o) = &s.oauth2 {
        out.extend(
            o.client_secret
                .iter()
                .chain(&o.private_key)
                .chain(&o.refresh_token),
        );
        if o.grant == crate::OAuth2Grant::AuthorizationCode {
            signed_in = vec![
                sign_in::refresh_token_ref(name, o),
                sign_in::access_token_ref(name, o),
                sign_in::registration_ref(name, o),
            ];
        }
    }
    if let Some(a) = &s.api_key {
        out.push(&a.secret_key_ref);
    }
    if let Some(t) = &s.token_exchange {
        out.extend(t.client_secret.iter().chain(&t.subject.secret_key_ref));
        out.extend(t.cross_app_access.iter().filter_map(|x| x.client_secret.as_ref()));
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
        if sess.browser.is_some() {
            signed_in.push(session::browser::cookies_ref(name));
        }
    }
    out.into_iter().cloned().chain(signed_in).collect()
}

/// Obtains a credential for the McpCredential `name` from its source: at most one token request
/// (two with `tokenExchange.crossAppAccess`: the identity provider's, then the authorization
/// server's), plus discovery's metadata requests when no token URL is configured and none is cached.
pub async fn obtain(
    name: &str,
    spec: &McpCredentialSpec,
    secrets: &impl SecretResolver,
    ctx: &SourceContext,
) -> Result<Issued, SourceError> {
    if let Some(o) = &spec.source.oauth2 {
        return oauth2::obtain(name, spec, o, secrets, ctx).await;
    }
    if let Some(t) = &spec.source.token_exchange {
        return token_exchange::obtain(spec, t, secrets, ctx).await;
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
        let binding = secrets.namespace().map(|namespace| jwt::Binding {
            namespace,
            credential: name,
            unprefixed_subject: false,
        });
        return jwt::obtain(spec, j, binding, ctx.jwt_policy.as_ref(), secrets).await;
    }
    if let Some(g) = &spec.source.github_app {
        return github_app::obtain(g, secrets, ctx.http()).await;
    }
    if let Some(s) = &spec.source.session {
        return session::obtain(name, spec, s, secrets, ctx.http()).await;
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

/// Whether obtaining the credential redeems a refresh token that the authorization server may
/// rotate (and revoke the grant for, if the spent one comes back): a token request of such a
/// source must never be cancelled once sent, and its answer must be kept until it is stored.
pub fn redeems_refresh_token(spec: &McpCredentialSpec) -> bool {
    spec.source.oauth2.as_ref().is_some_and(|o| match o.grant {
        crate::OAuth2Grant::RefreshToken | crate::OAuth2Grant::AuthorizationCode => true,
        crate::OAuth2Grant::ClientCredentials => false,
    })
}

/// The token URL a source configures, if any (`None`: discovered).
pub fn configured_token_url(spec: &McpCredentialSpec) -> Option<&str> {
    let s = &spec.source;
    s.oauth2
        .as_ref()
        .and_then(|o| o.token_url.as_deref())
        .or_else(|| s.token_exchange.as_ref().and_then(|t| t.token_url.as_deref()))
}

/// Whether the source talks to a token endpoint (and so may discover one).
fn has_token_endpoint(spec: &McpCredentialSpec) -> bool {
    spec.source.oauth2.is_some() || spec.source.token_exchange.is_some()
}

/// What every source shares across calls: the HTTP clients and the discovery cache. Make one per
/// process and pass it to every [`obtain`].
pub struct SourceContext {
    /// For URLs the user configured (token URLs, the upstream).
    http: reqwest::Client,
    /// For metadata URLs learned from a server: checked addresses and redirects.
    guarded: reqwest::Client,
    /// For discovered token endpoints: checked addresses, no redirects.
    guarded_token: reqwest::Client,
    policy: OutboundPolicy,
    discovery: discovery::Cache,
    /// The longest one discovery may take (`None`: bounded by each request's timeout only).
    discovery_budget: Option<Duration>,
    /// The administrator's rules for minted `jwt` tokens (`None`: any audience, every `sub` prefixed).
    jwt_policy: Option<jwt::MintPolicy>,
}

/// A token endpoint, configured or discovered.
pub(crate) struct TokenEndpoint {
    pub url: String,
    /// Discovered: requests go through the guarded client, and a failure drops the cache entry.
    pub discovered: bool,
    /// The authorization server's issuer, when discovered.
    pub issuer: Option<String>,
}

impl SourceContext {
    /// Clients with `timeout` for each request (connect, send and the whole body), and `policy`
    /// for every URL learned from a server.
    pub fn new(timeout: Duration, policy: OutboundPolicy) -> reqwest::Result<Self> {
        Ok(Self {
            http: http_client(timeout)?,
            guarded: outbound::guarded_client(timeout, policy, true)?,
            guarded_token: outbound::guarded_client(timeout, policy, false)?,
            policy,
            discovery: discovery::Cache::default(),
            discovery_budget: None,
            jwt_policy: None,
        })
    }

    /// Holds minted `jwt` tokens to `policy` (the operator's `--jwt-policy-file`).
    pub fn with_jwt_policy(mut self, policy: jwt::MintPolicy) -> Self {
        self.jwt_policy = Some(policy);
        self
    }

    /// Stops each discovery after `budget` (the operator: its refresh deadline minus the token
    /// request timeout, so that a refresh deadline never cuts a token request short).
    pub fn with_discovery_budget(mut self, budget: Duration) -> Self {
        self.discovery_budget = Some(budget);
        self
    }

    /// The client for URLs the user configured (a GitHub API URL, a login form, a session check).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// What discovery found for this credential, when its source discovers (no token URL set)
    /// and has done so within the cache's lifetime. No request is made.
    pub fn discovered(&self, spec: &McpCredentialSpec) -> Option<crate::DiscoveryStatus> {
        if !has_token_endpoint(spec) || configured_token_url(spec).is_some() {
            return None;
        }
        self.discovery
            .get(&spec.upstream)
            .map(|d| crate::DiscoveryStatus {
                resource_metadata: Some(d.resource_metadata),
                issuer: Some(d.issuer),
                token_endpoint: Some(d.token_endpoint),
            })
    }

    /// The configured token URL, else the discovered one.
    pub(crate) async fn token_endpoint(
        &self,
        spec: &McpCredentialSpec,
        configured: Option<&str>,
    ) -> Result<TokenEndpoint, SourceError> {
        if let Some(url) = configured {
            return Ok(TokenEndpoint {
                url: url.to_owned(),
                discovered: false,
                issuer: None,
            });
        }
        let d = self.discover(spec, true).await?;
        Ok(TokenEndpoint {
            url: d.token_endpoint,
            discovered: true,
            issuer: Some(d.issuer),
        })
    }

    /// Discovery for `spec.upstream` (cached when `cached`), with the MCP 2025-03-26 fallbacks for
    /// sign-in credentials.
    pub(crate) async fn discover(
        &self,
        spec: &McpCredentialSpec,
        cached: bool,
    ) -> Result<discovery::Discovered, SourceError> {
        let clients = discovery::Clients {
            direct: &self.http,
            guarded: &self.guarded,
            policy: self.policy,
            budget: self.discovery_budget,
            fallback: sign_in::applies(spec),
        };
        let found = if cached {
            discovery::token_endpoint(&self.discovery, &spec.upstream, &clients).await
        } else {
            discovery::discover(&spec.upstream, &clients).await
        };
        found.map_err(|failure| SourceError::Discovery {
            upstream: oauth2::endpoint_label(&spec.upstream),
            failure,
        })
    }

    /// The guarded client (checked addresses, redirects followed and checked), for the sign-in's
    /// registration requests to servers learned from metadata.
    pub(crate) fn guarded_token(&self) -> &reqwest::Client {
        &self.guarded_token
    }

    /// The client for token requests to `endpoint`.
    pub(crate) fn client(&self, endpoint: &TokenEndpoint) -> &reqwest::Client {
        if endpoint.discovered {
            &self.guarded_token
        } else {
            &self.http
        }
    }

    /// After a failed token request: a discovered endpoint that did not answer like a token
    /// endpoint (unreachable, an error status without an OAuth error, garbage) is forgotten, so
    /// the next attempt discovers again (the server may have moved it).
    pub(crate) fn token_request_failed(
        &self,
        spec: &McpCredentialSpec,
        endpoint: &TokenEndpoint,
        e: &SourceError,
    ) {
        if endpoint.discovered
            && matches!(
                e,
                SourceError::FetchToken { .. } | SourceError::HttpStatus(_) | SourceError::BadResponse(_)
            )
        {
            self.discovery.invalidate(&spec.upstream);
        }
    }
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
pub(crate) mod test_support;

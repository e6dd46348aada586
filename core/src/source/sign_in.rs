//! Signing in a person once, the way the MCP authorization spec wants a client to (2025-11-25,
//! and 2026-07-28 where stricter), and what the sign-in stores for the single writer that keeps
//! the grant alive afterwards.
//!
//! The flow ([`login`]): discovery (RFC 9728, RFC 8414 / OpenID Connect, the 2025-03-26
//! fallbacks); a client: the pre-registered `oauth2.clientId`, else a Client ID Metadata Document
//! when the server supports one and a URL is configured, else RFC 7591 Dynamic Client
//! Registration (`application_type: native`); the authorization code grant with PKCE S256 (a
//! server that does not list S256 is refused), `state`, RFC 8707 `resource` on the authorization
//! and the token request, the RFC 9207 `iss` checked before the code is redeemed; the redirect to a
//! one-shot listener on 127.0.0.1 (RFC 8252), or the RFC 8628 device grant.
//!
//! What a sign-in stores ([`SignedIn`]): the refresh token (key [`REFRESH_TOKEN_KEY`]), or, when
//! the server issues none, the access token itself with its expiry (key [`ACCESS_TOKEN_KEY`],
//! [`HeldToken`]: served until its renewal time, then a new sign-in is asked for), and the
//! client registrations keyed by issuer (key [`REGISTRATION_KEY`], [`Registrations`]), in the
//! credential's sign-in Secret ([`secret_name`]) or the standalone secrets directory. Every writer
//! (`mcp-credentials-sidecar login`, `kubectl mcpcred login`) and reader (the `authorizationCode`
//! refresh in [`super::oauth2`]) uses these types.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    SourceContext, SourceError,
    discovery::Discovered,
    oauth2::{self, endpoint_label, form_encode},
    outbound,
    token_response::{parse_token_response, refresh_token_in},
};
use crate::{ClientAuth, McpCredentialSpec, OAuth2Grant, OAuth2Source, SecretKeyRef, SecretString};

/// The sign-in Secret's key holding the refresh token (rotated in place by the single writer).
pub const REFRESH_TOKEN_KEY: &str = "refresh-token";
/// The sign-in Secret's key holding the access token of a sign-in that gave no refresh token, with
/// when it was issued and expires ([`HeldToken`], JSON); empty when there is a refresh token.
pub const ACCESS_TOKEN_KEY: &str = "access-token";
/// The sign-in Secret's key holding the client registrations, JSON keyed by issuer.
pub const REGISTRATION_KEY: &str = "registration";
/// The path of the loopback redirect URI.
pub const CALLBACK_PATH: &str = "/callback";
/// How long a person has to finish signing in in the browser.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest request head the loopback listener reads; a real redirect is a few KiB.
const MAX_CALLBACK_HEAD: usize = 32 * 1024;
/// How long one connection to the loopback listener may take to send its request head: a browser's
/// speculative connection that never sends one must not hold anything up.
const CALLBACK_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The `client_name` a registration sends.
const CLIENT_NAME: &str = "mcp-credentials";

/// Whether `spec` is a sign-in credential (`oauth2.grant: authorizationCode`).
pub fn applies(spec: &McpCredentialSpec) -> bool {
    spec.source
        .oauth2
        .as_ref()
        .is_some_and(|o| o.grant == OAuth2Grant::AuthorizationCode)
}

/// The sign-in Secret of the McpCredential `credential`: `oauth2.signIn.secretName`, default
/// `<credential>-sign-in`.
pub fn secret_name(credential: &str, o: &OAuth2Source) -> String {
    o.sign_in
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| format!("{credential}-sign-in"))
}

/// Where the refresh token of a sign-in credential is.
pub fn refresh_token_ref(credential: &str, o: &OAuth2Source) -> SecretKeyRef {
    SecretKeyRef {
        name: secret_name(credential, o),
        key: REFRESH_TOKEN_KEY.into(),
    }
}

/// Where the access token of a sign-in without a refresh token is.
pub fn access_token_ref(credential: &str, o: &OAuth2Source) -> SecretKeyRef {
    SecretKeyRef {
        name: secret_name(credential, o),
        key: ACCESS_TOKEN_KEY.into(),
    }
}

/// Where the registrations of a sign-in credential are.
pub fn registration_ref(credential: &str, o: &OAuth2Source) -> SecretKeyRef {
    SecretKeyRef {
        name: secret_name(credential, o),
        key: REGISTRATION_KEY.into(),
    }
}

/// How a client came to be known to an authorization server.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationMethod {
    /// `oauth2.clientId`, registered by a person beforehand.
    PreRegistered,
    /// A Client ID Metadata Document: the `client_id` is its URL.
    ClientMetadataDocument,
    /// RFC 7591 Dynamic Client Registration.
    Dynamic,
}

/// One client registration with one authorization server. Never reused with another server
/// (SEP-2352): [`Registrations`] keys them by issuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The client ID.
    pub client_id: String,
    /// The client secret the server issued, if any (a registered confidential client).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_secret")]
    pub client_secret: Option<SecretString>,
    /// How the client authenticates at the token endpoint (`none`, `client_secret_basic`,
    /// `client_secret_post`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_method: Option<String>,
    /// The redirect URIs registered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_uris: Vec<String>,
    /// How it was registered.
    pub method: RegistrationMethod,
    /// The scopes granted at the last sign-in, space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// When the last sign-in with this client finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_in_at: Option<String>,
    /// The `scope` a dynamic registration asked for (the server may refuse any other scope to this
    /// client); absent when it sent none, or for a registration made before this was recorded
    /// (which sent `oauth2.scopes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_scope: Option<String>,
}

mod opt_secret {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::SecretString;

    pub fn serialize<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(v.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(SecretString::new))
    }
}

impl Registration {
    /// The registration of the pre-registered `oauth2.clientId`.
    pub fn pre_registered(o: &OAuth2Source) -> Self {
        Registration {
            client_id: o.client_id.clone(),
            client_secret: None,
            token_endpoint_auth_method: None,
            redirect_uris: Vec::new(),
            method: RegistrationMethod::PreRegistered,
            scope: None,
            signed_in_at: None,
            registered_scope: None,
        }
    }

    /// The client authentication this registration uses at the token endpoint.
    fn auth(&self) -> ClientAuth {
        match (self.token_endpoint_auth_method.as_deref(), &self.client_secret) {
            (Some("client_secret_post"), Some(_)) => ClientAuth::ClientSecretPost,
            (Some("none"), _) | (_, None) => ClientAuth::None,
            (_, Some(_)) => ClientAuth::ClientSecretBasic,
        }
    }
}

/// Every registration of a credential, keyed by the authorization server's issuer: the JSON in
/// the sign-in Secret's [`REGISTRATION_KEY`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Registrations(pub BTreeMap<String, Registration>);

impl Registrations {
    /// Parses the stored JSON; the message says which key is broken, never its content.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            format!(
                "the sign-in's {REGISTRATION_KEY:?} is not the JSON a sign-in writes (line {}, column {}); \
                 sign in again to replace it",
                e.line(),
                e.column()
            )
        })
    }

    /// The JSON to store.
    pub fn to_json(&self) -> SecretString {
        SecretString::new(serde_json::to_string_pretty(self).expect("registrations serialize"))
    }

    /// The scopes granted at the latest sign-in (of any issuer), if it said.
    pub fn granted_scope(&self) -> Option<&str> {
        self.0
            .values()
            .max_by(|a, b| a.signed_in_at.cmp(&b.signed_in_at))
            .and_then(|r| r.scope.as_deref())
    }
}

/// The result of a sign-in: what is stored, every key at once.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The authorization server signed in with.
    pub issuer: String,
    /// The refresh token, when the server issued one.
    pub refresh_token: Option<SecretString>,
    /// The access token, kept when the server issued no refresh token (it cannot be renewed: a
    /// person signs in again before it expires).
    pub held: Option<HeldToken>,
    /// Every registration, this sign-in's included.
    pub registrations: Registrations,
    /// When the access token issued with it expires, if it said.
    pub expires_in: Option<Duration>,
    /// The step-up this sign-in asked for, settled ([`step_up::StepUp::signed_in`]).
    pub step_up: Option<step_up::StepUp>,
}

impl SignedIn {
    /// The sign-in Secret's data (key, value): what `login` writes, in one write. Every key is
    /// written, the unused one empty, so that what an earlier sign-in left is never used.
    pub fn data(&self) -> [(&'static str, SecretString); 3] {
        let empty = || SecretString::new(String::new());
        [
            (
                REFRESH_TOKEN_KEY,
                self.refresh_token.clone().unwrap_or_else(empty),
            ),
            (
                ACCESS_TOKEN_KEY,
                self.held.as_ref().map(HeldToken::to_json).unwrap_or_else(empty),
            ),
            (REGISTRATION_KEY, self.registrations.to_json()),
        ]
    }

    /// The settled step-up to store beside [`SignedIn::data`] (key [`step_up::STEP_UP_KEY`]), when
    /// this sign-in asked for one: its attempts stay counted.
    pub fn step_up_data(&self) -> Option<(&'static str, SecretString)> {
        self.step_up.as_ref().map(|s| (step_up::STEP_UP_KEY, s.to_json()))
    }
}

/// The access token of a sign-in that gave no refresh token, as stored under [`ACCESS_TOKEN_KEY`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeldToken {
    /// The access token.
    pub token: SecretString,
    /// When it was issued.
    pub issued_at: SystemTime,
    /// When it expires, if the server or the token said.
    pub expires_at: Option<SystemTime>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeldTokenJson {
    access_token: String,
    issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
}

impl HeldToken {
    /// The JSON stored: `{"accessToken": ..., "issuedAt": <unix seconds>, "expiresAt": ...}`.
    pub fn to_json(&self) -> SecretString {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let json = HeldTokenJson {
            access_token: self.token.expose().to_owned(),
            issued_at: secs(self.issued_at),
            expires_at: self.expires_at.map(secs),
        };
        SecretString::new(serde_json::to_string(&json).expect("a held token serializes"))
    }

    /// Reads what [`HeldToken::to_json`] wrote; the error names the key and never holds the token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let j: HeldTokenJson = serde_json::from_str(text).map_err(|e| {
            format!(
                "the sign-in's {ACCESS_TOKEN_KEY:?} is not what a sign-in writes (line {}, column {}): sign in again",
                e.line(),
                e.column()
            )
        })?;
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        Ok(HeldToken {
            token: SecretString::new(j.access_token),
            issued_at: at(j.issued_at),
            expires_at: j.expires_at.map(at),
        })
    }
}

/// Why signing in failed. Every message says what to do; none holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The McpCredential is not a sign-in credential.
    #[error(
        "the McpCredential is not a sign-in credential: set spec.source.oauth2.grant to authorizationCode"
    )]
    NotSignIn,
    /// Discovery failed.
    #[error(
        "{0}; check spec.upstream, or set oauth2.tokenUrl and register a client (oauth2.clientId) if the server \
         publishes no metadata"
    )]
    Discovery(#[source] SourceError),
    /// The server does not support PKCE S256.
    #[error(
        "the authorization server {issuer} does not list S256 in code_challenge_methods_supported ({listed}): \
         signing in without PKCE is refused. Ask its operator to enable PKCE S256"
    )]
    NoS256 {
        /// The issuer.
        issuer: String,
        /// What it lists.
        listed: String,
    },
    /// The server has no authorization endpoint.
    #[error(
        "the authorization server {issuer} publishes no authorization_endpoint{device}; it cannot sign a person in"
    )]
    NoAuthorizationEndpoint {
        /// The issuer.
        issuer: String,
        /// A hint about the device grant.
        device: &'static str,
    },
    /// `--device` for a server without a device authorization endpoint.
    #[error(
        "the authorization server {issuer} offers no device authorization grant (no device_authorization_endpoint): \
         sign in without --device, in a browser on this machine"
    )]
    NoDeviceGrant {
        /// The issuer.
        issuer: String,
    },
    /// No way to get a client.
    #[error(
        "the authorization server {issuer} offers no way for this client to register (no registration_endpoint{cimd}): \
         register a client there by hand and set oauth2.clientId (and oauth2.clientSecret if it has one)"
    )]
    NoRegistration {
        /// The issuer.
        issuer: String,
        /// What about CIMD.
        cimd: &'static str,
    },
    /// The registration request failed.
    #[error(
        "registering a client at {endpoint} failed: {reason}; register a client by hand and set oauth2.clientId instead"
    )]
    Registration {
        /// The registration endpoint (scheme, host, path).
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The loopback listener could not be opened.
    #[error("cannot listen on 127.0.0.1 for the redirect: {0}; use --device to sign in on another device")]
    Listen(#[source] std::io::Error),
    /// A redirect arrived with a state this sign-in did not send.
    #[error(
        "the redirect to this machine carried a state that this sign-in did not send (a stale browser tab, or another \
         page trying to inject its own authorization code): nothing was redeemed or stored. Run the command again and \
         finish the sign-in in the tab it opens"
    )]
    StateMismatch,
    /// The redirect's `iss` is not the issuer the request went to.
    #[error(
        "the redirect's iss {got:?} is not the authorization server the request went to ({expected}) (RFC 9207: a \
         mix-up attack, or a misconfigured server): nothing was redeemed or stored. Run the command again; if it \
         repeats, the server's metadata and its responses disagree"
    )]
    IssMismatch {
        /// The issuer asked.
        expected: String,
        /// The `iss` received (shortened).
        got: String,
    },
    /// The server promised `iss` and sent none.
    #[error(
        "the redirect has no iss although {expected} advertises authorization_response_iss_parameter_supported \
         (RFC 9207): nothing was redeemed or stored. Run the command again"
    )]
    IssMissing {
        /// The issuer.
        expected: String,
    },
    /// The person (or the server) declined.
    #[error(
        "the authorization server answered {error}{}: nothing was stored. {}",
        describe(.description),
        if .error == "access_denied" { "Consent was denied: run the command again and allow access" }
        else { "Check the credential's scopes and client, then run the command again" }
    )]
    Denied {
        /// The OAuth `error`.
        error: String,
        /// Its `error_description`, shortened.
        description: Option<String>,
    },
    /// The redirect had neither a code nor an error.
    #[error("the redirect carried no authorization code: nothing was stored. Run the command again")]
    NoCode,
    /// The person did not finish in time.
    #[error("no sign-in finished within {0}s: nothing was stored. Run the command again")]
    TimedOut(u64),
    /// Redeeming the code (or polling the device grant) failed.
    #[error("redeeming the authorization code failed: {0}. Nothing was stored; run the command again")]
    Token(#[source] SourceError),
    /// The stored registrations are unreadable.
    #[error("{0}")]
    Stored(String),
    /// A pre-registered client's secret could not be read.
    #[error(transparent)]
    Secret(#[from] super::ResolveError),
}

fn describe(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
}

/// What a person is asked to do.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Open this URL in a browser on this machine.
    Browser {
        /// The authorization request.
        url: String,
    },
    /// On any device, open `verification_uri` and enter `user_code`.
    Device {
        /// Where to go.
        verification_uri: String,
        /// The same with the code filled in, if the server gives one.
        verification_uri_complete: Option<String>,
        /// The code to enter.
        user_code: String,
    },
}

impl Prompt {
    /// Tells the person on stderr, and opens the URL with `browser_command <url>` (default
    /// `xdg-open`): what both `login` commands do with a prompt.
    pub fn show(&self, browser_command: Option<&str>) {
        match self {
            Prompt::Browser { url } => {
                eprintln!("Open this URL in a browser to sign in (opening it now):\n\n  {url}\n");
                let mut words: Vec<String> = browser_command
                    .unwrap_or("xdg-open")
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                words.push(url.clone());
                if let Err(e) = std::process::Command::new(&words[0])
                    .args(&words[1..])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                {
                    eprintln!("(could not start {:?}: {e}; open the URL yourself)", words[0]);
                }
            }
            Prompt::Device {
                verification_uri,
                verification_uri_complete,
                user_code,
            } => {
                eprintln!("On any device, open {verification_uri} and enter the code {user_code}");
                if let Some(u) = verification_uri_complete {
                    eprintln!("(or open {u})");
                }
            }
        }
    }
}

/// How to sign in.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The RFC 8628 device grant instead of a browser on this machine.
    pub device: bool,
    /// Overrides `oauth2.signIn.clientMetadataUrl`.
    pub client_metadata_url: Option<String>,
    /// How long to wait for the person (default [`BROWSER_TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// The stored step-up: its scopes are asked for besides the usual ones (SEP-2350).
    pub step_up: Option<step_up::StepUp>,
}

/// Signs the McpCredential `credential` in: discovery, registration, the person's consent (shown
/// with `prompt`), the code redeemed. `existing`: the registrations stored so far (reused for the
/// same issuer when they fit); `client_secret`: the pre-registered client's secret, if any.
pub async fn login(
    ctx: &SourceContext,
    spec: &McpCredentialSpec,
    existing: Option<Registrations>,
    client_secret: Option<SecretString>,
    options: &Options,
    prompt: impl FnOnce(&Prompt),
) -> Result<SignedIn, SignInError> {
    let o = spec
        .source
        .oauth2
        .as_ref()
        .filter(|o| o.grant == OAuth2Grant::AuthorizationCode);
    let o = o.ok_or(SignInError::NotSignIn)?;
    let d = discover(ctx, spec).await?;
    let mut registrations = existing.unwrap_or_default();
    let resource = oauth2::resource(spec, o).map(str::to_owned);
    let scope = match options.step_up.as_ref().filter(|s| !s.scope.trim().is_empty()) {
        Some(s) => Some(step_up::union(scope(&d, o).as_deref(), &s.scope)),
        None => scope(&d, o),
    };
    let timeout = options.timeout.unwrap_or(BROWSER_TIMEOUT);
    let cimd = options
        .client_metadata_url
        .clone()
        .or_else(|| o.sign_in.as_ref().and_then(|s| s.client_metadata_url.clone()));
    let previous = registrations.0.get(&d.issuer).cloned();
    let registration_scope = registration_scope(o, options.step_up.as_ref().map(|s| s.scope.as_str()));

    let (registration, tokens) = if options.device {
        let endpoint =
            d.server
                .device_authorization_endpoint
                .clone()
                .ok_or_else(|| SignInError::NoDeviceGrant {
                    issuer: d.issuer.clone(),
                })?;
        let reg = register(
            ctx,
            &d,
            o,
            previous.as_ref(),
            None,
            cimd.as_deref(),
            registration_scope.as_deref(),
        )
        .await?;
        let secret = client_secret.clone().or_else(|| reg.client_secret.clone());
        let client = Client::new(o, &reg, secret);
        let grant = device_start(ctx, &d, &endpoint, &client, scope.as_deref(), resource.as_deref()).await?;
        prompt(&Prompt::Device {
            verification_uri: grant.verification_uri.clone(),
            verification_uri_complete: grant.verification_uri_complete.clone(),
            user_code: grant.user_code.clone(),
        });
        let tokens = tokio::time::timeout(
            timeout.min(grant.expires_in),
            device_poll(ctx, &d, &client, &grant, resource.as_deref()),
        )
        .await
        .map_err(|_| SignInError::TimedOut(timeout.min(grant.expires_in).as_secs()))??;
        (reg, tokens)
    } else {
        if d.server.authorization_endpoint.is_none() {
            return Err(SignInError::NoAuthorizationEndpoint {
                issuer: d.issuer.clone(),
                device: if d.server.device_authorization_endpoint.is_some() {
                    " (it offers the device grant: use --device)"
                } else {
                    ""
                },
            });
        }
        // The same port as the registration's redirect URI when it is free: servers that match
        // redirect URIs exactly (ignoring RFC 8252 §7.3) keep accepting the registered one.
        let preferred = previous
            .as_ref()
            .and_then(|r| r.redirect_uris.iter().find_map(|u| loopback_port(u)));
        let listener = Loopback::bind(preferred).await?;
        let redirect_uri = listener.redirect_uri();
        let reg = register(
            ctx,
            &d,
            o,
            previous.as_ref(),
            Some(&redirect_uri),
            cimd.as_deref(),
            registration_scope.as_deref(),
        )
        .await?;
        let secret = client_secret.clone().or_else(|| reg.client_secret.clone());
        let client = Client::new(o, &reg, secret);
        let pending = Pending::new(
            &d,
            &client.id,
            &redirect_uri,
            scope.as_deref(),
            resource.as_deref(),
        );
        prompt(&Prompt::Browser {
            url: pending.url.clone(),
        });
        let code = tokio::time::timeout(timeout, listener.wait(&pending))
            .await
            .map_err(|_| SignInError::TimedOut(timeout.as_secs()))??;
        let tokens = redeem(ctx, &d, &client, &code, &pending, resource.as_deref()).await?;
        (reg, tokens)
    };
    // No refresh token: keep the access token itself (checked like any issued token), served
    // until its renewal time, when a person is asked to sign in again.
    let held = match &tokens.refresh_token {
        Some(_) => None,
        None => {
            let issued = oauth2::issued(
                super::token_response::TokenResponse {
                    access_token: tokens.access_token,
                    expires_in: tokens.expires_in,
                    refresh_token: None,
                },
                resource.as_deref(),
                o.quirks.as_ref(),
                None,
            )
            .map_err(SignInError::Token)?;
            Some(HeldToken {
                token: issued.token,
                issued_at: issued.not_before,
                expires_at: issued.expires_at,
            })
        }
    };
    let mut registration = registration;
    registration.scope = tokens.scope.or(scope);
    registration.signed_in_at = Some(jiff::Timestamp::now().to_string());
    registrations.0.insert(d.issuer.clone(), registration);
    Ok(SignedIn {
        issuer: d.issuer,
        refresh_token: tokens.refresh_token,
        held,
        registrations,
        expires_in: tokens.expires_in,
        step_up: options.step_up.clone().map(step_up::StepUp::signed_in),
    })
}

/// Discovery for a sign-in (never cached: a person is waiting for the current truth), with the
/// checks that must pass before anything is sent: an authorization server that lists PKCE S256.
pub async fn discover(ctx: &SourceContext, spec: &McpCredentialSpec) -> Result<Discovered, SignInError> {
    let mut d = ctx.discover(spec, false).await.map_err(SignInError::Discovery)?;
    if let Some(url) = spec.source.oauth2.as_ref().and_then(|o| o.token_url.clone()) {
        d.token_endpoint = url;
    }
    // Without metadata (the 2025-03-26 default endpoints) there is no list to check: S256 is sent.
    if !d.server.default_endpoints {
        let methods = d.server.code_challenge_methods.clone().unwrap_or_default();
        if !methods.iter().any(|m| m == "S256") {
            return Err(SignInError::NoS256 {
                issuer: d.issuer.clone(),
                listed: if d.server.code_challenge_methods.is_none() {
                    "it has no code_challenge_methods_supported".into()
                } else {
                    format!("it lists {methods:?}")
                },
            });
        }
    }
    Ok(d)
}

/// The scopes to ask for, in the spec's order: `oauth2.scopes` when set, else the 401 challenge's
/// `scope`, else the protected resource's `scopes_supported`, else none (the server's default);
/// `offline_access` added when the authorization server lists it, and removed when it does not.
pub fn scope(d: &Discovered, o: &OAuth2Source) -> Option<String> {
    let mut scopes: Vec<String> = if !o.scopes.is_empty() {
        o.scopes.clone()
    } else if let Some(s) = d.challenge_scope.as_deref().filter(|s| !s.trim().is_empty()) {
        s.split_whitespace().map(str::to_owned).collect()
    } else {
        d.resource_scopes.clone()
    };
    if scopes.is_empty() {
        return None;
    }
    let listed = d.server.scopes_supported.iter().any(|s| s == "offline_access");
    scopes.retain(|s| s != "offline_access" || listed);
    if listed && !scopes.iter().any(|s| s == "offline_access") {
        scopes.push("offline_access".into());
    }
    let mut seen = Vec::new();
    scopes.retain(|s| {
        let new = !seen.contains(s);
        seen.push(s.clone());
        new
    });
    Some(scopes.join(" "))
}

/// The port of a loopback redirect URI `http://127.0.0.1:<port>/callback`.
fn loopback_port(uri: &str) -> Option<u16> {
    let u = reqwest::Url::parse(uri).ok()?;
    (u.scheme() == "http" && u.host_str() == Some("127.0.0.1") && u.path() == CALLBACK_PATH)
        .then(|| u.port())
        .flatten()
}

/// The `scope` a dynamic registration asks for: `oauth2.scopes` with a step-up's scopes, since a
/// server may refuse a client any scope it was not registered for; none (the server's default)
/// when `oauth2.scopes` is empty.
fn registration_scope(o: &OAuth2Source, step_up: Option<&str>) -> Option<String> {
    (!o.scopes.is_empty()).then(|| step_up::union(Some(&o.scopes.join(" ")), step_up.unwrap_or("")))
}

/// Whether a dynamic registration made for `registered` (`None`: `oauth2.scopes`, what a
/// registration sent before this was recorded) covers every scope of `wanted`.
fn covers(o: &OAuth2Source, registered: Option<&str>, wanted: Option<&str>) -> bool {
    let configured = o.scopes.join(" ");
    let registered = registered.unwrap_or(&configured);
    wanted.is_none_or(|w| {
        w.split_whitespace()
            .all(|s| registered.split_whitespace().any(|r| r == s))
    })
}

/// The client to use with `d`: the pre-registered one, a registration kept for this issuer that
/// fits (its redirect URI, and the scopes it was registered for cover `scope`), a Client ID
/// Metadata Document, else a new dynamic registration asking for `scope`. `redirect_uri`: the
/// loopback listener's (`None` for the device grant).
pub async fn register(
    ctx: &SourceContext,
    d: &Discovered,
    o: &OAuth2Source,
    previous: Option<&Registration>,
    redirect_uri: Option<&str>,
    client_metadata_url: Option<&str>,
    scope: Option<&str>,
) -> Result<Registration, SignInError> {
    let redirect_uris: Vec<String> = redirect_uri.map(str::to_owned).into_iter().collect();
    if !o.client_id.is_empty() {
        return Ok(Registration {
            redirect_uris,
            ..Registration::pre_registered(o)
        });
    }
    if d.server.client_id_metadata_document_supported
        && let Some(url) = client_metadata_url
    {
        return Ok(Registration {
            client_id: url.to_owned(),
            client_secret: None,
            token_endpoint_auth_method: Some("none".into()),
            redirect_uris,
            method: RegistrationMethod::ClientMetadataDocument,
            scope: None,
            signed_in_at: None,
            registered_scope: None,
        });
    }
    if let Some(p) = previous.filter(|p| {
        p.method == RegistrationMethod::Dynamic
            && redirect_uri.is_none_or(|r| p.redirect_uris.iter().any(|u| u == r))
            && covers(o, p.registered_scope.as_deref(), scope)
    }) {
        return Ok(p.clone());
    }
    let Some(endpoint) = d.server.registration_endpoint.as_deref() else {
        return Err(SignInError::NoRegistration {
            issuer: d.issuer.clone(),
            cimd: match (
                d.server.client_id_metadata_document_supported,
                client_metadata_url,
            ) {
                (true, None) => {
                    "; it supports Client ID Metadata Documents, but oauth2.signIn.clientMetadataUrl is not set"
                }
                _ => ", no client_id_metadata_document_supported",
            },
        });
    };
    dynamic_registration(ctx, endpoint, redirect_uris, scope).await
}

/// RFC 7591 registration of a public native client, for `scope` when given.
async fn dynamic_registration(
    ctx: &SourceContext,
    endpoint: &str,
    redirect_uris: Vec<String>,
    scope: Option<&str>,
) -> Result<Registration, SignInError> {
    let label = endpoint_label(endpoint);
    let fail = |reason: String| SignInError::Registration {
        endpoint: label.clone(),
        reason,
    };
    let mut grant_types = vec!["refresh_token"];
    if redirect_uris.is_empty() {
        grant_types.insert(0, "urn:ietf:params:oauth:grant-type:device_code");
    } else {
        grant_types.insert(0, "authorization_code");
    }
    let mut body = serde_json::json!({
        "client_name": CLIENT_NAME,
        "application_type": "native",
        "grant_types": grant_types,
        "response_types": if redirect_uris.is_empty() { vec![] } else { vec!["code"] },
        "token_endpoint_auth_method": "none",
    });
    if !redirect_uris.is_empty() {
        body["redirect_uris"] = serde_json::json!(redirect_uris);
    }
    if let Some(s) = scope {
        body["scope"] = Value::String(s.to_owned());
    }
    let req = ctx
        .guarded_token()
        .post(endpoint)
        .header(reqwest::header::ACCEPT, "application/json")
        .json(&body);
    let resp = req.send().await.map_err(|e| fail(outbound::describe(&e)))?;
    let (status, bytes) = oauth2::read_body(resp, &label)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let json: Option<Value> = serde_json::from_slice(&bytes).ok();
    if !(200..300).contains(&status) {
        let text = |k: &str| {
            json.as_ref()
                .and_then(|j| j.get(k))
                .and_then(Value::as_str)
                .map(safe)
        };
        return Err(fail(match text("error") {
            Some(e) => format!("HTTP {status} {e}{}", describe(&text("error_description"))),
            None => format!("HTTP {status}"),
        }));
    }
    let json = json.ok_or_else(|| fail("the answer is not JSON".into()))?;
    let client_id = json
        .get("client_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("the answer has no client_id".into()))?;
    let registered_uris = json
        .get("redirect_uris")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or(redirect_uris);
    Ok(Registration {
        client_id: client_id.to_owned(),
        client_secret: json
            .get("client_secret")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(SecretString::new),
        token_endpoint_auth_method: json
            .get("token_endpoint_auth_method")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or(Some("none".into())),
        redirect_uris: registered_uris,
        method: RegistrationMethod::Dynamic,
        scope: None,
        signed_in_at: None,
        registered_scope: scope.map(str::to_owned),
    })
}

/// Server text in a message: printable and short.
fn safe(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// The client at the token endpoint.
pub(crate) struct Client {
    pub id: String,
    pub auth: ClientAuth,
    pub secret: Option<SecretString>,
}

impl Client {
    /// `oauth2.clientId` with its configured authentication, else the registration's.
    pub(crate) fn new(o: &OAuth2Source, reg: &Registration, secret: Option<SecretString>) -> Self {
        if !o.client_id.is_empty() {
            // The secret may come from elsewhere than oauth2.clientSecret (the login command's).
            let auth = match o.client_auth {
                Some(a) => a,
                None if secret.is_some() => ClientAuth::ClientSecretBasic,
                None => ClientAuth::None,
            };
            return Client {
                id: o.client_id.clone(),
                auth: if secret.is_none() { ClientAuth::None } else { auth },
                secret,
            };
        }
        Client {
            id: reg.client_id.clone(),
            auth: reg.auth(),
            secret,
        }
    }

    /// Adds the client's authentication to `form`; the Basic credentials to send, if any.
    pub(crate) fn authenticate(&self, form: &mut Vec<(&str, String)>) -> Option<(String, SecretString)> {
        match (&self.auth, &self.secret) {
            (ClientAuth::ClientSecretBasic, Some(s)) => Some((self.id.clone(), s.clone())),
            (ClientAuth::ClientSecretPost, Some(s)) => {
                form.push(("client_id", self.id.clone()));
                form.push(("client_secret", s.expose().to_owned()));
                None
            }
            _ => {
                form.push(("client_id", self.id.clone()));
                None
            }
        }
    }
}

/// An authorization request in flight: what the redirect must match, and the PKCE verifier.
pub struct Pending {
    /// The URL the person opens.
    pub url: String,
    state: String,
    verifier: SecretString,
    redirect_uri: String,
    issuer: String,
    iss_required: bool,
}

/// 32 random bytes, base64url without padding (43 characters): `state`, PKCE verifiers, and the
/// standalone status page's sign-in token.
pub fn random_token() -> String {
    use rand_core::RngCore;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Pending {
    /// A new request with fresh `state` and PKCE verifier.
    pub fn new(
        d: &Discovered,
        client_id: &str,
        redirect_uri: &str,
        scope: Option<&str>,
        resource: Option<&str>,
    ) -> Self {
        let state = random_token();
        let verifier = random_token();
        let challenge = s256(&verifier);
        let mut params: Vec<(&str, String)> = vec![
            ("response_type", "code".into()),
            ("client_id", client_id.into()),
            ("redirect_uri", redirect_uri.into()),
            ("state", state.clone()),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256".into()),
        ];
        if let Some(s) = scope {
            params.push(("scope", s.into()));
        }
        if let Some(r) = resource {
            params.push(("resource", r.into()));
        }
        let base = d.server.authorization_endpoint.clone().unwrap_or_default();
        let query = params
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let sep = if base.contains('?') { '&' } else { '?' };
        Pending {
            url: format!("{base}{sep}{query}"),
            state,
            verifier: SecretString::new(verifier),
            redirect_uri: redirect_uri.into(),
            issuer: d.issuer.clone(),
            iss_required: d.server.iss_parameter_supported,
        }
    }

    /// Checks a redirect's query parameters, in the order RFC 9207 and the MCP spec want: `state`
    /// first (a foreign one is never acted on), then `iss` (exact, before any `error` is read),
    /// then `error`, then the code.
    pub fn check(&self, params: &[(String, String)]) -> Result<SecretString, SignInError> {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if params.iter().filter(|(n, _)| n == "state").count() != 1
            || !constant_time_eq(get("state").unwrap_or_default(), &self.state)
        {
            return Err(SignInError::StateMismatch);
        }
        match get("iss") {
            Some(iss) if iss != self.issuer => {
                return Err(SignInError::IssMismatch {
                    expected: self.issuer.clone(),
                    got: safe(iss),
                });
            }
            None if self.iss_required => {
                return Err(SignInError::IssMissing {
                    expected: self.issuer.clone(),
                });
            }
            _ => {}
        }
        if let Some(error) = get("error") {
            return Err(SignInError::Denied {
                error: safe(error),
                description: get("error_description").map(safe),
            });
        }
        match get("code") {
            Some(c) if !c.is_empty() => Ok(SecretString::new(c)),
            _ => Err(SignInError::NoCode),
        }
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The one-shot redirect listener on 127.0.0.1 (RFC 8252 §7.3): the first request to
/// [`CALLBACK_PATH`] decides the sign-in, whatever it carries; then the listener closes.
pub struct Loopback {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Loopback {
    /// Listens on 127.0.0.1: on `preferred` when it is free, else on a port the system picks.
    pub async fn bind(preferred: Option<u16>) -> Result<Self, SignInError> {
        let listener = match preferred {
            Some(p) => match TcpListener::bind(("127.0.0.1", p)).await {
                Ok(l) => l,
                Err(_) => TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(SignInError::Listen)?,
            },
            None => TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(SignInError::Listen)?,
        };
        let addr = listener.local_addr().map_err(SignInError::Listen)?;
        Ok(Loopback { listener, addr })
    }

    /// `http://127.0.0.1:<port>/callback`.
    pub fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}{CALLBACK_PATH}", self.addr.port())
    }

    /// Waits for the redirect and checks it against `pending`; the browser is shown the outcome.
    /// Connections that send nothing (browsers open spare ones) or other paths hold nothing up.
    pub async fn wait(self, pending: &Pending) -> Result<SecretString, SignInError> {
        let (tx, mut rx) = mpsc::channel::<(Vec<(String, String)>, TcpStream)>(4);
        let accept = async {
            loop {
                let Ok((sock, _)) = self.listener.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(Some((params, sock))) =
                        tokio::time::timeout(CALLBACK_HEAD_TIMEOUT, read_callback(sock)).await
                    {
                        let _ = tx.send((params, sock)).await;
                    }
                });
            }
        };
        let (params, mut sock) = tokio::select! {
            () = accept => unreachable!("the accept loop never ends"),
            got = rx.recv() => got.expect("the accept loop keeps a sender"),
        };
        // The listener closes here: nothing else is accepted.
        drop(self.listener);
        let result = pending.check(&params);
        let (status, text) = match &result {
            Ok(_) => ("200 OK", "Signed in. You can close this tab.".to_owned()),
            Err(e) => ("400 Bad Request", format!("Sign-in failed: {e}")),
        };
        let body = format!(
            "<!doctype html><meta charset=utf-8><title>mcp-credentials</title><p>{}</p>\n",
            html_escape(&text)
        );
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nreferrer-policy: no-referrer\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = sock.write_all(head.as_bytes()).await;
        let _ = sock.write_all(body.as_bytes()).await;
        let _ = sock.shutdown().await;
        result
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Reads one request head; the query of a `GET /callback`, or `None` (answered 404) for anything else.
async fn read_callback(mut sock: TcpStream) -> Option<(Vec<(String, String)>, TcpStream)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_CALLBACK_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" || path != CALLBACK_PATH {
        let _ = sock
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return None;
    }
    Some((parse_query(query), sock))
}

/// `application/x-www-form-urlencoded` pairs, decoded (invalid escapes kept as written).
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a token answer at sign-in gave.
pub(crate) struct Tokens {
    access_token: SecretString,
    refresh_token: Option<SecretString>,
    scope: Option<String>,
    expires_in: Option<Duration>,
}

/// Sends a token request at sign-in and reads the answer.
async fn token_request(
    ctx: &SourceContext,
    d: &Discovered,
    client: &Client,
    mut form: Vec<(&str, String)>,
) -> Result<Tokens, SourceError> {
    let basic = client.authenticate(&mut form);
    let http = ctx.guarded_token();
    let (status, bytes) = oauth2::send_form(
        http,
        &d.token_endpoint,
        &form,
        basic.as_ref().map(|(id, s)| (id.as_str(), s)),
    )
    .await?;
    let parsed = parse_token_response(status, &bytes)?;
    let scope = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|j| j.get("scope").and_then(Value::as_str).map(safe));
    Ok(Tokens {
        access_token: parsed.access_token,
        refresh_token: refresh_token_in(status, &bytes),
        scope,
        expires_in: parsed.expires_in,
    })
}

/// Redeems the authorization code (with the PKCE verifier and the same `resource`).
async fn redeem(
    ctx: &SourceContext,
    d: &Discovered,
    client: &Client,
    code: &SecretString,
    pending: &Pending,
    resource: Option<&str>,
) -> Result<Tokens, SignInError> {
    let mut form: Vec<(&str, String)> = vec![
        ("grant_type", "authorization_code".into()),
        ("code", code.expose().to_owned()),
        ("redirect_uri", pending.redirect_uri.clone()),
        ("code_verifier", pending.verifier.expose().to_owned()),
    ];
    if let Some(r) = resource {
        form.push(("resource", r.to_owned()));
    }
    token_request(ctx, d, client, form)
        .await
        .map_err(SignInError::Token)
}

/// An RFC 8628 device authorization in progress.
pub(crate) struct DeviceGrant {
    device_code: SecretString,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    interval: Duration,
    expires_in: Duration,
}

async fn device_start(
    ctx: &SourceContext,
    d: &Discovered,
    endpoint: &str,
    client: &Client,
    scope: Option<&str>,
    resource: Option<&str>,
) -> Result<DeviceGrant, SignInError> {
    let mut form: Vec<(&str, String)> = Vec::new();
    if let Some(s) = scope {
        form.push(("scope", s.to_owned()));
    }
    if let Some(r) = resource {
        form.push(("resource", r.to_owned()));
    }
    let basic = client.authenticate(&mut form);
    let (status, bytes) = oauth2::send_form(
        ctx.guarded_token(),
        endpoint,
        &form,
        basic.as_ref().map(|(id, s)| (id.as_str(), s)),
    )
    .await
    .map_err(SignInError::Token)?;
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        // An error answer reads like a token endpoint's.
        return Err(SignInError::Token(
            parse_token_response(status, &bytes)
                .err()
                .unwrap_or(SourceError::HttpStatus(status)),
        ));
    }
    let text = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_owned);
    let bad = |what: &str| {
        SignInError::Token(SourceError::BadResponse(format!(
            "the device authorization answer of {} has no {what}",
            d.issuer
        )))
    };
    Ok(DeviceGrant {
        device_code: SecretString::new(text("device_code").ok_or_else(|| bad("device_code"))?),
        user_code: safe(&text("user_code").ok_or_else(|| bad("user_code"))?),
        verification_uri: safe(&text("verification_uri").ok_or_else(|| bad("verification_uri"))?),
        verification_uri_complete: text("verification_uri_complete").map(|s| safe(&s)),
        interval: Duration::from_secs(
            json.get("interval")
                .and_then(Value::as_u64)
                .unwrap_or(5)
                .clamp(1, 60),
        ),
        expires_in: Duration::from_secs(
            json.get("expires_in")
                .and_then(Value::as_u64)
                .unwrap_or(600)
                .clamp(10, 3600),
        ),
    })
}

async fn device_poll(
    ctx: &SourceContext,
    d: &Discovered,
    client: &Client,
    grant: &DeviceGrant,
    resource: Option<&str>,
) -> Result<Tokens, SignInError> {
    let mut interval = grant.interval;
    loop {
        tokio::time::sleep(interval).await;
        let mut form: Vec<(&str, String)> = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:device_code".into(),
            ),
            ("device_code", grant.device_code.expose().to_owned()),
        ];
        if let Some(r) = resource {
            form.push(("resource", r.to_owned()));
        }
        match token_request(ctx, d, client, form).await {
            Ok(t) => return Ok(t),
            Err(SourceError::OAuthError { error, .. }) if error == "authorization_pending" => {}
            Err(SourceError::OAuthError { error, .. }) if error == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Err(SourceError::OAuthError {
                error, description, ..
            }) if error == "access_denied" || error == "expired_token" => {
                return Err(SignInError::Denied { error, description });
            }
            Err(e) => return Err(SignInError::Token(e)),
        }
    }
}

/// PKCE S256 (RFC 7636 §4.2): `BASE64URL(SHA256(verifier))`.
fn s256(verifier: &str) -> String {
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

pub mod step_up;

#[cfg(test)]
mod tests;

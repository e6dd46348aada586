//! OAuth discovery of a token endpoint, the way MCP clients must find it (MCP authorization,
//! 2025-11-25 and later): the upstream's RFC 9728 protected resource metadata (the
//! `resource_metadata` of its `WWW-Authenticate` challenge first, then the path-inserted
//! well-known URI, then the root one), then its authorization server's RFC 8414 or OpenID Connect
//! metadata in the spec's order, used only when its `issuer` is exactly the one asked for. For
//! sign-in credentials, the MCP 2025-03-26 fallbacks for a server without protected resource
//! metadata: its authorization server metadata at its origin's root, used as it is (its issuer
//! may have a path; it must be on the same origin), else the default endpoints.
//!
//! Every URL learned on the way goes through [`super::outbound`]'s checks and guarded client.
//! Results are cached per upstream for [`CACHE_TTL`] and dropped when the token endpoint fails.
//!
//! Bounded, so that one credential cannot hold a refresh for long: at most
//! [`MAX_AUTHORIZATION_SERVERS`] of a document's authorization servers are tried, and the whole
//! walk stops when the caller's time budget ([`Clients::budget`]) runs out.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::outbound::{self, OutboundPolicy, ReadError, check_url, label};

/// How long a discovered token endpoint is used before discovery runs again. An hour: metadata
/// changes rarely, and a failing token endpoint drops the entry at once anyway.
pub const CACHE_TTL: Duration = Duration::from_secs(3600);
/// How many of a protected resource's `authorization_servers` are tried, in the document's order.
/// Real documents name one, sometimes two (a primary and a fallback). Each one tried costs up to
/// three metadata requests of up to the request timeout, and a 256 KiB document can name thousands:
/// unbounded, one credential could hold a refresh for hours. The rest are named in the failure.
pub const MAX_AUTHORIZATION_SERVERS: usize = 3;
/// The largest metadata document read. Real ones are a few KiB.
const MAX_METADATA_BYTES: usize = 256 * 1024;
/// What the probe sends: the JSON-RPC request an MCP client sends first. Without a token, a
/// server that needs one answers 401 with its challenge before looking at the body.
const PROBE_BODY: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"mcp-credentials","version":"0"}}}"#;

/// What discovery found, as `status.discovery` shows it, and what a sign-in needs besides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The protected resource metadata document used (or, for a server without one, what took
    /// its place: `none (2025-03-26 fallback)`).
    pub resource_metadata: String,
    /// The authorization server's issuer.
    pub issuer: String,
    /// Its token endpoint.
    pub token_endpoint: String,
    /// The rest of the authorization server's metadata.
    pub server: ServerMetadata,
    /// The `scope` of the upstream's 401 challenge, if it sent one.
    pub challenge_scope: Option<String>,
    /// The protected resource's `scopes_supported`.
    pub resource_scopes: Vec<String>,
}

/// What an authorization server's metadata says besides its issuer and token endpoint (RFC 8414
/// §2; RFC 8628, RFC 9207, Client ID Metadata Documents). Endpoints are checked URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMetadata {
    /// `authorization_endpoint`.
    pub authorization_endpoint: Option<String>,
    /// `registration_endpoint` (RFC 7591).
    pub registration_endpoint: Option<String>,
    /// `device_authorization_endpoint` (RFC 8628).
    pub device_authorization_endpoint: Option<String>,
    /// `code_challenge_methods_supported`; `None` when the document has none.
    pub code_challenge_methods: Option<Vec<String>>,
    /// `scopes_supported`.
    pub scopes_supported: Vec<String>,
    /// `token_endpoint_auth_methods_supported`.
    pub token_endpoint_auth_methods: Vec<String>,
    /// `client_id_metadata_document_supported`.
    pub client_id_metadata_document_supported: bool,
    /// `authorization_response_iss_parameter_supported` (RFC 9207).
    pub iss_parameter_supported: bool,
    /// No metadata document: the MCP 2025-03-26 default endpoints (`/authorize`, `/token`,
    /// `/register` at the upstream's origin) are assumed.
    pub default_endpoints: bool,
}

/// Why discovery failed: each URL tried, and why it did not give a token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `(what was tried, why it failed)`, in order; URLs without their query.
    pub tried: Vec<(String, String)>,
    /// True when some step failed for a reason that may pass (timeout, 5xx): worth retrying soon.
    pub transient: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (what, why)) in self.tried.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{what}: {why}")?;
        }
        Ok(())
    }
}

/// Discovered token endpoints per upstream, shared by every refresh of every credential.
#[derive(Debug, Default)]
pub struct Cache {
    entries: Mutex<HashMap<String, (Instant, Discovered)>>,
}

impl Cache {
    /// The entry for `upstream` if it is younger than [`CACHE_TTL`].
    pub fn get(&self, upstream: &str) -> Option<Discovered> {
        let entries = self.entries.lock().unwrap();
        let (at, found) = entries.get(upstream)?;
        (at.elapsed() < CACHE_TTL).then(|| found.clone())
    }

    fn insert(&self, upstream: &str, found: Discovered) {
        let mut entries = self.entries.lock().unwrap();
        // Bounded by the number of distinct upstreams; forget the stale ones on the way.
        entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        entries.insert(upstream.to_owned(), (Instant::now(), found));
    }

    /// Forgets `upstream`'s entry, so the next request discovers again.
    pub fn invalidate(&self, upstream: &str) {
        self.entries.lock().unwrap().remove(upstream);
    }
}

/// The clients discovery uses: `direct` for URLs derived from the configured upstream, `guarded`
/// for URLs learned from a server.
pub(crate) struct Clients<'a> {
    pub direct: &'a reqwest::Client,
    pub guarded: &'a reqwest::Client,
    pub policy: OutboundPolicy,
    /// The longest the whole discovery may take (`None`: each request's own timeout only).
    pub budget: Option<Duration>,
    /// When the upstream has no protected resource metadata at all, fall back to MCP 2025-03-26:
    /// the authorization server's metadata at the upstream's origin, then its default endpoints.
    /// For sign-in credentials (what the older servers they talk to offer).
    pub fallback: bool,
}

/// The cached token endpoint for `upstream`, or discovers (and caches) it.
pub(crate) async fn token_endpoint(
    cache: &Cache,
    upstream: &str,
    clients: &Clients<'_>,
) -> Result<Discovered, Failure> {
    if let Some(found) = cache.get(upstream) {
        return Ok(found);
    }
    let found = discover(upstream, clients).await?;
    tracing::info!(
        upstream = %label_str(upstream),
        resource_metadata = %found.resource_metadata,
        issuer = %found.issuer,
        token_endpoint = %found.token_endpoint,
        "discovered the token endpoint"
    );
    cache.insert(upstream, found.clone());
    Ok(found)
}

/// Runs discovery for `upstream` (no cache).
pub(crate) async fn discover(upstream: &str, clients: &Clients<'_>) -> Result<Discovered, Failure> {
    let mut log = Log {
        budget: clients.budget.map(|b| (b, tokio::time::Instant::now() + b)),
        ..Log::default()
    };
    let up = match reqwest::Url::parse(upstream) {
        Ok(u) => u,
        Err(_) => {
            log.fail(upstream.to_owned(), "not an absolute URL", false);
            return Err(log.done());
        }
    };

    // 1. The resource_metadata of the upstream's challenge, then the two well-known URIs.
    let mut candidates: Vec<(String, bool)> = Vec::new();
    let challenge = probe(&up, clients.direct, &mut log).await;
    if let Some(from_header) = challenge.resource_metadata {
        candidates.push((from_header, true));
    }
    let challenge_scope = challenge.scope;
    let mut answered = false;
    let origin = up.origin().ascii_serialization();
    let path = up.path().trim_end_matches('/');
    if !path.is_empty() {
        candidates.push((
            format!("{origin}/.well-known/oauth-protected-resource{path}"),
            false,
        ));
    }
    candidates.push((format!("{origin}/.well-known/oauth-protected-resource"), false));

    for (url, learned) in candidates {
        let client = if learned {
            match check_url(&url, clients.policy) {
                Ok(_) => clients.guarded,
                Err(e) => {
                    log.fail(labelled("GET", &url), format!("refused: {e}"), false);
                    continue;
                }
            }
        } else {
            clients.direct
        };
        let Some(doc) = fetch_json(client, &url, &mut log).await else {
            continue;
        };
        answered = true;
        let servers = match protected_resource(&doc, &up) {
            Ok(s) => s,
            Err(why) => {
                log.fail(labelled("GET", &url), why, false);
                continue;
            }
        };
        // 2. Each authorization server it names, in order, until one gives a token endpoint.
        let skipped = servers.len().saturating_sub(MAX_AUTHORIZATION_SERVERS);
        for issuer in servers.iter().take(MAX_AUTHORIZATION_SERVERS) {
            if let Some((issuer, token_endpoint, server)) =
                authorization_server(issuer, clients, &mut log).await
            {
                return Ok(Discovered {
                    resource_metadata: label_str(&url),
                    issuer,
                    token_endpoint,
                    server,
                    challenge_scope,
                    resource_scopes: strings(&doc, "scopes_supported"),
                });
            }
        }
        if skipped > 0 && !log.ran_out {
            log.fail(
                format!("the other authorization servers of {}", labelled("GET", &url)),
                format!(
                    "{skipped} not tried (from {}): at most the first {MAX_AUTHORIZATION_SERVERS} are",
                    shorten(&servers[MAX_AUTHORIZATION_SERVERS])
                ),
                false,
            );
        }
        // The metadata that answered is the one that counts: the next candidates are fallbacks
        // for a server without metadata, not for one whose authorization server is broken.
        return Err(log.done());
    }
    // A document that answered but describes another resource is never worked around.
    if clients.fallback && !answered && !log.ran_out {
        return fallback_2025_03_26(&up, clients, challenge_scope, &mut log)
            .await
            .ok_or_else(|| log.done());
    }
    Err(log.done())
}

/// MCP 2025-03-26, for a server without protected resource metadata: the upstream's origin is the
/// authorization server; its RFC 8414 metadata at the root (used as it is: see [`fallback_issuer`]),
/// else the default endpoints `/authorize`, `/token` and `/register` (only when the metadata is not
/// there at all: HTTP 404).
async fn fallback_2025_03_26(
    up: &reqwest::Url,
    clients: &Clients<'_>,
    challenge_scope: Option<String>,
    log: &mut Log,
) -> Option<Discovered> {
    let origin = up.origin().ascii_serialization();
    let url = format!("{origin}/.well-known/oauth-authorization-server");
    let what = labelled("GET", &url);
    match log.within(what.clone(), get_json(clients.direct, &url)).await? {
        Ok(doc) => {
            let issuer = match fallback_issuer(&doc, up) {
                Ok(i) => i,
                Err(why) => {
                    log.fail(what, why, false);
                    return None;
                }
            };
            match server_metadata(&doc, clients.policy) {
                Ok((token_endpoint, server)) => Some(Discovered {
                    resource_metadata: "none (2025-03-26 fallback: metadata at the origin)".into(),
                    issuer,
                    token_endpoint,
                    server,
                    challenge_scope,
                    resource_scopes: Vec::new(),
                }),
                Err(why) => {
                    log.fail(what, why, false);
                    None
                }
            }
        }
        Err((why, _)) if why == "HTTP 404" => Some(Discovered {
            resource_metadata: "none (2025-03-26 fallback: default endpoints)".into(),
            issuer: origin.clone(),
            token_endpoint: format!("{origin}/token"),
            server: ServerMetadata {
                authorization_endpoint: Some(format!("{origin}/authorize")),
                registration_endpoint: Some(format!("{origin}/register")),
                default_endpoints: true,
                ..ServerMetadata::default()
            },
            challenge_scope,
            resource_scopes: Vec::new(),
        }),
        Err((why, transient)) => {
            log.fail(what, why, transient);
            None
        }
    }
}

/// The issuer of the metadata found at the upstream's origin in the 2025-03-26 fallback, used as
/// the document says. RFC 8414 §3.3's check (the issuer is the one the URL was built from) does
/// not apply: the URL came from the MCP server, not from an issuer, and 2025-03-26 servers often
/// name an issuer with a path (`<origin>/oauth`) while serving the document at the root. What is
/// required: an issuer, an absolute URL on the upstream's origin (the fallback's premise is that
/// the MCP server's origin is its authorization server), without query or fragment.
fn fallback_issuer(doc: &Value, up: &reqwest::Url) -> Result<String, String> {
    let issuer = doc
        .get("issuer")
        .and_then(Value::as_str)
        .ok_or("the document has no issuer")?;
    match reqwest::Url::parse(issuer) {
        Ok(u) if u.origin() == up.origin() && u.query().is_none() && u.fragment().is_none() => {
            Ok(issuer.to_owned())
        }
        _ => Err(format!(
            "its issuer {} is not a URL on the MCP server's origin {} (in the 2025-03-26 fallback \
             the MCP server's origin is its authorization server)",
            shorten(issuer),
            shorten(&up.origin().ascii_serialization())
        )),
    }
}

/// The strings of a JSON array field (anything else in it skipped).
fn strings(doc: &Value, field: &str) -> Vec<String> {
    doc.get(field)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The token endpoint and the rest of an authorization server's metadata, each endpoint checked.
fn server_metadata(doc: &Value, policy: OutboundPolicy) -> Result<(String, ServerMetadata), String> {
    let endpoint = |field: &str| -> Result<Option<String>, String> {
        match doc.get(field).and_then(Value::as_str) {
            None => Ok(None),
            Some(u) => check_url(u, policy)
                .map(|u| Some(u.to_string()))
                .map_err(|e| format!("its {field} is refused: {e}")),
        }
    };
    let token_endpoint = endpoint("token_endpoint")?.ok_or("the document has no token_endpoint")?;
    let flag = |field: &str| doc.get(field).and_then(Value::as_bool).unwrap_or(false);
    Ok((
        token_endpoint,
        ServerMetadata {
            authorization_endpoint: endpoint("authorization_endpoint")?,
            registration_endpoint: endpoint("registration_endpoint")?,
            device_authorization_endpoint: endpoint("device_authorization_endpoint")?,
            code_challenge_methods: doc
                .get("code_challenge_methods_supported")
                .map(|_| strings(doc, "code_challenge_methods_supported")),
            scopes_supported: strings(doc, "scopes_supported"),
            token_endpoint_auth_methods: strings(doc, "token_endpoint_auth_methods_supported"),
            client_id_metadata_document_supported: flag("client_id_metadata_document_supported"),
            iss_parameter_supported: flag("authorization_response_iss_parameter_supported"),
            default_endpoints: false,
        },
    ))
}

/// What the upstream's 401 challenge names.
#[derive(Default)]
struct Probed {
    resource_metadata: Option<String>,
    scope: Option<String>,
}

/// Sends the unauthenticated request and returns the challenge's `resource_metadata` and `scope`.
async fn probe(up: &reqwest::Url, client: &reqwest::Client, log: &mut Log) -> Probed {
    let what = labelled("POST", up.as_str());
    let send = client
        .post(up.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "application/json, text/event-stream")
        .body(PROBE_BODY)
        .send();
    let Some(sent) = log.within(what.clone(), send).await else {
        return Probed::default();
    };
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            log.fail(what, outbound::describe(&e), true);
            return Probed::default();
        }
    };
    let status = resp.status().as_u16();
    let challenges: Vec<String> = resp
        .headers()
        .get_all(reqwest::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    // The body is not read: a server that needs no token may answer with a stream that stays open.
    drop(resp);
    let scope = bearer_param(challenges.iter().map(String::as_str), "scope");
    match resource_metadata(challenges.iter().map(String::as_str)) {
        Some(url) => Probed {
            resource_metadata: Some(url),
            scope,
        },
        None => {
            let why = if challenges.is_empty() {
                format!("HTTP {status} without a WWW-Authenticate challenge")
            } else {
                format!("HTTP {status} with a challenge that has no resource_metadata")
            };
            log.fail(what, why, false);
            Probed {
                resource_metadata: None,
                scope,
            }
        }
    }
}

/// GETs a JSON document, recording why when it is not one.
async fn fetch_json(client: &reqwest::Client, url: &str, log: &mut Log) -> Option<Value> {
    let what = labelled("GET", url);
    match log.within(what.clone(), get_json(client, url)).await? {
        Ok(v) => Some(v),
        Err((why, transient)) => {
            log.fail(what, why, transient);
            None
        }
    }
}

/// GETs a JSON object: the document, or why not and whether that may pass.
async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, (String, bool)> {
    let resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| {
            let transient = !outbound::refused(&e) && !e.is_builder();
            (outbound::describe(&e), transient)
        })?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err((format!("HTTP {status}"), status >= 500 || status == 429));
    }
    let bytes = outbound::read_limited(resp, MAX_METADATA_BYTES)
        .await
        .map_err(|e| (e.to_string(), matches!(e, ReadError::Failed(_))))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if v.is_object() => Ok(v),
        _ => Err(("the answer is not a JSON object".into(), false)),
    }
}

/// The authorization servers of a protected resource metadata document (RFC 9728 §2), after
/// checking that it describes `up` (§3.3: a document for another resource must not be used).
fn protected_resource(doc: &Value, up: &reqwest::Url) -> Result<Vec<String>, String> {
    let resource = doc
        .get("resource")
        .and_then(Value::as_str)
        .ok_or("the document has no resource")?;
    if !resource_matches(resource, up) {
        return Err(format!(
            "the document describes the resource {}, not the upstream",
            shorten(resource)
        ));
    }
    let servers: Vec<String> = doc
        .get("authorization_servers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if servers.is_empty() {
        return Err("the document lists no authorization_servers".into());
    }
    Ok(servers)
}

/// Whether a metadata `resource` names the upstream: the same URL, or a prefix of it at a path
/// boundary (servers often name their origin for every path they serve).
fn resource_matches(resource: &str, up: &reqwest::Url) -> bool {
    let Ok(r) = reqwest::Url::parse(resource) else {
        return false;
    };
    if r.origin() != up.origin() || r.query().is_some() || r.fragment().is_some() {
        return false;
    }
    let (rp, upath) = (r.path().trim_end_matches('/'), up.path().trim_end_matches('/'));
    upath == rp || upath.starts_with(&format!("{rp}/"))
}

/// Tries an issuer's metadata URLs in the spec's order; the issuer, its token endpoint and the
/// rest of its metadata on success.
async fn authorization_server(
    issuer: &str,
    clients: &Clients<'_>,
    log: &mut Log,
) -> Option<(String, String, ServerMetadata)> {
    let urls = match metadata_urls(issuer, clients.policy) {
        Ok(u) => u,
        Err(why) => {
            log.fail(format!("authorization server {}", shorten(issuer)), why, false);
            return None;
        }
    };
    for url in urls {
        let Some(doc) = fetch_json(clients.guarded, &url, log).await else {
            continue;
        };
        let what = labelled("GET", &url);
        // RFC 8414 §3.3: the issuer must be exactly the one the URL was built from.
        match doc.get("issuer").and_then(Value::as_str) {
            Some(i) if i == issuer => {}
            Some(i) => {
                log.fail(
                    what,
                    format!("its issuer {} is not {}", shorten(i), shorten(issuer)),
                    false,
                );
                continue;
            }
            None => {
                log.fail(what, "the document has no issuer", false);
                continue;
            }
        }
        match server_metadata(&doc, clients.policy) {
            Ok((token_endpoint, server)) => return Some((issuer.to_owned(), token_endpoint, server)),
            Err(why) => log.fail(what, why, false),
        }
    }
    None
}

/// The metadata URLs of an issuer, in the order MCP clients must try them: with a path, RFC 8414
/// path-inserted, OIDC path-inserted, OIDC path-appended; without one, RFC 8414 then OIDC.
fn metadata_urls(issuer: &str, policy: OutboundPolicy) -> Result<Vec<String>, String> {
    let u = check_url(issuer, policy).map_err(|e| format!("refused: {e}"))?;
    if u.query().is_some() || u.fragment().is_some() {
        return Err("an issuer has no query or fragment".into());
    }
    let origin = u.origin().ascii_serialization();
    let path = u.path().trim_end_matches('/');
    Ok(if path.is_empty() {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server"),
            format!("{origin}/.well-known/openid-configuration"),
        ]
    } else {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!("{origin}/.well-known/openid-configuration{path}"),
            format!("{origin}{path}/.well-known/openid-configuration"),
        ]
    })
}

/// The `resource_metadata` parameter of the first Bearer challenge that has one, from any number
/// of `WWW-Authenticate` header values.
pub fn resource_metadata<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<String> {
    bearer_param(headers, "resource_metadata")
}

/// The parameter `name` of the first Bearer challenge that has one (`scope`, `error`, ...).
pub fn bearer_param<'a>(headers: impl IntoIterator<Item = &'a str>, name: &str) -> Option<String> {
    headers.into_iter().flat_map(challenges).find_map(|c| {
        if !c.scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        c.params
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// One authentication challenge (RFC 9110 §11.6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme, as written.
    pub scheme: String,
    /// Its auth-params (a token68 is skipped), values unquoted.
    pub params: Vec<(String, String)>,
}

/// Parses a `WWW-Authenticate` value into its challenges. Lenient: what cannot be parsed is skipped.
pub fn challenges(header: &str) -> Vec<Challenge> {
    let mut p = Parser {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip(|c| c == b',' || c.is_ascii_whitespace());
        if p.done() {
            return out;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            p.i += 1; // not a token character: skip it
            continue;
        }
        let mut params = Vec::new();
        loop {
            p.skip(|c| c.is_ascii_whitespace());
            if p.done() {
                break;
            }
            let mark = p.i;
            p.skip(|c| c == b',' || c.is_ascii_whitespace());
            let name = p.token();
            p.skip(|c| c == b' ' || c == b'\t');
            if name.is_empty() {
                if p.done() {
                    break;
                }
                p.i += 1; // garbage: skip one byte and go on
                continue;
            }
            if p.peek() != Some(b'=') {
                // Not a parameter: the next challenge's scheme (or a token68). Hand it back.
                p.i = mark;
                break;
            }
            p.i += 1; // '='
            p.skip(|c| c == b' ' || c == b'\t');
            match p.peek() {
                Some(b'"') => params.push((name, p.quoted())),
                Some(b'=') | None => {
                    // token68 ("abc==") or a dangling '=': skip to the next comma.
                    p.skip(|c| c != b',');
                }
                _ => {
                    // A token, leniently: servers send unquoted URLs, which ':' makes invalid.
                    let start = p.i;
                    p.skip(|c| c != b',' && !c.is_ascii_whitespace());
                    params.push((name, String::from_utf8_lossy(&p.s[start..p.i]).into_owned()));
                }
            }
        }
        out.push(Challenge { scheme, params });
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> String {
        let start = self.i;
        self.skip(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c));
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
    /// A quoted-string starting at `"`, with `\` escapes.
    fn quoted(&mut self) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The attempts so far, and the time budget left.
#[derive(Default)]
struct Log {
    tried: Vec<(String, String)>,
    transient: bool,
    /// The whole budget and when it runs out.
    budget: Option<(Duration, tokio::time::Instant)>,
    /// The budget ran out: nothing more is tried.
    ran_out: bool,
}

impl Log {
    /// Runs one request `what` within the budget left: `None` once the budget has run out (recorded
    /// once, as a transient failure: the servers may only be slow).
    async fn within<T>(&mut self, what: String, request: impl Future<Output = T>) -> Option<T> {
        let Some((budget, deadline)) = self.budget else {
            return Some(request.await);
        };
        if !self.ran_out
            && let Ok(v) = tokio::time::timeout_at(deadline, request).await
        {
            return Some(v);
        }
        if !self.ran_out {
            self.ran_out = true;
            self.fail(
                what,
                format!(
                    "discovery's time budget of {}s ran out here; nothing further was tried",
                    budget.as_secs()
                ),
                true,
            );
        }
        None
    }

    fn fail(&mut self, what: String, why: impl Into<String>, transient: bool) {
        self.tried.push((what, why.into()));
        self.transient |= transient;
    }
    fn done(self) -> Failure {
        Failure {
            tried: self.tried,
            transient: self.transient,
        }
    }
}

fn labelled(method: &str, url: &str) -> String {
    format!("{method} {}", label_str(url))
}

fn label_str(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(|_| shorten(url), |u| label(&u))
}

/// Server-provided text in a message: printable and short.
fn shorten(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).take(120).collect();
    format!("{clean:?}")
}

#[cfg(test)]
mod tests;

//! The browser extension's endpoints on the admin listener (standalone mode, `session.browser`
//! credentials only): the extension asks which sites are needed and how each one is, and sends the
//! cookies the browser would send to each site; the sidecar stores them where the `session.browser`
//! source reads them ([`browser::cookies_ref`]), so the session's lifecycle is the other sessions'.
//!
//! - `GET /browser`: a page for the person: how to pair (the file holding the pairing code, never
//!   the code: any local user can reach a loopback port), and each site's state.
//! - `GET /browser/hello` with `X-Mcp-Credentials-Nonce: <nonce>`: `{"proof": ...}`
//!   ([`browser::sidecar_proof`]): the sidecar shows it holds the pairing code, so the extension
//!   sends the code and cookies to this sidecar only, not to a program that took its port.
//! - `GET /browser/sites`: `{"sites": [{credential, site, url, signInUrl, state, message}]}`.
//! - `POST /browser/cookies`: `{"credential": name, "cookies": [chrome.cookies.Cookie...]}`.
//!
//! Every request must come to a loopback host name (DNS rebinding), and the two API routes from the
//! origin `chrome-extension://<id>` of an allowed extension (a web page cannot claim that origin)
//! with `Authorization: Bearer <pairing code>` (compared in constant time). Bodies are bounded
//! ([`MAX_BODY`]); cookies for anything but the credential's site are refused; no value is logged.

use std::{
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use http_body_util::BodyExt as _;
use jiff::Timestamp;
use kube::ResourceExt as _;
use mcp_credentials_core::{
    McpCredential, SecretString,
    source::session::browser::{self, EXTENSION_ID},
};
use serde_json::json;

use crate::{
    admin::escape,
    store::{Store, standalone::write_private_file},
};

/// The environment variable naming the extension ids to accept (comma-separated), for a build
/// of the extension with another id (a store's). Default: [`EXTENSION_ID`].
pub const EXTENSION_IDS: &str = "MCP_SIDECAR_BROWSER_EXTENSION_IDS";
/// The largest request body accepted: a site's session is a few cookies of at most 4 KiB each.
pub const MAX_BODY: usize = 64 * 1024;
/// The header carrying the extension's challenge to `GET /browser/hello`.
pub const NONCE_HEADER: &str = "x-mcp-credentials-nonce";
/// The file holding the pairing code: `<secrets dir>/browser-extension/pairing-code`.
pub const PAIRING_CODE: (&str, &str) = ("browser-extension", "pairing-code");

/// One `session.browser` credential.
#[derive(Clone, Debug)]
struct Site {
    credential: String,
    name: String,
    url: String,
    sign_in_url: String,
}

/// The extension's side of the sidecar.
pub struct Browser {
    store: Arc<Store>,
    code: SecretString,
    code_file: PathBuf,
    origins: Vec<String>,
    sites: Vec<Site>,
    secrets_dir: PathBuf,
    /// Held while a cookies file is compared and written: two requests at once (a burst of
    /// changes) must not interleave their writes of the same temporary file.
    writing: std::sync::Mutex<()>,
}

/// Why the browser endpoints could not start.
#[derive(Debug, thiserror::Error)]
#[error("browser extension: cannot read or create the pairing code {}", path.display())]
pub struct PairingError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl Browser {
    /// The endpoints for the `session.browser` credentials among `credentials`, with the pairing
    /// code of `secrets_dir` (created, mode 0600, when there is none); `None` when no credential is
    /// a browser session. `extension_ids`: the ids to accept (empty: [`EXTENSION_ID`]).
    pub fn new(
        store: Arc<Store>,
        credentials: &[McpCredential],
        secrets_dir: &Path,
        extension_ids: &[String],
    ) -> Result<Option<Arc<Self>>, PairingError> {
        let sites: Vec<Site> = credentials
            .iter()
            .filter_map(|c| {
                let b = c.spec.source.session.as_ref()?.browser.as_ref()?;
                Some(Site {
                    credential: c.name_any(),
                    name: browser::site_name(&c.spec, b),
                    url: browser::site_url(&c.spec, b).to_owned(),
                    sign_in_url: browser::sign_in_url(&c.spec, b),
                })
            })
            .collect();
        if sites.is_empty() {
            return Ok(None);
        }
        let code_file = secrets_dir.join(PAIRING_CODE.0).join(PAIRING_CODE.1);
        let code = pairing_code(&code_file).map_err(|source| PairingError {
            path: code_file.clone(),
            source,
        })?;
        let ids: Vec<&str> = match extension_ids.is_empty() {
            true => vec![EXTENSION_ID],
            false => extension_ids.iter().map(String::as_str).collect(),
        };
        Ok(Some(Arc::new(Browser {
            store,
            code,
            code_file,
            origins: ids.iter().map(|id| format!("chrome-extension://{id}")).collect(),
            sites,
            secrets_dir: secrets_dir.to_path_buf(),
            writing: std::sync::Mutex::new(()),
        })))
    }

    /// Where the pairing code is (for the log line that tells the person how to pair).
    pub fn code_file(&self) -> &Path {
        &self.code_file
    }

    /// The credentials whose sessions come from the browser.
    pub fn credentials(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.credential.clone()).collect()
    }
}

/// The ids of [`EXTENSION_IDS`] in the environment.
pub fn extension_ids_from_env() -> Vec<String> {
    std::env::var(EXTENSION_IDS)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Reads the pairing code, or creates one (its directory 0700, the file 0600).
fn pairing_code(path: &Path) -> std::io::Result<SecretString> {
    match std::fs::read_to_string(path) {
        Ok(code) if code.trim().len() >= 32 => return Ok(SecretString::new(code.trim())),
        Ok(_) => {
            return Err(std::io::Error::other(
                "it holds fewer than 32 characters: delete it, and the sidecar makes a new one",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let code = browser::new_pairing_code();
    write_private_file(path, code.expose().as_bytes())?;
    Ok(code)
}

/// The routes, to merge into the admin Router.
pub fn routes(b: Arc<Browser>) -> Router {
    Router::new()
        .route("/browser", get(page))
        .route("/browser/hello", get(hello).options(preflight))
        .route("/browser/sites", get(sites).options(preflight))
        .route(
            "/browser/cookies",
            axum::routing::post(cookies).options(preflight),
        )
        .with_state(b)
}

/// A refusal: a status and a JSON body saying why (never a secret).
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Whether the request was addressed to a loopback name (a rebound DNS name is not one).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

impl Browser {
    /// The allowed extension origin of the request, or the refusal.
    fn origin(&self, headers: &HeaderMap) -> Result<HeaderValue, Box<Response>> {
        if !loopback_host(headers) {
            return Err(Box::new(refuse(
                StatusCode::FORBIDDEN,
                "the browser endpoints answer only requests to 127.0.0.1 or localhost",
            )));
        }
        match headers.get(header::ORIGIN) {
            Some(o) if self.origins.iter().any(|a| a.as_bytes() == o.as_bytes()) => Ok(o.clone()),
            Some(_) => Err(Box::new(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "only the mcp-credentials extension may call this (origin {}); set {EXTENSION_IDS} for another \
                     build of it",
                    self.origins.join(", ")
                ),
            ))),
            None => Err(Box::new(refuse(
                StatusCode::FORBIDDEN,
                "no Origin header: only the mcp-credentials extension may call this",
            ))),
        }
    }

    /// The allowed origin, once the pairing code is checked too.
    fn authorize(&self, headers: &HeaderMap) -> Result<HeaderValue, Box<Response>> {
        let origin = self.origin(headers)?;
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(p) if browser::same_secret(p, self.code.expose().as_bytes()) => Ok(origin),
            _ => Err(Box::new(with_cors(
                refuse(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "not paired: paste the pairing code from {} into the extension",
                        self.code_file.display()
                    ),
                ),
                &origin,
            ))),
        }
    }

    /// Each site and its state, as the extension shows them.
    fn states(&self) -> Vec<serde_json::Value> {
        let now = Timestamp::now();
        self.sites
            .iter()
            .map(|s| {
                let slot = self.store.get(&s.credential).unwrap_or_default();
                let valid = slot.current.as_ref().map(|c| !c.is_expired(now));
                let state = match (valid, &slot.last_failure) {
                    (Some(true), None) => "live",
                    (Some(true), Some(_)) => "check failing",
                    (Some(false), _) => "expired",
                    (None, _) => "signed out",
                };
                json!({
                    "credential": s.credential,
                    "site": s.name,
                    "url": s.url,
                    "signInUrl": s.sign_in_url,
                    "state": state,
                    "message": slot.last_failure.as_deref(),
                })
            })
            .collect()
    }
}

/// The response, readable by the extension's origin.
fn with_cors(mut r: Response, origin: &HeaderValue) -> Response {
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The CORS preflight: answered for the extension's origin only.
async fn preflight(State(b): State<Arc<Browser>>, headers: HeaderMap) -> Response {
    match b.origin(&headers) {
        Ok(origin) => {
            let mut r = with_cors(StatusCode::NO_CONTENT.into_response(), &origin);
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, x-mcp-credentials-nonce"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
            // Chromium's Private Network Access preflight.
            h.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
            r
        }
        Err(r) => *r,
    }
}

async fn hello(State(b): State<Arc<Browser>>, headers: HeaderMap) -> Response {
    let origin = match b.origin(&headers) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let nonce = headers
        .get(NONCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| {
            (16..=128).contains(&n.len())
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        });
    let answer = match nonce {
        Some(n) => Json(json!({ "proof": browser::sidecar_proof(&b.code, n) })).into_response(),
        None => refuse(
            StatusCode::BAD_REQUEST,
            format!("{NONCE_HEADER} must be 16 to 128 characters of base64url"),
        ),
    };
    with_cors(answer, &origin)
}

async fn sites(State(b): State<Arc<Browser>>, headers: HeaderMap) -> Response {
    match b.authorize(&headers) {
        Ok(origin) => with_cors(Json(json!({ "sites": b.states() })).into_response(), &origin),
        Err(r) => *r,
    }
}

async fn cookies(State(b): State<Arc<Browser>>, headers: HeaderMap, body: Body) -> Response {
    let origin = match b.authorize(&headers) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let answer = |r: Response| with_cors(r, &origin);
    let bytes = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return answer(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
            ));
        }
    };
    #[derive(serde::Deserialize)]
    struct Sent {
        credential: String,
        cookies: serde_json::Value,
    }
    let Ok(sent) = serde_json::from_slice::<Sent>(&bytes) else {
        return answer(refuse(
            StatusCode::BAD_REQUEST,
            "the body must be {\"credential\": <name>, \"cookies\": [<chrome.cookies.Cookie>...]}",
        ));
    };
    let Some(site) = b.sites.iter().find(|s| s.credential == sent.credential) else {
        return answer(refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no session.browser credential is named {:?} (there are: {})",
                sent.credential,
                b.credentials().join(", ")
            ),
        ));
    };
    let accepted = match browser::accept(&sent.cookies.to_string(), &site.url) {
        Ok(c) => c,
        Err(e) => return answer(refuse(StatusCode::FORBIDDEN, e)),
    };
    let r = browser::cookies_ref(&site.credential);
    let dir = b.secrets_dir.join(&r.name);
    let file = dir.join(&r.key);
    let content = browser::to_json(&accepted);
    let _writing = b
        .writing
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let unchanged = std::fs::read(&file).is_ok_and(|old| old == content.expose().as_bytes());
    if !unchanged {
        let written = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| write_private_file(&file, content.expose().as_bytes()));
        if let Err(e) = written {
            tracing::warn!(credential = %site.credential, file = %file.display(), error = %e, "cannot store the browser session");
            return answer(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write {}: {}", file.display(), e.kind()),
            ));
        }
        tracing::info!(credential = %site.credential, cookies = accepted.len(), "the browser sent the session");
    }
    answer(Json(json!({ "accepted": accepted.len(), "changed": !unchanged })).into_response())
}

/// The person's page: how to pair, and each site's state.
async fn page(State(b): State<Arc<Browser>>, headers: HeaderMap) -> Response {
    if !loopback_host(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "the browser endpoints answer only requests to 127.0.0.1 or localhost",
        );
    }
    let mut rows = String::new();
    for s in b.states() {
        let text = |k: &str| escape(s[k].as_str().unwrap_or("-"));
        rows.push_str(&format!(
            "<tr><td>{}</td><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td></tr>\n",
            text("credential"),
            text("signInUrl"),
            text("site"),
            text("state"),
            text("message"),
        ));
    }
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>mcp-credentials: browser sessions</title>\
         <h1>Browser sessions</h1>\
         <p>To pair the mcp-credentials extension: open its popup, enter this page's address \
         (<code>http://{}</code>) and the pairing code, which is in the file <code>{}</code> \
         (<code>cat {}</code>; it is not shown here: any local user can open this page).</p>\
         <table border=1 cellpadding=4><tr><th>Credential</th><th>Site</th><th>State</th><th>Last failure</th></tr>\n\
         {rows}</table>\n",
        escape(
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1:7008")
        ),
        escape(&b.code_file.display().to_string()),
        escape(&b.code_file.display().to_string()),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

#[cfg(test)]
mod tests;

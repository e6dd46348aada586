//! The admin listener: `/metrics` for Prometheus, `/healthz` (the process serves), `/readyz` (every
//! required credential is present and unexpired), `/` and `/status` (a page listing every
//! credential: state, expiry, last failure, and the command for one that needs a sign-in; never a
//! credential value), on loopback; and the probe listener, the same
//! two checks with nothing but a status, which the kubelet's probes reach on the pod IP.

use std::{future::Future, pin::Pin, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use jiff::Timestamp;
use serde_json::json;

use crate::{metrics::Metrics, store::Store};

#[derive(Clone)]
struct Admin {
    store: Arc<Store>,
    metrics: Metrics,
    sign_in: Option<Arc<SignInPage>>,
    /// The credentials whose sessions come from the browser extension (`/browser` serves them).
    browser_sessions: Arc<[String]>,
}

/// What starting a sign-in gives: the URL to send the person's browser to, or why it cannot start.
pub type Started = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// The status page's "Sign in" buttons (standalone mode): the token its forms carry, and what
/// starts the sign-in of a credential.
pub struct SignInPage {
    token: String,
    start: Box<dyn Fn(String) -> Started + Send + Sync>,
}

impl SignInPage {
    /// Sign-ins started by `start` (given the credential's name), with a fresh random token.
    pub fn new(start: impl Fn(String) -> Started + Send + Sync + 'static) -> Self {
        SignInPage {
            token: mcp_credentials_core::source::sign_in::random_token(),
            start: Box::new(start),
        }
    }

    /// The token the page's forms carry (tests read it from the page, as a browser does).
    #[cfg(test)]
    fn token(&self) -> &str {
        &self.token
    }
}

/// The admin Router; `sign_in` adds the status page's "Sign in" buttons and `POST /sign-in`.
/// `browser_sessions`: the `session.browser` credentials, whose line on the status page points to
/// `/browser` (pairing, each site's state).
pub fn app(
    store: Arc<Store>,
    metrics: Metrics,
    sign_in: Option<SignInPage>,
    browser_sessions: Vec<String>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/", get(status_page))
        .route("/status", get(status_page))
        .route("/sign-in", post(start_sign_in).get(sign_in_by_get))
        .with_state(Admin {
            store,
            metrics,
            sign_in: sign_in.map(Arc::new),
            browser_sessions: browser_sessions.into(),
        })
}

/// The probe Router: `/healthz` and `/readyz` only, saying ready or not and nothing about which
/// credentials the pod has (anyone on the pod network reaches it).
pub fn probes(store: Arc<Store>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(store): State<Arc<Store>>| async move {
                match store.ready(Timestamp::now()) {
                    Ok(()) => (StatusCode::OK, "ready\n"),
                    Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                }
            }),
        )
        .with_state(store)
}

async fn metrics_text(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        admin.metrics.render(&admin.store),
    )
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    match admin.store.ready(Timestamp::now()) {
        Ok(()) => (StatusCode::OK, Json(json!({ "ready": true }))),
        Err(waiting) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "waitingFor": waiting })),
        ),
    }
}

/// One credential's line on the status page.
#[derive(Debug, PartialEq, Eq)]
pub struct StatusLine {
    /// The credential's name.
    pub name: String,
    /// `ready`, `needs sign-in`, `needs more consent`, `expired`, `failing` or `waiting`.
    pub state: &'static str,
    /// When the served credential expires (RFC 3339), if it does.
    pub expires_at: Option<String>,
    /// The last failure's message (never credential material).
    pub last_failure: Option<String>,
    /// The command that signs it in, when it needs one.
    pub sign_in: Option<String>,
}

/// Every credential's state, as the status page shows it.
pub fn status_lines(store: &Store, now: Timestamp) -> Vec<StatusLine> {
    store
        .snapshot()
        .into_iter()
        .map(|(name, slot)| {
            let valid = slot
                .current
                .as_ref()
                .is_some_and(|c| c.expires_at.is_none_or(|e| e > now));
            let state = match (&slot.current, valid, &slot.sign_in, &slot.last_failure) {
                (_, false, Some(_), _) => "needs sign-in",
                // A step-up: what was granted is still served, more needs a person's consent.
                (Some(_), true, Some(_), _) if slot.more_consent => "needs more consent",
                (Some(_), true, _, Some(_)) => "ready (last refresh failed)",
                (Some(_), true, _, None) => "ready",
                (Some(_), false, _, _) => "expired",
                (None, _, _, Some(_)) => "failing",
                (None, _, _, None) => "waiting",
            };
            StatusLine {
                name,
                state,
                expires_at: slot
                    .current
                    .as_ref()
                    .and_then(|c| c.expires_at)
                    .map(|t| t.to_string()),
                last_failure: slot.last_failure.as_deref().map(str::to_owned),
                sign_in: slot
                    .sign_in
                    .as_deref()
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
            }
        })
        .collect()
}

async fn status_page(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if let Err(why) = same_machine(&headers) {
        return forbidden(why);
    }
    let mut rows = String::new();
    for l in status_lines(&admin.store, Timestamp::now()) {
        let action = match (&l.sign_in, &admin.sign_in) {
            (Some(cmd), Some(page)) => format!(
                "<form method=post action=/sign-in><input type=hidden name=credential value=\"{}\">\
                 <input type=hidden name=token value=\"{}\"><button>Sign in</button></form> \
                 or run <code>{}</code>",
                escape(&l.name),
                escape(&page.token),
                escape(cmd)
            ),
            (Some(cmd), None) => format!("<b>Sign in:</b> run <code>{}</code>", escape(cmd)),
            (None, _) if admin.browser_sessions.contains(&l.name) => match l.state {
                "ready" => "from the browser (<a href=\"/browser\">extension</a>)".to_owned(),
                _ => "<b>Sign in</b> to the site in your browser (the extension: <a href=\"/browser\">pairing</a>)"
                    .to_owned(),
            },
            (None, _) => String::new(),
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{action}</td></tr>\n",
            escape(&l.name),
            escape(l.state),
            escape(l.expires_at.as_deref().unwrap_or("-")),
            escape(l.last_failure.as_deref().unwrap_or("-")),
        ));
    }
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>mcp-credentials</title>\
         <h1>mcp-credentials</h1><table border=1 cellpadding=4>\
         <tr><th>Credential</th><th>State</th><th>Expires</th><th>Last failure</th><th>To do</th></tr>\n{rows}</table>\n"
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Never inside another site's frame (clickjacking the button).
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; frame-ancestors 'none'",
            ),
        ],
        page,
    )
        .into_response()
}

/// A 403 with `why` (plain text: what a person sees in the browser).
fn forbidden(why: String) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CACHE_CONTROL, "no-store")],
        why + "\n",
    )
        .into_response()
}

/// The page and the sign-in are for a browser on this machine: a `Host` that is a loopback name or
/// address (a DNS-rebinding site's request names its own host), and an `Origin`, when there is
/// one, that is this listener (`http://` and that `Host`). The refusal says why.
fn same_machine(headers: &HeaderMap) -> Result<(), String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        return Err(format!(
            "refused: the Host header {host:?} is not a loopback name or address; the status page and its \
             sign-in are served only to a browser on this machine, at http://127.0.0.1:<port>/ or \
             http://localhost:<port>/"
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if origin != format!("http://{host}") {
            return Err(format!(
                "refused: the request comes from the page of another site (Origin {origin:?}, not \
                 \"http://{host}\"); start the sign-in from this status page"
            ));
        }
    }
    Ok(())
}

/// `localhost` (or a name under it, RFC 6761), or a loopback IP address, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:port
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// `POST /sign-in` from the status page's form: `credential=<name>&token=<the page's token>`.
async fn start_sign_in(State(admin): State<Admin>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = same_machine(&headers) {
        return forbidden(why);
    }
    let Some(page) = &admin.sign_in else {
        return (
            StatusCode::NOT_FOUND,
            "no sign-in here: only standalone mode starts sign-ins from its status page\n",
        )
            .into_response();
    };
    let form = form_fields(&body);
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let token_ok = field("token").is_some_and(|t| same_bytes(t.as_bytes(), page.token.as_bytes()));
    if !token_ok {
        return forbidden(
            "refused: the sign-in token is missing or wrong (a sign-in starts only from the \"Sign in\" button \
             of this process's status page); reload the status page and press the button again"
                .into(),
        );
    }
    let Some(name) = field("credential").filter(|n| !n.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "the form has no credential field: reload the status page\n",
        )
            .into_response();
    };
    let needs = admin.store.get(name).is_some_and(|s| s.sign_in.is_some());
    if !needs {
        return (
            StatusCode::CONFLICT,
            format!("{name:?} is not a credential that waits for a sign-in: reload the status page\n"),
        )
            .into_response();
    }
    match (page.start)(name.to_owned()).await {
        Ok(url) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, url),
                (header::CACHE_CONTROL, "no-store".into()),
            ],
        )
            .into_response(),
        Err(why) => (
            StatusCode::BAD_GATEWAY,
            [(header::CACHE_CONTROL, "no-store")],
            format!("the sign-in of {name:?} could not start: {why}\n"),
        )
            .into_response(),
    }
}

/// A link or a typed URL cannot start a sign-in: only the page's form can.
async fn sign_in_by_get() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST")],
        "refused: a sign-in starts only with the \"Sign in\" button of the status page (a POST), never by \
         opening a URL\n",
    )
        .into_response()
}

/// Equal, in a time that does not depend on where they differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The fields of an `application/x-www-form-urlencoded` body (core's decoding of the sign-in
/// redirect's query: the same format).
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    mcp_credentials_core::source::sign_in::parse_query(&String::from_utf8_lossy(body))
}

/// `s` escaped for HTML text and attribute values.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::credential::{Credential, fixtures::data};

    /// A router whose sign-ins are recorded instead of run; `a` needs a sign-in.
    fn router() -> (Router, String, Arc<Mutex<Vec<String>>>) {
        let store = Store::new(["a".to_owned(), "b".to_owned()]);
        store.needs_sign_in("a", "not signed in yet; run login a", Some("login a".into()));
        store.set(
            "b",
            Credential::from_data(&data("https://b.example", "Authorization", "x")).unwrap(),
        );
        let started = Arc::new(Mutex::new(Vec::new()));
        let seen = started.clone();
        let page = SignInPage::new(move |name| {
            seen.lock().unwrap().push(name.clone());
            Box::pin(async move { Ok(format!("https://as.example/authorize?for={name}")) })
        });
        let token = page.token().to_owned();
        (
            app(store, Metrics::register(), Some(page), Vec::new()),
            token,
            started,
        )
    }

    async fn send(router: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let r = router.clone().oneshot(req).await.unwrap();
        let (parts, body) = r.into_parts();
        let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn post(host: &str, origin: Option<&str>, body: &str) -> Request<Body> {
        let mut b = Request::post("/sign-in")
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    }

    #[tokio::test]
    async fn the_page_s_button_starts_the_sign_in_and_sends_the_browser_to_the_authorization_server() {
        let (router, token, started) = router();
        let page = Request::get("/status")
            .header(header::HOST, "127.0.0.1:9901")
            .body(Body::empty())
            .unwrap();
        let (status, headers, page) = send(&router, page).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains(&format!("name=token value=\"{token}\"")), "{page}");
        assert!(
            page.contains("name=credential value=\"a\"") && !page.contains("value=\"b\""),
            "{page}"
        );
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        let body = format!("credential=a&token={token}");
        let (status, headers, _) = send(
            &router,
            post("127.0.0.1:9901", Some("http://127.0.0.1:9901"), &body),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[header::LOCATION], "https://as.example/authorize?for=a");
        // Without an Origin (some browsers send none), on localhost and [::1].
        for host in ["localhost:9901", "[::1]:9901"] {
            let (status, ..) = send(&router, post(host, None, &body)).await;
            assert_eq!(status, StatusCode::SEE_OTHER, "{host}");
        }
        assert_eq!(*started.lock().unwrap(), ["a", "a", "a"]);
        // A credential that needs no sign-in is not signed in from here.
        let (status, _, text) = send(
            &router,
            post("localhost", None, &format!("credential=b&token={token}")),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{text}");
    }

    #[tokio::test]
    async fn a_foreign_host_a_foreign_origin_a_missing_or_wrong_token_and_a_get_are_refused() {
        let (router, token, started) = router();
        let good = format!("credential=a&token={token}");
        // DNS rebinding: the browser names the attacker's host; neither the page nor a sign-in.
        let (status, _, text) = send(
            &router,
            Request::get("/status")
                .header(header::HOST, "evil.example:9901")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(text.contains("\"evil.example:9901\" is not a loopback"), "{text}");
        assert!(!text.contains(&token));
        for host in ["evil.example:9901", "127.0.0.1.evil.example", "10.0.0.1:9901", ""] {
            let (status, _, text) = send(&router, post(host, None, &good)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{host}: {text}");
            assert!(text.contains("not a loopback"), "{text}");
        }
        // Another site's form posting to the loopback listener.
        for origin in [
            "https://evil.example",
            "null",
            "http://127.0.0.1:1234",
            "http://localhost:9901",
        ] {
            let (status, _, text) = send(&router, post("127.0.0.1:9901", Some(origin), &good)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{origin}: {text}");
            assert!(text.contains("another site"), "{text}");
        }
        // No token, a wrong one, one of the right length but wrong.
        let wrong = "x".repeat(token.len());
        for body in [
            "credential=a".to_owned(),
            "credential=a&token=guess".into(),
            format!("credential=a&token={wrong}"),
        ] {
            let (status, _, text) = send(
                &router,
                post("127.0.0.1:9901", Some("http://127.0.0.1:9901"), &body),
            )
            .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}: {text}");
            assert!(text.contains("token is missing or wrong"), "{text}");
        }
        // A link (an <img>, a typed URL) cannot start one.
        let (status, headers, text) = send(
            &router,
            Request::get(format!("/sign-in?{good}"))
                .header(header::HOST, "127.0.0.1:9901")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "POST");
        assert!(text.contains("only with the \"Sign in\" button"), "{text}");
        assert!(started.lock().unwrap().is_empty(), "no sign-in started");
    }

    #[tokio::test]
    async fn without_standalone_mode_there_is_no_button_and_no_sign_in() {
        let store = Store::new(["a".to_owned()]);
        store.needs_sign_in("a", "run login a", Some("login a".into()));
        let router = app(store, Metrics::register(), None, Vec::new());
        let (_, _, page) = send(
            &router,
            Request::get("/")
                .header(header::HOST, "localhost")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert!(
            page.contains("run <code>login a</code>") && !page.contains("<form"),
            "{page}"
        );
        let (status, ..) = send(&router, post("localhost", None, "credential=a&token=x")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn loopback_hosts_are_localhost_and_loopback_addresses() {
        for h in [
            "localhost",
            "localhost:80",
            "LOCALHOST.",
            "app.localhost:3",
            "127.0.0.1",
            "127.1.2.3:9",
            "[::1]",
            "[::1]:9901",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "example.com",
            "localhost.example.com",
            "10.0.0.1",
            "[::2]:1",
            "[::1",
            "::1",
            "0.0.0.0:80",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn form_fields_are_decoded() {
        assert_eq!(
            form_fields(b"credential=my-cred&token=a%2Bb+c&empty="),
            [
                ("credential".to_owned(), "my-cred".to_owned()),
                ("token".into(), "a+b c".into()),
                ("empty".into(), String::new())
            ]
        );
    }
}

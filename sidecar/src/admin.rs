//! The admin listener: `/metrics` for Prometheus, `/healthz` (the process serves), `/readyz` (every
//! required credential is present and unexpired), `/` and `/status` (a page listing every
//! credential: state, expiry, last failure, and the command for one that needs a sign-in; never a
//! credential value), on loopback; and the probe listener, the same
//! two checks with nothing but a status, which the kubelet's probes reach on the pod IP.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use jiff::Timestamp;
use serde_json::json;

use crate::{metrics::Metrics, store::Store};

#[derive(Clone)]
struct Admin {
    store: Arc<Store>,
    metrics: Metrics,
    /// The credentials whose sessions come from the browser extension (`/browser` serves them).
    browser_sessions: Arc<[String]>,
}

/// The admin Router. `browser_sessions`: the `session.browser` credentials, whose line on the
/// status page points to `/browser` (pairing, each site's state).
pub fn app(store: Arc<Store>, metrics: Metrics, browser_sessions: Vec<String>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/", get(status_page))
        .route("/status", get(status_page))
        .with_state(Admin {
            store,
            metrics,
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
    /// `ready`, `needs sign-in`, `expired`, `failing` or `waiting`.
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

async fn status_page(State(admin): State<Admin>) -> impl IntoResponse {
    let mut rows = String::new();
    for l in status_lines(&admin.store, Timestamp::now()) {
        let action = match &l.sign_in {
            Some(cmd) => format!("<b>Sign in:</b> run <code>{}</code>", escape(cmd)),
            None if admin.browser_sessions.contains(&l.name) => match l.state {
                "ready" => "from the browser (<a href=\"/browser\">extension</a>)".to_owned(),
                _ => "<b>Sign in</b> to the site in your browser (the extension: <a href=\"/browser\">pairing</a>)"
                    .to_owned(),
            },
            None => String::new(),
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
        ],
        page,
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

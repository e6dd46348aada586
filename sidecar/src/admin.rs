//! The admin listener: `/metrics` for Prometheus, `/healthz` (the process serves), `/readyz` (every
//! required credential is present and unexpired), on loopback; and the probe listener, the same
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
}

/// The admin Router.
pub fn app(store: Arc<Store>, metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Admin { store, metrics })
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

//! The HTTP endpoints validators of minted JWTs read: `/.well-known/openid-configuration` and
//! `/.well-known/jwks.json`. Public keys only; served by every replica.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

use crate::keys::Keys;

/// Validators may cache the documents this long: well under the 10 minutes a successor key is
/// published before it signs.
const CACHE_CONTROL: &str = "public, max-age=300";

/// The router of both documents.
pub fn app(keys: Arc<Keys>) -> Router {
    let jwks = keys.clone();
    Router::new()
        .route(
            "/.well-known/jwks.json",
            get(move || std::future::ready(cached(Json(jwks.jwks())))),
        )
        .route(
            "/.well-known/openid-configuration",
            get(move || std::future::ready(cached(Json(keys.discovery())))),
        )
}

fn cached(body: impl IntoResponse) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL))],
        body,
    )
}

/// What the JWKS listener accepts: validators fetch two small documents and cache them, so a few
/// hundred connections serve many validators, and each request arrives at once.
const LIMITS: mcp_credentials_core::listen::Limits = mcp_credentials_core::listen::Limits {
    max_connections: 256,
    header_read_timeout: Duration::from_secs(10),
    handshake_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
};

/// Serves [`app`] on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, keys: Arc<Keys>) {
    crate::server::serve_plain(listener, LIMITS, app(keys)).await;
}

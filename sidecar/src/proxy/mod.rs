//! The proxy: a stack of small layers around one forwarding handler, assembled in [`app`].

use std::sync::Arc;

use axum::{Router, middleware};

use crate::{metrics::Metrics, store::Store};

mod attach;
mod forward;
mod guard;
mod measure;
mod replay;
mod route;
mod sse;
mod strip;

pub use forward::{ClientError, ClientSettings, UpstreamClient, upstream_client};
pub use replay::set_wait as set_replay_wait;
pub use route::Routed;

/// What every layer shares (behind one `Arc`: each layer receives it per request).
pub struct Proxy {
    /// The current credentials.
    pub store: Arc<Store>,
    /// The pooled upstream client.
    pub client: UpstreamClient,
    /// The sidecar's metrics.
    pub metrics: Metrics,
    /// The largest request header section accepted, in bytes.
    pub max_header_bytes: usize,
}

/// The proxy as a Router. Layers run top to bottom on the way in (axum applies the last `.layer` first).
pub fn app(proxy: Proxy) -> Router {
    let proxy = Arc::new(proxy);
    Router::new()
        .fallback(forward::forward)
        // 5. attach the current credential; after strip, so nothing the agent sent can replace it.
        .layer(middleware::from_fn_with_state(proxy.clone(), attach::attach))
        // 4. strip whatever credential the agent sent (no token passthrough), on every method.
        .layer(middleware::from_fn(strip::strip))
        // 3. route /<credential>/<rest> to <upstream>/<rest>; the only place an upstream URI is made.
        .layer(middleware::from_fn_with_state(proxy.clone(), route::route))
        // 2. refuse forward-proxy targets and oversized headers before any work is done.
        .layer(middleware::from_fn_with_state(proxy.clone(), guard::guard))
        // 1. count every answer, the sidecar's own refusals included.
        .layer(middleware::from_fn_with_state(proxy.clone(), measure::measure))
        .with_state(proxy)
}

#[cfg(test)]
mod tests;

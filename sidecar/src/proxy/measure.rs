//! Layer: count every answer by credential and status.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};

use super::Proxy;
use crate::metrics::NO_CREDENTIAL;

/// Put on a response by the router so this layer knows which credential it was for.
#[derive(Clone, Debug)]
pub(super) struct CredentialName(pub Arc<str>);

pub(super) async fn measure(State(proxy): State<Arc<Proxy>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let credential = response
        .extensions()
        .get::<CredentialName>()
        .map_or(NO_CREDENTIAL, |c| &c.0);
    proxy
        .metrics
        .requests
        .with_label_values(&[credential, response.status().as_str()])
        .inc();
    response
}

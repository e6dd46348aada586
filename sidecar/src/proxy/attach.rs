//! Layer: attach the current credential, or refuse with 503 when there is none or it has expired. An
//! expired credential is never sent.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use jiff::Timestamp;

use super::{Proxy, Routed};
use crate::error::ProxyError;

pub(super) async fn attach(State(proxy): State<Arc<Proxy>>, mut request: Request, next: Next) -> Response {
    let Some(routed) = request.extensions().get::<Routed>() else {
        // Unreachable through `app`: the router answers every request it cannot route.
        return ProxyError::BadPath("it matches no route").into_response();
    };
    let refuse = |e: ProxyError| {
        proxy
            .metrics
            .expired_refusals
            .with_label_values(&[&routed.name])
            .inc();
        e.into_response()
    };
    let Some(credential) = routed.slot.current.clone() else {
        return refuse(ProxyError::CredentialUnavailable {
            name: routed.name.clone(),
            last_failure: routed.slot.last_failure.clone(),
        });
    };
    if credential.is_expired(Timestamp::now()) {
        return refuse(ProxyError::CredentialExpired {
            name: routed.name.clone(),
            expired_at: credential.expires_at.unwrap_or_default(),
            last_failure: routed.slot.last_failure.clone(),
        });
    }
    let headers = request.headers_mut();
    for (name, value) in &credential.headers {
        headers.insert(name.clone(), value.clone());
    }
    next.run(request).await
}

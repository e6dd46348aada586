//! Step: attach the current credential, or refuse with 503 when there is none or it has expired. An
//! expired credential is never sent.

use std::sync::Arc;

use http::HeaderMap;

use super::{Proxy, Routed};
use crate::{credential::Credential, error::ProxyError};

/// Attaches the routed credential to `headers` (after [`strip`](super::strip), so nothing the agent
/// sent can replace it) and returns it.
pub(super) fn attach(
    proxy: &Proxy,
    routed: &Routed,
    headers: &mut HeaderMap,
) -> Result<Arc<Credential>, ProxyError> {
    let refuse = |e: ProxyError| {
        proxy
            .metrics
            .expired_refusals
            .with_label_values(&[&routed.name])
            .inc();
        e
    };
    let Some(credential) = routed.slot.current.clone() else {
        return Err(refuse(ProxyError::CredentialUnavailable {
            name: routed.name.clone(),
            last_failure: routed.slot.last_failure.clone(),
        }));
    };
    if credential.is_expired_now() {
        return Err(refuse(ProxyError::CredentialExpired {
            name: routed.name.clone(),
            expired_at: credential.expires_at.unwrap_or_default(),
            last_failure: routed.slot.last_failure.clone(),
        }));
    }
    // `insert` replaces every value the agent sent under the same name.
    for (name, value) in &credential.headers {
        headers.insert(name.clone(), value.clone());
    }
    Ok(credential)
}

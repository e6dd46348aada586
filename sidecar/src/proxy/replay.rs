//! Replay after the upstream rejects the credential (401 `invalid_token`, 403 `insufficient_scope`):
//! the sidecar asks its credential source for a new credential (in a pod: a report to the operator,
//! see [`crate::report`]), waits briefly for one, and sends the request once more if its body was
//! small enough to keep. Otherwise the upstream's answer stands.
//!
//! A credential read from files (the files store, standalone API keys) is replayed after any 401/403,
//! whatever the challenge: an API-key server says nothing like `invalid_token`, and its key rotates
//! by two steps that never land at the same moment. When the server switched first, the request
//! waits for the rotated file (its source reads the files again now). When the file came first, the
//! server rejects a key it is about to accept: a credential loaded less than the wait before the
//! rejection is given the wait to take effect, then the request is sent once more with it.

use std::{sync::OnceLock, time::Duration};

use axum::body::Body;
use bytes::Bytes;
use http_body::Body as _;
use http_body_util::BodyExt;
use mcp_credentials_core::report::Rejection;

use super::Proxy;
use crate::{
    credential::Credential,
    error::ProxyError,
    store::{RefreshRequest, Store},
};

/// The largest request body kept for a replay (the MCP messages worth replaying are a few KiB).
pub const MAX_BODY: u64 = 1 << 20;
/// How long a rejected request waits for a new credential: long enough for a token request to a
/// nearby authorization server, short enough that the agent is not left hanging when none comes.
pub const WAIT: Duration = Duration::from_secs(2);

static WAIT_SETTING: OnceLock<Duration> = OnceLock::new();

/// Sets the wait for this process (`MCP_SIDECAR_REPLAY_WAIT`), once, at start-up; default [`WAIT`].
pub fn set_wait(wait: Duration) {
    let _ = WAIT_SETTING.set(wait);
}

fn wait() -> Duration {
    WAIT_SETTING.get().copied().unwrap_or(WAIT)
}

/// Takes `body` in memory when its length is known and at most [`MAX_BODY`], so it can be sent twice.
/// Bodies of unknown or larger size keep streaming (and are never replayed).
pub async fn keep(body: Body) -> Result<(Body, Option<Bytes>), ProxyError> {
    match body.size_hint().exact() {
        Some(0) => Ok((Body::empty(), Some(Bytes::new()))),
        Some(n) if n <= MAX_BODY => {
            let bytes = body
                .collect()
                .await
                .map_err(|_| ProxyError::RequestBody)?
                .to_bytes();
            Ok((Body::from(bytes.clone()), Some(bytes)))
        }
        _ => Ok((body, None)),
    }
}

/// What both paths do with an upstream's rejection of credential `name` (`used`): count it, then,
/// when the request can go out again (`replayable`: its body was kept or it has none) and a new
/// credential may answer the rejection, ask for one and wait: the credential to send it again with.
pub(super) async fn after_rejection(
    proxy: &Proxy,
    name: &str,
    used: &Credential,
    (reason, scope): (Rejection, Option<String>),
    replayable: bool,
) -> Option<std::sync::Arc<Credential>> {
    proxy
        .metrics
        .upstream_rejections
        .with_label_values(&[name, reason.as_str()])
        .inc();
    if !replayable || !worth_replaying(&proxy.store, name, reason) {
        return None;
    }
    Box::pin(newer_credential(&proxy.store, name, used, reason, scope)).await
}

/// Whether a new credential may answer the upstream's rejection: its challenge says the credential
/// is stale or too narrow, or any 401/403 of a credential whose source reads it from files again
/// when asked.
pub fn worth_replaying(store: &Store, name: &str, reason: Rejection) -> bool {
    match reason {
        Rejection::Curable(_) => true,
        Rejection::Other => store.rereads(name),
    }
}

/// Asks for a new credential for `name` (the upstream rejected `used` for `reason`, challenging
/// `scope` if it said) and waits up to
/// [`WAIT`] for a version other than `used`. For a credential read from files, when none comes:
/// `used` itself if it is still the current one and was loaded less than the wait before the
/// rejection (the upstream may not have switched to it yet; it has had the wait to do so).
pub async fn newer_credential(
    store: &Store,
    name: &str,
    used: &Credential,
    reason: Rejection,
    scope: Option<String>,
) -> Option<std::sync::Arc<Credential>> {
    let newer = || {
        store
            .get(name)
            .and_then(|slot| slot.current)
            .filter(|c| c.version != used.version && !c.is_expired_now())
    };
    let mut changes = store.subscribe();
    store.request_refresh(RefreshRequest {
        name: name.to_owned(),
        reason,
        version: used.version.clone(),
        scope,
    });
    if let Some(c) = newer() {
        return Some(c);
    }
    // A key file that landed less than the wait ago: the upstream may not have switched to it yet.
    let just_loaded = store.rereads(name)
        && Duration::try_from(jiff::Timestamp::now().duration_since(used.loaded_at))
            .is_ok_and(|age| age < wait());
    match tokio::time::timeout(wait(), changes.wait_for(|_| newer().is_some())).await {
        Ok(Ok(_)) => newer(),
        // No newer one: the same credential once more, if it is still the one to send.
        Err(_) if just_loaded => store
            .get(name)
            .and_then(|slot| slot.current)
            .filter(|c| c.version == used.version && c.headers == used.headers && !c.is_expired_now()),
        Ok(Err(_)) | Err(_) => None,
    }
}

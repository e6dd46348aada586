//! Step: count every answer by credential and status. The handles of a credential are resolved once
//! per agent connection, not looked up by label on every request.

use std::sync::Arc;

use http::StatusCode;
use prometheus::{Histogram, IntCounter};

use super::Proxy;
use crate::metrics::{Metrics, NO_CREDENTIAL};

/// One credential's metric handles.
pub(super) struct Handles {
    /// The credential's name.
    pub name: Arc<str>,
    /// `upstream_duration_seconds{credential}`.
    pub upstream_duration: Histogram,
    /// `requests_total{credential, status="200"}`, the common answer.
    ok: IntCounter,
}

impl Handles {
    pub(super) fn new(metrics: &Metrics, name: &str) -> Self {
        Handles {
            name: name.into(),
            upstream_duration: metrics.upstream_duration.with_label_values(&[name]),
            ok: metrics
                .requests
                .with_label_values(&[name, StatusCode::OK.as_str()]),
        }
    }

    /// The handles of credential `name`: `cached` (the agent connection's last ones) when they are
    /// its, else looked up once.
    pub(super) fn of(metrics: &Metrics, name: &str, cached: Option<&Arc<Handles>>) -> Arc<Handles> {
        match cached {
            Some(h) if *h.name == *name => h.clone(),
            _ => Arc::new(Handles::new(metrics, name)),
        }
    }
}

/// Counts one answer; `handles` is `None` when the request matched no credential.
pub(super) fn count(proxy: &Proxy, handles: Option<&Handles>, status: StatusCode) {
    match handles {
        Some(h) if status == StatusCode::OK => h.ok.inc(),
        _ => proxy
            .metrics
            .requests
            .with_label_values(&[handles.map_or(NO_CREDENTIAL, |h| &h.name), status.as_str()])
            .inc(),
    }
}

//! The operator's Prometheus metrics, as one typed struct registered in one place.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the operator exports (prefix `mcp_credentials_`).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Refresh attempts by result: `success`, `transient_error`, `invalid_grant`, `config_error`.
    pub refreshes: IntCounterVec,
    /// How long obtaining a credential took, in seconds.
    pub refresh_duration: Histogram,
    /// When each credential expires (Unix seconds); absent for credentials that do not expire.
    pub expiration: GaugeVec,
    /// When each credential will be renewed (Unix seconds).
    pub renewal: GaugeVec,
    /// 1 when the credential is Ready, else 0.
    pub ready: IntGaugeVec,
    /// Token endpoint calls by issuer (scheme, host and port of the token endpoint).
    pub token_requests: IntCounterVec,
    /// Requests to the Kubernetes API by HTTP method and resource (to check the write budget).
    pub api_requests: IntCounterVec,
    /// 1 while this process holds the leader Lease.
    pub leader: IntGaugeVec,
    /// Times this process stopped leading without shutting down, by reason: `taken_over`,
    /// `renew_deadline` (no renewal within the deadline).
    pub leadership_lost: IntCounterVec,
    /// Sidecar reports (`POST /v1/report`) by result: `refresh_requested`, `already_newer`,
    /// `step_up_recorded` (a signed-in credential's `insufficient_scope`: no refresh), `rate_limited`, `throttled` (too many reports, before any TokenReview), `unauthenticated`,
    /// `forbidden`, `not_found`, `bad_request`, `error`.
    pub reports: IntCounterVec,
    /// Session liveness checks by credential and result: `alive`, `expired`, `error`.
    pub session_checks: IntCounterVec,
    /// JWT signing keys in the published JWKS, by algorithm (2 while a successor or a retired key overlaps).
    pub jwt_keys: IntGaugeVec,
    /// Reconciles that failed on the Kubernetes API, by category: `forbidden`, `not_found`,
    /// `conflict`, `unavailable` (429, 5xx, no answer), `other`.
    pub reconcile_errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn register() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let p = |n: &str| format!("mcp_credentials_{n}");
        let refreshes = IntCounterVec::new(
            Opts::new(p("refreshes_total"), "Refresh attempts by result"),
            &["result"],
        )?;
        let refresh_duration = Histogram::with_opts(
            HistogramOpts::new(
                p("refresh_duration_seconds"),
                "Time to obtain a credential from its source",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let labels = &["namespace", "name"];
        let expiration = GaugeVec::new(
            Opts::new(
                p("credential_expiration_timestamp_seconds"),
                "When the credential expires",
            ),
            labels,
        )?;
        let renewal = GaugeVec::new(
            Opts::new(
                p("credential_renewal_timestamp_seconds"),
                "When the credential will be renewed",
            ),
            labels,
        )?;
        let ready = IntGaugeVec::new(
            Opts::new(p("credential_ready"), "1 when the credential is Ready"),
            labels,
        )?;
        let token_requests = IntCounterVec::new(
            Opts::new(
                p("token_endpoint_requests_total"),
                "Token endpoint calls by issuer",
            ),
            &["issuer"],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new(
                p("kube_api_requests_total"),
                "Kubernetes API requests by method and resource",
            ),
            &["method", "resource"],
        )?;
        let leader = IntGaugeVec::new(
            Opts::new(p("leader"), "1 while this process is the leader"),
            &["identity"],
        )?;
        let leadership_lost = IntCounterVec::new(
            Opts::new(
                p("leadership_lost_total"),
                "Times this process stopped leading without shutting down, by reason",
            ),
            &["reason"],
        )?;
        let reports = IntCounterVec::new(
            Opts::new(
                p("reports_total"),
                "Sidecar reports of rejected credentials, by result",
            ),
            &["result"],
        )?;
        let session_checks = IntCounterVec::new(
            Opts::new(
                p("session_checks_total"),
                "Session liveness checks by credential and result (alive, expired, error)",
            ),
            &["namespace", "name", "result"],
        )?;
        let jwt_keys = IntGaugeVec::new(
            Opts::new(
                p("jwt_signing_keys"),
                "JWT signing keys published in the JWKS, by algorithm",
            ),
            &["algorithm"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                p("reconcile_errors_total"),
                "Reconciles that failed on the Kubernetes API, by category",
            ),
            &["category"],
        )?;
        for c in [
            Box::new(refreshes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(refresh_duration.clone()),
            Box::new(expiration.clone()),
            Box::new(renewal.clone()),
            Box::new(ready.clone()),
            Box::new(token_requests.clone()),
            Box::new(api_requests.clone()),
            Box::new(leader.clone()),
            Box::new(leadership_lost.clone()),
            Box::new(reports.clone()),
            Box::new(session_checks.clone()),
            Box::new(jwt_keys.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            refreshes,
            refresh_duration,
            expiration,
            renewal,
            ready,
            token_requests,
            api_requests,
            leader,
            leadership_lost,
            reports,
            session_checks,
            jwt_keys,
            reconcile_errors,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Forgets a deleted credential's series.
    pub fn forget(&self, namespace: &str, name: &str) {
        let _ = self.expiration.remove_label_values(&[namespace, name]);
        let _ = self.renewal.remove_label_values(&[namespace, name]);
        let _ = self.ready.remove_label_values(&[namespace, name]);
        for result in SESSION_CHECK_RESULTS {
            let _ = self
                .session_checks
                .remove_label_values(&[namespace, name, result]);
        }
    }

    /// Forgets the series of every credential not in `live` (`(namespace, name)`): the deleted
    /// ones, whose expiry would otherwise fire `McpCredentialExpiringWithoutRenewal` forever.
    /// Returns how many credentials were forgotten.
    pub fn forget_all_but(&self, live: &std::collections::HashSet<(String, String)>) -> usize {
        use prometheus::core::Collector;
        let mut seen = std::collections::HashSet::new();
        let families = [
            self.expiration.collect(),
            self.renewal.collect(),
            self.ready.collect(),
            self.session_checks.collect(),
        ];
        for m in families.iter().flatten().flat_map(|f| f.get_metric()) {
            let label = |n: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == n)
                    .map(|l| l.value().to_owned())
            };
            if let (Some(ns), Some(name)) = (label("namespace"), label("name")) {
                seen.insert((ns, name));
            }
        }
        let gone: Vec<_> = seen.difference(live).collect();
        for (ns, name) in &gone {
            self.forget(ns, name);
        }
        gone.len()
    }
}

/// The `result` label values of `session_checks_total`.
const SESSION_CHECK_RESULTS: [&str; 3] = ["alive", "expired", "error"];

/// The resource an API path addresses, for the `resource` label: `secrets`, `mcpcredentials/status`,
/// `serviceaccounts` (reads and TokenRequests for tokenExchange subjects), ...
pub fn api_resource(path: &str) -> &'static str {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let status = segs.last() == Some(&"status");
    for known in [
        "secrets",
        "mcpcredentials",
        "leases",
        "events",
        "tokenreviews",
        "serviceaccounts",
    ] {
        if segs.contains(&known) {
            return match (known, status) {
                ("mcpcredentials", true) => "mcpcredentials/status",
                _ => known,
            };
        }
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_map_to_few_resource_labels() {
        assert_eq!(api_resource("/api/v1/namespaces/a/secrets/b"), "secrets");
        assert_eq!(
            api_resource("/apis/mcpcredentials.dev/v1alpha1/namespaces/a/mcpcredentials/b/status"),
            "mcpcredentials/status"
        );
        assert_eq!(
            api_resource("/apis/coordination.k8s.io/v1/namespaces/a/leases/x"),
            "leases"
        );
        assert_eq!(
            api_resource("/api/v1/namespaces/a/serviceaccounts/agent/token"),
            "serviceaccounts"
        );
        assert_eq!(api_resource("/version"), "other");
    }

    #[test]
    fn the_series_of_credentials_that_are_gone_are_forgotten() {
        let m = Metrics::register().unwrap();
        for name in ["kept", "gone"] {
            m.ready.with_label_values(&["ns", name]).set(1);
            m.expiration.with_label_values(&["ns", name]).set(1e9);
            m.renewal.with_label_values(&["ns", name]).set(1e9);
        }
        m.session_checks.with_label_values(&["ns", "gone", "alive"]).inc();
        let live = std::collections::HashSet::from([("ns".to_owned(), "kept".to_owned())]);
        assert_eq!(m.forget_all_but(&live), 1);
        let text = m.render();
        assert!(!text.contains(r#"name="gone""#), "{text}");
        assert_eq!(text.matches(r#"name="kept""#).count(), 3, "{text}");
        assert_eq!(m.forget_all_but(&live), 0);
    }
}

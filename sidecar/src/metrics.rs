//! The sidecar's Prometheus metrics: a typed struct registered once. Labels are the credential name
//! (few per pod), a status code, or a small fixed reason; never a token and never a URL.

use jiff::Timestamp;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder, exponential_buckets,
};

use crate::store::Store;

/// Label value for requests that matched no credential (so unknown names cannot grow the label set).
pub const NO_CREDENTIAL: &str = "";

/// Every sidecar metric.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `mcp_credentials_sidecar_requests_total{credential,status}`.
    pub requests: IntCounterVec,
    /// `mcp_credentials_sidecar_upstream_duration_seconds{credential}`: until the response headers.
    pub upstream_duration: HistogramVec,
    /// `mcp_credentials_sidecar_upstream_rejections_total{credential,reason}`: upstream 401 and 403.
    pub upstream_rejections: IntCounterVec,
    /// `mcp_credentials_sidecar_upstream_resends_total{credential,reason}`: requests sent again
    /// because the upstream provably did not process them: `not_sent` (the connection closed before
    /// the request was started on it), `refused_stream` (HTTP/2 `REFUSED_STREAM`), `goaway` (HTTP/2
    /// GOAWAY naming a lower last stream). The pool's own resends of requests it never started on a
    /// reused connection are not seen, so not counted.
    pub upstream_resends: IntCounterVec,
    /// `mcp_credentials_sidecar_expired_refusals_total{credential}`: 503s instead of an expired credential.
    pub expired_refusals: IntCounterVec,
    /// `mcp_credentials_sidecar_credential_age_seconds{credential}`: since this version was loaded.
    pub credential_age: GaugeVec,
    /// `mcp_credentials_sidecar_credential_expiration_timestamp_seconds{credential}`.
    pub credential_expiration: GaugeVec,
    /// `mcp_credentials_sidecar_reports_total{credential,result}`: reports of rejected credentials
    /// to the operator, by result (`accepted`, `rate_limited`, `unauthenticated`, `forbidden`,
    /// `not_found`, `no_token`, `error`).
    pub reports: IntCounterVec,
    /// `mcp_credentials_sidecar_http1_handoffs_total{reason}`: agent connections the HTTP/1.1 fast
    /// path handed to the hyper path, by the first request's reason (`http2_upstream`,
    /// `not_http1` (HTTP/2, HTTP/1.0, malformed), `request_target`, `unknown_credential`,
    /// `credential_unavailable` (not loaded or expired),
    /// `request_header`, `connection_header`, `content_length`, `headers_too_large`, `large_body`).
    pub http1_handoffs: IntCounterVec,
    /// `mcp_credentials_sidecar_sse_events_too_large_total{credential}`: event streams ended because
    /// one event was over `MCP_SIDECAR_MAX_SSE_EVENT_BYTES`.
    pub sse_events_too_large: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn register() -> Self {
        let registry = Registry::new_custom(Some("mcp_credentials_sidecar".into()), None)
            .expect("a valid metric prefix");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by credential and HTTP status",
            ),
            &["credential", "status"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "upstream_duration_seconds",
                "Time from forwarding a request until the upstream's response headers arrive",
            )
            // 100 µs to ~100 s: loopback upstreams answer in microseconds, slow tools in tens of seconds.
            .buckets(exponential_buckets(0.0001, 4.0, 11).expect("valid buckets")),
            &["credential"],
        )
        .expect("valid metric");
        let upstream_rejections = IntCounterVec::new(
            Opts::new(
                "upstream_rejections_total",
                "Upstream 401 and 403 answers, by reason (invalid_token, insufficient_scope, other)",
            ),
            &["credential", "reason"],
        )
        .expect("valid metric");
        let upstream_resends = IntCounterVec::new(
            Opts::new(
                "upstream_resends_total",
                "Requests sent again because the upstream did not process them, by reason (not_sent, refused_stream, goaway)",
            ),
            &["credential", "reason"],
        )
        .expect("valid metric");
        let expired_refusals = IntCounterVec::new(
            Opts::new(
                "expired_refusals_total",
                "Requests refused with 503 because the credential had expired or was never loaded",
            ),
            &["credential"],
        )
        .expect("valid metric");
        let credential_age = GaugeVec::new(
            Opts::new(
                "credential_age_seconds",
                "Seconds since the current credential version was loaded",
            ),
            &["credential"],
        )
        .expect("valid metric");
        let credential_expiration = GaugeVec::new(
            Opts::new(
                "credential_expiration_timestamp_seconds",
                "When the current credential expires, as a Unix timestamp (absent when it does not expire)",
            ),
            &["credential"],
        )
        .expect("valid metric");
        let reports = IntCounterVec::new(
            Opts::new(
                "reports_total",
                "Reports of rejected credentials sent to the operator, by credential and result",
            ),
            &["credential", "result"],
        )
        .expect("valid metric");
        let http1_handoffs = IntCounterVec::new(
            Opts::new(
                "http1_handoffs_total",
                "Agent connections the HTTP/1.1 fast path handed to the hyper path, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let sse_events_too_large = IntCounterVec::new(
            Opts::new(
                "sse_events_too_large_total",
                "Event streams ended because one event was over MCP_SIDECAR_MAX_SSE_EVENT_BYTES",
            ),
            &["credential"],
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(sse_events_too_large.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_rejections.clone()),
            Box::new(upstream_resends.clone()),
            Box::new(expired_refusals.clone()),
            Box::new(credential_age.clone()),
            Box::new(credential_expiration.clone()),
            Box::new(reports.clone()),
            Box::new(http1_handoffs.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            upstream_duration,
            upstream_rejections,
            upstream_resends,
            expired_refusals,
            credential_age,
            credential_expiration,
            reports,
            http1_handoffs,
            sse_events_too_large,
        }
    }

    /// The text exposition of every metric, with the credential gauges brought up to date.
    pub fn render(&self, store: &Store) -> String {
        let now = Timestamp::now();
        for (name, slot) in store.snapshot() {
            let Some(c) = slot.current else { continue };
            let age = now.duration_since(c.loaded_at).as_secs_f64().max(0.0);
            self.credential_age.with_label_values(&[&name]).set(age);
            if let Some(at) = c.expires_at {
                self.credential_expiration
                    .with_label_values(&[&name])
                    .set(at.as_second() as f64);
            }
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

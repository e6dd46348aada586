//! Reports to the operator: when an upstream rejects a credential (401 `invalid_token`, 403
//! `insufficient_scope`), the operator is asked to refresh it now (`POST /v1/report`), authenticated
//! with the pod's service-account token. The replay meanwhile waits for the new version to arrive
//! through the Kubernetes watch; a report never delays a request beyond that wait.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::{sync::broadcast::error::RecvError, time::Instant};

use mcp_credentials_core::report::{Reason, Rejection, Report};

use crate::{
    error::error_chain,
    metrics::Metrics,
    store::{RefreshRequest, Store},
};

/// A report gives up after this long: well inside the replay's 2 s wait, so that when the operator
/// is slow, the request gets the upstream's answer instead of hanging.
pub const TIMEOUT: Duration = Duration::from_millis(1500);
/// The same version of a credential is reported at most once in this long: the operator forces at
/// most one refresh per credential in 10 s, so reporting more often only earns 429s.
pub const REPEAT_AFTER: Duration = Duration::from_secs(10);

/// Where and how to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportSettings {
    /// The operator's report endpoint (`https://...`).
    pub url: String,
    /// PEM CA bundle trusted for it; `None`: the system roots.
    pub ca_pem: Option<String>,
    /// The pod's service-account token, re-read for every report (the kubelet rotates it).
    pub token_file: PathBuf,
}

/// Why reporting cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The CA bundle does not parse.
    #[error("MCP_SIDECAR_REPORT_CA is not a PEM certificate bundle")]
    Ca(#[source] reqwest::Error),
    /// The CA bundle holds no certificate.
    #[error("MCP_SIDECAR_REPORT_CA holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCa,
    /// The HTTP client could not be built.
    #[error("cannot build the report client")]
    Client(#[source] reqwest::Error),
}

/// Sends reports for `store`'s refresh requests.
#[derive(Clone)]
pub struct Reporter {
    client: reqwest::Client,
    settings: Arc<ReportSettings>,
    namespace: Arc<str>,
    metrics: Metrics,
}

impl Reporter {
    /// A reporter for credentials of `namespace`.
    pub fn new(settings: ReportSettings, namespace: &str, metrics: Metrics) -> Result<Self, ReportError> {
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            // The token must never travel in clear text or follow a redirect elsewhere.
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(ReportError::Ca)?;
            if certs.is_empty() {
                return Err(ReportError::NoCa);
            }
            builder = builder.tls_certs_only(certs);
        }
        Ok(Self {
            client: builder.build().map_err(ReportError::Client)?,
            settings: Arc::new(settings),
            namespace: namespace.into(),
            metrics,
        })
    }

    /// Reports every refresh request of `store` until the store is dropped; one report per
    /// credential version in [`REPEAT_AFTER`], each in its own task so none waits for another.
    pub async fn run(self, store: Arc<Store>) {
        let mut requests = store.refresh_requests();
        drop(store);
        let mut sent: HashMap<String, (String, Instant)> = HashMap::new();
        loop {
            let request = match requests.recv().await {
                Ok(r) => r,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let Some(reason) = worth_reporting(&request, sent.get(&request.name), Instant::now()) else {
                continue;
            };
            sent.insert(request.name.clone(), (request.version.clone(), Instant::now()));
            let reporter = self.clone();
            tokio::spawn(async move {
                let result = reporter.send(&request, reason).await;
                reporter
                    .metrics
                    .reports
                    .with_label_values(&[&request.name, result])
                    .inc();
            });
        }
    }

    /// Sends one report of `request`'s rejection for `reason`; returns the metric label of its result.
    pub async fn send(&self, request: &RefreshRequest, reason: Reason) -> &'static str {
        let token = match tokio::fs::read_to_string(&self.settings.token_file).await {
            Ok(t) if !t.trim().is_empty() => t,
            Ok(_) | Err(_) => {
                tracing::warn!(
                    credential = %request.name,
                    token_file = %self.settings.token_file.display(),
                    "cannot report the rejected credential: no service-account token in the file"
                );
                return "no_token";
            }
        };
        let body = Report {
            namespace: self.namespace.to_string(),
            credential: request.name.clone(),
            reason,
            version: request.version.clone(),
            scope: request
                .scope
                .clone()
                .filter(|s| mcp_credentials_core::report::valid_scope(s)),
        };
        let response = self
            .client
            .post(&self.settings.url)
            .bearer_auth(token.trim())
            .json(&body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                // reqwest's error names the URL and the cause; it never holds request headers.
                tracing::warn!(credential = %request.name, error = %error_chain(&e), "reporting the rejected credential failed");
                return "error";
            }
        };
        let status = response.status().as_u16();
        let result = match status {
            202 => "accepted",
            401 => "unauthenticated",
            403 => "forbidden",
            404 => "not_found",
            429 => "rate_limited",
            _ => "error",
        };
        // The operator's message says why (it names the service account and the credential).
        let message = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| {
                v.get("message")?
                    .as_str()
                    .map(|m| m.chars().take(300).collect::<String>())
            })
            .unwrap_or_default();
        if matches!(result, "accepted" | "rate_limited") {
            tracing::info!(credential = %request.name, reason = reason.as_str(), result, message = %message, "reported the rejected credential");
        } else {
            tracing::warn!(credential = %request.name, reason = reason.as_str(), status, result, message = %message, "the operator refused the report");
        }
        result
    }
}

/// What to report of `request`, given the last report for its credential (version, when): only
/// the two rejections a refresh can cure, and one report per version in [`REPEAT_AFTER`].
fn worth_reporting(
    request: &RefreshRequest,
    last: Option<&(String, Instant)>,
    now: Instant,
) -> Option<Reason> {
    let Rejection::Curable(reason) = request.reason else {
        return None;
    };
    let repeated = last
        .is_some_and(|(version, at)| *version == request.version && now.duration_since(*at) < REPEAT_AFTER);
    (!repeated).then_some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(token_file: &str) -> ReportSettings {
        ReportSettings {
            url: "https://127.0.0.1:9/v1/report".into(),
            ca_pem: None,
            token_file: token_file.into(),
        }
    }

    #[tokio::test]
    async fn without_a_token_file_nothing_is_sent() {
        crate::install_crypto_provider();
        let reporter = Reporter::new(settings("/nonexistent/token"), "agents", Metrics::register()).unwrap();
        let request = RefreshRequest {
            name: "github".into(),
            reason: Rejection::Curable(Reason::InvalidToken),
            version: "1".into(),
            scope: None,
        };
        assert_eq!(reporter.send(&request, Reason::InvalidToken).await, "no_token");
    }

    #[test]
    fn one_report_per_version_in_ten_seconds_and_only_for_curable_rejections() {
        let request = |reason, version: &str| RefreshRequest {
            name: "github".into(),
            reason,
            version: version.into(),
            scope: None,
        };
        let (invalid, scope) = (
            Rejection::Curable(Reason::InvalidToken),
            Rejection::Curable(Reason::InsufficientScope),
        );
        let now = Instant::now();
        assert_eq!(
            worth_reporting(&request(invalid, "1"), None, now),
            Some(Reason::InvalidToken)
        );
        assert_eq!(
            worth_reporting(&request(scope, "1"), None, now),
            Some(Reason::InsufficientScope)
        );
        assert!(worth_reporting(&request(Rejection::Other, "1"), None, now).is_none());
        let last = ("1".to_owned(), now);
        assert!(worth_reporting(&request(invalid, "1"), Some(&last), now).is_none());
        assert!(worth_reporting(&request(invalid, "2"), Some(&last), now).is_some());
        assert!(worth_reporting(&request(invalid, "1"), Some(&last), now + REPEAT_AFTER).is_some());
    }

    #[test]
    fn a_ca_bundle_without_a_certificate_is_refused_at_start() {
        crate::install_crypto_provider();
        let mut s = settings("/t");
        s.ca_pem = Some("not a certificate".into());
        let e = Reporter::new(s, "agents", Metrics::register()).err().unwrap();
        assert!(e.to_string().contains("MCP_SIDECAR_REPORT_CA"), "{e}");
    }
}

//! The admission webhooks: an HTTPS server the API server calls for every pod labelled
//! `mcpcredentials.dev/inject: "true"` (`/mutate`, the rules in [`crate::inject`]) and for every
//! McpCredential created or changed (`/validate-mcpcredential`, the rules in [`crate::admission`]).
//! It runs on every replica (admission must not wait for a leader). The same listener serves
//! sidecar reports ([`crate::report`]), so sidecars trust the certificate the API server already trusts.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, routing::post};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::ListParams,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
    },
};
use mcp_credentials_core::McpCredential;
use tracing::{info, warn};

use crate::inject::{self, InjectConfig};

/// Where the webhook listens and with which certificate.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The HTTPS address.
    pub listen: SocketAddr,
    /// PEM serving certificate (chain); re-read when it changes, so cert-manager's renewals apply.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA bundle of the certificate, given to injected sidecars (re-read at every injection).
    pub ca_file: PathBuf,
    /// Where injected sidecars send reports.
    pub report_url: String,
    /// The sidecar image to inject.
    pub sidecar_image: String,
}

struct App {
    client: Client,
    inject: InjectConfig,
    ca_file: PathBuf,
}

/// A bound webhook server, ready to serve.
pub struct Webhook {
    router: Router,
    tls: CertReloader,
    listener: tokio::net::TcpListener,
}

impl Webhook {
    /// Loads the certificate and binds the address: a bad certificate, key or address fails here,
    /// at start-up, with the flag named.
    pub async fn bind(
        config: WebhookConfig,
        client: Client,
        reports: Arc<crate::report::ReportApp>,
    ) -> anyhow::Result<Self> {
        let tls = CertReloader::new(&config)?;
        let native_sidecar = match client.apiserver_version().await {
            Ok(v) => supports_native_sidecars(&v.major, &v.minor),
            Err(e) => {
                warn!(error = %e, "cannot read the API server version; injecting native sidecars (Kubernetes 1.29+)");
                true
            }
        };
        let app = Arc::new(App {
            client,
            inject: InjectConfig {
                image: config.sidecar_image.clone(),
                native_sidecar,
                report_url: Some(config.report_url.clone()),
                report_ca: None,
            },
            ca_file: config.ca_file.clone(),
        });
        let router = Router::new()
            .route("/mutate", post(mutate))
            .route(crate::admission::PATH, post(validate))
            .with_state(app)
            .merge(crate::report::router(reports));
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("--webhook-listen {}: cannot listen there", config.listen))?;
        info!(listen = %config.listen, native_sidecar, "admission webhook serving");
        Ok(Self {
            router,
            tls,
            listener,
        })
    }

    /// Serves until the process ends, within [`LIMITS`]: anyone on the pod network reaches this
    /// port, and the API server cannot admit labelled pods while it is unavailable.
    pub async fn run(self) {
        let tls = std::sync::Mutex::new(self.tls);
        let handshake = |tcp: tokio::net::TcpStream| {
            let acceptor = tls.lock().expect("certificate lock").acceptor();
            async move { acceptor?.accept(tcp).await.ok() }
        };
        let service = hyper_util::service::TowerToHyperService::new(self.router);
        mcp_credentials_core::listen::serve(
            self.listener,
            LIMITS,
            handshake,
            service,
            std::future::pending(),
        )
        .await;
    }
}

/// What the webhook's listener accepts. The API server multiplexes its admission calls over a few
/// HTTP/2 connections and sidecars send a report now and then, so 512 connections leave a wide
/// margin while a flood of idle TLS connections (tens of KiB each) stays far below the operator's
/// memory limit. Both clients send at once what they send: 10 s for a handshake or a request head
/// is plenty, and the API server's own idle connections (90 s in Go) are closed after 60 s idle.
pub const LIMITS: mcp_credentials_core::listen::Limits = mcp_credentials_core::listen::Limits {
    max_connections: 512,
    header_read_timeout: Duration::from_secs(10),
    handshake_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
};

/// Native sidecars (init containers with `restartPolicy: Always`) are on by default from 1.29.
fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
    major != "1" || minor >= 29
}

/// The TLS configuration, rebuilt when the certificate file changes. Until the files exist (a
/// self-managed certificate is written by the leader and then mounted by the kubelet), connections
/// are closed and the API server retries.
struct CertReloader {
    cert_file: PathBuf,
    key_file: PathBuf,
    loaded_at: Option<SystemTime>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl CertReloader {
    fn new(config: &WebhookConfig) -> anyhow::Result<Self> {
        let loaded_at = modified(&config.cert_file);
        let acceptor = match loaded_at {
            Some(_) => Some(load_acceptor(&config.cert_file, &config.key_file)?),
            None => {
                warn!(cert = %config.cert_file.display(), "waiting for the webhook certificate");
                None
            }
        };
        Ok(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            loaded_at,
            acceptor,
        })
    }

    fn acceptor(&mut self) -> Option<tokio_rustls::TlsAcceptor> {
        let now = modified(&self.cert_file);
        if now.is_some() && now != self.loaded_at {
            match load_acceptor(&self.cert_file, &self.key_file) {
                Ok(acceptor) => {
                    info!(cert = %self.cert_file.display(), "webhook certificate loaded");
                    self.acceptor = Some(acceptor);
                    self.loaded_at = now;
                }
                // Mid-rotation the certificate and key may not match yet: keep the old pair.
                Err(e) => warn!(
                    error = format!("{e:#}"),
                    "keeping the previous webhook certificate"
                ),
            }
        }
        self.acceptor.clone()
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--webhook-cert-file {}: cannot read it", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "--webhook-cert-file {}: not a PEM certificate chain",
                cert.display()
            )
        })?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--webhook-key-file {}: not a PEM private key", key.display()))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the webhook certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The request inside a review, or the answer to a malformed review (both webhooks).
fn admission_request(
    review: AdmissionReview<DynamicObject>,
) -> Result<AdmissionRequest<DynamicObject>, Box<Json<AdmissionReview<DynamicObject>>>> {
    review
        .try_into()
        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| {
            warn!(error = %e, "malformed AdmissionReview");
            Box::new(Json(AdmissionResponse::invalid(e.to_string()).into_review()))
        })
}

/// The admission handler: allow, deny with a reason, or allow with a patch. A request that is not
/// a pod CREATE is allowed untouched, so a misconfigured webhook never blocks unrelated objects.
async fn mutate(
    State(app): State<Arc<App>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request = match admission_request(review) {
        Ok(r) => r,
        Err(invalid) => return *invalid,
    };
    let response = match decide(&app, &request).await {
        Ok(Some(patch)) => match AdmissionResponse::from(&request).with_patch(patch) {
            Ok(r) => r,
            Err(e) => AdmissionResponse::from(&request).deny(format!("building the patch failed: {e}")),
        },
        Ok(None) => AdmissionResponse::from(&request),
        Err(Decision::Deny(message)) => {
            info!(namespace = ?request.namespace, pod = %request.name, reason = %message, "pod denied");
            AdmissionResponse::from(&request).deny(message)
        }
    };
    Json(response.into_review())
}

/// The McpCredential handler: admit, or deny with the message of [`crate::admission::review`].
async fn validate(
    State(app): State<Arc<App>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request = match admission_request(review) {
        Ok(r) => r,
        Err(invalid) => return *invalid,
    };
    let response = match crate::admission::review(&app.client, &request).await {
        Ok(()) => AdmissionResponse::from(&request),
        Err(message) => {
            info!(
                namespace = ?request.namespace,
                credential = %request.name,
                user = ?request.user_info.username,
                reason = %message,
                "McpCredential denied"
            );
            AdmissionResponse::from(&request).deny(message)
        }
    };
    Json(response.into_review())
}

enum Decision {
    Deny(String),
}

async fn decide(
    app: &App,
    request: &AdmissionRequest<DynamicObject>,
) -> Result<Option<json_patch::Patch>, Decision> {
    let Some(object) = &request.object else {
        return Ok(None);
    };
    if request.kind.kind != "Pod" {
        return Ok(None);
    }
    let original =
        serde_json::to_value(object).map_err(|e| Decision::Deny(format!("unreadable pod: {e}")))?;
    let pod: Pod =
        serde_json::from_value(original).map_err(|e| Decision::Deny(format!("unreadable pod: {e}")))?;
    let namespace = request.namespace.clone().unwrap_or_else(|| "default".into());
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());

    let requested = inject::requested_credentials(&pod).map_err(|e| Decision::Deny(e.to_string()))?;
    let credentials: Api<McpCredential> = Api::namespaced(app.client.clone(), &namespace);
    let existing = credentials
        .list(&ListParams::default())
        .await
        .map_err(|e| Decision::Deny(format!("cannot list McpCredentials in {namespace:?}: {e}")))?
        .items;
    let wanted = inject::authorize(&requested, &namespace, &service_account, &existing)
        .map_err(|e| Decision::Deny(e.to_string()))?;
    // The CA rotates (self-managed or cert-manager): each new pod gets the bundle of the moment.
    let mut config = app.inject.clone();
    config.report_ca = std::fs::read_to_string(&app.ca_file).ok();
    if config.report_ca.is_none() {
        warn!(ca = %app.ca_file.display(), "no CA bundle for the report endpoint: the sidecar will use its system roots");
    }
    let Some(injected) = inject::inject(&pod, &wanted, &config).map_err(|e| Decision::Deny(e.to_string()))?
    else {
        return Ok(None);
    };
    // Diff the pod against itself through the same type, so the patch holds only what we changed.
    let before =
        serde_json::to_value(&pod).map_err(|e| Decision::Deny(format!("serializing the pod: {e}")))?;
    let after =
        serde_json::to_value(&injected).map_err(|e| Decision::Deny(format!("serializing the pod: {e}")))?;
    Ok(Some(json_patch::diff(&before, &after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_from_kubernetes_1_29() {
        assert!(!supports_native_sidecars("1", "28"));
        assert!(supports_native_sidecars("1", "29"));
        assert!(supports_native_sidecars("1", "37+"));
        assert!(!supports_native_sidecars("1", "garbage"));
    }
}

//! The mcp-credentials operator: keeps every McpCredential's Secret fresh.
//!
//! [`Config`] is the command line (every flag has an environment fallback); [`run`] serves
//! `/metrics`, `/healthz` and `/readyz`, waits for the leader Lease, then runs the controller until
//! shutdown.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use kube::{Api, Client, client::ClientBuilder};
use tracing::info;

/// Roles and RoleBindings so each service account reads only the Secrets it may use.
pub mod access;
/// The validating webhook: an McpCredential asks nothing its author may not do (SubjectAccessReview).
pub mod admission;
/// The webhook's self-managed CA and serving certificate, rotated before expiry.
pub mod certs;
/// Reconciling McpCredentials into Secrets.
pub mod controller;
/// Test fixtures.
#[cfg(test)]
mod fixtures;
/// What the injection webhook does to a pod, as pure functions.
pub mod inject;
/// The JWKS and OpenID discovery endpoints for minted JWTs.
pub mod jwks;
/// The signing keys of minted JWTs, in a Secret the leader rotates.
pub mod keys;
/// Lease-based leader election.
pub mod leader;
/// Prometheus metrics.
pub mod metrics;
/// Sidecar reports of rejected credentials: `POST /v1/report` on the webhook's listener.
pub mod report;
/// The mutating admission webhook that injects the sidecar.
pub mod webhook;

/// How the operator runs. Every flag can also be set through the environment variable shown.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "MCP_CREDENTIALS_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "MCP_CREDENTIALS_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Elect a leader through a Lease, so that several replicas can run. Disable only for a single process.
    #[arg(long, env = "MCP_CREDENTIALS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader Lease.
    #[arg(
        long,
        env = "MCP_CREDENTIALS_LEASE_NAME",
        default_value = "mcp-credentials-operator"
    )]
    pub lease_name: String,

    /// Namespace of the leader Lease (default: --namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Seconds a leader Lease stays valid without renewal (a standby takes over after this).
    #[arg(long, env = "MCP_CREDENTIALS_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub lease_duration: u64,

    /// This process's identity in the Lease and in events (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Seconds a token request may take before it counts as failed.
    #[arg(long, env = "MCP_CREDENTIALS_TOKEN_TIMEOUT", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub token_timeout: u64,

    /// Let URLs learned through OAuth discovery (metadata documents, `WWW-Authenticate`) point at
    /// loopback addresses, over plain http too. For tests and local development only: in a cluster
    /// an authorization server is never on the operator's own loopback. Link-local and cloud
    /// metadata addresses stay refused. Default: false.
    #[arg(long, env = "MCP_CREDENTIALS_DISCOVERY_ALLOW_LOOPBACK", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub discovery_allow_loopback: bool,

    /// How many credentials are reconciled at the same time.
    #[arg(long, env = "MCP_CREDENTIALS_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,

    /// Seconds one refresh (discovery and the token request) may take before it is given up as a
    /// transient failure (`RefreshTimedOut`, retried with backoff). Must be longer than
    /// --token-timeout: discovery gets what is left, so a token request is never cut short.
    /// Default: 60, well under any real token's lifetime.
    #[arg(long, env = "MCP_CREDENTIALS_REFRESH_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub refresh_timeout: u64,

    /// How many refreshes of one namespace run at the same time when every namespace is watched,
    /// so that one namespace's slow or unanswering servers cannot take every --concurrency slot;
    /// the others wait a few seconds without holding a slot. At most --concurrency. Default: a
    /// quarter of --concurrency (4 of 16), at least 1. Ignored with --namespace (one namespace).
    #[arg(long, env = "MCP_CREDENTIALS_NAMESPACE_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub namespace_concurrency: Option<u16>,

    /// Reconcile only McpCredentials whose labels match this label selector (`tier=critical`,
    /// `shard in (a,b)`), so that several operators can share a cluster on disjoint sets (and each
    /// set has its own Lease: give each operator its own --lease-name). Default: every McpCredential
    /// in scope.
    #[arg(long, env = "MCP_CREDENTIALS_SELECTOR")]
    pub selector: Option<String>,

    /// Serve the sidecar-injection admission webhook over HTTPS on this address (every replica
    /// serves it; the Helm chart points the MutatingWebhookConfiguration here). Default: off.
    #[arg(long, env = "MCP_CREDENTIALS_WEBHOOK_LISTEN", requires_all = ["webhook_cert_file", "webhook_key_file"])]
    pub webhook_listen: Option<SocketAddr>,

    /// PEM certificate chain of the webhook (re-read when the file changes).
    #[arg(long, env = "MCP_CREDENTIALS_WEBHOOK_CERT_FILE")]
    pub webhook_cert_file: Option<std::path::PathBuf>,

    /// PEM private key of the webhook.
    #[arg(long, env = "MCP_CREDENTIALS_WEBHOOK_KEY_FILE")]
    pub webhook_key_file: Option<std::path::PathBuf>,

    /// Self-managed webhook certificates: keep a CA and serving certificate in this Secret of the
    /// operator's namespace, renew them before expiry and patch the caBundle (the leader does this).
    /// Default: off (the certificate files come from elsewhere, such as cert-manager).
    #[arg(long, env = "MCP_CREDENTIALS_WEBHOOK_TLS_SECRET")]
    pub webhook_tls_secret: Option<String>,

    /// PEM CA bundle that signs the webhook certificate, given to injected sidecars so they trust the
    /// report endpoint (re-read at every injection). Default: `ca.crt` next to --webhook-cert-file
    /// (where both self-managed certificates and cert-manager put it).
    #[arg(long, env = "MCP_CREDENTIALS_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<std::path::PathBuf>,

    /// The URL injected sidecars send reports of rejected credentials to (`POST /v1/report`, served
    /// on the webhook's listener). Default: `https://<--webhook-service>.<operator namespace>.svc/v1/report`.
    #[arg(long, env = "MCP_CREDENTIALS_REPORT_URL")]
    pub report_url: Option<String>,

    /// Seconds between two refreshes of one credential forced by sidecar reports; reports in between
    /// are answered 429 and change nothing.
    #[arg(long, env = "MCP_CREDENTIALS_REPORT_MIN_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub report_min_interval: u64,

    /// The MutatingWebhookConfiguration (pods) and ValidatingWebhookConfiguration (McpCredentials,
    /// when there is one) of this name, whose caBundle self-managed certificates keep current.
    #[arg(
        long,
        env = "MCP_CREDENTIALS_WEBHOOK_CONFIGURATION",
        default_value = "mcp-credentials"
    )]
    pub webhook_configuration: String,

    /// The webhook's Service, whose DNS names self-managed certificates carry.
    #[arg(
        long,
        env = "MCP_CREDENTIALS_WEBHOOK_SERVICE",
        default_value = "mcp-credentials-webhook"
    )]
    pub webhook_service: String,

    /// Lifetime of a self-managed serving certificate, in seconds (renewed with a third left).
    #[arg(long, env = "MCP_CREDENTIALS_WEBHOOK_CERT_VALIDITY", default_value_t = 90 * 86400, value_parser = clap::value_parser!(u64).range(60..=10 * 365 * 86400))]
    pub webhook_cert_validity: u64,

    /// Mint `jwt` credentials, and serve the public keys that validate them
    /// (`/.well-known/jwks.json`, `/.well-known/openid-configuration`) over HTTP on this address
    /// (every replica serves them). Default: off (`jwt` credentials then fail with a clear error).
    #[arg(long, env = "MCP_CREDENTIALS_JWKS_LISTEN")]
    pub jwks_listen: Option<SocketAddr>,

    /// The `iss` of minted JWTs: the base URL validators reach the JWKS at. Default:
    /// `http://mcp-credentials-jwks.<operator namespace>.svc:<--jwks-listen port>`.
    #[arg(long, env = "MCP_CREDENTIALS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The Secret of the operator's namespace holding the JWT signing keys (the leader creates it).
    #[arg(
        long,
        env = "MCP_CREDENTIALS_JWT_KEYS_SECRET",
        default_value = "mcp-credentials-jwt-keys"
    )]
    pub jwt_keys_secret: String,

    /// Seconds a JWT signing key signs before its successor takes over (the old one stays in the
    /// JWKS 25 hours more, until every token it signed has expired). Default: 30 days.
    #[arg(long, env = "MCP_CREDENTIALS_JWT_KEY_ROTATION", default_value_t = 30 * 86400, value_parser = clap::value_parser!(u64).range(3600..=365 * 86400))]
    pub jwt_key_rotation: u64,

    /// A YAML (or JSON) file, written by a cluster administrator, that limits which audiences each
    /// namespace may mint `jwt` tokens for (`audiences: {<namespace or "*">: [<audience pattern>]}`)
    /// and lets a namespace mint a `sub` without its `mcpcred:<namespace>:` prefix
    /// (`unprefixedSubjects: {<namespace>: [<subject pattern>]}`, for migration). Read at start (a
    /// change needs a restart; the Helm chart rolls the pods). Default: none (any audience, every
    /// `sub` prefixed).
    #[arg(long, env = "MCP_CREDENTIALS_JWT_POLICY_FILE")]
    pub jwt_policy_file: Option<std::path::PathBuf>,

    /// The sidecar image the webhook injects.
    #[arg(
        long,
        env = "MCP_CREDENTIALS_SIDECAR_IMAGE",
        default_value = concat!("ghcr.io/mcp-credentials/sidecar:", env!("CARGO_PKG_VERSION"))
    )]
    pub sidecar_image: String,

    /// Log format: `text` or `json`.
    #[arg(long, env = "MCP_CREDENTIALS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// One `tracing` subscriber for the process; `RUST_LOG` filters (default `info`).
pub fn init_telemetry(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub use mcp_credentials_core::process::shutdown_signal;

/// Runs the operator until `shutdown` resolves (or leadership is lost, which is an error).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    mcp_credentials_core::process::install_crypto_provider();
    let metrics = metrics::Metrics::register().context("registering metrics")?;
    let client = kube_client(&metrics).await?;
    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen there", config.listen))?;
    info!(listen = %config.listen, identity = %identity, namespace = ?config.namespace, "starting");
    // With the webhook, a replica is ready only once its certificate is mounted: before that it
    // closes every connection, and the webhook Service must not send the API server's calls there.
    let webhook_cert = config.webhook_listen.and(config.webhook_cert_file.clone());
    tokio::spawn(serve(listener, metrics.clone(), ready.clone(), webhook_cert));
    let lease_ns = config
        .lease_namespace
        .clone()
        .or_else(|| config.namespace.clone())
        .unwrap_or_else(|| "default".into());
    if let (Some(listen), Some(cert_file), Some(key_file)) = (
        config.webhook_listen,
        config.webhook_cert_file.clone(),
        config.webhook_key_file.clone(),
    ) {
        let ca_file = config.webhook_ca_file.clone().unwrap_or_else(|| {
            cert_file
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("ca.crt")
        });
        let report_url = config.report_url.clone().unwrap_or_else(|| {
            format!(
                "https://{}.{lease_ns}.svc{}",
                config.webhook_service,
                report::PATH
            )
        });
        // Sidecars refuse anything else: the report carries their service-account token.
        anyhow::ensure!(
            report_url.starts_with("https://"),
            "--report-url {report_url}: must be an https:// URL (sidecars send their service-account token there)"
        );
        let webhook_config = webhook::WebhookConfig {
            listen,
            cert_file,
            key_file,
            ca_file,
            report_url,
            sidecar_image: config.sidecar_image.clone(),
        };
        let reports = report::ReportApp::new(
            client.clone(),
            metrics.clone(),
            &identity,
            Duration::from_secs(config.report_min_interval),
        );
        tokio::spawn(
            webhook::Webhook::bind(webhook_config, client.clone(), reports)
                .await?
                .run(),
        );
    }

    let leading = Arc::new(AtomicBool::new(false));
    let keys = match config.jwks_listen {
        Some(addr) => Some(start_jwks(&config, addr, &client, &lease_ns, &metrics, &leading).await?),
        None => None,
    };
    let policy = mcp_credentials_core::source::OutboundPolicy {
        allow_loopback: config.discovery_allow_loopback,
    };
    anyhow::ensure!(
        config.refresh_timeout > config.token_timeout,
        "--refresh-timeout {} must be longer than --token-timeout {}: a refresh is discovery plus one token request",
        config.refresh_timeout,
        config.token_timeout
    );
    let namespace_concurrency = namespace_concurrency(&config)?;
    if let Some(selector) = &config.selector {
        check_selector(&client, config.namespace.as_deref(), selector).await?;
    }
    let jwt_policy = jwt_policy(&config)?;
    // The HTTP clients and discovery cache of one term of leadership.
    let sources = || -> anyhow::Result<_> {
        let mut sources = mcp_credentials_core::source::SourceContext::new(
            Duration::from_secs(config.token_timeout),
            policy,
        )
        .context("building the HTTP clients")?
        .with_discovery_budget(Duration::from_secs(config.refresh_timeout - config.token_timeout));
        if let Some(policy) = &jwt_policy {
            sources = sources.with_jwt_policy(policy.clone());
        }
        Ok(sources)
    };
    sources()?; // a bad setting stops the operator at start, not at its first term
    let election = config.leader_election.then(|| {
        leader::LeaderElection::new(
            Api::namespaced(client.clone(), &lease_ns),
            &config.lease_name,
            &identity,
            Duration::from_secs(config.lease_duration),
        )
    });

    tokio::pin!(shutdown);
    // Each term of leadership runs a fresh controller; losing the Lease ends the term (the
    // process stays a standby), shutdown ends the process.
    loop {
        let since = match &election {
            Some(e) => {
                ready.store(true, Ordering::Relaxed); // a standby is healthy and ready to take over
                tokio::select! {
                    since = e.acquire() => since,
                    _ = &mut shutdown => return Ok(()),
                }
            }
            None => tokio::time::Instant::now(),
        };
        let mut ctx = controller::Context::new(client.clone(), sources()?, metrics.clone(), &identity)
            .with_limits(Duration::from_secs(config.refresh_timeout), namespace_concurrency);
        if election.as_ref().is_some_and(|e| e.took_over()) {
            // The previous leader did not hand over: it may still be writing back a rotated refresh
            // token it redeemed. Redeeming the one in the Secret before that lands spends a token
            // that is already spent (and IdPs that detect reuse revoke the whole grant).
            ctx = ctx.with_handover(std::time::SystemTime::now() + HANDOVER_GRACE);
        }
        if let Some(k) = &keys {
            ctx = ctx.with_keys(k.clone());
        }
        let ctx = Arc::new(ctx);
        metrics.leader.with_label_values(&[&identity]).set(1);
        leading.store(true, Ordering::Relaxed);
        let hold = async {
            match &election {
                Some(e) => e.hold(since).await,
                None => std::future::pending().await,
            }
        };
        let lead = async {
            if let Some(k) = &keys {
                // Create (or rotate) the keys before the first jwt credential needs one.
                let policy = mcp_credentials_core::keyring::Policy::every(Duration::from_secs(
                    config.jwt_key_rotation,
                ));
                if let Err(e) = k
                    .reload(
                        &Api::namespaced(client.clone(), &lease_ns),
                        &policy,
                        true,
                        &metrics,
                    )
                    .await
                {
                    tracing::warn!(error = %e, "creating the JWT signing keys failed; retrying in the background");
                }
            }
            ready.store(true, Ordering::Relaxed);
            futures::future::join3(
                controller::run(
                    ctx.clone(),
                    config.namespace.as_deref(),
                    config.concurrency,
                    config.selector.as_deref(),
                ),
                access::run(
                    client.clone(),
                    config.namespace.as_deref(),
                    config.selector.as_deref(),
                ),
                webhook_certificates(&config, &client, &lease_ns),
            )
            .await
        };
        let lost = tokio::select! {
            _ = lead => None,
            lost = hold => Some(lost),
            _ = &mut shutdown => {
                info!("shutting down");
                None
            }
        };
        // Leading has stopped: the controller and its requests are dropped. A standby may lead
        // only after the whole Lease; until then, write back the rotated refresh tokens that
        // were read but not yet written (they replace only what this process redeemed).
        metrics.leader.with_label_values(&[&identity]).set(0);
        leading.store(false, Ordering::Relaxed);
        drain(
            &ctx,
            if lost.is_some() {
                LOST_LEASE_DRAIN
            } else {
                DRAIN_GRACE
            },
        )
        .await;
        let Some(lost) = lost else {
            if let Some(e) = &election {
                e.release().await;
            }
            return Ok(());
        };
        let reason = match lost {
            leader::Lost::TakenOver => "taken_over",
            leader::Lost::RenewDeadline => "renew_deadline",
        };
        metrics.leadership_lost.with_label_values(&[reason]).inc();
        tracing::warn!(
            identity = %identity,
            lease = %format!("{lease_ns}/{}", config.lease_name),
            reason,
            "stopped leading: the controller is stopped; waiting as a standby"
        );
    }
}

/// How long shutting down may spend writing back rotated refresh tokens: well within Kubernetes'
/// default 30 s termination grace period.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How long a process that lost the Lease keeps writing back rotated refresh tokens before it
/// waits as a standby: no kubelet is waiting, and the write only replaces the token it redeemed.
const LOST_LEASE_DRAIN: Duration = Duration::from_secs(60);
/// How long a leader that took the Lease over (the previous one did not release it) leaves
/// refresh-token credentials whose access token is still valid alone: the time the previous
/// leader's write-back gets to land first. Equal to [`DRAIN_GRACE`].
const HANDOVER_GRACE: Duration = DRAIN_GRACE;

/// Writes back the rotated refresh tokens the stopped controller still kept, within `grace`.
async fn drain(ctx: &controller::Context, grace: Duration) {
    if controller::pending_refresh_tokens(ctx) == 0 {
        return;
    }
    match tokio::time::timeout(grace, controller::flush_pending_refresh_tokens(ctx)).await {
        Ok(_) => info!("every rotated refresh token is written back"),
        Err(_) => tracing::error!(
            not_written = controller::pending_refresh_tokens(ctx),
            grace_seconds = grace.as_secs(),
            "stopping with rotated refresh tokens not written back (the API server did not accept them in time); \
             the credentials concerned may need a new sign-in"
        ),
    }
}

/// What the operator's McpCredential watches list: every credential in scope, or those matching
/// `--selector`.
pub(crate) fn credential_watch(selector: Option<&str>) -> kube::runtime::watcher::Config {
    let watch = kube::runtime::watcher::Config::default();
    match selector {
        Some(s) => watch.labels(s),
        None => watch,
    }
}

/// Fails at start on a selector the API server does not accept (a watch would only log the
/// refusal over and over).
async fn check_selector(
    client: &kube::Client,
    namespace: Option<&str>,
    selector: &str,
) -> anyhow::Result<()> {
    let api: Api<mcp_credentials_core::McpCredential> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api
        .list_metadata(&kube::api::ListParams::default().labels(selector).limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 400 => anyhow::bail!(
            "--selector {selector:?} is not a label selector the API server accepts ({}); write it as \
             `key=value`, `key!=value`, `key in (a,b)` or `key`, comma-separated",
            e.message
        ),
        Err(e) => Err(anyhow::Error::new(e).context("listing McpCredentials with --selector")),
    }
}

/// The per-namespace refresh limit: `None` with --namespace (a single namespace has no one to be
/// fair to), else --namespace-concurrency or a quarter of --concurrency.
fn namespace_concurrency(config: &Config) -> anyhow::Result<Option<usize>> {
    if config.namespace.is_some() {
        return Ok(None);
    }
    let n = config
        .namespace_concurrency
        .unwrap_or((config.concurrency / 4).max(1));
    anyhow::ensure!(
        n <= config.concurrency,
        "--namespace-concurrency {n} is more than --concurrency {}: lower it (or raise --concurrency), so that \
         one namespace cannot take every slot",
        config.concurrency
    );
    Ok(Some(usize::from(n)))
}

/// Serves the JWKS on `addr` and keeps the signing keys current (rotated while `leading`).
async fn start_jwks(
    config: &Config,
    addr: SocketAddr,
    client: &Client,
    namespace: &str,
    metrics: &metrics::Metrics,
    leading: &Arc<AtomicBool>,
) -> anyhow::Result<Arc<keys::Keys>> {
    let issuer = config
        .jwt_issuer
        .clone()
        .unwrap_or_else(|| format!("http://mcp-credentials-jwks.{namespace}.svc:{}", addr.port()));
    let url = reqwest::Url::parse(&issuer)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.query().is_none());
    anyhow::ensure!(
        url.is_some(),
        "--jwt-issuer {issuer:?} is not an http(s) URL without a query: set it to the base URL validators reach \
         the JWKS at, such as https://mcp-credentials-jwks.example.com"
    );
    let keys = Arc::new(keys::Keys::new(&issuer, &config.jwt_keys_secret, namespace));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--jwks-listen {addr}: cannot listen there"))?;
    info!(jwks_listen = %addr, issuer = %issuer, "serving the JWKS");
    tokio::spawn(jwks::serve(listener, keys.clone()));
    tokio::spawn(keys::run(
        keys.clone(),
        Api::namespaced(client.clone(), namespace),
        mcp_credentials_core::keyring::Policy::every(Duration::from_secs(config.jwt_key_rotation)),
        leading.clone(),
        metrics.clone(),
    ));
    Ok(keys)
}

/// The administrator's `--jwt-policy-file`, checked: a bad file stops the operator with a message
/// naming the setting and the key to fix (minting with a policy half-read would fail open or closed
/// by accident).
fn jwt_policy(config: &Config) -> anyhow::Result<Option<mcp_credentials_core::source::jwt::MintPolicy>> {
    let Some(path) = &config.jwt_policy_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--jwt-policy-file {}: cannot read it", path.display()))?;
    let policy = mcp_credentials_core::source::jwt::MintPolicy::parse(&text)
        .map_err(|e| anyhow::anyhow!("--jwt-policy-file {}: {e}", path.display()))?;
    info!(
        jwt_policy_file = %path.display(),
        audience_namespaces = policy.audiences.as_ref().map(|a| a.len()),
        unprefixed_subject_namespaces = policy.unprefixed_subjects.len(),
        "minted JWTs follow the JWT policy"
    );
    Ok(Some(policy))
}

/// Keeps self-managed webhook certificates current (leader only), or waits forever when off.
async fn webhook_certificates(config: &Config, client: &Client, namespace: &str) {
    let Some(secret) = config.webhook_tls_secret.clone() else {
        return std::future::pending().await;
    };
    let managed = certs::SelfManaged {
        secret,
        namespace: namespace.to_owned(),
        webhook_configuration: config.webhook_configuration.clone(),
        service: config.webhook_service.clone(),
        ca_validity: Duration::from_secs(365 * 86400)
            .max(Duration::from_secs(config.webhook_cert_validity * 4)),
        cert_validity: Duration::from_secs(config.webhook_cert_validity),
    };
    certs::run(client.clone(), managed, Duration::from_secs(3600)).await;
}

/// A kube client whose every request is counted in `mcp_credentials_kube_api_requests_total`.
async fn kube_client(metrics: &metrics::Metrics) -> anyhow::Result<Client> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration found (in-cluster service account or KUBECONFIG)")?;
    let counter = metrics.api_requests.clone();
    let count = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        counter
            .with_label_values(&[req.method().as_str(), metrics::api_resource(req.uri().path())])
            .inc();
        req
    });
    Ok(ClientBuilder::try_from(config)
        .context("building the Kubernetes client")?
        .with_layer(&count)
        .build())
}

async fn serve(
    listener: tokio::net::TcpListener,
    metrics: metrics::Metrics,
    ready: Arc<AtomicBool>,
    webhook_cert: Option<std::path::PathBuf>,
) {
    use axum::{Router, http::StatusCode, routing::get};
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                let answer = if !ready.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                } else if webhook_cert.as_ref().is_some_and(|f| !f.exists()) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the webhook certificate",
                    )
                } else {
                    (StatusCode::OK, "ok")
                };
                std::future::ready(answer)
            }),
        );
    serve_plain(listener, METRICS_LIMITS, app).await;
}

/// What the metrics listener accepts: Prometheus and the kubelet's probes use a handful of
/// connections and send each request at once.
const METRICS_LIMITS: mcp_credentials_core::listen::Limits = mcp_credentials_core::listen::Limits {
    max_connections: 64,
    header_read_timeout: Duration::from_secs(10),
    handshake_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
};

/// Serves `app` over plain HTTP on `listener` within `limits` until the process ends.
pub(crate) async fn serve_plain(
    listener: tokio::net::TcpListener,
    limits: mcp_credentials_core::listen::Limits,
    app: axum::Router,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let plain = |tcp| std::future::ready(Some(tcp));
    mcp_credentials_core::listen::serve(listener, limits, plain, service, std::future::pending()).await;
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "operator".into())
}

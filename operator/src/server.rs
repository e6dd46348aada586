//! The operator as a process: one `tracing` subscriber, the metrics and health listener, the leader
//! Lease, the controller (and the webhook, reports and JWKS listeners it needs), and the drain of
//! pending refresh tokens on shutdown or a lost Lease.

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

use crate::{Config, access, certs, controller, jwks, keys, leader, metrics, report, webhook};

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

/// Writes back the rotated refresh tokens the stopped controller still kept, within `grace`: first
/// the answers of the token requests still running (they outlive the controller), then the tokens.
async fn drain(ctx: &controller::Context, grace: Duration) {
    let running = controller::token_requests_running(ctx);
    if running == 0 && controller::pending_refresh_tokens(ctx) == 0 {
        return;
    }
    if running > 0 {
        info!(
            running,
            "waiting for the answers of token requests still running before stopping"
        );
    }
    let work = async {
        controller::token_requests_finished(ctx).await;
        controller::flush_pending_refresh_tokens(ctx).await
    };
    match tokio::time::timeout(grace, work).await {
        Ok(_) => info!("every rotated refresh token is written back"),
        Err(_) => tracing::error!(
            not_written = controller::pending_refresh_tokens(ctx),
            still_running = controller::token_requests_running(ctx),
            grace_seconds = grace.as_secs(),
            "stopping with rotated refresh tokens not written back (the API server did not accept them in time, \
             or a token request did not end); the credentials concerned may need a new sign-in"
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

//! How the operator runs: the command line, every flag with an environment fallback.

use std::net::SocketAddr;

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

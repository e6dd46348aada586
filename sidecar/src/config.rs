//! Configuration: environment variables with their defaults side by side, each default justified.
//! The injector sets these in the pod; standalone mode takes its file arguments from the command line.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use mcp_credentials_core::sidecar_env;

use crate::{proxy::ClientSettings, report::ReportSettings};

/// Where the proxy listens. Loopback only: the agent in the same pod (or on the same laptop) is the
/// only client, and nothing else on the network may use the credentials.
pub const LISTEN: (&str, &str) = (sidecar_env::LISTEN, "127.0.0.1:7007");
/// Where `/metrics`, `/healthz` and `/readyz` listen. Loopback: what the sidecar serves and how it
/// is doing is nobody else's business. A pod that wants Prometheus to scrape it opts in (the
/// injector sets `0.0.0.0:7008` for pods annotated `mcpcredentials.dev/expose-sidecar-metrics`).
pub const ADMIN_LISTEN: (&str, &str) = (sidecar_env::ADMIN_LISTEN, "127.0.0.1:7008");
/// Where only `/healthz` and `/readyz` listen, answering with a status and no names: the kubelet's
/// probes reach the pod IP, never its loopback, so the injector sets `0.0.0.0:7009`. Empty: none.
pub const PROBE_LISTEN: (&str, &str) = (sidecar_env::PROBE_LISTEN, "");
/// Comma-separated credentials this pod needs, each `name` or `name=secret-name` (when the
/// McpCredential sets `spec.secretName`); `/readyz` waits for all of them. Empty: every credential
/// found is served (the Kubernetes store then watches every managed Secret of the namespace), and
/// readiness waits for at least one.
pub const CREDENTIALS: (&str, &str) = (sidecar_env::CREDENTIALS, "");
/// A directory with one subdirectory per credential holding files named like the Secret's data keys
/// (a projected Secret volume). When set, it replaces the Kubernetes watch.
pub const CREDENTIALS_DIR: (&str, &str) = ("MCP_SIDECAR_CREDENTIALS_DIR", "");
/// The namespace of the credential Secrets. Empty: the pod's own namespace.
pub const NAMESPACE: (&str, &str) = ("MCP_SIDECAR_NAMESPACE", "");
/// A PEM file of extra CA certificates trusted for upstreams, besides the system roots. Empty: none.
pub const EXTRA_CA_FILE: (&str, &str) = ("MCP_SIDECAR_EXTRA_CA_FILE", "");
/// Give up connecting to an upstream after this long: long enough for a slow TLS handshake across
/// a continent, short enough that an agent learns quickly that an upstream is down.
pub const CONNECT_TIMEOUT: (&str, &str) = ("MCP_SIDECAR_CONNECT_TIMEOUT", "10s");
/// Close pooled upstream connections idle this long, and replace an agent connection's own one that
/// sat idle this long: below the 60 s idle timeout of common cloud load balancers, so the sidecar
/// closes first and never writes into a connection being torn down.
pub const POOL_IDLE_TIMEOUT: (&str, &str) = ("MCP_SIDECAR_POOL_IDLE_TIMEOUT", "55s");
/// The largest request header section accepted (431 above it). Twice nginx's 4 × 8 KiB default
/// buffers: room for large cookies and JWTs, while a runaway agent cannot make the sidecar hold much.
pub const MAX_HEADER_BYTES: (&str, &str) = ("MCP_SIDECAR_MAX_HEADER_BYTES", "65536");
/// Close an agent connection that has not sent a complete request head this long after it opened
/// or after its previous answer (slow-loris protection). Like nginx's `client_header_timeout`: an
/// agent on loopback sends a head at once, so only a stuck or hostile client ever waits this long.
/// It also closes keep-alive connections idle this long, as nginx's `keepalive_timeout` does.
pub const HEADER_READ_TIMEOUT: (&str, &str) = ("MCP_SIDECAR_HEADER_READ_TIMEOUT", "60s");
/// Connections the admin listener and the probe listener each serve at once. They face the pod
/// network when exposed (the probes always are): a flood of idle connections must not run a 64 MiB
/// sidecar out of memory. Prometheus and the kubelet use one or two connections each; at the cap, a
/// new connection closes the oldest idle one, so a probe still gets through during a flood.
pub const ADMIN_MAX_CONNECTIONS: (&str, &str) = ("MCP_SIDECAR_ADMIN_MAX_CONNECTIONS", "64");
/// How long the admin and probe listeners wait for a request head, and keep an idle connection:
/// the kubelet and Prometheus send a request at once, and 10 s is the kubelet's probe timeout
/// ceiling many clusters use.
pub const ADMIN_HEADER_READ_TIMEOUT: (&str, &str) = ("MCP_SIDECAR_ADMIN_HEADER_READ_TIMEOUT", "10s");
/// The largest single SSE event the sidecar holds while it re-frames a stream (GET event streams,
/// where legacy `endpoint` events are rewritten). MCP messages are JSON-RPC objects of a few KiB; a
/// tool result of hundreds of KiB still fits in 1 MiB, and a handful of streams at this size fit in a
/// 64 MiB sidecar. An upstream that sends a larger event gets its stream ended: the agent receives an
/// SSE comment saying so and a clean end of stream, never a cut event.
pub const MAX_SSE_EVENT_BYTES: (&str, &str) = ("MCP_SIDECAR_MAX_SSE_EVENT_BYTES", "1048576");
/// Threads serving agent connections, each a single-threaded event loop that keeps the connections
/// dealt to it (like nginx's `worker_processes`). One agent is the only client, and one core proxies
/// tens of thousands of requests a second; a sidecar's CPU limit is usually one core or less.
pub const WORKER_THREADS: (&str, &str) = ("MCP_SIDECAR_WORKER_THREADS", "1");
/// How often the credentials directory is re-read. The kubelet updates projected volumes within
/// about a minute; reading a few small files four times a second costs nothing and adds no delay
/// that matters next to it.
pub const FILE_POLL_INTERVAL: (&str, &str) = ("MCP_SIDECAR_FILE_POLL_INTERVAL", "250ms");
/// The operator's report endpoint: where an upstream's rejection of a credential is reported so the
/// operator refreshes it now (Kubernetes mode only). Empty: no reports; a rejected request still
/// waits for a newer credential. The injector sets it to the operator's Service.
pub const REPORT_URL: (&str, &str) = (sidecar_env::REPORT_URL, "");
/// PEM CA bundle (the certificates themselves, not a path) trusted for the report endpoint. The
/// injector copies the operator's CA here, because the operator's certificate Secret is in another
/// namespace. Empty: the system roots.
pub const REPORT_CA: (&str, &str) = (sidecar_env::REPORT_CA, "");
/// The service-account token reports authenticate with, re-read for each report (the kubelet
/// rotates it). The default is where the injected token volume (and every pod's) puts it.
pub const REPORT_TOKEN_FILE: (&str, &str) = (
    "MCP_SIDECAR_REPORT_TOKEN_FILE",
    "/var/run/secrets/kubernetes.io/serviceaccount/token",
);
/// How long a request the upstream rejected waits for a newer credential before the upstream's
/// answer goes back: a token request to a nearby authorization server and a watch event fit in it,
/// and an agent is not left hanging much longer than the upstream itself took.
pub const REPLAY_WAIT: (&str, &str) = ("MCP_SIDECAR_REPLAY_WAIT", "2s");
/// Standalone mode: let URLs learned through OAuth discovery (metadata documents,
/// `WWW-Authenticate`) point at loopback addresses, over plain http too, for an authorization
/// server running on the same laptop. Off by default: a metadata document must not be able to aim
/// token requests at local services. Link-local and cloud metadata addresses stay refused.
pub const DISCOVERY_ALLOW_LOOPBACK: (&str, &str) = ("MCP_SIDECAR_DISCOVERY_ALLOW_LOOPBACK", "false");
/// Serve ordinary HTTP/1.1 requests to plain-http upstreams, and to HTTPS upstreams that speak
/// HTTP/1.1, on the fast path (httparse and byte
/// forwarding, see `proxy::h1`) instead of hyper's message types. On by default: it costs less than
/// half the CPU per request. `false` is the way back if an upstream or client ever disagrees with it.
pub const HTTP1_FAST_PATH: (&str, &str) = ("MCP_SIDECAR_HTTP1_FAST_PATH", "true");
/// How long open requests and streams may finish after SIGTERM: under Kubernetes' default 30 s
/// termination grace period, so the sidecar exits on its own before it is killed.
pub const SHUTDOWN_GRACE: (&str, &str) = ("MCP_SIDECAR_SHUTDOWN_GRACE", "25s");

/// Where credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// Watch the credential Secrets through the Kubernetes API.
    Kubernetes {
        /// Their namespace; `None` for the pod's own.
        namespace: Option<String>,
    },
    /// Read a directory of files (a projected Secret volume).
    Files {
        /// The directory.
        dir: PathBuf,
    },
    /// Run core's credential sources in-process from McpCredential YAML and local secret files.
    Standalone {
        /// The McpCredential documents.
        credentials_file: PathBuf,
        /// `<dir>/<secret-name>/<key>` holds what a `secretKeyRef` names.
        secrets_dir: PathBuf,
        /// Loopback allowed for URLs learned through discovery.
        discovery_allow_loopback: bool,
    },
}

/// A credential this pod needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The McpCredential's name: the first path segment agents use.
    pub name: String,
    /// The Secret holding it.
    pub secret_name: String,
}

impl Wanted {
    /// Parses `name` or `name=secret-name`.
    pub fn parse(entry: &str) -> Wanted {
        match entry.split_once('=') {
            Some((name, secret)) => Wanted {
                name: name.trim().into(),
                secret_name: secret.trim().into(),
            },
            None => Wanted {
                name: entry.into(),
                secret_name: mcp_credentials_core::secret::secret_name(entry, None),
            },
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The proxy's address.
    pub listen: SocketAddr,
    /// The admin address.
    pub admin_listen: SocketAddr,
    /// The probe-only address, if any.
    pub probe_listen: Option<SocketAddr>,
    /// Credentials required for readiness.
    pub credentials: Vec<Wanted>,
    /// The credential store.
    pub store: StoreConfig,
    /// The upstream client.
    pub client: ClientSettings,
    /// Request header limit in bytes.
    pub max_header_bytes: usize,
    /// How long an agent connection may take to send a request head.
    pub header_read_timeout: Duration,
    /// Whether HTTP/1.1 requests to plain-http upstreams take the fast path.
    pub http1_fast_path: bool,
    /// Connections served at once by the admin listener, and by the probe listener.
    pub admin_max_connections: usize,
    /// How long the admin and probe listeners wait for a request head or keep an idle connection.
    pub admin_header_read_timeout: Duration,
    /// The largest SSE event held while re-framing a stream.
    pub max_sse_event_bytes: usize,
    /// Threads serving agent connections.
    pub worker_threads: usize,
    /// Directory re-read interval.
    pub file_poll_interval: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Reports of rejected credentials to the operator; `None`: off.
    pub report: Option<ReportSettings>,
    /// How long a rejected request waits for a newer credential.
    pub replay_wait: Duration,
}

/// A setting that cannot be used, named with the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An environment variable has a value that does not parse.
    #[error("{name}={value:?} is not valid: expected {expected}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// The command line is wrong.
    #[error("usage: mcp-credentials-sidecar [standalone <mcpcredentials.yaml> [<secrets-dir>]]")]
    Usage,
}

impl Config {
    /// Reads the configuration from `args` (without the program name) and the environment.
    pub fn load(args: &[String]) -> Result<Config, ConfigError> {
        Self::load_from(args, |name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], with the environment given as a function (for tests).
    pub fn load_from(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |(name, default): (&'static str, &'static str)| -> (&'static str, String) {
            (name, env(name).unwrap_or_else(|| default.to_owned()))
        };
        let standalone = match args {
            [] => None,
            [cmd, file] if cmd == "standalone" => {
                let file = PathBuf::from(file);
                let dir = file.parent().map(PathBuf::from).unwrap_or_default();
                Some((file, dir))
            }
            [cmd, file, dir] if cmd == "standalone" => Some((file.into(), dir.into())),
            _ => return Err(ConfigError::Usage),
        };
        let dir = get(CREDENTIALS_DIR).1;
        let namespace = get(NAMESPACE).1;
        let store = match standalone {
            Some((credentials_file, secrets_dir)) => StoreConfig::Standalone {
                credentials_file,
                secrets_dir,
                discovery_allow_loopback: parse(get(DISCOVERY_ALLOW_LOOPBACK), "true or false")?,
            },
            None if !dir.is_empty() => StoreConfig::Files { dir: dir.into() },
            None => StoreConfig::Kubernetes {
                namespace: (!namespace.is_empty()).then_some(namespace),
            },
        };
        let extra_ca = get(EXTRA_CA_FILE).1;
        let report_url = get(REPORT_URL);
        let report = if report_url.1.trim().is_empty() {
            None
        } else {
            // The report carries the pod's token: never in clear text.
            if !report_url.1.trim().starts_with("https://") {
                return Err(invalid(
                    REPORT_URL.0,
                    &report_url.1,
                    "an https:// URL (the report carries the service-account token)",
                ));
            }
            let ca = get(REPORT_CA).1;
            Some(ReportSettings {
                url: report_url.1.trim().to_owned(),
                ca_pem: (!ca.trim().is_empty()).then_some(ca),
                token_file: get(REPORT_TOKEN_FILE).1.into(),
            })
        };
        Ok(Config {
            listen: parse(get(LISTEN), "an address like 127.0.0.1:7007")?,
            admin_listen: parse(get(ADMIN_LISTEN), "an address like 127.0.0.1:7008")?,
            probe_listen: match get(PROBE_LISTEN) {
                (_, v) if v.trim().is_empty() => None,
                pair => Some(parse(pair, "an address like 0.0.0.0:7009")?),
            },
            credentials: get(CREDENTIALS)
                .1
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Wanted::parse)
                .collect(),
            store,
            client: ClientSettings {
                connect_timeout: duration(get(CONNECT_TIMEOUT))?,
                pool_idle_timeout: duration(get(POOL_IDLE_TIMEOUT))?,
                extra_ca_file: (!extra_ca.is_empty()).then(|| extra_ca.into()),
            },
            max_header_bytes: parse(get(MAX_HEADER_BYTES), "a number of bytes like 65536")?,
            header_read_timeout: nonzero(HEADER_READ_TIMEOUT, duration(get(HEADER_READ_TIMEOUT))?)?,
            http1_fast_path: parse(get(HTTP1_FAST_PATH), "true or false")?,
            admin_max_connections: at_least_one(
                ADMIN_MAX_CONNECTIONS.0,
                parse(get(ADMIN_MAX_CONNECTIONS), "a number of connections like 64")?,
            )?,
            admin_header_read_timeout: nonzero(
                ADMIN_HEADER_READ_TIMEOUT,
                duration(get(ADMIN_HEADER_READ_TIMEOUT))?,
            )?,
            max_sse_event_bytes: at_least_one(
                MAX_SSE_EVENT_BYTES.0,
                parse(get(MAX_SSE_EVENT_BYTES), "a number of bytes like 1048576")?,
            )?,
            worker_threads: parse(get(WORKER_THREADS), "a number of threads like 1").and_then(
                |n: usize| {
                    if n == 0 {
                        Err(invalid(WORKER_THREADS.0, "0", "at least 1"))
                    } else {
                        Ok(n)
                    }
                },
            )?,
            file_poll_interval: duration(get(FILE_POLL_INTERVAL))?,
            shutdown_grace: duration(get(SHUTDOWN_GRACE))?,
            report,
            replay_wait: duration(get(REPLAY_WAIT))?,
        })
    }
}

fn invalid(name: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: value.to_owned(),
        expected,
    }
}

fn parse<T: FromStr>(
    (name, value): (&'static str, String),
    expected: &'static str,
) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| invalid(name, &value, expected))
}

/// A zero count would refuse everything: refused.
fn at_least_one(name: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(name, "0", "at least 1"));
    }
    Ok(n)
}

/// A zero timeout would close every connection at once: refused.
fn nonzero(name: (&'static str, &'static str), d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(name.0, "0", "a duration above zero like 60s"));
    }
    Ok(d)
}

fn duration((name, value): (&'static str, String)) -> Result<Duration, ConfigError> {
    value
        .trim()
        .parse::<jiff::SignedDuration>()
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
        .ok_or_else(|| invalid(name, &value, "a duration like 250ms, 10s or 1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ports_are_the_ones_the_injector_uses() {
        let port = |(_, default): (&str, &str)| default.parse::<SocketAddr>().unwrap().port();
        assert_eq!(port(LISTEN), sidecar_env::PROXY_PORT);
        assert_eq!(port(ADMIN_LISTEN), sidecar_env::ADMIN_PORT);
    }

    #[test]
    fn defaults_listen_on_loopback_and_watch_kubernetes() {
        let c = Config::load_from(&[], |_| None).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7007".parse().unwrap());
        assert_eq!(c.store, StoreConfig::Kubernetes { namespace: None });
        assert_eq!(c.client.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.file_poll_interval, Duration::from_millis(250));
        assert_eq!(c.header_read_timeout, Duration::from_secs(60));
        assert!(c.http1_fast_path);
        assert_eq!(c.admin_max_connections, 64);
        assert_eq!(c.admin_header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.max_sse_event_bytes, 1 << 20);
        let e = Config::load_from(&[], |n| {
            (n == "MCP_SIDECAR_MAX_SSE_EVENT_BYTES").then(|| "0".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MCP_SIDECAR_MAX_SSE_EVENT_BYTES") && e.contains("at least 1"),
            "{e}"
        );
    }

    #[test]
    fn standalone_mode_reads_secrets_next_to_the_file_and_keeps_admin_on_loopback() {
        let args = ["standalone".to_owned(), "ex/creds.yaml".to_owned()];
        let c = Config::load_from(&args, |_| None).unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Standalone {
                credentials_file: "ex/creds.yaml".into(),
                secrets_dir: "ex".into(),
                discovery_allow_loopback: false,
            }
        );
        assert!(c.admin_listen.ip().is_loopback());
    }

    #[test]
    fn reports_are_off_by_default_and_need_https() {
        let c = Config::load_from(&[], |_| None).unwrap();
        assert_eq!(c.report, None);
        assert_eq!(c.replay_wait, Duration::from_secs(2));
        let e = Config::load_from(&[], |n| {
            (n == "MCP_SIDECAR_REPORT_URL").then(|| "http://operator/v1/report".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MCP_SIDECAR_REPORT_URL") && e.contains("https://"),
            "{e}"
        );
        let c = Config::load_from(&[], |n| match n {
            "MCP_SIDECAR_REPORT_URL" => Some("https://op.mcp.svc/v1/report".into()),
            "MCP_SIDECAR_REPORT_CA" => Some("-----BEGIN CERTIFICATE-----".into()),
            _ => None,
        })
        .unwrap();
        let report = c.report.unwrap();
        assert_eq!(report.url, "https://op.mcp.svc/v1/report");
        assert!(report.ca_pem.is_some());
        assert_eq!(
            report.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
    }

    #[test]
    fn a_bad_setting_is_named_with_what_it_should_be() {
        let e = Config::load_from(&[], |n| {
            (n == "MCP_SIDECAR_CONNECT_TIMEOUT").then(|| "soon".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MCP_SIDECAR_CONNECT_TIMEOUT=\"soon\"") && e.contains("10s"),
            "{e}"
        );
    }
}

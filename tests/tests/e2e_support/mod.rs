//! Shared by the full end-to-end scenario and the chaos soak: MCP servers from the official Rust SDK
//! (rmcp) that accept only a JWT signed by the OAuth server for their own audience, MCP clients that
//! call a tool through the sidecar, the sidecar (in a cluster or standalone) and Prometheus as
//! processes, and a scan of every log for token bytes. Every process logs into one folder per run,
//! so the scan sees all of them.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine;
use rmcp::{
    ClientHandler, RoleClient, ServerHandler, ServiceExt,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolRequestParams, ClientConfig, ProtocolVersion, ServerCapabilities, ServerConfig},
    schemars,
    service::RunningService,
    tool, tool_handler, tool_router,
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
        streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        },
    },
};

use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, OAuth2},
    repo_root,
};

use crate::operator_support::{free_port, token_kubeconfig, workspace_binary};

/// The client secret of the client-credentials client these tests use.
pub const CLIENT_SECRET: &str = "cc-basic-secret";
/// The client secret of the refresh-token client.
pub const RT_CLIENT_SECRET: &str = "rt-client-secret";

/// A folder for one run's logs and state: `<tmp>/mcp-e2e-<name>-<pid>`, emptied first.
pub fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcp-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

/// Opens `<dir>/logs/<name>.log` for appending (restarts keep the earlier lines).
pub fn log_file(dir: &Path, name: &str) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))
        .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ---- The OAuth server ------------------------------------------------------------------------------

/// tests/oauth-server as a process that can be stopped and started again on the same port with the
/// same signing key (as a real IdP keeps its keys across restarts). Its log goes to the run folder;
/// every token it issues is appended to `<dir>/issued-tokens` (not a log: the scan's list of needles).
pub struct OAuth {
    child: Option<Child>,
    /// Its port (fixed, so the issuer stays the same across restarts).
    pub port: u16,
    ttl: u64,
    dir: PathBuf,
    /// Sign-in mode: login and consent pages, dynamic registration (tests/oauth-server/server.mjs).
    sign_in: bool,
    /// The address it listens on: 127.0.0.1, or one that pods reach.
    host: String,
    /// HTTPS with this certificate and key (PEM files), for clients that refuse plain http.
    tls: Option<(PathBuf, PathBuf)>,
}

impl OAuth {
    /// Starts the server in sign-in mode (its own login and consent pages, dynamic registration).
    pub fn start_sign_in(dir: &Path, ttl: u64) -> Self {
        Self::start_mode(dir, ttl, "127.0.0.1", None, true)
    }

    /// Starts the server issuing access tokens valid `ttl` seconds.
    pub fn start(dir: &Path, ttl: u64) -> Self {
        Self::start_on(dir, ttl, "127.0.0.1", None)
    }

    /// Starts the server on `host` (port chosen there), over HTTPS with `tls` (certificate, key).
    pub fn start_on(dir: &Path, ttl: u64, host: &str, tls: Option<(PathBuf, PathBuf)>) -> Self {
        Self::start_mode(dir, ttl, host, tls, false)
    }

    fn start_mode(dir: &Path, ttl: u64, host: &str, tls: Option<(PathBuf, PathBuf)>, sign_in: bool) -> Self {
        static INSTALL: OnceLock<()> = OnceLock::new();
        INSTALL.get_or_init(|| {
            let ok = Command::new(repo_root().join("tests/oauth-server/install"))
                .stdout(Stdio::null())
                .status()
                .expect("run tests/oauth-server/install");
            assert!(ok.success(), "tests/oauth-server/install failed");
        });
        let port = std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port on {host}: {e}"));
        let mut s = Self {
            child: None,
            port,
            ttl,
            dir: dir.to_owned(),
            sign_in,
            host: host.to_owned(),
            tls,
        };
        s.resume();
        s
    }

    /// Starts the process again (after [`OAuth::stop`]).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the OAuth server is running");
        let mut command = Command::new("node");
        if let Some((cert, key)) = &self.tls {
            command.env("OAUTH_TLS_CERT", cert).env("OAUTH_TLS_KEY", key);
        }
        let mut child = command
            .arg(repo_root().join("tests/oauth-server/server.mjs"))
            .args([self.port.to_string(), self.ttl.to_string()])
            .env("OAUTH_HOST", &self.host)
            .env("OAUTH_SIGNING_KEY_FILE", self.dir.join("oauth-signing-key.pem"))
            .env("OAUTH_ISSUED_FILE", self.issued_file())
            .env("OAUTH_SIGN_IN", if self.sign_in { "1" } else { "0" })
            .stdout(Stdio::piped())
            .stderr(log_file(&self.dir, "oauth-server"))
            .spawn()
            .expect("start node tests/oauth-server/server.mjs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains(r#""ready":true"#), "the OAuth server said {line:?}");
        // The rest of stdout is log; keep reading it, or the server dies on its next write.
        let mut log = log_file(&self.dir, "oauth-server");
        std::thread::spawn(move || std::io::copy(&mut out, &mut log));
        self.child = Some(child);
    }

    /// Stops the process: SIGTERM, and SIGKILL if it has not exited 5 s later.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..50 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The issuer (and base URL).
    pub fn issuer(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer())
    }

    /// A refresh token for `rt-client` bound to `resource`, as a user's login would give (recorded
    /// among the issued tokens too).
    pub async fn mint_refresh_token(&self, resource: &str) -> String {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/test/refresh-token", self.issuer()),
            [("resource", resource)],
        )
        .unwrap();
        let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        v["refresh_token"].as_str().unwrap().to_owned()
    }

    /// Where every issued token is recorded.
    pub fn issued_file(&self) -> PathBuf {
        self.dir.join("issued-tokens")
    }
}

impl Drop for OAuth {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- MCP servers that demand their own audience ----------------------------------------------------

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SumRequest {
    a: i64,
    b: i64,
}

/// The tools every test MCP server offers: `sum`.
#[derive(Clone)]
pub struct Tools {
    tool_router: ToolRouter<Self>,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }
}

#[tool_router]
impl Tools {
    #[tool(description = "Add two numbers")]
    fn sum(&self, Parameters(SumRequest { a, b }): Parameters<SumRequest>) -> String {
        (a + b).to_string()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// An RSA public key from a JWK: modulus and exponent, big-endian bytes.
type RsaKey = (Vec<u8>, Vec<u8>);

/// The resource server's bearer check: an RS256 JWT signed by a key of the issuer's JWKS, with
/// `iss` the issuer, `aud` this server's URL and `exp` not passed.
struct Gate {
    issuer: String,
    audience: String,
    jwks_uri: String,
    /// Fetches the JWKS (trusting the test CA when the OAuth server serves HTTPS).
    http: reqwest::Client,
    /// Revoke the next token presented (see [`McpServer::revoke_next_token`]).
    revoke_next: std::sync::atomic::AtomicBool,
    /// Tokens revoked: refused with 401 `invalid_token` whatever their expiry.
    revoked: Mutex<HashSet<String>>,
    keys: Mutex<HashMap<String, RsaKey>>,
    log: Mutex<File>,
    accepted: AtomicU64,
    rejected: AtomicU64,
}

/// Leeway on `exp`, as resource servers allow for clock skew: a request the sidecar sends in the
/// token's last millisecond arrives after it.
const EXP_LEEWAY_SECONDS: u64 = 2;

impl Gate {
    async fn fetch_keys(&self) -> Result<(), String> {
        let jwks: serde_json::Value = self
            .http
            .get(&self.jwks_uri)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("fetching the JWKS: {e}"))?
            .json()
            .await
            .map_err(|e| format!("reading the JWKS: {e}"))?;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(v.as_str().unwrap_or_default())
                .unwrap_or_default()
        };
        let mut keys = self.keys.lock().unwrap();
        for k in jwks["keys"].as_array().into_iter().flatten() {
            if k["kty"] == "RSA" {
                let kid = k["kid"].as_str().unwrap_or_default().to_owned();
                keys.insert(kid, (b64(&k["n"]), b64(&k["e"])));
            }
        }
        Ok(())
    }

    /// Why `authorization` is refused, or `None` when it is accepted.
    async fn check(&self, authorization: Option<&str>) -> Option<&'static str> {
        let Some(token) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
            return Some("no bearer token");
        };
        if self.revoke_next.swap(false, Ordering::Relaxed) {
            self.revoked.lock().unwrap().insert(token.to_owned());
        }
        if self.revoked.lock().unwrap().contains(token) {
            return Some("revoked");
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts[..] else {
            return Some("not a JWT");
        };
        let decode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok();
        let (Some(h), Some(p), Some(sig)) = (decode(header), decode(payload), decode(signature)) else {
            return Some("not base64url");
        };
        let (Ok(h), Ok(claims)) = (
            serde_json::from_slice::<serde_json::Value>(&h),
            serde_json::from_slice::<serde_json::Value>(&p),
        ) else {
            return Some("not JSON");
        };
        if h["alg"] != "RS256" {
            return Some("not RS256");
        }
        let kid = h["kid"].as_str().unwrap_or_default();
        if !self.keys.lock().unwrap().contains_key(kid) {
            // A key rotated in since the last fetch.
            let _ = self.fetch_keys().await;
        }
        let Some((n, e)) = self.keys.lock().unwrap().get(kid).cloned() else {
            return Some("unknown signing key");
        };
        let signed = &token[..header.len() + 1 + payload.len()];
        let key = ring::signature::RsaPublicKeyComponents { n, e };
        if key
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &sig,
            )
            .is_err()
        {
            return Some("bad signature");
        }
        if claims["iss"] != self.issuer.as_str() {
            return Some("wrong issuer");
        }
        let aud_ok = match &claims["aud"] {
            serde_json::Value::String(a) => *a == self.audience,
            serde_json::Value::Array(a) => a.iter().any(|x| *x == self.audience.as_str()),
            _ => false,
        };
        if !aud_ok {
            return Some("wrong audience");
        }
        match claims["exp"].as_u64() {
            Some(exp) if exp + EXP_LEEWAY_SECONDS > unix_now() => None,
            _ => Some("expired"),
        }
    }
}

async fn require_token(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match gate.check(authorization).await {
        None => {
            gate.accepted.fetch_add(1, Ordering::Relaxed);
            next.run(request).await
        }
        Some(reason) => {
            gate.rejected.fetch_add(1, Ordering::Relaxed);
            // The reason only: a resource server logs why, never the token.
            let _ = writeln!(
                gate.log.lock().unwrap(),
                "{} audience={} rejected: {reason}",
                unix_now(),
                gate.audience
            );
            (
                http::StatusCode::UNAUTHORIZED,
                [(
                    "www-authenticate",
                    format!(
                        r#"Bearer error="invalid_token", error_description="{reason}", resource_metadata="{}""#,
                        gate.audience.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
                    ),
                )],
            )
                .into_response()
        }
    }
}

/// An rmcp Streamable HTTP server at `url` (its own audience) that accepts only the OAuth server's
/// tokens for that audience. It runs until the test's runtime ends.
pub struct McpServer {
    /// `http://127.0.0.1:<port>/mcp`: the URL, the credential's upstream and the token audience.
    pub url: String,
    gate: Arc<Gate>,
}

impl McpServer {
    /// Starts a server trusting `oauth`'s keys (fetched from its discovery document), logging
    /// rejections into the run folder.
    pub async fn start(oauth: &OAuth, dir: &Path) -> Self {
        Self::start_on(oauth, dir, "127.0.0.1", None).await
    }

    /// Starts a server on `host`; with `tls` (certificate, key and the CA that signed both servers'
    /// certificates, PEM files) over HTTPS, trusting that CA for the OAuth server's JWKS.
    pub async fn start_on(
        oauth: &OAuth,
        dir: &Path,
        host: &str,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/mcp", listener.local_addr().unwrap());
        let mut http = reqwest::Client::builder();
        if let Some((_, _, ca)) = &tls {
            let pem = std::fs::read(ca).unwrap();
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        let http = http.build().unwrap();
        let discovery: serde_json::Value = http
            .get(format!("{}/.well-known/openid-configuration", oauth.issuer()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let gate = Arc::new(Gate {
            issuer: discovery["issuer"].as_str().unwrap().to_owned(),
            audience: url.clone(),
            jwks_uri: discovery["jwks_uri"].as_str().unwrap().to_owned(),
            http,
            revoke_next: std::sync::atomic::AtomicBool::new(false),
            revoked: Mutex::default(),
            keys: Mutex::default(),
            log: Mutex::new(log_file(dir, "mcp-servers")),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        gate.fetch_keys().await.unwrap();
        let tools = Tools::default();
        // The SDK refuses Host headers other than loopback's (DNS rebinding): allow this one.
        let config =
            StreamableHttpServerConfig::default().with_allowed_hosts(["localhost", "127.0.0.1", host]);
        let service: StreamableHttpService<Tools, LocalSessionManager> =
            StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
        // RFC 9728 metadata (outside the token check), for clients that discover and sign in.
        let metadata = serde_json::json!({
            "resource": url, "authorization_servers": [gate.issuer], "scopes_supported": ["read", "write"],
        });
        let app = Router::new()
            .nest_service("/mcp", service)
            .layer(axum::middleware::from_fn_with_state(gate.clone(), require_token))
            .route(
                "/.well-known/oauth-protected-resource/mcp",
                axum::routing::get(move || async move { axum::Json(metadata) }),
            );
        match tls {
            None => {
                tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            }
            Some((cert, key, _)) => serve_tls(listener, app, &cert, &key),
        }
        Self { url, gate }
    }

    /// Makes the server revoke the next bearer token it is sent: that request and every later one
    /// with the same token get 401 `invalid_token`, as after an administrator revoked it.
    pub fn revoke_next_token(&self) {
        self.gate.revoke_next.store(true, Ordering::Relaxed);
    }

    /// Requests it accepted and refused.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.gate.accepted.load(Ordering::Relaxed),
            self.gate.rejected.load(Ordering::Relaxed),
        )
    }
}

/// Serves `app` over HTTPS (HTTP/1.1 and HTTP/2) with the PEM certificate chain and key.
fn serve_tls(listener: tokio::net::TcpListener, app: Router, cert: &Path, key: &Path) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

/// A client-credentials McpCredential `name` for `upstream`, with the OAuth server's client `cc-basic`.
pub fn credential(name: &str, upstream: &str, token_url: &str, renew_before_percentage: i32) -> Credential {
    Credential::new(name, upstream, OAuth2::cc_basic().token_url(token_url))
        .renew_before_percentage(renew_before_percentage)
}

/// The YAML of [`credential`].
pub fn credential_yaml(name: &str, upstream: &str, token_url: &str, renew_before_percentage: i32) -> String {
    credential(name, upstream, token_url, renew_before_percentage).yaml()
}

// ---- MCP clients -----------------------------------------------------------------------------------

#[derive(Clone, Default)]
/// An MCP client with no credential of its own (the agent).
pub struct Agent;

impl ClientHandler for Agent {
    fn get_info(&self) -> ClientConfig {
        let mut info = ClientConfig::default();
        info.protocol_version = ProtocolVersion::V_2025_11_25;
        info
    }
}

/// An MCP session through the sidecar.
pub type Session = RunningService<RoleClient, Agent>;

/// Opens an MCP session at `url` (`http://<sidecar>/<credential>`). The agent holds no credential.
pub async fn connect(url: &str) -> Result<Session, String> {
    let transport =
        StreamableHttpClientTransport::from_config(StreamableHttpClientTransportConfig::with_uri(url));
    Agent.serve(transport).await.map_err(|e| format!("{e:?}"))
}

/// Calls `sum(a, 1)` and checks the answer.
pub async fn call_sum(session: &Session, a: i64) -> Result<(), String> {
    let args = serde_json::json!({ "a": a, "b": 1 });
    let result = session
        .call_tool(CallToolRequestParams::new("sum").with_arguments(args.as_object().unwrap().clone()))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let text = serde_json::to_value(&result.content).unwrap()[0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if text == (a + 1).to_string() {
        Ok(())
    } else {
        Err(format!("wrong answer {text:?}"))
    }
}

/// The cause of a client-visible failure, from the error the SDK gave the client. Matches the SDK's
/// structured parts (`AuthRequired`, `status: 503`), never bare numbers, which ports contain too.
pub fn cause(error: &str) -> &'static str {
    let status =
        |code: &str| error.contains(&format!("status: {code}")) || error.contains(&format!("HTTP {code}"));
    if error.contains("AuthRequired") || error.contains("invalid_token") || status("401") {
        "upstream 401 (authentication)"
    } else if error.contains("InsufficientScope") || status("403") {
        "upstream 403"
    } else if status("503") {
        "sidecar 503 (credential expired or missing)"
    } else if status("502") || status("504") {
        "sidecar 502/504 (upstream unreachable)"
    } else if error.contains("timed out") {
        "timeout"
    } else if error.to_ascii_lowercase().contains("connect") {
        "connection to the sidecar"
    } else {
        "other"
    }
}

#[test]
fn causes_come_from_the_sdks_error_not_from_port_numbers() {
    let at = "http://127.0.0.1:40150/upstream-1";
    assert_eq!(
        cause(&format!(
            "{at}: Transport(HttpStatus(HttpStatusError {{ status: 503, retry_after: None }}))"
        )),
        "sidecar 503 (credential expired or missing)"
    );
    assert_eq!(
        cause(&format!(
            "{at}: AuthRequired(AuthRequiredError {{ www_authenticate_header: \"Bearer error=\\\"invalid_token\\\"\" }})"
        )),
        "upstream 401 (authentication)"
    );
    assert_eq!(cause("http://127.0.0.1:35037/x: error sending request"), "other");
}

// ---- The sidecar -----------------------------------------------------------------------------------

/// The sidecar binary (`mcp-credentials-sidecar`), built for this test binary.
pub fn sidecar_binary() -> PathBuf {
    workspace_binary("mcp-credentials-sidecar")
}

/// The sidecar binary with its proxy on 127.0.0.1:`port` and its admin listener on 127.0.0.1:`admin`,
/// logging at info into the run folder's `sidecar.log`: its mode and credentials are the caller's.
fn sidecar_command(dir: &Path, port: u16, admin: u16) -> Command {
    let mut command = Command::new(sidecar_binary());
    command
        .env("MCP_SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
        .env("MCP_SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("MCP_SIDECAR_LOG", "info")
        .stdout(log_file(dir, "sidecar"))
        .stderr(log_file(dir, "sidecar"));
    command
}

/// The standalone sidecar as a process (`mcp-credentials-sidecar standalone <file> <secrets>`),
/// logging into the run folder's `sidecar.log`; stopped when dropped.
pub struct Standalone {
    child: Child,
    /// `http://127.0.0.1:<port>/<name>`: the credential's MCP endpoint through the sidecar.
    pub url: String,
    /// `http://127.0.0.1:<port>`: the admin listener (`/status`, `/readyz`, `/browser`).
    pub admin: String,
}

impl Standalone {
    /// Starts the sidecar on the McpCredential YAML `file` and the secrets folder `secrets`; `url`
    /// is the endpoint of the credential `name`.
    pub fn start(name: &str, file: &Path, secrets: &Path, dir: &Path) -> Self {
        Self::spawn(name, file, secrets, dir, &[])
    }

    /// As [`Standalone::start`], with `MCP_SIDECAR_DISCOVERY_ALLOW_LOOPBACK=true`: the sidecar may
    /// discover an authorization server on 127.0.0.1, where the tests run theirs.
    pub fn start_allowing_loopback_discovery(name: &str, file: &Path, secrets: &Path, dir: &Path) -> Self {
        Self::spawn(
            name,
            file,
            secrets,
            dir,
            &[("MCP_SIDECAR_DISCOVERY_ALLOW_LOOPBACK", "true")],
        )
    }

    fn spawn(name: &str, file: &Path, secrets: &Path, dir: &Path, env: &[(&str, &str)]) -> Self {
        let (port, admin) = (free_port(), free_port());
        let child = sidecar_command(dir, port, admin)
            .args(["standalone".as_ref(), file.as_os_str(), secrets.as_os_str()])
            .envs(env.iter().copied())
            .spawn()
            .expect("start the sidecar");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}/{name}"),
            admin: format!("http://127.0.0.1:{admin}"),
        }
    }

    /// The status and JSON body of a bare MCP request (a ping) through the sidecar; `None` while
    /// it does not answer.
    pub async fn post(&self) -> Option<(u16, serde_json::Value)> {
        let r = reqwest::Client::new()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.unwrap_or_default()))
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sidecar binary in Kubernetes mode, watching the credentials' Secrets of one namespace.
pub struct SidecarProcess {
    child: Child,
    /// `http://127.0.0.1:<port>`: the proxy.
    pub url: String,
    /// The admin port (`/metrics`, `/readyz`).
    pub admin_port: u16,
}

impl SidecarProcess {
    /// Starts the sidecar for `credentials` in `ns`, logging into the run folder.
    pub fn start(cp: &ControlPlane, ns: &str, credentials: &[String], dir: &Path) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let child = sidecar_command(dir, port, admin_port)
            .env("KUBECONFIG", token_kubeconfig(cp))
            .env("MCP_SIDECAR_NAMESPACE", ns)
            .env("MCP_SIDECAR_CREDENTIALS", credentials.join(","))
            .spawn()
            .expect("start the sidecar");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_port,
        }
    }

    /// True once `/readyz` answers 200 (every credential loaded).
    pub async fn ready(&self) -> bool {
        reqwest::get(format!("http://127.0.0.1:{}/readyz", self.admin_port))
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin_port)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- Prometheus ------------------------------------------------------------------------------------

/// The Debian package's Prometheus (`/usr/bin/prometheus`, installed by tests/run) scraping the
/// given targets every second, with its storage in the run folder.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets`: (job, `host:port`).
    pub fn start(targets: &[(&str, String)], dir: &Path) -> Self {
        let mut config = String::from(
            "global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms}\nscrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "- job_name: {job}\n  static_configs: [{{targets: ['{target}']}}]\n"
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let port = free_port();
        let binary = std::env::var("PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into());
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log_file(dir, "prometheus"))
            .stderr(log_file(dir, "prometheus"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary} (apt-get install prometheus): {e}"));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The result of an instant PromQL query: (labels, value) per series; `None` if the query failed
    /// (Prometheus not up yet).
    pub async fn query(&self, promql: &str) -> Option<Vec<(BTreeMap<String, String>, f64)>> {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/query", self.url), [("query", promql)])
            .unwrap();
        let r = reqwest::get(url).await.ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        if v["status"] != "success" {
            return None;
        }
        let series = v["data"]["result"].as_array()?;
        Some(
            series
                .iter()
                .map(|s| {
                    let labels = serde_json::from_value(s["metric"].clone()).unwrap_or_default();
                    let value = s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(f64::NAN);
                    (labels, value)
                })
                .collect(),
        )
    }

    /// The single value of a query that aggregates to one series, `None` if it has none.
    pub async fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await?;
        r.first().map(|(_, v)| *v)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- The log scan ----------------------------------------------------------------------------------

/// Every secret of a run that must never reach a log: each issued token (access and refresh), the
/// payload and signature parts of each JWT (so a token cut short or split is found too; the header
/// is the same for every token and not secret), and the client secret.
pub fn secrets_of_run(issued_file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(issued_file).unwrap_or_default();
    let mut out = vec![CLIENT_SECRET.to_owned()];
    for token in text.lines().filter(|l| !l.is_empty()) {
        out.push(token.to_owned());
        out.extend(
            token
                .split('.')
                .skip(1)
                .filter(|_| token.contains('.'))
                .map(str::to_owned),
        );
    }
    out
}

/// Scans `logs` for `secrets`, prints the tally, and fails the test on any hit.
pub fn assert_no_secrets_in_logs(logs: &[PathBuf], secrets: &[String]) {
    let (hits, lines) = scan_logs(logs, secrets);
    eprintln!(
        "log scan: {lines} lines in {} files, {} secrets: {} hits",
        logs.len(),
        secrets.len(),
        hits.len()
    );
    assert!(hits.is_empty(), "token bytes in logs: {hits:#?}");
}

/// Scans every file in `logs` for the `secrets`; returns `(file, line number, which secret)` per hit
/// (the secret by its first 8 characters, so the report itself leaks nothing useful), and how many
/// lines were scanned.
pub fn scan_logs(logs: &[PathBuf], secrets: &[String]) -> (Vec<String>, usize) {
    // Tokens are base64url (and dots): split each line on every other character and look the
    // pieces up, instead of searching each line for each of hundreds of tokens.
    let wanted: HashSet<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| s.len() >= 32)
        .collect();
    let short: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| s.len() < 32)
        .collect();
    let mut hits = Vec::new();
    let mut lines = 0;
    for path in logs {
        let bytes = std::fs::read(path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for (n, line) in text.lines().enumerate() {
            lines += 1;
            let pieces = line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            let found = pieces
                .filter(|p| p.len() >= 32)
                .find(|p| wanted.contains(p))
                .or_else(|| short.iter().copied().find(|s| line.contains(s)));
            if let Some(secret) = found {
                hits.push(format!(
                    "{}:{}: {}…",
                    path.display(),
                    n + 1,
                    &secret[..8.min(secret.len())]
                ));
            }
        }
    }
    (hits, lines)
}

/// Every log of a run: the run folder's and the control plane's (kube-apiserver, etcd,
/// kube-controller-manager).
pub fn all_logs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let control_plane = std::env::var_os("MCP_CONTROL_PLANE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".control-plane"));
    for d in [dir.join("logs"), control_plane] {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// How long a test may wait for one condition.
pub const PATIENCE: Duration = Duration::from_secs(180);

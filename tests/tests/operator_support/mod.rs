//! Shared by the operator's end-to-end tests: the operator as a real process, the real OAuth
//! server (oidc-provider) as a real process, and polling helpers. Everything started is killed on drop.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::{ControlPlane, control_plane, repo_root};

/// Generous: the machine is shared and noisy. Tests wait for conditions, never for a fixed time.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The control plane with the CRDs installed, and a fresh namespace.
pub fn setup(prefix: &str) -> (&'static ControlPlane, String) {
    // kube (ring) and reqwest both compile a rustls crypto provider in: pick one for this process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = control_plane();
    static CRDS: OnceLock<()> = OnceLock::new();
    CRDS.get_or_init(|| cp.install_crds());
    let ns = cp.namespace(prefix);
    (cp, ns)
}

/// A kubeconfig that authenticates with a service-account token, as the operator does in a cluster.
///
/// Why not the admin kubeconfig: its client certificate is X.509 v1, which rustls (the TLS stack
/// of kube-rs) refuses (`UnsupportedCertVersion`); kubectl (Go) accepts it.
pub fn token_kubeconfig(cp: &ControlPlane) -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let ns = "mcp-operator-e2e";
        let _ = cp.kubectl(&["create", "namespace", ns]);
        let _ = cp.kubectl(&["create", "serviceaccount", "operator", "-n", ns]);
        let _ = cp.kubectl(&[
            "create",
            "clusterrolebinding",
            "mcp-operator-e2e",
            "--clusterrole=cluster-admin",
            "--serviceaccount=mcp-operator-e2e:operator",
        ]);
        let token = cp.kubectl(&["create", "token", "operator", "-n", ns, "--duration=24h"]);
        assert!(token.success, "kubectl create token: {}", token.stderr);
        kubeconfig_with_token(cp, token.stdout.trim(), "operator")
    })
    .clone()
}

/// A kubeconfig for this control plane that authenticates with `token`, written to a temporary
/// file named after `who`.
pub fn kubeconfig_with_token(cp: &ControlPlane, token: &str, who: &str) -> PathBuf {
    let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let field = |k: &str| {
        admin
            .lines()
            .find_map(|l| l.trim().strip_prefix(k).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: {who}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {who}}}\n\
         current-context: test\n",
        field("server:"),
        field("certificate-authority:"),
    );
    let path = std::env::temp_dir().join(format!("mcp-e2e-{}-{who}.kubeconfig", std::process::id()));
    std::fs::write(&path, config).unwrap();
    path
}

/// A kube client with the token kubeconfig.
pub async fn client(cp: &ControlPlane) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(token_kubeconfig(cp)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator binary, built once per test binary into this build's target directory.
pub fn operator_binary() -> PathBuf {
    workspace_binary("mcp-credentials-operator")
}

/// The binary of the same name as workspace package `package`, built once per test binary into this
/// build's target directory.
pub fn workspace_binary(package: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, path)) = built.iter().find(|(p, _)| p == package) {
        return path.clone();
    }
    // <target>/debug/deps/<this test> -> <target>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target = profile_dir.parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", package, "--bin", package])
        .env("CARGO_TARGET_DIR", &target)
        // Cargo sets it for this test; ring's build script tracks it, so inheriting it would
        // rebuild ring and everything above it here, and again in the next `cargo test`.
        .env_remove("CARGO_MANIFEST_DIR")
        .current_dir(repo_root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building {package} failed");
    let path = profile_dir.join(package);
    built.push((package.to_owned(), path.clone()));
    path
}

/// The operator running as its own process, watching one namespace.
pub struct Operator {
    child: Child,
    /// Port of /metrics, /healthz, /readyz.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Starts an operator for `ns` with leader election in `ns`, as `identity`.
    pub fn start(cp: &ControlPlane, ns: &str, identity: &str, extra: &[&str]) -> Self {
        Self::start_with_kubeconfig(cp, ns, identity, extra, &token_kubeconfig(cp))
    }

    /// Like [`Operator::start`], reaching the API server as `kubeconfig` says (through a fault proxy, say).
    pub fn start_with_kubeconfig(
        cp: &ControlPlane,
        ns: &str,
        identity: &str,
        extra: &[&str],
        kubeconfig: &Path,
    ) -> Self {
        let _ = cp;
        Self::spawn(&["--namespace", ns], ns, identity, extra, kubeconfig)
    }

    /// Starts an operator for `ns` that issues its own webhook certificates: it serves
    /// `dir`/tls.crt and `dir`/tls.key on `listen`, keeps them in the Secret `webhook-tls` of `ns`
    /// and writes its CA into the webhook configurations named `configuration`; plus `extra` flags.
    pub fn start_issuing_webhook_certs(
        cp: &ControlPlane,
        ns: &str,
        identity: &str,
        dir: &Path,
        listen: &str,
        configuration: &str,
        extra: &[&str],
    ) -> Self {
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let mut args = vec![
            "--webhook-listen",
            listen,
            "--webhook-cert-file",
            cert.to_str().unwrap(),
            "--webhook-key-file",
            key.to_str().unwrap(),
            "--webhook-tls-secret",
            "webhook-tls",
            "--webhook-configuration",
            configuration,
        ];
        args.extend_from_slice(extra);
        Self::start(cp, ns, identity, &args)
    }

    /// Starts an operator that watches every namespace (with leader election in `lease_ns`): give
    /// it a `--selector` so that it leaves other tests' credentials alone.
    pub fn start_cluster_wide(cp: &ControlPlane, lease_ns: &str, identity: &str, extra: &[&str]) -> Self {
        Self::spawn(&[], lease_ns, identity, extra, &token_kubeconfig(cp))
    }

    fn spawn(scope: &[&str], lease_ns: &str, identity: &str, extra: &[&str], kubeconfig: &Path) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("mcp-operator-{lease_ns}-{identity}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(operator_binary())
            .args(scope)
            .args([
                "--listen",
                &listen,
                "--identity",
                identity,
                "--lease-namespace",
                lease_ns,
            ])
            .args(if extra.contains(&"--token-timeout") { &[][..] } else { &["--token-timeout", "3"][..] })
            // A short Lease for takeover tests, unless the test sets its own.
            .args(if extra.contains(&"--lease-duration") { &[][..] } else { &["--lease-duration", "12"][..] })
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube_runtime=warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start the operator");
        Self { child, port, log }
    }

    /// The text of /metrics (empty while the server is not up yet).
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of one metric series (`name{labels}` exactly as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// The process id (to read its `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True once the process has exited on its own (as it does when it loses the Lease).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the process at once (SIGKILL): no graceful Lease release.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit; true when it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// The resident memory of the process, in bytes (`VmRSS`), 0 when it cannot be read.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// The log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Like [`Operator::start_cluster_wide`], reaching the API server as `kubeconfig` says
    /// (through a fault proxy, say).
    pub fn start_cluster_wide_with_kubeconfig(
        lease_ns: &str,
        identity: &str,
        extra: &[&str],
        kubeconfig: &Path,
    ) -> Self {
        Self::spawn(&[], lease_ns, identity, extra, kubeconfig)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of `series` in a Prometheus text exposition, 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The real OAuth 2.0 server (tests/oauth-server, oidc-provider) as its own process.
pub struct OAuthServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The PEM private key of the `cc-jwt` client (generated by the server at start).
    pub cc_jwt_key: String,
}

impl OAuthServer {
    /// Starts the server on `port` (0: any) issuing access tokens valid `ttl` seconds.
    pub fn start(port: u16, ttl: u64) -> Self {
        Self::start_with_env(port, ttl, &[])
    }

    /// Like [`OAuthServer::start`], trusting JWTs of `issuer` signed by a key of `jwks` as
    /// token-exchange subjects (workload identity, see tests/oauth-server/server.mjs).
    pub fn start_trusting(ttl: u64, issuer: &str, jwks: &str) -> Self {
        Self::start_with_env(
            0,
            ttl,
            &[
                ("MCP_TEST_TRUSTED_ISSUER", issuer),
                ("MCP_TEST_TRUSTED_JWKS", jwks),
            ],
        )
    }

    fn start_with_env(port: u16, ttl: u64, env: &[(&str, &str)]) -> Self {
        static INSTALL: OnceLock<()> = OnceLock::new();
        let dir = repo_root().join("tests/oauth-server");
        INSTALL.get_or_init(|| {
            let ok = Command::new(dir.join("install"))
                .status()
                .expect("run tests/oauth-server/install");
            assert!(ok.success(), "tests/oauth-server/install failed");
        });
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .args([port.to_string(), ttl.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node tests/oauth-server/server.mjs");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Keep reading: with its stdout closed, the server dies on its next write.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("server said {line:?}"));
        Self {
            child,
            port: ready["port"].as_u64().unwrap() as u16,
            cc_jwt_key: ready["ccJwtPrivateKeyPem"].as_str().unwrap().to_owned(),
        }
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer())
    }

    /// The issuer (as its discovery metadata says).
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// True when `token` is the live refresh token of its chain (issued, not consumed by a rotation).
    pub async fn refresh_token_is_live(&self, token: &str) -> bool {
        // oidc-provider's tokens are base64url: nothing to escape.
        let url = format!(
            "http://127.0.0.1:{}/test/refresh-token-status?token={token}",
            self.port
        );
        let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        v["found"] == true && v["consumed"] == false
    }

    /// Token requests the server has received.
    pub async fn token_requests(&self) -> u64 {
        let url = format!("http://127.0.0.1:{}/test/stats", self.port);
        let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        v["token_requests"].as_u64().unwrap()
    }

    /// A refresh token for `rt-client` bound to `resource`, as a user's login would give.
    pub async fn mint_refresh_token(&self, resource: &str) -> String {
        let url = format!(
            "http://127.0.0.1:{}/test/refresh-token?resource={resource}",
            self.port
        );
        let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        v["refresh_token"].as_str().unwrap().to_owned()
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after [`TIMEOUT`] with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The condition `type_` of a credential: (status, reason, message).
pub fn condition(c: &McpCredential, type_: &str) -> Option<(String, String, String)> {
    c.status
        .as_ref()?
        .conditions
        .iter()
        .find(|x| x.type_ == type_)
        .map(|x| (x.status.clone(), x.reason.clone(), x.message.clone()))
}

/// Waits until the credential's condition `type_` has `status` (and `reason`, if given).
pub async fn wait_condition(
    api: &Api<McpCredential>,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> McpCredential {
    wait_for(&format!("{name}: {type_}={status} {reason:?}"), || async {
        let c = api.get_opt(name).await.ok()??;
        let (s, r, _) = condition(&c, type_)?;
        (s == status && reason.is_none_or(|want| want == r)).then_some(c)
    })
    .await
}

/// The string value of `key` in a Secret's data.
pub fn data(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8(v.0.clone()).unwrap())
}

/// The JSON payload of a JWT (not verified).
pub fn jwt_payload(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Creates a Secret with string data in `ns`.
pub fn create_secret(cp: &ControlPlane, ns: &str, name: &str, pairs: &[(&str, &str)]) {
    let mut args = vec!["create", "secret", "generic", name, "-n", ns];
    let literals: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("--from-literal={k}={v}"))
        .collect();
    args.extend(literals.iter().map(String::as_str));
    let out = cp.kubectl(&args);
    assert!(out.success, "creating secret {name}: {}", out.stderr);
}

/// Creates the Secret `login` in `ns` that `OAuth2::rt_client()` reads: the refresh-token client's
/// secret (the test OAuth servers' `rt-client-secret`) and `refresh_token`.
pub fn create_rt_client_login(cp: &ControlPlane, ns: &str, refresh_token: &str) {
    create_secret(
        cp,
        ns,
        "login",
        &[
            ("client-secret", "rt-client-secret"),
            ("refresh-token", refresh_token),
        ],
    );
}

/// Applies YAML in `ns` and asserts it worked.
pub fn apply(cp: &ControlPlane, ns: &str, yaml: &str) {
    let out = cp.apply(ns, yaml);
    assert!(out.success, "kubectl apply failed: {}\n{yaml}", out.stderr);
}

/// The operator with its webhook listener (admission and sidecar reports) on a free port, serving a
/// certificate of a fresh test CA written to `dir`, plus `extra` flags.
pub struct WebhookOperator {
    pub operator: Operator,
    /// `127.0.0.1:<port>`.
    pub listen: String,
    /// The test CA's PEM: what clients of the listener trust.
    pub ca_pem: String,
}

impl WebhookOperator {
    pub fn start(cp: &ControlPlane, ns: &str, identity: &str, dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ca_pem = certificates(dir);
        let listen = format!("127.0.0.1:{}", free_port());
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let mut args = vec![
            "--webhook-listen",
            &listen,
            "--webhook-cert-file",
            cert.to_str().unwrap(),
            "--webhook-key-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let operator = Operator::start(cp, ns, identity, &args);
        WebhookOperator {
            operator,
            listen,
            ca_pem,
        }
    }
}

/// A CA and a serving certificate for 127.0.0.1, as PEM files in `dir`; returns the CA's PEM.
pub fn certificates(dir: &Path) -> String {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=webhook-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "tls.crt",
    ]);
    std::fs::read_to_string(dir.join("ca.crt")).unwrap()
}

// ---- A slow tenant: authorization servers that never answer (fairness, chaos soak) ---------------

/// Accepts connections and never answers (nor closes them).
pub async fn blackhole() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    port
}

/// An MCP server that asks for OAuth (401 with `resource_metadata`), whose protected-resource
/// metadata names `servers` authorization servers on `hole`.
pub async fn slow_upstream(hole: u16, servers: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let document = serde_json::json!({
        "resource": format!("{base}/mcp"),
        "authorization_servers": (0..servers)
            .map(|i| format!("http://127.0.0.1:{hole}/as{i}"))
            .collect::<Vec<_>>(),
    });
    let challenge = format!(r#"Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#);
    use axum::{
        http::{HeaderMap, HeaderValue, StatusCode, header},
        response::IntoResponse,
        routing::{any, get},
    };
    let app = axum::Router::new()
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(move || {
                let document = document.clone();
                async move { axum::Json(document) }
            }),
        )
        .route(
            "/mcp",
            any(move || {
                let challenge = challenge.clone();
                async move {
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_str(&challenge).unwrap(),
                    );
                    (StatusCode::UNAUTHORIZED, headers).into_response()
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("{base}/mcp")
}

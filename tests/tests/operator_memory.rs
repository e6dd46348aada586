//! Least privilege and memory: the operator watches Secrets by their metadata only, so the data of
//! Secrets it will never manage is neither held nor paid for. Measured against the real API server
//! as a user would see it: the operator's resident memory in a namespace full of unrelated Secrets,
//! next to the same operator in an empty one.

mod operator_support;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::credential::{Credential, api_key, secret_key};
use operator_support::{Operator, client, create_secret, data, setup, wait_condition, wait_for};

/// Unrelated Secrets and their size: 16 MiB of data the operator must not hold.
const UNRELATED: usize = 1000;
const SECRET_BYTES: usize = 16 * 1024;
/// How much more memory the operator may use next to them. Holding their data (as a full watch
/// does, through its list pages and the allocator keeping what they used) costs more than the
/// 16 MiB they weigh; their metadata is about 0.3 KiB each.
const ALLOWED_GROWTH: u64 = 6 * 1024 * 1024;

/// Creates `count` Secrets of `bytes` of incompressible data each, in one `kubectl create`.
fn create_unrelated(cp: &mcp_credentials_e2e::ControlPlane, ns: &str, count: usize, bytes: usize) {
    use base64::Engine;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let items: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let blob: Vec<u8> = (0..bytes)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("unrelated-{i}"), "namespace": ns},
                "data": {"blob": base64::engine::general_purpose::STANDARD.encode(blob)},
            })
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let out = cp.tool(
        "kubectl",
        &["create", "-f", "-", "-o", "name"],
        Some(&list.to_string()),
    );
    assert!(out.success, "creating the unrelated Secrets: {}", out.stderr);
}

/// The API-key credential `tool` reading Secret `key`.
fn tool_credential() -> Credential {
    Credential::new(
        "tool",
        "https://mcp.example.com/mcp",
        api_key(secret_key("key", "token")),
    )
}

/// Starts an operator in `ns` with one API-key credential, waits until it is Ready, changes the key
/// and waits for the new one (watch events arrive in order, so by then the operator has seen every
/// Secret created before), and returns its resident memory.
async fn settled_rss(cp: &'static mcp_credentials_e2e::ControlPlane, ns: &str) -> u64 {
    create_secret(cp, ns, "key", &[("token", "first-key")]);
    let operator = Operator::start(cp, ns, "memory", &[]);
    let yaml = tool_credential().yaml();
    assert!(cp.apply(ns, &yaml).success);
    let kube = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(kube.clone(), ns);
    wait_condition(&creds, "tool", "Ready", "True", None).await;
    let out = cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "key",
        "-n",
        ns,
        "--from-literal=token=second-key",
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    assert!(
        cp.tool("kubectl", &["apply", "-f", "-"], Some(&out.stdout))
            .success
    );
    let secrets: Api<Secret> = Api::namespaced(kube, ns);
    wait_for("the new key", || async {
        let s = secrets.get_opt("tool-mcp-credential").await.ok()??;
        (data(&s, "header.Authorization")? == "Bearer second-key").then_some(())
    })
    .await;
    // Let the allocator settle after start-up, as a scrape of a long-running operator would see it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rss = operator.rss_bytes();
    assert!(rss > 0, "cannot read the operator's memory");
    rss
}

#[tokio::test(flavor = "multi_thread")]
async fn unrelated_secrets_cost_the_operator_no_memory_for_their_data() {
    let (cp, empty) = setup("memory-empty");
    let baseline = settled_rss(cp, &empty).await;

    let full = cp.namespace("memory-full");
    create_unrelated(cp, &full, UNRELATED, SECRET_BYTES);
    let beside = settled_rss(cp, &full).await;

    let growth = beside.saturating_sub(baseline);
    println!(
        "operator RSS: {:.1} MiB alone, {:.1} MiB beside {UNRELATED} unrelated Secrets of {} KiB (+{:.1} MiB)",
        baseline as f64 / 1048576.0,
        beside as f64 / 1048576.0,
        SECRET_BYTES / 1024,
        growth as f64 / 1048576.0
    );
    assert!(
        growth <= ALLOWED_GROWTH,
        "the operator grew by {growth} bytes next to {UNRELATED} Secrets it does not manage: it holds their data"
    );
}

/// One request the operator sent to the API server, as the recording proxy saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query, percent-decoded.
    target: String,
    /// The `Accept` header (empty when absent).
    accept: String,
}

impl Seen {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// A list or watch of Secrets (a collection: no name after `/secrets`).
    fn lists_secrets(&self) -> bool {
        self.method == "GET" && self.path().ends_with("/secrets")
    }

    fn is_watch(&self) -> bool {
        self.target.contains("watch=true")
    }

    /// Asks for metadata only (`PartialObjectMetadata` and `PartialObjectMetadataList`): the API
    /// server sends no Secret data.
    fn metadata_only(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A plain-HTTP proxy in front of the API server that records the method, target and `Accept`
/// header of every request (no bodies, no other headers) and forwards it, streaming the answer
/// (watches included). The operator reaches it through a kubeconfig with `http://`.
struct RecordingProxy {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    kubeconfig: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    async fn start(cp: &mcp_credentials_e2e::ControlPlane, who: &str) -> Self {
        let direct = operator_support::token_kubeconfig(cp);
        let text = std::fs::read_to_string(&direct).unwrap();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(k).map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("no {k} in the kubeconfig"))
        };
        let (server, ca) = (field("server:"), field("certificate-authority:"));
        let ca = std::fs::read(ca).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
            .build()
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = {
            let (seen, server) = (seen.clone(), server.trim_end_matches('/').to_owned());
            axum::Router::new().fallback(move |req: axum::extract::Request| {
                let (seen, server, http) = (seen.clone(), server.clone(), http.clone());
                async move { forward(req, &server, &http, &seen).await }
            })
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let kubeconfig = std::env::temp_dir().join(format!(
            "mcp-e2e-{}-{who}-recorded.kubeconfig",
            std::process::id()
        ));
        let recorded: String = text
            .lines()
            .filter(|l| !l.trim().starts_with("certificate-authority:"))
            .map(|l| l.replace(&server, &format!("http://{addr}")) + "\n")
            .collect();
        std::fs::write(&kubeconfig, recorded).unwrap();
        Self {
            seen,
            kubeconfig,
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    req: axum::extract::Request,
    server: &str,
    http: &reqwest::Client,
    seen: &std::sync::Mutex<Vec<Seen>>,
) -> axum::response::Response {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        target: percent_decode(&target),
        accept: req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    });
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut upstream = http.request(parts.method, format!("{server}{target}")).body(body);
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    match upstream.send().await {
        Ok(answer) => {
            let mut response = axum::response::Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                if name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING {
                    response = response.header(name, value);
                }
            }
            response
                .body(axum::body::Body::from_stream(answer.bytes_stream()))
                .unwrap()
        }
        Err(e) => axum::response::Response::builder()
            .status(502)
            .body(axum::body::Body::from(e.to_string()))
            .unwrap(),
    }
}

/// Replaces the Secret `name` by one holding `key` = `value` (as `kubectl apply` of a new version).
fn replace_secret(cp: &mcp_credentials_e2e::ControlPlane, ns: &str, name: &str, key: &str, value: &str) {
    let literal = format!("--from-literal={key}={value}");
    let out = cp.kubectl(&[
        "create",
        "secret",
        "generic",
        name,
        "-n",
        ns,
        &literal,
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    assert!(
        cp.tool("kubectl", &["apply", "-f", "-"], Some(&out.stdout))
            .success
    );
}

/// Applies an API-key credential `tool` in `ns` (labelled `shard=<ns>`) reading Secret `key`, waits
/// until it is Ready, replaces the key and waits until the operator serves the new one: the change
/// of a referenced Secret reached the operator through its watches.
async fn credential_follows_its_key(cp: &'static mcp_credentials_e2e::ControlPlane, ns: &str) {
    let yaml = tool_credential().label("shard", ns).yaml();
    assert!(cp.apply(ns, &yaml).success);
    let kube = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(kube.clone(), ns);
    wait_condition(&creds, "tool", "Ready", "True", None).await;
    replace_secret(cp, ns, "key", "token", "second-key");
    let secrets: Api<Secret> = Api::namespaced(kube, ns);
    wait_for("the new key", || async {
        let s = secrets.get_opt("tool-mcp-credential").await.ok()??;
        (data(&s, "header.Authorization")? == "Bearer second-key").then_some(())
    })
    .await;
}

const MANAGED: &str = "labelSelector=app.kubernetes.io/managed-by=mcp-credentials";

/// Every list and watch of Secrets asks for metadata only: the API server sends the operator no
/// Secret data, not even of the Secrets it manages (it reads the data of those by name).
fn assert_metadata_only(seen: &[Seen]) {
    let with_data: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.lists_secrets() && !s.metadata_only())
        .collect();
    assert!(
        with_data.is_empty(),
        "the operator lists or watches Secrets with their data: {with_data:#?}"
    );
}

/// Cluster-wide, the operator lists and watches only the Secrets it writes (selected by its label,
/// in any namespace) and the Secrets of the namespaces that hold its credentials (where the
/// Secrets they reference are), by their metadata only. A namespace without credentials, full of
/// Secrets, is never listed nor watched; and a referenced Secret's change still reaches the
/// credential.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_wide_the_operator_watches_only_its_secrets_and_its_credentials_namespaces() {
    let (cp, ns) = setup("scope-creds");
    let other = cp.namespace("scope-other");
    create_secret(
        cp,
        &other,
        "unrelated",
        &[("blob", "not the operator's business")],
    );
    create_secret(cp, &ns, "key", &[("token", "first-key")]);
    let proxy = RecordingProxy::start(cp, &ns).await;
    let shard = format!("shard={ns}");
    let _operator = Operator::start_cluster_wide_with_kubeconfig(
        &ns,
        "scope",
        &["--selector", &shard],
        &proxy.kubeconfig,
    );
    credential_follows_its_key(cp, &ns).await;

    let seen = proxy.seen();
    let secrets: Vec<&Seen> = seen.iter().filter(|s| s.lists_secrets()).collect();
    assert_metadata_only(&seen);
    assert!(
        secrets
            .iter()
            .any(|s| s.path() == "/api/v1/secrets" && s.target.contains(MANAGED) && s.is_watch()),
        "no label-selected watch of the operator's own Secrets: {secrets:#?}"
    );
    let in_ns = format!("/api/v1/namespaces/{ns}/secrets");
    assert!(
        secrets.iter().any(|s| s.path() == in_ns && s.is_watch()),
        "no watch of the Secrets of {ns}, the namespace of the credential: {secrets:#?}"
    );
    let too_wide: Vec<&&Seen> = secrets
        .iter()
        .filter(|s| !((s.path() == "/api/v1/secrets" && s.target.contains(MANAGED)) || s.path() == in_ns))
        .collect();
    assert!(
        too_wide.is_empty(),
        "the operator lists or watches Secrets it does not manage (every Secret of the cluster, or of a \
         namespace without credentials): {too_wide:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.path().contains(&format!("/namespaces/{other}/secrets"))),
        "the operator read Secrets of {other}, which holds no credential"
    );
}

/// Watching one namespace, the operator lists and watches that namespace's Secrets by their
/// metadata only.
#[tokio::test(flavor = "multi_thread")]
async fn in_one_namespace_the_operator_watches_secrets_by_their_metadata_only() {
    let (cp, ns) = setup("scope-one");
    create_secret(cp, &ns, "key", &[("token", "first-key")]);
    let proxy = RecordingProxy::start(cp, &ns).await;
    let _operator = Operator::start_with_kubeconfig(cp, &ns, "scope", &[], &proxy.kubeconfig);
    credential_follows_its_key(cp, &ns).await;

    let seen = proxy.seen();
    assert_metadata_only(&seen);
    let secrets: Vec<&Seen> = seen.iter().filter(|s| s.lists_secrets()).collect();
    assert!(
        secrets
            .iter()
            .all(|s| s.path() == format!("/api/v1/namespaces/{ns}/secrets")),
        "the operator lists or watches Secrets outside its namespace: {secrets:#?}"
    );
}

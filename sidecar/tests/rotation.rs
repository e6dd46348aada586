//! API-key rotation without failed calls: rmcp (the official Rust MCP SDK) clients call a tool through
//! the sidecar in a loop while the test rotates the upstream's API key several times, the way a real
//! rotation goes: the upstream accepts exactly one key (anything else gets 401 with an `ApiKey`
//! challenge, no Bearer `invalid_token`), and its switch and the key file's arrive a moment apart, in
//! either order. Standalone mode (a secrets directory, the file replaced by a rename) and the files
//! store (a directory laid out like a projected Secret volume, updated by the kubelet's `..data`
//! symlink swap). The assertion is an outcome: how many calls failed. Every wait is for progress
//! (calls completed), with a generous deadline; none asserts on time.
//!
//! The pieces (`Upstream`, `Callers`, `rotate`) are meant for reuse by the soak.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::StatusCode;
use mcp_credentials_core::source::OutboundPolicy;
use mcp_credentials_e2e::credential::{Credential, api_key, secret_key};
use mcp_credentials_sidecar::store::{Store, files, standalone};
use rmcp::{
    ServerHandler, ServiceExt,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolRequestParams, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
        streamable_http_server::{StreamableHttpService, session::local::LocalSessionManager},
    },
};

mod common;

/// How many rotations each test makes (alternating which side switches first).
const ROTATIONS: u32 = 6;
/// Concurrent clients.
const CLIENTS: usize = 4;
/// How far apart the upstream's switch and the file's arrival are: "a moment", well within the
/// sidecar's replay wait (2 s).
const GAP: Duration = Duration::from_millis(300);

// ---- The upstream: an rmcp server that accepts exactly the current API key -------------------------

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SumRequest {
    a: i64,
    b: i64,
}

#[derive(Clone)]
struct Tools {
    tool_router: ToolRouter<Self>,
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

/// The key the upstream accepts, and how many requests it refused.
#[derive(Clone)]
struct Upstream {
    url: String,
    key: Arc<Mutex<String>>,
    refused: Arc<AtomicU64>,
}

impl Upstream {
    async fn start(key: &str) -> Self {
        let key = Arc::new(Mutex::new(key.to_owned()));
        let refused = Arc::new(AtomicU64::new(0));
        let service: StreamableHttpService<Tools, LocalSessionManager> = StreamableHttpService::new(
            || {
                Ok(Tools {
                    tool_router: Tools::tool_router(),
                })
            },
            Default::default(),
            Default::default(),
        );
        let gate = (key.clone(), refused.clone());
        let app = Router::new()
            .nest_service("/mcp", service)
            .layer(axum::middleware::from_fn_with_state(gate, check_key));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Upstream { url, key, refused }
    }

    /// From now on only `key` is accepted.
    fn accept_only(&self, key: &str) {
        *self.key.lock().unwrap() = key.to_owned();
    }
}

/// 401 with an API-key challenge (no Bearer `error=`) for anything but the current key.
async fn check_key(
    State((key, refused)): State<(Arc<Mutex<String>>, Arc<AtomicU64>)>,
    request: Request,
    next: Next,
) -> Response {
    let sent = request.headers().get("x-api-key").and_then(|v| v.to_str().ok());
    if sent != Some(key.lock().unwrap().as_str()) {
        refused.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", r#"ApiKey realm="mcp", header="X-API-Key""#)],
        )
            .into_response();
    }
    next.run(request).await
}

// ---- The clients ----------------------------------------------------------------------------------

/// Concurrent rmcp clients, each calling `sum` in a loop through the sidecar.
struct Callers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Callers {
    async fn start(url: &str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in 0..clients {
            let transport = StreamableHttpClientTransport::from_config(
                StreamableHttpClientTransportConfig::with_uri(url.to_owned()),
            );
            let client = ().serve(transport).await.expect("the client connects");
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let args = serde_json::json!({ "a": i, "b": n as i64 });
                    let call =
                        CallToolRequestParams::new("sum").with_arguments(args.as_object().unwrap().clone());
                    match client.call_tool(call).await {
                        Ok(r)
                            if serde_json::to_value(&r.content).unwrap()[0]["text"].as_str()
                                == Some((i + n as i64).to_string().as_str()) =>
                        {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("client {n}: wrong answer {r:?}")),
                        Err(e) => failures.lock().unwrap().push(format!("client {n}: {e}")),
                    }
                }
                let _ = client.cancel().await;
            }));
        }
        Callers {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Waits until `calls` more calls succeeded (or something failed).
    async fn progress(&self, calls: u64) {
        let target = self.ok.load(Ordering::Relaxed) + calls;
        for _ in 0..1200 {
            if self.ok.load(Ordering::Relaxed) >= target || !self.failures.lock().unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no progress: {} calls succeeded in all",
            self.ok.load(Ordering::Relaxed)
        );
    }

    /// Stops the loops; the calls that succeeded and the failures.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

// ---- Rotations ------------------------------------------------------------------------------------

/// Which side of a rotation lands first.
#[derive(Clone, Copy, Debug)]
enum First {
    /// The upstream switches, the key file follows a moment later.
    Upstream,
    /// The key file changes, the upstream switches a moment later.
    File,
}

/// Rotates `ROTATIONS` times while `callers` run, alternating which side goes first; `write` puts a
/// key into the sidecar's files. Returns the calls that succeeded and the failures.
async fn rotate(upstream: &Upstream, callers: Callers, write: impl Fn(&str)) -> (u64, Vec<String>) {
    callers.progress(20).await;
    for n in 2..ROTATIONS + 2 {
        let key = format!("key-{n}");
        let first = if n % 2 == 0 { First::Upstream } else { First::File };
        match first {
            First::Upstream => {
                upstream.accept_only(&key);
                tokio::time::sleep(GAP).await;
                write(&key);
            }
            First::File => {
                write(&key);
                tokio::time::sleep(GAP).await;
                upstream.accept_only(&key);
            }
        }
        // Calls go on with the new key for a while before the next rotation (past the replay wait,
        // so each rotation starts from a settled key).
        callers.progress(20).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        callers.progress(20).await;
    }
    callers.finish().await
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcp-sidecar-rotation-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `path` with `content` by a rename, as an editor or a rotation script does.
fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes `files` into `dir` the way the kubelet updates a projected Secret volume: a new timestamped
/// directory, a `..data_tmp` symlink to it renamed over `..data` (atomic), the visible names being
/// symlinks through `..data`, then the old directory removed.
fn project(dir: &Path, generation: u32, files: &[(&str, &str)]) {
    let data = format!("..{generation}");
    std::fs::create_dir_all(dir.join(&data)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&data).join(name), content).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    if generation > 1 {
        let _ = std::fs::remove_dir_all(dir.join(format!("..{}", generation - 1)));
    }
}

/// Polls until `store` serves `key` for `demo`.
async fn serving(store: &Store, key: &str) {
    for _ in 0..600 {
        if store
            .get("demo")
            .and_then(|s| s.current)
            .is_some_and(|c| c.headers[0].1 == key)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sidecar never served {key}");
}

fn report(mode: &str, upstream: &Upstream, ok: u64, failures: &[String]) {
    eprintln!(
        "{mode}: {ROTATIONS} rotations, {ok} calls succeeded, {} failed, the upstream refused {} requests",
        failures.len(),
        upstream.refused.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{mode}: {} calls failed across {ROTATIONS} rotations; the first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

// ---- Tests ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_api_key_rotations_fail_no_call() {
    let upstream = Upstream::start("key-1").await;
    let dir = temp_dir("standalone");
    std::fs::create_dir_all(dir.join("secrets/demo-key")).unwrap();
    let key_file = dir.join("secrets/demo-key/api-key");
    write_atomically(&key_file, "key-1\n");
    let credentials = dir.join("mcpcredentials.yaml");
    std::fs::write(
        &credentials,
        Credential::new(
            "demo",
            &format!("{}/mcp", upstream.url),
            api_key(secret_key("demo-key", "api-key")),
        )
        .header("X-API-Key")
        .yaml(),
    )
    .unwrap();
    let store = Store::new(["demo".to_owned()]);
    let (task, _) = standalone::start(
        store.clone(),
        &credentials,
        &dir.join("secrets"),
        OutboundPolicy::default(),
    )
    .await
    .unwrap();
    serving(&store, "key-1").await;
    let sidecar = common::sidecar_with_store(store).await;

    let callers = Callers::start(&format!("{}/demo/mcp", sidecar.url), CLIENTS).await;
    let (ok, failures) = rotate(&upstream, callers, |key| {
        write_atomically(&key_file, &format!("{key}\n"))
    })
    .await;
    report("standalone", &upstream, ok, &failures);
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_store_rotations_through_a_projected_volume_fail_no_call() {
    let upstream = Upstream::start("key-1").await;
    let dir = temp_dir("files");
    let cred = dir.join("demo");
    std::fs::create_dir_all(&cred).unwrap();
    let upstream_url = format!("{}/mcp", upstream.url);
    let files_of = |key: &str, version: u32| {
        [
            ("upstream", upstream_url.clone()),
            ("header.X-API-Key", key.to_owned()),
            ("version", version.to_string()),
        ]
    };
    let write = |generation: u32, key: &str| {
        let files = files_of(key, generation);
        let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
        project(&cred, generation, &files);
    };
    write(1, "key-1");
    let store = Store::new(["demo".to_owned()]);
    // The default poll interval (`MCP_SIDECAR_FILE_POLL_INTERVAL`).
    let task = tokio::spawn(files::run(store.clone(), dir.clone(), Duration::from_millis(250)));
    serving(&store, "key-1").await;
    let sidecar = common::sidecar_with_store(store).await;

    let callers = Callers::start(&format!("{}/demo/mcp", sidecar.url), CLIENTS).await;
    let (ok, failures) = rotate(&upstream, callers, |key| {
        let generation: u32 = key.trim_start_matches("key-").parse().unwrap();
        write(generation, key);
    })
    .await;
    report("files store", &upstream, ok, &failures);
    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

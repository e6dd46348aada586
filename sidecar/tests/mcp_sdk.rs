//! The official Rust MCP SDK (`rmcp`) on both sides of the sidecar: an rmcp Streamable HTTP server
//! behind a credential check, and an rmcp client talking to `http://127.0.0.1:<port>/<credential>/mcp`.
//! No test asserts on time: every wait is for an event (a notification, a recorded request).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{HeaderName, HeaderValue, StatusCode};
use rmcp::{
    ClientHandler, ClientLifecycleMode, ClientServiceExt, Peer, RoleClient, RoleServer, ServerHandler,
    ServiceExt,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{
        CallToolRequestParams, ClientConfig, ClientRequest, ProgressNotificationParam, ProtocolVersion,
        Request as McpRequest, RequestMetaObject, ServerCapabilities, ServerConfig,
    },
    schemars,
    service::{NotificationContext, PeerRequestOptions, RequestContext},
    tool, tool_handler, tool_router,
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
        streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        },
    },
};
use tokio::sync::{Notify, mpsc};

// ---- The upstream: an rmcp server behind a credential check ----------------------------------------

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SumRequest {
    a: i64,
    b: i64,
}

#[derive(Clone)]
struct Tools {
    release: Arc<Notify>,
    started: Arc<Notify>,
    cancelled: Arc<Notify>,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Tools {
    #[tool(description = "Add two numbers")]
    fn sum(&self, Parameters(SumRequest { a, b }): Parameters<SumRequest>) -> String {
        (a + b).to_string()
    }

    #[tool(description = "Report three progress steps, then wait until the test releases it")]
    async fn slow(
        &self,
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> Result<String, rmcp::ErrorData> {
        let token = meta
            .get_progress_token()
            .ok_or_else(|| rmcp::ErrorData::invalid_params("a progress token is required", None))?;
        for step in 1..=3 {
            let _ = client
                .notify_progress(ProgressNotificationParam::new(token.clone(), step as f64).with_total(3.0))
                .await;
        }
        self.release.notified().await;
        Ok("released".into())
    }

    #[tool(description = "Wait until the request is cancelled")]
    async fn wait_for_cancel(&self, context: RequestContext<RoleServer>) -> String {
        self.started.notify_one();
        context.ct.cancelled().await;
        self.cancelled.notify_one();
        "cancelled".into()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    headers: http::HeaderMap,
}

/// The upstream's credential check: only `accepted` API keys pass; every request is recorded.
#[derive(Clone, Default)]
struct Gate {
    accepted: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<Notify>,
}

impl Gate {
    fn accept_only(&self, key: &str) {
        *self.accepted.lock().unwrap() = vec![key.to_owned()];
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn check_credential(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    gate.seen.lock().unwrap().push(Seen {
        method: request.method().to_string(),
        headers: request.headers().clone(),
    });
    gate.arrived.notify_waiters();
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !gate.accepted.lock().unwrap().contains(&key) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", r#"Bearer error="invalid_token""#)],
        )
            .into_response();
    }
    next.run(request).await
}

struct Upstream {
    url: String,
    gate: Gate,
    tools: Tools,
}

async fn upstream(config: StreamableHttpServerConfig) -> Upstream {
    let tools = Tools {
        release: Arc::new(Notify::new()),
        started: Arc::new(Notify::new()),
        cancelled: Arc::new(Notify::new()),
        tool_router: Tools::tool_router(),
    };
    let gate = Gate::default();
    gate.accept_only("key-1");
    let handler = tools.clone();
    let service: StreamableHttpService<Tools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(handler.clone()), Default::default(), config);
    let app = Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            gate.clone(),
            check_credential,
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Upstream {
        url: format!("http://{addr}"),
        gate,
        tools,
    }
}

// ---- The sidecar ---------------------------------------------------------------------------------

mod common;
use common::{Sidecar, credential};

async fn sidecar(upstream: &Upstream) -> Sidecar {
    common::sidecar("demo", &upstream.url, "key-1").await
}

// ---- The client ----------------------------------------------------------------------------------

/// A client that forwards progress notifications to the test.
#[derive(Clone)]
struct ProgressClient {
    info: ClientConfig,
    progress: mpsc::UnboundedSender<f64>,
}

impl ClientHandler for ProgressClient {
    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
    async fn on_progress(&self, params: ProgressNotificationParam, _: NotificationContext<RoleClient>) {
        let _ = self.progress.send(params.progress);
    }
}

/// An rmcp client through the sidecar that also sends a credential of its own, which must not pass.
async fn connect(
    sidecar: &Sidecar,
    version: ProtocolVersion,
) -> (
    rmcp::service::RunningService<RoleClient, ProgressClient>,
    mpsc::UnboundedReceiver<f64>,
) {
    let config = StreamableHttpClientTransportConfig::with_uri(format!("{}/demo/mcp", sidecar.url))
        .auth_header("agent-token")
        .custom_headers(HashMap::from([(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("agent-key"),
        )]));
    let transport = StreamableHttpClientTransport::from_config(config);
    let mut info = ClientConfig::default();
    info.protocol_version = version.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = ProgressClient { info, progress: tx };
    // 2026-07-28 has no initialize: the client starts with server/discover.
    let client = if version == ProtocolVersion::V_2026_07_28 {
        let mode = ClientLifecycleMode::Discover {
            preferred_versions: vec![version],
        };
        handler.serve_with_lifecycle(transport, mode).await.unwrap()
    } else {
        handler.serve(transport).await.unwrap()
    };
    (client, rx)
}

fn sum_args(a: i64, b: i64) -> serde_json::Map<String, serde_json::Value> {
    serde_json::json!({ "a": a, "b": b }).as_object().unwrap().clone()
}

fn text(result: &rmcp::model::CallToolResult) -> String {
    serde_json::to_value(&result.content).unwrap()[0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

// ---- Tests ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_2026_client_calls_a_tool_with_the_sidecars_credential_and_its_mcp_headers() {
    let upstream = upstream(StreamableHttpServerConfig::default()).await;
    let sidecar = sidecar(&upstream).await;
    let (client, _) = connect(&sidecar, ProtocolVersion::V_2026_07_28).await;
    let result = client
        .call_tool(CallToolRequestParams::new("sum").with_arguments(sum_args(2, 3)))
        .await
        .unwrap();
    assert_eq!(text(&result), "5");

    let seen = upstream.gate.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(header(s, "x-api-key"), Some("key-1"), "{s:?}");
        assert_eq!(
            header(s, "authorization"),
            None,
            "the agent's token passed through: {s:?}"
        );
    }
    let call = seen
        .iter()
        .find(|s| header(s, "mcp-method") == Some("tools/call"))
        .unwrap_or_else(|| panic!("a tools/call request: {seen:#?}"));
    assert_eq!(header(call, "mcp-name"), Some("sum"));
    assert_eq!(header(call, "mcp-protocol-version"), Some("2026-07-28"));
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_2025_client_keeps_its_session_through_the_sidecar() {
    let upstream = upstream(StreamableHttpServerConfig::default()).await;
    let sidecar = sidecar(&upstream).await;
    let (client, _) = connect(&sidecar, ProtocolVersion::V_2025_11_25).await;
    for i in 0..3 {
        let r = client
            .call_tool(CallToolRequestParams::new("sum").with_arguments(sum_args(i, 1)))
            .await
            .unwrap();
        assert_eq!(text(&r), (i + 1).to_string());
    }
    client.cancel().await.unwrap();

    let seen = upstream.gate.seen();
    let sessions: Vec<&str> = seen.iter().filter_map(|s| header(s, "mcp-session-id")).collect();
    assert!(
        sessions.len() >= 4,
        "initialized notification and three calls carry the session: {seen:?}"
    );
    assert!(
        sessions.iter().all(|s| *s == sessions[0]),
        "one session throughout: {sessions:?}"
    );
    assert!(seen.iter().all(|s| header(s, "x-api-key") == Some("key-1")));
}

#[tokio::test]
async fn progress_events_arrive_before_the_stream_ends_and_a_rotation_does_not_cut_it() {
    let upstream = upstream(StreamableHttpServerConfig::default()).await;
    let sidecar = sidecar(&upstream).await;
    for version in [ProtocolVersion::V_2026_07_28, ProtocolVersion::V_2025_11_25] {
        let (client, mut progress) = connect(&sidecar, version.clone()).await;
        let handle = client
            .send_cancellable_request(
                ClientRequest::CallToolRequest(McpRequest::new(CallToolRequestParams::new("slow"))),
                PeerRequestOptions::no_options(),
            )
            .await
            .unwrap();
        // The tool is still running (it waits for `release`): these can only arrive if each event is
        // forwarded as the upstream writes it.
        for step in 1..=3 {
            assert_eq!(progress.recv().await, Some(step as f64), "{version:?}");
        }

        // Rotate while the stream is open: the upstream now refuses the old key for new requests.
        let next = format!("key-{version}");
        sidecar
            .store
            .set("demo", credential(&upstream.url, &next, &next, None));
        upstream.gate.accept_only(&next);
        upstream.tools.release.notify_one();
        let response = handle.await_response().await.unwrap();
        assert!(format!("{response:?}").contains("released"), "{response:?}");

        // The next request carries the new credential.
        let r = client
            .call_tool(CallToolRequestParams::new("sum").with_arguments(sum_args(1, 1)))
            .await
            .unwrap();
        assert_eq!(text(&r), "2");
        let last = upstream.gate.seen().last().cloned().unwrap();
        assert_eq!(header(&last, "x-api-key"), Some(next.as_str()));
        client.cancel().await.unwrap();
        // Back to the first key for the next protocol version.
        sidecar
            .store
            .set("demo", credential(&upstream.url, "key-1", "1b", None));
        upstream.gate.accept_only("key-1");
    }
}

#[tokio::test]
async fn an_expired_credential_is_refused_with_503_before_reaching_the_upstream() {
    let upstream = upstream(StreamableHttpServerConfig::default()).await;
    let sidecar = sidecar(&upstream).await;
    sidecar.store.set(
        "demo",
        credential(&upstream.url, "key-1", "2", Some("2001-02-03T04:05:06Z")),
    );
    sidecar.store.fail("demo", "token endpoint unreachable");
    let response = reqwest::Client::new()
        .post(format!("{}/demo/mcp", sidecar.url))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["credential"], "demo");
    assert_eq!(body["expiredAt"], "2001-02-03T04:05:06Z");
    assert_eq!(body["lastFailure"], "token endpoint unreachable");
    assert!(upstream.gate.seen().is_empty());

    // And the rmcp client gets an error, not a hang.
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{}/demo/mcp", sidecar.url)),
    );
    assert!(ClientConfig::default().serve(transport).await.is_err());
}

#[tokio::test]
async fn a_client_that_disconnects_mid_call_cancels_the_upstream_request() {
    for json_response in [false, true] {
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(json_response)
            // The upstream notices a closed SSE connection on its next write.
            .with_sse_keep_alive(Some(Duration::from_millis(100)));
        let upstream = upstream(config).await;
        let sidecar = sidecar(&upstream).await;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!("{}/demo/mcp", sidecar.url);
        let call = tokio::spawn(async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2025-03-26")
                .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"wait_for_cancel","arguments":{}}}"#)
                .send()
                .await;
            // Hold the (streaming) response open until the task is aborted.
            std::future::pending::<()>().await;
            drop(response);
        });
        upstream.tools.started.notified().await;
        call.abort();
        // Only an upstream that saw the connection close gets here.
        upstream.tools.cancelled.notified().await;
    }
}

#[tokio::test]
async fn resumption_headers_and_session_status_codes_pass_unchanged() {
    let upstream = upstream(StreamableHttpServerConfig::default()).await;
    let sidecar = sidecar(&upstream).await;
    let http = reqwest::Client::new();
    let url = format!("{}/demo/mcp", sidecar.url);
    // An unknown session: the upstream's 404 (not the sidecar's) reaches the client.
    let response = http
        .get(&url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", "no-such-session")
        .header("last-event-id", "0/7")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("x-mcp-credentials-error").is_none());
    let status = response.status();
    let seen = upstream.gate.seen();
    let get = seen
        .iter()
        .find(|s| s.method == "GET")
        .expect("the GET reached the upstream");
    assert_eq!(header(get, "last-event-id"), Some("0/7"));
    assert_eq!(header(get, "mcp-session-id"), Some("no-such-session"));
    assert!(status.is_client_error(), "{status}");
}

//! A small MCP server (official Rust SDK, Streamable HTTP) for trying the sidecar offline: it answers
//! only requests that carry `X-API-Key` equal to the key file's current content, and offers two
//! tools, `echo` and `count` (which streams progress notifications).
//!
//! `cargo run -p mcp-credentials-sidecar --example demo-upstream -- [<addr>] [<key-file>]`
//! (defaults: 127.0.0.1:8931, examples/standalone/secrets/demo-api-key/api-key).

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use rmcp::{
    Peer, RoleServer, ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{ProgressNotificationParam, RequestMetaObject, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoRequest {
    /// What to send back.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct CountRequest {
    /// How far to count, one progress notification per step.
    to: u32,
}

#[derive(Clone)]
struct Demo {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Demo {
    #[tool(description = "Send the text back")]
    fn echo(&self, Parameters(EchoRequest { text }): Parameters<EchoRequest>) -> String {
        text
    }

    #[tool(description = "Count to `to`, one progress notification every 200 ms")]
    async fn count(
        &self,
        Parameters(CountRequest { to }): Parameters<CountRequest>,
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> String {
        for step in 1..=to.min(100) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(token) = meta.get_progress_token() {
                let _ = client
                    .notify_progress(ProgressNotificationParam::new(token, step as f64).with_total(to as f64))
                    .await;
            }
        }
        format!("counted to {to}")
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Demo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("A demo MCP server behind an API key")
    }
}

/// The upstream's own credential check, as a real server would do it.
async fn require_key(State(key_file): State<Arc<PathBuf>>, request: Request, next: Next) -> Response {
    let expected = std::fs::read_to_string(&*key_file).unwrap_or_default();
    let sent = request.headers().get("x-api-key").and_then(|v| v.to_str().ok());
    if expected.trim().is_empty() || sent != Some(expected.trim()) {
        eprintln!(
            "demo-upstream: {} {} refused: wrong or missing X-API-Key",
            request.method(),
            request.uri()
        );
        return (http::StatusCode::UNAUTHORIZED, "missing or wrong X-API-Key\n").into_response();
    }
    next.run(request).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8931".into());
    let key_file = args
        .next()
        .unwrap_or_else(|| "examples/standalone/secrets/demo-api-key/api-key".into());
    let service: StreamableHttpService<Demo, LocalSessionManager> = StreamableHttpService::new(
        || {
            Ok(Demo {
                tool_router: Demo::tool_router(),
            })
        },
        Default::default(),
        // Stateless: a plain `curl` POST can call a tool without an initialize handshake first.
        StreamableHttpServerConfig::default().with_legacy_session_mode(false),
    );
    let app = Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(PathBuf::from(key_file)),
            require_key,
        ));
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("bind the demo upstream");
    eprintln!("demo-upstream: MCP server on http://{addr}/mcp");
    axum::serve(listener, app).await.expect("serve");
}

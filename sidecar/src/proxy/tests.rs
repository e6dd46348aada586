//! The proxy through `oneshot`, without a listening socket for the proxy itself. Requests that pass
//! every layer reach a small echo upstream on 127.0.0.1 that reports what it received.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, body::Body, extract::Request, response::IntoResponse};
use http::{StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::{
    credential::{Credential, fixtures::data},
    error::SIDECAR_ERROR_HEADER,
    proxy::forward::ClientSettings,
};

/// An upstream that answers with what it received, as JSON, and counts requests.
async fn echo_upstream() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(move |request: Request| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut headers = BTreeMap::<String, Vec<String>>::new();
            for (n, v) in request.headers() {
                headers
                    .entry(n.to_string())
                    .or_default()
                    .push(v.to_str().unwrap().to_owned());
            }
            let status = request
                .headers()
                .get("x-test-status")
                .map_or(200, |s| s.to_str().unwrap().parse().unwrap());
            let body = json!({
                "method": request.method().as_str(),
                "path": request.uri().path(),
                "query": request.uri().query(),
                "headers": headers,
            });
            (
                StatusCode::from_u16(status).unwrap(),
                [("x-upstream", "echo")],
                Json(body),
            )
                .into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

fn credential(upstream: &str, header: &str, value: &str, expires_at: Option<&str>) -> Credential {
    let mut d = data(upstream, header, value);
    if let Some(at) = expires_at {
        d.insert("expires-at".into(), at.as_bytes().to_vec());
    }
    Credential::from_data(&d).unwrap()
}

/// The proxy serving one credential, `name`.
fn serving(name: &str, credential: Credential) -> App {
    let store = Store::new([]);
    store.set(name, credential);
    app_with(store)
}

/// The proxy with `store`, as the sidecar assembles it.
fn app_with(store: Arc<Store>) -> App {
    let client = upstream_client(&ClientSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(30),
        extra_ca_file: None,
    })
    .unwrap();
    app(Proxy {
        store,
        client,
        metrics: Metrics::register(),
        max_header_bytes: 8192,
        header_read_timeout: std::time::Duration::from_secs(60),
        http1_fast_path: true,
    })
}

async fn send(app: &App, request: http::request::Builder) -> (StatusCode, http::HeaderMap, Value) {
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, json)
}

fn get(uri: &str) -> http::request::Builder {
    Request::builder().uri(uri)
}

#[tokio::test]
async fn an_unknown_credential_gets_404_listing_the_configured_ones() {
    let store = Store::new(["github".to_owned(), "slack".to_owned()]);
    let app = app_with(store);
    for uri in ["/jira/mcp", "/", "/favicon.ico"] {
        let (status, headers, body) = send(&app, get(uri)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(headers[SIDECAR_ERROR_HEADER], "unknown_credential");
        assert_eq!(body["credentials"], json!(["github", "slack"]), "{uri}");
    }
}

#[tokio::test]
async fn the_agents_credentials_are_stripped_and_the_current_one_attached() {
    let (upstream, _) = echo_upstream().await;
    let app = serving(
        "api",
        credential(&format!("{upstream}/mcp"), "X-API-Key", "the-real-key", None),
    );
    let (status, headers, body) = send(
        &app,
        get("/api/tools?x=1")
            .method("POST")
            .header("authorization", "Bearer agent-token")
            .header("cookie", "session=agent")
            .header("x-api-key", "agent-key")
            .header("x-api-key", "agent-key-2")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "hop")
            .header("mcp-protocol-version", "2025-11-25")
            .header("mcp-session-id", "s-1")
            .header("last-event-id", "42")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "search")
            .header("accept", "application/json, text/event-stream"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-upstream"], "echo");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/mcp/tools");
    assert_eq!(body["query"], "x=1");
    let h = &body["headers"];
    assert_eq!(h["x-api-key"], json!(["the-real-key"]));
    for gone in ["authorization", "cookie", "proxy-authorization", "x-private"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    for (name, value) in [
        ("mcp-protocol-version", "2025-11-25"),
        ("mcp-session-id", "s-1"),
        ("last-event-id", "42"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "search"),
        ("accept", "application/json, text/event-stream"),
    ] {
        assert_eq!(h[name], json!([value]), "{name}");
    }
}

#[tokio::test]
async fn every_method_gets_the_credential() {
    let (upstream, _) = echo_upstream().await;
    let app = serving(
        "gh",
        credential(&upstream, "Authorization", "Bearer current", None),
    );
    for method in ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"] {
        let (status, _, body) = send(
            &app,
            get("/gh/mcp")
                .method(method)
                .header("authorization", "Bearer agent"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{method}");
        assert_eq!(
            body["headers"]["authorization"],
            json!(["Bearer current"]),
            "{method}"
        );
    }
}

#[tokio::test]
async fn the_host_header_and_absolute_targets_cannot_choose_the_upstream() {
    let (upstream, hits) = echo_upstream().await;
    let app = serving(
        "gh",
        credential(&upstream, "Authorization", "Bearer current", None),
    );
    let authority = upstream.trim_start_matches("http://");

    let (status, _, body) = send(&app, get("/gh/x").header("host", "localhost:7007")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["headers"]["host"],
        json!([authority]),
        "the upstream's own Host is sent"
    );

    // DNS rebinding: a web page whose name resolves to 127.0.0.1 sends its own Host and Origin.
    for (name, value, error) in [
        ("host", "169.254.169.254", "foreign_host"),
        ("host", "evil.example:7007", "foreign_host"),
        ("origin", "https://evil.example", "foreign_origin"),
    ] {
        let (status, headers, _) = send(&app, get("/gh/x").header(name, value)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{name}: {value}");
        assert_eq!(headers[SIDECAR_ERROR_HEADER], error);
    }
    let (status, _, _) = send(&app, get("/gh/x").header("origin", "http://localhost:3000")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a page served from this machine may call the sidecar"
    );

    for target in [
        "http://169.254.169.254/gh/x",
        "http://127.0.0.1:1/latest/meta-data",
        "evil.example:443",
    ] {
        let method = if target.contains("://") { "GET" } else { "CONNECT" };
        let (status, headers, _) = send(&app, get(target).method(method)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{target}");
        assert_eq!(headers[SIDECAR_ERROR_HEADER], "not_a_forward_proxy");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "only the two loopback origin-form requests reached the upstream"
    );
}

#[tokio::test]
async fn paths_that_could_leave_the_upstream_path_never_reach_it() {
    let (upstream, hits) = echo_upstream().await;
    let app = serving(
        "gh",
        credential(
            &format!("{upstream}/mcp"),
            "Authorization",
            "Bearer current",
            None,
        ),
    );
    for uri in [
        "/gh/../admin",
        "/gh/%2e%2e/admin",
        "/gh/a%2F..%2F..%2Fadmin",
        "/gh/a%5c..",
        "/gh/./x",
    ] {
        let (status, headers, _) = send(&app, get(uri)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(headers[SIDECAR_ERROR_HEADER], "bad_path");
    }
    // `..` as the credential itself is just an unknown name.
    let (status, _, _) = send(&app, get("/../etc/passwd")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_expired_credential_is_never_attached() {
    let (upstream, hits) = echo_upstream().await;
    let store = Store::new([]);
    store.set(
        "gh",
        credential(
            &upstream,
            "Authorization",
            "Bearer old",
            Some("2020-01-02T03:04:05Z"),
        ),
    );
    store.fail("gh", "token endpoint answered 500");
    let app = app_with(store);
    let (status, headers, body) = send(&app, get("/gh/mcp").method("POST")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[SIDECAR_ERROR_HEADER], "credential_expired");
    assert_eq!(body["credential"], "gh");
    assert_eq!(body["expiredAt"], "2020-01-02T03:04:05Z");
    assert_eq!(body["lastFailure"], "token endpoint answered 500");
    assert!(!body.to_string().contains("Bearer old"));
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_credential_not_loaded_yet_gets_503_naming_it() {
    let store = Store::new(["gh".to_owned()]);
    let app = app_with(store);
    let (status, _, body) = send(&app, get("/gh/mcp")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "credential_unavailable");
    assert_eq!(body["credential"], "gh");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (upstream, hits) = echo_upstream().await;
    let app = serving(
        "gh",
        credential(&upstream, "Authorization", "Bearer current", None),
    );
    let (status, _, body) = send(&app, get("/gh/mcp").header("x-big", "a".repeat(9000))).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(body["error"], "headers_too_large");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn upstream_status_codes_pass_unchanged() {
    let (upstream, _) = echo_upstream().await;
    let app = serving(
        "gh",
        credential(&upstream, "Authorization", "Bearer current", None),
    );
    for code in [202, 400, 401, 403, 404, 405, 500] {
        let (status, headers, _) = send(&app, get("/gh/mcp").header("x-test-status", code.to_string())).await;
        assert_eq!(status.as_u16(), code);
        assert!(headers.get(SIDECAR_ERROR_HEADER).is_none());
    }
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_without_internals() {
    // A port nothing listens on: bind one, then close it.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let app = serving(
        "gh",
        credential(&format!("http://{addr}"), "Authorization", "Bearer current", None),
    );
    let (status, _, body) = send(&app, get("/gh/mcp")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["error"], "upstream_unreachable");
    assert!(!body.to_string().contains(&addr.port().to_string()), "{body}");
}

#[tokio::test]
async fn requests_are_counted_by_credential_and_status() {
    let (upstream, _) = echo_upstream().await;
    let store = Store::new([]);
    store.set(
        "gh",
        credential(&upstream, "Authorization", "Bearer current", None),
    );
    let metrics = Metrics::register();
    let client = upstream_client(&ClientSettings {
        connect_timeout: Duration::from_secs(5),
        pool_idle_timeout: Duration::from_secs(30),
        extra_ca_file: None,
    })
    .unwrap();
    let app = app(Proxy {
        store: store.clone(),
        client,
        metrics: metrics.clone(),
        max_header_bytes: 8192,
        header_read_timeout: std::time::Duration::from_secs(60),
        http1_fast_path: true,
    });
    send(&app, get("/gh/mcp")).await;
    send(
        &app,
        get("/gh/mcp").header("x-test-status", "401").header("x-x", "y"),
    )
    .await;
    send(&app, get("/nope")).await;
    let text = metrics.render(&store);
    assert!(
        text.contains(r#"mcp_credentials_sidecar_requests_total{credential="gh",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mcp_credentials_sidecar_requests_total{credential="",status="404"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"mcp_credentials_sidecar_upstream_rejections_total{credential="gh",reason="other"} 1"#
        )
    );
    assert!(text.contains("mcp_credentials_sidecar_credential_age_seconds{credential=\"gh\"}"));
    assert!(!text.contains("Bearer"));
    let _ = header::AUTHORIZATION;
}

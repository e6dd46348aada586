//! What a credential leaves behind, with the operator as a real process and an in-process token
//! endpoint whose answer each test sets (`invalid_grant`, a token, a one-second token):
//! - a deleted credential's metric series go (else its expiry alert fires forever), and one
//!   created again under the same name starts clean instead of inheriting `ReauthRequired`;
//! - the `invalid_grant` marker survives a restart: the dead refresh token is not redeemed again;
//! - a token that lives one second is renewed 10 s after issue at the earliest, and says so.
//!
//! Outcomes are asserted (conditions, series, request counts), never durations.

mod operator_support;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::credential::{Credential, OAuth2};
use operator_support::*;
use tokio::net::TcpListener;

/// What the token endpoint answers.
#[derive(Clone, Copy)]
enum Answer {
    InvalidGrant,
    /// An access token that lives this many seconds.
    Token(u64),
}

struct Endpoint {
    answer: Mutex<Answer>,
    requests: AtomicU64,
}

/// A token endpoint on loopback: its URL and its state.
async fn token_endpoint(answer: Answer) -> (String, Arc<Endpoint>) {
    let state = Arc::new(Endpoint {
        answer: Mutex::new(answer),
        requests: AtomicU64::new(0),
    });
    async fn token(State(e): State<Arc<Endpoint>>) -> Response {
        let n = e.requests.fetch_add(1, Ordering::SeqCst);
        let answer = *e.answer.lock().unwrap();
        match answer {
            Answer::InvalidGrant => (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "invalid_grant", "error_description": "revoked"})),
            )
                .into_response(),
            Answer::Token(ttl) => axum::Json(serde_json::json!({
                "access_token": format!("at-{n}"),
                "token_type": "Bearer",
                "expires_in": ttl,
            }))
            .into_response(),
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://127.0.0.1:{}/token", listener.local_addr().unwrap().port());
    let app = Router::new()
        .route("/token", post(token))
        .with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

fn refresh_credential(name: &str, token_url: &str) -> String {
    let source = OAuth2::rt_client().token_url(token_url);
    Credential::new(name, "http://127.0.0.1:7001/mcp", source).yaml()
}

/// The series of the operator's metrics that name credential `name`.
fn series_of(text: &str, name: &str) -> Vec<String> {
    let label = format!(r#"name="{name}""#);
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_credential_leaves_no_series_and_one_created_again_starts_clean() {
    let (cp, ns) = setup("left-delete");
    let (url, endpoint) = token_endpoint(Answer::InvalidGrant).await;
    create_secret(
        cp,
        &ns,
        "login",
        &[("client-secret", "s"), ("refresh-token", "rt-1")],
    );
    apply(cp, &ns, &refresh_credential("notion", &url));
    let op = Operator::start(cp, &ns, "a", &[]);
    let creds: Api<McpCredential> = Api::namespaced(client(cp).await, &ns);
    wait_condition(&creds, "notion", "ReauthRequired", "True", Some("InvalidGrant")).await;
    wait_for("the credential's series", || async {
        let text = op.metrics().await;
        (!series_of(&text, "notion").is_empty()).then_some(())
    })
    .await;

    creds.delete("notion", &DeleteParams::default()).await.unwrap();
    wait_for("the deleted credential's series to go", || async {
        let text = op.metrics().await;
        (!text.is_empty() && series_of(&text, "notion").is_empty()).then_some(())
    })
    .await;

    // The server is fixed; the user creates the credential again, with the same inputs.
    *endpoint.answer.lock().unwrap() = Answer::Token(300);
    let before = endpoint.requests.load(Ordering::SeqCst);
    apply(cp, &ns, &refresh_credential("notion", &url));
    let cred = wait_condition(&creds, "notion", "Ready", "True", Some("CredentialValid")).await;
    assert_ne!(
        condition(&cred, "ReauthRequired").map(|c| c.0).as_deref(),
        Some("True"),
        "the new credential inherited ReauthRequired"
    );
    assert!(endpoint.requests.load(Ordering::SeqCst) > before);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_a_dead_refresh_token_is_not_redeemed_again() {
    let (cp, ns) = setup("left-restart");
    let (dead_url, dead) = token_endpoint(Answer::InvalidGrant).await;
    let (live_url, _live) = token_endpoint(Answer::Token(300)).await;
    create_secret(
        cp,
        &ns,
        "login",
        &[("client-secret", "s"), ("refresh-token", "rt-1")],
    );
    apply(cp, &ns, &refresh_credential("notion", &dead_url));
    let mut op = Operator::start(cp, &ns, "a", &[]);
    let creds: Api<McpCredential> = Api::namespaced(client(cp).await, &ns);
    let cred = wait_condition(&creds, "notion", "ReauthRequired", "True", Some("InvalidGrant")).await;
    assert!(
        cred.status.as_ref().unwrap().invalid_grant_inputs.is_some(),
        "the marker is in the status"
    );
    op.kill();
    drop(op);
    let redeemed = dead.requests.load(Ordering::SeqCst);
    assert_eq!(redeemed, 1, "one attempt before the restart");

    let op = Operator::start(cp, &ns, "b", &[]);
    // A credential created after the restart is reconciled after the existing one was (the
    // watch's first list comes first): once it is Ready, the restarted operator has seen both.
    apply(cp, &ns, &refresh_credential("linear", &live_url));
    wait_condition(&creds, "linear", "Ready", "True", Some("CredentialValid")).await;
    // Both were in the first list; give the other reconcile a moment to have happened (before the
    // fix it tried at once), then look.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let refreshes = op.metrics().await;
    assert_eq!(
        metric_value(
            &refreshes,
            r#"mcp_credentials_refreshes_total{result="invalid_grant"}"#
        ),
        0.0,
        "the restarted operator tried the dead refresh token again"
    );
    assert_eq!(
        dead.requests.load(Ordering::SeqCst),
        redeemed,
        "token requests with the dead token"
    );
    let cred = creds.get("notion").await.unwrap();
    assert_eq!(condition(&cred, "ReauthRequired").unwrap().0, "True");

    // A new refresh token in the Secret clears the marker.
    let out = cp.kubectl(&[
        "-n",
        &ns,
        "patch",
        "secret",
        "login",
        "--type=merge",
        "-p",
        r#"{"stringData":{"refresh-token":"rt-2"}}"#,
    ]);
    assert!(out.success, "{}", out.stderr);
    wait_for("a try with the new refresh token", || async {
        (dead.requests.load(Ordering::SeqCst) > redeemed).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_lives_one_second_is_renewed_ten_seconds_after_issue_and_says_so() {
    let (cp, ns) = setup("left-short");
    let (url, endpoint) = token_endpoint(Answer::Token(1)).await;
    create_secret(
        cp,
        &ns,
        "login",
        &[("client-secret", "s"), ("refresh-token", "rt-1")],
    );
    apply(cp, &ns, &refresh_credential("blink", &url));
    let _op = Operator::start(cp, &ns, "a", &[]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let cred = wait_for("a ShortLifetime reason", || async {
        let c = creds.get("blink").await.ok()?;
        let (_, reason, message) = condition(&c, "Ready")?;
        (reason == "ShortLifetime").then_some((c, message))
    })
    .await;
    let (cred, message) = cred;
    assert!(message.contains("lives only 1s"), "{message}");
    let status = cred.status.unwrap();
    let (issued, renewal) = (
        status.not_before.unwrap().0.as_second(),
        status.renewal_time.unwrap().0.as_second(),
    );
    assert!(
        renewal - issued >= 10,
        "renewal {renewal} only {}s after issue",
        renewal - issued
    );
    // Two renewals: each one a single token request, never one per second.
    let first = status.credential_version.unwrap();
    wait_for("a renewal", || async {
        let v = creds.get("blink").await.ok()?.status?.credential_version?;
        (v != first).then_some(v)
    })
    .await;
    let issued_between = {
        let s = creds.get("blink").await.unwrap().status.unwrap();
        s.not_before.unwrap().0.as_second() - issued
    };
    assert!(
        issued_between >= 10,
        "renewed {issued_between}s after the previous issue"
    );
    assert!(
        endpoint.requests.load(Ordering::SeqCst) <= 3,
        "{} token requests for two credentials",
        endpoint.requests.load(Ordering::SeqCst)
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, &ns);
    let warned = wait_for("a ShortLifetime event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ShortLifetime"))
    })
    .await;
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
}

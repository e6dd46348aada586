//! Sidecar reports end to end: the real API server, the operator process (serving `/v1/report` on
//! its webhook listener), the sidecar process in its Kubernetes watch mode and the real OAuth server.
//! An upstream that rejects a credential with 401 `invalid_token` makes the sidecar report it with
//! its service-account token (from the TokenRequest API); the operator checks the token with a
//! TokenReview and the access policy and refreshes; the sidecar replays and the client sees 200.
//! A second report within the rate-limit window gets 429, a service account outside the access policy
//! 403, a bad token 401; none of them causes a refresh.

mod operator_support;

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, OAuth2},
};
use operator_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that rejects the first bearer token it sees (and only that one) with 401
/// `invalid_token`, as a server does after revoking a token; it records every token it was sent.
async fn revoking_upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    rejecting_upstream(
        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer error=\"invalid_token\"\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
}

/// An upstream that answers the first bearer token it sees (and only that one) with `rejection`;
/// it records every token it was sent.
async fn rejecting_upstream(rejection: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let tokens = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then as many body bytes as Content-Length says.
                let (head_end, length) = loop {
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (end + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let token = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("authorization")
                            .then(|| value.trim().to_owned())
                    })
                    .unwrap_or_default();
                let rejected = {
                    let mut seen = tokens.lock().unwrap();
                    seen.push(token.clone());
                    seen[0] == token
                };
                let response = if rejected {
                    rejection.to_owned()
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\
                     connection: close\r\n\r\n{\"ok\":true}"
                        .to_owned()
                };
                let _ = tcp.write_all(response.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (port, seen)
}

/// A token of service account `name` from the TokenRequest API (`kubectl create token`).
fn service_account_token(cp: &ControlPlane, ns: &str, name: &str) -> String {
    let out = cp.kubectl(&["create", "serviceaccount", name, "-n", ns]);
    assert!(out.success, "{}", out.stderr);
    let token = cp.kubectl(&["create", "token", name, "-n", ns, "--duration=1h"]);
    assert!(token.success, "{}", token.stderr);
    token.stdout.trim().to_owned()
}

/// The sidecar as its own process, watching the credential's Secret as service account `agent`.
struct Sidecar {
    child: Child,
    port: u16,
    admin_port: u16,
    log: std::path::PathBuf,
}

impl Sidecar {
    fn start(cp: &ControlPlane, ns: &str, token: &str, report_url: &str, ca_pem: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mcp-sidecar-report-{ns}"));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let log = dir.join("sidecar.log");
        let child = Command::new(workspace_binary("mcp-credentials-sidecar"))
            .env("KUBECONFIG", kubeconfig_with_token(cp, token, &format!("agent-{ns}")))
            .env("MCP_SIDECAR_NAMESPACE", ns)
            .env("MCP_SIDECAR_CREDENTIALS", "github")
            .env("MCP_SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
            .env("MCP_SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("MCP_SIDECAR_REPORT_URL", report_url)
            .env("MCP_SIDECAR_REPORT_CA", ca_pem)
            .env("MCP_SIDECAR_REPORT_TOKEN_FILE", &token_file)
            // The machine is shared and noisy: a generous bound instead of the 2 s default, so the
            // test checks the behaviour, not the speed.
            .env("MCP_SIDECAR_REPLAY_WAIT", "60s")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the sidecar");
        Self {
            child,
            port,
            admin_port,
            log,
        }
    }

    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that trusts the operator's test CA.
fn operator_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

fn secret_version(s: &Secret) -> String {
    data(s, "version").expect("a version")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_credential_is_reported_refreshed_and_the_request_replayed() {
    let (cp, ns) = setup("report");
    let oauth = OAuthServer::start(0, 3600);
    create_secret(cp, &ns, "idp", &[("secret", "cc-basic-secret")]);
    let (upstream_port, seen) = revoking_upstream().await;
    let upstream = format!("http://127.0.0.1:{upstream_port}/mcp");
    apply(
        cp,
        &ns,
        &Credential::new(
            "github",
            &upstream,
            OAuth2::cc_basic().token_url(&oauth.token_url()),
        )
        .service_accounts(&["agent"])
        .yaml(),
    );
    let agent_token = service_account_token(cp, &ns, "agent");
    let intruder_token = service_account_token(cp, &ns, "intruder");

    // The operator serves reports on its webhook listener, with a certificate of a test CA.
    let dir = std::env::temp_dir().join(format!("mcp-report-certs-{ns}"));
    let WebhookOperator {
        operator: op,
        listen,
        ca_pem,
    } = WebhookOperator::start(
        cp,
        &ns,
        "a",
        &dir,
        // A window no test run outlasts, so the rate limit below does not depend on timing.
        &["--report-min-interval", "3600"],
    );
    let report_url = format!("https://{listen}/v1/report");
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    wait_condition(&creds, "github", "Ready", "True", None).await;
    let first = secret_version(&secrets.get("github-mcp-credential").await.unwrap());

    let sidecar = Sidecar::start(cp, &ns, &agent_token, &report_url, &ca_pem);
    let readyz = format!("http://127.0.0.1:{}/readyz", sidecar.admin_port);
    wait_for("the sidecar to be ready", || async {
        let r = reqwest::get(&readyz).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    // The upstream rejects the first credential: report, refresh, replay; the client sees 200.
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/github/mcp", sidecar.port))
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "sidecar log:\n{}\noperator log:\n{}",
        sidecar.log_text(),
        op.log_text()
    );
    assert_eq!(response.text().await.unwrap(), r#"{"ok":true}"#);
    let tokens = seen.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2, "one rejected request and one replay");
    assert_ne!(tokens[0], tokens[1], "the replay carries the refreshed token");

    let cred = creds.get("github").await.unwrap();
    let requested =
        cred.metadata.annotations.clone().unwrap_or_default()["mcpcredentials.dev/refresh-requested-at"]
            .clone();
    let second = secret_version(&secrets.get("github-mcp-credential").await.unwrap());
    assert_ne!(first, second, "the operator published a new credential");
    assert_eq!(
        op.metric(r#"mcp_credentials_reports_total{result="refresh_requested"}"#)
            .await,
        1.0
    );
    assert!(
        sidecar
            .metrics()
            .await
            .contains(r#"mcp_credentials_sidecar_reports_total{credential="github",result="accepted"} 1"#),
        "{}",
        sidecar.metrics().await
    );
    let events = cp.kubectl(&["get", "events", "-n", &ns, "-o", "json"]);
    assert!(events.success, "{}", events.stderr);
    assert!(
        events.stdout.contains("RefreshRequested")
            && events
                .stdout
                .contains("refresh requested by service account agent: the upstream answered invalid_token"),
        "{}",
        events.stdout
    );

    // Another report on the new version, inside the window: 429, and nothing is refreshed.
    let operator = operator_client(&ca_pem);
    let report = serde_json::json!({
        "namespace": ns, "credential": "github", "reason": "invalid_token", "version": second,
    });
    let limited = operator
        .post(&report_url)
        .bearer_auth(&agent_token)
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));

    // A service account the access policy does not name is refused, and nothing is refreshed.
    let refused = operator
        .post(&report_url)
        .bearer_auth(&intruder_token)
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let message = refused.json::<serde_json::Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains(&format!("{ns}/intruder")) && message.contains(&format!("{ns}/github")),
        "{message}"
    );
    // Without a valid token at all: 401.
    let anonymous = operator
        .post(&report_url)
        .bearer_auth("not-a-token")
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        op.metric(r#"mcp_credentials_reports_total{result="forbidden"}"#)
            .await,
        1.0
    );
    assert_eq!(
        op.metric(r#"mcp_credentials_reports_total{result="rate_limited"}"#)
            .await,
        1.0
    );
    let cred = creds.get("github").await.unwrap();
    assert_eq!(
        cred.metadata.annotations.unwrap_or_default()["mcpcredentials.dev/refresh-requested-at"],
        requested,
        "a rate-limited or refused report requests no refresh"
    );
    assert_eq!(
        secret_version(&secrets.get("github-mcp-credential").await.unwrap()),
        second
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// Step-up (SEP-2350) in a cluster: a signed-in credential (here the access token of a sign-in
/// that gave no refresh token, as the sign-in Secret holds it) that its upstream answers 403
/// `insufficient_scope, scope="mcp:basic mcp:write"`. The sidecar reports it with the challenged
/// scopes; the operator records the step-up (the union with the granted `mcp:basic`) in the
/// sign-in Secret, where `kubectl mcpcred login` reads it, and the credential says in
/// `ReauthRequired` that more consent is needed and what to run, while it stays Ready. More 403s
/// before the sign-in are the same step-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_403_insufficient_scope_records_a_step_up_and_the_condition_names_the_login_command() {
    let (cp, ns) = setup("stepup");
    let (upstream_port, seen) = rejecting_upstream(
        "HTTP/1.1 403 Forbidden\r\nwww-authenticate: Bearer error=\"insufficient_scope\", \
         scope=\"mcp:basic mcp:write\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let upstream = format!("http://127.0.0.1:{upstream_port}/mcp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let held = format!(
        r#"{{"accessToken":"held-access-token","issuedAt":{now},"expiresAt":{}}}"#,
        now + 3600
    );
    let registration = r#"{"http://127.0.0.1:9":{"client_id":"c","method":"preRegistered","scope":"mcp:basic","signed_in_at":"2026-12-04T00:00:00Z"}}"#;
    create_secret(
        cp,
        &ns,
        "github-sign-in",
        &[("access-token", &held), ("registration", registration)],
    );
    apply(
        cp,
        &ns,
        &Credential::new(
            "github",
            &upstream,
            OAuth2::authorization_code("c").token_url("http://127.0.0.1:9/token"),
        )
        .service_accounts(&["agent"])
        .yaml(),
    );
    let agent_token = service_account_token(cp, &ns, "agent");
    let dir = std::env::temp_dir().join(format!("mcp-report-certs-{ns}"));
    let WebhookOperator {
        operator: op,
        listen,
        ca_pem,
    } = WebhookOperator::start(cp, &ns, "a", &dir, &[]);
    let report_url = format!("https://{listen}/v1/report");
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    wait_condition(&creds, "github", "Ready", "True", None).await;

    let sidecar = Sidecar::start(cp, &ns, &agent_token, &report_url, &ca_pem);
    let readyz = format!("http://127.0.0.1:{}/readyz", sidecar.admin_port);
    wait_for("the sidecar to be ready", || async {
        let r = reqwest::get(&readyz).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // The agent gets the upstream's 403: no refresh cures it.
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/github/mcp", sidecar.port))
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "sidecar log:\n{}", sidecar.log_text());
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|t| t == "Bearer held-access-token")
    );

    let cred = wait_condition(
        &creds,
        "github",
        "ReauthRequired",
        "True",
        Some("MoreConsentRequired"),
    )
    .await;
    let (_, _, message) = condition(&cred, "ReauthRequired").unwrap();
    assert!(
        message.contains(&format!("run kubectl mcpcred login github -n {ns}"))
            && message.contains(r#""mcp:basic mcp:write""#),
        "{message}\noperator log:\n{}",
        op.log_text()
    );
    assert_eq!(
        condition(&cred, "Ready").unwrap().0,
        "True",
        "what was granted is still served"
    );
    let sign_in = secrets.get("github-sign-in").await.unwrap();
    let step_up: serde_json::Value =
        serde_json::from_str(&data(&sign_in, "step-up").expect("a step-up")).unwrap();
    assert_eq!(step_up["scope"], "mcp:basic mcp:write");
    assert_eq!(step_up["pending"], true);
    // Another 403 before anyone signed in is the same step-up: not another attempt.
    let version = secret_version(&secrets.get("github-mcp-credential").await.unwrap());
    let again = operator_client(&ca_pem)
        .post(&report_url)
        .bearer_auth(&agent_token)
        .json(&serde_json::json!({
            "namespace": ns, "credential": "github", "reason": "insufficient_scope", "version": version,
            "scope": "mcp:write mcp:basic",
        }))
        .send()
        .await
        .unwrap();
    assert!(
        again.status().is_success() || again.status() == 429,
        "{}",
        again.status()
    );
    let sign_in = secrets.get("github-sign-in").await.unwrap();
    let step_up: serde_json::Value = serde_json::from_str(&data(&sign_in, "step-up").unwrap()).unwrap();
    assert_eq!(
        step_up["attempts"]["mcp:basic mcp:write"], 1,
        "the second 403 is the same step-up"
    );
    let events = cp.kubectl(&["get", "events", "-n", &ns, "-o", "json"]);
    assert!(events.stdout.contains("StepUpRequested"), "{}", events.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

//! Sign-in end to end, every part real: the independent OAuth server (oidc-provider) with its own
//! login and consent pages, dynamic client registration and rotating refresh tokens; an MCP server
//! from the official Rust SDK that demands a JWT for its own audience and publishes RFC 9728
//! metadata; `mcp-credentials-sidecar login` with Debian's Chromium (headless, driven by
//! Playwright) as the person's browser; the standalone sidecar serving MCP clients afterwards.

mod e2e_support;
mod operator_support;

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use e2e_support::*;
use mcp_credentials_e2e::{
    credential::{Credential, OAuth2},
    repo_root,
};
use operator_support::wait_for;

/// Short tokens, so that the test outlives several of them; 15 s, not less: renewals are never
/// sooner than 10 s after issue (core's `timing::MIN_RENEWAL_INTERVAL`), so a 10 s token was renewed
/// at its expiry and a call at that moment got a 503.
const TOKEN_TTL: u64 = 15;
const NAME: &str = "notes";

/// The whole McpCredential a person writes for a server that supports the MCP authorization spec.
fn credential(upstream: &str) -> String {
    Credential::new(NAME, upstream, OAuth2::sign_in()).yaml()
}

/// Runs `login` with Chromium as the browser (`--deny`: the person refuses consent).
fn login(file: &Path, secrets: &Path, browser_args: &str) -> Output {
    let browser = format!(
        "python3 {} {browser_args}",
        repo_root().join("tests/browser/sign-in.py").display()
    );
    Command::new(sidecar_binary())
        .args([
            "login".as_ref(),
            NAME.as_ref(),
            file.as_os_str(),
            secrets.as_os_str(),
        ])
        .args(["--browser-command", &browser])
        .env("MCP_SIDECAR_DISCOVERY_ALLOW_LOOPBACK", "true")
        .output()
        .expect("run mcp-credentials-sidecar login")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn setup(name: &str) -> (PathBuf, OAuth, McpServer, PathBuf, PathBuf) {
    let dir = run_dir(name);
    let oauth = OAuth::start_sign_in(&dir, TOKEN_TTL);
    let server = McpServer::start(&oauth, &dir).await;
    let file = dir.join("credentials.yaml");
    std::fs::write(&file, credential(&server.url)).unwrap();
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    (dir, oauth, server, file, secrets)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_signs_in_once_in_chromium_and_agents_use_the_server_for_more_than_three_token_lifetimes() {
    let (dir, _oauth, _server, file, secrets) = setup("sign-in").await;
    let sidecar = Standalone::start_allowing_loopback_discovery(NAME, &file, &secrets, &dir);

    // Before the sign-in: the agent's request says what to run, and so does the status page.
    let body: serde_json::Value = wait_for("the sidecar to say the credential needs a sign-in", || async {
        let r = reqwest::Client::new()
            .post(&sidecar.url)
            .body("{}")
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.ok()?;
        (status == 503 && body["lastFailure"].as_str()?.contains("a person must sign in")).then_some(body)
    })
    .await;
    let failure = body["lastFailure"].as_str().unwrap();
    let command = format!(
        "mcp-credentials-sidecar login {NAME} {} {}",
        file.display(),
        secrets.display()
    );
    assert!(failure.contains(&command), "{failure}");
    let page = reqwest::get(format!("{}/status", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("needs sign-in") && page.contains(&command),
        "{page}"
    );

    // The sign-in: Chromium through oidc-provider's login and consent pages to the listener.
    let out = login(&file, &secrets, "");
    assert!(
        out.status.success(),
        "login failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    let stored = secrets.join(format!("{NAME}-sign-in"));
    for key in ["refresh-token", "registration"] {
        let mode = std::fs::metadata(stored.join(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let registration: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stored.join("registration")).unwrap()).unwrap();
    let (issuer, client) = registration.as_object().unwrap().iter().next().unwrap();
    assert_eq!(issuer, &_oauth.issuer());
    assert_eq!(client["method"], "dynamic");

    // The running sidecar picks it up without a restart, and agents call tools for a while.
    wait_for("the sidecar to serve the signed-in credential", || async {
        reqwest::get(format!("{}/readyz", sidecar.admin))
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    let session = connect(&sidecar.url).await.unwrap();
    let mut refresh_tokens = BTreeSet::new();
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(TOKEN_TTL * 7 / 2) {
        call_sum(&session, calls).await.unwrap();
        calls += 1;
        refresh_tokens.insert(std::fs::read_to_string(stored.join("refresh-token")).unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every renewal rotated the refresh token, and the rotated one was written back each time.
    assert!(
        refresh_tokens.len() >= 4,
        "{} distinct refresh tokens over {calls} calls",
        refresh_tokens.len()
    );
    let page = reqwest::get(format!("{}/status", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<td>ready</td>"), "{page}");
    for t in &refresh_tokens {
        assert!(!page.contains(t.as_str()), "the status page never shows a secret");
    }
}

/// The standalone status page's "Sign in" button, pressed in Chromium: the sidecar runs the sign-in
/// itself, the browser goes through oidc-provider's pages to its loopback listener, and the
/// credential is served; no `login` command is run.
#[tokio::test(flavor = "multi_thread")]
async fn a_person_signs_in_with_the_status_page_button_in_chromium() {
    let (dir, _oauth, _server, file, secrets) = setup("sign-in-page").await;
    let sidecar = Standalone::start_allowing_loopback_discovery(NAME, &file, &secrets, &dir);
    wait_for("the status page to offer a sign-in", || async {
        let page = reqwest::get(format!("{}/status", sidecar.admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (page.contains("needs sign-in") && page.contains("<button>Sign in</button>")).then_some(())
    })
    .await;
    let out = Command::new("python3")
        .arg(repo_root().join("tests/browser/sign-in.py"))
        .args(["--status-page", &format!("{}/status", sidecar.admin)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the browser sign-in failed: {}\n{}",
        text(&out.stderr),
        std::fs::read_to_string(dir.join("logs").join("sidecar.log")).unwrap_or_default()
    );
    wait_for("the sidecar to serve the signed-in credential", || async {
        reqwest::get(format!("{}/readyz", sidecar.admin))
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    let session = connect(&sidecar.url).await.unwrap();
    call_sum(&session, 1).await.unwrap();
    let mode = std::fs::metadata(secrets.join(format!("{NAME}-sign-in")).join("refresh-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread")]
async fn consent_denied_in_the_browser_stores_nothing_and_says_what_to_do() {
    let (_dir, _oauth, _server, file, secrets) = setup("sign-in-denied").await;
    let out = login(&file, &secrets, "--deny");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("access_denied") && stderr.contains("run the command again"),
        "{stderr}"
    );
    assert!(
        !secrets
            .join(format!("{NAME}-sign-in"))
            .join("refresh-token")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn login_for_an_unknown_or_non_sign_in_credential_names_the_fix() {
    let (_dir, _oauth, server, file, secrets) = setup("sign-in-bad").await;
    let out = Command::new(sidecar_binary())
        .args([
            "login".as_ref(),
            "nope".as_ref(),
            file.as_os_str(),
            secrets.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(r#"has no McpCredential named "nope" (it has: notes)"#),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        &file,
        credential(&server.url).replace("authorizationCode", "clientCredentials\n      clientId: x"),
    )
    .unwrap();
    let out = login(&file, &secrets, "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("set spec.source.oauth2.grant to authorizationCode"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        std::fs::read_dir(&secrets).unwrap().next().is_none(),
        "nothing stored"
    );
}

//! `kubectl mcpcred` end to end, every part real: the API server, the operator process, the
//! independent OAuth server (oidc-provider) with its login and consent pages and rotating refresh
//! tokens, an MCP server from the official Rust SDK that demands a JWT for its own audience, Debian's
//! Chromium (headless, driven by Playwright) as the person's browser, and the `kubectl-mcpcred`
//! binary of this workspace run with the person's own kubeconfig (a service account's token bound
//! to a Role, so the API server's RBAC decides what the person may write).

mod e2e_support;
mod operator_support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use e2e_support::{McpServer, OAuth, SidecarProcess, call_sum, connect, run_dir};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, OAuth2},
    repo_root,
};
use operator_support::{
    Operator, WebhookOperator, apply, client, condition, data, jwt_payload, kubeconfig_with_token, setup,
    wait_condition, wait_for, workspace_binary,
};

/// Short tokens, so that the operator renews (and rotates the refresh token) within the test; not
/// under 15 s, or the renewal floor (10 s after issue) would leave it expired part of the time.
const TOKEN_TTL: u64 = 15;
const NAME: &str = "notes";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `kubectl-mcpcred` binary, as kubectl runs a plugin (`kubectl mcpcred ...`).
fn plugin() -> PathBuf {
    workspace_binary("kubectl-mcpcred")
}

/// A person: service account `who` of `ns` bound to a Role allowing `rules` (`verbs`, `resource`
/// pairs in kubectl's syntax), and a kubeconfig with its token.
fn person(cp: &ControlPlane, ns: &str, who: &str, rules: &[(&str, &str)]) -> PathBuf {
    let out = cp.kubectl(&["create", "serviceaccount", who, "-n", ns]);
    assert!(out.success, "{}", out.stderr);
    for (i, (verbs, resource)) in rules.iter().enumerate() {
        let role = format!("{who}-{i}");
        let (verb, resource) = (format!("--verb={verbs}"), format!("--resource={resource}"));
        let out = cp.kubectl(&["create", "role", &role, "-n", ns, &verb, &resource]);
        assert!(out.success, "{}", out.stderr);
        let (r, sa) = (format!("--role={role}"), format!("--serviceaccount={ns}:{who}"));
        let out = cp.kubectl(&["create", "rolebinding", &role, "-n", ns, &r, &sa]);
        assert!(out.success, "{}", out.stderr);
    }
    let token = cp.kubectl(&["create", "token", who, "-n", ns, "--duration=1h"]);
    assert!(token.success, "{}", token.stderr);
    kubeconfig_with_token(cp, token.stdout.trim(), &format!("{who}-{ns}"))
}

/// What a person needs to sign a credential in: read it, read and write its sign-in Secret.
const SIGNER: &[(&str, &str)] = &[
    ("get,list", "mcpcredentials.mcpcredentials.dev"),
    ("get,create,patch", "secrets"),
];

/// Runs `kubectl mcpcred <args>` as the person of `kubeconfig`, with `browser` as the browser.
fn mcpcred(kubeconfig: &Path, args: &[&str], browser: &str) -> Output {
    Command::new(plugin())
        .args(args)
        .args(["--browser-command", browser])
        .env("KUBECONFIG", kubeconfig)
        .env("MCPCRED_DISCOVERY_ALLOW_LOOPBACK", "true")
        .output()
        .expect("run kubectl-mcpcred")
}

/// Chromium through oidc-provider's login and consent pages to the plugin's loopback listener.
fn chromium() -> String {
    format!(
        "python3 {}",
        repo_root().join("tests/browser/sign-in.py").display()
    )
}

/// Runs `kubectl mcpcred status -n <ns>` and returns its stdout.
fn status(kubeconfig: &Path, ns: &str) -> String {
    let out = Command::new(plugin())
        .args(["status", "-n", ns])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run kubectl-mcpcred status");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The command a condition message names: `kubectl mcpcred login <name> -n <ns>`, as arguments
/// of the plugin (what follows `kubectl mcpcred`).
fn named_command(message: &str) -> Vec<String> {
    let at = message
        .find("kubectl mcpcred login")
        .unwrap_or_else(|| panic!("no command in {message:?}"));
    message[at..]
        .split_whitespace()
        .skip(2)
        .take(4)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_alphanumeric() && c != '-')
                .to_owned()
        })
        .collect()
}

/// The bearer token of the credential's Secret (`header.Authorization`).
fn bearer(s: &Secret) -> String {
    data(s, "header.Authorization")
        .expect("an Authorization header")
        .strip_prefix("Bearer ")
        .expect("a bearer token")
        .to_owned()
}

/// Whether `token` is the live refresh token of its chain at `oauth` (not consumed by a rotation).
async fn refresh_token_is_live(oauth: &OAuth, token: &str) -> bool {
    let url = reqwest::Url::parse_with_params(
        &format!("{}/test/refresh-token-status", oauth.issuer()),
        [("token", token)],
    )
    .unwrap();
    let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    v["found"] == true && v["consumed"] == false
}

/// Waits until the credential is Ready and asks for no sign-in (`ReauthRequired` false or absent).
async fn signed_in(creds: &Api<McpCredential>) -> McpCredential {
    wait_for("the credential to be Ready without ReauthRequired", || async {
        let c = creds.get(NAME).await.ok()?;
        let ready = condition(&c, "Ready")?.0 == "True";
        let reauth = condition(&c, "ReauthRequired").is_some_and(|r| r.0 == "True");
        (ready && !reauth).then_some(c)
    })
    .await
}

/// A fresh sign-in credential asks for the exact command; running it as a person with the RBAC to
/// write the sign-in Secret (Chromium as the browser) stores the refresh token, the operator turns
/// the credential Ready, agents call the MCP server through the sidecar, and the operator, the
/// single writer from then on, rotates the refresh token in the sign-in Secret.
#[tokio::test(flavor = "multi_thread")]
async fn the_command_the_condition_names_signs_in_and_the_operator_takes_over() {
    let (cp, ns) = setup("mcpcred-login");
    let dir = run_dir(&format!("mcpcred-login-{ns}"));
    let oauth = OAuth::start_sign_in(&dir, TOKEN_TTL);
    let server = McpServer::start(&oauth, &dir).await;
    apply(
        cp,
        &ns,
        &Credential::new(NAME, &server.url, OAuth2::sign_in()).yaml(),
    );
    let op = Operator::start(cp, &ns, "a", &["--discovery-allow-loopback"]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let alice = person(cp, &ns, "alice", SIGNER);

    let cred = wait_condition(&creds, NAME, "ReauthRequired", "True", Some("SignInRequired")).await;
    let (_, _, message) = condition(&cred, "ReauthRequired").unwrap();
    let command = named_command(&message);
    assert_eq!(command, ["login", NAME, "-n", ns.as_str()], "{message}");
    assert_eq!(condition(&cred, "Ready").unwrap().0, "False");

    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let out = mcpcred(&alice, &args, &chromium());
    assert!(
        out.status.success(),
        "login failed: {}\n{}\noperator log:\n{}",
        text(&out.stderr),
        text(&out.stdout),
        op.log_text()
    );
    assert!(
        text(&out.stdout).contains(&format!("stored in Secret {NAME}-sign-in")),
        "{}",
        text(&out.stdout)
    );
    let sign_in = secrets.get(&format!("{NAME}-sign-in")).await.unwrap();
    let first = data(&sign_in, "refresh-token").expect("a refresh token");
    assert!(!first.is_empty());
    assert!(
        refresh_token_is_live(&oauth, &first).await,
        "the stored refresh token is the live one"
    );
    let registration: serde_json::Value =
        serde_json::from_str(&data(&sign_in, "registration").unwrap()).unwrap();
    assert_eq!(
        registration[oauth.issuer()]["method"],
        "dynamic",
        "{registration}"
    );
    assert_eq!(
        sign_in.metadata.labels.clone().unwrap_or_default()["mcpcredentials.dev/sign-in-for"],
        NAME
    );

    // The operator takes over: Ready, no more ReauthRequired, an access token for the server.
    signed_in(&creds).await;
    let published = secrets.get(&format!("{NAME}-mcp-credential")).await.unwrap();
    let claims = jwt_payload(&bearer(&published));
    assert_eq!(claims["aud"], server.url.as_str(), "{claims}");
    let sidecar = SidecarProcess::start(cp, &ns, &[NAME.to_owned()], &dir);
    wait_for("the sidecar is ready", || async {
        sidecar.ready().await.then_some(())
    })
    .await;
    let session = connect(&format!("{}/{NAME}", sidecar.url)).await.unwrap();
    call_sum(&session, 1).await.unwrap();
    assert!(server.counts().0 > 0, "the MCP server accepted the token");

    // The single writer: each renewal rotates the refresh token and stores the new one.
    let seen = std::sync::Mutex::new(BTreeSet::from([first.clone()]));
    let latest = wait_for("the operator to rotate the refresh token twice", || async {
        let s = secrets.get(&format!("{NAME}-sign-in")).await.ok()?;
        let rt = data(&s, "refresh-token")?;
        let mut seen = seen.lock().unwrap();
        seen.insert(rt.clone());
        (seen.len() >= 3).then_some(rt)
    })
    .await;
    assert!(
        !refresh_token_is_live(&oauth, &first).await,
        "the sign-in's refresh token was consumed by the rotation"
    );
    assert!(refresh_token_is_live(&oauth, &latest).await);
    call_sum(&session, 2).await.unwrap();
    let cred = creds.get(NAME).await.unwrap();
    assert_eq!(condition(&cred, "Ready").unwrap().0, "True");
    drop(session);
    drop(sidecar);
    drop(op);
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// A browser command that writes the URL it is given to a file, then signs in with Chromium:
/// (the command, the file).
fn recording_browser(dir: &Path) -> (String, PathBuf) {
    let marker = dir.join("authorization-url");
    let script = dir.join("browser.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1\" > {}\nexec {} \"$1\"\n",
            marker.display(),
            chromium()
        ),
    )
    .unwrap();
    (format!("sh {}", script.display()), marker)
}

/// The sign-in credential `NAME` and a machine one, `machine` (client credentials), for `server`.
fn sign_in_and_machine_credentials(cp: &ControlPlane, ns: &str, oauth: &OAuth, server: &McpServer) {
    apply(
        cp,
        ns,
        &Credential::new(NAME, &server.url, OAuth2::sign_in()).yaml(),
    );
    apply(
        cp,
        ns,
        &Credential::new(
            "machine",
            &server.url,
            OAuth2::cc_basic().token_url(&oauth.token_url()),
        )
        .yaml(),
    );
}

/// RBAC decides: a person who may read the credential but not write Secrets is told which Secret,
/// which namespace and which permission is missing, before any browser opens, and nothing is
/// written; a credential that does not exist, or is not a sign-in one, names the fix.
#[tokio::test(flavor = "multi_thread")]
async fn login_without_the_rbac_to_write_the_secret_or_for_a_wrong_credential_names_the_fix() {
    let (cp, ns) = setup("mcpcred-rbac");
    let dir = run_dir(&format!("mcpcred-rbac-{ns}"));
    let oauth = OAuth::start_sign_in(&dir, 3600);
    let server = McpServer::start(&oauth, &dir).await;
    sign_in_and_machine_credentials(cp, &ns, &oauth, &server);
    let client = client(cp).await;
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let (browser, opened) = recording_browser(&dir);
    let sign_in = format!("{NAME}-sign-in");

    // Bob may read credentials and Secrets, not write them.
    let bob = person(
        cp,
        &ns,
        "bob",
        &[
            ("get,list", "mcpcredentials.mcpcredentials.dev"),
            ("get", "secrets"),
        ],
    );
    let out = mcpcred(&bob, &["login", NAME, "-n", &ns], &browser);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("Secret {ns}/{sign_in}"))
            && stderr.contains("create")
            && stderr.contains("patch")
            && stderr.contains(&format!("namespace {ns}")),
        "{stderr}"
    );
    assert!(
        !opened.exists(),
        "no sign-in starts that could not be stored: {stderr}"
    );
    assert!(
        secrets.get_opt(&sign_in).await.unwrap().is_none(),
        "nothing written"
    );

    // Carol may not even read Secrets.
    let carol = person(
        cp,
        &ns,
        "carol",
        &[("get,list", "mcpcredentials.mcpcredentials.dev")],
    );
    let out = mcpcred(&carol, &["login", NAME, "-n", &ns], &browser);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("Secret {ns}/{sign_in}")) && stderr.contains("get"),
        "{stderr}"
    );
    assert!(!opened.exists(), "{stderr}");
    assert!(secrets.get_opt(&sign_in).await.unwrap().is_none());

    // A credential that does not exist, and one that is not a sign-in credential.
    let alice = person(cp, &ns, "alice", SIGNER);
    let out = mcpcred(&alice, &["login", "nope", "-n", &ns], &browser);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(r#"no McpCredential "nope" in namespace "{ns}""#))
            && stderr.contains("machine, notes"),
        "{stderr}"
    );
    let out = mcpcred(&alice, &["login", "machine", "-n", &ns], &browser);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("McpCredential {ns}/machine"))
            && stderr.contains("set spec.source.oauth2.grant to authorizationCode"),
        "{stderr}"
    );
    assert!(!opened.exists(), "{stderr}");
    assert!(secrets.get_opt("machine-sign-in").await.unwrap().is_none());
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// `kubectl mcpcred status` names each credential's state, and the command for one that needs a
/// sign-in; once signed in, it says ready.
#[tokio::test(flavor = "multi_thread")]
async fn status_names_each_state_and_the_command_to_run() {
    let (cp, ns) = setup("mcpcred-status");
    let dir = run_dir(&format!("mcpcred-status-{ns}"));
    let oauth = OAuth::start_sign_in(&dir, 3600);
    let server = McpServer::start(&oauth, &dir).await;
    operator_support::create_secret(cp, &ns, "idp", &[("secret", "cc-basic-secret")]);
    sign_in_and_machine_credentials(cp, &ns, &oauth, &server);
    let alice = person(cp, &ns, "alice", SIGNER);
    let before = status(&alice, &ns);
    assert!(
        before.contains(&format!("{NAME}  not reconciled yet")),
        "{before}"
    );
    let op = Operator::start(cp, &ns, "a", &["--discovery-allow-loopback"]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client, &ns);
    wait_condition(&creds, NAME, "ReauthRequired", "True", Some("SignInRequired")).await;
    wait_condition(&creds, "machine", "Ready", "True", None).await;

    let page = status(&alice, &ns);
    // One block per credential: its line, then the indented lines under it.
    let block = |name: &str| -> String {
        let mut lines = page.lines().skip_while(|l| !l.starts_with(&format!("{name}  ")));
        let head = lines.next().unwrap_or_else(|| panic!("{name} missing: {page}"));
        let mut out = format!("{head}\n");
        for l in lines.take_while(|l| l.starts_with(' ')) {
            out.push_str(l);
            out.push('\n');
        }
        out
    };
    let notes = block(NAME);
    assert!(notes.starts_with(&format!("{NAME}  not ready (")), "{page}");
    assert!(notes.contains("source:   oauth2"), "{page}");
    assert!(notes.contains(&format!("upstream: {}", server.url)), "{page}");
    assert!(notes.contains("why:      "), "{page}");
    assert!(
        notes.contains(&format!("to do:    kubectl mcpcred login {NAME} -n {ns}\n")),
        "{page}"
    );
    let machine = block("machine");
    assert!(machine.starts_with("machine  ready\n"), "{page}");
    assert!(machine.contains("expires:  "), "{page}");
    assert!(!machine.contains("to do:"), "{page}");

    // Signed in, it is ready and there is nothing to do.
    let out = mcpcred(&alice, &["login", NAME, "-n", &ns], &chromium());
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), op.log_text());
    signed_in(&creds).await;
    let after = status(&alice, &ns);
    assert!(after.contains(&format!("{NAME}  ready\n")), "{after}");
    assert!(!after.contains("to do:"), "{after}");
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// Step-up in a cluster, through the sign-in: a credential signed in for `read` whose upstream
/// answers 403 `insufficient_scope, scope="read write"` (the sidecar's report, sent here as the
/// sidecar sends it) records a step-up; `kubectl mcpcred login` then asks for the union, the new
/// token has `write`, the step-up is settled and the credential Ready without ReauthRequired. A
/// 403 for the same scopes afterwards counts as the next attempt (bounded), not a fresh start.
#[tokio::test(flavor = "multi_thread")]
async fn after_more_consent_is_required_login_asks_for_the_union_and_settles_the_step_up() {
    let (cp, ns) = setup("mcpcred-stepup");
    let dir = run_dir(&format!("mcpcred-stepup-{ns}"));
    let oauth = OAuth::start_sign_in(&dir, 3600);
    let server = McpServer::start(&oauth, &dir).await;
    apply(
        cp,
        &ns,
        &Credential::new(NAME, &server.url, OAuth2::sign_in().scopes(&["read"]))
            .service_accounts(&["agent"])
            .yaml(),
    );
    let certs = dir.join("certs");
    let WebhookOperator {
        operator: op,
        listen,
        ca_pem,
    } = WebhookOperator::start(cp, &ns, "a", &certs, &["--discovery-allow-loopback"]);
    let report_url = format!("https://{listen}/v1/report");
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let alice = person(cp, &ns, "alice", SIGNER);
    let agent = cp.kubectl(&["create", "serviceaccount", "agent", "-n", &ns]);
    assert!(agent.success, "{}", agent.stderr);
    let agent = cp.kubectl(&["create", "token", "agent", "-n", &ns, "--duration=1h"]);
    let agent_token = agent.stdout.trim().to_owned();

    wait_condition(&creds, NAME, "ReauthRequired", "True", Some("SignInRequired")).await;
    let out = mcpcred(&alice, &["login", NAME, "-n", &ns], &chromium());
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), op.log_text());
    wait_condition(&creds, NAME, "Ready", "True", None).await;
    let published = secrets.get(&format!("{NAME}-mcp-credential")).await.unwrap();
    let scope = |s: &Secret| -> BTreeSet<String> {
        jwt_payload(&bearer(s))["scope"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert!(
        scope(&published).contains("read") && !scope(&published).contains("write"),
        "{:?}",
        scope(&published)
    );

    // The sidecar's report of the 403 (as sidecar_report.rs sends it from a real sidecar).
    let https = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let report = |version: String| {
        serde_json::json!({
            "namespace": ns, "credential": NAME, "reason": "insufficient_scope", "version": version,
            "scope": "read write",
        })
    };
    let version = data(&published, "version").unwrap();
    let answer = https
        .post(&report_url)
        .bearer_auth(&agent_token)
        .json(&report(version))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    // No refresh is forced (none widens a grant): the step-up's write makes the reconcile publish.
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["result"], "step_up_recorded", "{body}");
    assert_eq!(
        op.metric(r#"mcp_credentials_reports_total{result="step_up_recorded"}"#)
            .await,
        1.0
    );
    let annotations = creds
        .get(NAME)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default();
    assert!(
        !annotations.contains_key("mcpcredentials.dev/refresh-requested-at"),
        "{annotations:?}"
    );
    let cred = wait_condition(
        &creds,
        NAME,
        "ReauthRequired",
        "True",
        Some("MoreConsentRequired"),
    )
    .await;
    let (_, _, message) = condition(&cred, "ReauthRequired").unwrap();
    assert_eq!(
        named_command(&message),
        ["login", NAME, "-n", ns.as_str()],
        "{message}"
    );
    let recorded: serde_json::Value = serde_json::from_str(
        &data(&secrets.get(&format!("{NAME}-sign-in")).await.unwrap(), "step-up").unwrap(),
    )
    .unwrap();
    assert_eq!(recorded["pending"], true, "{recorded}");
    let union: BTreeSet<&str> = recorded["scope"].as_str().unwrap().split_whitespace().collect();
    assert!(union.contains("read") && union.contains("write"), "{recorded}");
    let page = status(&alice, &ns);
    assert!(
        page.contains("to do:    more consent needed")
            && page.contains(&format!("kubectl mcpcred login {NAME} -n {ns}")),
        "{page}"
    );

    // The step-up sign-in: the authorization request asks for the union; the browser sees it.
    let (recorder, opened) = recording_browser(&dir);
    let out = mcpcred(&alice, &["login", NAME, "-n", &ns], &recorder);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), op.log_text());
    let url = reqwest::Url::parse(std::fs::read_to_string(&opened).unwrap().trim()).unwrap();
    let asked: BTreeSet<String> = url
        .query_pairs()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    assert!(
        asked.contains("read") && asked.contains("write"),
        "the authorization request asked for {asked:?}"
    );
    let sign_in = secrets.get(&format!("{NAME}-sign-in")).await.unwrap();
    let settled: serde_json::Value = serde_json::from_str(&data(&sign_in, "step-up").unwrap()).unwrap();
    assert_eq!(settled["pending"], false, "{settled}");
    assert_eq!(settled["scope"], recorded["scope"], "{settled}");
    let cred = wait_for("the credential to be Ready with the new grant", || async {
        let c = creds.get(NAME).await.ok()?;
        let s = secrets.get(&format!("{NAME}-mcp-credential")).await.ok()?;
        let ready = condition(&c, "Ready")?.0 == "True";
        let reauth = condition(&c, "ReauthRequired").is_none_or(|r| r.0 == "False");
        (ready && reauth && scope(&s).contains("write")).then_some(c)
    })
    .await;
    assert_eq!(condition(&cred, "Ready").unwrap().0, "True");

    // The upstream refuses again for the same scopes: the second attempt for them, not the first.
    let version = data(
        &secrets.get(&format!("{NAME}-mcp-credential")).await.unwrap(),
        "version",
    )
    .unwrap();
    let answer = https
        .post(&report_url)
        .bearer_auth(&agent_token)
        .json(&report(version))
        .send()
        .await
        .unwrap();
    assert!(
        answer.status().is_success() || answer.status() == 429,
        "{}",
        answer.status()
    );
    let again: serde_json::Value = serde_json::from_str(
        &data(&secrets.get(&format!("{NAME}-sign-in")).await.unwrap(), "step-up").unwrap(),
    )
    .unwrap();
    let key = {
        let mut v: Vec<&str> = again["scope"].as_str().unwrap().split_whitespace().collect();
        v.sort_unstable();
        v.join(" ")
    };
    assert_eq!(again["attempts"][&key], 2, "{again}");
    let cred = wait_condition(
        &creds,
        NAME,
        "ReauthRequired",
        "True",
        Some("MoreConsentRequired"),
    )
    .await;
    let (_, _, message) = condition(&cred, "ReauthRequired").unwrap();
    assert!(message.contains("sign-in 2 of at most 3"), "{message}");
    let _ = cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

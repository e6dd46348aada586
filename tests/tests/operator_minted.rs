//! The sources the operator mints or logs in for, through the operator as a real process against
//! the real control plane: `jwt` (validated by an MCP server of the official Python SDK with
//! PyJWT's JWKS client), `githubApp` (an in-process server with GitHub's endpoint shape, which
//! verifies the App JWT) and `session` (an in-process login site with a liveness URL).

mod operator_support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use mcp_credentials_core::{JwtAlgorithm, McpCredential, source::jwt};
use mcp_credentials_e2e::{
    credential::{Credential, GitHubApp, Jwt, Session, secret_key},
    repo_root,
};
use operator_support::*;

/// The Python MCP server that validates with the operator's JWKS, killed when dropped.
struct JwksMcpServer {
    child: Child,
    port: u16,
    /// Its stderr (why it rejected each token it rejected).
    log: std::path::PathBuf,
}

impl JwksMcpServer {
    fn start(issuer: &str) -> Self {
        Self::start_for(issuer, None)
    }

    /// A server that also accepts only tokens minted in `namespace` (its namespace-claim check).
    fn start_for(issuer: &str, namespace: Option<&str>) -> Self {
        let log = std::env::temp_dir().join(format!(
            "mcp-jwks-server-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/jwks-mcp-server/server.py"))
            .arg(issuer)
            .args(namespace)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 runs (tests/python-requirements.txt installs mcp, uvicorn, PyJWT)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("server.py printed no port ({line:?}); are mcp and PyJWT installed?")
        });
        Self { child, port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for JwksMcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP status of an MCP `initialize` sent with `authorization`.
async fn initialize(url: &str, authorization: Option<&str>) -> u16 {
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}
    });
    let mut req = reqwest::Client::new()
        .post(url)
        .header("Accept", "application/json, text/event-stream")
        .json(&body);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    req.send().await.unwrap().status().as_u16()
}

fn jwt_credential(name: &str, upstream: &str, algorithm: JwtAlgorithm, audience: Option<&str>) -> String {
    let mut jwt = Jwt::new("system:serviceaccount:agents:research")
        .ttl("15m")
        .algorithm(algorithm)
        .claim("tenant", "acme");
    if let Some(audience) = audience {
        jwt = jwt.audience(audience);
    }
    Credential::new(name, upstream, jwt).yaml()
}

async fn warning_events(cp_client: kube::Client, ns: &str, reason: &str) -> usize {
    let events: Api<Event> = Api::namespaced(cp_client, ns);
    events
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn minted_jwts_pass_an_mcp_servers_jwks_validation_for_their_audience_only() {
    let (cp, ns) = setup("op-jwt");
    let jwks_port = free_port();
    let issuer = format!("http://127.0.0.1:{jwks_port}");
    let jwks_listen = format!("127.0.0.1:{jwks_port}");
    let op = Operator::start(
        cp,
        &ns,
        "a",
        &[
            "--jwks-listen",
            &jwks_listen,
            "--jwt-issuer",
            &issuer,
            "--jwt-keys-secret",
            "jwt-keys",
        ],
    );
    let server = JwksMcpServer::start(&issuer);
    apply(
        cp,
        &ns,
        &jwt_credential("inventory", &server.url(), JwtAlgorithm::RS256, None),
    );
    apply(
        cp,
        &ns,
        &jwt_credential(
            "elsewhere",
            &server.url(),
            JwtAlgorithm::ES256,
            Some("https://other.example.com/mcp"),
        ),
    );
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let cred = wait_condition(&creds, "inventory", "Ready", "True", Some("CredentialValid")).await;
    wait_condition(&creds, "elsewhere", "Ready", "True", Some("CredentialValid")).await;
    let status = cred.status.unwrap();
    assert_eq!(status.source.as_deref(), Some("jwt"));
    let lifetime = status.not_after.unwrap().0.as_second() - status.not_before.unwrap().0.as_second();
    assert_eq!(lifetime, 900, "ttl 15m");

    let header = |s: &Secret| data(s, "header.Authorization").expect("an Authorization header");
    let mine = header(&secrets.get("inventory-mcp-credential").await.unwrap());
    let other = header(&secrets.get("elsewhere-mcp-credential").await.unwrap());
    let token = mine.strip_prefix("Bearer ").expect("Bearer {token}");
    let claims = jwt_payload(token);
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], server.url().as_str());
    assert_eq!(
        claims["sub"],
        format!("mcpcred:{ns}:system:serviceaccount:agents:research"),
        "sub is bound to the namespace"
    );
    assert_eq!(claims["tenant"], "acme");
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert_eq!(
        jwt_payload(other.strip_prefix("Bearer ").unwrap())["aud"],
        "https://other.example.com/mcp"
    );

    // The real MCP server, validating with PyJWT's JWKS client, accepts the token minted for it...
    assert_eq!(
        initialize(&server.url(), Some(&mine)).await,
        200,
        "the token for this audience"
    );
    // ...and rejects one minted by the same operator for another audience, and none at all.
    assert_eq!(
        initialize(&server.url(), Some(&other)).await,
        401,
        "a token for another audience"
    );
    assert_eq!(initialize(&server.url(), None).await, 401, "no token");

    // Both algorithms are published, each token's kid among them; no private key material.
    let jwks: serde_json::Value = reqwest::get(format!("{issuer}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids.len(), 2, "one ES256 and one RS256 key: {jwks}");
    for t in [&mine, &other] {
        let h = jsonwebtoken::decode_header(t.strip_prefix("Bearer ").unwrap()).unwrap();
        assert!(
            kids.contains(&h.kid.as_deref().unwrap()),
            "kid {:?} in {kids:?}",
            h.kid
        );
    }
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("d").is_none())
    );
    let keys = Api::<Secret>::namespaced(client, &ns)
        .get("jwt-keys")
        .await
        .unwrap();
    assert!(data(&keys, "keys.json").is_some(), "the leader stored the ring");
    assert_eq!(
        op.metric(r#"mcp_credentials_jwt_signing_keys{algorithm="RS256"}"#)
            .await,
        1.0
    );
    assert!(!op.log_text().contains(token), "the token never reaches the log");
}

/// An operator for `ns` that mints, with its JWKS on a free port, and the issuer it signs as.
fn minting_operator(
    cp: &'static mcp_credentials_e2e::ControlPlane,
    ns: &str,
    extra: &[&str],
) -> (Operator, String) {
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--jwks-listen",
        listen.as_str(),
        "--jwt-issuer",
        issuer.as_str(),
        "--jwt-keys-secret",
        "jwt-keys",
    ];
    args.extend_from_slice(extra);
    (Operator::start(cp, ns, "a", &args), issuer)
}

fn minted_credential(name: &str, upstream: &str, subject: &str, claims: &[(&str, &str)]) -> String {
    let jwt = claims
        .iter()
        .fold(Jwt::new(subject), |jwt, (name, value)| jwt.claim(name, value));
    Credential::new(name, upstream, jwt).yaml()
}

/// The token in a credential's Secret (`Bearer {token}`).
async fn minted_token(secrets: &Api<Secret>, credential: &str) -> String {
    let s = secrets
        .get(&format!("{credential}-mcp-credential"))
        .await
        .unwrap();
    let header = data(&s, "header.Authorization").expect("an Authorization header");
    header.strip_prefix("Bearer ").expect("Bearer {token}").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_cannot_mint_another_namespaces_subject_nor_pass_an_upstreams_namespace_check() {
    let (cp, a) = setup("op-jwt-a");
    let b = cp.namespace("op-jwt-b");
    let (op, issuer) = minting_operator(cp, &a, &[]);
    // Two upstreams that trust the one issuer, each only for its own namespace.
    let server_a = JwksMcpServer::start_for(&issuer, Some(&a));
    let server_b = JwksMcpServer::start_for(&issuer, Some(&b));
    // Namespace a asks for b's admin, b's audience and b's tenant claim.
    apply(
        cp,
        &a,
        &minted_credential(
            "impersonate",
            &server_b.url(),
            &format!("system:serviceaccount:{b}:admin"),
            &[("tenant", &b)],
        ),
    );
    apply(
        cp,
        &a,
        &minted_credential("own", &server_a.url(), "research", &[]),
    );
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &a);
    let secrets: Api<Secret> = Api::namespaced(client, &a);
    wait_condition(&creds, "impersonate", "Ready", "True", Some("CredentialValid")).await;
    wait_condition(&creds, "own", "Ready", "True", Some("CredentialValid")).await;

    let impersonating = minted_token(&secrets, "impersonate").await;
    let claims = jwt_payload(&impersonating);
    assert_ne!(claims["sub"], format!("system:serviceaccount:{b}:admin"));
    assert_eq!(
        claims["sub"],
        format!("mcpcred:{a}:system:serviceaccount:{b}:admin"),
        "sub carries the namespace it was minted in"
    );
    assert_eq!(claims["mcpcredentials.dev/namespace"], a.as_str());
    assert_eq!(claims["mcpcredentials.dev/credential"], "impersonate");
    assert_eq!(
        claims["aud"],
        server_b.url().as_str(),
        "without a policy, any audience"
    );
    let own = minted_token(&secrets, "own").await;
    assert_eq!(jwt_payload(&own)["sub"], format!("mcpcred:{a}:research"));

    // a's upstream accepts a's token; b's upstream refuses the token a minted for b's audience,
    // and for the namespace claim alone (signature, iss, aud and exp are all good).
    assert_eq!(
        initialize(&server_a.url(), Some(&format!("Bearer {own}"))).await,
        200,
        "a's token at a's upstream"
    );
    assert_eq!(
        initialize(&server_b.url(), Some(&format!("Bearer {impersonating}"))).await,
        401,
        "a's token at b's upstream"
    );
    let refused = server_b.log_text();
    assert!(
        refused.contains("minted in another namespace") && !refused.contains("InvalidAudience"),
        "refused for the namespace claim: {refused}"
    );
    let log = op.log_text();
    assert!(
        !log.contains(&impersonating) && !log.contains(&own),
        "no token in the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_refuses_jwt_claims_that_set_the_namespace_binding() {
    let (cp, ns) = setup("op-jwt-cel");
    // The control plane is shared: make sure it serves this tree's CRD.
    cp.install_crds();
    for claim in ["mcpcredentials.dev/namespace", "mcpcredentials.dev/credential"] {
        let yaml = minted_credential(
            "forged",
            "https://inventory.example.com/mcp",
            "research",
            &[(claim, "other")],
        );
        let out = cp.apply(&ns, &yaml);
        assert!(!out.success, "{claim} was accepted");
        assert!(
            out.stderr.contains("jwt.claims cannot set")
                && out
                    .stderr
                    .contains("mcpcredentials.dev/namespace and mcpcredentials.dev/credential"),
            "{claim}: {}",
            out.stderr
        );
    }
    let creds: Api<McpCredential> = Api::namespaced(client(cp).await, &ns);
    assert!(creds.get_opt("forged").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_audience_policy_a_namespace_mints_only_for_the_audiences_allowed_to_it() {
    let (cp, a) = setup("op-jwt-policy-a");
    let b = cp.namespace("op-jwt-policy-b");
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let server_a = JwksMcpServer::start_for(&issuer, Some(&a));
    let server_b = JwksMcpServer::start_for(&issuer, Some(&b));
    // What a cluster administrator writes (the Helm values jwt.audiencePolicy and jwt.unprefixedSubjects).
    let policy = std::env::temp_dir().join(format!("mcp-jwt-policy-{a}.yaml"));
    std::fs::write(
        &policy,
        format!(
            "audiences:\n  {a}: [\"{}\"]\n  {b}: [\"{}\"]\nunprefixedSubjects:\n  {a}: [legacy-agent]\n",
            server_a.url(),
            server_b.url()
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let op = Operator::start(
        cp,
        &a,
        "a",
        &[
            "--jwks-listen",
            &listen,
            "--jwt-issuer",
            &issuer,
            "--jwt-keys-secret",
            "jwt-keys",
            "--jwt-policy-file",
            policy.to_str().unwrap(),
        ],
    );
    apply(
        cp,
        &a,
        &minted_credential(
            "theirs",
            &server_b.url(),
            &format!("system:serviceaccount:{b}:admin"),
            &[],
        ),
    );
    apply(
        cp,
        &a,
        &minted_credential("allowed", &server_a.url(), "legacy-agent", &[]),
    );
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &a);
    let secrets: Api<Secret> = Api::namespaced(client, &a);

    let theirs = wait_condition(&creds, "theirs", "Ready", "False", Some("AudienceNotAllowed")).await;
    let message = condition(&theirs, "Ready").unwrap().2;
    for part in [
        format!("namespace {a:?}"),
        format!("{:?}", server_b.url()),
        format!("audiences.{a}"),
        "jwt.audiencePolicy".to_owned(),
        "--jwt-policy-file".to_owned(),
    ] {
        assert!(message.contains(&part), "{part:?} in {message}");
    }
    assert!(
        secrets.get_opt("theirs-mcp-credential").await.unwrap().is_none(),
        "nothing was minted"
    );

    wait_condition(&creds, "allowed", "Ready", "True", Some("CredentialValid")).await;
    let token = minted_token(&secrets, "allowed").await;
    let claims = jwt_payload(&token);
    assert_eq!(claims["aud"], server_a.url().as_str());
    assert_eq!(
        claims["sub"], "legacy-agent",
        "the administrator allowed this sub unprefixed"
    );
    assert_eq!(claims["mcpcredentials.dev/namespace"], a.as_str());
    assert_eq!(
        initialize(&server_a.url(), Some(&format!("Bearer {token}"))).await,
        200
    );
    assert!(!op.log_text().contains(&token), "no token in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_jwks_listen_a_jwt_credential_says_how_to_enable_minting() {
    let (cp, ns) = setup("op-jwt-off");
    let _op = Operator::start(cp, &ns, "a", &[]);
    apply(
        cp,
        &ns,
        &jwt_credential(
            "inventory",
            "http://127.0.0.1:7001/mcp",
            JwtAlgorithm::ES256,
            None,
        ),
    );
    let creds: Api<McpCredential> = Api::namespaced(client(cp).await, &ns);
    let cred = wait_condition(&creds, "inventory", "Ready", "False", Some("NoSigningKey")).await;
    let (_, _, message) = condition(&cred, "Ready").unwrap();
    assert!(message.contains("--jwks-listen"), "{message}");
}

/// What the fake GitHub saw and answers.
struct GitHub {
    public_key: jsonwebtoken::DecodingKey,
    installation: u64,
    requests: AtomicU64,
    bodies: Mutex<Vec<serde_json::Value>>,
}

async fn access_tokens(
    State(gh): State<Arc<GitHub>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    gh.requests.fetch_add(1, Ordering::Relaxed);
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if header("accept") != "application/vnd.github+json" || header("x-github-api-version").is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"message": "bad headers"})),
        )
            .into_response();
    }
    let jwt = header("authorization").strip_prefix("Bearer ").unwrap_or("");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    // `iss` is the App ID as a number, which jsonwebtoken's own `iss` check cannot read: checked below.
    v.set_required_spec_claims(&["exp"]);
    let ok = jsonwebtoken::decode::<serde_json::Value>(jwt, &gh.public_key, &v)
        .is_ok_and(|d| d.claims["iss"] == 4242 && d.claims["exp"].as_u64() > d.claims["iat"].as_u64());
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"message": "A JSON web token could not be decoded"})),
        )
            .into_response();
    }
    if id != gh.installation {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Not Found"})),
        )
            .into_response();
    }
    gh.bodies.lock().unwrap().push(body);
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "token": format!("ghs_{}", gh.requests.load(Ordering::Relaxed)),
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "permissions": {"contents": "read"},
            "repository_selection": "selected",
        })),
    )
        .into_response()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn github_credential(name: &str, api: &str, installation: i64, key_secret: &str) -> String {
    let app = GitHubApp::new("4242", installation, secret_key(key_secret, "private-key.pem"))
        .repositories(&["agent-playground"])
        .permission("contents", "read")
        .api_url(api);
    Credential::new(name, "http://127.0.0.1:7001/mcp", app).yaml()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_github_app_gets_an_installation_token_and_bad_ids_or_keys_are_named() {
    let (cp, ns) = setup("op-gh");
    let (pem, _) = jwt::generate_key(JwtAlgorithm::RS256).unwrap();
    let (wrong, _) = jwt::generate_key(JwtAlgorithm::RS256).unwrap();
    let jwk = jwt::public_jwk(JwtAlgorithm::RS256, &pem, None).unwrap();
    let gh = Arc::new(GitHub {
        public_key: jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        installation: 777,
        requests: AtomicU64::new(0),
        bodies: Mutex::default(),
    });
    let addr = serve(
        Router::new()
            .route("/app/installations/{id}/access_tokens", post(access_tokens))
            .with_state(gh.clone()),
    )
    .await;
    let api = format!("http://{addr}");
    create_secret(cp, &ns, "app", &[("private-key.pem", pem.expose())]);
    create_secret(cp, &ns, "wrong", &[("private-key.pem", wrong.expose())]);
    apply(cp, &ns, &github_credential("github", &api, 777, "app"));
    apply(cp, &ns, &github_credential("unknown", &api, 778, "app"));
    apply(cp, &ns, &github_credential("badkey", &api, 777, "wrong"));
    let op = Operator::start(cp, &ns, "a", &[]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let cred = wait_condition(&creds, "github", "Ready", "True", Some("CredentialValid")).await;
    let calls = format!(r#"mcp_credentials_token_endpoint_requests_total{{issuer="{api}"}}"#);
    assert!(
        op.metric(&calls).await >= 1.0,
        "GitHub calls are counted by API host"
    );
    let status = cred.status.unwrap();
    assert_eq!(status.source.as_deref(), Some("githubApp"));
    let lifetime = status.not_after.unwrap().0.as_second() - status.not_before.unwrap().0.as_second();
    assert!(
        (3590..=3600).contains(&lifetime),
        "one hour, from expires_at: {lifetime}"
    );
    let s = secrets.get("github-mcp-credential").await.unwrap();
    assert!(
        data(&s, "header.Authorization")
            .unwrap()
            .starts_with("Bearer ghs_")
    );
    assert_eq!(
        gh.bodies.lock().unwrap()[0],
        serde_json::json!({"repositories": ["agent-playground"], "permissions": {"contents": "read"}}),
        "the narrowing was requested"
    );

    let unknown = wait_condition(&creds, "unknown", "Ready", "False", Some("InstallationNotFound")).await;
    assert!(
        condition(&unknown, "Ready")
            .unwrap()
            .2
            .contains("githubApp.installationId")
    );
    let bad = wait_condition(&creds, "badkey", "Ready", "False", Some("GitHubAppUnauthorized")).await;
    let message = condition(&bad, "Ready").unwrap().2;
    assert!(
        message.contains("githubApp.privateKey") && message.contains("githubApp.appId"),
        "{message}"
    );
    assert!(!message.contains("BEGIN"), "no key material: {message}");
    wait_for("a RefreshFailed event", || {
        let client = client.clone();
        let ns = ns.clone();
        async move { (warning_events(client, &ns, "RefreshFailed").await >= 2).then_some(()) }
    })
    .await;
}

/// A login site: `/login` sets a session cookie for the right password, `/check` answers 200 for
/// a live session and redirects to the login page for any other.
struct Site {
    logins: AtomicU64,
    live: Mutex<Vec<String>>,
    revoked: AtomicBool,
}

async fn login(
    State(site): State<Arc<Site>>,
    form: axum::Form<std::collections::HashMap<String, String>>,
) -> Response {
    if form.get("user").map(String::as_str) != Some("agent")
        || form.get("pass").map(String::as_str) != Some("s3cret")
    {
        return (StatusCode::UNAUTHORIZED, "wrong user or password").into_response();
    }
    let n = site.logins.fetch_add(1, Ordering::Relaxed) + 1;
    let sid = format!("login-{n}");
    site.live.lock().unwrap().push(sid.clone());
    site.revoked.store(false, Ordering::Relaxed);
    (
        StatusCode::FOUND,
        [
            ("location", "/".to_owned()),
            ("set-cookie", format!("sid={sid}; Path=/; Max-Age=3600; HttpOnly")),
        ],
    )
        .into_response()
}

async fn check(State(site): State<Arc<Site>>, headers: HeaderMap) -> StatusCode {
    let cookie = headers.get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("");
    let live = site.live.lock().unwrap();
    let alive = !site.revoked.load(Ordering::Relaxed)
        && cookie.split("; ").any(|c| {
            c.strip_prefix("sid=")
                .is_some_and(|s| live.iter().any(|l| l == s))
        });
    if alive { StatusCode::OK } else { StatusCode::FOUND }
}

async fn site() -> (Arc<Site>, SocketAddr) {
    let site = Arc::new(Site {
        logins: AtomicU64::new(0),
        live: Mutex::new(vec!["imported".into()]),
        revoked: AtomicBool::new(false),
    });
    let addr = serve(
        Router::new()
            .route("/login", post(login))
            .route("/check", get(check))
            .with_state(site.clone()),
    )
    .await;
    (site, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn imported_cookies_are_served_and_a_dead_session_shows_before_an_agent_hits_it() {
    let (cp, ns) = setup("op-cookies");
    let (site, addr) = site().await;
    let cookies = "# Netscape HTTP Cookie File\n#HttpOnly_127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tsid\timported\n\
                   other.example.com\tFALSE\t/\tFALSE\t0\ttracker\tno\n";
    create_secret(cp, &ns, "browser", &[("cookies.txt", cookies)]);
    apply(
        cp,
        &ns,
        &Credential::new(
            "wiki",
            &format!("http://{addr}/mcp"),
            Session::cookies(secret_key("browser", "cookies.txt")).check(
                &format!("http://{addr}/check"),
                Some(200),
                "1m",
            ),
        )
        .yaml(),
    );
    let op = Operator::start(cp, &ns, "a", &[]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let cred = wait_condition(&creds, "wiki", "SessionExpired", "False", Some("SessionAlive")).await;
    assert_eq!(condition(&cred, "Ready").unwrap().0, "True");
    let status = cred.status.unwrap();
    assert_eq!(status.source.as_deref(), Some("session"));
    assert_eq!(
        status.not_after.unwrap().0.as_second(),
        4_102_444_800,
        "the cookie's expiry"
    );
    let s = secrets.get("wiki-mcp-credential").await.unwrap();
    assert_eq!(
        data(&s, "header.Cookie").as_deref(),
        Some("sid=imported"),
        "only the site's cookies"
    );

    // The site ends the session; the next check (forced here by a refresh request) tells.
    site.revoked.store(true, Ordering::Relaxed);
    creds
        .patch(
            "wiki",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"mcpcredentials.dev/refresh-requested-at": "1"}}})),
        )
        .await
        .unwrap();
    let cred = wait_condition(&creds, "wiki", "SessionExpired", "True", Some("SessionExpired")).await;
    let (ready, reason, _) = condition(&cred, "Ready").unwrap();
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "SessionExpired"));
    let message = condition(&cred, "SessionExpired").unwrap().2;
    assert!(
        message.contains("HTTP 302") && message.contains("fresh cookies"),
        "{message}"
    );
    assert!(!message.contains("imported"), "no cookie value: {message}");
    let series =
        format!(r#"mcp_credentials_session_checks_total{{name="wiki",namespace="{ns}",result="expired"}}"#);
    wait_for("the expired-check metric", || async {
        (op.metric(&series).await >= 1.0).then_some(())
    })
    .await;
    wait_for("a SessionExpired event", || {
        let client = client.clone();
        let ns = ns.clone();
        async move { (warning_events(client, &ns, "SessionExpired").await >= 1).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_form_login_captures_its_cookie_and_logs_in_again_when_the_check_fails() {
    let (cp, ns) = setup("op-login");
    let (site, addr) = site().await;
    create_secret(cp, &ns, "login", &[("user", "agent"), ("pass", "s3cret")]);
    create_secret(cp, &ns, "bad", &[("user", "agent"), ("pass", "wrong")]);
    let credential = |name: &str, secret: &str| {
        let login = Session::form_login(
            &format!("http://{addr}/login"),
            secret_key(secret, "user"),
            secret_key(secret, "pass"),
        )
        .form_fields("user", "pass")
        .check(&format!("http://{addr}/check"), None, "1m");
        Credential::new(name, &format!("http://{addr}/mcp"), login).yaml()
    };
    apply(cp, &ns, &credential("wiki", "login"));
    apply(cp, &ns, &credential("denied", "bad"));
    let _op = Operator::start(cp, &ns, "a", &[]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let cred = wait_condition(&creds, "wiki", "SessionExpired", "False", Some("SessionAlive")).await;
    assert_eq!(condition(&cred, "Ready").unwrap().0, "True");
    let lifetime = {
        let s = cred.status.unwrap();
        s.not_after.unwrap().0.as_second() - s.not_before.unwrap().0.as_second()
    };
    assert!((3598..=3600).contains(&lifetime), "Max-Age=3600: {lifetime}");
    let s = secrets.get("wiki-mcp-credential").await.unwrap();
    assert_eq!(data(&s, "header.Cookie").as_deref(), Some("sid=login-1"));
    let denied = wait_condition(&creds, "denied", "Ready", "False", Some("LoginFailed")).await;
    let message = condition(&denied, "Ready").unwrap().2;
    assert!(
        message.contains("HTTP 401") && message.contains("usernameField"),
        "{message}"
    );
    assert!(!message.contains("wrong"), "no password: {message}");

    // The site ends the session: the next periodic check (1 minute) fails, and the operator logs in again.
    site.revoked.store(true, Ordering::Relaxed);
    wait_for("a second login after the failed check", || async {
        let s = secrets.get("wiki-mcp-credential").await.ok()?;
        (data(&s, "header.Cookie").as_deref() == Some("sid=login-2")).then_some(())
    })
    .await;
    wait_condition(&creds, "wiki", "SessionExpired", "False", Some("SessionAlive")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_serves_the_jwks_of_the_keys_the_leader_wrote() {
    let (cp, ns) = setup("op-jwks-ha");
    let ports = [free_port(), free_port()];
    let start = |identity: &str, port: u16| {
        let listen = format!("127.0.0.1:{port}");
        Operator::start(
            cp,
            &ns,
            identity,
            &[
                "--jwks-listen",
                &listen,
                "--jwt-issuer",
                "https://jwks.example",
                "--jwt-keys-secret",
                "jwt-keys",
            ],
        )
    };
    let _leader = start("a", ports[0]);
    let secrets: Api<Secret> = Api::namespaced(client(cp).await, &ns);
    wait_for("the leader to write the keys", || async {
        secrets.get_opt("jwt-keys").await.ok()?.map(|_| ())
    })
    .await;
    let _standby = start("b", ports[1]);
    let kids = |port: u16| async move {
        let url = format!("http://127.0.0.1:{port}/.well-known/jwks.json");
        let jwks: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        let mut kids: Vec<String> = jwks["keys"]
            .as_array()?
            .iter()
            .filter_map(|k| k["kid"].as_str().map(str::to_owned))
            .collect();
        kids.sort();
        (kids.len() == 2).then_some(kids)
    };
    let from_leader = wait_for("the leader's JWKS", || kids(ports[0])).await;
    let from_standby = wait_for("the standby's JWKS", || kids(ports[1])).await;
    assert_eq!(
        from_leader, from_standby,
        "one key ring, whichever replica answers"
    );
    let discovery: serde_json::Value = reqwest::get(format!(
        "http://127.0.0.1:{}/.well-known/openid-configuration",
        ports[1]
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(discovery["issuer"], "https://jwks.example");
    assert_eq!(
        discovery["jwks_uri"],
        "https://jwks.example/.well-known/jwks.json"
    );
}

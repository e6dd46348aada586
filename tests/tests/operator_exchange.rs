//! The tokenExchange source and OAuth discovery, end to end: the operator as a real process, the
//! real API server's TokenRequest and service-account issuer, and the real OAuth server
//! (oidc-provider) trusting that issuer (workload identity: no secret stored anywhere) and serving
//! its real discovery metadata to an upstream's RFC 9728 protected resource metadata.

mod operator_support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::ListParams};
use mcp_credentials_core::{ExchangeGrant as Grant, McpCredential};
use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, OAuth2, TokenExchange},
};
use operator_support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// The control plane's `--service-account-issuer` (tests/control-plane).
const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The API server's service-account signing keys, as an authorization server that trusts the
/// cluster fetches them (its OIDC discovery document names this JWKS).
fn cluster_jwks(cp: &ControlPlane) -> String {
    let config = cp.kubectl(&["get", "--raw", "/.well-known/openid-configuration"]);
    assert!(
        config.success,
        "service-account issuer discovery: {}",
        config.stderr
    );
    let config: serde_json::Value = serde_json::from_str(&config.stdout).unwrap();
    assert_eq!(config["issuer"], CLUSTER_ISSUER);
    let jwks = cp.kubectl(&["get", "--raw", "/openid/v1/jwks"]);
    assert!(jwks.success, "service-account JWKS: {}", jwks.stderr);
    jwks.stdout
}

/// A service account whose tokens the operator may request for `audiences`.
fn service_account(cp: &ControlPlane, ns: &str, name: &str, audiences: Option<&str>) {
    let annotations = audiences
        .map(|a| format!("  annotations: {{ mcpcredentials.dev/token-exchange-audiences: \"{a}\" }}\n"))
        .unwrap_or_default();
    apply(
        cp,
        ns,
        &format!("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n{annotations}"),
    );
}

async fn bearer(secrets: &Api<Secret>, name: &str) -> serde_json::Value {
    let s = secrets.get(&format!("{name}-mcp-credential")).await.unwrap();
    let header = data(&s, "header.Authorization").unwrap();
    jwt_payload(header.strip_prefix("Bearer ").expect("a bearer token"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_account_token_is_exchanged_for_an_upstream_token_with_no_stored_secret() {
    let (cp, ns) = setup("op-exchange");
    let oauth = OAuthServer::start_trusting(30, CLUSTER_ISSUER, &cluster_jwks(cp));
    let audience = oauth.issuer();
    service_account(cp, &ns, "research-agent", Some(&audience));
    service_account(cp, &ns, "not-annotated", None);
    service_account(cp, &ns, "other-audience", Some("https://elsewhere.example.com"));
    let upstream = "http://127.0.0.1:7101/mcp";
    for (name, grant, sa, aud) in [
        (
            "exchanged",
            Grant::TokenExchange,
            "research-agent",
            audience.as_str(),
        ),
        ("bearer", Grant::JwtBearer, "research-agent", audience.as_str()),
        (
            "unannotated",
            Grant::TokenExchange,
            "not-annotated",
            audience.as_str(),
        ),
        (
            "untrusted",
            Grant::TokenExchange,
            "other-audience",
            "https://elsewhere.example.com",
        ),
    ] {
        let source = TokenExchange::service_account(grant, sa, aud)
            .token_url(&oauth.token_url())
            .client_id("wi-client")
            .scopes(&["read"]);
        apply(cp, &ns, &Credential::new(name, upstream, source).yaml());
    }
    let op = Operator::start(cp, &ns, "a", &[]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);

    for (name, kind) in [
        ("exchanged", "tokenExchange/tokenExchange"),
        ("bearer", "tokenExchange/jwtBearer"),
    ] {
        let cred = wait_condition(&creds, name, "Ready", "True", Some("CredentialValid")).await;
        let status = cred.status.unwrap();
        assert_eq!(status.source.as_deref(), Some(kind));
        // 30 s, or 29 when a second ticked between the server's `iat` and the operator reading the
        // answer (the expiry is the JWT's `exp` when that is earlier than `expires_in` from now).
        let lifetime = status.not_after.unwrap().0.as_second() - status.not_before.unwrap().0.as_second();
        assert!(
            (28..=30).contains(&lifetime),
            "the exchanged token's lifetime ({lifetime} s) drives renewal, not the service-account token's 600 s"
        );
        let claims = bearer(&secrets, name).await;
        assert_eq!(
            claims["aud"], upstream,
            "{name}: RFC 8707 resource is the upstream"
        );
        assert_eq!(
            claims["iss"],
            oauth.issuer(),
            "{name}: issued by the OAuth server"
        );
        assert_eq!(
            claims["sub"],
            format!("system:serviceaccount:{ns}:research-agent"),
            "{name}: the token speaks for the workload the API server vouched for"
        );
        assert_eq!(claims["client_id"], "wi-client");
    }

    // No stored secret: the only Secrets in the namespace are the ones the operator wrote.
    let names: Vec<String> = secrets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with("-mcp-credential")),
        "no input Secret exists: {names:?}"
    );

    // A service account that did not opt in: no token is requested at all.
    let cred = wait_condition(
        &creds,
        "unannotated",
        "Ready",
        "False",
        Some("ServiceAccountTokenFailed"),
    )
    .await;
    let (_, _, message) = condition(&cred, "Ready").unwrap();
    assert!(
        message.contains("mcpcredentials.dev/token-exchange-audiences"),
        "the message says how to allow it: {message}"
    );
    // A token the OAuth server does not accept (wrong audience): reported, retried, never ReauthRequired.
    let cred = wait_condition(
        &creds,
        "untrusted",
        "Ready",
        "False",
        Some("SubjectTokenRejected"),
    )
    .await;
    assert_eq!(condition(&cred, "Refreshing").unwrap().1, "SubjectTokenRejected");
    assert!(condition(&cred, "ReauthRequired").is_none_or(|(s, _, _)| s == "False"));

    // Renewal requests a new service-account token and exchanges it again.
    let v1 = creds
        .get("exchanged")
        .await
        .unwrap()
        .status
        .unwrap()
        .credential_version;
    wait_for("a renewal of the exchanged token", || async {
        let v = creds.get("exchanged").await.ok()?.status?.credential_version;
        (v != v1).then_some(())
    })
    .await;

    let metrics = op.metrics().await;
    let issuer_label = format!(
        "mcp_credentials_token_endpoint_requests_total{{issuer=\"{}\"}}",
        oauth.issuer()
    );
    assert!(metric_value(&metrics, &issuer_label) >= 3.0, "{metrics}");
    assert!(metric_value(&metrics, r#"mcp_credentials_refreshes_total{result="success"}"#) >= 3.0);
    assert!(
        metric_value(
            &metrics,
            r#"mcp_credentials_refreshes_total{result="config_error"}"#
        ) >= 2.0
    );
    let log = op.log_text();
    assert!(!log.contains("eyJ"), "no token in the operator's log:\n{log}");
}

/// An upstream MCP server that wants a token: `POST /<name>/mcp` answers 401 with a challenge
/// naming its protected resource metadata, which names `servers[name]` as authorization server.
struct Upstream {
    port: u16,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

impl Upstream {
    async fn start(servers: HashMap<&'static str, String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let log = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (log, servers) = (log.clone(), servers.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    let mut len = 0;
                    while !String::from_utf8_lossy(&buf[..len]).contains("\r\n\r\n") {
                        match sock.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => len += n,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..len]).to_string();
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    *log.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let base = format!("http://127.0.0.1:{port}");
                    let prm = "/.well-known/oauth-protected-resource";
                    let (status, extra, body) = match path.split('/').collect::<Vec<_>>()[..] {
                        ["", name, "mcp"] if servers.contains_key(name) => (
                            "401 Unauthorized",
                            format!(
                                "www-authenticate: Bearer resource_metadata=\"{base}{prm}/{name}/mcp\"\r\n"
                            ),
                            r#"{"error":"unauthorized"}"#.to_owned(),
                        ),
                        ["", ".well-known", "oauth-protected-resource", name, "mcp"]
                            if servers.contains_key(name) =>
                        {
                            (
                                "200 OK",
                                String::new(),
                                serde_json::json!({
                                    "resource": format!("{base}/{name}/mcp"),
                                    "authorization_servers": [servers[name]],
                                })
                                .to_string(),
                            )
                        }
                        _ => ("404 Not Found", String::new(), "{}".to_owned()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self { port, hits }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}/mcp", self.port)
    }

    fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_endpoint_is_discovered_from_the_upstreams_protected_resource_metadata() {
    let (cp, ns) = setup("op-discovery");
    let oauth = OAuthServer::start(0, 30);
    let upstream = Upstream::start(HashMap::from([
        ("good", oauth.issuer()),
        // Metadata that aims the operator at the cloud metadata service.
        ("evil", "http://169.254.169.254/latest".to_owned()),
    ]))
    .await;
    create_secret(cp, &ns, "idp", &[("secret", "cc-basic-secret")]);
    for name in ["good", "evil"] {
        apply(
            cp,
            &ns,
            &Credential::new(name, &upstream.url(name), OAuth2::cc_basic()).yaml(),
        );
    }
    // The test servers are on loopback: only the explicit opt-in lets learned URLs point there.
    let op = Operator::start(cp, &ns, "a", &["--discovery-allow-loopback"]);
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);

    let cred = wait_condition(&creds, "good", "Ready", "True", Some("CredentialValid")).await;
    let discovery = cred.status.unwrap().discovery.expect("status.discovery");
    assert_eq!(
        discovery.resource_metadata.as_deref(),
        Some(
            format!(
                "http://127.0.0.1:{}/.well-known/oauth-protected-resource/good/mcp",
                upstream.port
            )
            .as_str()
        )
    );
    assert_eq!(
        discovery.issuer,
        Some(oauth.issuer()),
        "oidc-provider's own metadata, issuer matched exactly"
    );
    assert_eq!(discovery.token_endpoint, Some(oauth.token_url()));
    assert_eq!(bearer(&secrets, "good").await["aud"], upstream.url("good"));

    let cred = wait_condition(&creds, "evil", "Ready", "False", Some("DiscoveryFailed")).await;
    let (_, _, message) = condition(&cred, "Ready").unwrap();
    assert!(
        message.contains("169.254.169.254") && message.contains("link-local"),
        "the message says what was refused and why: {message}"
    );
    assert!(cred.status.unwrap().discovery.is_none());

    // The discovered endpoint is cached: a renewal is one token request, no metadata request.
    let prm = "/.well-known/oauth-protected-resource/good/mcp";
    assert_eq!(upstream.hits(prm), 1);
    let v1 = creds
        .get("good")
        .await
        .unwrap()
        .status
        .unwrap()
        .credential_version;
    wait_for("a renewal", || async {
        let v = creds.get("good").await.ok()?.status?.credential_version;
        (v != v1).then_some(())
    })
    .await;
    assert_eq!(upstream.hits(prm), 1, "metadata fetched once, then cached");
    assert_eq!(upstream.hits("/good/mcp"), 1, "one unauthenticated probe");
    let metrics = op.metrics().await;
    let series = format!(
        "mcp_credentials_token_endpoint_requests_total{{issuer=\"{}\"}}",
        oauth.issuer()
    );
    assert!(metric_value(&metrics, &series) >= 2.0, "{metrics}");
}

//! Signing in against one in-process server playing the MCP upstream, its protected resource
//! metadata and its authorization server (registration, authorization, token and device
//! endpoints); the "browser" is an HTTP client that follows the authorization endpoint's redirect
//! to the loopback listener, or a hostile page that calls the listener itself.

use std::sync::{Arc, Mutex};

use super::*;
use crate::{
    CredentialSource, OAuth2Source,
    source::{
        obtain,
        test_support::{self, Answer, Log, MapResolver, Seen, context, routed},
    },
};

/// What the authorization server does; each test changes what it needs.
#[derive(Clone)]
struct World {
    /// `code_challenge_methods_supported` (`None`: absent).
    pkce: Option<&'static str>,
    /// `authorization_response_iss_parameter_supported`.
    iss_supported: bool,
    /// The `iss` the redirect carries: `Some("{issuer}")` (replaced), another value, or none.
    iss: Option<&'static str>,
    /// The registration answer (`None`: no registration endpoint).
    registration: Option<(u16, &'static str)>,
    /// `client_id_metadata_document_supported`.
    cimd: bool,
    /// The authorization endpoint redirects with `error=` this instead of a code.
    deny: Option<&'static str>,
    /// The redirect's `state` is replaced by this one.
    foreign_state: Option<&'static str>,
    /// The 401 challenge's `scope`.
    challenge_scope: Option<&'static str>,
    /// `scopes_supported` of the authorization server.
    as_scopes: &'static str,
    /// No metadata at all (the 2025-03-26 default endpoints).
    no_metadata: bool,
    /// The device endpoint answers `authorization_pending` this many times first.
    pending: Arc<Mutex<u32>>,
    /// Refresh tokens issued so far (each refresh rotates).
    issued: Arc<Mutex<u32>>,
    /// The token answers carry no refresh token, and say `expires_in` this.
    no_refresh_token: Option<u64>,
}

impl Default for World {
    fn default() -> Self {
        World {
            pkce: Some(r#"["plain","S256"]"#),
            iss_supported: true,
            iss: Some("{issuer}"),
            registration: Some((
                201,
                r#"{"client_id":"dyn-1","token_endpoint_auth_method":"none"}"#,
            )),
            cimd: false,
            deny: None,
            foreign_state: None,
            challenge_scope: Some("mcp:read mcp:write"),
            as_scopes: r#"["mcp:read","mcp:write","offline_access"]"#,
            no_metadata: false,
            pending: Arc::default(),
            issued: Arc::default(),
            no_refresh_token: None,
        }
    }
}

fn query_of(req: &Seen) -> Vec<(String, String)> {
    parse_query(req.path().split_once('?').map(|(_, q)| q).unwrap_or(""))
}

fn param(q: &[(String, String)], k: &str) -> Option<String> {
    q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

async fn start(world: World) -> (String, Log) {
    let cell: Arc<Mutex<String>> = Arc::default();
    let base_cell = cell.clone();
    let (base, log) = routed(move |req: &Seen| {
        let base = cell.lock().unwrap().clone();
        let issuer = format!("{base}/as");
        let path = req.path().split('?').next().unwrap_or("").to_owned();
        let w = &world;
        match path.as_str() {
            "/mcp" => {
                let mut c = format!(r#"Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#);
                if let Some(s) = w.challenge_scope {
                    c.push_str(&format!(r#", scope="{s}""#));
                }
                if w.no_metadata {
                    c = "Bearer".into();
                }
                Answer::With(401, vec![("www-authenticate".into(), c)], "{}".into())
            }
            "/.well-known/oauth-protected-resource/mcp" if !w.no_metadata => Answer::Json(
                200,
                format!(
                    r#"{{"resource":"{base}/mcp","authorization_servers":["{issuer}"],"scopes_supported":["prm:a","prm:b"]}}"#
                ),
            ),
            "/.well-known/oauth-authorization-server/as" if !w.no_metadata => {
                let mut doc = serde_json::json!({
                    "issuer": issuer,
                    "authorization_endpoint": format!("{issuer}/authorize"),
                    "token_endpoint": format!("{issuer}/token"),
                    "device_authorization_endpoint": format!("{issuer}/device"),
                    "authorization_response_iss_parameter_supported": w.iss_supported,
                    "client_id_metadata_document_supported": w.cimd,
                    "scopes_supported": serde_json::from_str::<Value>(w.as_scopes).unwrap(),
                });
                if let Some(p) = w.pkce {
                    doc["code_challenge_methods_supported"] = serde_json::from_str(p).unwrap();
                }
                if w.registration.is_some() {
                    doc["registration_endpoint"] = format!("{issuer}/register").into();
                }
                Answer::Json(200, doc.to_string())
            }
            "/as/register" | "/register" => {
                let (status, body) = w.registration.unwrap();
                Answer::Json(status, body.into())
            }
            "/as/authorize" | "/authorize" => {
                let q = query_of(req);
                let redirect = param(&q, "redirect_uri").unwrap();
                let state = w
                    .foreign_state
                    .map(str::to_owned)
                    .unwrap_or_else(|| param(&q, "state").unwrap());
                let mut location = format!("{redirect}?state={}", form_encode(&state));
                match w.deny {
                    Some(e) => location.push_str(&format!("&error={e}&error_description=the+user+said+no")),
                    // The code remembers the challenge, so the token endpoint can check the verifier.
                    None => location.push_str(&format!(
                        "&code=code-{}",
                        param(&q, "code_challenge").unwrap_or_default()
                    )),
                }
                if let Some(iss) = w.iss {
                    location.push_str(&format!("&iss={}", form_encode(&iss.replace("{issuer}", &issuer))));
                }
                Answer::With(302, vec![("location".into(), location)], String::new())
            }
            "/as/device" => Answer::Json(
                200,
                format!(
                    r#"{{"device_code":"dc-1","user_code":"ABCD-EFGH","verification_uri":"{issuer}/activate","interval":1,"expires_in":60}}"#
                ),
            ),
            "/as/token" | "/token" => {
                let grant = req.param("grant_type").unwrap_or_default();
                if grant == "authorization_code" {
                    let code = req.param("code").unwrap_or_default();
                    let verifier = req.param("code_verifier").unwrap_or_default();
                    if code != format!("code-{}", s256(&verifier)) {
                        return Answer::Json(400, r#"{"error":"invalid_grant","error_description":"PKCE"}"#.into());
                    }
                } else if grant.ends_with("device_code") {
                    let mut p = w.pending.lock().unwrap();
                    if *p > 0 {
                        *p -= 1;
                        return Answer::Json(400, r#"{"error":"authorization_pending"}"#.into());
                    }
                } else if grant == "refresh_token" {
                    let n = *w.issued.lock().unwrap();
                    if req.param("refresh_token") != Some(format!("rt-{n}")) {
                        return Answer::Json(400, r#"{"error":"invalid_grant"}"#.into());
                    }
                }
                let mut n = w.issued.lock().unwrap();
                *n += 1;
                if let Some(ttl) = w.no_refresh_token {
                    return Answer::Json(
                        200,
                        format!(r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":{ttl}}}"#),
                    );
                }
                Answer::Json(
                    200,
                    format!(
                        r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":60,"refresh_token":"rt-{n}","scope":"mcp:read mcp:write offline_access"}}"#
                    ),
                )
            }
            _ => Answer::Raw(404, "text/plain", "not found".into()),
        }
    })
    .await;
    *base_cell.lock().unwrap() = base.clone();
    (base, log)
}

fn spec(base: &str, o: impl FnOnce(&mut OAuth2Source)) -> McpCredentialSpec {
    let mut source = OAuth2Source {
        grant: OAuth2Grant::AuthorizationCode,
        token_url: None,
        client_id: String::new(),
        client_secret: None,
        client_auth: None,
        private_key: None,
        refresh_token: None,
        scopes: vec![],
        resource: None,
        audience: None,
        extra_params: Default::default(),
        quirks: None,
        sign_in: None,
    };
    o(&mut source);
    let mut spec = test_support::spec(CredentialSource {
        oauth2: Some(source),
        ..Default::default()
    });
    spec.upstream = format!("{base}/mcp");
    spec
}

/// A browser on this machine: follows the authorization endpoint's redirect to the listener.
fn browser(prompt: &Prompt) {
    let Prompt::Browser { url } = prompt else {
        panic!("expected a browser prompt, got {prompt:?}")
    };
    let url = url.clone();
    tokio::spawn(async move {
        let _ = reqwest::get(url).await;
    });
}

fn requests(log: &Log, path: &str) -> Vec<Seen> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|r| r.path().split('?').next() == Some(path))
        .cloned()
        .collect()
}

async fn sign_in(
    world: World,
    o: impl FnOnce(&mut OAuth2Source),
) -> (Result<SignedIn, SignInError>, Log, String) {
    let (base, log) = start(world).await;
    let spec = spec(&base, o);
    let r = login(&context(), &spec, None, None, &Options::default(), browser).await;
    (r, log, base)
}

#[tokio::test]
async fn a_sign_in_with_only_the_upstream_registers_and_redeems_the_code_with_pkce_state_and_resource() {
    let (r, log, base) = sign_in(World::default(), |_| {}).await;
    let signed_in = r.unwrap();
    let issuer = format!("{base}/as");
    assert_eq!(signed_in.issuer, issuer);
    assert_eq!(signed_in.refresh_token.unwrap().expose(), "rt-1");
    let reg = &signed_in.registrations.0[&issuer];
    assert_eq!(reg.client_id, "dyn-1");
    assert_eq!(reg.method, RegistrationMethod::Dynamic);
    assert_eq!(reg.scope.as_deref(), Some("mcp:read mcp:write offline_access"));

    // Registration: a native public client with the loopback redirect.
    let register = &requests(&log, "/as/register")[0];
    let body: Value = serde_json::from_str(&register.body).unwrap();
    assert_eq!(body["application_type"], "native");
    assert_eq!(body["token_endpoint_auth_method"], "none");
    let redirect = body["redirect_uris"][0].as_str().unwrap().to_owned();
    assert!(
        redirect.starts_with("http://127.0.0.1:") && redirect.ends_with("/callback"),
        "{redirect}"
    );
    assert_eq!(
        body["grant_types"],
        serde_json::json!(["authorization_code", "refresh_token"])
    );

    // Authorization: PKCE S256, a state, the resource, the challenge's scopes plus offline_access.
    let q = query_of(&requests(&log, "/as/authorize")[0]);
    assert_eq!(param(&q, "response_type").as_deref(), Some("code"));
    assert_eq!(param(&q, "client_id").as_deref(), Some("dyn-1"));
    assert_eq!(param(&q, "code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(param(&q, "code_challenge").unwrap().len(), 43);
    assert!(param(&q, "state").unwrap().len() >= 43);
    assert_eq!(param(&q, "resource"), Some(format!("{base}/mcp")));
    assert_eq!(
        param(&q, "scope").as_deref(),
        Some("mcp:read mcp:write offline_access")
    );
    assert_eq!(param(&q, "redirect_uri"), Some(redirect.clone()));

    // Token: the verifier, the same redirect URI and resource.
    let token = &requests(&log, "/as/token")[0];
    assert_eq!(token.param("grant_type").as_deref(), Some("authorization_code"));
    assert_eq!(token.param("redirect_uri"), Some(redirect));
    assert_eq!(token.param("resource"), Some(format!("{base}/mcp")));
    assert_eq!(token.param("client_id").as_deref(), Some("dyn-1"));
    assert_eq!(token.param("code_verifier").unwrap().len(), 43);
}

#[tokio::test]
async fn a_server_without_s256_is_refused_before_anything_is_sent() {
    for pkce in [Some(r#"["plain"]"#), None] {
        let (r, log, _) = sign_in(
            World {
                pkce,
                ..World::default()
            },
            |_| {},
        )
        .await;
        let e = r.unwrap_err();
        assert!(matches!(e, SignInError::NoS256 { .. }), "{e}");
        assert!(e.to_string().contains("enable PKCE S256"), "{e}");
        assert!(requests(&log, "/as/register").is_empty());
        assert!(requests(&log, "/as/authorize").is_empty());
    }
}

#[tokio::test]
async fn an_iss_that_does_not_match_is_refused_and_the_code_never_redeemed() {
    let (r, log, _) = sign_in(
        World {
            iss: Some("https://evil.example"),
            ..World::default()
        },
        |_| {},
    )
    .await;
    let e = r.unwrap_err();
    assert!(matches!(e, SignInError::IssMismatch { .. }), "{e}");
    assert!(e.to_string().contains("Run the command again"), "{e}");
    assert!(requests(&log, "/as/token").is_empty());
}

#[tokio::test]
async fn a_mismatched_iss_wins_over_the_error_it_carries() {
    let (r, _, _) = sign_in(
        World {
            iss: Some("https://evil.example"),
            deny: Some("access_denied"),
            ..World::default()
        },
        |_| {},
    )
    .await;
    assert!(matches!(r.unwrap_err(), SignInError::IssMismatch { .. }));
}

#[tokio::test]
async fn a_missing_iss_is_refused_when_the_server_promises_it_and_accepted_when_not() {
    let (r, log, _) = sign_in(
        World {
            iss: None,
            ..World::default()
        },
        |_| {},
    )
    .await;
    assert!(matches!(r.unwrap_err(), SignInError::IssMissing { .. }));
    assert!(requests(&log, "/as/token").is_empty());
    let (r, _, _) = sign_in(
        World {
            iss: None,
            iss_supported: false,
            ..World::default()
        },
        |_| {},
    )
    .await;
    r.unwrap();
}

#[tokio::test]
async fn a_redirect_with_a_foreign_state_is_refused_and_its_code_never_redeemed() {
    let (r, log, _) = sign_in(
        World {
            foreign_state: Some("attacker-state"),
            ..World::default()
        },
        |_| {},
    )
    .await;
    let e = r.unwrap_err();
    assert!(matches!(e, SignInError::StateMismatch), "{e}");
    assert!(e.to_string().contains("nothing was redeemed or stored"), "{e}");
    assert!(requests(&log, "/as/token").is_empty());
}

/// The attack: another page on this machine calls the listener with its own code before the
/// person's redirect arrives. It decides nothing but its own refusal; its code is never redeemed.
#[tokio::test]
async fn a_code_injected_by_another_page_is_not_redeemed() {
    let (base, log) = start(World::default()).await;
    let spec = spec(&base, |_| {});
    let r = login(&context(), &spec, None, None, &Options::default(), |p| {
        let Prompt::Browser { url } = p else { panic!() };
        let q = parse_query(url.split_once('?').unwrap().1);
        let redirect = param(&q, "redirect_uri").unwrap();
        tokio::spawn(async move {
            // No state at all, then a guessed one: the first request to the callback decides.
            let _ = reqwest::get(format!("{redirect}?code=attacker-code")).await;
        });
    })
    .await;
    assert!(matches!(r.unwrap_err(), SignInError::StateMismatch));
    assert!(requests(&log, "/as/token").is_empty());
}

#[tokio::test]
async fn the_listener_ignores_idle_connections_and_other_paths_and_closes_after_the_redirect() {
    let (base, _) = start(World::default()).await;
    let spec = spec(&base, |_| {});
    let port = Arc::new(Mutex::new(0u16));
    let seen_port = port.clone();
    let r = login(&context(), &spec, None, None, &Options::default(), move |p| {
        let Prompt::Browser { url } = p else { panic!() };
        let q = parse_query(url.split_once('?').unwrap().1);
        let redirect = param(&q, "redirect_uri").unwrap();
        *seen_port.lock().unwrap() = loopback_port(&redirect).unwrap();
        let url = url.clone();
        tokio::spawn(async move {
            // A spare connection that never sends a request, and a favicon request.
            let idle = TcpStream::connect(redirect.trim_start_matches("http://").split('/').next().unwrap())
                .await
                .unwrap();
            let favicon = redirect.replace("/callback", "/favicon.ico");
            assert_eq!(reqwest::get(favicon).await.unwrap().status(), 404);
            let _ = reqwest::get(url).await;
            drop(idle);
        });
    })
    .await;
    r.unwrap();
    let port = *port.lock().unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "the listener is closed after the sign-in"
    );
}

#[tokio::test]
async fn a_registration_answer_without_client_id_is_an_error_naming_the_fix() {
    let (r, log, _) = sign_in(
        World {
            registration: Some((201, r#"{"client_secret":"x"}"#)),
            ..World::default()
        },
        |_| {},
    )
    .await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("no client_id") && e.contains("oauth2.clientId"), "{e}");
    assert!(requests(&log, "/as/authorize").is_empty());
}

#[tokio::test]
async fn a_refused_registration_names_the_servers_error() {
    let (r, _, _) = sign_in(
        World {
            registration: Some((
                400,
                r#"{"error":"invalid_redirect_uri","error_description":"no loopback"}"#,
            )),
            ..World::default()
        },
        |_| {},
    )
    .await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("HTTP 400 invalid_redirect_uri (no loopback)"), "{e}");
}

#[tokio::test]
async fn consent_denied_says_so_and_stores_nothing() {
    let (r, log, _) = sign_in(
        World {
            deny: Some("access_denied"),
            ..World::default()
        },
        |_| {},
    )
    .await;
    let e = r.unwrap_err();
    assert!(matches!(e, SignInError::Denied { .. }));
    assert!(e.to_string().contains("Consent was denied"), "{e}");
    assert!(requests(&log, "/as/token").is_empty());
}

#[tokio::test]
async fn a_client_metadata_document_is_the_client_id_when_the_server_supports_it() {
    let url = "https://client.example/mcp-credentials.json";
    let (r, log, _) = sign_in(
        World {
            cimd: true,
            ..World::default()
        },
        |o| {
            o.sign_in = Some(crate::SignIn {
                secret_name: None,
                client_metadata_url: Some(url.into()),
            })
        },
    )
    .await;
    let s = r.unwrap();
    let reg = s.registrations.0.values().next().unwrap();
    assert_eq!(reg.client_id, url);
    assert_eq!(reg.method, RegistrationMethod::ClientMetadataDocument);
    assert!(requests(&log, "/as/register").is_empty());
    assert_eq!(
        param(&query_of(&requests(&log, "/as/authorize")[0]), "client_id").as_deref(),
        Some(url)
    );
}

#[tokio::test]
async fn cimd_without_a_configured_url_falls_back_to_dynamic_registration() {
    let (r, log, _) = sign_in(
        World {
            cimd: true,
            ..World::default()
        },
        |_| {},
    )
    .await;
    assert_eq!(
        r.unwrap().registrations.0.values().next().unwrap().client_id,
        "dyn-1"
    );
    assert_eq!(requests(&log, "/as/register").len(), 1);
}

#[tokio::test]
async fn a_pre_registered_client_registers_nothing_and_authenticates_with_its_secret() {
    let (base, log) = start(World::default()).await;
    let spec = spec(&base, |o| o.client_id = "pre-1".into());
    let s = login(
        &context(),
        &spec,
        None,
        Some(SecretString::new("pre-secret")),
        &Options::default(),
        browser,
    )
    .await
    .unwrap();
    assert!(requests(&log, "/as/register").is_empty());
    let reg = s.registrations.0.values().next().unwrap();
    assert_eq!(reg.method, RegistrationMethod::PreRegistered);
    assert!(reg.client_secret.is_none(), "the secret stays in its own Secret");
    let token = &requests(&log, "/as/token")[0];
    assert_eq!(token.basic().as_deref(), Some("pre-1:pre-secret"));
}

#[tokio::test]
async fn a_registration_kept_for_the_issuer_is_reused_on_the_same_port() {
    let (base, log) = start(World::default()).await;
    let spec = spec(&base, |_| {});
    let first = login(&context(), &spec, None, None, &Options::default(), browser)
        .await
        .unwrap();
    let again = login(
        &context(),
        &spec,
        Some(first.registrations.clone()),
        None,
        &Options::default(),
        browser,
    )
    .await
    .unwrap();
    assert_eq!(requests(&log, "/as/register").len(), 1, "registered once");
    assert_eq!(
        first.registrations.0.values().next().unwrap().redirect_uris,
        again.registrations.0.values().next().unwrap().redirect_uris
    );
}

/// A server may refuse a dynamically registered client any scope it was not registered for: a
/// step-up beyond `oauth2.scopes` registers a client for the union, which later sign-ins reuse.
#[tokio::test]
async fn a_step_up_beyond_the_registered_scopes_registers_a_client_for_them() {
    let (base, log) = start(World::default()).await;
    let spec = spec(&base, |o| o.scopes = vec!["read".into()]);
    let first = login(&context(), &spec, None, None, &Options::default(), browser)
        .await
        .unwrap();
    let registered =
        |i: usize| -> Value { serde_json::from_str(&requests(&log, "/as/register")[i].body).unwrap() };
    assert_eq!(registered(0)["scope"], "read");
    let step_up = Options {
        step_up: Some(step_up::StepUp {
            scope: "read write".into(),
            pending: true,
            attempts: Default::default(),
        }),
        ..Options::default()
    };
    let second = login(
        &context(),
        &spec,
        Some(first.registrations.clone()),
        None,
        &step_up,
        browser,
    )
    .await
    .unwrap();
    assert_eq!(requests(&log, "/as/register").len(), 2, "registered again");
    assert_eq!(registered(1)["scope"], "read write");
    let kept = second.registrations.0.values().next().unwrap();
    assert_eq!(kept.registered_scope.as_deref(), Some("read write"));
    // The same step-up again, and a sign-in for less: the new client covers both.
    for options in [&step_up, &Options::default()] {
        login(
            &context(),
            &spec,
            Some(second.registrations.clone()),
            None,
            options,
            browser,
        )
        .await
        .unwrap();
    }
    assert_eq!(requests(&log, "/as/register").len(), 2, "reused");
}

#[tokio::test]
async fn the_device_grant_polls_until_the_person_approves() {
    let world = World::default();
    *world.pending.lock().unwrap() = 2;
    let (base, log) = start(world).await;
    let spec = spec(&base, |_| {});
    let shown = Arc::new(Mutex::new(None));
    let s2 = shown.clone();
    let s = login(
        &context(),
        &spec,
        None,
        None,
        &Options {
            device: true,
            ..Options::default()
        },
        move |p| *s2.lock().unwrap() = Some(p.clone()),
    )
    .await
    .unwrap();
    assert_eq!(s.refresh_token.as_ref().unwrap().expose(), "rt-1");
    match shown.lock().unwrap().clone().unwrap() {
        Prompt::Device { user_code, .. } => assert_eq!(user_code, "ABCD-EFGH"),
        p => panic!("{p:?}"),
    }
    let body: Value = serde_json::from_str(&requests(&log, "/as/register")[0].body).unwrap();
    assert!(body.get("redirect_uris").is_none());
    assert_eq!(requests(&log, "/as/token").len(), 3);
    assert_eq!(
        requests(&log, "/as/device")[0].param("resource"),
        Some(format!("{base}/mcp"))
    );
}

#[tokio::test]
async fn without_any_metadata_the_2025_03_26_default_endpoints_are_used() {
    let (r, log, base) = sign_in(
        World {
            no_metadata: true,
            iss: None,
            ..World::default()
        },
        |_| {},
    )
    .await;
    let s = r.unwrap();
    assert_eq!(s.issuer, base);
    assert_eq!(requests(&log, "/register").len(), 1);
    assert_eq!(requests(&log, "/authorize").len(), 1);
    assert_eq!(requests(&log, "/token").len(), 1);
}

fn discovered(challenge: Option<&str>, prm: &[&str], as_scopes: &[&str]) -> Discovered {
    Discovered {
        resource_metadata: String::new(),
        issuer: String::new(),
        token_endpoint: String::new(),
        server: crate::source::discovery::ServerMetadata {
            scopes_supported: as_scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
        challenge_scope: challenge.map(str::to_owned),
        resource_scopes: prm.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn scopes_come_from_the_challenge_then_the_resource_metadata_then_none() {
    let o = spec("http://x", |_| {}).source.oauth2.unwrap();
    assert_eq!(
        scope(&discovered(Some("a b"), &["c"], &[]), &o).as_deref(),
        Some("a b")
    );
    assert_eq!(
        scope(&discovered(None, &["c", "d"], &[]), &o).as_deref(),
        Some("c d")
    );
    assert_eq!(scope(&discovered(None, &[], &["offline_access"]), &o), None);
    // offline_access only when the authorization server lists it.
    assert_eq!(
        scope(&discovered(Some("a"), &[], &["a", "offline_access"]), &o).as_deref(),
        Some("a offline_access")
    );
    assert_eq!(
        scope(&discovered(Some("a offline_access"), &[], &["a"]), &o).as_deref(),
        Some("a")
    );
    // Configured scopes win.
    let mut o2 = o.clone();
    o2.scopes = vec!["x".into()];
    assert_eq!(
        scope(&discovered(Some("a"), &["c"], &[]), &o2).as_deref(),
        Some("x")
    );
}

#[test]
fn s256_is_base64url_of_sha256_without_padding() {
    // Computed independently: python3 hashlib.sha256 + base64.urlsafe_b64encode, '=' stripped.
    assert_eq!(
        s256("dBjftJeZ4CVP-mJ92IZYPbH7xUK1f0r2bz3i9VJ0qzY"),
        "zm_kM9IbTXHmLFKrE0uVivfupjwqBNn3AChe1fV-NRQ"
    );
}

#[test]
fn stored_registrations_round_trip_and_a_broken_one_names_the_key_not_its_content() {
    let mut r = Registrations::default();
    r.0.insert(
        "https://as.example".into(),
        Registration {
            client_secret: Some(SecretString::new("shh")),
            ..Registration::pre_registered(
                &spec("http://x", |o| o.client_id = "c".into())
                    .source
                    .oauth2
                    .unwrap(),
            )
        },
    );
    let json = r.to_json();
    assert_eq!(Registrations::parse(json.expose()).unwrap(), r);
    assert!(
        !format!("{r:?}").contains("shh"),
        "Debug never prints the client secret"
    );
    let e = Registrations::parse("{\"https://as\": {\"client_id\": \"shh-secret\"").unwrap_err();
    assert!(e.contains("\"registration\"") && !e.contains("shh"), "{e}");
}

/// After the sign-in, the credential refreshes like a refreshToken one: rotation, and a revoked
/// grant asks for a new sign-in (with the command) instead of retrying.
#[tokio::test]
async fn a_signed_in_credential_refreshes_rotates_and_asks_for_a_new_sign_in_on_invalid_grant() {
    let world = World::default();
    let issued = world.issued.clone();
    let (base, log) = start(world).await;
    let spec = spec(&base, |_| {});
    let s = login(&context(), &spec, None, None, &Options::default(), browser)
        .await
        .unwrap();
    let [(k1, rt), (k2, at), (k3, reg)] = s.data();
    assert!(at.is_empty(), "no access token is kept beside a refresh token");
    let secrets = MapResolver::default()
        .with("c-sign-in", k1, rt.expose())
        .with("c-sign-in", k2, at.expose())
        .with("c-sign-in", k3, reg.expose());
    let ctx = context();
    let i = obtain("c", &spec, &secrets, &ctx).await.unwrap();
    assert_eq!(i.token.expose(), "at-2");
    assert_eq!(i.rotated_refresh_token.unwrap().expose(), "rt-2");
    let refresh = requests(&log, "/as/token").pop().unwrap();
    assert_eq!(refresh.param("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(refresh.param("refresh_token").as_deref(), Some("rt-1"));
    assert_eq!(refresh.param("client_id").as_deref(), Some("dyn-1"));
    assert_eq!(refresh.param("resource"), Some(format!("{base}/mcp")));

    // The server has moved on (rt-2); rt-1 is now invalid_grant.
    assert_eq!(*issued.lock().unwrap(), 2);
    let e = obtain("c", &spec, &secrets, &ctx).await.unwrap_err();
    assert_eq!(e.reason(), "SignInRequired");
    assert_eq!(e.category(), "invalid_grant");
    assert!(e.to_string().contains("a person must sign in"), "{e}");
}

#[tokio::test]
async fn a_never_signed_in_credential_needs_a_sign_in_and_says_the_command() {
    struct WithCommand(MapResolver);
    impl crate::source::SecretResolver for WithCommand {
        async fn get(&self, r: &crate::SecretKeyRef) -> Result<SecretString, crate::source::ResolveError> {
            self.0.get(r).await
        }
        fn sign_in_command(&self, credential: &str) -> Option<String> {
            Some(format!("kubectl mcpcred login {credential} -n team"))
        }
    }
    let (base, log) = start(World::default()).await;
    let spec = spec(&base, |_| {});
    let e = obtain("c", &spec, &WithCommand(MapResolver::default()), &context())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "SignInRequired");
    let m = e.to_string();
    assert!(
        m.contains("not signed in yet") && m.contains("run `kubectl mcpcred login c -n team`"),
        "{m}"
    );
    assert!(requests(&log, "/as/token").is_empty());
}

#[tokio::test]
async fn a_registration_with_another_issuer_is_never_reused() {
    let (base, log) = start(World::default()).await;
    let spec = spec(&base, |_| {});
    let mut regs = Registrations::default();
    regs.0.insert(
        "https://old-as.example".into(),
        Registration {
            method: RegistrationMethod::Dynamic,
            ..Registration::pre_registered(
                &spec
                    .source
                    .oauth2
                    .clone()
                    .map(|mut o| {
                        o.client_id = "old".into();
                        o
                    })
                    .unwrap(),
            )
        },
    );
    let secrets = MapResolver::default()
        .with("c-sign-in", REFRESH_TOKEN_KEY, "rt-0")
        .with("c-sign-in", REGISTRATION_KEY, regs.to_json().expose());
    let e = obtain("c", &spec, &secrets, &context()).await.unwrap_err();
    assert_eq!(e.reason(), "SignInRequired");
    assert!(e.to_string().contains("never reused with another server"), "{e}");
    assert!(requests(&log, "/as/token").is_empty());
}

/// A server that issues no refresh token (the conformance suite's, many hosted ones): the sign-in
/// keeps the access token with its expiry, the credential serves it without any token request,
/// and from its renewal time asks for a new sign-in (naming the command), with no token request
/// either. What an earlier sign-in left (a refresh token) is overwritten with an empty value.
#[tokio::test]
async fn a_sign_in_without_a_refresh_token_serves_the_access_token_then_asks_for_a_new_sign_in() {
    let world = World {
        no_refresh_token: Some(3600),
        ..World::default()
    };
    let (base, log) = start(world).await;
    let spec = spec(&base, |_| {});
    let s = login(&context(), &spec, None, None, &Options::default(), browser)
        .await
        .unwrap();
    assert!(s.refresh_token.is_none());
    let held = s.held.clone().expect("the access token is kept");
    assert_eq!(held.token.expose(), "at-1");
    let lifetime = held.expires_at.unwrap().duration_since(held.issued_at).unwrap();
    assert_eq!(lifetime, Duration::from_secs(3600));
    let data = s.data();
    assert_eq!(
        data.clone().map(|(k, _)| k),
        [REFRESH_TOKEN_KEY, ACCESS_TOKEN_KEY, REGISTRATION_KEY]
    );
    assert!(
        data[0].1.is_empty(),
        "an empty refresh token replaces an earlier one"
    );
    assert!(!data[1].1.expose().contains("rt-"));
    let store = |held: &HeldToken| {
        MapResolver::default()
            .with("c-sign-in", REFRESH_TOKEN_KEY, "")
            .with("c-sign-in", ACCESS_TOKEN_KEY, held.to_json().expose())
            .with("c-sign-in", REGISTRATION_KEY, data[2].1.expose())
    };
    let token_requests = || requests(&log, "/as/token").len();
    assert_eq!(token_requests(), 1, "the code was redeemed once");

    let i = obtain("c", &spec, &store(&held), &context()).await.unwrap();
    assert_eq!(i.token.expose(), "at-1");
    assert_eq!((i.not_before, i.expires_at), (held.issued_at, held.expires_at));
    assert!(i.rotated_refresh_token.is_none());
    assert_eq!(
        token_requests(),
        1,
        "serving a held token asks nothing of the server"
    );
    assert_eq!(HeldToken::parse(held.to_json().expose()).unwrap(), held);

    // An hour later the renewal time (2/3 of the lifetime) has passed: sign in again.
    let old = HeldToken {
        issued_at: held.issued_at - Duration::from_secs(3000),
        expires_at: held.expires_at.map(|e| e - Duration::from_secs(3000)),
        ..held.clone()
    };
    let e = obtain("c", &spec, &store(&old), &context()).await.unwrap_err();
    assert_eq!(e.reason(), "SignInRequired");
    let m = e.to_string();
    assert!(
        m.contains("issued no refresh token") && m.contains("expires at"),
        "{m}"
    );
    assert!(!m.contains("at-1"), "{m}");
    assert_eq!(token_requests(), 1, "no token request once a sign-in is needed");

    // Unreadable: a sign-in is needed, and the message holds nothing of the value.
    let bad = MapResolver::default().with("c-sign-in", ACCESS_TOKEN_KEY, "at-1 not json");
    let m = obtain("c", &spec, &bad, &context())
        .await
        .unwrap_err()
        .to_string();
    assert!(m.contains("sign in again") && !m.contains("at-1"), "{m}");
}

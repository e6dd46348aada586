//! Discovery against in-process servers playing the upstream, its protected resource metadata and
//! its authorization server, including the hostile answers: a wrong issuer, metadata pointing at
//! the cloud metadata address or redirecting to it, huge and slow bodies.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use super::*;
use crate::{
    CredentialSource, McpCredentialSpec, OAuth2Grant, OAuth2Source, SecretKeyRef,
    source::{
        SourceContext, obtain,
        test_support::{self, Answer, Log, MapResolver, Seen, context, routed},
    },
};

#[test]
fn resource_metadata_is_read_from_the_bearer_challenge() {
    let h = r#"Bearer realm="mcp", error="invalid_token", resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp""#;
    assert_eq!(
        resource_metadata([h]).as_deref(),
        Some("https://mcp.example.com/.well-known/oauth-protected-resource/mcp")
    );
}

#[test]
fn challenges_parse_several_schemes_quoted_commas_escapes_and_token68() {
    let h = r#"Negotiate abc123==, Basic realm="a, \"quoted\" realm", BEARER scope="read write",Resource_Metadata="https://x.example/prm""#;
    let c = challenges(h);
    let schemes: Vec<_> = c.iter().map(|c| c.scheme.as_str()).collect();
    assert_eq!(schemes, ["Negotiate", "Basic", "BEARER"], "{c:?}");
    assert_eq!(
        c[1].params,
        [("realm".to_owned(), r#"a, "quoted" realm"#.to_owned())]
    );
    assert_eq!(c[2].params.len(), 2);
    // Scheme and parameter names are case-insensitive.
    assert_eq!(resource_metadata([h]).as_deref(), Some("https://x.example/prm"));
}

#[test]
fn only_a_bearer_challenge_counts_and_any_header_may_hold_it() {
    assert_eq!(
        resource_metadata([r#"Basic resource_metadata="https://no.example/""#]),
        None
    );
    assert_eq!(
        resource_metadata([
            "Basic realm=x",
            r#"Bearer resource_metadata=https://yes.example/prm"#
        ])
        .as_deref(),
        Some("https://yes.example/prm")
    );
    assert_eq!(resource_metadata(["Bearer"]), None);
    assert_eq!(resource_metadata([""]), None);
    // Garbage never panics.
    for junk in [
        "Bearer =",
        "Bearer ,,,=\"",
        "\"",
        "Bearer a=\"unterminated",
        ";;;",
        "Bearer a=b=c",
    ] {
        let _ = challenges(junk);
    }
}

#[test]
fn metadata_urls_follow_the_spec_order() {
    let p = OutboundPolicy {
        allow_loopback: false,
    };
    assert_eq!(
        metadata_urls("https://as.example.com/tenant/1", p).unwrap(),
        [
            "https://as.example.com/.well-known/oauth-authorization-server/tenant/1",
            "https://as.example.com/.well-known/openid-configuration/tenant/1",
            "https://as.example.com/tenant/1/.well-known/openid-configuration",
        ]
    );
    assert_eq!(
        metadata_urls("https://as.example.com", p).unwrap(),
        [
            "https://as.example.com/.well-known/oauth-authorization-server",
            "https://as.example.com/.well-known/openid-configuration",
        ]
    );
    assert!(metadata_urls("https://169.254.169.254/", p).is_err());
}

#[test]
fn a_resource_must_name_the_upstream_or_a_prefix_of_it() {
    let up = reqwest::Url::parse("https://mcp.example.com/mcp").unwrap();
    assert!(resource_matches("https://mcp.example.com/mcp", &up));
    assert!(resource_matches("https://mcp.example.com/mcp/", &up));
    assert!(resource_matches("https://mcp.example.com", &up));
    assert!(!resource_matches("https://mcp.example.com/m", &up));
    assert!(!resource_matches("https://evil.example.com/mcp", &up));
    assert!(!resource_matches("http://mcp.example.com/mcp", &up));
}

/// What the fake servers do: one server plays upstream, resource metadata and authorization
/// server; each test changes what it needs.
#[derive(Clone)]
struct World {
    /// The upstream's challenge header (`{base}` is replaced), or none.
    challenge: Option<&'static str>,
    /// Paths of the protected resource metadata that exist.
    prm_paths: Vec<&'static str>,
    /// The PRM document (`{base}` replaced).
    prm: &'static str,
    /// Paths of AS metadata that exist, and the document they serve (`{base}` replaced).
    as_paths: Vec<&'static str>,
    as_doc: &'static str,
    /// A path answering this instead.
    special: Option<(&'static str, Answer)>,
    /// Token endpoint status (200 gives a token).
    token_status: Arc<Mutex<u16>>,
}

impl Default for World {
    fn default() -> Self {
        Self {
            challenge: Some(
                r#"Bearer error="invalid_request", resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#,
            ),
            prm_paths: vec!["/.well-known/oauth-protected-resource/mcp"],
            prm: r#"{"resource":"{base}/mcp","authorization_servers":["{base}/tenant"]}"#,
            as_paths: vec!["/.well-known/openid-configuration/tenant"],
            as_doc: r#"{"issuer":"{base}/tenant","token_endpoint":"{base}/tenant/token"}"#,
            special: None,
            token_status: Arc::new(Mutex::new(200)),
        }
    }
}

async fn start(world: World) -> (String, Log) {
    let base_cell: Arc<Mutex<String>> = Arc::default();
    let cell = base_cell.clone();
    let (base, log) = routed(move |req: &Seen| {
        let base = cell.lock().unwrap().clone();
        let fill = |s: &str| s.replace("{base}", &base);
        let path = req.path();
        if let Some((p, answer)) = &world.special
            && *p == path
        {
            return answer.clone();
        }
        if path == "/mcp" {
            let headers = world
                .challenge
                .map(|c| vec![("www-authenticate".to_owned(), fill(c))])
                .unwrap_or_default();
            return Answer::With(401, headers, r#"{"error":"unauthorized"}"#.into());
        }
        if world.prm_paths.contains(&path) {
            return Answer::Json(200, fill(world.prm));
        }
        if world.as_paths.contains(&path) {
            return Answer::Json(200, fill(world.as_doc));
        }
        if path == "/tenant/token" {
            let status = *world.token_status.lock().unwrap();
            return if status == 200 {
                Answer::Json(200, r#"{"access_token":"at-1","expires_in":60}"#.into())
            } else {
                Answer::Raw(status, "text/plain", "no".into())
            };
        }
        Answer::Raw(404, "text/plain", "not found".into())
    })
    .await;
    *base_cell.lock().unwrap() = base.clone();
    (base, log)
}

fn spec(upstream: &str) -> McpCredentialSpec {
    let mut spec = test_support::spec(CredentialSource {
        oauth2: Some(OAuth2Source {
            grant: OAuth2Grant::ClientCredentials,
            token_url: None,
            client_id: "agent".into(),
            client_secret: Some(SecretKeyRef {
                name: "idp".into(),
                key: "secret".into(),
            }),
            client_auth: None,
            private_key: None,
            refresh_token: None,
            scopes: vec![],
            resource: None,
            audience: None,
            extra_params: Default::default(),
            quirks: None,
            sign_in: None,
        }),
        ..Default::default()
    });
    spec.upstream = upstream.to_owned();
    spec
}

fn secrets() -> MapResolver {
    MapResolver::default().with("idp", "secret", "s")
}

fn paths(log: &Log) -> Vec<String> {
    log.lock().unwrap().iter().map(|s| s.path().to_owned()).collect()
}

async fn discover_in(
    world: World,
    ctx: &SourceContext,
) -> (
    String,
    Log,
    Result<crate::source::Issued, crate::source::SourceError>,
) {
    let (base, log) = start(world).await;
    let r = obtain("t", &spec(&format!("{base}/mcp")), &secrets(), ctx).await;
    (base, log, r)
}

#[tokio::test]
async fn the_challenge_leads_to_the_metadata_and_the_issuers_oidc_document() {
    let ctx = context();
    let (base, log, r) = discover_in(World::default(), &ctx).await;
    assert_eq!(r.unwrap().token.expose(), "at-1");
    assert_eq!(
        paths(&log),
        [
            "/mcp",
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-authorization-server/tenant",
            "/.well-known/openid-configuration/tenant",
            "/tenant/token",
        ]
    );
    let probe = log.lock().unwrap()[0].clone();
    assert!(probe.head.starts_with("POST /mcp"), "{}", probe.head);
    assert!(
        !probe.head.to_ascii_lowercase().contains("authorization:"),
        "no credential on the probe"
    );
    let status = ctx.discovered(&spec(&format!("{base}/mcp"))).unwrap();
    assert_eq!(
        status.resource_metadata.as_deref(),
        Some(format!("{base}/.well-known/oauth-protected-resource/mcp").as_str())
    );
    assert_eq!(status.issuer.as_deref(), Some(format!("{base}/tenant").as_str()));
    assert_eq!(
        status.token_endpoint.as_deref(),
        Some(format!("{base}/tenant/token").as_str())
    );

    // Cached: the next refresh is one token request.
    let before = log.lock().unwrap().len();
    obtain("t", &spec(&format!("{base}/mcp")), &secrets(), &ctx)
        .await
        .unwrap();
    assert_eq!(paths(&log)[before..], ["/tenant/token"]);
}

#[tokio::test]
async fn without_a_challenge_the_path_inserted_then_the_root_well_known_uri_is_tried() {
    let world = World {
        challenge: None,
        prm_paths: vec!["/.well-known/oauth-protected-resource"],
        prm: r#"{"resource":"{base}","authorization_servers":["{base}"]}"#,
        as_paths: vec!["/.well-known/oauth-authorization-server"],
        as_doc: r#"{"issuer":"{base}","token_endpoint":"{base}/tenant/token"}"#,
        ..World::default()
    };
    let (_, log, r) = discover_in(world, &context()).await;
    r.unwrap();
    assert_eq!(
        paths(&log),
        [
            "/mcp",
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-authorization-server",
            "/tenant/token",
        ]
    );
}

#[tokio::test]
async fn metadata_with_another_issuer_is_not_used_and_the_message_lists_every_attempt() {
    let world = World {
        as_paths: vec![
            "/.well-known/oauth-authorization-server/tenant",
            "/.well-known/openid-configuration/tenant",
            "/tenant/.well-known/openid-configuration",
        ],
        as_doc: r#"{"issuer":"https://evil.example.com/tenant","token_endpoint":"{base}/tenant/token"}"#,
        ..World::default()
    };
    let (_, log, r) = discover_in(world, &context()).await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "DiscoveryFailed");
    assert_eq!(e.category(), "config_error");
    let msg = e.to_string();
    assert_eq!(msg.matches("is not \"http://127.0.0.1").count(), 3, "{msg}");
    assert!(msg.contains("no tokenUrl is set"), "{msg}");
    assert!(
        !paths(&log).contains(&"/tenant/token".to_owned()),
        "no token request"
    );
}

#[tokio::test]
async fn metadata_pointing_at_the_cloud_metadata_address_is_refused_before_any_request() {
    let world = World {
        prm: r#"{"resource":"{base}/mcp","authorization_servers":["https://169.254.169.254/latest"]}"#,
        ..World::default()
    };
    let (_, _, r) = discover_in(world, &context()).await;
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("169.254.169.254") && msg.contains("link-local"),
        "{msg}"
    );

    let world = World {
        as_doc: r#"{"issuer":"{base}/tenant","token_endpoint":"http://metadata.google.internal/token"}"#,
        ..World::default()
    };
    let (_, _, r) = discover_in(world, &context()).await;
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("token_endpoint is refused"), "{msg}");
}

#[tokio::test]
async fn a_redirect_to_the_metadata_address_is_refused() {
    let world = World {
        special: Some((
            "/.well-known/oauth-authorization-server/tenant",
            Answer::With(
                302,
                vec![(
                    "location".into(),
                    "http://169.254.169.254/latest/meta-data/".into(),
                )],
                String::new(),
            ),
        )),
        as_paths: vec![],
        ..World::default()
    };
    let (_, _, r) = discover_in(world, &context()).await;
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("redirected to a refused URL") && msg.contains("169.254.169.254"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_huge_or_slow_metadata_document_is_not_read() {
    let huge = format!(r#"{{"resource":"x","pad":"{}"}}"#, "a".repeat(300 * 1024));
    let world = World {
        special: Some((
            "/.well-known/oauth-protected-resource/mcp",
            Answer::Json(200, huge),
        )),
        ..World::default()
    };
    let (_, _, r) = discover_in(world, &context()).await;
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("larger than 262144 bytes"), "{msg}");

    let world = World {
        special: Some(("/.well-known/oauth-protected-resource/mcp", Answer::SlowBody)),
        ..World::default()
    };
    let started = std::time::Instant::now();
    let (_, _, r) = discover_in(world, &context()).await;
    let e = r.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the client's deadline"
    );
    assert_eq!(e.category(), "transient_error", "{e}");
}

#[tokio::test]
async fn loopback_metadata_urls_need_the_explicit_opt_in() {
    let strict = SourceContext::new(Duration::from_secs(2), OutboundPolicy::default()).unwrap();
    let (_, log, r) = discover_in(World::default(), &strict).await;
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("loopback"), "{msg}");
    // Only the upstream (configured) and the URLs derived from it were requested.
    assert!(
        paths(&log)
            .iter()
            .all(|p| p == "/mcp" || p.starts_with("/.well-known/oauth-protected-resource")),
        "{:?}",
        paths(&log)
    );
}

#[tokio::test]
async fn a_resource_metadata_document_for_another_resource_is_not_used() {
    let world = World {
        prm: r#"{"resource":"https://other.example.com/mcp","authorization_servers":["{base}/tenant"]}"#,
        ..World::default()
    };
    let (_, _, r) = discover_in(world, &context()).await;
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("describes the resource"), "{msg}");
}

#[tokio::test]
async fn a_failing_discovered_token_endpoint_is_discovered_again() {
    let world = World::default();
    let token_status = world.token_status.clone();
    *token_status.lock().unwrap() = 404;
    let ctx = context();
    let (base, log, r) = discover_in(world, &ctx).await;
    assert_eq!(r.unwrap_err().reason(), "TokenEndpointError");
    assert!(
        ctx.discovered(&spec(&format!("{base}/mcp"))).is_none(),
        "the entry is dropped"
    );
    *token_status.lock().unwrap() = 200;
    let before = log.lock().unwrap().len();
    obtain("t", &spec(&format!("{base}/mcp")), &secrets(), &ctx)
        .await
        .unwrap();
    let again = &paths(&log)[before..];
    assert_eq!(again.first().map(String::as_str), Some("/mcp"), "{again:?}");
    assert_eq!(again.last().map(String::as_str), Some("/tenant/token"));
}

#[tokio::test]
async fn a_discovered_token_endpoint_that_redirects_is_not_followed() {
    // A 307 would replay the form (client secret, subject token) to wherever it points.
    let world = World {
        special: Some((
            "/tenant/token",
            Answer::With(307, vec![("location".into(), "/elsewhere".into())], String::new()),
        )),
        ..World::default()
    };
    let (_, log, r) = discover_in(world, &context()).await;
    assert_eq!(r.unwrap_err().to_string(), "the token endpoint answered HTTP 307");
    assert!(
        !paths(&log).contains(&"/elsewhere".to_owned()),
        "{:?}",
        paths(&log)
    );
}

#[tokio::test]
async fn at_most_three_authorization_servers_are_tried_and_the_others_are_named() {
    let servers: Vec<String> = (0..10).map(|i| format!("\"{{base}}/as{i}\"")).collect();
    let prm = format!(
        r#"{{"resource":"{{base}}/mcp","authorization_servers":[{}]}}"#,
        servers.join(",")
    );
    let world = World {
        prm: Box::leak(prm.into_boxed_str()),
        as_paths: vec![],
        ..World::default()
    };
    let (_, log, r) = discover_in(world, &context()).await;
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("7 not tried"), "{msg}");
    assert!(msg.contains("/as3"), "the first one skipped is named: {msg}");
    let tried: Vec<String> = paths(&log).into_iter().filter(|p| p.contains("/as")).collect();
    assert!(tried.iter().any(|p| p.ends_with("/as2")), "{tried:?}");
    assert!(
        !tried.iter().any(|p| p.contains("/as3")),
        "a fourth server was tried: {tried:?}"
    );
}

#[tokio::test]
async fn discovery_stops_when_its_time_budget_runs_out_and_says_so() {
    let world = World {
        special: Some(("/.well-known/oauth-authorization-server/tenant", Answer::Hang)),
        ..World::default()
    };
    // Each request may take 30 s; the whole discovery only 1 s.
    let ctx = SourceContext::new(Duration::from_secs(30), OutboundPolicy { allow_loopback: true })
        .unwrap()
        .with_discovery_budget(Duration::from_secs(1));
    let (_, log, r) = discover_in(world, &ctx).await;
    let e = r.unwrap_err();
    assert_eq!(e.category(), "transient_error", "{e}");
    let msg = e.to_string();
    assert!(msg.contains("time budget of 1s ran out"), "{msg}");
    // Nothing after the request that hung: not the OpenID document, not the token endpoint.
    assert!(
        !paths(&log)
            .iter()
            .any(|p| p.contains("openid-configuration") || p.ends_with("/token")),
        "{:?}",
        paths(&log)
    );
}

/// A sign-in credential's spec for `upstream` (the 2025-03-26 fallbacks apply to it).
fn sign_in_spec(upstream: &str) -> McpCredentialSpec {
    let mut s = spec(upstream);
    s.source.oauth2.as_mut().unwrap().grant = OAuth2Grant::AuthorizationCode;
    s
}

/// MCP 2025-03-26, no protected resource metadata: the server's root metadata names the issuer
/// `<origin>/oauth` (what the conformance suite's auth/2025-03-26-oauth-metadata-backcompat
/// serves).
fn root_metadata_world(as_doc: &'static str) -> World {
    World {
        challenge: Some(r#"Bearer error="invalid_token""#),
        prm_paths: vec![],
        as_paths: vec!["/.well-known/oauth-authorization-server"],
        as_doc,
        ..World::default()
    }
}

#[tokio::test]
async fn the_2025_03_26_root_metadata_is_used_as_it_is_with_an_issuer_that_has_a_path() {
    let world = root_metadata_world(
        r#"{"issuer":"{base}/oauth","authorization_endpoint":"{base}/oauth/authorize",
            "token_endpoint":"{base}/oauth/token","registration_endpoint":"{base}/oauth/register",
            "code_challenge_methods_supported":["S256"]}"#,
    );
    let (base, log) = start(world).await;
    let ctx = context();
    let d = ctx
        .discover(&sign_in_spec(&format!("{base}/mcp")), false)
        .await
        .unwrap();
    assert_eq!(d.issuer, format!("{base}/oauth"));
    assert_eq!(d.token_endpoint, format!("{base}/oauth/token"));
    assert_eq!(
        d.server.authorization_endpoint.as_deref(),
        Some(format!("{base}/oauth/authorize").as_str())
    );
    assert_eq!(
        d.server.registration_endpoint.as_deref(),
        Some(format!("{base}/oauth/register").as_str())
    );
    assert!(!d.server.default_endpoints);
    assert_eq!(
        d.resource_metadata,
        "none (2025-03-26 fallback: metadata at the origin)"
    );
    assert_eq!(
        paths(&log),
        [
            "/mcp",
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-authorization-server",
        ]
    );
}

#[tokio::test]
async fn the_2025_03_26_root_metadata_needs_an_issuer_on_the_servers_origin() {
    for (doc, why) in [
        (
            r#"{"issuer":"https://evil.example.com/oauth","token_endpoint":"{base}/oauth/token"}"#,
            "its issuer \"https://evil.example.com/oauth\" is not a URL on the MCP server's origin",
        ),
        (
            r#"{"token_endpoint":"{base}/oauth/token"}"#,
            "the document has no issuer",
        ),
    ] {
        let (base, _) = start(root_metadata_world(doc)).await;
        let e = context()
            .discover(&sign_in_spec(&format!("{base}/mcp")), false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
        assert!(!e.contains("default endpoints"), "{e}");
    }
}

#[tokio::test]
async fn an_issuer_named_by_protected_resource_metadata_keeps_the_strict_issuer_check() {
    // The same root document, but reached from the issuer the resource metadata names: RFC 8414
    // §3.3 applies, even for a sign-in credential.
    let world = World {
        challenge: None,
        prm_paths: vec!["/.well-known/oauth-protected-resource"],
        prm: r#"{"resource":"{base}","authorization_servers":["{base}"]}"#,
        as_paths: vec!["/.well-known/oauth-authorization-server"],
        as_doc: r#"{"issuer":"{base}/oauth","token_endpoint":"{base}/oauth/token"}"#,
        ..World::default()
    };
    let (base, log) = start(world).await;
    let e = context()
        .discover(&sign_in_spec(&format!("{base}/mcp")), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "GET {base}/.well-known/oauth-authorization-server: its issuer \"{base}/oauth\" is not \"{base}\""
        )),
        "{e}"
    );
    assert!(
        !paths(&log).iter().any(|p| p.starts_with("/oauth")),
        "{:?}",
        paths(&log)
    );
}

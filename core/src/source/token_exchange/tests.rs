//! The tokenExchange source against the in-process server (`test_support`): what each grant
//! sends, where the subject token comes from, the quirks, and how rejections are classified.

use std::sync::Mutex;

use base64::Engine;

use super::*;
use crate::{
    CredentialSource, ProviderQuirks, SecretKeyRef, SecretString, ServiceAccountSubject, SubjectToken,
    source::{
        ResolveError,
        test_support::{self, Answer, MapResolver, Seen, context, server},
    },
};

/// A resolver that can issue service-account tokens, recording what it was asked.
#[derive(Default)]
struct Cluster {
    secrets: MapResolver,
    asked: Mutex<Vec<(String, String, i64)>>,
}

impl SecretResolver for Cluster {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        self.secrets.get(r).await
    }

    async fn service_account_token(
        &self,
        name: &str,
        audience: &str,
        expiration_seconds: i64,
    ) -> Result<SecretString, ResolveError> {
        self.asked
            .lock()
            .unwrap()
            .push((name.into(), audience.into(), expiration_seconds));
        Ok(SecretString::new(format!("sa-token-for-{name}")))
    }
}

fn source(token_url: &str, t: impl FnOnce(&mut TokenExchangeSource)) -> McpCredentialSpec {
    let mut source = TokenExchangeSource {
        grant: ExchangeGrant::TokenExchange,
        token_url: Some(token_url.to_owned()),
        client_id: Some("exchanger".into()),
        client_secret: None,
        subject: SubjectToken {
            service_account: Some(ServiceAccountSubject {
                name: "research-agent".into(),
                audience: "https://idp.example.com".into(),
                expiration_seconds: None,
            }),
            secret_key_ref: None,
            token_type: None,
        },
        audience: Some("analytics".into()),
        scopes: vec!["analytics.read".into()],
        resource: None,
        requested_token_type: None,
        quirks: None,
        cross_app_access: None,
    };
    t(&mut source);
    test_support::spec(CredentialSource {
        token_exchange: Some(source),
        ..Default::default()
    })
}

fn stored_subject(t: &mut TokenExchangeSource) {
    t.subject.service_account = None;
    t.subject.secret_key_ref = Some(SecretKeyRef {
        name: "upstream-idp".into(),
        key: "id-token".into(),
    });
}

fn cluster() -> Cluster {
    Cluster {
        secrets: MapResolver::default()
            .with("upstream-idp", "id-token", "stored-subject")
            .with("exchange-client", "secret", "cs"),
        ..Default::default()
    }
}

fn jwt(claims: &str) -> String {
    let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.sig", e(r#"{"alg":"RS256"}"#), e(claims))
}

async fn exchange(
    answer: Answer,
    resolver: &impl SecretResolver,
    t: impl FnOnce(&mut TokenExchangeSource),
) -> (Result<Issued, SourceError>, Vec<Seen>) {
    let (url, seen) = server(answer).await;
    let r = crate::source::obtain("t", &source(&url, t), resolver, &context()).await;
    let seen = seen.lock().unwrap().clone();
    (r, seen)
}

fn ok() -> Answer {
    Answer::Json(
        200,
        r#"{"access_token":"exchanged","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer","expires_in":900}"#.into(),
    )
}

#[tokio::test]
async fn a_service_account_token_is_exchanged_for_an_upstream_token() {
    let c = cluster();
    let (r, seen) = exchange(ok(), &c, |_| {}).await;
    let issued = r.unwrap();
    assert_eq!(issued.token.expose(), "exchanged");
    assert_eq!(
        issued
            .expires_at
            .unwrap()
            .duration_since(issued.not_before)
            .unwrap()
            .as_secs(),
        900,
        "the issued token's expiry, not the service-account token's, drives renewal"
    );
    assert_eq!(
        *c.asked.lock().unwrap(),
        [(
            "research-agent".to_owned(),
            "https://idp.example.com".to_owned(),
            600
        )]
    );
    let req = &seen[0];
    for (k, v) in [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", "sa-token-for-research-agent"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("resource", "https://mcp.example.com/mcp"),
        ("audience", "analytics"),
        ("scope", "analytics.read"),
        ("client_id", "exchanger"),
    ] {
        assert_eq!(req.param(k).as_deref(), Some(v), "{k}");
    }
    assert!(
        !req.head.to_ascii_lowercase().contains("authorization:"),
        "a public client: no secret"
    );
}

#[tokio::test]
async fn jwt_bearer_sends_the_stored_token_as_the_assertion_with_basic_client_auth() {
    let (r, seen) = exchange(ok(), &cluster(), |t| {
        t.grant = ExchangeGrant::JwtBearer;
        stored_subject(t);
        t.client_secret = Some(SecretKeyRef {
            name: "exchange-client".into(),
            key: "secret".into(),
        });
        t.audience = None;
    })
    .await;
    r.unwrap();
    let req = &seen[0];
    assert_eq!(
        req.param("grant_type").as_deref(),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(req.param("assertion").as_deref(), Some("stored-subject"));
    assert_eq!(req.param("subject_token"), None);
    assert_eq!(req.param("requested_token_type"), None);
    assert_eq!(
        req.param("client_id"),
        None,
        "the client authenticates with Basic instead"
    );
    assert_eq!(req.basic().as_deref(), Some("exchanger:cs"));
}

#[tokio::test]
async fn token_types_and_service_account_lifetime_are_configurable() {
    let c = cluster();
    let (r, seen) = exchange(ok(), &c, |t| {
        t.subject.token_type = Some("urn:ietf:params:oauth:token-type:id_token".into());
        t.requested_token_type = Some("urn:ietf:params:oauth:token-type:jwt".into());
        t.subject.service_account.as_mut().unwrap().expiration_seconds = Some(3600);
    })
    .await;
    r.unwrap();
    assert_eq!(c.asked.lock().unwrap()[0].2, 3600);
    assert_eq!(
        seen[0].param("subject_token_type").as_deref(),
        Some("urn:ietf:params:oauth:token-type:id_token")
    );
    assert_eq!(
        seen[0].param("requested_token_type").as_deref(),
        Some("urn:ietf:params:oauth:token-type:jwt")
    );
}

#[tokio::test]
async fn quirks_omit_the_resource_and_accept_a_fixed_audience() {
    let exp = crate::timing::unix_seconds(std::time::SystemTime::now()) + 300;
    let token = jwt(&format!(r#"{{"exp":{exp},"aud":"api://analytics"}}"#));
    let answer = Answer::Json(200, format!(r#"{{"access_token":"{token}"}}"#));

    let (r, _) = exchange(answer.clone(), &cluster(), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "AudienceMismatch");
    assert!(e.to_string().contains("quirks.acceptAudiences"), "{e}");

    let (r, seen) = exchange(answer, &cluster(), |t| {
        t.quirks = Some(ProviderQuirks {
            omit_resource: true,
            accept_audiences: vec!["api://analytics".into()],
        });
    })
    .await;
    assert_eq!(crate::timing::unix_seconds(r.unwrap().expires_at.unwrap()), exp);
    assert_eq!(seen[0].param("resource"), None);

    // acceptAudiences alone: the resource is still sent, the other audience accepted.
    let token = jwt(&format!(r#"{{"exp":{exp},"aud":["api://analytics"]}}"#));
    let (r, seen) = exchange(
        Answer::Json(200, format!(r#"{{"access_token":"{token}"}}"#)),
        &cluster(),
        |t| {
            t.quirks = Some(ProviderQuirks {
                omit_resource: false,
                accept_audiences: vec!["api://analytics".into()],
            });
        },
    )
    .await;
    r.unwrap();
    assert!(seen[0].param("resource").is_some());
}

#[tokio::test]
async fn a_rejected_service_account_token_is_a_retried_trust_problem_not_a_reauthorization() {
    let answer = Answer::Json(
        400,
        r#"{"error":"invalid_grant","error_description":"subject token issuer is not trusted"}"#.into(),
    );
    let (r, _) = exchange(answer.clone(), &cluster(), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.reason(), e.category()),
        ("SubjectTokenRejected", "config_error")
    );
    let msg = e.to_string();
    assert!(
        msg.contains("issuer is not trusted") && msg.contains("subject.serviceAccount.audience"),
        "{msg}"
    );

    // A stored subject token that is rejected stays rejected until the Secret changes.
    let (r, _) = exchange(answer, &cluster(), stored_subject).await;
    assert_eq!(r.unwrap_err().category(), "invalid_grant");
}

#[tokio::test]
async fn without_a_cluster_a_service_account_subject_says_to_use_a_secret() {
    let (r, seen) = exchange(ok(), &MapResolver::default(), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.reason(), e.category()),
        ("ServiceAccountTokenFailed", "config_error")
    );
    assert!(e.to_string().contains("subject.secretKeyRef"), "{e}");
    assert!(seen.is_empty(), "no token request without a subject");
}

#[tokio::test]
async fn an_empty_stored_subject_or_a_secret_without_client_id_is_a_configuration_error() {
    let empty = Cluster {
        secrets: MapResolver::default().with("upstream-idp", "id-token", ""),
        ..Default::default()
    };
    let (r, _) = exchange(ok(), &empty, stored_subject).await;
    assert_eq!(r.unwrap_err().reason(), "InvalidConfiguration");

    let (r, seen) = exchange(ok(), &cluster(), |t| {
        t.client_id = None;
        t.client_secret = Some(SecretKeyRef {
            name: "exchange-client".into(),
            key: "secret".into(),
        });
    })
    .await;
    assert!(r.unwrap_err().to_string().contains("clientId is required"));
    assert!(seen.is_empty());
}

/// The ID-JAG the test identity provider issues (opaque to the client: only forwarded).
const ID_JAG: &str = "eyJ0eXAiOiJvYXV0aC1pZC1qYWcrand0In0.jag-payload.jag-signature";

fn id_jag_answer() -> Answer {
    Answer::Json(
        200,
        format!(
            r#"{{"access_token":"{ID_JAG}","issued_token_type":"urn:ietf:params:oauth:token-type:id-jag","token_type":"N_A","expires_in":300}}"#
        ),
    )
}

/// An identity provider at `/idp/token` answering `idp`, and the MCP server's authorization
/// server: its metadata (issuer `<base>/as`, for discovery) and `/as/token` answering `as_token`.
/// The MCP server at `/mcp` answers 401 with its protected resource metadata.
async fn enterprise(idp: Answer, as_token: Answer) -> (String, test_support::Log) {
    test_support::routed(move |req: &Seen| {
        let host = req
            .head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("host:")
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_default();
        let base = format!("http://{host}");
        match req.path() {
            "/idp/token" => idp.clone(),
            "/as/token" => as_token.clone(),
            "/mcp" => Answer::With(
                401,
                vec![(
                    "www-authenticate".into(),
                    format!(r#"Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#),
                )],
                r#"{"error":"invalid_token"}"#.into(),
            ),
            "/.well-known/oauth-protected-resource/mcp" => Answer::Json(
                200,
                format!(r#"{{"resource":"{base}/mcp","authorization_servers":["{base}/as"]}}"#),
            ),
            "/.well-known/oauth-authorization-server/as" => Answer::Json(
                200,
                format!(r#"{{"issuer":"{base}/as","token_endpoint":"{base}/as/token"}}"#),
            ),
            _ => Answer::Raw(404, "text/plain", "not found".into()),
        }
    })
    .await
}

/// A cross-app access credential for `<base>/mcp`: the person's ID token stored, the client
/// `exchanger` (secret `cs`) at the MCP server's authorization server, `idp-client` at the
/// identity provider; the MCP token endpoint discovered.
fn cross_app(base: &str, t: impl FnOnce(&mut TokenExchangeSource)) -> McpCredentialSpec {
    let mut spec = source("unused", |t| {
        t.grant = ExchangeGrant::JwtBearer;
        stored_subject(t);
        t.token_url = None;
        t.audience = None;
        t.scopes = vec!["mcp:read".into()];
        t.client_secret = Some(SecretKeyRef {
            name: "exchange-client".into(),
            key: "secret".into(),
        });
        t.cross_app_access = Some(crate::CrossAppAccess {
            token_url: format!("{base}/idp/token"),
            client_id: Some("idp-client".into()),
            client_secret: None,
            audience: None,
        });
    });
    spec.upstream = format!("{base}/mcp");
    t(spec.source.token_exchange.as_mut().unwrap());
    spec
}

async fn obtain_cross_app(
    idp: Answer,
    as_token: Answer,
    resolver: &impl SecretResolver,
    t: impl FnOnce(&mut TokenExchangeSource),
) -> (Result<Issued, SourceError>, Vec<Seen>, String) {
    let (base, seen) = enterprise(idp, as_token).await;
    let r = crate::source::obtain("t", &cross_app(&base, t), resolver, &context()).await;
    let seen = seen.lock().unwrap().clone();
    (r, seen, base)
}

fn posted<'a>(seen: &'a [Seen], path: &str) -> Vec<&'a Seen> {
    seen.iter().filter(|s| s.path() == path).collect()
}

#[tokio::test]
async fn cross_app_access_exchanges_the_id_token_for_an_id_jag_at_the_idp_then_redeems_it() {
    let (r, seen, base) = obtain_cross_app(id_jag_answer(), ok(), &cluster(), |_| {}).await;
    let issued = r.unwrap();
    assert_eq!(issued.token.expose(), "exchanged");

    let idp = posted(&seen, "/idp/token");
    assert_eq!(idp.len(), 1, "one exchange at the identity provider");
    let mcp = format!("{base}/mcp");
    let issuer = format!("{base}/as");
    for (k, v) in [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("requested_token_type", "urn:ietf:params:oauth:token-type:id-jag"),
        ("subject_token", "stored-subject"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:id_token"),
        ("audience", issuer.as_str()),
        ("resource", mcp.as_str()),
        ("scope", "mcp:read"),
        ("client_id", "idp-client"),
    ] {
        assert_eq!(idp[0].param(k).as_deref(), Some(v), "identity provider: {k}");
    }
    assert_eq!(idp[0].basic(), None, "a public client at the identity provider");

    let at_as = posted(&seen, "/as/token");
    assert_eq!(
        at_as.len(),
        1,
        "one JWT-bearer grant at the MCP server's authorization server"
    );
    for (k, v) in [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", ID_JAG),
        ("resource", mcp.as_str()),
        ("scope", "mcp:read"),
    ] {
        assert_eq!(at_as[0].param(k).as_deref(), Some(v), "authorization server: {k}");
    }
    assert_eq!(at_as[0].basic().as_deref(), Some("exchanger:cs"));
    assert_eq!(at_as[0].param("subject_token"), None);
    assert_eq!(at_as[0].param("client_id"), None, "Basic instead");
    // The identity provider first, then the authorization server.
    let order: Vec<&str> = seen
        .iter()
        .map(Seen::path)
        .filter(|p| p.ends_with("/token"))
        .collect();
    assert_eq!(order, ["/idp/token", "/as/token"]);
}

#[tokio::test]
async fn cross_app_access_sends_the_configured_idp_client_audience_subject_type_and_resource() {
    let c = Cluster {
        secrets: MapResolver::default()
            .with("upstream-idp", "id-token", "stored-subject")
            .with("exchange-client", "secret", "cs")
            .with("idp-client", "secret", "idp-cs"),
        ..Default::default()
    };
    let (r, seen, base) = obtain_cross_app(id_jag_answer(), ok(), &c, |t| {
        let x = t.cross_app_access.as_mut().unwrap();
        x.client_secret = Some(SecretKeyRef {
            name: "idp-client".into(),
            key: "secret".into(),
        });
        x.audience = Some("https://as.example.com".into());
        t.subject.token_type = Some("urn:ietf:params:oauth:token-type:saml2".into());
        t.resource = Some("https://mcp.example.com/other".into());
    })
    .await;
    // The resource configured for the MCP server is not the test server's: the token is opaque,
    // so no audience check refuses it.
    r.unwrap();
    let idp = posted(&seen, "/idp/token")[0];
    assert_eq!(idp.basic().as_deref(), Some("idp-client:idp-cs"));
    assert_eq!(idp.param("client_id"), None);
    assert_eq!(idp.param("audience").as_deref(), Some("https://as.example.com"));
    assert_eq!(
        idp.param("subject_token_type").as_deref(),
        Some("urn:ietf:params:oauth:token-type:saml2")
    );
    assert_eq!(
        idp.param("resource").as_deref(),
        Some("https://mcp.example.com/other")
    );
    let _ = base;

    // omitResource drops the resource from the authorization server's request, not from the
    // identity provider's (the ID-JAG names the MCP server).
    let (r, seen, base) = obtain_cross_app(id_jag_answer(), ok(), &cluster(), |t| {
        t.quirks = Some(ProviderQuirks {
            omit_resource: true,
            accept_audiences: vec![],
        });
    })
    .await;
    r.unwrap();
    assert_eq!(
        posted(&seen, "/idp/token")[0].param("resource"),
        Some(format!("{base}/mcp"))
    );
    assert_eq!(posted(&seen, "/as/token")[0].param("resource"), None);

    // The IdP client's secret is among the Secrets the credential reads (watched, and checked
    // by the admission webhook).
    let spec = cross_app(&base, |t| {
        t.cross_app_access.as_mut().unwrap().client_secret = Some(SecretKeyRef {
            name: "idp-client".into(),
            key: "secret".into(),
        });
    });
    assert!(
        crate::source::referenced_secrets("t", &spec)
            .iter()
            .any(|r| r.name == "idp-client" && r.key == "secret")
    );
}

#[tokio::test]
async fn cross_app_access_misconfigured_says_which_field_and_sends_nothing() {
    // A configured MCP token URL: the issuer is unknown, so the audience must be set.
    let (r, seen, _) = obtain_cross_app(id_jag_answer(), ok(), &cluster(), |t| {
        t.token_url = Some("http://127.0.0.1:9/token".into());
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "InvalidConfiguration");
    assert!(
        e.to_string()
            .contains("tokenExchange.crossAppAccess.audience is required"),
        "{e}"
    );
    assert!(posted(&seen, "/idp/token").is_empty());

    // The ID-JAG is redeemed with the JWT-bearer grant only.
    let (r, seen, _) = obtain_cross_app(id_jag_answer(), ok(), &cluster(), |t| {
        t.grant = ExchangeGrant::TokenExchange;
    })
    .await;
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .contains("tokenExchange.crossAppAccess needs tokenExchange.grant: jwtBearer"),
        "{e}"
    );
    assert!(seen.is_empty(), "{seen:?}");

    // An IdP client secret without the client ID.
    let (r, seen, _) = obtain_cross_app(id_jag_answer(), ok(), &cluster(), |t| {
        let x = t.cross_app_access.as_mut().unwrap();
        x.client_id = None;
        x.client_secret = Some(SecretKeyRef {
            name: "exchange-client".into(),
            key: "secret".into(),
        });
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "InvalidConfiguration");
    assert!(
        e.to_string().contains(
            "tokenExchange.crossAppAccess.clientId is required with tokenExchange.crossAppAccess.clientSecret"
        ),
        "{e}"
    );
    assert!(posted(&seen, "/idp/token").is_empty());
}

#[tokio::test]
async fn an_id_token_the_idp_refuses_waits_for_a_new_one_and_nothing_reaches_the_mcp_server() {
    let refused = Answer::Json(
        400,
        r#"{"error":"invalid_grant","error_description":"Invalid ID token"}"#.into(),
    );
    let (r, seen, _) = obtain_cross_app(refused.clone(), ok(), &cluster(), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!((e.reason(), e.category()), ("InvalidGrant", "invalid_grant"));
    let msg = e.to_string();
    assert!(
        msg.contains("ID-JAG at the identity provider (tokenExchange.crossAppAccess.tokenUrl)")
            && msg.contains("Invalid ID token"),
        "{msg}"
    );
    assert!(!msg.contains("stored-subject"), "{msg}");
    assert!(e.reached_token_endpoint());
    assert_eq!(
        crate::policy::after_failure(&e, 1, std::time::SystemTime::now(), None, "t"),
        crate::policy::Next::AwaitNewInputs,
        "a stored ID token that is refused is not tried again until the Secret changes"
    );
    assert!(posted(&seen, "/as/token").is_empty());

    // A service-account subject refused at the identity provider: a trust problem, retried.
    let (r, _, _) = obtain_cross_app(refused, ok(), &cluster(), |t| {
        t.subject.secret_key_ref = None;
        t.subject.service_account = Some(ServiceAccountSubject {
            name: "research-agent".into(),
            audience: "https://idp.example.com".into(),
            expiration_seconds: None,
        });
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(
        (e.reason(), e.category()),
        ("SubjectTokenRejected", "config_error")
    );

    // Another answer than an ID-JAG is not forwarded.
    let access_token = Answer::Json(
        200,
        r#"{"access_token":"not-a-jag","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#
            .into(),
    );
    let (r, seen, _) = obtain_cross_app(access_token, ok(), &cluster(), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "BadTokenResponse");
    let msg = e.to_string();
    assert!(
        msg.contains("token-type:access_token, not the ID-JAG asked for") && !msg.contains("not-a-jag"),
        "{msg}"
    );
    assert!(posted(&seen, "/as/token").is_empty());

    // An identity provider that does not answer: transient, named.
    let (r, _, _) = obtain_cross_app(
        Answer::Raw(503, "text/plain", "down".into()),
        ok(),
        &cluster(),
        |_| {},
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.category(), "transient_error");
    assert!(
        e.to_string().contains("tokenExchange.crossAppAccess.tokenUrl"),
        "{e}"
    );
}

#[tokio::test]
async fn an_id_jag_the_authorization_server_refuses_is_a_trust_problem_retried_with_backoff() {
    let refused = Answer::Json(
        400,
        r#"{"error":"invalid_grant","error_description":"Invalid ID-JAG typ header"}"#.into(),
    );
    let (r, seen, _) = obtain_cross_app(id_jag_answer(), refused, &cluster(), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!((e.reason(), e.category()), ("IdJagRejected", "config_error"));
    let msg = e.to_string();
    assert!(
        msg.contains("Invalid ID-JAG typ header") && msg.contains("tokenExchange.crossAppAccess.audience"),
        "{msg}"
    );
    assert!(!msg.contains("jag-signature"), "{msg}");
    assert_eq!(posted(&seen, "/as/token").len(), 1);
}

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

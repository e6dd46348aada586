//! The oauth2 source against an in-process HTTP server (`test_support`) that answers exactly
//! what each test needs, including the malformed and slow answers real servers sometimes give.

use std::time::Duration;

use base64::Engine;

use super::*;
use crate::{
    CredentialSource, SecretKeyRef,
    source::test_support::{self, Answer, MapResolver, Seen, context, server},
};

/// A test-only EC P-256 key (generated for these tests, trusted by nothing).
const TEST_EC_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg9zThmBQaMSgyDyk2
ce2ltFj4CaOyPV8dMqNxOEqA2SShRANCAARCCAT8mPhgphw96LASBR3S2pqMEiwV
1GGTI7nd+Z8Md5SV7yBYA9QGCQvnH8j9EhpHdwmfkep1wdgECuneqX/D
-----END PRIVATE KEY-----
";

fn spec(token_url: &str, o: impl FnOnce(&mut OAuth2Source)) -> McpCredentialSpec {
    let mut source = OAuth2Source {
        grant: OAuth2Grant::ClientCredentials,
        token_url: Some(token_url.to_owned()),
        client_id: "agent one".into(),
        client_secret: Some(SecretKeyRef {
            name: "idp".into(),
            key: "client-secret".into(),
        }),
        client_auth: None,
        private_key: None,
        refresh_token: None,
        scopes: vec!["read".into(), "write".into()],
        resource: None,
        audience: None,
        extra_params: Default::default(),
        quirks: None,
        sign_in: None,
    };
    o(&mut source);
    test_support::spec(CredentialSource {
        oauth2: Some(source),
        ..Default::default()
    })
}

fn secrets() -> MapResolver {
    MapResolver::default()
        .with("idp", "client-secret", "s3cr:t&")
        .with("idp", "refresh-token", "rt-1")
        .with("idp", "key.pem", TEST_EC_KEY)
}

fn jwt(claims: &str) -> String {
    let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.sig", e(r#"{"alg":"ES256"}"#), e(claims))
}

async fn obtain_with(
    answer: Answer,
    o: impl FnOnce(&mut OAuth2Source),
) -> (Result<Issued, SourceError>, Vec<Seen>) {
    let (url, seen) = server(answer).await;
    let spec = spec(&url, o);
    let r = crate::source::obtain("test", &spec, &secrets(), &context()).await;
    let seen = seen.lock().unwrap().clone();
    (r, seen)
}

fn ok_token() -> Answer {
    Answer::Json(
        200,
        r#"{"access_token":"at-1","token_type":"Bearer","expires_in":60}"#.into(),
    )
}

#[tokio::test]
async fn client_credentials_with_basic_auth_sends_the_upstream_as_resource() {
    let (r, seen) = obtain_with(ok_token(), |_| {}).await;
    let issued = r.unwrap();
    assert_eq!(issued.token.expose(), "at-1");
    let exp = issued
        .expires_at
        .unwrap()
        .duration_since(issued.not_before)
        .unwrap();
    assert_eq!(exp, Duration::from_secs(60));
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.param("grant_type").as_deref(), Some("client_credentials"));
    assert_eq!(
        req.param("resource").as_deref(),
        Some("https://mcp.example.com/mcp")
    );
    assert_eq!(req.param("scope").as_deref(), Some("read write"));
    assert_eq!(req.param("client_secret"), None);
    assert_eq!(
        req.basic().as_deref(),
        Some("agent+one:s3cr%3At%26"),
        "form-encoded, then Basic"
    );
}

#[tokio::test]
async fn client_secret_post_puts_the_client_in_the_body() {
    let (r, seen) = obtain_with(ok_token(), |o| o.client_auth = Some(ClientAuth::ClientSecretPost)).await;
    r.unwrap();
    assert_eq!(seen[0].param("client_id").as_deref(), Some("agent one"));
    assert_eq!(seen[0].param("client_secret").as_deref(), Some("s3cr:t&"));
    assert!(!seen[0].head.to_ascii_lowercase().contains("authorization:"));
}

#[tokio::test]
async fn private_key_jwt_sends_a_signed_assertion_for_the_token_endpoint() {
    let (r, seen) = obtain_with(ok_token(), |o| {
        o.client_secret = None;
        o.private_key = Some(SecretKeyRef {
            name: "idp".into(),
            key: "key.pem".into(),
        });
    })
    .await;
    r.unwrap();
    let assertion = seen[0].param("client_assertion").unwrap();
    let parts: Vec<_> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[0])
        .unwrap();
    assert!(String::from_utf8(header).unwrap().contains("ES256"));
    let claims = crate::source::token_response::jwt_claims(&assertion).unwrap();
    // A configured token URL: the issuer is not known, the token URL is the audience.
    let host = seen[0]
        .head
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap();
    let token_url = format!("http://{host}/token");
    assert_eq!(claims.aud, [token_url]);
    assert_eq!(
        seen[0].param("client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
}

#[tokio::test]
async fn a_discovered_authorization_servers_assertion_is_for_its_issuer() {
    // RFC 7523bis: the audience is the issuer, not its token endpoint (they differ here).
    let base_cell: std::sync::Arc<std::sync::Mutex<String>> = Default::default();
    let cell = base_cell.clone();
    let (base, seen) = test_support::routed(move |req: &Seen| {
        let base = cell.lock().unwrap().clone();
        match req.path() {
            "/mcp" => Answer::With(
                401,
                vec![(
                    "www-authenticate".into(),
                    format!(r#"Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#),
                )],
                "{}".into(),
            ),
            "/.well-known/oauth-protected-resource/mcp" => Answer::Json(
                200,
                format!(r#"{{"resource":"{base}/mcp","authorization_servers":["{base}/tenant"]}}"#),
            ),
            "/.well-known/oauth-authorization-server/tenant" => Answer::Json(
                200,
                format!(r#"{{"issuer":"{base}/tenant","token_endpoint":"{base}/tenant/oauth/token"}}"#),
            ),
            "/tenant/oauth/token" => ok_token(),
            _ => Answer::Raw(404, "text/plain", "not found".into()),
        }
    })
    .await;
    *base_cell.lock().unwrap() = base.clone();
    let mut spec = spec("unused", |o| {
        o.token_url = None;
        o.client_secret = None;
        o.private_key = Some(SecretKeyRef {
            name: "idp".into(),
            key: "key.pem".into(),
        });
    });
    spec.upstream = format!("{base}/mcp");
    crate::source::obtain("test", &spec, &secrets(), &context())
        .await
        .unwrap();
    let token_request = seen
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.path() == "/tenant/oauth/token")
        .cloned()
        .unwrap();
    let assertion = token_request.param("client_assertion").unwrap();
    let claims = crate::source::token_response::jwt_claims(&assertion).unwrap();
    assert_eq!(claims.aud, [format!("{base}/tenant")]);
}

#[tokio::test]
async fn refresh_sends_resource_too_and_reports_a_rotated_refresh_token() {
    let answer = Answer::Json(
        200,
        r#"{"access_token":"at-2","expires_in":300,"refresh_token":"rt-2"}"#.into(),
    );
    let (r, seen) = obtain_with(answer, |o| {
        o.grant = OAuth2Grant::RefreshToken;
        o.refresh_token = Some(SecretKeyRef {
            name: "idp".into(),
            key: "refresh-token".into(),
        });
        o.resource = Some("https://other.example.com/".into());
    })
    .await;
    let issued = r.unwrap();
    assert_eq!(issued.rotated_refresh_token.unwrap().expose(), "rt-2");
    assert_eq!(seen[0].param("refresh_token").as_deref(), Some("rt-1"));
    assert_eq!(
        seen[0].param("resource").as_deref(),
        Some("https://other.example.com/")
    );
}

#[tokio::test]
async fn omit_resource_quirk_sends_no_resource() {
    let (r, seen) = obtain_with(ok_token(), |o| {
        o.quirks = Some(crate::ProviderQuirks {
            omit_resource: true,
            ..Default::default()
        })
    })
    .await;
    r.unwrap();
    assert_eq!(seen[0].param("resource"), None);
}

#[tokio::test]
async fn expiry_comes_from_the_jwt_when_expires_in_is_absent() {
    let exp = timing::unix_seconds(SystemTime::now()) + 120;
    let token = jwt(&format!(r#"{{"exp":{exp},"aud":"https://mcp.example.com/mcp"}}"#));
    let (r, _) = obtain_with(
        Answer::Json(200, format!(r#"{{"access_token":"{token}"}}"#)),
        |_| {},
    )
    .await;
    assert_eq!(timing::unix_seconds(r.unwrap().expires_at.unwrap()), exp);
}

#[tokio::test]
async fn a_jwt_for_another_audience_is_rejected() {
    let exp = timing::unix_seconds(SystemTime::now()) + 120;
    let token = jwt(&format!(
        r#"{{"exp":{exp},"aud":"https://elsewhere.example.com"}}"#
    ));
    let (r, _) = obtain_with(
        Answer::Json(200, format!(r#"{{"access_token":"{token}"}}"#)),
        |_| {},
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "AudienceMismatch");
    assert!(!e.to_string().contains(&token));
}

#[tokio::test]
async fn a_hanging_server_is_a_transient_timeout() {
    let (r, _) = obtain_with(Answer::Hang, |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(e.category(), "transient_error");
    assert!(e.to_string().contains("timed out"), "{e}");
}

#[tokio::test]
async fn a_body_that_never_ends_is_a_transient_timeout() {
    let (r, _) = obtain_with(Answer::SlowBody, |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(e.category(), "transient_error", "{e}");
}

#[tokio::test]
async fn a_huge_token_response_is_not_read_and_does_not_show_the_token() {
    let token = "hugeTOKEN0123456789abcdefghijklmnop";
    let padding = "x".repeat(2 << 20);
    let body =
        format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":60,"pad":"{padding}"}}"#);
    let (r, _) = obtain_with(Answer::Json(200, body), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "BadTokenResponse", "{e}");
    assert!(e.to_string().contains("larger than"), "{e}");
    assert!(!format!("{e} {e:?}").contains(token));
}

#[tokio::test]
async fn html_instead_of_json_is_a_bad_response() {
    let (r, _) = obtain_with(Answer::Raw(200, "text/html", "<html>login</html>".into()), |_| {}).await;
    assert_eq!(r.unwrap_err().reason(), "BadTokenResponse");
}

#[tokio::test]
async fn a_server_error_is_transient() {
    let (r, _) = obtain_with(Answer::Raw(500, "text/plain", "boom".into()), |_| {}).await;
    let e = r.unwrap_err();
    assert_eq!(e.category(), "transient_error");
    assert_eq!(e.to_string(), "the token endpoint answered HTTP 500");
}

#[tokio::test]
async fn invalid_grant_is_reported_as_such() {
    let (r, _) = obtain_with(Answer::Json(400, r#"{"error":"invalid_grant"}"#.into()), |o| {
        o.grant = OAuth2Grant::RefreshToken;
        o.refresh_token = Some(SecretKeyRef {
            name: "idp".into(),
            key: "refresh-token".into(),
        });
    })
    .await;
    assert_eq!(r.unwrap_err().category(), "invalid_grant");
}

#[tokio::test]
async fn an_unreachable_server_names_the_endpoint_without_the_query() {
    let spec = spec("http://127.0.0.1:9/token?secret=x", |_| {});
    let e = crate::source::obtain("t", &spec, &secrets(), &context())
        .await
        .unwrap_err();
    assert_eq!(e.category(), "transient_error");
    assert!(e.to_string().contains("http://127.0.0.1:9/token"), "{e}");
    assert!(!e.to_string().contains("secret=x"), "{e}");
}

#[tokio::test]
async fn a_missing_secret_is_a_configuration_error() {
    let (url, _) = server(ok_token()).await;
    let spec = spec(&url, |_| {});
    let e = crate::source::obtain("t", &spec, &MapResolver::default(), &context())
        .await
        .unwrap_err();
    assert_eq!(e.category(), "config_error");
    assert_eq!(e.reason(), "SecretUnavailable");
}

#[test]
fn the_default_header_is_bearer_and_api_keys_in_custom_headers_are_bare() {
    let issued = Issued {
        token: "tok".into(),
        not_before: SystemTime::now(),
        expires_at: None,
        rotated_refresh_token: None,
    };
    let s = spec("http://127.0.0.1/token", |_| {});
    let (name, value) = crate::source::header(&s, &issued);
    assert_eq!((name.as_str(), value.expose()), ("Authorization", "Bearer tok"));

    let mut s = s;
    s.source = CredentialSource {
        api_key: Some(crate::ApiKeySource {
            secret_key_ref: SecretKeyRef {
                name: "k".into(),
                key: "k".into(),
            },
        }),
        ..Default::default()
    };
    s.inject = Some(crate::Inject {
        header: Some("X-API-Key".into()),
        format: None,
    });
    let (name, value) = crate::source::header(&s, &issued);
    assert_eq!((name.as_str(), value.expose()), ("X-API-Key", "tok"));
}

/// A resolver that records the rotated refresh tokens it is handed.
struct Recording(MapResolver, std::sync::Mutex<Vec<(String, String)>>);

impl SecretResolver for Recording {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, crate::source::ResolveError> {
        self.0.get(r).await
    }

    fn refresh_token_rotated(&self, r: &SecretKeyRef, token: &SecretString) {
        self.1
            .lock()
            .unwrap()
            .push((format!("{}/{}", r.name, r.key), token.expose().to_owned()));
    }
}

/// A refresh answered with `body`: the result and the rotated tokens the resolver was handed.
async fn refresh_answered(body: String) -> (Result<Issued, SourceError>, Vec<(String, String)>) {
    let (url, _) = server(Answer::Json(200, body)).await;
    let spec = spec(&url, |o| {
        o.grant = OAuth2Grant::RefreshToken;
        o.refresh_token = Some(SecretKeyRef {
            name: "idp".into(),
            key: "refresh-token".into(),
        });
    });
    let resolver = Recording(secrets(), Default::default());
    let r = crate::source::obtain("test", &spec, &resolver, &context()).await;
    (r, resolver.1.into_inner().unwrap())
}

#[tokio::test]
async fn a_rotated_refresh_token_is_kept_when_its_access_token_is_refused() {
    let now = timing::unix_seconds(SystemTime::now());
    let wrong_audience = jwt(&format!(
        r#"{{"exp":{},"aud":"https://elsewhere.example.com"}}"#,
        now + 120
    ));
    let expired = jwt(&format!(
        r#"{{"exp":{},"aud":"https://mcp.example.com/mcp"}}"#,
        now - 30
    ));
    let answers = [
        (
            format!(r#"{{"access_token":"{wrong_audience}","refresh_token":"rt-2"}}"#),
            "AudienceMismatch",
        ),
        (
            format!(r#"{{"access_token":"{expired}","refresh_token":"rt-2"}}"#),
            "BadTokenResponse",
        ),
        (
            r#"{"access_token":"at","expires_in":0,"refresh_token":"rt-2"}"#.to_owned(),
            "BadTokenResponse",
        ),
        (
            r#"{"access_token":"at","expires_in":"soon","refresh_token":"rt-2"}"#.to_owned(),
            "BadTokenResponse",
        ),
        (
            r#"{"access_token":"","refresh_token":"rt-2"}"#.to_owned(),
            "BadTokenResponse",
        ),
    ];
    for (body, reason) in answers {
        let (r, rotated) = refresh_answered(body.clone()).await;
        let e = r.unwrap_err();
        assert_eq!(e.reason(), reason, "{body}");
        assert!(!e.to_string().contains("rt-2"), "{e}");
        assert_eq!(
            rotated,
            [("idp/refresh-token".to_owned(), "rt-2".to_owned())],
            "{body}"
        );
    }
}

#[tokio::test]
async fn an_accepted_answer_hands_over_a_rotated_refresh_token_once_and_an_unchanged_one_never() {
    let (r, rotated) =
        refresh_answered(r#"{"access_token":"at","expires_in":60,"refresh_token":"rt-2"}"#.into()).await;
    assert_eq!(r.unwrap().rotated_refresh_token.unwrap().expose(), "rt-2");
    assert_eq!(rotated.len(), 1);
    let (r, rotated) =
        refresh_answered(r#"{"access_token":"at","expires_in":60,"refresh_token":"rt-1"}"#.into()).await;
    assert!(r.unwrap().rotated_refresh_token.is_none());
    assert!(rotated.is_empty());
}

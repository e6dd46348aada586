//! Unit tests of the pieces of a reconcile that need no API server.

use kube::api::ObjectMeta;
use mcp_credentials_core::{ApiKeySource, CredentialSource, McpCredentialSpec, secret::UPSTREAM_KEY};

use super::*;

fn cred() -> McpCredential {
    let mut c = McpCredential::new(
        "github",
        McpCredentialSpec {
            upstream: "https://mcp.example.com/mcp".into(),
            source: CredentialSource {
                api_key: Some(ApiKeySource {
                    secret_key_ref: SecretKeyRef {
                        name: "keys".into(),
                        key: "github".into(),
                    },
                }),
                ..Default::default()
            },
            inject: None,
            refresh: None,
            secret_name: None,
            access: None,
        },
    );
    c.metadata.namespace = Some("agents".into());
    c.metadata.uid = Some("uid-1".into());
    c.metadata.generation = Some(3);
    c
}

fn secret_with_rv(rv: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("keys".into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "github".to_owned(),
            ByteString(b"key-1\n".to_vec()),
        )])),
        ..Default::default()
    }
}

#[test]
fn the_secret_we_write_describes_the_credential_it_holds() {
    let c = cred();
    let now = timing::truncate(SystemTime::now());
    let issued = Issued {
        token: "tok".into(),
        not_before: now,
        expires_at: Some(now + Duration::from_secs(60)),
        rotated_refresh_token: None,
    };
    let s = desired_secret(&c, "github-mcp-credential", &issued, "fp", Some("r1"));
    assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
    assert!(owned_by(&s, &c));
    let data = s.data.as_ref().unwrap();
    // An API key in the default Authorization header is sent as a bearer token.
    assert_eq!(data["header.Authorization"].0, b"Bearer tok");
    assert_eq!(data[UPSTREAM_KEY].0, b"https://mcp.example.com/mcp");
    let current = Current::from_secret(&s).unwrap();
    assert_eq!(current.not_before, now);
    assert_eq!(current.expires_at, Some(now + Duration::from_secs(60)));
    assert_eq!(current.inputs, "fp");
    assert_eq!(current.handled_request.as_deref(), Some("r1"));
}

#[test]
fn a_secret_owned_by_someone_else_is_not_ours() {
    let c = cred();
    let foreign = secret_with_rv("1");
    assert!(!owned_by(&foreign, &c));
}

#[tokio::test]
async fn the_fingerprint_changes_with_the_referenced_secret_and_the_spec_only() {
    let c = cred();
    let a = Inputs(BTreeMap::from([("keys".to_owned(), Some(secret_with_rv("1")))]));
    let b = Inputs(BTreeMap::from([("keys".to_owned(), Some(secret_with_rv("2")))]));
    assert_eq!(a.fingerprint(&c), a.fingerprint(&c));
    assert_ne!(a.fingerprint(&c), b.fingerprint(&c));
    let mut c2 = c.clone();
    c2.spec.upstream = "https://other.example.com/mcp".into();
    assert_ne!(a.fingerprint(&c), a.fingerprint(&c2));
    // Values are trimmed of the trailing newline `kubectl create secret --from-file` leaves.
    let r = SecretKeyRef {
        name: "keys".into(),
        key: "github".into(),
    };
    assert_eq!(a.get(&r).await.unwrap().expose(), "key-1");
}

#[tokio::test]
async fn a_service_account_token_secret_is_never_read_as_an_input() {
    for type_ in REFUSED_INPUT_TYPES {
        let mut token = secret_with_rv("1");
        token.type_ = Some(type_.into());
        let inputs = Inputs(BTreeMap::from([("keys".to_owned(), Some(token))]));
        let r = SecretKeyRef {
            name: "keys".into(),
            key: "github".into(),
        };
        let e = SourceError::from(inputs.get(&r).await.unwrap_err());
        assert_eq!(e.reason(), "SecretTypeRefused");
        assert_eq!(
            e.category(),
            "config_error",
            "not transient: retrying reads it again"
        );
        let message = e.to_string();
        assert!(
            message.contains("\"keys\"") && message.contains(type_),
            "{message}"
        );
        assert!(!message.contains("key-1"), "no secret value in the message");
    }
}

/// The API server as a script: each expected request, checked, then answered.
mod api_budget {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn json(status: u16, v: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap()
    }

    #[tokio::test]
    async fn one_refresh_costs_one_secret_write_and_one_status_write() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "agents");
        let sources = SourceContext::new(Duration::from_secs(1), Default::default()).unwrap();
        let metrics = crate::metrics::Metrics::register().unwrap();
        let ctx = Arc::new(Context::new(client, sources, metrics, "test"));
        let cred = cred();

        let server = tokio::spawn(async move {
            let mut writes = Vec::new();
            // 1. The credential Secret does not exist yet.
            let (req, send) = handle.next_request().await.expect("GET the credential Secret");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                ("GET", "/api/v1/namespaces/agents/secrets/github-mcp-credential")
            );
            send.send_response(json(404, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})));
            // 2. The referenced Secret holds the API key.
            let (req, send) = handle.next_request().await.expect("GET the referenced Secret");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                ("GET", "/api/v1/namespaces/agents/secrets/keys")
            );
            send.send_response(json(200, serde_json::to_value(secret_with_rv("7")).unwrap()));
            // 3 and 4: the writes, whatever they are, are recorded and answered.
            while let Some((req, send)) = handle.next_request().await {
                let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                let query = req.uri().query().unwrap_or_default().to_owned();
                let body = http_body_bytes(req.into_body()).await;
                let mut obj: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if path.ends_with("/status") {
                    obj["metadata"] = serde_json::json!({"name": "github", "namespace": "agents"});
                    obj["spec"] = serde_json::to_value(&super::cred().spec).unwrap();
                }
                writes.push(format!("{method} {path} {query}"));
                send.send_response(json(200, obj));
            }
            writes
        });

        let action = reconcile(Arc::new(cred), ctx).await.unwrap();
        assert_eq!(
            action,
            Action::await_change(),
            "an API key does not expire: nothing to schedule"
        );
        // Dropping the reconcile's clients ends the script.
        let writes = server.await.unwrap();
        assert_eq!(writes.len(), 2, "{writes:#?}");
        assert!(
            writes[0].starts_with("PATCH /api/v1/namespaces/agents/secrets/github-mcp-credential"),
            "{writes:#?}"
        );
        assert!(
            writes[0].contains("fieldManager=mcp-credentials-operator"),
            "server-side apply: {writes:#?}"
        );
        assert!(
            writes[1].starts_with(
                "PATCH /apis/mcpcredentials.dev/v1alpha1/namespaces/agents/mcpcredentials/github/status"
            ),
            "{writes:#?}"
        );
    }

    /// A minted JWT costs the same: no referenced Secret, one Secret write, one status write.
    #[tokio::test]
    async fn one_jwt_mint_costs_one_secret_write_and_one_status_write() {
        use mcp_credentials_core::{
            JwtAlgorithm, JwtSource,
            keyring::{KeyRing, Policy},
        };
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "agents");
        let sources = SourceContext::new(Duration::from_secs(1), Default::default()).unwrap();
        let metrics = crate::metrics::Metrics::register().unwrap();
        let keys = Arc::new(Keys::new("https://jwks.example", "jwt-keys", "ops"));
        let mut ring = KeyRing::default();
        ring.rotate(
            SystemTime::now(),
            &Policy::every(Duration::from_secs(86_400)),
            |alg| {
                if alg == JwtAlgorithm::ES256 {
                    source::jwt::generate_key(alg)
                } else {
                    Ok((SecretString::new("unused"), "rs".into()))
                }
            },
        )
        .unwrap();
        keys.set(ring, &metrics);
        let ctx = Arc::new(Context::new(client, sources, metrics, "test").with_keys(keys));
        let mut cred = cred();
        cred.spec.source = CredentialSource {
            jwt: Some(JwtSource {
                subject: "agent".into(),
                audience: None,
                ttl: "15m".into(),
                algorithm: JwtAlgorithm::ES256,
                claims: BTreeMap::new(),
            }),
            ..Default::default()
        };
        let spec = cred.spec.clone();

        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("GET the credential Secret");
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/agents/secrets/github-mcp-credential"
            );
            send.send_response(json(404, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})));
            let mut writes = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                let body = http_body_bytes(req.into_body()).await;
                let mut obj: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if path.ends_with("/status") {
                    obj["metadata"] = serde_json::json!({"name": "github", "namespace": "agents"});
                    obj["spec"] = serde_json::to_value(&spec).unwrap();
                }
                writes.push(format!("{method} {path}"));
                send.send_response(json(200, obj));
            }
            writes
        });

        let action = reconcile(Arc::new(cred), ctx).await.unwrap();
        assert_ne!(action, Action::await_change(), "renewal before the token expires");
        let writes = server.await.unwrap();
        assert_eq!(
            writes,
            [
                "PATCH /api/v1/namespaces/agents/secrets/github-mcp-credential",
                "PATCH /apis/mcpcredentials.dev/v1alpha1/namespaces/agents/mcpcredentials/github/status"
            ]
        );
    }

    async fn http_body_bytes(body: Body) -> Vec<u8> {
        use http_body_util::BodyExt;
        body.collect().await.unwrap().to_bytes().to_vec()
    }
}

/// The write-back of a rotated refresh token against a scripted API server: it replaces only the
/// token that was redeemed, under a resourceVersion precondition.
mod write_back {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn login(rv: &str, token: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("login".into()),
                namespace: Some("agents".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "refresh-token".to_owned(),
                ByteString(token.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn api_failures_are_categorised_for_the_log_the_metric_and_the_wait() {
        for (code, category) in [
            (403, ErrorCategory::Forbidden),
            (404, ErrorCategory::NotFound),
            (409, ErrorCategory::Conflict),
            (503, ErrorCategory::Unavailable),
            (422, ErrorCategory::Other),
        ] {
            let status = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "m", "reason": "r", "code": code,
            });
            let (api, _requests) = script(vec![json(code, status)]);
            let source = api
                .get("login")
                .await
                .expect_err("the scripted answer is a failure");
            let e = Error::ReadSecret {
                namespace: "agents".into(),
                name: "login".into(),
                source,
            };
            assert_eq!(e.category(), category, "HTTP {code}");
        }
        // RBAC does not fix itself: waited for longer than a lost race.
        assert!(ErrorCategory::Forbidden.requeue() > ErrorCategory::Conflict.requeue());
    }

    fn pending() -> PendingRefreshToken {
        PendingRefreshToken {
            secret: SecretKeyRef {
                name: "login".into(),
                key: "refresh-token".into(),
            },
            redeemed: SecretString::new("rt-0"),
            token: SecretString::new("rt-1"),
            attempts: 0,
        }
    }

    fn json(status: u16, v: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap()
    }

    /// Answers each request with the next of `answers`, recording `METHOD path body`.
    fn script(answers: Vec<Response<Body>>) -> (Api<Secret>, tokio::task::JoinHandle<Vec<String>>) {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Api::namespaced(Client::new(mock, "agents"), "agents");
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter();
            while let Some((req, send)) = handle.next_request().await {
                let line = format!("{} {}", req.method(), req.uri().path());
                let body = {
                    use http_body_util::BodyExt;
                    req.into_body().collect().await.unwrap().to_bytes().to_vec()
                };
                seen.push(format!("{line} {}", String::from_utf8_lossy(&body)));
                send.send_response(answers.next().expect("no more answers scripted"));
            }
            seen
        });
        (api, server)
    }

    #[tokio::test]
    async fn a_secret_holding_another_refresh_token_is_left_alone() {
        let (api, server) = script(vec![]);
        let outcome = write_back_refresh_token(&api, &pending(), "agents/a", Some(login("5", "rt-other")))
            .await
            .unwrap();
        assert!(matches!(outcome, WriteBack::Superseded(_)));
        drop(api);
        assert_eq!(server.await.unwrap(), Vec::<String>::new(), "nothing written");
    }

    #[tokio::test]
    async fn the_write_carries_the_resource_version_and_a_conflict_rereads_instead_of_overwriting() {
        // Another credential sharing the key stored its own rotated token between our read and
        // our write: the precondition fails (409), the Secret is read again and left alone.
        let conflict = json(
            409,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        );
        let now = json(200, serde_json::to_value(login("6", "rt-theirs")).unwrap());
        let (api, server) = script(vec![conflict, now]);
        let outcome = write_back_refresh_token(&api, &pending(), "agents/a", Some(login("5", "rt-0")))
            .await
            .unwrap();
        assert!(matches!(outcome, WriteBack::Superseded(_)));
        drop(api);
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2, "{seen:#?}");
        assert!(
            seen[0].starts_with("PATCH /api/v1/namespaces/agents/secrets/login")
                && seen[0].contains(r#""resourceVersion":"5""#),
            "{seen:#?}"
        );
        assert!(
            seen[1].starts_with("GET /api/v1/namespaces/agents/secrets/login"),
            "{seen:#?}"
        );
    }
}

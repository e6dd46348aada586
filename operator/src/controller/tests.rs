//! Unit tests of the pieces of a reconcile that need no API server.

use kube::api::ObjectMeta;
use mcp_credentials_core::{ApiKeySource, CredentialSource, McpCredentialSpec};

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

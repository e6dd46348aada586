//! Test fixtures: an McpCredential in one line, for the unit tests of the operator's modules.

use mcp_credentials_core::{
    Access, ApiKeySource, CredentialSource, McpCredential, McpCredentialSpec, SecretKeyRef,
};

/// An API-key credential `name` in namespace `agents` (with a UID, as if read from the API),
/// usable by `allowed` (empty: nobody), written to `secret` (or the default name).
pub fn credential(name: &str, allowed: &[&str], secret: Option<&str>) -> McpCredential {
    let mut c = McpCredential::new(
        name,
        McpCredentialSpec {
            upstream: format!("https://{name}.example.com/mcp"),
            source: CredentialSource {
                api_key: Some(ApiKeySource {
                    secret_key_ref: SecretKeyRef {
                        name: "k".into(),
                        key: "k".into(),
                    },
                }),
                ..CredentialSource::default()
            },
            inject: None,
            refresh: None,
            secret_name: secret.map(Into::into),
            access: Some(Access {
                service_accounts: allowed.iter().map(|s| s.to_string()).collect(),
                all_service_accounts: None,
            }),
        },
    );
    c.metadata.namespace = Some("agents".into());
    c.metadata.uid = Some("0000-1111".into());
    c
}

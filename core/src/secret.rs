//! The Secret contract: one Secret per McpCredential, written by the operator, read by the sidecar.
//! Changing a name here is a breaking change between operator and sidecar versions.

/// The Secret `type` of every credential Secret.
pub const SECRET_TYPE: &str = "mcpcredentials.dev/credential";

/// Label set on every object the operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "mcp-credentials";
/// Label naming the McpCredential a Secret belongs to.
pub const CREDENTIAL_LABEL: &str = "mcpcredentials.dev/credential";

/// Prefix of the data keys holding header values: `header.Authorization` = `Bearer eyJ...`.
pub const HEADER_KEY_PREFIX: &str = "header.";
/// Data key holding the upstream URL.
pub const UPSTREAM_KEY: &str = "upstream";
/// Data key holding the expiry as RFC 3339; absent when the credential does not expire.
pub const EXPIRES_AT_KEY: &str = "expires-at";
/// Data key that changes on every new credential.
pub const VERSION_KEY: &str = "version";

/// Suffix of the default Secret name: `<credential-name>-mcp-credential`.
pub const DEFAULT_SECRET_SUFFIX: &str = "-mcp-credential";

/// The Secret name for a credential: `spec.secretName`, or the default derived from its name.
pub fn secret_name(credential_name: &str, spec_secret_name: Option<&str>) -> String {
    match spec_secret_name {
        Some(name) => name.to_owned(),
        None => format!("{credential_name}{DEFAULT_SECRET_SUFFIX}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_name_defaults_to_the_credential_name_with_a_suffix() {
        assert_eq!(secret_name("github", None), "github-mcp-credential");
        assert_eq!(secret_name("github", Some("gh-token")), "gh-token");
    }
}

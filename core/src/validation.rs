//! CEL rules used by several fields of the CRD schema, each with a message that tells the user what
//! to change. The API server evaluates them, so a bad McpCredential never reaches the operator.
//!
//! CEL's cost estimator needs a bound on every string a rule reads, so each field these rules apply
//! to also carries a `maxLength`.

use kube::core::{Message, Rule};

/// The longest URL we accept. Far above any real token endpoint or MCP server URL.
pub(crate) const MAX_URL_LENGTH: u32 = 2048;

/// An https URL, or http to a loopback address (a local test server or a port-forward). Regular
/// expressions rather than CEL's `url()`: their cost is linear in the length, so the estimator
/// accepts them on a 2048-character field; no user name or password in the authority.
pub(crate) fn https_url(field: &str) -> Rule {
    Rule::new(
        "self.matches('^https://[^/?#@\\\\s]+([/?#][^\\\\s]*)?$') || \
         self.matches('^http://(localhost|127\\\\.[0-9]{1,3}\\\\.[0-9]{1,3}\\\\.[0-9]{1,3}|\\\\[::1\\\\])(:[0-9]{1,5})?([/?#][^\\\\s]*)?$')",
    )
    .message(Message::Message(format!(
        "{field} must be an absolute https:// URL (plain http:// is allowed only for loopback addresses \
         such as http://127.0.0.1:8080), for example https://mcp.example.com/mcp"
    )))
}

/// A Go-style duration such as `90s`, `15m` or `1h30m`, inside `[min, max]`.
pub(crate) fn duration_between(field: &str, min: &str, max: &str) -> Rule {
    Rule::new(format!(
        "self.matches('^([0-9]+(ns|us|ms|s|m|h))+$') && duration(self) >= duration('{min}') && \
         duration(self) <= duration('{max}')"
    ))
    .message(Message::Message(format!(
        "{field} must be a duration between {min} and {max}, written like 90s, 15m or 1h30m"
    )))
}

/// A Kubernetes object name (RFC 1123 subdomain), as Secrets and ServiceAccounts need.
pub(crate) fn object_name(field: &str) -> Rule {
    Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message(
        Message::Message(format!(
            "{field} must be a valid Kubernetes object name: lower-case letters, digits, '-' and '.', \
             starting and ending with a letter or digit, at most 253 characters"
        )),
    )
}

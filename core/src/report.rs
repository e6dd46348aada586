//! The report contract between the sidecar and the operator: a sidecar whose upstream rejected a
//! credential asks the operator for a refresh by POSTing a [`Report`] to [`PATH`] on the operator's
//! webhook listener. Both sides use these types, so a change of the body breaks both builds.

use serde::{Deserialize, Serialize};

/// Where sidecars send reports, on the operator's webhook listener.
pub const PATH: &str = "/v1/report";

/// A report is a few names; anything larger is not one.
pub const MAX_BODY: usize = 4096;

/// Why the upstream rejected a credential, in a way a refresh can cure (RFC 6750 §3.1 error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// 401: the token is expired, revoked or malformed.
    InvalidToken,
    /// 403: the token lacks a scope the request needs.
    InsufficientScope,
}

impl Reason {
    /// The wire name (RFC 6750).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidToken => "invalid_token",
            Reason::InsufficientScope => "insufficient_scope",
        }
    }
}

/// What an upstream's 401 or 403 said about the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// A Bearer challenge with an error a refresh can cure.
    Curable(Reason),
    /// Any other 401 or 403 (no challenge, another scheme, another error).
    Other,
}

impl Rejection {
    /// Reads a 401 or 403 (`None` for any other status) and its `WWW-Authenticate` values.
    pub fn of<'a, I: Iterator<Item = &'a [u8]>>(
        status: u16,
        challenges: impl Fn() -> I,
    ) -> Option<Rejection> {
        if status != 401 && status != 403 {
            return None;
        }
        let says = |what: &[u8]| challenges().any(|value| value.windows(what.len()).any(|w| w == what));
        Some(if says(b"invalid_token") {
            Rejection::Curable(Reason::InvalidToken)
        } else if says(b"insufficient_scope") {
            Rejection::Curable(Reason::InsufficientScope)
        } else {
            Rejection::Other
        })
    }

    /// The label of metrics and logs: the RFC 6750 name, or `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Curable(r) => r.as_str(),
            Rejection::Other => "other",
        }
    }
}

/// The body of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    /// The credential's namespace (the sidecar's pod's).
    pub namespace: String,
    /// The McpCredential's name.
    pub credential: String,
    /// Why the upstream rejected it.
    pub reason: Reason,
    /// The Secret's `version` the sidecar sent when it was rejected.
    pub version: String,
    /// For `insufficient_scope`: the `scope` the upstream's challenge named (space-separated), what
    /// a step-up asks for (SEP-2350). Absent from older sidecars and other reasons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The longest `scope` a report carries.
pub const MAX_SCOPE: usize = 1024;

/// A report body, for error messages.
const EXAMPLE: &str =
    r#"{"namespace":"agents","credential":"github","reason":"invalid_token","version":"..."}"#;

impl Report {
    /// Parses and checks a report body; the error says what is wrong (never echoing a token).
    pub fn parse(body: &[u8]) -> Result<Report, String> {
        if body.len() > MAX_BODY {
            return Err(format!(
                "a report is at most {MAX_BODY} bytes; expected {EXAMPLE}"
            ));
        }
        let report: Report =
            serde_json::from_slice(body).map_err(|e| format!("not a report: {e}; expected {EXAMPLE}"))?;
        if !is_name(&report.namespace) {
            return Err("namespace is not a valid namespace name".into());
        }
        if !is_name(&report.credential) {
            return Err("credential is not a valid McpCredential name".into());
        }
        if report.version.is_empty() || report.version.len() > 128 {
            return Err("version must be 1 to 128 characters".into());
        }
        if let Some(scope) = &report.scope
            && !valid_scope(scope)
        {
            return Err(format!(
                "scope must be at most {MAX_SCOPE} characters of space-separated RFC 6749 scope tokens"
            ));
        }
        Ok(report)
    }
}

/// Whether `scope` can ride in a report: at most [`MAX_SCOPE`] characters of RFC 6749 §3.3 scope
/// tokens separated by spaces (a sidecar leaves out anything else an upstream sent).
pub fn valid_scope(scope: &str) -> bool {
    let token_char = |c: char| c == ' ' || (c.is_ascii_graphic() && c != '"' && c != '\\');
    scope.len() <= MAX_SCOPE && scope.chars().all(token_char)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_sidecar_writes_is_what_the_operator_reads() {
        let report = Report {
            namespace: "agents".into(),
            credential: "github".into(),
            reason: Reason::InsufficientScope,
            version: "v7".into(),
            scope: None,
        };
        let body = serde_json::to_vec(&report).unwrap();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"namespace":"agents","credential":"github","reason":"insufficient_scope","version":"v7"}"#
        );
        assert_eq!(Report::parse(&body).unwrap(), report);
        // A step-up's challenged scopes ride along.
        let report = Report {
            scope: Some("repo read:org".into()),
            ..report
        };
        let body = serde_json::to_vec(&report).unwrap();
        assert!(String::from_utf8_lossy(&body).ends_with(r#""version":"v7","scope":"repo read:org"}"#));
        assert_eq!(Report::parse(&body).unwrap(), report);
    }

    #[test]
    fn a_bad_report_is_refused_saying_what_is_wrong() {
        for (body, says) in [
            (r#"{"namespace":"agents"}"#.to_owned(), "not a report"),
            (
                r#"{"namespace":"Agents","credential":"g","reason":"invalid_token","version":"1"}"#
                    .to_owned(),
                "namespace",
            ),
            (
                r#"{"namespace":"a","credential":"g","reason":"expired","version":"1"}"#.to_owned(),
                "not a report",
            ),
            (
                r#"{"namespace":"a","credential":"g","reason":"invalid_token","version":""}"#.to_owned(),
                "version",
            ),
            ("x".repeat(MAX_BODY + 1), "at most"),
            (
                r#"{"namespace":"a","credential":"g","reason":"insufficient_scope","version":"1","scope":"a\"b"}"#
                    .to_owned(),
                "scope",
            ),
        ] {
            let e = Report::parse(body.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn a_rejection_is_read_from_its_status_and_challenges() {
        let of = |status, values: &[&str]| {
            let values: Vec<Vec<u8>> = values.iter().map(|v| v.as_bytes().to_vec()).collect();
            Rejection::of(status, || values.iter().map(Vec::as_slice))
        };
        assert_eq!(
            of(401, &[r#"Bearer error="invalid_token""#]),
            Some(Rejection::Curable(Reason::InvalidToken))
        );
        assert_eq!(
            of(403, &["Basic", r#"Bearer error="insufficient_scope""#]),
            Some(Rejection::Curable(Reason::InsufficientScope))
        );
        assert_eq!(of(401, &[]), Some(Rejection::Other));
        assert_eq!(of(500, &[r#"Bearer error="invalid_token""#]), None);
        assert_eq!(Rejection::Other.as_str(), "other");
    }
}

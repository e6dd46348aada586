//! Parsing a token endpoint's answer (RFC 6749 §5.1 / §5.2) into a token or a classified error.
//! The body is never echoed into an error: it may hold a token.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::SourceError;
use crate::SecretString;

/// The longest `expires_in` we believe: one year. Larger values are a server bug.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(366 * 24 * 3600);

/// A successful token response.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    /// `access_token`.
    pub access_token: SecretString,
    /// `expires_in`, when the server sent one.
    pub expires_in: Option<Duration>,
    /// `refresh_token`, when the server sent one.
    pub refresh_token: Option<SecretString>,
}

/// Classifies an HTTP answer from a token endpoint: `status`, `content-type` and body.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<TokenResponse, SourceError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        // An error code such as `authorization_pending` or `temporarily_unavailable` is kept as
        // it is (a long run of token characters would be redacted); anything else is made safe.
        let error = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(Value::as_str)
            .map(|e| {
                if e.len() <= 64 && !e.is_empty() && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    e.to_owned()
                } else {
                    safe_text(e)
                }
            });
        let description = json
            .as_ref()
            .and_then(|j| j.get("error_description"))
            .and_then(Value::as_str)
            .map(safe_text);
        return Err(match error {
            Some(e) if e == "invalid_grant" => SourceError::InvalidGrant(description),
            Some(error) => SourceError::OAuthError {
                status,
                error,
                description,
            },
            None => SourceError::HttpStatus(status),
        });
    }
    let Some(json) = json else {
        return Err(SourceError::BadResponse(format!(
            "HTTP {status} with a body that is not JSON"
        )));
    };
    let Some(obj) = json.as_object() else {
        return Err(SourceError::BadResponse("the JSON body is not an object".into()));
    };
    let access_token = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => SecretString::new(s.clone()),
        Some(_) => {
            return Err(SourceError::BadResponse(
                "access_token is empty or not a string".into(),
            ));
        }
        None => return Err(SourceError::BadResponse("no access_token in the response".into())),
    };
    let expires_in = match obj.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(v) => {
            // Some servers send a string ("3600"); accept it, reject everything else.
            let secs = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse::<f64>().ok()));
            match secs {
                Some(s) if s.is_finite() && s >= 1.0 && s <= MAX_EXPIRES_IN.as_secs_f64() => {
                    Some(Duration::from_secs(s as u64))
                }
                _ => {
                    return Err(SourceError::BadResponse(format!(
                        "expires_in {} is not a number of seconds between 1 and {}",
                        shorten(&v.to_string(), 32),
                        MAX_EXPIRES_IN.as_secs()
                    )));
                }
            }
        }
    };
    let refresh_token = match obj.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(SecretString::new(s.clone())),
        _ => None,
    };
    Ok(TokenResponse {
        access_token,
        expires_in,
        refresh_token,
    })
}

/// The `refresh_token` of a successful (2xx) token answer, read on its own: when the rest of the
/// answer is refused (an unusual `expires_in`, say), a server that rotates has still revoked the
/// refresh token we sent, and the new one must be kept.
pub fn refresh_token_in(status: u16, body: &[u8]) -> Option<SecretString> {
    if !(200..300).contains(&status) {
        return None;
    }
    match serde_json::from_slice::<Value>(body).ok()?.get("refresh_token")? {
        Value::String(s) if !s.is_empty() => Some(SecretString::new(s.clone())),
        _ => None,
    }
}

/// The claims of a JWT that matter for timing and audience, read without verifying the signature
/// (the token is the server's to verify; we only schedule by it). `None` for opaque tokens.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct JwtClaims {
    /// `exp`, seconds since the epoch.
    pub exp: Option<u64>,
    /// `iat`, seconds since the epoch.
    pub iat: Option<u64>,
    /// `aud`, as a list.
    pub aud: Vec<String>,
}

/// Reads `exp`, `iat` and `aud` from a JWT's payload, if `token` is a JWT.
pub fn jwt_claims(token: &str) -> Option<JwtClaims> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None; // a JWE has five parts: opaque to us
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .filter(|n| *n >= 0.0)
            .map(|n| n as u64)
    };
    let aud = match v.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    Some(JwtClaims {
        exp: num("exp"),
        iat: num("iat"),
        aud,
    })
}

/// Server-provided text made safe for a status message: printable, short, and without anything
/// that looks like a token. Some servers echo the grant they rejected ("refresh token eyJ... is
/// invalid"), and status, events and logs must never show one: every unbroken run of 16 or more
/// token characters is replaced. Real error descriptions are words, so they survive.
pub(crate) fn safe_text(s: &str) -> String {
    const TOKEN_RUN: usize = 16;
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    let printable: String = s.chars().filter(|c| !c.is_control()).collect();
    let mut out = String::with_capacity(printable.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= TOKEN_RUN {
            out.push_str("[redacted]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in printable.chars() {
        if is_token_char(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    shorten(&out, 200)
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &str) -> Result<TokenResponse, SourceError> {
        parse_token_response(status, body.as_bytes())
    }

    #[test]
    fn a_token_echoed_in_an_error_description_is_redacted() {
        let err = parse(
            400,
            r#"{"error":"invalid_request","error_description":"refresh token eyJhbGciOiJIUzI1NiJ9.e30.abc is unknown"}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "the authorization server answered HTTP 400 invalid_request: refresh token [redacted] is unknown"
        );
    }

    #[test]
    fn a_good_response_parses() {
        let r = parse(
            200,
            r#"{"access_token":"abc","token_type":"Bearer","expires_in":3600,"refresh_token":"r2"}"#,
        )
        .unwrap();
        assert_eq!(r.access_token.expose(), "abc");
        assert_eq!(r.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(r.refresh_token.unwrap().expose(), "r2");
    }

    #[test]
    fn expires_in_as_a_string_is_accepted() {
        let r = parse(200, r#"{"access_token":"abc","expires_in":"60"}"#).unwrap();
        assert_eq!(r.expires_in, Some(Duration::from_secs(60)));
    }

    #[test]
    fn non_json_is_a_transient_bad_response_that_does_not_echo_the_body() {
        let e = parse(200, "<html>access_token=leaked</html>").unwrap_err();
        assert_eq!(e.category(), "transient_error");
        assert!(!e.to_string().contains("leaked"), "{e}");
    }

    #[test]
    fn a_missing_access_token_is_a_bad_response() {
        let e = parse(200, r#"{"token_type":"Bearer"}"#).unwrap_err();
        assert!(e.to_string().contains("no access_token"), "{e}");
        assert_eq!(e.reason(), "BadTokenResponse");
    }

    #[test]
    fn absurd_expires_in_is_rejected() {
        for bad in ["-5", "0", "1e12", "\"soon\"", "true"] {
            let e = parse(200, &format!(r#"{{"access_token":"a","expires_in":{bad}}}"#)).unwrap_err();
            assert!(e.to_string().contains("expires_in"), "{bad}: {e}");
        }
    }

    #[test]
    fn invalid_grant_is_terminal() {
        let e = parse(
            400,
            r#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, SourceError::InvalidGrant(_)));
        assert_eq!(e.category(), "invalid_grant");
        assert_eq!(e.reason(), "InvalidGrant");
    }

    #[test]
    fn server_errors_are_transient_and_client_errors_are_configuration() {
        assert_eq!(parse(500, "oops").unwrap_err().category(), "transient_error");
        assert_eq!(
            parse(503, r#"{"error":"server_error"}"#).unwrap_err().category(),
            "transient_error"
        );
        assert_eq!(parse(429, "").unwrap_err().category(), "transient_error");
        assert_eq!(
            parse(401, r#"{"error":"invalid_client"}"#)
                .unwrap_err()
                .category(),
            "config_error"
        );
        assert_eq!(parse(404, "not found").unwrap_err().category(), "config_error");
    }

    #[test]
    fn jwt_claims_are_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"exp":1700000060,"iat":1700000000,"aud":["https://mcp.example.com/mcp"]}"#);
        let c = jwt_claims(&format!("eyJhbGciOiJFUzI1NiJ9.{payload}.sig")).unwrap();
        assert_eq!(c.exp, Some(1_700_000_060));
        assert_eq!(c.aud, vec!["https://mcp.example.com/mcp"]);
        assert_eq!(jwt_claims("opaque-token"), None);
    }
}

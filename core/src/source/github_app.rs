//! The `githubApp` source: an App JWT (RS256, 9 minutes) signed with the App's private key buys an
//! installation access token (1 hour), optionally narrowed to some repositories and permissions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{
    Issued, SecretResolver, SourceError,
    oauth2::{endpoint_label, read_body, send},
};
use crate::{GitHubAppSource, SecretString, timing};

/// The API of github.com.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// The REST API version we speak (`X-GitHub-Api-Version`).
pub const API_VERSION: &str = "2022-11-28";

/// The App JWT's claims at `now`: issued 60 s in the past (GitHub's advice against clock drift),
/// valid 9 minutes (GitHub accepts at most 10).
pub fn app_jwt_claims(app_id: &str, now: SystemTime) -> Value {
    let now = timing::unix_seconds(now);
    // A numeric App ID goes as a number, a client ID (`Iv1.…`) as a string: GitHub accepts both.
    let iss = app_id
        .parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(app_id));
    serde_json::json!({ "iat": now.saturating_sub(60), "exp": now + 540, "iss": iss })
}

/// The URL that creates an installation access token.
pub fn access_tokens_url(g: &GitHubAppSource) -> String {
    format!(
        "{}/app/installations/{}/access_tokens",
        g.api_url
            .as_deref()
            .unwrap_or(DEFAULT_API_URL)
            .trim_end_matches('/'),
        g.installation_id
    )
}

/// The request body: the narrowing, if any.
pub fn request_body(g: &GitHubAppSource) -> Value {
    let mut body = serde_json::Map::new();
    if !g.repositories.is_empty() {
        body.insert("repositories".into(), Value::from(g.repositories.clone()));
    }
    if !g.permissions.is_empty() {
        body.insert(
            "permissions".into(),
            serde_json::to_value(&g.permissions).unwrap_or_default(),
        );
    }
    Value::Object(body)
}

/// One installation access token for `g`. See [`super::obtain`].
pub async fn obtain(
    g: &GitHubAppSource,
    secrets: &impl SecretResolver,
    http: &reqwest::Client,
) -> Result<Issued, SourceError> {
    let pem = secrets.get(&g.private_key).await?;
    if pem.is_empty() {
        return Err(SourceError::Config(format!(
            "githubApp.privateKey: key {:?} of secret {:?} is empty",
            g.private_key.key, g.private_key.name
        )));
    }
    let claims = app_jwt_claims(&g.app_id, SystemTime::now());
    let app_jwt = super::jwt::sign(jsonwebtoken::Algorithm::RS256, None, &claims, &pem).map_err(|e| {
        SourceError::SignJwt {
            field: "githubApp.privateKey (GitHub App keys are RSA)",
            reason: e.0,
        }
    })?;
    let url = access_tokens_url(g);
    let endpoint = endpoint_label(&url);
    let req = http
        .post(&url)
        .bearer_auth(&app_jwt)
        .header(reqwest::header::ACCEPT, "application/vnd.github+json")
        .header("X-GitHub-Api-Version", API_VERSION)
        .json(&request_body(g));
    let resp = send(req, &endpoint).await?;
    let (status, body) = read_body(resp, &endpoint).await?;
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    if !(200..300).contains(&status) {
        return Err(rejection(g, status, json.as_ref(), &app_jwt));
    }
    parse_access_token(json.as_ref())
}

/// GitHub's answer to a created token: `{token, expires_at}`.
pub fn parse_access_token(json: Option<&Value>) -> Result<Issued, SourceError> {
    let bad = |what: &str| SourceError::BadResponse(format!("GitHub's answer has {what}"));
    let json = json.ok_or_else(|| bad("no JSON body"))?;
    let token = json
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("no token"))?;
    let expires_at = json
        .get("expires_at")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .and_then(|t| u64::try_from(t.as_second()).ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .ok_or_else(|| bad("no valid expires_at"))?;
    let now = timing::truncate(SystemTime::now());
    if expires_at <= now {
        return Err(SourceError::BadResponse(
            "the issued token is already expired".into(),
        ));
    }
    Ok(Issued {
        token: SecretString::new(token),
        not_before: now,
        expires_at: Some(expires_at),
        rotated_refresh_token: None,
    })
}

/// A clear error for an error answer, naming the field to fix.
fn rejection(g: &GitHubAppSource, status: u16, json: Option<&Value>, app_jwt: &str) -> SourceError {
    // GitHub's `message` ("Bad credentials", "Not Found"...) helps; never echo a credential.
    let said = json
        .and_then(|j| j.get("message"))
        .and_then(Value::as_str)
        .filter(|m| !m.contains(app_jwt))
        .map(|m| format!(": {}", m.chars().take(200).collect::<String>()))
        .unwrap_or_default();
    let (reason, message) = match status {
        401 => (
            "GitHubAppUnauthorized",
            format!(
                "GitHub rejected the App JWT (HTTP 401{said}): check that githubApp.appId {:?} is the App's ID and \
                 that githubApp.privateKey (key {:?} of secret {:?}) is a current private key of that App",
                g.app_id, g.private_key.key, g.private_key.name
            ),
        ),
        404 => (
            "InstallationNotFound",
            format!(
                "GitHub has no installation {} of App {:?} (HTTP 404{said}): check githubApp.installationId \
                 (the number in the installation's settings URL) and that the App is installed there",
                g.installation_id, g.app_id
            ),
        ),
        422 => (
            "GitHubNarrowingRejected",
            format!(
                "GitHub refused the requested narrowing (HTTP 422{said}): list in githubApp.repositories and \
                 githubApp.permissions only repositories and permissions the installation has"
            ),
        ),
        403 => (
            "GitHubForbidden",
            format!(
                "GitHub refused to create the token (HTTP 403{said}): the installation may be suspended, or \
                 githubApp.permissions asks for more than the App was granted"
            ),
        ),
        s => return SourceError::HttpStatus(s),
    };
    SourceError::Rejected { reason, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_jwt_is_backdated_a_minute_and_lives_nine() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = app_jwt_claims("123456", now);
        assert_eq!(c["iat"], 999_940);
        assert_eq!(c["exp"], 1_000_540);
        assert_eq!(c["iss"], 123_456);
        assert_eq!(app_jwt_claims("Iv1.abc", now)["iss"], "Iv1.abc");
    }

    #[test]
    fn an_answer_without_expiry_is_a_bad_response_that_does_not_show_the_token() {
        let json = serde_json::json!({ "token": "ghs_secretsecret" });
        let e = parse_access_token(Some(&json)).unwrap_err();
        assert_eq!(e.category(), "transient_error");
        assert!(!e.to_string().contains("ghs_"), "{e}");
    }
}

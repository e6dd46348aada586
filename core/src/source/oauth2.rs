//! The `oauth2` source: the client credentials and refresh token grants against a token endpoint,
//! with `client_secret_basic`, `client_secret_post`, `private_key_jwt` or no client authentication,
//! and the RFC 8707 `resource` on every request (refresh included) unless `quirks.omitResource`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    Issued, SecretResolver, SourceError,
    token_response::{jwt_claims, parse_token_response},
};
use crate::{ClientAuth, McpCredentialSpec, OAuth2Grant, OAuth2Source, SecretString, timing};

/// The largest token response we read: far above any real one.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// How long a client assertion is valid.
const ASSERTION_TTL: Duration = Duration::from_secs(60);

/// The resource sent with each request: `oauth2.resource`, else `spec.upstream`; none with `omitResource`.
pub fn resource<'a>(spec: &'a McpCredentialSpec, o: &'a OAuth2Source) -> Option<&'a str> {
    if o.quirks.as_ref().is_some_and(|q| q.omit_resource) {
        return None;
    }
    Some(o.resource.as_deref().unwrap_or(&spec.upstream))
}

/// The client authentication in effect (the documented default when `clientAuth` is unset).
pub fn client_auth(o: &OAuth2Source) -> ClientAuth {
    o.client_auth.unwrap_or(if o.client_secret.is_some() {
        ClientAuth::ClientSecretBasic
    } else if o.private_key.is_some() {
        ClientAuth::PrivateKeyJwt
    } else {
        ClientAuth::None
    })
}

/// Scheme, host and path of a URL: what may appear in messages and metric labels.
pub fn endpoint_label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                port_suffix(&u)
            ) + u.path()
        }
        Err(_) => "<invalid URL>".to_owned(),
    }
}

fn port_suffix(u: &reqwest::Url) -> String {
    u.port().map(|p| format!(":{p}")).unwrap_or_default()
}

/// One token request for `o`. See [`super::obtain`].
pub async fn obtain(
    _name: &str,
    spec: &McpCredentialSpec,
    o: &OAuth2Source,
    secrets: &impl SecretResolver,
    http: &reqwest::Client,
) -> Result<Issued, SourceError> {
    let token_url = o.token_url.as_deref().ok_or_else(|| {
        SourceError::Config("oauth2.tokenUrl is required (discovery is not supported by this version)".into())
    })?;
    let endpoint = endpoint_label(token_url);

    let mut form: Vec<(&str, String)> = Vec::new();
    // Extra parameters first, so the ones we set below win when a name repeats.
    let current_refresh_token = match o.grant {
        OAuth2Grant::ClientCredentials => {
            form.push(("grant_type", "client_credentials".into()));
            None
        }
        OAuth2Grant::RefreshToken => {
            let r = o.refresh_token.as_ref().ok_or_else(|| {
                SourceError::Config("oauth2.refreshToken is required when grant is refreshToken".into())
            })?;
            let rt = secrets.get(r).await?;
            if rt.is_empty() {
                return Err(SourceError::Config(format!(
                    "the refresh token in secret {:?} is empty",
                    r.name
                )));
            }
            form.push(("grant_type", "refresh_token".into()));
            form.push(("refresh_token", rt.expose().to_owned()));
            Some(rt)
        }
    };
    if !o.scopes.is_empty() {
        form.push(("scope", o.scopes.join(" ")));
    }
    let resource = resource(spec, o);
    if let Some(r) = resource {
        form.push(("resource", r.to_owned()));
    }
    if let Some(a) = &o.audience {
        form.push(("audience", a.clone()));
    }

    let mut basic = None;
    match client_auth(o) {
        ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
            let r = o.client_secret.as_ref().ok_or_else(|| {
                SourceError::Config(
                    "oauth2.clientSecret is required for clientSecretBasic/clientSecretPost".into(),
                )
            })?;
            let secret = secrets.get(r).await?;
            if client_auth(o) == ClientAuth::ClientSecretBasic {
                // RFC 6749 §2.3.1: form-encode both before Basic.
                basic = Some((form_encode(&o.client_id), form_encode(secret.expose())));
            } else {
                form.push(("client_id", o.client_id.clone()));
                form.push(("client_secret", secret.expose().to_owned()));
            }
        }
        ClientAuth::PrivateKeyJwt => {
            let r = o.private_key.as_ref().ok_or_else(|| {
                SourceError::Config("oauth2.privateKey is required for privateKeyJwt".into())
            })?;
            let pem = secrets.get(r).await?;
            form.push(("client_id", o.client_id.clone()));
            form.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ));
            form.push((
                "client_assertion",
                client_assertion(&o.client_id, token_url, &pem)?,
            ));
        }
        ClientAuth::None => form.push(("client_id", o.client_id.clone())),
    }
    let mut extra: Vec<(&str, String)> = o
        .extra_params
        .iter()
        .filter(|(k, _)| !form.iter().any(|(f, _)| f == k))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    form.append(&mut extra);

    let body = form
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let mut req = http
        .post(token_url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(reqwest::header::ACCEPT, "application/json")
        .body(body);
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    let resp = send(req, &endpoint).await?;
    let (status, bytes) = read_body(resp, &endpoint).await?;
    let token = parse_token_response(status, &bytes)?;

    let now = timing::truncate(SystemTime::now());
    let claims = jwt_claims(token.access_token.expose());
    let from_expires_in = token.expires_in.map(|d| now + Duration::from_secs(d.as_secs()));
    let from_jwt = claims
        .as_ref()
        .and_then(|c| c.exp)
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp));
    let expires_at = match (from_expires_in, from_jwt) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(exp) = expires_at
        && exp <= now
    {
        return Err(SourceError::BadResponse(
            "the issued token is already expired".into(),
        ));
    }
    if let (Some(expected), Some(claims)) = (resource, &claims) {
        let accepted = o
            .quirks
            .as_ref()
            .map(|q| q.accept_audiences.as_slice())
            .unwrap_or_default();
        if !claims.aud.is_empty() && !claims.aud.iter().any(|a| a == expected || accepted.contains(a)) {
            return Err(SourceError::AudienceMismatch {
                expected: expected.to_owned(),
                actual: claims.aud.clone(),
            });
        }
    }
    let rotated_refresh_token = match (current_refresh_token, token.refresh_token) {
        (Some(old), Some(new)) if old != new => Some(new),
        _ => None,
    };
    Ok(Issued {
        token: token.access_token,
        not_before: now,
        expires_at,
        rotated_refresh_token,
    })
}

/// Sends `req`; a failure to get an answer is a transient [`SourceError::FetchToken`] at `endpoint`.
pub(crate) async fn send(
    req: reqwest::RequestBuilder,
    endpoint: &str,
) -> Result<reqwest::Response, SourceError> {
    req.send().await.map_err(|e| SourceError::FetchToken {
        endpoint: endpoint.to_owned(),
        reason: describe(&e),
    })
}

/// The status and body of a response, at most [`MAX_RESPONSE_BYTES`] of it.
pub(crate) async fn read_body(
    mut resp: reqwest::Response,
    endpoint: &str,
) -> Result<(u16, Vec<u8>), SourceError> {
    let status = resp.status().as_u16();
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| SourceError::FetchToken {
        endpoint: endpoint.to_owned(),
        reason: describe(&e),
    })? {
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(SourceError::BadResponse(format!(
                "the response is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((status, bytes))
}

/// Why a request failed, without the URL's query (reqwest's messages include the URL).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else if e.is_body() || e.is_decode() {
        "the response body could not be read".into()
    } else {
        let mut msg = e.to_string();
        if let Some(u) = e.url() {
            msg = msg.replace(u.as_str(), &endpoint_label(u.as_str()));
        }
        msg
    }
}

/// An RFC 7523 client assertion signed with `pem` (RSA: RS256, EC P-256: ES256).
fn client_assertion(client_id: &str, token_url: &str, pem: &SecretString) -> Result<String, SourceError> {
    let now = timing::unix_seconds(SystemTime::now());
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": now,
        "exp": now + ASSERTION_TTL.as_secs(),
        "jti": super::jwt::jti(),
    });
    super::jwt::sign_any(&claims, pem).map_err(|e| SourceError::SignAssertion(e.0))
}

/// `application/x-www-form-urlencoded` encoding of one name or value.
pub(crate) fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests;

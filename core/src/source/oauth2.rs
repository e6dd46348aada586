//! The `oauth2` source: the client credentials and refresh token grants against a token endpoint,
//! with `client_secret_basic`, `client_secret_post`, `private_key_jwt` or no client authentication,
//! and the RFC 8707 `resource` on every request (refresh included) unless `quirks.omitResource`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    Issued, SecretResolver, SourceContext, SourceError, TokenEndpoint,
    outbound::{self, ReadError},
    token_response::{TokenResponse, jwt_claims, parse_token_response, refresh_token_in},
};
use super::{ResolveError, sign_in};
use crate::{
    ClientAuth, McpCredentialSpec, OAuth2Grant, OAuth2Source, ProviderQuirks, SecretKeyRef, SecretString,
    policy, timing,
};

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
    reqwest::Url::parse(url).map_or_else(|_| "<invalid URL>".to_owned(), |u| outbound::label(&u))
}

/// One token request for `o`. See [`super::obtain`].
pub async fn obtain(
    name: &str,
    spec: &McpCredentialSpec,
    o: &OAuth2Source,
    secrets: &impl SecretResolver,
    ctx: &SourceContext,
) -> Result<Issued, SourceError> {
    let endpoint = ctx.token_endpoint(spec, o.token_url.as_deref()).await?;
    let token_url = endpoint.url.as_str();

    let mut form: Vec<(&str, String)> = Vec::new();
    let mut basic = None;
    // The refresh token's key, and the value redeemed.
    let (refresh_ref, current_refresh_token) = match o.grant {
        OAuth2Grant::ClientCredentials => {
            form.push(("grant_type", "client_credentials".into()));
            (None, None)
        }
        OAuth2Grant::RefreshToken => {
            let r = o.refresh_token.clone().ok_or_else(|| {
                SourceError::Config("oauth2.refreshToken is required when grant is refreshToken".into())
            })?;
            let rt = secrets.get(&r).await?;
            if rt.is_empty() {
                return Err(SourceError::Config(format!(
                    "the refresh token in secret {:?} is empty",
                    r.name
                )));
            }
            form.push(("grant_type", "refresh_token".into()));
            form.push(("refresh_token", rt.expose().to_owned()));
            (Some(r), Some(rt))
        }
        OAuth2Grant::AuthorizationCode => {
            let (r, rt, client) = match signed_in(name, spec, o, endpoint.issuer.as_deref(), secrets).await? {
                SignedIn::Refresh(r, rt, client) => (r, rt, client),
                SignedIn::Held(issued) => return Ok(issued),
            };
            form.push(("grant_type", "refresh_token".into()));
            form.push(("refresh_token", rt.expose().to_owned()));
            basic = client.authenticate(&mut form);
            (Some(r), Some(rt))
        }
    };
    if !o.scopes.is_empty() && o.grant != OAuth2Grant::AuthorizationCode {
        form.push(("scope", o.scopes.join(" ")));
    }
    let resource = resource(spec, o);
    if let Some(r) = resource {
        form.push(("resource", r.to_owned()));
    }
    if let Some(a) = &o.audience {
        form.push(("audience", a.clone()));
    }

    match client_auth(o) {
        // A sign-in credential's client authenticated above (its registration's, or the pre-registered one's).
        _ if o.grant == OAuth2Grant::AuthorizationCode => {}
        ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
            let r = o.client_secret.as_ref().ok_or_else(|| {
                SourceError::Config(
                    "oauth2.clientSecret is required for clientSecretBasic/clientSecretPost".into(),
                )
            })?;
            let secret = secrets.get(r).await?;
            if client_auth(o) == ClientAuth::ClientSecretBasic {
                basic = Some((o.client_id.clone(), secret));
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
                client_assertion(
                    &o.client_id,
                    endpoint.issuer.as_deref().unwrap_or(token_url),
                    &pem,
                )?,
            ));
        }
        ClientAuth::None => form.push(("client_id", o.client_id.clone())),
    }
    // Extra parameters last, and only those we do not set ourselves.
    let mut extra: Vec<(&str, String)> = o
        .extra_params
        .iter()
        .filter(|(k, _)| !form.iter().any(|(f, _)| f == k))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    form.append(&mut extra);

    let (token, refresh_token) = post_token_keeping_refresh_token(
        ctx,
        spec,
        &endpoint,
        &form,
        basic
            .as_ref()
            .map(|(id, s): &(String, SecretString)| (id.as_str(), s)),
    )
    .await;
    // Hand a rotated refresh token over before anything can refuse the answer: the server has
    // already revoked the one we sent.
    if let (Some(r), Some(old), Some(new)) = (&refresh_ref, &current_refresh_token, &refresh_token)
        && old != new
    {
        secrets.refresh_token_rotated(r, new);
    }
    let token = match token {
        // A revoked sign-in: only a person can fix it.
        Err(SourceError::InvalidGrant(d)) if o.grant == OAuth2Grant::AuthorizationCode => {
            return Err(SourceError::SignInRequired {
                why: format!(
                    "the authorization server rejected the sign-in's refresh token (invalid_grant{})",
                    d.map(|d| format!(": {d}")).unwrap_or_default()
                ),
                command: secrets.sign_in_command(name),
            });
        }
        t => t?,
    };
    issued(token, resource, o.quirks.as_ref(), current_refresh_token)
}

/// What a sign-in left to obtain the credential with.
enum SignedIn {
    /// The refresh token (its key and value) and the client to redeem it with.
    Refresh(SecretKeyRef, SecretString, sign_in::Client),
    /// The access token of a sign-in that gave no refresh token, still before its renewal time.
    Held(Issued),
}

/// A sign-in credential's refresh token and the client to redeem it with: the registration kept
/// for the discovered `issuer` (never one made with another server), or the pre-registered
/// `oauth2.clientId`; else the access token of a sign-in without a refresh token, until its
/// renewal time (the one the operator and standalone mode schedule: [`policy::renewal`]), from
/// which a new sign-in is asked for while the token is still served. Anything missing asks for a
/// sign-in.
async fn signed_in(
    name: &str,
    spec: &McpCredentialSpec,
    o: &OAuth2Source,
    issuer: Option<&str>,
    secrets: &impl SecretResolver,
) -> Result<SignedIn, SourceError> {
    let need = |why: String| SourceError::SignInRequired {
        why,
        command: secrets.sign_in_command(name),
    };
    let r = sign_in::refresh_token_ref(name, o);
    let rt = match secrets.get(&r).await {
        Ok(rt) if !rt.is_empty() => rt,
        Ok(_) | Err(ResolveError::NotFound { .. }) => {
            return held(name, spec, o, secrets).await.map_err(need);
        }
        Err(e) => return Err(e.into()),
    };
    let registrations = match secrets.get(&sign_in::registration_ref(name, o)).await {
        Ok(text) => sign_in::Registrations::parse(text.expose()).map_err(need)?,
        Err(ResolveError::NotFound { .. }) => sign_in::Registrations::default(),
        Err(e) => return Err(e.into()),
    };
    let registration = match issuer {
        Some(i) => registrations.0.get(i),
        // A configured token URL: the one registration there is.
        None => registrations.0.values().next(),
    };
    let secret = match &o.client_secret {
        Some(r) => Some(secrets.get(r).await?),
        None => None,
    };
    let client = match registration {
        Some(reg) => {
            let secret = secret.or_else(|| reg.client_secret.clone());
            sign_in::Client::new(o, reg, secret)
        }
        None if !o.client_id.is_empty() => {
            sign_in::Client::new(o, &sign_in::Registration::pre_registered(o), secret)
        }
        None => {
            return Err(need(format!(
                "no client is registered with the authorization server {} (the protected resource names it now; \
                 registrations are never reused with another server)",
                issuer.unwrap_or("configured in oauth2.tokenUrl")
            )));
        }
    };
    Ok(SignedIn::Refresh(r, rt, client))
}

/// The access token a sign-in without a refresh token stored, while it is before its renewal
/// time; else why a sign-in is needed.
async fn held(
    name: &str,
    spec: &McpCredentialSpec,
    o: &OAuth2Source,
    secrets: &impl SecretResolver,
) -> Result<SignedIn, String> {
    let r = sign_in::access_token_ref(name, o);
    let refresh = sign_in::refresh_token_ref(name, o);
    let not_yet = || {
        format!(
            "not signed in yet (no {:?} in secret {:?})",
            refresh.key, refresh.name
        )
    };
    let text = match secrets.get(&r).await {
        Ok(t) if !t.is_empty() => t,
        Ok(_) | Err(ResolveError::NotFound { .. }) => return Err(not_yet()),
        Err(e) => return Err(e.to_string()),
    };
    let h = sign_in::HeldToken::parse(text.expose())?;
    // The same key, so the same jitter, as the operator's and standalone mode's schedules.
    let key = match secrets.namespace() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    let renewal = policy::renewal(spec, h.issued_at, h.expires_at, &key);
    let now = SystemTime::now();
    if renewal.is_some_and(|at| at <= now) || h.expires_at.is_some_and(|e| e <= now) {
        let until = h
            .expires_at
            .map(|e| format!(" (it expires at {})", crate::secret::rfc3339_seconds(e)))
            .unwrap_or_default();
        return Err(format!(
            "the authorization server issued no refresh token at sign-in, so the access token cannot be renewed{until}"
        ));
    }
    Ok(SignedIn::Held(Issued {
        token: h.token,
        not_before: h.issued_at,
        expires_at: h.expires_at,
        rotated_refresh_token: None,
    }))
}

/// Sends one token request (a form, with HTTP Basic client authentication when `basic` is set)
/// and parses the answer, reading at most [`MAX_RESPONSE_BYTES`] within the client's deadline.
pub(crate) async fn post_token(
    ctx: &SourceContext,
    spec: &McpCredentialSpec,
    endpoint: &TokenEndpoint,
    form: &[(&str, String)],
    basic: Option<(&str, &SecretString)>,
) -> Result<TokenResponse, SourceError> {
    post_token_keeping_refresh_token(ctx, spec, endpoint, form, basic)
        .await
        .0
}

/// [`post_token`], and the answer's `refresh_token` even when the rest of the answer is refused.
async fn post_token_keeping_refresh_token(
    ctx: &SourceContext,
    spec: &McpCredentialSpec,
    endpoint: &TokenEndpoint,
    form: &[(&str, String)],
    basic: Option<(&str, &SecretString)>,
) -> (Result<TokenResponse, SourceError>, Option<SecretString>) {
    let (result, refresh_token) = match send_form(ctx.client(endpoint), &endpoint.url, form, basic).await {
        Ok((status, bytes)) => (
            parse_token_response(status, &bytes),
            refresh_token_in(status, &bytes),
        ),
        Err(e) => (Err(e), None),
    };
    if let Err(e) = &result {
        ctx.token_request_failed(spec, endpoint, e);
    }
    (result, refresh_token)
}

/// Sends the form; the answer's status and body (at most [`MAX_RESPONSE_BYTES`]).
pub(crate) async fn send_form(
    http: &reqwest::Client,
    token_url: &str,
    form: &[(&str, String)],
    basic: Option<(&str, &SecretString)>,
) -> Result<(u16, Vec<u8>), SourceError> {
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
        // RFC 6749 §2.3.1: form-encode both before Basic.
        req = req.basic_auth(form_encode(id), Some(form_encode(secret.expose())));
    }
    let endpoint = endpoint_label(token_url);
    let resp = send(req, &endpoint).await?;
    read_body(resp, &endpoint).await
}

/// The credential a token response gives: expiry from `expires_in` or the JWT's `exp` (the
/// earlier), the JWT's `aud` checked against `resource` (or `quirks.acceptAudiences`), and a
/// rotated refresh token when the server sent a new one.
pub(crate) fn issued(
    token: TokenResponse,
    resource: Option<&str>,
    quirks: Option<&ProviderQuirks>,
    current_refresh_token: Option<SecretString>,
) -> Result<Issued, SourceError> {
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
        let accepted = quirks.map(|q| q.accept_audiences.as_slice()).unwrap_or_default();
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
        reason: outbound::describe(&e),
    })
}

/// The status and body of a response, at most [`MAX_RESPONSE_BYTES`] of it, within the client's
/// deadline: a larger body is a bad response, a broken one a transient failure at `endpoint`.
pub(crate) async fn read_body(
    resp: reqwest::Response,
    endpoint: &str,
) -> Result<(u16, Vec<u8>), SourceError> {
    let status = resp.status().as_u16();
    match outbound::read_limited(resp, MAX_RESPONSE_BYTES).await {
        Ok(bytes) => Ok((status, bytes)),
        Err(e @ ReadError::TooLarge(_)) => Err(SourceError::BadResponse(e.to_string())),
        Err(ReadError::Failed(reason)) => Err(SourceError::FetchToken {
            endpoint: endpoint.to_owned(),
            reason,
        }),
    }
}

/// An RFC 7523 client assertion signed with `pem` (RSA: RS256, EC P-256: ES256), for `audience`:
/// the authorization server's issuer when it was discovered (RFC 7523bis, and what the MCP
/// conformance suite checks), else the configured token URL, since the issuer is not known then.
fn client_assertion(client_id: &str, audience: &str, pem: &SecretString) -> Result<String, SourceError> {
    let now = timing::unix_seconds(SystemTime::now());
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
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

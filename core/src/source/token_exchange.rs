//! The `tokenExchange` source: trades a subject token for a token bound to the upstream, by
//! RFC 8693 token exchange or the RFC 7523 JWT-bearer grant. The subject is a service-account
//! token the resolver requests from the TokenRequest API (workload identity: nothing stored), or a
//! token in a Secret. The RFC 8707 `resource` is sent unless `quirks.omitResource`, and a JWT
//! whose `aud` is neither the resource nor in `quirks.acceptAudiences` is refused, as for oauth2.
//!
//! With `crossAppAccess` (MCP Enterprise-Managed Authorization), the subject token is first
//! exchanged at the identity provider for an ID-JAG ([`cross_app_access`]), which is then the
//! JWT-bearer grant's assertion.
//!
//! The subject token's own lifetime bounds nothing: the issued token's expiry drives renewal, and
//! every renewal requests a fresh subject token.

use super::{
    Issued, SecretResolver, SourceContext, SourceError,
    oauth2::{issued, post_token},
};
use crate::{ExchangeGrant, McpCredentialSpec, SecretString, TokenExchangeSource};

/// Cross-app access: the ID-JAG from the identity provider.
mod cross_app_access;

/// `grant_type` of RFC 8693 token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `grant_type` of the RFC 7523 JWT-bearer grant.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The default `subject_token_type`: a JWT (a service-account token is one).
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// The default `requested_token_type`.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The ServiceAccount annotation that lets the operator request its tokens for tokenExchange: a
/// comma-separated list of the audiences allowed. Without it, any McpCredential author could have
/// the operator mint a token of any service account of the namespace, for any audience.
pub const SERVICE_ACCOUNT_AUDIENCES_ANNOTATION: &str = "mcpcredentials.dev/token-exchange-audiences";
/// The service-account token lifetime when `expirationSeconds` is unset: the API server's minimum.
pub const DEFAULT_SUBJECT_TTL_SECONDS: i64 = 600;

/// The resource sent with each request: `resource`, else `spec.upstream`; none with `omitResource`.
pub fn resource<'a>(spec: &'a McpCredentialSpec, t: &'a TokenExchangeSource) -> Option<&'a str> {
    if t.quirks.as_ref().is_some_and(|q| q.omit_resource) {
        return None;
    }
    Some(t.resource.as_deref().unwrap_or(&spec.upstream))
}

/// One exchange for `t` (two requests with `crossAppAccess`: the ID-JAG first). See
/// [`super::obtain`].
pub async fn obtain(
    spec: &McpCredentialSpec,
    t: &TokenExchangeSource,
    secrets: &impl SecretResolver,
    ctx: &SourceContext,
) -> Result<Issued, SourceError> {
    if t.cross_app_access.is_some() && t.grant != ExchangeGrant::JwtBearer {
        return Err(SourceError::Config(
            "tokenExchange.crossAppAccess needs tokenExchange.grant: jwtBearer (the ID-JAG from the identity \
             provider is redeemed with the JWT-bearer grant)"
                .into(),
        ));
    }
    let endpoint = ctx.token_endpoint(spec, t.token_url.as_deref()).await?;
    let from_service_account = t.subject.service_account.is_some();
    let subject = subject_token(t, secrets).await?;
    let secret = match &t.client_secret {
        Some(r) => {
            if t.client_id.is_none() {
                return Err(SourceError::Config(
                    "tokenExchange.clientId is required with tokenExchange.clientSecret".into(),
                ));
            }
            Some(secrets.get(r).await?)
        }
        None => None,
    };
    // With cross-app access the assertion is a new ID-JAG, exchanged for the subject token.
    let id_jag = match &t.cross_app_access {
        Some(x) => {
            let audience = x.audience.as_deref().or(endpoint.issuer.as_deref()).ok_or_else(|| {
                SourceError::Config(
                    "tokenExchange.crossAppAccess.audience is required when tokenExchange.tokenUrl is set: the \
                     issuer of the MCP server's authorization server (without tokenUrl it is discovered)"
                        .into(),
                )
            })?;
            let resource = t.resource.as_deref().unwrap_or(&spec.upstream);
            let jag = cross_app_access::id_jag(ctx, t, x, &subject, audience, resource, secrets)
                .await
                .map_err(|e| match e {
                    SourceError::InvalidGrant(why) if from_service_account => {
                        SourceError::IdentityProvider(Box::new(SourceError::SubjectRejected(why)))
                    }
                    e @ (SourceError::Config(_) | SourceError::ResolveSecret(_)) => e,
                    e => SourceError::IdentityProvider(Box::new(e)),
                })?;
            Some(jag)
        }
        None => None,
    };

    let mut form: Vec<(&str, String)> = Vec::new();
    match t.grant {
        ExchangeGrant::TokenExchange => {
            form.push(("grant_type", TOKEN_EXCHANGE_GRANT.into()));
            form.push(("subject_token", subject.expose().to_owned()));
            form.push((
                "subject_token_type",
                t.subject
                    .token_type
                    .clone()
                    .unwrap_or_else(|| JWT_TOKEN_TYPE.into()),
            ));
            form.push((
                "requested_token_type",
                t.requested_token_type
                    .clone()
                    .unwrap_or_else(|| ACCESS_TOKEN_TYPE.into()),
            ));
        }
        ExchangeGrant::JwtBearer => {
            form.push(("grant_type", JWT_BEARER_GRANT.into()));
            let assertion = id_jag.as_ref().unwrap_or(&subject);
            form.push(("assertion", assertion.expose().to_owned()));
        }
    }
    let resource = resource(spec, t);
    if let Some(r) = resource {
        form.push(("resource", r.to_owned()));
    }
    if let Some(a) = &t.audience {
        form.push(("audience", a.clone()));
    }
    if !t.scopes.is_empty() {
        form.push(("scope", t.scopes.join(" ")));
    }
    let basic = client(&mut form, t.client_id.as_deref(), secret.as_ref());

    let token = match post_token(ctx, spec, &endpoint, &form, basic).await {
        // A service-account token is new on every attempt: its rejection is a trust problem
        // (issuer, audience) to report and retry with backoff, not a grant to re-authorize.
        Err(SourceError::InvalidGrant(why)) if from_service_account && id_jag.is_none() => {
            return Err(SourceError::SubjectRejected(why));
        }
        // So is an ID-JAG: the identity provider has just issued it; the stored ID token is fine.
        Err(SourceError::InvalidGrant(why)) if id_jag.is_some() => {
            return Err(cross_app_access::rejected(why));
        }
        other => other?,
    };
    issued(token, resource, t.quirks.as_ref(), None)
}

/// The subject token: a new service-account token, or the one stored in the Secret.
async fn subject_token(
    t: &TokenExchangeSource,
    secrets: &impl SecretResolver,
) -> Result<SecretString, SourceError> {
    match (&t.subject.service_account, &t.subject.secret_key_ref) {
        (Some(sa), None) => {
            let ttl = sa.expiration_seconds.unwrap_or(DEFAULT_SUBJECT_TTL_SECONDS);
            Ok(secrets.service_account_token(&sa.name, &sa.audience, ttl).await?)
        }
        (None, Some(r)) => {
            let token = secrets.get(r).await?;
            if token.is_empty() {
                return Err(SourceError::Config(format!(
                    "tokenExchange: the subject token in key {:?} of secret {:?} is empty",
                    r.key, r.name
                )));
            }
            Ok(token)
        }
        _ => Err(SourceError::Config(
            "tokenExchange.subject must set exactly one of serviceAccount or secretKeyRef".into(),
        )),
    }
}

/// Client identification for a token request: HTTP Basic with a secret (returned), else a public
/// client's `client_id` in the form (identified, not authenticated: the token sent is the proof).
fn client<'a>(
    form: &mut Vec<(&str, String)>,
    client_id: Option<&'a str>,
    secret: Option<&'a SecretString>,
) -> Option<(&'a str, &'a SecretString)> {
    match (client_id, secret) {
        (Some(id), Some(secret)) => Some((id, secret)),
        (Some(id), None) => {
            form.push(("client_id", id.to_owned()));
            None
        }
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests;

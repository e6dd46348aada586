//! The identity provider's half of cross-app access (MCP Enterprise-Managed Authorization,
//! draft-ietf-oauth-identity-assertion-authz-grant): an RFC 8693 token exchange of the person's ID
//! token for an Identity Assertion JWT Authorization Grant (ID-JAG) naming the MCP server's
//! authorization server (`audience`) and the MCP server (`resource`). The ID-JAG is a bearer
//! grant: it is never logged, stored or shown, only sent as the JWT-bearer grant's assertion.

use serde_json::Value;

use super::{JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT, client};
use crate::{
    CrossAppAccess, SecretString, TokenExchangeSource,
    source::{
        SecretResolver, SourceContext, SourceError,
        oauth2::send_form,
        token_response::{self, parse_token_response},
    },
};

/// The `requested_token_type` (and the `issued_token_type` expected back) of an ID-JAG.
pub const ID_JAG_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id-jag";
/// The default `subject_token_type` with cross-app access: the person's OpenID Connect ID token.
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";

/// Exchanges `subject` at the identity provider `x.tokenUrl` for an ID-JAG for `audience` (the
/// MCP server's authorization server) and `resource` (the MCP server). One request, through the
/// client for configured URLs (no redirects). Errors are those of any token request.
pub(super) async fn id_jag(
    ctx: &SourceContext,
    t: &TokenExchangeSource,
    x: &CrossAppAccess,
    subject: &SecretString,
    audience: &str,
    resource: &str,
    secrets: &impl SecretResolver,
) -> Result<SecretString, SourceError> {
    let secret = match &x.client_secret {
        Some(r) => {
            if x.client_id.is_none() {
                return Err(SourceError::Config(
                    "tokenExchange.crossAppAccess.clientId is required with tokenExchange.crossAppAccess.clientSecret"
                        .into(),
                ));
            }
            Some(secrets.get(r).await?)
        }
        None => None,
    };
    let subject_token_type = t.subject.token_type.as_deref().unwrap_or(
        // A service-account token is a JWT; a stored token, the person's ID token.
        if t.subject.service_account.is_some() {
            JWT_TOKEN_TYPE
        } else {
            ID_TOKEN_TYPE
        },
    );
    let mut form: Vec<(&str, String)> = vec![
        ("grant_type", TOKEN_EXCHANGE_GRANT.into()),
        ("requested_token_type", ID_JAG_TOKEN_TYPE.into()),
        ("subject_token", subject.expose().to_owned()),
        ("subject_token_type", subject_token_type.to_owned()),
        ("audience", audience.to_owned()),
        ("resource", resource.to_owned()),
    ];
    if !t.scopes.is_empty() {
        form.push(("scope", t.scopes.join(" ")));
    }
    let basic = client(&mut form, x.client_id.as_deref(), secret.as_ref());
    let (status, body) = send_form(ctx.http(), &x.token_url, &form, basic).await?;
    let token = parse_token_response(status, &body)?;
    match issued_token_type(&body) {
        None => {}
        Some(t) if t == ID_JAG_TOKEN_TYPE => {}
        Some(other) => {
            return Err(SourceError::BadResponse(format!(
                "the identity provider issued a token of type {}, not the ID-JAG asked for ({ID_JAG_TOKEN_TYPE})",
                token_response::safe_text(&other)
            )));
        }
    }
    Ok(token.access_token)
}

/// The `issued_token_type` of a token exchange answer (RFC 8693 §2.2.1), if it has one.
fn issued_token_type(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body)
        .ok()?
        .get("issued_token_type")?
    {
        Value::String(s) => Some(s.chars().take(200).collect()),
        _ => Some("(not a string)".into()),
    }
}

/// The MCP server's authorization server answered `invalid_grant` to an ID-JAG the identity
/// provider has just issued: a trust problem between the two, retried with backoff; the stored
/// ID token is not at fault (the identity provider accepted it).
pub(super) fn rejected(why: Option<String>) -> SourceError {
    SourceError::Rejected {
        reason: "IdJagRejected",
        message: format!(
            "the MCP server's authorization server rejected the ID-JAG the identity provider issued \
             (invalid_grant{}); check that it trusts that identity provider \
             (tokenExchange.crossAppAccess.tokenUrl) for this client (tokenExchange.clientId) and \
             that tokenExchange.crossAppAccess.audience (default: its discovered issuer) and \
             tokenExchange.resource (default: spec.upstream) are what it expects",
            why.map(|d| format!(": {d}")).unwrap_or_default()
        ),
    }
}

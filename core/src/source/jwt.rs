//! The `jwt` source: audience-bound JWTs minted and signed by the operator itself (ES256 or RS256),
//! and the JWT signing every signing source shares (oauth2 client assertions, GitHub App JWTs).
//!
//! The keys come from [`super::SecretResolver::signing_key`]; [`crate::keyring`] keeps, rotates
//! and publishes them.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash},
};
use serde_json::{Map, Value};

use super::{Issued, SecretResolver, SourceError};
use crate::{JwtAlgorithm, JwtSource, McpCredentialSpec, SecretString, timing};

/// A private key the operator signs minted JWTs with.
#[derive(Clone, Debug)]
pub struct SigningKey {
    /// The key ID, on every token it signs (`kid`) and in the JWKS: the RFC 7638 thumbprint.
    pub kid: String,
    /// Its algorithm.
    pub algorithm: JwtAlgorithm,
    /// The PKCS#8 PEM private key.
    pub private_key_pem: SecretString,
    /// The `iss` of the tokens it signs: the URL whose `/.well-known/jwks.json` publishes it.
    pub issuer: String,
}

/// The jsonwebtoken algorithm of a [`JwtAlgorithm`].
pub fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
    }
}

/// Why a JWT could not be signed: the key's error kind, never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignError(pub String);

fn encoding_key(alg: Algorithm, pem: &[u8]) -> Result<EncodingKey, SignError> {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        _ => EncodingKey::from_rsa_pem(pem),
    };
    key.map_err(|e| SignError(format!("{:?}", e.kind())))
}

/// Signs `claims` with the PEM key `pem` as `alg`, with `kid` in the header when given.
pub fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    claims: &Value,
    pem: &SecretString,
) -> Result<String, SignError> {
    let key = encoding_key(alg, pem.expose().as_bytes())?;
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| SignError(format!("{:?}", e.kind())))
}

/// Signs `claims` with a PEM key of either kind: RS256 for RSA, ES256 for EC P-256.
pub fn sign_any(claims: &Value, pem: &SecretString) -> Result<String, SignError> {
    sign(Algorithm::RS256, None, claims, pem).or_else(|_| sign(Algorithm::ES256, None, claims, pem))
}

/// A unique token ID: time, process and a counter.
pub fn jti() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{:x}-{:x}-{:x}",
        now.as_nanos(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A new private key for `alg` (EC P-256, or RSA 2048) as PKCS#8 PEM, with its `kid`.
pub fn generate_key(alg: JwtAlgorithm) -> Result<(SecretString, String), SignError> {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let err = |e: &dyn std::fmt::Display| SignError(format!("generating a {alg:?} key: {e}"));
    let pem = match alg {
        JwtAlgorithm::ES256 => p256::SecretKey::random(&mut rand_core::OsRng)
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| err(&e))?
            .to_string(),
        JwtAlgorithm::RS256 => rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
            .map_err(|e| err(&e))?
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| err(&e))?
            .to_string(),
    };
    let pem = SecretString::new(pem);
    let kid = kid(alg, &pem)?;
    Ok((pem, kid))
}

/// The `kid` of a PEM private key: the RFC 7638 thumbprint of its public JWK.
pub fn kid(alg: JwtAlgorithm, pem: &SecretString) -> Result<String, SignError> {
    public_jwk(alg, pem, None)?
        .thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| SignError(format!("{:?}", e.kind())))
}

/// The public JWK of a PEM private key, for the JWKS (`use: sig`, `alg`, `kid`).
pub fn public_jwk(alg: JwtAlgorithm, pem: &SecretString, kid: Option<&str>) -> Result<Jwk, SignError> {
    let alg = algorithm(alg);
    let key = encoding_key(alg, pem.expose().as_bytes())?;
    let mut jwk = Jwk::from_encoding_key(&key, alg).map_err(|e| SignError(format!("{:?}", e.kind())))?;
    jwk.common.key_id = kid.map(str::to_owned);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(match alg {
        Algorithm::ES256 => KeyAlgorithm::ES256,
        _ => KeyAlgorithm::RS256,
    });
    Ok(jwk)
}

/// The claims of a token for `j` issued at `now` by `issuer`: the custom claims, then the
/// registered ones (which always win).
pub fn claims(
    spec: &McpCredentialSpec,
    j: &JwtSource,
    issuer: &str,
    now: SystemTime,
    ttl: Duration,
) -> Value {
    let iat = timing::unix_seconds(now);
    let mut map: Map<String, Value> = j
        .claims
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for (k, v) in [
        ("iss", Value::from(issuer)),
        ("sub", Value::from(j.subject.as_str())),
        ("aud", Value::from(audience(spec, j))),
        ("iat", Value::from(iat)),
        ("nbf", Value::from(iat)),
        ("exp", Value::from(iat + ttl.as_secs())),
        ("jti", Value::from(jti())),
    ] {
        map.insert(k.to_owned(), v);
    }
    Value::Object(map)
}

/// The `aud` of the tokens: `jwt.audience`, else `spec.upstream`.
pub fn audience<'a>(spec: &'a McpCredentialSpec, j: &'a JwtSource) -> &'a str {
    j.audience.as_deref().unwrap_or(&spec.upstream)
}

/// Mints one token for `j` with the current key for its algorithm. No network.
pub async fn obtain(
    spec: &McpCredentialSpec,
    j: &JwtSource,
    secrets: &impl SecretResolver,
) -> Result<Issued, SourceError> {
    let ttl = timing::parse_duration(&j.ttl)
        .filter(|d| (60..=86_400).contains(&d.as_secs()))
        .ok_or_else(|| {
            SourceError::Config(format!(
                "jwt.ttl {:?} is not a duration between 1m and 24h, such as 15m",
                j.ttl
            ))
        })?;
    let key = secrets.signing_key(j.algorithm).await?;
    let now = timing::truncate(SystemTime::now());
    let claims = claims(spec, j, &key.issuer, now, ttl);
    let token = sign(
        algorithm(j.algorithm),
        Some(&key.kid),
        &claims,
        &key.private_key_pem,
    )
    .map_err(|e| SourceError::SignJwt {
        field: "the operator's signing key",
        reason: e.0,
    })?;
    Ok(Issued {
        token: SecretString::new(token),
        not_before: now,
        expires_at: Some(now + ttl),
        rotated_refresh_token: None,
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation, decode};

    use super::*;
    use crate::{CredentialSource, source::test_support::MapResolver};

    fn spec(alg: JwtAlgorithm) -> McpCredentialSpec {
        McpCredentialSpec {
            upstream: "https://mcp.example.com/mcp".into(),
            source: CredentialSource {
                jwt: Some(JwtSource {
                    subject: "system:serviceaccount:agents:research".into(),
                    audience: None,
                    ttl: "10m".into(),
                    algorithm: alg,
                    claims: [
                        ("tenant".to_owned(), "acme".to_owned()),
                        ("sub".to_owned(), "evil".to_owned()),
                    ]
                    .into_iter()
                    .collect(),
                }),
                ..Default::default()
            },
            inject: None,
            refresh: None,
            secret_name: None,
            access: None,
        }
    }

    async fn minted_token_verifies_with_its_public_jwk(alg: JwtAlgorithm) {
        let (pem, kid) = generate_key(alg).unwrap();
        let resolver = MapResolver::default().with_signing_key(SigningKey {
            kid: kid.clone(),
            algorithm: alg,
            private_key_pem: pem.clone(),
            issuer: "https://issuer.example".into(),
        });
        let spec = spec(alg);
        let issued = obtain(&spec, spec.source.jwt.as_ref().unwrap(), &resolver)
            .await
            .unwrap();
        let jwk = public_jwk(alg, &pem, Some(&kid)).unwrap();
        let header = jsonwebtoken::decode_header(issued.token.expose()).unwrap();
        assert_eq!(header.kid.as_deref(), Some(kid.as_str()));
        assert_eq!(header.alg, algorithm(alg));
        let mut v = Validation::new(algorithm(alg));
        v.set_audience(&["https://mcp.example.com/mcp"]);
        v.set_issuer(&["https://issuer.example"]);
        let data = decode::<Value>(issued.token.expose(), &DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap();
        assert_eq!(
            data.claims["sub"], "system:serviceaccount:agents:research",
            "registered claims win"
        );
        assert_eq!(data.claims["tenant"], "acme");
        assert!(data.claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
        let exp = issued.expires_at.unwrap();
        assert_eq!(
            exp.duration_since(issued.not_before).unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(data.claims["exp"], timing::unix_seconds(exp));

        let mut other = Validation::new(algorithm(alg));
        other.set_audience(&["https://other.example.com/mcp"]);
        assert!(
            decode::<Value>(
                issued.token.expose(),
                &DecodingKey::from_jwk(&jwk).unwrap(),
                &other
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn an_es256_token_verifies_with_the_published_key_for_its_audience_only() {
        minted_token_verifies_with_its_public_jwk(JwtAlgorithm::ES256).await;
    }

    #[tokio::test]
    async fn an_rs256_token_verifies_with_the_published_key_for_its_audience_only() {
        minted_token_verifies_with_its_public_jwk(JwtAlgorithm::RS256).await;
    }

    #[tokio::test]
    async fn without_a_signing_key_minting_fails_with_a_configuration_error() {
        let spec = spec(JwtAlgorithm::ES256);
        let e = obtain(&spec, spec.source.jwt.as_ref().unwrap(), &MapResolver::default())
            .await
            .unwrap_err();
        assert_eq!(e.category(), "config_error");
        assert!(e.to_string().contains("--jwks-listen"), "{e}");
    }

    #[test]
    fn the_kid_is_the_keys_thumbprint_and_differs_between_keys() {
        let (a, kid_a) = generate_key(JwtAlgorithm::ES256).unwrap();
        let (_, kid_b) = generate_key(JwtAlgorithm::ES256).unwrap();
        assert_ne!(kid_a, kid_b);
        let jwk = public_jwk(JwtAlgorithm::ES256, &a, None).unwrap();
        assert_eq!(jwk.thumbprint(ThumbprintHash::SHA256).unwrap(), kid_a);
        let json = serde_json::to_string(&jwk).unwrap();
        assert!(
            !json.contains("\"d\""),
            "a public JWK has no private part: {json}"
        );
    }
}

//! The `jwt` source: audience-bound JWTs minted and signed by the operator itself (ES256 or RS256),
//! and the JWT signing every signing source shares (oauth2 client assertions, GitHub App JWTs).
//!
//! The keys come from [`super::SecretResolver::signing_key`]; [`crate::keyring`] keeps, rotates
//! and publishes them.
//!
//! Every key signs for every namespace under one issuer, so a token must say which namespace it
//! came from, in a way that namespace cannot forge: [`claims`] adds [`NAMESPACE_CLAIM`] and
//! [`CREDENTIAL_CLAIM`] (which `jwt.claims` may not set) and prefixes `sub` with
//! `mcpcred:<namespace>:`. An administrator narrows (audiences) or widens (unprefixed subjects)
//! that per namespace with a [`MintPolicy`], which no namespaced object can change.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use std::collections::BTreeMap;

use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash},
};
use serde::Deserialize;
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

/// The claim holding the namespace of the McpCredential that minted the token.
///
/// Why this name: the issuer signs for every namespace, so the namespace must travel in a claim the
/// namespace cannot set. A name under the project's domain (RFC 7519 section 4.2, collision-resistant
/// public claim names) cannot collide with a claim an upstream already uses (`namespace`, `tenant`),
/// and a flat string is one equality check in any JWT library (PyJWT, jose, Envoy's `jwt_authn`).
/// `jwt.claims` cannot set any claim starting with [`RESERVED_CLAIM_PREFIX`].
pub const NAMESPACE_CLAIM: &str = "mcpcredentials.dev/namespace";

/// The claim holding the name of the McpCredential that minted the token (for audit logs and for
/// upstreams that allow one credential only).
pub const CREDENTIAL_CLAIM: &str = "mcpcredentials.dev/credential";

/// Claims starting with this are the operator's: `jwt.claims` cannot set them (nor `mcpcredentials.dev`
/// alone), so they can be trusted as much as the signature.
pub const RESERVED_CLAIM_PREFIX: &str = "mcpcredentials.dev";

/// The registered claims the operator always sets.
pub const REGISTERED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"];

/// What `sub` starts with: `mcpcred:<namespace>:`, then `jwt.subject`.
pub const SUBJECT_PREFIX: &str = "mcpcred:";

/// True for a claim `jwt.claims` may not set: a registered one or one of the operator's.
pub fn is_reserved_claim(name: &str) -> bool {
    REGISTERED_CLAIMS.contains(&name) || name.starts_with(RESERVED_CLAIM_PREFIX)
}

/// The `sub` of a token minted in `namespace` for `subject`: `mcpcred:<namespace>:<subject>`.
/// A namespace name (an RFC 1123 label) has no `:`, so the namespace is everything between the
/// first and the second `:`, and no namespace can produce another's prefix.
pub fn bound_subject(namespace: &str, subject: &str) -> String {
    format!("{SUBJECT_PREFIX}{namespace}:{subject}")
}

/// The McpCredential a token is minted for: every token carries its namespace and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding<'a> {
    /// The McpCredential's namespace.
    pub namespace: &'a str,
    /// Its name.
    pub credential: &'a str,
    /// `sub` is `jwt.subject` verbatim, without the `mcpcred:<namespace>:` prefix: only when the
    /// administrator allows that subject for this namespace ([`MintPolicy::allows_unprefixed_subject`]).
    pub unprefixed_subject: bool,
}

/// The claims of a token for `j` issued at `now` by `issuer`: the custom claims, then the
/// registered ones and the binding to the McpCredential (which always win). `binding` is `None`
/// only where there are no namespaces (standalone mode: one person, their own key).
pub fn claims(
    spec: &McpCredentialSpec,
    j: &JwtSource,
    binding: Option<&Binding<'_>>,
    issuer: &str,
    now: SystemTime,
    ttl: Duration,
) -> Value {
    let iat = timing::unix_seconds(now);
    let mut map: Map<String, Value> = j
        .claims
        .iter()
        .filter(|(k, _)| !is_reserved_claim(k))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let sub = match binding {
        Some(b) if !b.unprefixed_subject => bound_subject(b.namespace, &j.subject),
        _ => j.subject.clone(),
    };
    for (k, v) in [
        ("iss", Value::from(issuer)),
        ("sub", Value::from(sub)),
        ("aud", Value::from(audience(spec, j))),
        ("iat", Value::from(iat)),
        ("nbf", Value::from(iat)),
        ("exp", Value::from(iat + ttl.as_secs())),
        ("jti", Value::from(jti())),
    ] {
        map.insert(k.to_owned(), v);
    }
    if let Some(b) = binding {
        map.insert(NAMESPACE_CLAIM.to_owned(), Value::from(b.namespace));
        map.insert(CREDENTIAL_CLAIM.to_owned(), Value::from(b.credential));
    }
    Value::Object(map)
}

/// The `aud` of the tokens: `jwt.audience`, else `spec.upstream`.
pub fn audience<'a>(spec: &'a McpCredentialSpec, j: &'a JwtSource) -> &'a str {
    j.audience.as_deref().unwrap_or(&spec.upstream)
}

/// What a cluster administrator allows minted tokens, per namespace: the operator's
/// `--jwt-policy-file` (the Helm values `jwt.audiencePolicy` and `jwt.unprefixedSubjects`). It lives
/// outside every namespace's reach, so no McpCredential can widen it.
///
/// ```yaml
/// audiences:                 # absent: any audience (the default)
///   team-a: [https://inventory.team-a.svc/mcp, https://search.example.com/*]
///   "*": [https://shared.example.com/mcp]   # namespaces without an entry of their own
/// unprefixedSubjects:        # sub without the mcpcred:<namespace>: prefix (migration)
///   legacy: ["system:serviceaccount:legacy:*"]
/// ```
///
/// A pattern is exact, `*` (anything), or ends in `/*` or `:*` (anything after that prefix, so
/// `https://a.example.com/*` cannot match `https://a.example.com.evil.net`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MintPolicy {
    /// Namespace (or `*`: every namespace without an entry) -> the audiences its tokens may have.
    /// `None`: any audience. A namespace with no entry (and no `*`) may mint for none.
    #[serde(default)]
    pub audiences: Option<BTreeMap<String, Vec<String>>>,
    /// Namespace -> the subjects it may mint as `sub` verbatim, without the `mcpcred:<namespace>:`
    /// prefix: a migration path for upstreams that still match the old `sub`. Every namespace is
    /// named (no `*`); the namespace claim is set either way.
    #[serde(default)]
    pub unprefixed_subjects: BTreeMap<String, Vec<String>>,
}

impl MintPolicy {
    /// Parses and checks a policy (YAML or JSON). The error names the key to fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let policy: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| e.to_string())?
        };
        let check = |map: &BTreeMap<String, Vec<String>>, key: &str, star_namespace: bool| {
            for (ns, patterns) in map {
                if !(is_namespace(ns) || (star_namespace && ns == "*")) {
                    return Err(format!(
                        "{key}: {ns:?} is not a namespace name{}",
                        if star_namespace {
                            r#" or "*""#
                        } else {
                            r#" (a "*" entry is not allowed here)"#
                        }
                    ));
                }
                if let Some(p) = patterns.iter().find(|p| !is_pattern(p)) {
                    return Err(format!(
                        r#"{key}.{ns}: {p:?} is not a valid pattern: write it exactly, as "*", or ending in "/*" or ":*""#
                    ));
                }
            }
            Ok(())
        };
        if let Some(a) = &policy.audiences {
            check(a, "audiences", true)?;
        }
        check(&policy.unprefixed_subjects, "unprefixedSubjects", false)?;
        Ok(policy)
    }

    /// The audiences `namespace` may mint for: `None` when any is allowed.
    pub fn allowed_audiences(&self, namespace: &str) -> Option<&[String]> {
        let map = self.audiences.as_ref()?;
        Some(
            map.get(namespace)
                .or_else(|| map.get("*"))
                .map_or(&[][..], Vec::as_slice),
        )
    }

    /// Whether a token minted in `namespace` may have the audience `audience`.
    pub fn allows_audience(&self, namespace: &str, audience: &str) -> bool {
        self.allowed_audiences(namespace)
            .is_none_or(|list| list.iter().any(|p| matches(p, audience)))
    }

    /// Whether `namespace` may mint `subject` as `sub` without the `mcpcred:<namespace>:` prefix.
    pub fn allows_unprefixed_subject(&self, namespace: &str, subject: &str) -> bool {
        self.unprefixed_subjects
            .get(namespace)
            .is_some_and(|list| list.iter().any(|p| matches(p, subject)))
    }
}

/// An RFC 1123 label, as namespace names are.
fn is_namespace(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_pattern(p: &str) -> bool {
    match p.find('*') {
        None => !p.is_empty(),
        Some(i) => p == "*" || (i == p.len() - 1 && (p.ends_with("/*") || p.ends_with(":*"))),
    }
}

fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// Mints one token for `j` with the current key for its algorithm, bound to `binding` (the
/// McpCredential; `None` in standalone mode) and held to the administrator's `policy`. No network.
pub async fn obtain(
    spec: &McpCredentialSpec,
    j: &JwtSource,
    binding: Option<Binding<'_>>,
    policy: Option<&MintPolicy>,
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
    let binding = binding.map(|b| Binding {
        unprefixed_subject: policy.is_some_and(|p| p.allows_unprefixed_subject(b.namespace, &j.subject)),
        ..b
    });
    if let (Some(b), Some(p)) = (&binding, policy) {
        let aud = audience(spec, j);
        if !p.allows_audience(b.namespace, aud) {
            return Err(SourceError::AudienceNotAllowed {
                namespace: b.namespace.to_owned(),
                audience: aud.to_owned(),
                allowed: p.allowed_audiences(b.namespace).unwrap_or_default().to_vec(),
            });
        }
    }
    let key = secrets.signing_key(j.algorithm).await?;
    let now = timing::truncate(SystemTime::now());
    let claims = claims(spec, j, binding.as_ref(), &key.issuer, now, ttl);
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
        let issued = obtain(&spec, spec.source.jwt.as_ref().unwrap(), None, None, &resolver)
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
        let e = obtain(
            &spec,
            spec.source.jwt.as_ref().unwrap(),
            None,
            None,
            &MapResolver::default(),
        )
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

    fn bound<'a>(namespace: &'a str) -> Binding<'a> {
        Binding {
            namespace,
            credential: "inventory",
            unprefixed_subject: false,
        }
    }

    fn key_resolver() -> (MapResolver, Jwk) {
        let (pem, kid) = generate_key(JwtAlgorithm::ES256).unwrap();
        let jwk = public_jwk(JwtAlgorithm::ES256, &pem, Some(&kid)).unwrap();
        let resolver = MapResolver::default().with_signing_key(SigningKey {
            kid,
            algorithm: JwtAlgorithm::ES256,
            private_key_pem: pem,
            issuer: "https://issuer.example".into(),
        });
        (resolver, jwk)
    }

    /// A spec in which namespace `a` tries to pass as namespace `b`'s admin.
    fn impersonating(audience: &str) -> McpCredentialSpec {
        let mut spec = spec(JwtAlgorithm::ES256);
        let j = spec.source.jwt.as_mut().unwrap();
        j.subject = "system:serviceaccount:b:admin".into();
        j.audience = Some(audience.into());
        j.claims = [
            (NAMESPACE_CLAIM.to_owned(), "b".to_owned()),
            (CREDENTIAL_CLAIM.to_owned(), "theirs".to_owned()),
            ("mcpcredentials.dev".to_owned(), "b".to_owned()),
            ("tenant".to_owned(), "b".to_owned()),
        ]
        .into_iter()
        .collect();
        spec
    }

    fn decoded(token: &str, jwk: &Jwk, aud: &str) -> Value {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[aud]);
        v.set_issuer(&["https://issuer.example"]);
        decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
            .unwrap()
            .claims
    }

    #[tokio::test]
    async fn a_token_minted_in_a_namespace_names_it_and_prefixes_sub_whatever_the_spec_says() {
        let (resolver, jwk) = key_resolver();
        let spec = impersonating("https://b.example.com/mcp");
        let j = spec.source.jwt.as_ref().unwrap();
        let issued = obtain(&spec, j, Some(bound("a")), None, &resolver).await.unwrap();
        let claims = decoded(issued.token.expose(), &jwk, "https://b.example.com/mcp");
        assert_eq!(claims["sub"], "mcpcred:a:system:serviceaccount:b:admin");
        assert_eq!(
            claims[NAMESPACE_CLAIM], "a",
            "jwt.claims cannot override the namespace"
        );
        assert_eq!(claims[CREDENTIAL_CLAIM], "inventory");
        assert!(claims.get("mcpcredentials.dev").is_none(), "{claims}");
        assert_eq!(claims["tenant"], "b", "custom claims pass, and are not identity");
    }

    #[test]
    fn no_namespace_can_produce_a_subject_with_another_namespaces_prefix() {
        let namespaces = ["a", "b", "a-b", "team", "team-a", "default"];
        let subjects = ["x", "b:x", ":b:x", "mcpcred:b:x", "a-b:x", "-a:x", ""];
        for mine in namespaces {
            for other in namespaces.iter().filter(|o| **o != mine) {
                for s in subjects {
                    let sub = bound_subject(mine, s);
                    assert!(
                        !sub.starts_with(&format!("{SUBJECT_PREFIX}{other}:")),
                        "{mine} made {sub:?}, which reads as {other}'s"
                    );
                }
            }
        }
    }

    #[test]
    fn the_registered_and_the_operators_claims_are_reserved() {
        for k in [
            "iss",
            "sub",
            "aud",
            "exp",
            "jti",
            NAMESPACE_CLAIM,
            CREDENTIAL_CLAIM,
            "mcpcredentials.dev",
            "mcpcredentials.dev/anything",
        ] {
            assert!(is_reserved_claim(k), "{k}");
        }
        for k in ["tenant", "namespace", "scope", "kubernetes.io"] {
            assert!(!is_reserved_claim(k), "{k}");
        }
    }

    fn policy(yaml: &str) -> MintPolicy {
        MintPolicy::parse(yaml).unwrap()
    }

    #[tokio::test]
    async fn an_audience_the_policy_does_not_allow_is_refused_before_any_key_is_used() {
        let p = policy(
            "audiences:\n  a: [https://a.example.com/mcp, \"https://shared.example.com/*\"]\n  b: [https://b.example.com/mcp]\n",
        );
        let spec = impersonating("https://b.example.com/mcp");
        let j = spec.source.jwt.as_ref().unwrap();
        // No signing key: had the policy been checked after the key was fetched, this would be NoSigningKey.
        let e = obtain(&spec, j, Some(bound("a")), Some(&p), &MapResolver::default())
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "AudienceNotAllowed");
        assert_eq!(e.category(), "config_error");
        let message = e.to_string();
        for part in [
            "\"https://b.example.com/mcp\"",
            "namespace \"a\"",
            "https://a.example.com/mcp, https://shared.example.com/*",
            "audiences.a",
            "--jwt-policy-file",
            "jwt.audiencePolicy",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }

        let (resolver, jwk) = key_resolver();
        for allowed in ["https://a.example.com/mcp", "https://shared.example.com/x/mcp"] {
            let spec = impersonating(allowed);
            let j = spec.source.jwt.as_ref().unwrap();
            let issued = obtain(&spec, j, Some(bound("a")), Some(&p), &resolver)
                .await
                .unwrap();
            assert_eq!(
                decoded(issued.token.expose(), &jwk, allowed)[NAMESPACE_CLAIM],
                "a"
            );
        }
        assert!(
            !p.allows_audience("c", "https://a.example.com/mcp"),
            "a namespace without an entry gets none"
        );
        assert!(!p.allows_audience("a", "https://shared.example.com.evil.net/mcp"));
        assert!(!p.allows_audience("a", "https://shared.example.com"));
    }

    #[test]
    fn without_audiences_any_is_allowed_and_a_star_entry_covers_unlisted_namespaces() {
        assert!(policy("").allows_audience("a", "https://anything.example/mcp"));
        assert!(policy("unprefixedSubjects: {}").allows_audience("a", "https://anything.example/mcp"));
        let p = policy(r#"{"audiences": {"*": ["https://shared.example.com/mcp"], "a": ["*"]}}"#);
        assert!(p.allows_audience("a", "https://anything.example/mcp"));
        assert!(p.allows_audience("c", "https://shared.example.com/mcp"));
        assert!(!p.allows_audience("c", "https://a.example.com/mcp"));
        let none = policy("audiences: {}");
        assert!(
            !none.allows_audience("a", "https://a.example.com/mcp"),
            "an empty map allows nothing"
        );
        assert_eq!(none.allowed_audiences("a"), Some(&[][..]));
    }

    #[tokio::test]
    async fn only_a_subject_the_policy_lists_for_the_namespace_is_minted_unprefixed() {
        let p = policy("unprefixedSubjects:\n  a: [\"system:serviceaccount:b:*\", research]\n");
        let (resolver, jwk) = key_resolver();
        let sub = |spec: McpCredentialSpec, ns: &'static str| {
            let (resolver, jwk, p) = (&resolver, &jwk, &p);
            async move {
                let j = spec.source.jwt.as_ref().unwrap();
                let issued = obtain(&spec, j, Some(bound(ns)), Some(p), resolver)
                    .await
                    .unwrap();
                let claims = decoded(issued.token.expose(), jwk, "https://b.example.com/mcp");
                assert_eq!(
                    claims[NAMESPACE_CLAIM], ns,
                    "the namespace claim is set either way"
                );
                claims["sub"].as_str().unwrap().to_owned()
            }
        };
        assert_eq!(
            sub(impersonating("https://b.example.com/mcp"), "a").await,
            "system:serviceaccount:b:admin"
        );
        assert_eq!(
            sub(impersonating("https://b.example.com/mcp"), "c").await,
            "mcpcred:c:system:serviceaccount:b:admin",
            "another namespace is still prefixed"
        );
        let mut other = impersonating("https://b.example.com/mcp");
        other.source.jwt.as_mut().unwrap().subject = "researcher".into();
        assert_eq!(
            sub(other, "a").await,
            "mcpcred:a:researcher",
            "exact, not a prefix"
        );
    }

    #[test]
    fn a_bad_policy_is_refused_with_the_key_to_fix() {
        for (yaml, wanted) in [
            (
                "audiences: {Team_A: [x]}",
                "audiences: \"Team_A\" is not a namespace name",
            ),
            (
                "audiences: {a: [\"https://a.example.com*\"]}",
                "audiences.a: \"https://a.example.com*\"",
            ),
            (
                "audiences: {a: [\"https://*.example.com/mcp\"]}",
                "not a valid pattern",
            ),
            ("audiences: {a: [\"\"]}", "not a valid pattern"),
            (
                "unprefixedSubjects: {\"*\": [\"*\"]}",
                "a \"*\" entry is not allowed here",
            ),
            ("audience: {a: [x]}", "unknown field `audience`"),
        ] {
            let e = MintPolicy::parse(yaml).unwrap_err();
            assert!(e.contains(wanted), "{yaml}: {e}");
        }
    }
}

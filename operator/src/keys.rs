//! The signing keys of minted JWTs, kept in one Secret of the operator's namespace: every replica
//! reads it (to sign and to serve the JWKS), only the leader creates and rotates it.
//!
//! The Secret holds the ring as JSON under `keys.json` ([`KeyRing`]); writes carry the
//! resourceVersion read, so two leaders (during a takeover) cannot both write.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, api::PostParams};
use mcp_credentials_core::{
    JwtAlgorithm,
    keyring::{ALGORITHMS, KeyRing, Policy},
    secret::{MANAGED_BY, MANAGED_BY_LABEL},
    source::{ResolveError, jwt},
};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// The data key of the ring in the Secret.
pub const RING_KEY: &str = "keys.json";
/// How often every replica re-reads the Secret (the leader also rotates then). Successors are
/// published 10 minutes before they sign, far longer than this plus the JWKS cache time.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// The keys as this process last read them, and the issuer of the tokens they sign.
pub struct Keys {
    ring: RwLock<KeyRing>,
    /// The `iss` of minted tokens; the JWKS is at `{issuer}/.well-known/jwks.json`.
    pub issuer: String,
    secret: String,
    namespace: String,
}

impl Keys {
    /// Keys read from the Secret `secret` of `namespace` (empty until [`Keys::reload`]).
    pub fn new(issuer: &str, secret: &str, namespace: &str) -> Self {
        Self {
            ring: RwLock::default(),
            issuer: issuer.trim_end_matches('/').to_owned(),
            secret: secret.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    /// The key that signs for `alg` now.
    pub fn signing_key(&self, alg: JwtAlgorithm) -> Result<jwt::SigningKey, ResolveError> {
        self.ring
            .read()
            .unwrap()
            .signing_key(alg, SystemTime::now(), &self.issuer)
            .ok_or_else(|| ResolveError::Unavailable {
                name: format!("{}/{}", self.namespace, self.secret),
                reason: format!("it holds no {alg:?} signing key yet (the leader creates it)"),
            })
    }

    /// The JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        self.ring.read().unwrap().jwks()
    }

    /// The OpenID Provider metadata that points validators to the JWKS.
    pub fn discovery(&self) -> serde_json::Value {
        serde_json::json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/.well-known/jwks.json", self.issuer),
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        })
    }

    pub(crate) fn set(&self, ring: KeyRing, metrics: &Metrics) {
        for alg in ALGORITHMS {
            let n = ring.keys.iter().filter(|k| k.algorithm == alg).count();
            metrics
                .jwt_keys
                .with_label_values(&[&format!("{alg:?}")])
                .set(i64::try_from(n).unwrap_or(0));
        }
        *self.ring.write().unwrap() = ring;
    }

    /// Reads the Secret; when `rotate` (the leader), creates or rotates the ring and writes it back.
    pub async fn reload(
        &self,
        api: &Api<Secret>,
        policy: &Policy,
        rotate: bool,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let existing = api
            .get_opt(&self.secret)
            .await
            .map_err(|e| format!("reading Secret {}/{}: {e}", self.namespace, self.secret))?;
        let mut ring = match existing
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(RING_KEY))
        {
            Some(bytes) => KeyRing::from_json(&bytes.0)
                .map_err(|e| format!("Secret {}/{} key {RING_KEY}: {e}", self.namespace, self.secret))?,
            None => KeyRing::default(),
        };
        if rotate {
            // RSA key generation takes a moment: keep it off the async workers.
            let now = SystemTime::now();
            let policy = *policy;
            let (changed, rotated) = tokio::task::spawn_blocking(move || {
                let changed = ring.rotate(now, &policy, jwt::generate_key);
                (changed, ring)
            })
            .await
            .map_err(|e| format!("generating keys: {e}"))?;
            ring = rotated;
            if changed.map_err(|e| e.0)? {
                self.write(api, existing, &ring).await?;
                let kids: Vec<&str> = ring.keys.iter().map(|k| k.kid.as_str()).collect();
                info!(secret = %self.secret, keys = ?kids, "rotated the JWT signing keys");
            }
        }
        self.set(ring, metrics);
        Ok(())
    }

    async fn write(&self, api: &Api<Secret>, existing: Option<Secret>, ring: &KeyRing) -> Result<(), String> {
        let data = BTreeMap::from([(RING_KEY.to_owned(), ByteString(ring.to_json().into_bytes()))]);
        let result = match existing {
            Some(mut s) => {
                s.data = Some(data);
                api.replace(&self.secret, &PostParams::default(), &s).await
            }
            None => {
                let s = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.secret.clone()),
                        labels: Some(BTreeMap::from([(
                            MANAGED_BY_LABEL.to_owned(),
                            MANAGED_BY.to_owned(),
                        )])),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &s).await
            }
        };
        result
            .map(|_| ())
            .map_err(|e| format!("writing Secret {}/{}: {e}", self.namespace, self.secret))
    }
}

/// Re-reads the keys every [`RELOAD_EVERY`] on every replica; rotates them while `leader` is set.
pub async fn run(
    keys: Arc<Keys>,
    api: Api<Secret>,
    policy: Policy,
    leader: Arc<AtomicBool>,
    metrics: Metrics,
) {
    loop {
        if let Err(e) = keys
            .reload(&api, &policy, leader.load(Ordering::Relaxed), &metrics)
            .await
        {
            warn!(error = %e, "keeping the JWT signing keys current failed");
        }
        tokio::time::sleep(RELOAD_EVERY).await;
    }
}

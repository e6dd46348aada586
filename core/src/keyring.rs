//! The signing keys of minted JWTs and their rotation with overlap, as pure functions of time.
//!
//! Each algorithm has one active key at a time. A successor is generated `prepublish` before it
//! becomes active, so every JWKS reader (and every cache) knows it before the first token it
//! signs. A key stops signing when its successor becomes active (it is then *retired*), and stays
//! published for `overlap` more (at least the longest token lifetime, 24h, plus a margin), so
//! every token it signed expires before its key leaves the JWKS.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    JwtAlgorithm, SecretString,
    source::jwt::{SignError, SigningKey, public_jwk},
    timing::unix_seconds,
};

/// The longest lifetime of a minted token (`jwt.ttl` is at most 24h).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Every algorithm a ring keeps a key for.
pub const ALGORITHMS: [JwtAlgorithm; 2] = [JwtAlgorithm::ES256, JwtAlgorithm::RS256];

/// When keys rotate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a key signs before its successor takes over.
    pub period: Duration,
    /// How long a successor is published before it signs.
    pub prepublish: Duration,
    /// How long a retired key stays published: at least [`MAX_TOKEN_TTL`].
    pub overlap: Duration,
}

impl Policy {
    /// Rotation every `period`, successors published 10 minutes ahead (at most a tenth of the
    /// period), retired keys published 24h + 1h more.
    pub fn every(period: Duration) -> Self {
        Self {
            period,
            prepublish: (period / 10).min(Duration::from_secs(600)),
            overlap: MAX_TOKEN_TTL + Duration::from_secs(3600),
        }
    }
}

/// One key of the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RingKey {
    /// Its key ID (the RFC 7638 thumbprint).
    pub kid: String,
    /// Its algorithm.
    pub algorithm: JwtAlgorithm,
    /// When it starts signing (Unix seconds).
    pub active_from: u64,
    /// The PKCS#8 PEM private key.
    #[serde(with = "secret_pem")]
    pub private_key: SecretString,
}

mod secret_pem {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::SecretString;

    pub fn serialize<S: Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        String::deserialize(d).map(SecretString::new)
    }
}

/// The keys: the active one, its successor and the retired ones still published, per algorithm.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    /// Every key, oldest first.
    pub keys: Vec<RingKey>,
}

impl KeyRing {
    /// Reads a ring stored with [`KeyRing::to_json`]. The error names no key material.
    pub fn from_json(text: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(text)
            .map_err(|e| format!("the key ring is not valid JSON (line {})", e.line()))
    }

    /// The ring as JSON (private keys included: store it in a Secret).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn of(&self, alg: JwtAlgorithm) -> impl Iterator<Item = &RingKey> {
        self.keys.iter().filter(move |k| k.algorithm == alg)
    }

    /// The key that signs for `alg` at `now`: the newest whose `active_from` has come.
    pub fn active(&self, alg: JwtAlgorithm, now: SystemTime) -> Option<&RingKey> {
        let now = unix_seconds(now);
        self.of(alg)
            .filter(|k| k.active_from <= now)
            .max_by_key(|k| k.active_from)
    }

    /// When `key` stopped signing (its successor's `active_from`), if it has a successor.
    pub fn retired_at(&self, key: &RingKey) -> Option<u64> {
        self.of(key.algorithm)
            .map(|k| k.active_from)
            .filter(|t| *t > key.active_from)
            .min()
    }

    /// The signing key for `alg` at `now`, with the issuer its tokens carry.
    pub fn signing_key(&self, alg: JwtAlgorithm, now: SystemTime, issuer: &str) -> Option<SigningKey> {
        self.active(alg, now).map(|k| SigningKey {
            kid: k.kid.clone(),
            algorithm: k.algorithm,
            private_key_pem: k.private_key.clone(),
            issuer: issuer.to_owned(),
        })
    }

    /// Brings the ring up to date at `now`: a first key for each algorithm, a successor
    /// `prepublish` before the active key's period ends, and no key retired longer than `overlap`
    /// ago. `generate` makes a key (PEM, kid). True when the ring changed.
    pub fn rotate(
        &mut self,
        now: SystemTime,
        policy: &Policy,
        mut generate: impl FnMut(JwtAlgorithm) -> Result<(SecretString, String), SignError>,
    ) -> Result<bool, SignError> {
        let now_s = unix_seconds(now);
        let (period, prepublish) = (policy.period.as_secs(), policy.prepublish.as_secs());
        let before = self.keys.clone();
        for alg in ALGORITHMS {
            let newest = self.of(alg).map(|k| k.active_from).max();
            let active_from = match newest {
                None => Some(now_s),
                // Saturating: the times come from a Secret anyone with access could have edited.
                Some(t) if t.saturating_add(period) <= now_s.saturating_add(prepublish) => {
                    Some(t.saturating_add(period).max(now_s.saturating_add(prepublish)))
                }
                Some(_) => None,
            };
            if let Some(active_from) = active_from {
                let (private_key, kid) = generate(alg)?;
                self.keys.push(RingKey {
                    kid,
                    algorithm: alg,
                    active_from,
                    private_key,
                });
            }
        }
        let ring = self.clone();
        self.keys.retain(|k| {
            ring.retired_at(k)
                .is_none_or(|r| r > now_s || now_s < r.saturating_add(policy.overlap.as_secs()))
        });
        self.keys.sort_by_key(|k| k.active_from);
        Ok(self.keys != before)
    }

    /// The JWKS document (`{"keys": [...]}`): the public half of every key in the ring.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .filter_map(|k| public_jwk(k.algorithm, &k.private_key, Some(&k.kid)).ok())
            .filter_map(|j| serde_json::to_value(j).ok())
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    const DAY: u64 = 86_400;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    /// A generator of fake keys, numbered, so the tests are pure and fast.
    fn fake() -> impl FnMut(JwtAlgorithm) -> Result<(SecretString, String), SignError> {
        let mut n = 0;
        move |alg| {
            n += 1;
            Ok((SecretString::new("pem"), format!("{alg:?}-{n}")))
        }
    }

    fn kids(ring: &KeyRing, alg: JwtAlgorithm) -> Vec<String> {
        ring.of(alg).map(|k| k.kid.clone()).collect()
    }

    #[test]
    fn an_empty_ring_gets_one_active_key_per_algorithm_at_once() {
        let mut ring = KeyRing::default();
        let policy = Policy::every(Duration::from_secs(30 * DAY));
        assert!(ring.rotate(at(1_000), &policy, fake()).unwrap());
        assert_eq!(
            ring.active(JwtAlgorithm::ES256, at(1_000)).unwrap().kid,
            "ES256-1"
        );
        assert_eq!(
            ring.active(JwtAlgorithm::RS256, at(1_000)).unwrap().kid,
            "RS256-2"
        );
        assert!(
            !ring.rotate(at(2_000), &policy, fake()).unwrap(),
            "nothing to do the next time"
        );
    }

    #[test]
    fn a_successor_is_published_before_it_signs_and_the_old_key_outlives_its_last_token() {
        let policy = Policy::every(Duration::from_secs(30 * DAY));
        let mut generate = fake();
        let mut ring = KeyRing::default();
        let t0 = 1_000_000;
        ring.rotate(at(t0), &policy, &mut generate).unwrap();
        let first = ring.active(JwtAlgorithm::ES256, at(t0)).unwrap().kid.clone();

        // Ten minutes before the period ends, the successor is published but does not sign yet.
        let end = t0 + 30 * DAY;
        assert!(ring.rotate(at(end - 600), &policy, &mut generate).unwrap());
        assert_eq!(kids(&ring, JwtAlgorithm::ES256).len(), 2);
        assert_eq!(ring.active(JwtAlgorithm::ES256, at(end - 1)).unwrap().kid, first);
        let second = ring.active(JwtAlgorithm::ES256, at(end)).unwrap().kid.clone();
        assert_ne!(second, first);

        // The first key signed until `end`; its last token (24h) expires by end + 24h: it stays
        // published until end + 25h, then goes.
        ring.rotate(at(end + DAY + 3599), &policy, &mut generate).unwrap();
        assert!(kids(&ring, JwtAlgorithm::ES256).contains(&first));
        ring.rotate(at(end + DAY + 3600), &policy, &mut generate).unwrap();
        assert_eq!(kids(&ring, JwtAlgorithm::ES256), vec![second]);
    }

    #[test]
    fn after_a_long_outage_the_old_key_signs_until_its_successor_has_been_published() {
        let policy = Policy::every(Duration::from_secs(30 * DAY));
        let mut ring = KeyRing::default();
        ring.rotate(at(0), &policy, fake()).unwrap();
        let late = 100 * DAY;
        ring.rotate(at(late), &policy, fake()).unwrap();
        let es: Vec<&RingKey> = ring.of(JwtAlgorithm::ES256).collect();
        assert_eq!(es.len(), 2);
        assert_eq!(
            es[1].active_from,
            late + 600,
            "never active before it was published"
        );
        assert_eq!(ring.active(JwtAlgorithm::ES256, at(late)).unwrap().kid, es[0].kid);
        assert_eq!(ring.retired_at(es[0]), Some(late + 600));
    }

    #[test]
    fn the_ring_survives_its_json_and_its_jwks_has_only_public_keys() {
        let mut ring = KeyRing::default();
        ring.rotate(at(0), &Policy::every(Duration::from_secs(DAY)), |alg| {
            crate::source::jwt::generate_key(alg)
        })
        .unwrap();
        let back = KeyRing::from_json(ring.to_json().as_bytes()).unwrap();
        assert_eq!(back, ring);
        let jwks = ring.jwks();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        for k in keys {
            assert!(k.get("d").is_none(), "no private part: {k}");
            assert_eq!(k["use"], "sig");
        }
        assert!(KeyRing::from_json(b"{not json").unwrap_err().contains("JSON"));
    }
}

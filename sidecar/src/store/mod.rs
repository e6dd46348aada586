//! The credential store: the current credential of every configured upstream, fed by one source
//! (the Kubernetes API, a directory of files, or core's sources in standalone mode) and read by the
//! proxy on every request.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use jiff::Timestamp;
use mcp_credentials_core::report::Rejection;
use tokio::sync::{broadcast, watch};

use crate::credential::Credential;

pub mod dirwatch;
pub mod files;
pub mod kubernetes;
pub mod standalone;

/// What the store knows about one credential.
#[derive(Clone, Debug, Default)]
pub struct Slot {
    /// The credential to attach, if one was ever loaded.
    pub current: Option<Arc<Credential>>,
    /// Why the last load failed (never contains credential material).
    pub last_failure: Option<Arc<str>>,
    /// The credential needs a person to sign in: the command to run (standalone mode).
    pub sign_in: Option<Arc<str>>,
    /// The sign-in is for more consent (a step-up, SEP-2350): the credential still serves what it
    /// was granted.
    pub more_consent: bool,
}

/// An upstream rejected a credential: the source should renew it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshRequest {
    /// The credential's name.
    pub name: String,
    /// Why the upstream rejected it (any 401/403 other than a curable Bearer error is asked only of
    /// a credential whose source [`Store::rereads`]).
    pub reason: Rejection,
    /// The version that was rejected (so a renewal that already happened is not asked for again).
    pub version: String,
    /// The scopes a 403 `insufficient_scope` challenge asked for (a step-up's, SEP-2350).
    pub scope: Option<String>,
}

/// Credentials by name. Cheap to read; writers are the one store task.
#[derive(Debug)]
pub struct Store {
    slots: RwLock<BTreeMap<String, Slot>>,
    /// Names that must be present and unexpired for `/readyz`.
    required: Vec<String>,
    /// Bumped on every change, so waiters (tests, replay) can wait for a new version.
    generation: watch::Sender<u64>,
    /// Names whose credential an upstream rejected: the source should renew them now.
    refresh: broadcast::Sender<RefreshRequest>,
    /// Every credential's source re-reads its files when asked (the files store).
    reread_all: AtomicBool,
    /// Credentials whose source re-reads a file when asked (standalone API keys).
    reread: RwLock<BTreeSet<String>>,
}

impl Store {
    /// A store that expects the `required` credentials (they are listed even before they load).
    pub fn new(required: impl IntoIterator<Item = String>) -> Arc<Self> {
        let required: Vec<String> = required.into_iter().collect();
        let slots = required.iter().map(|n| (n.clone(), Slot::default())).collect();
        Arc::new(Store {
            slots: RwLock::new(slots),
            required,
            generation: watch::channel(0).0,
            // A few pending requests are plenty: one is enough to trigger a renewal.
            refresh: broadcast::channel(16).0,
            reread_all: AtomicBool::new(false),
            reread: RwLock::new(BTreeSet::new()),
        })
    }

    /// The slot of `name`, `None` when it is not a configured credential.
    pub fn get(&self, name: &str) -> Option<Slot> {
        self.slots.read().expect("store lock").get(name).cloned()
    }

    /// Every configured credential name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.slots.read().expect("store lock").keys().cloned().collect()
    }

    /// A snapshot of every slot (for metrics).
    pub fn snapshot(&self) -> Vec<(String, Slot)> {
        self.slots
            .read()
            .expect("store lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Publishes a credential. A reload of the same version keeps the loaded one (and its age).
    pub fn set(&self, name: &str, credential: Credential) {
        {
            let mut slots = self.slots.write().expect("store lock");
            let slot = slots.entry(name.to_owned()).or_default();
            if let Some(old) = &slot.current
                && old.version == credential.version
                && old.headers == credential.headers
                && old.upstream == credential.upstream
                && old.expires_at == credential.expires_at
            {
                slot.last_failure = None;
                slot.sign_in = None;
                slot.more_consent = false;
                return;
            }
            tracing::info!(
                credential = %name,
                version = %credential.version,
                expires_at = ?credential.expires_at.map(|t| t.to_string()),
                "credential loaded"
            );
            slot.current = Some(Arc::new(credential));
            slot.last_failure = None;
            slot.sign_in = None;
            slot.more_consent = false;
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Records why loading `name` failed; the last good credential stays until it expires.
    pub fn fail(&self, name: &str, why: impl Into<String>) {
        let why: String = why.into();
        tracing::warn!(credential = %name, reason = %why, "credential not loaded");
        self.slots
            .write()
            .expect("store lock")
            .entry(name.to_owned())
            .or_default()
            .last_failure = Some(why.into());
        self.generation.send_modify(|g| *g += 1);
    }

    /// Records that `name` waits for a person to sign in (`why` names `command`, the command to run).
    pub fn needs_sign_in(&self, name: &str, why: impl Into<String>, command: Option<String>) {
        self.fail(name, why);
        if let Some(slot) = self.slots.write().expect("store lock").get_mut(name) {
            slot.sign_in = Some(command.unwrap_or_default().into());
        }
    }

    /// Records that `name` needs a person to consent to more scopes (a step-up): `why` names
    /// `command`, the command to run. The credential keeps being served meanwhile. Saying it again
    /// changes nothing.
    pub fn needs_more_consent(&self, name: &str, why: impl Into<String>, command: String) {
        let why: String = why.into();
        {
            let mut slots = self.slots.write().expect("store lock");
            let slot = slots.entry(name.to_owned()).or_default();
            if slot.more_consent && slot.last_failure.as_deref() == Some(why.as_str()) {
                return;
            }
            tracing::warn!(credential = %name, reason = %why, "the credential needs more consent (still served)");
            slot.last_failure = Some(why.into());
            slot.sign_in = Some(command.into());
            slot.more_consent = true;
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Records that no more sign-ins for more consent are asked for `name` (`why` says so and what
    /// to check): the credential keeps being served, with no command to run.
    pub fn more_consent_refused(&self, name: &str, why: impl Into<String>) {
        self.fail(name, why);
        if let Some(slot) = self.slots.write().expect("store lock").get_mut(name) {
            slot.sign_in = None;
            slot.more_consent = false;
        }
    }

    /// Forgets the credential of `name` (its Secret or directory was deleted). A required name
    /// stays listed, with no credential.
    pub fn remove(&self, name: &str, why: &str) {
        let mut slots = self.slots.write().expect("store lock");
        if self.required.iter().any(|r| r == name) {
            slots.insert(
                name.to_owned(),
                Slot {
                    current: None,
                    last_failure: Some(why.into()),
                    sign_in: None,
                    more_consent: false,
                },
            );
        } else {
            slots.remove(name);
        }
        drop(slots);
        tracing::warn!(credential = %name, reason = %why, "credential removed");
        self.generation.send_modify(|g| *g += 1);
    }

    /// Ok when every required credential is present and unexpired; otherwise the names that are not.
    pub fn ready(&self, now: Timestamp) -> Result<(), Vec<String>> {
        let slots = self.slots.read().expect("store lock");
        let names: Vec<&String> = if self.required.is_empty() {
            slots.keys().collect()
        } else {
            self.required.iter().collect()
        };
        let missing: Vec<String> = names
            .into_iter()
            .filter(|n| {
                slots
                    .get(*n)
                    .and_then(|s| s.current.as_ref())
                    .is_none_or(|c| c.is_expired(now))
            })
            .cloned()
            .collect();
        if missing.is_empty() && !slots.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }

    /// The source of `name` is gone (its Secret was deleted, or was missing when a watch listed again).
    /// A credential that expires keeps being served until then: it stays valid at the upstream
    /// whatever happens to the Secret, and the operator writes a new Secret within seconds, so dropping
    /// it would only cut agents off. A credential that never expires (an API key) is forgotten at once,
    /// because deleting its Secret is how one revokes it.
    pub fn source_deleted(&self, name: &str, why: &str) {
        let expiring = self
            .get(name)
            .and_then(|slot| slot.current)
            .is_some_and(|c| c.expires_at.is_some());
        if expiring {
            self.fail(
                name,
                format!("{why}; serving the last credential until it expires"),
            );
        } else {
            self.remove(name, why);
        }
    }

    /// Asks the credential source to renew a credential now (an upstream rejected it): standalone
    /// mode renews in-process, the Kubernetes store reports to the operator, the files store reads its directory again.
    pub fn request_refresh(&self, request: RefreshRequest) {
        let _ = self.refresh.send(request);
    }

    /// Says that the source of `name` (every credential, for `None`) re-reads its files on a
    /// [`Store::request_refresh`], so any upstream 401/403 is worth one: the upstream may have
    /// switched to a rotated key whose file has not been read yet.
    pub fn set_rereads(&self, name: Option<&str>) {
        match name {
            None => self.reread_all.store(true, Ordering::Relaxed),
            Some(name) => {
                self.reread.write().expect("store lock").insert(name.to_owned());
            }
        }
    }

    /// Whether the source of `name` re-reads its files when asked (asked only after a 401/403).
    pub fn rereads(&self, name: &str) -> bool {
        self.reread_all.load(Ordering::Relaxed) || self.reread.read().expect("store lock").contains(name)
    }

    /// The renewal requests, for the credential source.
    pub fn refresh_requests(&self) -> broadcast::Receiver<RefreshRequest> {
        self.refresh.subscribe()
    }

    /// A receiver that changes whenever a credential is loaded, fails or is removed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::fixtures::data;

    #[test]
    fn readiness_needs_every_required_credential_present_and_unexpired() {
        let store = Store::new(["a".to_owned(), "b".to_owned()]);
        assert_eq!(
            store.ready(Timestamp::now()),
            Err(vec!["a".to_owned(), "b".to_owned()])
        );
        store.set(
            "a",
            Credential::from_data(&data("https://a.example", "Authorization", "x")).unwrap(),
        );
        assert_eq!(store.ready(Timestamp::now()), Err(vec!["b".to_owned()]));
        let mut d = data("https://b.example", "X-Key", "y");
        d.insert("expires-at".into(), b"2000-01-01T00:00:00Z".to_vec());
        store.set("b", Credential::from_data(&d).unwrap());
        assert_eq!(store.ready(Timestamp::now()), Err(vec!["b".to_owned()]));
        d.insert("expires-at".into(), b"2999-01-01T00:00:00Z".to_vec());
        d.insert("version".into(), b"2".to_vec());
        store.set("b", Credential::from_data(&d).unwrap());
        assert_eq!(store.ready(Timestamp::now()), Ok(()));
    }

    #[test]
    fn a_deleted_source_keeps_an_expiring_credential_and_forgets_an_api_key() {
        let store = Store::new(["token".to_owned(), "key".to_owned()]);
        let mut d = data("https://a.example", "Authorization", "x");
        d.insert("expires-at".into(), b"2999-01-01T00:00:00Z".to_vec());
        store.set("token", Credential::from_data(&d).unwrap());
        store.set(
            "key",
            Credential::from_data(&data("https://b.example", "X-Key", "y")).unwrap(),
        );

        store.source_deleted("token", "its Secret was deleted");
        store.source_deleted("key", "its Secret was deleted");

        let token = store.get("token").unwrap();
        assert!(token.current.is_some(), "an unexpired token stays in use");
        assert!(token.last_failure.unwrap().contains("until it expires"));
        let key = store.get("key").unwrap();
        assert!(key.current.is_none(), "a deleted API key is revoked at once");
        assert_eq!(store.ready(Timestamp::now()), Err(vec!["key".to_owned()]));
    }

    #[test]
    fn reloading_the_same_version_does_not_count_as_a_change() {
        let store = Store::new([]);
        let rx = store.subscribe();
        let d = data("https://a.example", "Authorization", "x");
        store.set("a", Credential::from_data(&d).unwrap());
        store.set("a", Credential::from_data(&d).unwrap());
        assert_eq!(*rx.borrow(), 1);
    }

    #[test]
    fn a_credential_that_needs_more_consent_is_still_served_and_says_what_to_run() {
        let store = Store::new(["a".to_owned()]);
        let rx = store.subscribe();
        let mut d = data("https://a.example", "Authorization", "x");
        d.insert("expires-at".into(), b"2999-01-01T00:00:00Z".to_vec());
        store.set("a", Credential::from_data(&d).unwrap());
        store.needs_more_consent("a", "more consent needed: run login a", "login a".into());
        store.needs_more_consent("a", "more consent needed: run login a", "login a".into());
        assert_eq!(*rx.borrow(), 2, "saying it again is no change");
        assert_eq!(
            store.ready(Timestamp::now()),
            Ok(()),
            "what was granted is still served"
        );
        let lines = crate::admin::status_lines(&store, Timestamp::now());
        assert_eq!(lines[0].state, "needs more consent");
        assert_eq!(lines[0].sign_in.as_deref(), Some("login a"));
        // The sign-in for more scopes publishes a new version: nothing is pending any more.
        d.insert("version".into(), b"2".to_vec());
        store.set("a", Credential::from_data(&d).unwrap());
        let lines = crate::admin::status_lines(&store, Timestamp::now());
        assert_eq!((lines[0].state, lines[0].sign_in.as_deref()), ("ready", None));
    }
}

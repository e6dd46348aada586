//! Which Secrets the operator watches: only those it manages, by their metadata only.
//!
//! A change of a Secret matters to a credential when the credential writes it (a foreign or edited
//! output Secret) or reads it (a new API key, a replaced refresh token). The operator reads the
//! data of those few by name; the watches only say *which* Secret changed, so they ask the API
//! server for metadata (`PartialObjectMetadata`) and never receive any Secret's data.
//!
//! Watching one namespace (`--namespace`), that namespace's Secrets are watched. Watching every
//! namespace, two kinds of watch replace a watch of every Secret of the cluster:
//! - the Secrets the operator writes, selected by its label ([`MANAGED_BY_LABEL`]), in every
//!   namespace: one watch;
//! - the other Secrets of each namespace that holds at least one credential (where the Secrets
//!   the credentials reference are: a `secretKeyRef` names a Secret of the credential's own
//!   namespace), selected by the opposite label selector, so no Secret comes twice. Such a watch
//!   starts with the first reconcile of a credential of the namespace (its initial list wakes the
//!   credentials up again, so no change made meanwhile is missed) and stops once the namespace
//!   holds no credential.
//!
//! Users therefore label nothing, and a namespace without credentials, however many Secrets it
//! holds, costs the operator nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector::ObjectRef, watcher},
};
use mcp_credentials_core::{
    McpCredential,
    process::ErrorChain,
    secret::{MANAGED_BY, MANAGED_BY_LABEL},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Which credentials write or read each Secret, as each credential's last reconcile found: a
/// Secret watch's event finds the credentials it concerns at once, without looking at every
/// credential (20,000 Secrets listed beside 10,000 credentials would be 200 million looks).
/// A credential not reconciled yet is missing, which loses nothing: its first reconcile reads
/// its Secrets as they are then.
#[derive(Default)]
pub(super) struct SecretIndex {
    /// The Secrets each credential writes or reads, by the credential's namespace and name.
    secrets: HashMap<(String, String), Vec<String>>,
    /// The credentials (names) that write or read each Secret, by its namespace and name.
    credentials: HashMap<(String, String), HashSet<String>>,
    /// The resourceVersion of each Secret as this process last wrote it, by namespace and name:
    /// the watch's news of our own write wakes nobody.
    written: HashMap<(String, String), String>,
}

impl SecretIndex {
    /// The credential `ns/name` writes or reads the Secrets `secrets` of its namespace (and no
    /// others any more).
    pub(super) fn set(&mut self, ns: &str, name: &str, mut secrets: Vec<String>) {
        secrets.sort();
        secrets.dedup();
        let key = (ns.to_owned(), name.to_owned());
        if self.secrets.get(&key) == Some(&secrets) {
            return;
        }
        self.remove(&key);
        for secret in &secrets {
            self.credentials
                .entry((ns.to_owned(), secret.clone()))
                .or_default()
                .insert(name.to_owned());
        }
        self.secrets.insert(key, secrets);
    }

    fn remove(&mut self, key: &(String, String)) {
        let (ns, name) = key;
        for secret in self.secrets.remove(key).unwrap_or_default() {
            let by_secret = (ns.clone(), secret);
            if let Some(names) = self.credentials.get_mut(&by_secret) {
                names.remove(name);
                if names.is_empty() {
                    self.credentials.remove(&by_secret);
                }
            }
        }
    }

    /// This process wrote Secret `ns/secret`, which the API server gave `resource_version`.
    pub(super) fn wrote(&mut self, ns: &str, secret: &str, resource_version: Option<String>) {
        let key = (ns.to_owned(), secret.to_owned());
        match resource_version {
            Some(rv) if self.credentials.contains_key(&key) => {
                self.written.insert(key, rv);
            }
            _ => {
                self.written.remove(&key);
            }
        }
    }

    /// The credentials that write or read Secret `ns/secret`, now at `resource_version`: none
    /// when that is the version this process wrote (its own change).
    pub(super) fn affected(
        &self,
        ns: &str,
        secret: &str,
        resource_version: Option<&str>,
    ) -> Vec<ObjectRef<McpCredential>> {
        let key = (ns.to_owned(), secret.to_owned());
        if resource_version.is_some() && self.written.get(&key).map(String::as_str) == resource_version {
            return Vec::new();
        }
        self.credentials
            .get(&key)
            .map(|names| names.iter().map(|n| ObjectRef::new(n).within(ns)).collect())
            .unwrap_or_default()
    }

    /// Forgets the credentials not in `keep` (namespace, name): they were deleted.
    pub(super) fn retain(&mut self, keep: &HashSet<(String, String)>) {
        let gone: Vec<(String, String)> = self
            .secrets
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.remove(key);
        }
        let credentials = &self.credentials;
        self.written.retain(|k, _| credentials.contains_key(k));
    }
}

/// Changed Secrets waiting for the controller, from every namespace watch together; a full buffer
/// holds the watches back (backpressure), it drops nothing.
const BUFFER: usize = 256;

/// The label selector of the Secrets the operator writes.
pub(super) fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// The label selector of every other Secret (those without the label, too).
fn unmanaged_selector() -> String {
    format!("{MANAGED_BY_LABEL}!={MANAGED_BY}")
}

/// The Secrets (metadata only) of the namespace `namespace` (`None`: every namespace) that match
/// `selector` (`None`: all of them), as they change: what
/// [`kube::runtime::Controller::watches_stream`] takes. (An `Api` of `PartialObjectMeta` asks
/// the API server for metadata only.)
pub(super) fn secret_changes(
    client: Client,
    namespace: Option<&str>,
    selector: Option<&str>,
) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + use<> {
    let api: Api<PartialObjectMeta<Secret>> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let config = match selector {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    };
    watcher(api, config).touched_objects()
}

/// The per-namespace Secret watches of an operator that watches every namespace (see the module
/// doc). Inert until [`NamespaceWatches::start`]: [`NamespaceWatches::ensure`] does nothing then,
/// as when the operator watches one namespace.
#[derive(Default)]
pub(super) struct NamespaceWatches {
    running: Mutex<Option<Running>>,
}

struct Running {
    client: Client,
    changes: mpsc::Sender<PartialObjectMeta<Secret>>,
    /// The watch task of each namespace.
    tasks: HashMap<String, tokio::task::JoinHandle<()>>,
}

impl NamespaceWatches {
    /// Starts serving namespace watches through `client`; returns the Secrets they see change.
    pub(super) fn start(
        &self,
        client: Client,
    ) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + use<> {
        let (changes, received) = mpsc::channel(BUFFER);
        self.stop();
        *self.running.lock().unwrap() = Some(Running {
            client,
            changes,
            tasks: HashMap::new(),
        });
        futures::stream::unfold(received, |mut received| async move {
            received.recv().await.map(|secret| (Ok(secret), received))
        })
    }

    /// Watches the Secrets of `namespace` unless that is done already (or the watches are not
    /// started).
    pub(super) fn ensure(&self, namespace: &str) {
        let mut running = self.running.lock().unwrap();
        let Some(running) = running.as_mut() else {
            return;
        };
        if running.tasks.get(namespace).is_some_and(|t| !t.is_finished()) {
            return;
        }
        debug!(namespace, "watching the namespace's Secrets (metadata only)");
        let api: Api<PartialObjectMeta<Secret>> = Api::namespaced(running.client.clone(), namespace);
        let selector = unmanaged_selector();
        let config = watcher::Config::default().labels(&selector);
        let changes = watcher(api, config).default_backoff().touched_objects();
        let sink = running.changes.clone();
        let ns = namespace.to_owned();
        let task = tokio::spawn(async move {
            let mut changes = std::pin::pin!(changes);
            loop {
                // The controller is gone (leading stopped): so is the watch, at once.
                let change = tokio::select! {
                    _ = sink.closed() => return,
                    change = changes.next() => change,
                };
                match change {
                    Some(Ok(secret)) => {
                        if sink.send(secret).await.is_err() {
                            return;
                        }
                    }
                    // The watch backs off and lists again by itself.
                    Some(Err(e)) => {
                        warn!(namespace = %ns, error = %ErrorChain(&e), "watching the namespace's Secrets failed; retrying")
                    }
                    None => return,
                }
            }
        });
        running.tasks.insert(namespace.to_owned(), task);
    }

    /// Stops the watches of the namespaces not in `keep` (they hold no credential any more).
    pub(super) fn retain(&self, keep: &HashSet<&str>) {
        if let Some(running) = self.running.lock().unwrap().as_mut() {
            running.tasks.retain(|ns, task| {
                let kept = keep.contains(ns.as_str());
                if !kept {
                    debug!(namespace = %ns, "the namespace holds no credential: no longer watching its Secrets");
                    task.abort();
                }
                kept
            });
        }
    }

    /// The namespaces watched now.
    #[cfg(test)]
    pub(super) fn watched(&self) -> Vec<String> {
        let running = self.running.lock().unwrap();
        let mut names: Vec<String> = running
            .as_ref()
            .map(|r| r.tasks.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Stops every watch.
    pub(super) fn stop(&self) {
        if let Some(running) = self.running.lock().unwrap().take() {
            for task in running.tasks.values() {
                task.abort();
            }
        }
    }
}

impl Drop for NamespaceWatches {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn names(refs: Vec<ObjectRef<McpCredential>>) -> Vec<String> {
        let mut names: Vec<String> = refs
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_secret_change_finds_the_credentials_that_write_or_read_it_as_last_reconciled() {
        let mut index = SecretIndex::default();
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        index.set("agents", "github", strings(&["github-mcp-credential", "keys"]));
        index.set(
            "agents",
            "slack",
            strings(&["slack-mcp-credential", "keys", "keys"]),
        );
        index.set("tools", "github", strings(&["github-mcp-credential", "keys"]));
        assert_eq!(
            names(index.affected("agents", "keys", None)),
            ["agents/github", "agents/slack"]
        );
        assert_eq!(names(index.affected("tools", "keys", None)), ["tools/github"]);
        assert!(index.affected("agents", "unrelated", None).is_empty());
        // A spec change: the credential reads another Secret from now on, and not the old one.
        index.set(
            "agents",
            "slack",
            strings(&["slack-mcp-credential", "slack-keys"]),
        );
        assert_eq!(names(index.affected("agents", "keys", None)), ["agents/github"]);
        assert_eq!(
            names(index.affected("agents", "slack-keys", None)),
            ["agents/slack"]
        );
        // Deleted credentials are forgotten, and with them the Secrets only they named.
        index.retain(&HashSet::from([("agents".to_owned(), "github".to_owned())]));
        assert!(index.affected("agents", "slack-keys", None).is_empty());
        assert!(index.affected("tools", "keys", None).is_empty());
        assert_eq!(names(index.affected("agents", "keys", None)), ["agents/github"]);
        assert_eq!(
            index.credentials.len(),
            2,
            "no empty entries left: {:?}",
            index.credentials
        );
    }

    #[test]
    fn the_news_of_our_own_write_wakes_nobody_but_a_later_change_by_another_writer_does() {
        let mut index = SecretIndex::default();
        index.set("agents", "github", vec!["github-mcp-credential".into()]);
        index.wrote("agents", "github-mcp-credential", Some("41".into()));
        assert!(
            index
                .affected("agents", "github-mcp-credential", Some("41"))
                .is_empty()
        );
        assert_eq!(
            names(index.affected("agents", "github-mcp-credential", Some("42"))),
            ["agents/github"]
        );
        assert_eq!(
            names(index.affected("agents", "github-mcp-credential", None)),
            ["agents/github"]
        );
        // A Secret nobody writes or reads is not remembered; a deleted credential's is forgotten.
        index.wrote("agents", "unrelated", Some("7".into()));
        index.retain(&HashSet::new());
        assert!(index.written.is_empty(), "{:?}", index.written);
    }

    #[tokio::test]
    async fn each_namespace_with_credentials_is_watched_once_for_its_unmanaged_secrets_by_metadata() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let watches = NamespaceWatches::default();
        watches.ensure("agents");
        assert!(watches.watched().is_empty(), "inert until started");

        let changes = watches.start(Client::new(mock, "default"));
        watches.ensure("agents");
        watches.ensure("tools");
        watches.ensure("agents");
        assert_eq!(watches.watched(), ["agents", "tools"]);
        let mut listed = Vec::new();
        for _ in 0..2 {
            let (req, _answer) = handle.next_request().await.expect("a list of Secrets");
            let accept = req.headers()[http::header::ACCEPT].to_str().unwrap().to_owned();
            listed.push((
                req.uri().path().to_owned(),
                req.uri().query().unwrap_or_default().to_owned(),
                accept,
            ));
        }
        listed.sort();
        for ((path, query, accept), ns) in listed.iter().zip(["agents", "tools"]) {
            assert_eq!(path, &format!("/api/v1/namespaces/{ns}/secrets"));
            assert!(
                query.contains("labelSelector=app.kubernetes.io%2Fmanaged-by%21%3Dmcp-credentials"),
                "{query}"
            );
            assert!(accept.contains("as=PartialObjectMetadataList"), "{accept}");
        }

        watches.retain(&HashSet::from(["tools"]));
        assert_eq!(watches.watched(), ["tools"]);
        // The controller drops the stream when leading stops: the watches end with it.
        drop(changes);
        let task = watches
            .running
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .tasks
            .remove("tools")
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the watch ends once nobody takes its changes")
            .unwrap();
        watches.stop();
        assert!(watches.watched().is_empty());
    }
}

//! The Kubernetes store: watches the credential Secrets and publishes each new version the moment the
//! watch event arrives. With named credentials, one watch per Secret with a `metadata.name` field
//! selector, which RBAC can grant by `resourceNames` (least privilege); without, one watch on the
//! managed-by label of the namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use futures_util::{StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use mcp_credentials_core::secret::{
    CREDENTIAL_LABEL, DEFAULT_SECRET_SUFFIX, MANAGED_BY, MANAGED_BY_LABEL, SECRET_TYPE,
};

use super::Store;
use crate::{config::Wanted, credential::Credential};

/// Watch events, tagged with the credential name when the watch is for one named Secret.
type Events = BoxStream<'static, (Option<String>, Result<watcher::Event<Secret>, watcher::Error>)>;

/// Keeps `store` in step with the Secrets until the task is dropped. Watch errors are retried with
/// kube's default backoff; the last good credential stays in use meanwhile.
pub async fn run(store: Arc<Store>, client: Client, namespace: String, wanted: Vec<Wanted>) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let secret_names: BTreeMap<String, String> = wanted
        .iter()
        .map(|w| (w.name.clone(), w.secret_name.clone()))
        .collect();
    let streams: Vec<Events> = if wanted.is_empty() {
        let config = watcher::Config::default()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
            .fields(&format!("type={SECRET_TYPE}"));
        vec![watcher(api, config).default_backoff().map(|e| (None, e)).boxed()]
    } else {
        wanted
            .into_iter()
            .map(|w| {
                let config = watcher::Config::default().fields(&format!("metadata.name={}", w.secret_name));
                let name = Some(w.name);
                watcher(api.clone(), config)
                    .default_backoff()
                    .map(move |e| (name.clone(), e))
                    .boxed()
            })
            .collect()
    };
    let mut events = futures_util::stream::select_all(streams);
    // The credentials seen since each watch began listing again (keyed by the watch: its credential
    // name, or None for the label watch). A watch that reconnects lists anew instead of replaying the
    // deletes it missed, so what a completed list lacks was deleted meanwhile.
    let mut listing: BTreeMap<Option<String>, BTreeSet<String>> = BTreeMap::new();
    while let Some((name, event)) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                listing.insert(name, BTreeSet::new());
            }
            Ok(watcher::Event::InitApply(secret)) => {
                let credential = name.clone().unwrap_or_else(|| credential_name(&secret));
                listing.entry(name).or_default().insert(credential.clone());
                apply(&store, &credential, &secret);
            }
            Ok(watcher::Event::Apply(secret)) => {
                let name = name.unwrap_or_else(|| credential_name(&secret));
                apply(&store, &name, &secret);
            }
            Ok(watcher::Event::Delete(secret)) => {
                let name = name.unwrap_or_else(|| credential_name(&secret));
                store.source_deleted(&name, "its Secret was deleted");
            }
            Ok(watcher::Event::InitDone) => {
                let seen = listing.remove(&name).unwrap_or_default();
                let in_scope: Vec<String> = match &name {
                    Some(name) => vec![name.clone()],
                    None => store.names(),
                };
                for credential in in_scope.into_iter().filter(|c| !seen.contains(c)) {
                    match store.get(&credential) {
                        // Never loaded: the Secret does not exist (yet); say which one and where.
                        Some(slot) if slot.current.is_none() => {
                            let secret = secret_names.get(&credential).map_or("?", String::as_str);
                            if name.is_some() {
                                store.fail(
                                    &credential,
                                    format!("Secret {secret} not found in namespace {namespace}"),
                                );
                            }
                        }
                        Some(_) => store.source_deleted(&credential, "its Secret is gone"),
                        None => {}
                    }
                }
            }
            Err(e) => match name {
                // The API server's message (forbidden, not found...) is what an operator needs to see.
                Some(name) => store.fail(&name, format!("watching its Secret failed: {e}")),
                None => tracing::warn!(error = %e, "watching credential Secrets failed; retrying"),
            },
        }
    }
}

/// The credential a Secret belongs to: its label, else its name without the default suffix.
fn credential_name(secret: &Secret) -> String {
    secret.labels().get(CREDENTIAL_LABEL).cloned().unwrap_or_else(|| {
        let name = secret.name_any();
        name.strip_suffix(DEFAULT_SECRET_SUFFIX)
            .map(String::from)
            .unwrap_or(name)
    })
}

/// Publishes the credential in `secret`, or records why it cannot be used.
pub fn apply(store: &Store, name: &str, secret: &Secret) {
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        store.fail(
            name,
            format!("Secret {} is not of type {SECRET_TYPE}", secret.name_any()),
        );
        return;
    }
    // The operator labels every Secret it writes with its credential. One labelled for another
    // credential (a `spec.secretName` pointing at another credential's Secret) is not this one's.
    if let Some(owner) = secret.labels().get(CREDENTIAL_LABEL).filter(|o| *o != name) {
        store.fail(
            name,
            format!(
                "Secret {} belongs to McpCredential {owner}, not to {name}",
                secret.name_any()
            ),
        );
        return;
    }
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    match Credential::from_data(&data) {
        Ok(credential) => store.set(name, credential),
        Err(e) => store.fail(name, format!("Secret {}: {e}", secret.name_any())),
    }
}

//! The access policy: for each McpCredential, a Role that may read exactly its Secret and a
//! RoleBinding to the service accounts in `spec.access.serviceAccounts` (nobody when the list is
//! empty, the whole namespace only with `allServiceAccounts: true`). A sidecar can then read its
//! own credentials and nothing else. The Role names the Secret only while the credential owns it
//! (controller ownerReference): otherwise `secretName: db-password` would hand any Secret of the
//! namespace to the listed service accounts. Its own controller, because it is a separate concern
//! from refreshing (and a change of the access list must not cost a token request).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{Controller, WatchStreamExt, controller::Action, predicates, watcher},
};
use mcp_credentials_core::{
    Allowed, McpCredential,
    secret::{CREDENTIAL_LABEL, MANAGED_BY, MANAGED_BY_LABEL, secret_name},
};
use tracing::{info, warn};

/// The field manager of every object this controller writes.
const FIELD_MANAGER: &str = "mcp-credentials-access";

/// Why the access objects of a credential could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Applying the Role failed.
    #[error("applying Role {name}")]
    ApplyRole {
        /// The Role.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Reading the credential's Secret (to see whether the credential owns it) failed.
    #[error("reading Secret {name}")]
    ReadSecret {
        /// The Secret.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Applying the RoleBinding failed.
    #[error("applying RoleBinding {name}")]
    ApplyRoleBinding {
        /// The RoleBinding.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The object has no namespace or UID (never true of one read from the API).
    #[error("McpCredential has no namespace or uid")]
    Incomplete,
}

/// The name of a credential's Role and RoleBinding.
pub fn object_name(credential: &str) -> String {
    let name = format!("mcp-credential-{credential}");
    name.chars().take(253).collect()
}

/// Whether `secret` is the credential's own: the operator created it, with a controller
/// ownerReference to this credential's UID (which a namespace user cannot forge for a Secret they
/// did not create through this credential, since the UID is assigned by the API server).
pub fn owns(cred: &McpCredential, secret: &ObjectMeta) -> bool {
    let uid = cred.metadata.uid.as_deref();
    uid.is_some()
        && secret
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid && o.kind == "McpCredential")
}

/// The Role that may read exactly the credential's Secret, when the credential owns it
/// (`secret_owned`), and nothing otherwise (no Secret yet, or `spec.secretName` names a Secret the
/// operator did not write for this credential). `list` and `watch` are granted too: with
/// `resourceNames` they allow only requests selecting that one name (`metadata.name=`), which is
/// how the sidecar watches.
pub fn role(cred: &McpCredential, secret_owned: bool) -> Result<Role, Error> {
    let name = cred.name_any();
    let rules = if secret_owned {
        vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![secret_name(&name, cred.spec.secret_name.as_deref())]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]
    } else {
        Vec::new()
    };
    Ok(Role {
        metadata: metadata(cred, &object_name(&name))?,
        rules: Some(rules),
    })
}

/// The RoleBinding of the Role to the allowed service accounts.
pub fn role_binding(cred: &McpCredential) -> Result<RoleBinding, Error> {
    let name = object_name(&cred.name_any());
    let namespace = cred.namespace().ok_or(Error::Incomplete)?;
    let subjects = match cred.spec.allowed() {
        Allowed::Nobody => Vec::new(),
        Allowed::Listed(names) => names
            .iter()
            .map(|sa| Subject {
                kind: "ServiceAccount".into(),
                api_group: None,
                name: sa.clone(),
                namespace: Some(namespace.clone()),
            })
            .collect(),
        Allowed::Namespace => vec![Subject {
            kind: "Group".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            name: format!("system:serviceaccounts:{namespace}"),
            namespace: None,
        }],
    };
    Ok(RoleBinding {
        metadata: metadata(cred, &name)?,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name,
        },
        subjects: Some(subjects),
    })
}

fn metadata(cred: &McpCredential, name: &str) -> Result<ObjectMeta, Error> {
    Ok(ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(cred.namespace().ok_or(Error::Incomplete)?),
        labels: Some(
            [
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (CREDENTIAL_LABEL.to_owned(), cred.name_any()),
            ]
            .into(),
        ),
        // Deleted with the credential by the garbage collector.
        owner_references: Some(vec![cred.controller_owner_ref(&()).ok_or(Error::Incomplete)?]),
        ..ObjectMeta::default()
    })
}

async fn reconcile(cred: Arc<McpCredential>, client: Arc<Client>) -> Result<Action, Error> {
    let namespace = cred.namespace().ok_or(Error::Incomplete)?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let secret = secret_name(&cred.name_any(), cred.spec.secret_name.as_deref());
    let owned = Api::<Secret>::namespaced((*client).clone(), &namespace)
        .get_metadata_opt(&secret)
        .await
        .map_err(|source| Error::ReadSecret {
            name: secret.clone(),
            source,
        })?
        .is_some_and(|s| owns(&cred, &s.metadata));
    if !owned {
        info!(credential = %cred.name_any(), secret = %secret, "the credential does not own its Secret (yet): its Role grants nothing");
    }
    let role = role(&cred, owned)?;
    let name = role.metadata.name.clone().unwrap_or_default();
    Api::<Role>::namespaced((*client).clone(), &namespace)
        .patch(&name, &params, &Patch::Apply(&role))
        .await
        .map_err(|source| Error::ApplyRole {
            name: name.clone(),
            source,
        })?;
    let binding = role_binding(&cred)?;
    Api::<RoleBinding>::namespaced((*client).clone(), &namespace)
        .patch(&name, &params, &Patch::Apply(&binding))
        .await
        .map_err(|source| Error::ApplyRoleBinding { name, source })?;
    Ok(Action::requeue(RESYNC))
}

fn error_policy(cred: Arc<McpCredential>, error: &Error, _: Arc<Client>) -> Action {
    warn!(credential = %cred.name_any(), error = %error, cause = ?std::error::Error::source(error).map(|s| s.to_string()), "access policy not applied");
    Action::requeue(Duration::from_secs(10))
}

/// How often a credential's Role and RoleBinding are re-applied without a spec change, which
/// restores one deleted or edited by hand. Not watched instead: caching every Role and RoleBinding
/// would double the operator's memory with 1,000 credentials (measured), for a rare repair.
const RESYNC: Duration = Duration::from_secs(3600);

/// At most this many access objects are written at once, so that at start-up, when every
/// credential's pair is applied, the refresher's writes are not queued behind them.
const CONCURRENCY: u16 = 4;

/// The Secrets of `events` that were created (or created again: a new UID), deleted, or given
/// another controller owner: what decides whether a Role may name them. Other changes, such as the
/// refresher's write of a new token on each refresh, are left out. A new list (after a watch
/// restart) lets every listed Secret through once.
fn ownership_changes(
    events: impl Stream<Item = watcher::Result<watcher::Event<PartialObjectMeta<Secret>>>> + Send + 'static,
) -> impl Stream<Item = watcher::Result<PartialObjectMeta<Secret>>> + Send + 'static {
    let mut owners: HashMap<String, Option<String>> = HashMap::new();
    events.filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                let owner = s
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .find(|o| o.controller == Some(true) && o.kind == "McpCredential")
                    .map(|o| o.uid.clone());
                let uid = s.metadata.uid.clone().unwrap_or_default();
                (owners.get(&uid) != Some(&owner)).then(|| {
                    owners.insert(uid, owner);
                    Ok(s)
                })
            }
            Ok(watcher::Event::Delete(s)) => {
                owners.remove(s.metadata.uid.as_deref().unwrap_or_default());
                Some(Ok(s))
            }
            Ok(watcher::Event::Init) => {
                owners.clear();
                None
            }
            Ok(watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        std::future::ready(changed)
    })
}

/// Keeps every McpCredential's Role and RoleBinding in step with its spec until the stream ends.
pub async fn run(client: Client, namespace: Option<&str>, selector: Option<&str>) {
    let credentials = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // The credentials' own Secrets, by their metadata only (no Secret data is received): a
    // Secret the operator creates or that is deleted re-evaluates whether the Role may name it.
    let owned: Api<PartialObjectMeta<Secret>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let managed = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    // Only a new generation (spec) changes the Role or the RoleBinding: the refresher's status
    // writes, one per refresh, wake nothing here.
    let (store, credentials) =
        crate::credentials::watch(credentials, selector, crate::credentials::Keep::SpecOnly);
    let credentials = credentials.predicate_filter(predicates::generation, Default::default());
    // Only a Secret created (or created again: a new UID) or given another owner changes whether
    // the Role may name it: the refresher's writes of the token, one per refresh, wake nothing.
    let owned = ownership_changes(watcher(owned, watcher::Config::default().labels(&managed)));
    Controller::<McpCredential>::for_stream(credentials, store)
        .owns_stream(owned)
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .run(reconcile, error_policy, Arc::new(client))
        .for_each(|_| std::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;
    use crate::fixtures::credential;

    fn owned_by(uid: &str, controller: bool) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: "mcpcredentials.dev/v1alpha1".into(),
                kind: "McpCredential".into(),
                name: "github".into(),
                uid: uid.into(),
                controller: Some(controller),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn the_role_reads_only_the_credentials_secret() {
        let role = role(&credential("github", &[], Some("gh-token")), true).unwrap();
        let rule = &role.rules.unwrap()[0];
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["gh-token".to_string()][..])
        );
        assert_eq!(rule.resources.as_deref(), Some(&["secrets".to_string()][..]));
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        assert_eq!(role.metadata.owner_references.unwrap()[0].uid, "0000-1111");
    }

    #[test]
    fn a_secret_the_credential_does_not_own_is_granted_to_nobody() {
        let cred = credential("github", &["coding-agent"], Some("db-password"));
        let role = role(&cred, false).unwrap();
        assert_eq!(role.rules, Some(vec![]));
        assert!(!owns(&cred, &ObjectMeta::default()), "no ownerReference");
        assert!(!owns(&cred, &owned_by("other-uid", true)), "another owner");
        assert!(!owns(&cred, &owned_by("0000-1111", false)), "not the controller");
        assert!(owns(&cred, &owned_by("0000-1111", true)));
    }

    #[test]
    fn the_binding_names_each_allowed_service_account_and_nobody_by_default() {
        let binding = role_binding(&credential("github", &["coding-agent", "research"], None)).unwrap();
        let names: Vec<_> = binding
            .subjects
            .unwrap()
            .into_iter()
            .map(|s| (s.kind, s.name))
            .collect();
        assert_eq!(
            names,
            [
                ("ServiceAccount".into(), "coding-agent".into()),
                ("ServiceAccount".into(), "research".into())
            ]
        );
        let closed = role_binding(&credential("github", &[], None)).unwrap();
        assert_eq!(closed.subjects, Some(vec![]));
        let mut open = credential("github", &[], None);
        open.spec.access.as_mut().unwrap().all_service_accounts = Some(true);
        let open = role_binding(&open).unwrap();
        assert_eq!(open.subjects.unwrap()[0].name, "system:serviceaccounts:agents");
    }
}

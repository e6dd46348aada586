//! The watch of McpCredentials that each controller runs on, and the cache it fills, trimmed to
//! what the controller reads: with 10,000 credentials each cached object counts.
//!
//! A cached McpCredential never keeps `metadata.managedFields` (the server-side apply bookkeeping
//! of every field, larger than the spec; no controller reads it), and the access-policy
//! controller's copy keeps no status either (it reads the spec only).

use std::hash::{Hash, Hasher};

use futures::Stream;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use mcp_credentials_core::McpCredential;

/// What a controller's cached McpCredentials keep besides the metadata (less `managedFields`)
/// and the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The status too (the refresher compares what it would write with it).
    Status,
    /// Nothing more.
    SpecOnly,
}

/// The McpCredentials of `api` matching `selector`, as they change (each one applied), and the
/// cache they fill, trimmed as `keep` says: what [`kube::runtime::Controller::for_stream`] takes.
pub fn watch(
    api: Api<McpCredential>,
    selector: Option<&str>,
    keep: Keep,
) -> (
    Store<McpCredential>,
    impl Stream<Item = Result<McpCredential, watcher::Error>> + Send + use<>,
) {
    let (store, writer) = reflector::store();
    let changes = watcher(api, crate::server::credential_watch(selector))
        .modify(move |cred: &mut McpCredential| trim(cred, keep))
        .reflect(writer)
        .applied_objects();
    (store, changes)
}

/// Drops what `keep` does not keep, and always the managed fields.
pub fn trim(cred: &mut McpCredential, keep: Keep) {
    cred.metadata.managed_fields = None;
    if keep == Keep::SpecOnly {
        cred.status = None;
    }
}

/// A predicate (for `predicate_filter`) that changes when a reconcile may have something new to
/// do: a new generation (spec) or new annotations (a refresh request). A status write, which
/// only this operator makes, changes neither, so it wakes nothing.
pub fn spec_or_annotations(cred: &McpCredential) -> Option<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    cred.meta().generation.hash(&mut hasher);
    cred.meta().annotations.hash(&mut hasher);
    Some(hasher.finish())
}

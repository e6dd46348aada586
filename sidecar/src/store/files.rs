//! The file store: a directory with one subdirectory per credential, holding files named like the
//! Secret's data keys (`header.Authorization`, `upstream`, `expires-at`, `version`), as a projected
//! Secret volume lays them out. Re-read the moment anything in it changes (an inotify watch on the
//! directory), when an upstream rejects a credential (it may have switched to a rotated key whose
//! file is about to land), and on an interval as the fallback; only changed credentials are reloaded.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::broadcast::error::RecvError;

use super::{Store, dirwatch};
use crate::credential::Credential;

type Data = BTreeMap<String, Vec<u8>>;

/// Keeps `store` in step with `dir` until the task is dropped.
pub async fn run(store: Arc<Store>, dir: PathBuf, interval: Duration) {
    let mut seen = BTreeMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Created before the first read, so no change between the two is missed.
    let watch = dirwatch::DirWatch::new(&dir);
    let mut changes = watch.receiver();
    let mut requests = store.refresh_requests();
    store.set_rereads(None);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = dirwatch::changed(&mut changes) => {}
            request = requests.recv() => match request {
                // Lagged: there were requests; one read answers them all.
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => std::future::pending().await,
            },
        }
        reload(&store, &dir, &mut seen);
    }
}

/// Reads `dir` once and publishes what changed since `seen`.
pub fn reload(store: &Store, dir: &Path, seen: &mut BTreeMap<String, Data>) {
    let now = match read_dir(dir) {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the credentials directory");
            return;
        }
    };
    for (name, data) in &now {
        if seen.get(name) == Some(data) {
            continue;
        }
        match Credential::from_data(data) {
            Ok(credential) => store.set(name, credential),
            Err(e) => store.fail(name, format!("{}: {e}", dir.join(name).display())),
        }
    }
    for name in seen.keys().filter(|n| !now.contains_key(*n)) {
        store.source_deleted(name, "its directory was removed");
    }
    *seen = now;
}

/// Every credential directory and its files. Dot-entries (`..data`, the kubelet's atomic-swap
/// machinery) are skipped; the files themselves are symlinks into it and are followed.
fn read_dir(dir: &Path) -> std::io::Result<BTreeMap<String, Data>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let mut data = Data::new();
        for file in std::fs::read_dir(entry.path())? {
            let file = file?;
            let key = file.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') || !file.path().is_file() {
                continue;
            }
            data.insert(key, std::fs::read(file.path())?);
        }
        out.insert(name, data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_of_files_becomes_credentials_and_changes_are_picked_up() {
        let dir = std::env::temp_dir().join(format!("mcp-sidecar-files-{}", std::process::id()));
        let cred = dir.join("github");
        std::fs::create_dir_all(&cred).unwrap();
        std::fs::write(cred.join("upstream"), "https://api.example.com/mcp").unwrap();
        std::fs::write(cred.join("header.Authorization"), "Bearer one").unwrap();
        std::fs::write(cred.join("version"), "1").unwrap();
        let store = Store::new(["github".to_owned()]);
        let mut seen = BTreeMap::new();
        reload(&store, &dir, &mut seen);
        let c = store.get("github").unwrap().current.unwrap();
        assert_eq!(c.headers[0].1, "Bearer one");

        std::fs::write(cred.join("header.Authorization"), "Bearer two").unwrap();
        std::fs::write(cred.join("version"), "2").unwrap();
        reload(&store, &dir, &mut seen);
        assert_eq!(
            store.get("github").unwrap().current.unwrap().headers[0].1,
            "Bearer two"
        );

        std::fs::write(cred.join("expires-at"), "soon").unwrap();
        reload(&store, &dir, &mut seen);
        let slot = store.get("github").unwrap();
        assert_eq!(
            slot.current.unwrap().version,
            "2",
            "the last good credential stays"
        );
        assert!(slot.last_failure.unwrap().contains("expires-at"));

        std::fs::remove_dir_all(&cred).unwrap();
        reload(&store, &dir, &mut seen);
        assert!(store.get("github").unwrap().current.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

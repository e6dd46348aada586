//! Directory watches (inotify on Linux), so a rotated credential file is read the moment it lands
//! instead of at the next poll. The whole directory is watched, recursively, never single files:
//! the kubelet updates a projected volume by swapping its `..data` symlink, and an editor or a
//! rotation script replaces a file by renaming over it; both leave a watch on the old file blind.
//! Readers keep their polls as the fallback (a watch can fail to start: no inotify instances left,
//! a directory that does not exist yet).

use std::path::Path;

use notify::{EventKind, RecursiveMode, Watcher, event::AccessKind};
use tokio::sync::watch;

/// A watch on a directory; [`DirWatch::changed`] resolves after anything under it changed.
pub struct DirWatch {
    /// Dropping the watcher ends the watch; `None` when it could not start.
    _watcher: Option<notify::RecommendedWatcher>,
    changes: watch::Receiver<u64>,
}

impl DirWatch {
    /// Watches `dir` and everything under it. A watch that cannot start is logged and never fires.
    pub fn new(dir: &Path) -> Self {
        let (tx, changes) = watch::channel(0u64);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading a file is not a change (and the readers read on every change).
            let change = match event {
                Ok(event) => !matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(notify::event::AccessMode::Write)),
                // An overflowed queue lost events: read everything again.
                Err(_) => true,
            };
            if change {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        })
        .and_then(|mut w| w.watch(dir, RecursiveMode::Recursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the directory: changes are seen at the next poll");
                None
            }
        };
        DirWatch {
            _watcher: watcher,
            changes,
        }
    }

    /// A receiver that changes whenever something under the directory does (shared by readers).
    pub fn receiver(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// Resolves after the next change `changes` reports; never, when the watch is not running.
pub async fn changed(changes: &mut watch::Receiver<u64>) {
    if changes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

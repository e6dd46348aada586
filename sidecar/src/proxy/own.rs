//! The upstream connections one agent connection keeps for itself, on either path: at most
//! [`MAX_OWN`], found by their upstream, the one used least recently dropped first.

use std::time::Duration;

use tokio::time::Instant;

/// How many upstreams one agent connection keeps a connection to: an agent's HTTP client may send
/// requests for several credentials over one keep-alive connection to the sidecar.
pub(super) const MAX_OWN: usize = 8;

/// A kept connection.
pub(super) trait Own {
    /// When its last request started (an idle period is at least as long as measured from there).
    fn last_used(&self) -> Instant;
}

/// Takes the connection `is_for` picks out of `kept`, if it was last used less than
/// `idle_timeout` before `now` (an older one is dropped: the upstream may be closing it).
pub(super) fn take<T: Own>(
    kept: &mut Vec<T>,
    is_for: impl Fn(&T) -> bool,
    now: Instant,
    idle_timeout: Duration,
) -> Option<T> {
    let i = kept.iter().position(is_for)?;
    let own = kept.swap_remove(i);
    (now.saturating_duration_since(own.last_used()) < idle_timeout).then_some(own)
}

/// Keeps `own` for the next request; at [`MAX_OWN`], the one used least recently goes (its
/// connection closes).
pub(super) fn put<T: Own>(kept: &mut Vec<T>, own: T) {
    if kept.len() >= MAX_OWN
        && let Some(oldest) = (0..kept.len()).min_by_key(|&i| kept[i].last_used())
    {
        kept.swap_remove(oldest);
    }
    kept.push(own);
}

//! Lease-based leader election (coordination.k8s.io/v1), so that of several operator processes
//! only one refreshes credentials. A holder renews every `renew_every`; a Lease not renewed for
//! `lease_duration` may be taken over.
//!
//! Two rules keep it to one leader, whatever the network or the clocks do (as client-go does):
//! - The leader stops leading once its last successful renewal is `renew_deadline` old (two
//!   thirds of the Lease), and every API call has a deadline, so a hung connection cannot keep it
//!   leading: it has stopped a third of the Lease before any standby may take over.
//! - A standby judges the holder's Lease expired by its own monotonic clock: `lease_duration`
//!   after it last saw the Lease change (holder or resourceVersion), never by comparing the
//!   holder's `renewTime` with the local wall clock (clock skew between nodes is not expiry).

use std::{sync::Mutex, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::time::{Instant, timeout};
use tracing::{info, warn};

/// One candidate for the leader Lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_every: Duration,
    /// A leader that has not renewed for this long stops leading.
    renew_deadline: Duration,
    /// The Lease as last seen held by another process: (holder, resourceVersion, when we saw it change).
    observed: Mutex<Option<(String, String, Instant)>>,
    /// The last acquisition took the Lease over from another holder that had not released it (it
    /// was killed, or cut off from the API server and may still be writing back what it redeemed).
    took_over: std::sync::atomic::AtomicBool,
    /// The Lease as this process last wrote it while holding it: a renewal replaces it at once
    /// (one request, its resourceVersion the precondition), reading it first only on a conflict.
    written: Mutex<Option<Lease>>,
}

/// Why [`LeaderElection::hold`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Another process holds the Lease now.
    TakenOver,
    /// No renewal succeeded within the renew deadline (the API server is unreachable or hangs).
    RenewDeadline,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl LeaderElection {
    /// A candidate `identity` for the Lease `name` in `api`'s namespace.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration,
            renew_every: lease_duration / 3,
            renew_deadline: lease_duration * 2 / 3,
            observed: Mutex::new(None),
            took_over: std::sync::atomic::AtomicBool::new(false),
            written: Mutex::new(None),
        }
    }

    /// How long after the last successful renewal the leader stops leading.
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }

    /// Waits until this process holds the Lease. Returns when it became the leader: the instant its
    /// winning attempt started, from which [`LeaderElection::hold`] counts the renew deadline.
    pub async fn acquire(&self) -> Instant {
        let retry = self.renew_every.min(Duration::from_secs(2));
        loop {
            let started = Instant::now();
            // A hung request must not hold up the next attempt (kube's client sets no read timeout).
            match timeout(self.renew_every, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return started;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "reading the leader Lease failed"),
                Err(_) => warn!(
                    timeout_seconds = self.renew_every.as_secs_f64(),
                    "reading the leader Lease timed out"
                ),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Whether the last [`LeaderElection::acquire`] took the Lease over from a holder that had not
    /// released it.
    pub fn took_over(&self) -> bool {
        self.took_over.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Renews the Lease until leadership is lost; then returns why. `since`: when the last
    /// successful renewal (or the acquisition) started. Returns no later than the renew deadline
    /// after the last success, so a standby (which waits the whole Lease) never leads alongside.
    pub async fn hold(&self, since: Instant) -> Lost {
        let mut last_renewal = since;
        let retry = self.renew_every.min(Duration::from_secs(2));
        let mut wait = self.renew_every;
        loop {
            let deadline = last_renewal + self.renew_deadline;
            tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
            let started = Instant::now();
            if started >= deadline {
                warn!(
                    identity = %self.identity,
                    renew_deadline_seconds = self.renew_deadline.as_secs_f64(),
                    "no renewal of the leader Lease succeeded within the renew deadline; stopping leading"
                );
                return Lost::RenewDeadline;
            }
            // Measured from the start of the attempt: the renewal happened no earlier than that.
            match timeout(deadline - started, self.renew()).await {
                Ok(Ok(true)) => {
                    last_renewal = started;
                    wait = self.renew_every;
                }
                Ok(Ok(false)) => {
                    warn!(identity = %self.identity, "another process took the leader Lease");
                    return Lost::TakenOver;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "renewing the leader Lease failed");
                    wait = retry;
                }
                Err(_) => wait = retry, // the deadline: reported at the top of the loop
            }
        }
    }

    /// Gives the Lease up so that a standby takes over at once (on graceful shutdown).
    pub async fn release(&self) {
        *self.written.lock().unwrap() = None;
        let Ok(Ok(Some(mut lease))) = timeout(self.renew_every, self.api.get_opt(&self.name)).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match timeout(
            self.renew_every,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(Ok(_)) => info!(identity = %self.identity, "released the leader Lease"),
            Ok(Err(e)) => warn!(error = %e, "releasing the leader Lease failed"),
            Err(_) => warn!("releasing the leader Lease timed out"),
        }
    }

    /// One renewal while leading: the Lease we last wrote, with a new `renewTime` (one request, so
    /// a slow API server costs one round trip, not two); on a conflict (someone else wrote it),
    /// read and decide as [`Self::try_acquire_or_renew`] does.
    async fn renew(&self) -> Result<bool, kube::Error> {
        let last = self.written.lock().unwrap().clone();
        let Some(mut lease) = last else {
            return self.try_acquire_or_renew().await;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(now());
        match self.write(lease).await? {
            true => Ok(true),
            false => self.try_acquire_or_renew().await,
        }
    }

    /// Replaces the Lease with `lease` (its resourceVersion the precondition): false on a conflict.
    /// Kept for the next renewal when it succeeds.
    async fn write(&self, lease: Lease) -> Result<bool, kube::Error> {
        *self.written.lock().unwrap() = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                *self.written.lock().unwrap() = Some(written);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One attempt: true when this process holds the Lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let created = self.api.create(&PostParams::default(), &lease).await;
            if let Ok(l) = &created {
                *self.written.lock().unwrap() = Some(l.clone());
            }
            return conflict_is_false(created);
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(&self.identity);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(secs))
                .unwrap_or(self.lease_duration.as_secs()),
        );
        if let Some(holder) = holder.as_ref().filter(|_| !mine)
            && spec.renew_time.is_some()
            && !self.expired(holder, &version, duration)
        {
            return Ok(false);
        }
        // A takeover only when another process held it: taking our own Lease back (after a lost
        // renewal) follows our own drain, so nothing of ours is left to wait for.
        self.took_over
            .store(!mine && holder.is_some(), std::sync::atomic::Ordering::Relaxed);
        if !mine {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(secs);
        // `replace` carries the resourceVersion we read: two candidates cannot both win.
        self.write(lease).await
    }
}

impl LeaderElection {
    /// True once the Lease held by `holder` at `version` has not changed for `duration` of our own
    /// clock. A Lease seen for the first time (or changed) starts the count anew.
    fn expired(&self, holder: &str, version: &str, duration: Duration) -> bool {
        let mut observed = self.observed.lock().unwrap();
        match observed.as_ref() {
            Some((h, v, at)) if h == holder && v == version => at.elapsed() >= duration,
            _ => {
                *observed = Some((holder.to_owned(), version.to_owned(), Instant::now()));
                false
            }
        }
    }
}

fn conflict_is_false(r: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

//! Lease-based leader election (coordination.k8s.io/v1), so that of several operator processes
//! only one refreshes credentials. A holder renews every `renew_every`; a Lease not renewed for
//! `lease_duration` may be taken over. Losing the Lease ends the process's leadership at once.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tracing::{info, warn};

/// One candidate for the leader Lease.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_every: Duration,
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
        }
    }

    /// Waits until this process holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "reading the leader Lease failed"),
            }
            tokio::time::sleep(self.renew_every.min(Duration::from_secs(2))).await;
        }
    }

    /// Renews the Lease until leadership is lost; then returns.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.identity, "another process took the leader Lease");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "renewing the leader Lease failed");
                    // Stop before another process may legitimately take over.
                    if last_renewal.elapsed() + self.renew_every >= self.lease_duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the Lease up so that a standby takes over at once (on graceful shutdown).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            warn!(error = %e, "releasing the leader Lease failed");
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
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(&self.identity);
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        let duration =
            jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs)));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0 + duration < jiff::Timestamp::now());
        if !mine && held && !expired {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(secs);
        // `replace` carries the resourceVersion we read: two candidates cannot both win.
        conflict_is_false(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }
}

fn conflict_is_false(r: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

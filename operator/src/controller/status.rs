//! The status a reconcile writes: conditions with reasons, times, and one write per change.

use super::*;

/// The Ready reason (and event reason) of a credential that lives shorter than the renewal floor.
pub(super) const SHORT_LIFETIME: &str = "ShortLifetime";

pub(super) fn short_lifetime_message(c: &Current) -> String {
    let lifetime = c
        .expires_at
        .map(|e| timing::unix_seconds(e).saturating_sub(timing::unix_seconds(c.not_before)))
        .unwrap_or_default();
    format!(
        "the server issued a credential that lives only {lifetime}s: it is renewed {}s after issue at the \
         earliest (the operator's minimum renewal interval), so it is expired part of the time; configure the \
         server to issue longer-lived tokens",
        timing::MIN_RENEWAL_INTERVAL.as_secs()
    )
}

/// Builds the status a reconcile wants and writes it only when it differs from what is there.
pub(super) struct StatusBuilder {
    pub(super) previous: McpCredentialStatus,
    pub(super) next: McpCredentialStatus,
    pub(super) generation: Option<i64>,
    pub(super) renewal: Option<SystemTime>,
    /// The current credential lives shorter than the renewal floor.
    pub(super) short_lifetime: bool,
    pub(super) namespace: String,
    pub(super) name: String,
    /// [`memory_key`] of the credential.
    pub(super) memory_key: String,
}

impl StatusBuilder {
    pub(super) fn new(
        cred: &McpCredential,
        secret_name: &str,
        last_written: Option<McpCredentialStatus>,
    ) -> Self {
        let previous = last_written.or_else(|| cred.status.clone()).unwrap_or_default();
        let mut next = previous.clone();
        next.observed_generation = cred.metadata.generation;
        next.source = Some(source::kind(&cred.spec).to_owned());
        next.secret_name = Some(secret_name.to_owned());
        Self {
            previous,
            next,
            generation: cred.metadata.generation,
            renewal: None,
            short_lifetime: false,
            namespace: cred.namespace().unwrap_or_default(),
            name: cred.name_any(),
            memory_key: memory_key(cred),
        }
    }

    pub(super) fn previous_status(&self, type_: &str) -> Option<&str> {
        self.previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.as_str())
    }

    /// Ready=False while the session check says the session is dead.
    pub(super) fn session_expired_not_ready(&mut self) {
        self.condition(
            "Ready",
            false,
            SESSION_EXPIRED,
            "the session check failed: see the SessionExpired condition",
        );
    }

    pub(super) fn previous_reason(&self, type_: &str) -> Option<&str> {
        self.previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.as_str())
    }

    pub(super) fn describe_current(
        &mut self,
        current: Option<&Current>,
        spec: &McpCredentialSpec,
        key: &str,
    ) {
        let Some(c) = current else {
            self.renewal = None;
            self.short_lifetime = false;
            return;
        };
        self.renewal = policy::renewal(spec, c.not_before, c.expires_at, key);
        self.short_lifetime = policy::short_lifetime(spec.refresh.as_ref(), c.not_before, c.expires_at, key);
        self.next.not_before = Some(to_time(c.not_before));
        self.next.not_after = c.expires_at.map(to_time);
        self.next.renewal_time = self.renewal.map(to_time);
        self.next.credential_version = Some(c.version.clone());
    }

    pub(super) fn condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        let status_s = if status { "True" } else { "False" };
        let previous = self.previous.conditions.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status_s => p.last_transition_time.clone(),
            _ => Time(
                jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            ),
        };
        let c = Condition {
            type_: type_.to_owned(),
            status: status_s.to_owned(),
            reason: reason.to_owned(),
            message: message.chars().take(2000).collect(),
            observed_generation: self.generation,
            last_transition_time,
        };
        match self.next.conditions.iter_mut().find(|x| x.type_ == type_) {
            Some(x) => *x = c,
            None => self.next.conditions.push(c),
        }
    }

    /// Keeps the failure conditions as they are (nothing new happened).
    pub(super) fn keep_failure_conditions(&mut self) {
        for c in &mut self.next.conditions {
            c.observed_generation = self.generation;
        }
    }

    pub(super) fn ready_describe_current(&mut self, current: Option<&Current>, now: SystemTime) {
        match current {
            Some(c) if c.valid_at(now) => {
                let msg = match c.expires_at {
                    Some(e) => format!("the credential is valid until {}", rfc3339(e)),
                    None => "the credential does not expire".to_owned(),
                };
                if self.short_lifetime {
                    let msg = format!("{msg}; {}", short_lifetime_message(c));
                    self.condition("Ready", true, SHORT_LIFETIME, &msg);
                } else {
                    self.condition("Ready", true, "CredentialValid", &msg);
                }
            }
            Some(_) => self.condition("Ready", false, "Expired", "the credential expired"),
            None => self.condition("Ready", false, "Pending", "no credential obtained yet"),
        }
    }

    pub(super) fn succeeded(&mut self, kind: &str, now: SystemTime) {
        self.next.last_refresh_time = Some(to_time(now));
        self.next.failed_attempts = None;
        self.next.last_failure_time = None;
        self.next.last_failure_message = None;
        self.next.invalid_grant_inputs = None;
        self.condition(
            "Refreshing",
            false,
            "Succeeded",
            &format!("obtained a new credential from {kind}"),
        );
        self.condition("ReauthRequired", false, "Authorized", "the grant is valid");
    }

    /// A step-up waits for a person's sign-in (`message` names the command); what was granted is
    /// still served, so `Ready` is untouched.
    pub(super) fn more_consent_required(&mut self, message: &str) {
        self.condition("ReauthRequired", true, "MoreConsentRequired", message);
    }

    /// What discovery found (`None`: nothing, or the token URL is configured), after an attempt.
    pub(super) fn discovered(&mut self, found: Option<mcp_credentials_core::DiscoveryStatus>) {
        self.next.discovery = found;
    }

    pub(super) fn failed(&mut self, attempts: i32, now: SystemTime, message: &str) {
        self.next.failed_attempts = Some(attempts);
        self.next.last_failure_time = Some(to_time(now));
        self.next.last_failure_message = Some(message.chars().take(1000).collect());
    }

    /// One status write, only if something changed.
    pub(super) async fn apply(&self, api: &Api<McpCredential>, ctx: &Context) -> Result<(), Error> {
        let ready = self
            .next
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ctx.metrics
            .ready
            .with_label_values(&[&self.namespace, &self.name])
            .set(i64::from(ready));
        if let Some(t) = &self.next.not_after {
            ctx.metrics
                .expiration
                .with_label_values(&[&self.namespace, &self.name])
                .set(t.0.as_second() as f64);
        }
        if let Some(r) = self.renewal {
            ctx.metrics
                .renewal
                .with_label_values(&[&self.namespace, &self.name])
                .set(timing::unix_seconds(r) as f64);
        }
        if self.next == self.previous {
            return Ok(());
        }
        let patch = serde_json::json!({
            "apiVersion": "mcpcredentials.dev/v1alpha1",
            "kind": "McpCredential",
            "status": self.next,
        });
        api.patch_status(
            &self.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::ApplyStatus {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        ctx.remember(&self.memory_key, |r| r.written = Some(self.next.clone()));
        Ok(())
    }
}

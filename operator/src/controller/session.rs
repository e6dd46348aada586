//! A session credential's liveness check, on its own interval, with the cookies being served.

use super::*;

impl Context {
    pub(super) fn check_due(&self, key: &str, check: &SessionCheck, now: SystemTime) -> bool {
        self.recall(key)
            .checked
            .is_none_or(|t| t + source::session::check_interval(check) <= now)
    }

    pub(super) fn next_check(&self, key: &str, check: Option<&SessionCheck>) -> Option<SystemTime> {
        let check = check?;
        let last = self.recall(key).checked?;
        Some(last + source::session::check_interval(check))
    }
}

/// Checks a session and records the result: the metric, the SessionExpired condition, and a
/// Warning event when the session has just died. `Some(alive)`, or `None` when the check could
/// not tell (the check URL is unreachable or failing: nothing changes).
pub(super) async fn check_session(
    run: &Run<'_>,
    status: &mut StatusBuilder,
    check: &SessionCheck,
    header: &str,
    value: &SecretString,
) -> Option<bool> {
    let (ctx, cred, key) = (run.ctx, run.cred, run.key.as_str());
    ctx.remember(&run.mkey, |r| r.checked = Some(run.now));
    let result = source::session::check(check, header, value, ctx.sources.http()).await;
    let label = match &result {
        Ok(()) => "alive",
        Err(e) if e.reason() == SESSION_EXPIRED => "expired",
        Err(_) => "error",
    };
    ctx.metrics
        .session_checks
        .with_label_values(&[&status.namespace, &status.name, label])
        .inc();
    match result {
        Ok(()) => {
            status.condition(
                "SessionExpired",
                false,
                "SessionAlive",
                "the session check answered the expected status",
            );
            Some(true)
        }
        Err(e) if label == "expired" => {
            let fix = if cred
                .spec
                .source
                .session
                .as_ref()
                .is_some_and(|s| s.form_login.is_some())
            {
                "logging in again"
            } else {
                "export fresh cookies into the referenced Secret"
            };
            let message = format!("{e}; {fix}");
            let newly = status.previous_status("SessionExpired") != Some("True");
            warn!(credential = %key, error = %e, "the session has expired");
            status.condition("SessionExpired", true, SESSION_EXPIRED, &message);
            if newly {
                publish(ctx, cred, EventType::Warning, SESSION_EXPIRED, "Check", &message).await;
            }
            Some(false)
        }
        Err(e) => {
            warn!(credential = %key, error = %e, "the session check could not tell");
            None
        }
    }
}

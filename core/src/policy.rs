//! The refresh policy, one for the operator and for standalone mode: whether a credential is due
//! for an attempt, and after an attempt what to do and when. Pure functions of explicit times; the
//! operator's controller and standalone mode carry the decision out against their stores (a
//! Secret and a status; files and memory).
//!
//! The rules:
//! - A credential that expires is renewed at its scheduled renewal time
//!   ([`timing::scheduled_renewal`]: 2/3 of its real lifetime by default, never sooner than
//!   [`timing::MIN_RENEWAL_INTERVAL`] after issue).
//! - A token issued without an expiry is renewed [`UNKNOWN_EXPIRY_RENEWAL`] after issue anyway;
//!   what is read rather than issued (an API key, imported cookies, a form login's session without
//!   an expiry) is renewed only when its inputs change or someone asks.
//! - `invalid_grant` is terminal, and so is a credential that needs a sign-in: no attempt until the
//!   inputs (the spec, the referenced Secrets or files, the sign-in's) change, or a new refresh is
//!   requested. Someone must sign in (again) or store a new token.
//! - After any other failure: [`timing::backoff`], never more than a quarter of the remaining
//!   lifetime of the credential being served.
//! - A dead session behind a form login logs in again at once; imported cookies wait for new ones.
//! - A rotated refresh token is persisted before the access token it came with is published
//!   ([`Issued::rotated_refresh_token`]), and kept in memory until it is.

use std::time::{Duration, SystemTime};

use crate::{
    McpCredentialSpec, Refresh,
    source::{Issued, SourceError},
    timing,
};

/// How long after issue a token without an expiry is renewed: servers that omit `expires_in` still
/// revoke tokens eventually, and one token request an hour is no load on anyone.
pub const UNKNOWN_EXPIRY_RENEWAL: Duration = Duration::from_secs(3600);

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try (again) at this time, or sooner when the inputs change or a refresh is requested.
    At(SystemTime),
    /// Nothing is scheduled: only a change of the inputs or a refresh request starts an attempt.
    OnChange,
    /// The grant is dead (`invalid_grant`): no attempt until the inputs change or a new refresh is
    /// requested; the credential says what to store (or that someone must sign in again).
    AwaitNewInputs,
}

impl Next {
    /// The time of the next attempt, if one is scheduled.
    pub fn at(self) -> Option<SystemTime> {
        match self {
            Next::At(at) => Some(at),
            Next::OnChange | Next::AwaitNewInputs => None,
        }
    }
}

/// True when the source's credential is issued by a server (so a missing expiry is the server's
/// omission), false when it is read from what someone stored (an API key, cookies).
fn issued_by_a_server(spec: &McpCredentialSpec) -> bool {
    let s = &spec.source;
    s.oauth2.is_some() || s.token_exchange.is_some() || s.jwt.is_some() || s.github_app.is_some()
}

/// When the credential valid from `not_before` (until `expires_at`, if it expires) is renewed, or
/// `None` when only a change renews it. `key` identifies the credential for the jitter
/// (`namespace/name` in a cluster, the name in standalone mode).
pub fn renewal(
    spec: &McpCredentialSpec,
    not_before: SystemTime,
    expires_at: Option<SystemTime>,
    key: &str,
) -> Option<SystemTime> {
    match expires_at {
        Some(e) => Some(timing::scheduled_renewal(
            not_before,
            e,
            spec.refresh.as_ref(),
            key,
        )),
        None if issued_by_a_server(spec) => Some(timing::truncate(not_before) + UNKNOWN_EXPIRY_RENEWAL),
        None => None,
    }
}

/// True when the renewal floor ([`timing::MIN_RENEWAL_INTERVAL`]) moved the renewal past the
/// credential's own renewal point: it lives too short (the `ShortLifetime` reason).
pub fn short_lifetime(
    refresh: Option<&Refresh>,
    not_before: SystemTime,
    expires_at: Option<SystemTime>,
    key: &str,
) -> bool {
    expires_at.is_some_and(|e| timing::renewal_floored(not_before, e, refresh, key))
}

/// What to do after a credential was obtained.
pub fn after_success(spec: &McpCredentialSpec, issued: &Issued, key: &str) -> Next {
    match renewal(spec, issued.not_before, issued.expires_at, key) {
        Some(at) => Next::At(at),
        None => Next::OnChange,
    }
}

/// What to do after attempt number `failed_attempts` (counting this one, so at least 1) failed
/// with `error` at `now`, while the credential being served (if any) expires at `expires_at`.
pub fn after_failure(
    error: &SourceError,
    failed_attempts: u32,
    now: SystemTime,
    expires_at: Option<SystemTime>,
    key: &str,
) -> Next {
    match error {
        // A dead grant, or none yet: only a (new) sign-in or token changes anything.
        SourceError::InvalidGrant(_) | SourceError::SignInRequired { .. } => Next::AwaitNewInputs,
        // The identity provider refused the stored subject token (cross-app access): the same.
        SourceError::IdentityProvider(e) => after_failure(e, failed_attempts, now, expires_at, key),
        _ => Next::At(now + timing::backoff(failed_attempts.max(1), now, expires_at, key)),
    }
}

/// What is known about a credential when deciding whether an attempt is due now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Situation {
    /// A credential is being served (valid or not).
    pub has_credential: bool,
    /// Its inputs (spec, referenced Secrets or files) changed since it was obtained.
    pub inputs_changed: bool,
    /// A refresh was requested (by a person, or by the sidecar's report of a rejection) and not yet handled.
    pub requested: bool,
    /// When it is to be renewed ([`renewal`]).
    pub renewal: Option<SystemTime>,
    /// Its session check says the session is dead.
    pub session_dead: bool,
    /// The source logs in with a form (so a dead session can be replaced without a person).
    pub form_login: bool,
}

impl Situation {
    /// True when an attempt is due at `now`: nothing is served yet, the inputs changed, a refresh
    /// was requested, the renewal time has come, or a dead session can log in again. A pending
    /// backoff or a terminal failure is the caller's to honour ([`Next`]).
    pub fn due(&self, now: SystemTime) -> bool {
        !self.has_credential
            || self.inputs_changed
            || self.requested
            || self.renewal.is_some_and(|r| r <= now)
            || (self.session_dead && self.form_login)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::SecretString;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn spec(source: &str) -> McpCredentialSpec {
        serde_yaml::from_str(&format!(
            "upstream: https://mcp.example.com/mcp\nsource:\n{source}"
        ))
        .unwrap()
    }

    fn oauth() -> McpCredentialSpec {
        spec("  oauth2: {grant: clientCredentials, tokenUrl: 'https://idp.example.com/token', clientId: c}\n")
    }

    fn api_key() -> McpCredentialSpec {
        spec("  apiKey: {secretKeyRef: {name: k, key: k}}\n")
    }

    fn issued(not_before: u64, expires_at: Option<u64>) -> Issued {
        Issued {
            token: SecretString::new("t".to_owned()),
            not_before: at(not_before),
            expires_at: expires_at.map(at),
            rotated_refresh_token: None,
        }
    }

    #[test]
    fn an_expiring_credential_is_renewed_at_two_thirds_of_its_lifetime_and_never_within_ten_seconds() {
        // An hour: renewed when 33 % of it is left (1,188 s), up to a tenth of that earlier (jitter).
        let Next::At(renew) = after_success(&oauth(), &issued(1000, Some(4600)), "ns/a") else {
            panic!("an expiring credential is renewed at a time");
        };
        assert!(
            renew >= at(4600 - 1188 - 119) && renew <= at(4600 - 1188),
            "{renew:?}"
        );
        // One second: renewed 10 s after issue (expired part of the time), and said to be short.
        assert_eq!(
            after_success(&oauth(), &issued(1000, Some(1001)), "ns/a"),
            Next::At(at(1010))
        );
        assert!(short_lifetime(None, at(1000), Some(at(1001)), "ns/a"));
        assert!(!short_lifetime(None, at(1000), Some(at(4600)), "ns/a"));
    }

    #[test]
    fn a_token_without_expiry_is_renewed_hourly_and_an_api_key_only_on_change() {
        assert_eq!(
            after_success(&oauth(), &issued(1000, None), "a"),
            Next::At(at(4600))
        );
        assert_eq!(
            after_success(&api_key(), &issued(1000, None), "a"),
            Next::OnChange
        );
        assert_eq!(renewal(&api_key(), at(1000), None, "a"), None);
    }

    #[test]
    fn invalid_grant_waits_for_new_inputs_and_other_failures_back_off_within_the_lifetime_left() {
        let dead = SourceError::InvalidGrant(None);
        assert_eq!(
            after_failure(&dead, 1, at(1000), Some(at(5000)), "a"),
            Next::AwaitNewInputs
        );
        assert_eq!(after_failure(&dead, 7, at(1000), None, "a").at(), None);
        let down = SourceError::Config("down".to_owned());
        // The 10th failure far from expiry: minutes (2.5 to 5, with jitter).
        let Next::At(next) = after_failure(&down, 10, at(1000), None, "a") else {
            panic!()
        };
        assert!(next >= at(1000 + 150) && next <= at(1000 + 300), "{next:?}");
        // 40 s of lifetime left: at most a quarter of it.
        let Next::At(next) = after_failure(&down, 10, at(1000), Some(at(1040)), "a") else {
            panic!()
        };
        assert!(next <= at(1010), "{next:?}");
        // Expired already: still at least a second apart.
        assert_eq!(
            after_failure(&down, 10, at(1000), Some(at(900)), "a"),
            Next::At(at(1001))
        );
    }

    #[test]
    fn an_attempt_is_due_for_nothing_served_new_inputs_a_request_the_renewal_time_or_a_dead_form_session() {
        let served = Situation {
            has_credential: true,
            renewal: Some(at(2000)),
            ..Situation::default()
        };
        assert!(!served.due(at(1999)));
        assert!(served.due(at(2000)));
        assert!(Situation::default().due(at(0)));
        assert!(
            Situation {
                inputs_changed: true,
                ..served
            }
            .due(at(0))
        );
        assert!(
            Situation {
                requested: true,
                ..served
            }
            .due(at(0))
        );
        // A dead session logs in again only with a form login; imported cookies wait for new ones.
        assert!(
            !Situation {
                session_dead: true,
                ..served
            }
            .due(at(0))
        );
        assert!(
            Situation {
                session_dead: true,
                form_login: true,
                ..served
            }
            .due(at(0))
        );
        // Not expiring and nothing changed: never due.
        assert!(
            !Situation {
                renewal: None,
                ..served
            }
            .due(at(u32::MAX.into()))
        );
    }
}

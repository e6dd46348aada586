//! When to renew a credential and how long to wait after a failure.
//!
//! Everything here is pure arithmetic on whole seconds, so one renewal window gives exactly one
//! refresh and a restarted operator computes the same times again from the Secret's `expires-at`.
//!
//! - [`renewal_time`]: at 2/3 of the real lifetime by default, or `refresh.renewBefore` /
//!   `refresh.renewBeforePercentage`, minus a deterministic per-object jitter (at most 10% of the
//!   renewal window) so that many credentials issued together do not all renew in the same second.
//! - [`scheduled_renewal`]: the renewal time, but never sooner than [`MIN_RENEWAL_INTERVAL`] after
//!   issue, even when that is after expiry: a server that issues 1-second tokens gets a token
//!   request every 10 s, not every second.
//! - [`backoff`]: exponential from 1 s, with jitter, capped at 5 minutes, and never more than a
//!   quarter of the remaining lifetime: patient when far from expiry, eager near it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Refresh;

/// The default share of the lifetime left at renewal: renew at 2/3 of the lifetime.
pub const DEFAULT_RENEW_BEFORE_PERCENTAGE: u64 = 33;
/// The longest wait between two attempts after a failure.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The first wait after a failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);

/// The shortest time between a credential's issue and its renewal. A lifetime this short is a
/// server misconfiguration (real tokens live minutes to hours): renewing every second would cost a
/// token request per second per credential and keep a reconcile slot busy for nothing, so such a
/// credential is renewed every 10 s (and is expired part of the time, which the status says).
/// Tokens living 15 s or more are never affected by default (2/3 of 15 s is 10 s).
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(10);

/// Truncates a time to whole seconds since the epoch.
pub fn truncate(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds(t))
}

/// Whole seconds since the epoch (0 before it).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A number in `[0, 1)` that depends only on `key` (FNV-1a): the same object gets the same jitter
/// after a restart, different objects get different ones.
pub fn jitter_fraction(key: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Fold the high bits in: FNV's low bits mix poorly for short keys.
    h ^= h >> 29;
    (h % 1_000_000) as f64 / 1_000_000.0
}

/// Parses a Go-style duration such as `90s`, `10m` or `1h30m` (as the CRD validates it).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => Duration::from_nanos(n),
            "us" | "µs" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// How long before expiry to renew a credential that lives `lifetime` seconds.
pub fn renew_before(lifetime: u64, refresh: Option<&Refresh>) -> u64 {
    // In u128: `lifetime` comes from servers (a JWT's `exp`) and may be near u64::MAX.
    let percent_of = |p: u64| (u128::from(lifetime) * u128::from(p) / 100) as u64;
    let default = percent_of(DEFAULT_RENEW_BEFORE_PERCENTAGE);
    let Some(refresh) = refresh else { return default };
    if let Some(d) = refresh.renew_before.as_deref().and_then(parse_duration) {
        let secs = d.as_secs();
        // A credential that lives shorter than renewBefore is renewed at 2/3 of its lifetime.
        return if secs > 0 && secs < lifetime {
            secs
        } else {
            default
        };
    }
    if let Some(p) = refresh.renew_before_percentage {
        let p = u64::try_from(p.clamp(1, 99)).unwrap_or(DEFAULT_RENEW_BEFORE_PERCENTAGE);
        return percent_of(p);
    }
    default
}

/// When to renew a credential valid from `not_before` until `expires_at`: whole seconds, never
/// before `not_before + 1s`, never after `expires_at`. `jitter_key` identifies the object
/// (`namespace/name`).
pub fn renewal_time(
    not_before: SystemTime,
    expires_at: SystemTime,
    refresh: Option<&Refresh>,
    jitter_key: &str,
) -> SystemTime {
    let start = unix_seconds(not_before);
    let end = unix_seconds(expires_at);
    let lifetime = end.saturating_sub(start);
    if lifetime <= 1 {
        return UNIX_EPOCH + Duration::from_secs(start);
    }
    // Renew at least one second before expiry.
    let before = renew_before(lifetime, refresh).max(1);
    let jitter = (before as f64 / 10.0 * jitter_fraction(jitter_key)) as u64;
    let at = end.saturating_sub(before).saturating_sub(jitter).max(start + 1);
    UNIX_EPOCH + Duration::from_secs(at.min(end))
}

/// When the operator renews a credential: [`renewal_time`], but never sooner than
/// [`MIN_RENEWAL_INTERVAL`] after `not_before` (even after `expires_at`). Whole seconds.
pub fn scheduled_renewal(
    not_before: SystemTime,
    expires_at: SystemTime,
    refresh: Option<&Refresh>,
    jitter_key: &str,
) -> SystemTime {
    let floor = UNIX_EPOCH + Duration::from_secs(unix_seconds(not_before)) + MIN_RENEWAL_INTERVAL;
    renewal_time(not_before, expires_at, refresh, jitter_key).max(floor)
}

/// True when [`MIN_RENEWAL_INTERVAL`] moved the renewal: the credential lives too short for its
/// renewal point (what the status reports as `ShortLifetime`).
pub fn renewal_floored(
    not_before: SystemTime,
    expires_at: SystemTime,
    refresh: Option<&Refresh>,
    jitter_key: &str,
) -> bool {
    scheduled_renewal(not_before, expires_at, refresh, jitter_key)
        != renewal_time(not_before, expires_at, refresh, jitter_key)
}

/// How long to wait before attempt number `failed_attempts + 1` after `failed_attempts`
/// consecutive failures (`failed_attempts >= 1`), at `now`, for a credential that expires at
/// `expires_at` (if any). Whole seconds, at least 1 s.
pub fn backoff(
    failed_attempts: u32,
    now: SystemTime,
    expires_at: Option<SystemTime>,
    jitter_key: &str,
) -> Duration {
    let exp = failed_attempts.saturating_sub(1).min(16);
    let base = INITIAL_BACKOFF
        .as_secs()
        .saturating_mul(1 << exp)
        .min(MAX_BACKOFF.as_secs());
    // Jitter between 50% and 100% of the base, different per object and per attempt.
    let fraction = 0.5 + 0.5 * jitter_fraction(&format!("{jitter_key}#{failed_attempts}"));
    let mut secs = ((base as f64) * fraction).round() as u64;
    if let Some(expires_at) = expires_at {
        let remaining = unix_seconds(expires_at).saturating_sub(unix_seconds(now));
        secs = secs.min(remaining / 4);
    }
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn refresh(before: Option<&str>, pct: Option<i32>) -> Refresh {
        Refresh {
            renew_before: before.map(str::to_owned),
            renew_before_percentage: pct,
        }
    }

    #[test]
    fn default_renewal_is_at_two_thirds_of_the_lifetime_minus_a_small_jitter() {
        // 3600 s lifetime: renew 1188 s before expiry (33%), jitter at most 118 s more.
        let t = unix_seconds(renewal_time(at(1000), at(4600), None, "ns/a"));
        assert!((4600 - 1188 - 118..=4600 - 1188).contains(&t), "{t}");
    }

    #[test]
    fn renewal_is_in_whole_seconds_and_deterministic() {
        let nb = UNIX_EPOCH + Duration::from_millis(1_000_500);
        let exp = UNIX_EPOCH + Duration::from_millis(1_060_900);
        let a = renewal_time(nb, exp, None, "ns/a");
        assert_eq!(a, renewal_time(nb, exp, None, "ns/a"));
        assert_eq!(a.duration_since(UNIX_EPOCH).unwrap().subsec_nanos(), 0);
    }

    #[test]
    fn jitter_differs_between_objects() {
        let times: std::collections::BTreeSet<_> = (0..50)
            .map(|i| renewal_time(at(0), at(36_000), None, &format!("ns/cred-{i}")))
            .collect();
        assert!(times.len() > 20, "only {} distinct renewal times", times.len());
    }

    #[test]
    fn renew_before_is_honoured_when_shorter_than_the_lifetime() {
        let r = refresh(Some("10m"), None);
        let t = unix_seconds(renewal_time(at(0), at(3600), Some(&r), "k"));
        assert!((3600 - 600 - 60..=3000).contains(&t), "{t}");
    }

    #[test]
    fn renew_before_longer_than_the_lifetime_falls_back_to_two_thirds() {
        let r = refresh(Some("2h"), None);
        assert_eq!(renew_before(3600, Some(&r)), 1188);
    }

    #[test]
    fn renew_before_percentage_is_honoured() {
        let r = refresh(None, Some(50));
        assert_eq!(renew_before(3600, Some(&r)), 1800);
        let r = refresh(None, Some(10));
        assert_eq!(renew_before(60, Some(&r)), 6);
    }

    #[test]
    fn a_sixty_second_token_renews_between_thirty_six_and_forty_seconds() {
        for i in 0..100 {
            let t = unix_seconds(renewal_time(at(0), at(60), None, &format!("k{i}")));
            assert!((37..=41).contains(&t), "{t}");
        }
    }

    #[test]
    fn renewal_never_precedes_issue_nor_follows_expiry() {
        assert_eq!(unix_seconds(renewal_time(at(10), at(11), None, "k")), 10);
        assert_eq!(unix_seconds(renewal_time(at(10), at(12), None, "k")), 11);
        let r = refresh(None, Some(99));
        assert_eq!(unix_seconds(renewal_time(at(0), at(100), Some(&r), "k")), 1);
    }

    #[test]
    fn a_one_or_two_second_token_is_renewed_ten_seconds_after_issue_not_every_second() {
        for lifetime in [0, 1, 2, 5, 9] {
            let t = scheduled_renewal(at(1000), at(1000 + lifetime), None, "ns/a");
            assert_eq!(unix_seconds(t), 1010, "lifetime {lifetime}");
            assert!(renewal_floored(at(1000), at(1000 + lifetime), None, "ns/a"));
        }
        // Sub-second issue times count from the whole second.
        let nb = UNIX_EPOCH + Duration::from_millis(1_000_900);
        assert_eq!(unix_seconds(scheduled_renewal(nb, at(1001), None, "k")), 1010);
    }

    #[test]
    fn the_renewal_floor_leaves_tokens_of_fifteen_seconds_and_more_alone() {
        for lifetime in [15, 20, 30, 60, 3600] {
            for i in 0..50 {
                let key = format!("ns/c{i}");
                let (nb, exp) = (at(5000), at(5000 + lifetime));
                assert_eq!(
                    scheduled_renewal(nb, exp, None, &key),
                    renewal_time(nb, exp, None, &key),
                    "lifetime {lifetime}, {key}"
                );
                assert!(!renewal_floored(nb, exp, None, &key));
            }
        }
    }

    #[test]
    fn the_renewal_floor_also_bounds_an_aggressive_renew_before() {
        // renewBeforePercentage 99 of 100 s would renew 1 s after issue.
        let r = refresh(None, Some(99));
        assert_eq!(unix_seconds(scheduled_renewal(at(0), at(100), Some(&r), "k")), 10);
        assert!(renewal_floored(at(0), at(100), Some(&r), "k"));
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let now = at(0);
        let b: Vec<u64> = (1..=12).map(|n| backoff(n, now, None, "k").as_secs()).collect();
        assert_eq!(b[0], 1, "{b:?}");
        assert!((4..=8).contains(&b[3]), "{b:?}");
        assert!(b.iter().all(|s| *s <= MAX_BACKOFF.as_secs()), "{b:?}");
        assert!(b[11] >= MAX_BACKOFF.as_secs() / 2, "{b:?}");
    }

    #[test]
    fn backoff_is_bounded_by_a_quarter_of_the_remaining_lifetime() {
        // Far from expiry: patient (the exponential value); near expiry: eager.
        let now = at(1000);
        assert!(backoff(10, now, Some(at(1000 + 86_400)), "k").as_secs() >= 150);
        assert_eq!(backoff(10, now, Some(at(1040)), "k").as_secs(), 10);
        assert_eq!(backoff(10, now, Some(at(1002)), "k").as_secs(), 1);
        assert_eq!(backoff(10, now, Some(at(900)), "k").as_secs(), 1);
    }
}

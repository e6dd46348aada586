//! Property tests ("fuzzing" bounded in time) of everything in core that reads untrusted input:
//! token endpoint answers, JWTs issued by servers, `WWW-Authenticate` challenges and learned URLs,
//! durations from users, and the timing math fed by them. Each must never panic, and no error may
//! carry the token it was given.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mcp_credentials_core::{
    Refresh,
    source::{
        OutboundPolicy,
        discovery::{challenges, resource_metadata},
        outbound::check_url,
        token_response::{jwt_claims, parse_token_response},
    },
    timing::{MAX_BACKOFF, backoff, parse_duration, renewal_time},
};
use proptest::prelude::*;

/// A JSON value of any shape, for the fields of a token response.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    // Runs are seeded afresh each time; a failure prints its minimal input, so nothing is persisted.
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn token_responses_of_any_bytes_never_panic(status in 100u16..600, body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_token_response(status, &body);
    }

    #[test]
    fn no_token_response_error_repeats_the_token(
        status in prop_oneof![Just(200u16), Just(400u16), Just(401u16), Just(500u16), 100u16..600],
        token in "[A-Za-z0-9_-]{24,48}",
        expires_in in any_json(),
        token_type in any_json(),
        error in prop_oneof![Just(serde_json::Value::Null), any_json()],
        extra in any_json(),
    ) {
        // The token stands where a broken server might put it: in the token field, the error
        // description, and an unknown field.
        let body = serde_json::json!({
            "access_token": token,
            "refresh_token": token,
            "expires_in": expires_in,
            "token_type": token_type,
            "error": error,
            "error_description": format!("bad {token}"),
            "extra": extra,
        });
        if let Err(e) = parse_token_response(status, body.to_string().as_bytes()) {
            let shown = format!("{e} {e:?}");
            prop_assert!(!shown.contains(&token), "the error shows the token: {shown}");
        }
    }

    #[test]
    fn a_successful_token_response_keeps_a_sane_lifetime(secs in any::<i64>(), as_string in any::<bool>()) {
        let expires_in = if as_string { serde_json::Value::from(secs.to_string()) } else { secs.into() };
        let body = serde_json::json!({"access_token": "t0ken", "expires_in": expires_in});
        if let Ok(r) = parse_token_response(200, body.to_string().as_bytes()) {
            let lifetime = r.expires_in.expect("a parsed expires_in");
            prop_assert!(lifetime >= Duration::from_secs(1));
            prop_assert!(lifetime <= Duration::from_secs(366 * 24 * 3600));
        }
    }

    #[test]
    fn jwts_of_any_shape_never_panic(token in ".{0,300}", payload in any_json()) {
        let _ = jwt_claims(&token);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwt = format!("{}.{}.sig", b64.encode(b"{\"alg\":\"none\"}"), b64.encode(payload.to_string()));
        let _ = jwt_claims(&jwt);
    }

    #[test]
    fn durations_of_any_text_never_panic(s in ".{0,40}", n in any::<u64>(), unit in "(ns|us|ms|s|m|h|d|)") {
        let _ = parse_duration(&s);
        let _ = parse_duration(&format!("{n}{unit}"));
    }

    /// Expiry comes from servers (`exp`, `expires_in`): any pair of instants must give a renewal
    /// time inside the credential's lifetime, whatever the refresh settings.
    #[test]
    fn renewal_is_always_within_the_lifetime(
        start in any::<u64>(),
        lifetime in prop_oneof![0u64..10, 10u64..100_000, any::<u64>()],
        renew_before in prop::option::of("[0-9]{1,6}(s|m|h)"),
        percentage in prop::option::of(-5i32..120),
        key in "[a-z0-9/-]{1,30}",
    ) {
        let start = start % (u64::MAX / 4);
        let end = start.saturating_add(lifetime) % (u64::MAX / 2);
        let (nb, exp) = (UNIX_EPOCH + Duration::from_secs(start), UNIX_EPOCH + Duration::from_secs(end));
        let refresh = Refresh { renew_before, renew_before_percentage: percentage };
        let at = renewal_time(nb, exp, Some(&refresh), &key);
        let at = at.duration_since(UNIX_EPOCH).unwrap().as_secs();
        if end > start + 1 {
            prop_assert!(at > start && at <= end, "renewal {at} outside ({start}, {end}]");
        }
        let _ = renewal_time(nb, exp, None, &key);
    }

    #[test]
    fn backoff_is_bounded_and_never_zero(
        attempts in any::<u32>(),
        now in 0u64..4_000_000_000,
        remaining in prop::option::of(any::<u64>()),
        key in "[a-z0-9/-]{1,30}",
    ) {
        let now_t = UNIX_EPOCH + Duration::from_secs(now);
        let expires = remaining.map(|r| now_t + Duration::from_secs(r % 1_000_000_000));
        let wait = backoff(attempts.max(1), now_t, expires, &key);
        prop_assert!(wait >= Duration::from_secs(1));
        prop_assert!(wait <= MAX_BACKOFF);
        let _ = SystemTime::now();
    }

    #[test]
    fn challenges_of_any_text_never_panic_and_keep_a_quoted_resource_metadata(
        junk in ".{0,200}",
        url in "https://[a-z]{1,12}\\.example/[a-z/]{0,20}",
        before in "(Basic realm=\"x\", |Negotiate abc==, |DPoP algs=\"ES256\", |)",
    ) {
        let _ = challenges(&junk);
        let _ = resource_metadata([junk.as_str()]);
        let header = format!(r#"{before}Bearer error="invalid_token", resource_metadata="{url}""#);
        prop_assert_eq!(resource_metadata([header.as_str()]), Some(url));
    }

    #[test]
    fn learned_urls_of_any_text_never_panic_and_never_reach_link_local(
        junk in ".{0,120}",
        a in any::<u8>(), b in any::<u8>(), path in "[a-z/]{0,10}",
        loopback in any::<bool>(),
    ) {
        let policy = OutboundPolicy { allow_loopback: loopback };
        let _ = check_url(&junk, policy);
        let link_local = format!("https://169.254.{a}.{b}/{path}");
        prop_assert!(check_url(&link_local, policy).is_err());
        let mapped = format!("https://[::ffff:169.254.{a}.{b}]/{path}");
        prop_assert!(check_url(&mapped, policy).is_err());
    }
}

/// A cookie value an exporter might write: what must never show in an error.
fn cookie_value() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_%-]{16,40}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn cookie_files_of_any_text_never_panic(text in "(.|\t|\n){0,400}") {
        use mcp_credentials_core::{CookieFormat, source::session::parse};
        let _ = parse(&text, None);
        let _ = parse(&text, Some(CookieFormat::Netscape));
        let _ = parse(&text, Some(CookieFormat::Json));
    }

    #[test]
    fn cookie_json_of_any_shape_never_panics(items in prop::collection::vec(any_json(), 0..4)) {
        let text = serde_json::Value::from(items).to_string();
        let _ = mcp_credentials_core::source::session::parse_json(&text);
    }

    #[test]
    fn no_cookie_parse_error_repeats_a_value(
        value in cookie_value(),
        domain in prop_oneof![Just(".example.com".to_owned()), Just(String::new()), ".{0,12}"],
        flag in prop_oneof![Just("TRUE".to_owned()), ".{0,6}"],
        expiry in prop_oneof![Just("0".to_owned()), Just("2000000000".to_owned()), ".{0,12}"],
        name in prop_oneof![Just("sid".to_owned()), ".{0,8}"],
        extra_tab in any::<bool>(),
    ) {
        use mcp_credentials_core::source::session::{parse_json, parse_netscape};
        let tail = if extra_tab { "\textra" } else { "" };
        let line = format!("{domain}\t{flag}\t/\tFALSE\t{expiry}\t{name}\t{value}{tail}\n");
        if let Err(e) = parse_netscape(&line) {
            prop_assert!(!e.contains(&value), "the error shows the cookie value: {e}");
        }
        let json = serde_json::json!([{ "name": name, "value": value, "domain": domain, "expirationDate": expiry }]);
        if let Err(e) = parse_json(&json.to_string()) {
            prop_assert!(!e.contains(&value), "the error shows the cookie value: {e}");
        }
    }

    #[test]
    fn set_cookie_headers_of_any_text_never_panic(header in ".{0,200}", now in any::<u64>()) {
        let url = reqwest::Url::parse("https://wiki.example.com/login").unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(now % 100_000_000_000);
        let _ = mcp_credentials_core::source::session::parse_set_cookie(&header, &url, now);
    }

    /// Cookies of any domain, path and expiry, for any upstream: a header or a clear error without values.
    #[test]
    fn issuing_a_session_never_panics_nor_shows_a_value_in_an_error(
        cookies in prop::collection::vec(("[a-z.]{0,16}", any::<bool>(), "/[a-z/]{0,8}", any::<bool>(), 0u64..4_000_000_000, cookie_value()), 0..5),
        url in prop_oneof![Just("https://a.example.com/mcp".to_owned()), ".{0,30}"],
        now in 0u64..4_000_000_000,
    ) {
        use mcp_credentials_core::source::session::{issue, parse_netscape};
        let text: String = cookies
            .iter()
            .map(|(d, sub, p, sec, exp, v)| {
                let b = |x: &bool| if *x { "TRUE" } else { "FALSE" };
                format!("{d}\t{}\t{p}\t{}\t{exp}\tc\t{v}\n", b(sub), b(sec))
            })
            .collect();
        if let Ok(parsed) = parse_netscape(&text)
            && let Err(e) = issue(&parsed, &url, UNIX_EPOCH + Duration::from_secs(now), "test")
        {
            let shown = format!("{e} {e:?}");
            for (.., v) in &cookies {
                prop_assert!(!shown.contains(v.as_str()), "the error shows a cookie value: {shown}");
            }
        }
    }

    #[test]
    fn github_answers_of_any_shape_never_panic_nor_show_the_token(extra in any_json(), expires in any_json(), token in "ghs_[A-Za-z0-9]{20,36}") {
        use mcp_credentials_core::source::github_app::parse_access_token;
        let _ = parse_access_token(Some(&extra));
        let body = serde_json::json!({ "token": token, "expires_at": expires });
        if let Err(e) = parse_access_token(Some(&body)) {
            let shown = format!("{e} {e:?}");
            prop_assert!(!shown.contains(&token), "the error shows the token: {shown}");
        }
    }

    /// A ring edited by hand (any times, any keys) rotates without panicking.
    #[test]
    fn rotating_a_ring_with_any_times_never_panics(times in prop::collection::vec(any::<u64>(), 0..4), now in any::<u64>(), period in 1u64..u64::MAX / 2) {
        use mcp_credentials_core::{JwtAlgorithm, SecretString, keyring::{KeyRing, Policy, RingKey}};
        let mut ring = KeyRing {
            keys: times
                .iter()
                .enumerate()
                .map(|(i, t)| RingKey {
                    kid: i.to_string(),
                    algorithm: if i % 2 == 0 { JwtAlgorithm::ES256 } else { JwtAlgorithm::RS256 },
                    active_from: *t,
                    private_key: SecretString::new("not a key"),
                })
                .collect(),
        };
        let now = UNIX_EPOCH + Duration::from_secs(now % 100_000_000_000);
        let generate = |_| Ok((SecretString::new("k"), "new".to_owned()));
        prop_assert!(ring.rotate(now, &Policy::every(Duration::from_secs(period)), generate).is_ok());
        let _ = ring.jwks();
    }

    #[test]
    fn key_rings_of_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), json in any_json()) {
        use mcp_credentials_core::keyring::KeyRing;
        let _ = KeyRing::from_json(&bytes);
        if let Ok(ring) = KeyRing::from_json(json.to_string().as_bytes()) {
            let _ = ring.jwks();
        }
    }
}

//! The `session` source: browser cookies, imported (Netscape `cookies.txt` or a JSON export) or
//! captured from a form login's `Set-Cookie`, sent as one `Cookie` header; and the liveness check
//! that tells a dead session before agents hit it.
//!
//! Parse errors name the line or entry and the field, never a cookie value.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `session.browser`: the session from the person's browser, through the extension.
pub mod browser;

use super::{
    Issued, SecretResolver, SourceError,
    oauth2::{endpoint_label, form_encode, read_body, send},
};
use crate::{CookieFormat, FormLogin, McpCredentialSpec, SecretString, SessionCheck, SessionSource, timing};

/// The condition reason (and [`SourceError::Rejected`] reason) of a session that no longer works.
pub const SESSION_EXPIRED: &str = "SessionExpired";
/// How often the check runs when `check.interval` is unset.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// One cookie. Its value never prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cookie {
    /// Name.
    pub name: String,
    /// Value.
    pub value: SecretString,
    /// Domain, lower case, without a leading dot.
    pub domain: String,
    /// Also sent to subdomains of `domain`.
    pub include_subdomains: bool,
    /// Path prefix.
    pub path: String,
    /// Only sent over https (or to loopback).
    pub secure: bool,
    /// Expiry in Unix seconds; `None` for a session cookie.
    pub expires: Option<u64>,
}

/// Parses imported cookies in `format`, or the detected one (JSON when it starts with `[`).
pub fn parse(text: &str, format: Option<CookieFormat>) -> Result<Vec<Cookie>, String> {
    let format = format.unwrap_or(if text.trim_start().starts_with('[') {
        CookieFormat::Json
    } else {
        CookieFormat::Netscape
    });
    match format {
        CookieFormat::Netscape => parse_netscape(text),
        CookieFormat::Json => parse_json(text),
    }
}

/// Netscape `cookies.txt`: comments, `#HttpOnly_` lines, 7 tab-separated fields (domain,
/// includeSubdomains, path, secure, expiry, name, value); expiry 0 is a session cookie.
pub fn parse_netscape(text: &str) -> Result<Vec<Cookie>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim_end_matches('\r');
        let line = match line.strip_prefix("#HttpOnly_") {
            Some(rest) => rest,
            None if line.trim().is_empty() || line.starts_with('#') => continue,
            None => line,
        };
        let fields: Vec<&str> = line.split('\t').collect();
        // A cookie with an empty value may lose its trailing tab.
        if fields.len() != 7 && fields.len() != 6 {
            return Err(format!(
                "line {n}: expected 7 tab-separated fields (domain, includeSubdomains, path, secure, expiry, \
                 name, value), found {}",
                fields.len()
            ));
        }
        let flag = |v: &str, what: &str| match v.to_ascii_uppercase().as_str() {
            "TRUE" => Ok(true),
            "FALSE" => Ok(false),
            _ => Err(format!("line {n}: the {what} field must be TRUE or FALSE")),
        };
        let expires: f64 = fields[4].trim().parse().map_err(|_| {
            format!("line {n}: the expiry field must be Unix seconds (0 for a session cookie)")
        })?;
        out.push(
            cookie(
                fields[5],
                fields.get(6).copied().unwrap_or(""),
                fields[0],
                flag(fields[1], "includeSubdomains")?,
                fields[2],
                flag(fields[3], "secure")?,
                expires,
            )
            .map_err(|e| format!("line {n}: {e}"))?,
        );
    }
    Ok(out)
}

/// A browser extension's JSON export: an array of `{name, value, domain, path, expirationDate,
/// secure, hostOnly, session}`.
pub fn parse_json(text: &str) -> Result<Vec<Cookie>, String> {
    let items: Vec<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of cookies (line {})", e.line()))?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let s = |k: &str| item.get(k).and_then(serde_json::Value::as_str);
        let b = |k: &str| item.get(k).and_then(serde_json::Value::as_bool);
        let name = s("name").ok_or_else(|| format!("cookie {i}: name must be a string"))?;
        let value = s("value").ok_or_else(|| format!("cookie {i}: value must be a string"))?;
        let domain = s("domain").ok_or_else(|| format!("cookie {i}: domain must be a string"))?;
        let expires = match item.get("expirationDate") {
            None | Some(serde_json::Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("cookie {i}: expirationDate must be Unix seconds"))?,
        };
        let expires = if b("session") == Some(true) { 0.0 } else { expires };
        let include_subdomains = !b("hostOnly").unwrap_or(!domain.starts_with('.'));
        let path = s("path").unwrap_or("/");
        out.push(
            cookie(
                name,
                value,
                domain,
                include_subdomains,
                path,
                b("secure").unwrap_or(false),
                expires,
            )
            .map_err(|e| format!("cookie {i}: {e}"))?,
        );
    }
    Ok(out)
}

fn cookie(
    name: &str,
    value: &str,
    domain: &str,
    include_subdomains: bool,
    path: &str,
    secure: bool,
    expires: f64,
) -> Result<Cookie, String> {
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if !valid_name {
        return Err("the cookie name is empty or has characters a cookie name cannot have".into());
    }
    // Values travel in a header: no control characters, no separator that would split the header.
    if value.bytes().any(|b| b.is_ascii_control() || b == b';') {
        return Err(format!(
            "the value of cookie {name:?} has a control character or ';'"
        ));
    }
    let domain = domain.trim().trim_start_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return Err(format!("cookie {name:?} has no domain"));
    }
    if !expires.is_finite() || expires < 0.0 {
        return Err(format!("cookie {name:?} has an invalid expiry"));
    }
    Ok(Cookie {
        name: name.to_owned(),
        value: SecretString::new(value),
        domain,
        include_subdomains,
        path: if path.starts_with('/') {
            path.to_owned()
        } else {
            "/".to_owned()
        },
        secure,
        // Seconds, truncated; past the year 10000 counts as never.
        expires: (expires >= 1.0).then(|| (expires.min(253_402_300_799.0)) as u64),
    })
}

/// The cookies a browser would send to `url` (RFC 6265 domain and path match; secure ones only
/// over https or to loopback), expired ones included.
pub fn matching<'a>(cookies: &'a [Cookie], url: &str) -> Vec<&'a Cookie> {
    let Ok(u) = reqwest::Url::parse(url) else {
        return Vec::new();
    };
    let host = u
        .host_str()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let secure_ok = u.scheme() == "https" || loopback;
    let path = u.path();
    let mut out: Vec<&Cookie> = cookies
        .iter()
        .filter(|c| c.domain == host || (c.include_subdomains && host.ends_with(&format!(".{}", c.domain))))
        .filter(|c| {
            path == c.path
                || (path.starts_with(&c.path)
                    && (c.path.ends_with('/') || path[c.path.len()..].starts_with('/')))
        })
        .filter(|c| secure_ok || !c.secure)
        .collect();
    // Longer paths first (RFC 6265 §5.4); a later duplicate name is shadowed by the first.
    out.sort_by_key(|c| std::cmp::Reverse(c.path.len()));
    let mut seen = std::collections::HashSet::new();
    out.retain(|c| seen.insert((c.name.clone(), c.path.clone())));
    out
}

/// The credential from `cookies` for `url` at `now`: the `Cookie` header value of the live ones,
/// valid until the earliest of their expiries. `what` names the origin in errors.
pub fn issue(cookies: &[Cookie], url: &str, now: SystemTime, what: &str) -> Result<Issued, SourceError> {
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let matching = matching(cookies, url);
    if matching.is_empty() {
        let mut domains: Vec<&str> = cookies.iter().map(|c| c.domain.as_str()).collect();
        domains.sort_unstable();
        domains.dedup();
        return Err(SourceError::Config(format!(
            "none of the {} cookies from {what} is for {host} (their domains: {}): export the cookies of that site",
            cookies.len(),
            domains.join(", ")
        )));
    }
    let now_s = timing::unix_seconds(now);
    let live: Vec<&Cookie> = matching
        .iter()
        .copied()
        .filter(|c| c.expires.is_none_or(|e| e > now_s))
        .collect();
    if live.is_empty() {
        return Err(SourceError::Rejected {
            reason: SESSION_EXPIRED,
            message: format!(
                "every cookie from {what} for {host} has expired: log in again and store fresh cookies"
            ),
        });
    }
    let value = live
        .iter()
        .map(|c| format!("{}={}", c.name, c.value.expose()))
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Issued {
        token: SecretString::new(value),
        not_before: timing::truncate(now),
        expires_at: live
            .iter()
            .filter_map(|c| c.expires)
            .min()
            .map(|e| UNIX_EPOCH + Duration::from_secs(e)),
        rotated_refresh_token: None,
    })
}

/// Parses one `Set-Cookie` header received from `url` at `now` (RFC 6265 §5.2, the parts a
/// session needs). `None` for a malformed one or a deletion.
pub fn parse_set_cookie(header: &str, url: &reqwest::Url, now: SystemTime) -> Option<Cookie> {
    let mut parts = header.split(';');
    let (name, value) = parts.next()?.split_once('=')?;
    let (name, value) = (name.trim(), value.trim().trim_matches('"'));
    let mut domain = None;
    let mut path = None;
    let mut secure = false;
    let mut max_age: Option<i64> = None;
    let mut expires: Option<u64> = None;
    for attr in parts {
        let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "domain" if !v.is_empty() => domain = Some(v.to_owned()),
            "path" if v.starts_with('/') => path = Some(v.to_owned()),
            "secure" => secure = true,
            "max-age" => max_age = v.parse().ok(),
            "expires" => expires = http_date(v),
            _ => {}
        }
    }
    let now_s = timing::unix_seconds(now);
    let expiry = match max_age {
        Some(a) if a <= 0 => return None,
        Some(a) => Some(now_s.saturating_add(a.unsigned_abs())),
        None => expires,
    };
    if expiry.is_some_and(|e| e <= now_s) {
        return None;
    }
    let host = url.host_str()?;
    let default_path = match url.path().rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => url.path()[..i].to_owned(),
    };
    let include_subdomains = domain.is_some();
    let mut c = cookie(
        name,
        value,
        domain.as_deref().unwrap_or(host),
        include_subdomains,
        path.as_deref().unwrap_or(&default_path),
        secure,
        0.0,
    )
    .ok()?;
    c.expires = expiry;
    Some(c)
}

/// An HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`, or with dashes) as Unix seconds.
fn http_date(v: &str) -> Option<u64> {
    let v = v.replace('-', " ");
    let ts = jiff::fmt::rfc2822::parse(&v).ok()?.timestamp();
    u64::try_from(ts.as_second()).ok()
}

/// Obtains the session's cookies: reads the imported ones or the browser's, or logs in. See
/// [`super::obtain`].
pub async fn obtain(
    name: &str,
    spec: &McpCredentialSpec,
    s: &SessionSource,
    secrets: &impl SecretResolver,
    http: &reqwest::Client,
) -> Result<Issued, SourceError> {
    let now = SystemTime::now();
    if let Some(imported) = &s.cookies {
        let r = &imported.secret_key_ref;
        let text = secrets.get(r).await?;
        let what = format!("key {:?} of secret {:?}", r.key, r.name);
        let cookies = parse(text.expose(), imported.format)
            .map_err(|e| SourceError::Config(format!("session.cookies: {what}: {e}")))?;
        return issue(&cookies, &spec.upstream, now, &what);
    }
    if let Some(f) = &s.form_login {
        return login(spec, f, secrets, http).await;
    }
    if let Some(b) = &s.browser {
        return browser::obtain(name, spec, b, secrets).await;
    }
    Err(SourceError::Config(
        "session must set cookies, formLogin or browser".into(),
    ))
}

/// Posts the login form and keeps the cookies it sets.
async fn login(
    spec: &McpCredentialSpec,
    f: &FormLogin,
    secrets: &impl SecretResolver,
    http: &reqwest::Client,
) -> Result<Issued, SourceError> {
    let user = secrets.get(&f.username).await?;
    let password = secrets.get(&f.password).await?;
    let mut form: Vec<(String, String)> = f.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let user_field = f.username_field.as_deref().unwrap_or("username");
    let password_field = f.password_field.as_deref().unwrap_or("password");
    form.retain(|(k, _)| k != user_field && k != password_field);
    form.push((user_field.to_owned(), user.expose().to_owned()));
    form.push((password_field.to_owned(), password.expose().to_owned()));
    let body = form
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let url = reqwest::Url::parse(&f.url)
        .map_err(|_| SourceError::Config("session.formLogin.url is not a URL".into()))?;
    let endpoint = endpoint_label(&f.url);
    let req = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body);
    let resp = send(req, &endpoint).await?;
    let now = SystemTime::now();
    let cookies: Vec<Cookie> = resp
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| parse_set_cookie(v, &url, now))
        .collect();
    let (status, _) = read_body(resp, &endpoint).await?;
    match status {
        // A login usually redirects (3xx) to the application; the cookies come with that answer.
        200..=399 => {}
        s if s >= 500 || s == 429 => return Err(SourceError::HttpStatus(s)),
        s => {
            return Err(SourceError::Rejected {
                reason: "LoginFailed",
                message: format!(
                    "the login form {endpoint} answered HTTP {s}: check the user name and password in the secrets \
                     {:?} and {:?}, and session.formLogin.usernameField, passwordField and fields",
                    f.username.name, f.password.name
                ),
            });
        }
    }
    if cookies.is_empty() {
        return Err(SourceError::Rejected {
            reason: "LoginFailed",
            message: format!(
                "the login form {endpoint} answered HTTP {status} without setting a cookie: the login probably \
                 failed; check the user name and password, and session.formLogin.usernameField, passwordField and fields"
            ),
        });
    }
    issue(&cookies, &spec.upstream, now, &format!("the login at {endpoint}"))
}

/// How often `check` runs.
pub fn check_interval(check: &SessionCheck) -> Duration {
    check
        .interval
        .as_deref()
        .and_then(timing::parse_duration)
        .filter(|d| d.as_secs() >= 1)
        .unwrap_or(DEFAULT_CHECK_INTERVAL)
}

/// GETs `check.url` with the session's header (`name: value`): `Ok` while the answer has
/// the expected status, [`SESSION_EXPIRED`] when not, a transient error when it cannot be reached.
/// Redirects are not followed: a redirect to a login page is a dead session.
pub async fn check(
    check: &SessionCheck,
    name: &str,
    value: &SecretString,
    http: &reqwest::Client,
) -> Result<(), SourceError> {
    let endpoint = endpoint_label(&check.url);
    let resp = send(http.get(&check.url).header(name, value.expose()), &endpoint).await?;
    let status = resp.status().as_u16();
    let expected = check.expect_status.unwrap_or(200);
    if i32::from(status) == expected {
        return Ok(());
    }
    if status >= 500 || status == 429 {
        return Err(SourceError::HttpStatus(status));
    }
    Err(SourceError::Rejected {
        reason: SESSION_EXPIRED,
        message: format!(
            "the session check GET {endpoint} answered HTTP {status}, expected {expected}: the session has expired \
             or was revoked"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSCAPE: &str = "# Netscape HTTP Cookie File\n\
        # https://curl.se/docs/http-cookies.html\n\
        \n\
        .example.com\tTRUE\t/\tTRUE\t2000000000\tsid\tabc123\n\
        #HttpOnly_wiki.example.com\tFALSE\t/\tFALSE\t1900000000\tcsrf\txyz\n\
        wiki.example.com\tFALSE\t/admin\tFALSE\t0\tadmin\tyes\n\
        other.org\tFALSE\t/\tFALSE\t0\ttrack\tme\n";

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn netscape_cookies_for_the_upstream_make_one_header_valid_until_the_first_expiry() {
        let cookies = parse(NETSCAPE, None).unwrap();
        assert_eq!(cookies.len(), 4);
        let issued = issue(
            &cookies,
            "https://wiki.example.com/mcp",
            at(1_800_000_000),
            "test",
        )
        .unwrap();
        assert_eq!(issued.token.expose(), "sid=abc123; csrf=xyz");
        assert_eq!(issued.expires_at, Some(at(1_900_000_000)));
    }

    #[test]
    fn json_exports_are_detected_and_host_only_cookies_stay_on_their_host() {
        let json = r#"[
            {"name": "sid", "value": "abc", "domain": ".example.com", "path": "/", "expirationDate": 2000000000.5, "hostOnly": false},
            {"name": "host", "value": "h", "domain": "example.com", "path": "/", "hostOnly": true, "session": true}
        ]"#;
        let cookies = parse(json, None).unwrap();
        let sub = issue(&cookies, "https://wiki.example.com/mcp", at(1_000), "test").unwrap();
        assert_eq!(sub.token.expose(), "sid=abc");
        let apex = issue(&cookies, "https://example.com/", at(1_000), "test").unwrap();
        assert_eq!(apex.token.expose(), "sid=abc; host=h");
        assert_eq!(apex.expires_at, Some(at(2_000_000_000)));
    }

    #[test]
    fn expired_cookies_are_a_session_expired_error_and_foreign_ones_a_config_error() {
        let cookies = parse(NETSCAPE, None).unwrap();
        let e = issue(
            &cookies,
            "https://wiki.example.com/mcp",
            at(2_100_000_000),
            "test",
        )
        .unwrap_err();
        assert_eq!(e.reason(), SESSION_EXPIRED);
        let e = issue(&cookies, "https://elsewhere.net/mcp", at(0), "the secret").unwrap_err();
        assert_eq!(e.category(), "config_error");
        assert!(e.to_string().contains("example.com"), "{e}");
        assert!(!e.to_string().contains("abc123"), "{e}");
    }

    #[test]
    fn a_malformed_line_is_named_without_its_value() {
        let e = parse("example.com\tTRUE\t/\tFALSE\tsoon\tsid\tsecretvalue\n", None).unwrap_err();
        assert!(e.contains("line 1") && e.contains("expiry"), "{e}");
        assert!(!e.contains("secretvalue"), "{e}");
    }

    #[test]
    fn set_cookie_max_age_wins_over_expires_and_a_deletion_is_dropped() {
        let url = reqwest::Url::parse("https://wiki.example.com/login").unwrap();
        let c = parse_set_cookie(
            "sid=s3cr3t; Path=/; Max-Age=600; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly",
            &url,
            at(1_000),
        )
        .unwrap();
        assert_eq!(c.expires, Some(1_600));
        assert_eq!(c.domain, "wiki.example.com");
        assert!(!c.include_subdomains);
        let e = parse_set_cookie("sid=x; Expires=Wed, 21-Oct-2037 07:28:00 GMT", &url, at(1_000)).unwrap();
        assert_eq!(e.expires, Some(2_139_722_880));
        assert!(parse_set_cookie("sid=; Max-Age=0", &url, at(1_000)).is_none());
    }
}

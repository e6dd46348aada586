//! `session.browser`: the session a person already has in their own browser, handed to the
//! standalone sidecar by the mcp-credentials browser extension. The sidecar stores the cookies it
//! accepted (only ones the browser would send to the site) as a JSON file in the secrets directory
//! ([`cookies_ref`]); this source reads that file like imported cookies, so the session's lifecycle
//! (the liveness check, expiry from the cookies, the messages) is the other session sources'.

use std::time::SystemTime;

use super::{Cookie, SESSION_EXPIRED, issue, matching, parse_json};
use crate::{
    BrowserSession, McpCredentialSpec, SecretKeyRef, SecretString,
    source::{Issued, ResolveError, SecretResolver, SourceError},
};

/// The reason of a browser session that is not there: never sent, or the person signed out (the
/// browser holds no cookie for the site any more). Nothing is served until the extension sends one.
pub const SIGNED_OUT: &str = "BrowserSignedOut";

/// Why a cluster has no use for `session.browser`, and what to use there instead: the API server's
/// message when one is applied (the CRD's rule) and the operator's condition should one reach it.
pub const STANDALONE_ONLY: &str = "session.browser works only in standalone mode (mcp-credentials-sidecar \
     standalone, on the person's machine beside their browser); in a cluster use session.cookies or \
     session.formLogin instead";

/// The id Chromium gives the extension in `extension/` (derived from the public `key` pinned in its
/// `manifest.json`, so it is the same on every machine): the sidecar accepts requests from the
/// origin `chrome-extension://<this id>` only, unless told other ids.
pub const EXTENSION_ID: &str = "ojapmpkflhddenealegioeblgpfaapag";

/// The Chromium extension id of a manifest `key` (base64 DER public key): the first 16 bytes of
/// its SHA-256, each hex digit written as a letter from `a` to `p`.
pub fn extension_id(manifest_key: &str) -> Option<String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(manifest_key.trim())
        .ok()?;
    let digest = sha2::Sha256::digest(der);
    Some(
        digest[..16]
            .iter()
            .flat_map(|b| [b >> 4, b & 0xf])
            .map(|n| char::from(b'a' + n))
            .collect(),
    )
}

/// A new pairing code: 32 random bytes, base64url without padding (43 characters).
pub fn new_pairing_code() -> SecretString {
    use base64::Engine as _;
    use rand_core::RngCore as _;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    SecretString::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether `presented` is `expected`, in time that does not depend on where they differ (both are
/// hashed first, so not on their lengths either).
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest as _;
    let (a, b) = (sha2::Sha256::digest(presented), sha2::Sha256::digest(expected));
    std::hint::black_box(a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// What the sidecar answers the extension's challenge `nonce` with, to show it holds the pairing
/// code before the extension sends it the code or any cookie (a program that took the sidecar's
/// port while it was not running cannot): base64url (no padding) of HMAC-SHA256 keyed with the code
/// over `mcp-credentials sidecar proof\n<nonce>` (the same in `extension/sidecar.js`).
pub fn sidecar_proof(code: &SecretString, nonce: &str) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(code.expose().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(b"mcp-credentials sidecar proof\n");
    mac.update(nonce.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Where the sidecar keeps the cookies the extension sent for credential `name`.
pub fn cookies_ref(name: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: format!("{name}-browser"),
        key: "cookies.json".into(),
    }
}

/// The URL whose cookies make the session: `browser.url`, else `spec.upstream`.
pub fn site_url<'a>(spec: &'a McpCredentialSpec, b: &'a BrowserSession) -> &'a str {
    b.url.as_deref().unwrap_or(&spec.upstream)
}

/// The page to open for signing in again: `browser.signInUrl`, else the origin of [`site_url`].
pub fn sign_in_url(spec: &McpCredentialSpec, b: &BrowserSession) -> String {
    if let Some(u) = &b.sign_in_url {
        return u.clone();
    }
    match reqwest::Url::parse(site_url(spec, b)) {
        Ok(u) => format!("{}/", u.origin().ascii_serialization()),
        Err(_) => site_url(spec, b).to_owned(),
    }
}

/// The site as a person names it: its host, with the port when the URL has one.
pub fn site_name(spec: &McpCredentialSpec, b: &BrowserSession) -> String {
    let url = site_url(spec, b);
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => url.to_owned(),
        },
        Err(_) => url.to_owned(),
    }
}

/// What a person does about a browser session that ended.
pub fn fix(spec: &McpCredentialSpec, b: &BrowserSession) -> String {
    format!(
        "sign in to {} in your browser (the mcp-credentials extension hands the new session to the sidecar)",
        site_name(spec, b)
    )
}

/// Parses cookies the extension sent (`chrome.cookies.Cookie` objects) and keeps them only if the
/// browser would send every one of them to `url`: a cookie for another domain, path or scheme is
/// refused with the domain named (never a value).
pub fn accept(json: &str, url: &str) -> Result<Vec<Cookie>, String> {
    let cookies = parse_json(json)?;
    for (i, c) in cookies.iter().enumerate() {
        if matching(std::slice::from_ref(c), url).is_empty() {
            return Err(format!(
                "cookie {i} (domain {}, path {}{}) is not one the browser sends to {url}: only the cookies of the \
                 configured site are accepted",
                c.domain,
                c.path,
                if c.secure { ", secure" } else { "" }
            ));
        }
    }
    Ok(cookies)
}

/// `cookies` as the JSON file [`obtain`] reads (the shape [`parse_json`] takes).
pub fn to_json(cookies: &[Cookie]) -> SecretString {
    let items: Vec<serde_json::Value> = cookies
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "value": c.value.expose(),
                "domain": c.domain,
                "hostOnly": !c.include_subdomains,
                "path": c.path,
                "secure": c.secure,
                "session": c.expires.is_none(),
                "expirationDate": c.expires,
            })
        })
        .collect();
    SecretString::new(serde_json::Value::Array(items).to_string())
}

/// The credential from the cookies the extension sent for credential `name`.
pub async fn obtain(
    name: &str,
    spec: &McpCredentialSpec,
    b: &BrowserSession,
    secrets: &impl SecretResolver,
) -> Result<Issued, SourceError> {
    if secrets.namespace().is_some() {
        return Err(SourceError::Config(STANDALONE_ONLY.into()));
    }
    let url = site_url(spec, b);
    let signed_out = |why: &str| SourceError::Rejected {
        reason: SIGNED_OUT,
        message: format!("{why}: {}", fix(spec, b)),
    };
    let text = match secrets.get(&cookies_ref(name)).await {
        Ok(t) => t,
        Err(ResolveError::NotFound { .. }) => {
            return Err(signed_out("no session from the browser yet"));
        }
        Err(e) => return Err(e.into()),
    };
    let cookies = parse_json(text.expose()).map_err(|e| {
        let r = cookies_ref(name);
        SourceError::Config(format!(
            "session.browser: {}/{} is not the cookies file the sidecar writes ({e}); delete it and sign in again",
            r.name, r.key
        ))
    })?;
    if matching(&cookies, url).is_empty() {
        return Err(signed_out("the browser has no session for the site (signed out)"));
    }
    issue(&cookies, url, SystemTime::now(), "the browser").map_err(|e| match e {
        SourceError::Rejected {
            reason: SESSION_EXPIRED,
            ..
        } => SourceError::Rejected {
            reason: SESSION_EXPIRED,
            message: format!("the browser session's cookies have expired: {}", fix(spec, b)),
        },
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(upstream: &str) -> McpCredentialSpec {
        serde_yaml::from_str(&format!(
            "upstream: {upstream}\nsource:\n  session:\n    browser: {{}}\n"
        ))
        .unwrap()
    }

    /// A resolver inside a cluster (it names a namespace).
    struct InCluster;

    impl SecretResolver for InCluster {
        async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
            Err(ResolveError::NotFound {
                name: r.name.clone(),
                key: r.key.clone(),
            })
        }

        fn namespace(&self) -> Option<&str> {
            Some("team")
        }
    }

    fn credential() -> (McpCredentialSpec, BrowserSession) {
        let s = spec("https://wiki.example.com/mcp");
        let b = s.source.session.clone().unwrap().browser.unwrap();
        (s, b)
    }

    fn sent(cookies: &str) -> crate::source::test_support::MapResolver {
        let r = cookies_ref("wiki");
        crate::source::test_support::MapResolver::default().with(&r.name, &r.key, cookies)
    }

    #[tokio::test]
    async fn in_a_cluster_the_browser_source_says_it_is_for_standalone_mode() {
        let (s, b) = credential();
        let e = obtain("wiki", &s, &b, &InCluster).await.unwrap_err();
        assert!(matches!(e, SourceError::Config(_)), "{e:?}");
        assert!(e.to_string().contains("standalone mode"), "{e}");
        assert!(e.to_string().contains(STANDALONE_ONLY), "{e}");
    }

    /// The API server refuses `session.browser` with the CRD's rule (tests/tests/crd.rs applies it),
    /// in the words the operator uses should one get in; the type itself (what standalone mode
    /// reads from YAML) still takes it.
    #[test]
    fn the_crd_refuses_a_browser_session_in_the_words_of_the_reconcile_error() {
        use kube::CustomResourceExt as _;
        let crd = serde_json::to_value(crate::McpCredential::crd()).unwrap();
        let session = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["source"]["properties"]["session"];
        let rules = session["x-kubernetes-validations"].as_array().unwrap();
        let rule = rules
            .iter()
            .find(|r| r["fieldPath"] == ".browser")
            .expect("a rule on session.browser");
        assert_eq!(rule["rule"], "!has(self.browser)");
        assert_eq!(rule["message"], STANDALONE_ONLY);
        let (s, _) = credential();
        assert!(s.source.session.unwrap().browser.is_some());
    }

    #[tokio::test]
    async fn no_session_yet_or_a_signed_out_browser_asks_for_a_sign_in_in_the_browser() {
        let (s, b) = credential();
        for (resolver, why) in [
            (
                crate::source::test_support::MapResolver::default(),
                "no session from the browser yet",
            ),
            (sent("[]"), "signed out"),
        ] {
            let e = obtain("wiki", &s, &b, &resolver).await.unwrap_err();
            assert_eq!(e.reason(), SIGNED_OUT);
            assert!(
                e.to_string().contains(why)
                    && e.to_string()
                        .contains("sign in to wiki.example.com in your browser"),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn the_sent_cookies_make_the_credential_until_the_earliest_expires() {
        let (s, b) = credential();
        let issued = obtain(
            "wiki",
            &s,
            &b,
            &sent(
                r#"[{"name":"sid","value":"v1","domain":"wiki.example.com","hostOnly":true,"path":"/","secure":true,"expirationDate":4000000000},
                    {"name":"csrf","value":"v2","domain":".example.com","path":"/","secure":true,"expirationDate":3900000000}]"#,
            ),
        )
        .await
        .unwrap();
        let header = issued.token.expose().to_owned();
        assert!(
            header.contains("sid=v1") && header.contains("csrf=v2"),
            "{header}"
        );
        assert_eq!(
            issued.expires_at,
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(3_900_000_000))
        );
        let e = obtain(
            "wiki",
            &s,
            &b,
            &sent(r#"[{"name":"sid","value":"old","domain":"wiki.example.com","path":"/","expirationDate":1000}]"#),
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason(), SESSION_EXPIRED);
        assert!(
            e.to_string()
                .contains("sign in to wiki.example.com in your browser")
                && !e.to_string().contains("old"),
            "{e}"
        );
    }

    #[test]
    fn the_pinned_id_is_the_one_of_the_extensions_manifest_key() {
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../extension/manifest.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            extension_id(manifest["key"].as_str().unwrap()).as_deref(),
            Some(EXTENSION_ID)
        );
    }

    #[test]
    fn the_sidecars_proof_is_hmac_sha256_of_the_nonce_keyed_with_the_code() {
        // The value extension/test/sidecar.test.js expects for the same code and nonce.
        let code = SecretString::new("pairing-code-for-tests-0123456789abcdef");
        assert_eq!(
            sidecar_proof(&code, "nonce-1"),
            "OwQLWevBI9dJk05kgrPCMALOx1nk3Ks05YyyFYcbK_8"
        );
        assert_ne!(sidecar_proof(&code, "nonce-2"), sidecar_proof(&code, "nonce-1"));
        assert_ne!(
            sidecar_proof(&SecretString::new("another code"), "nonce-1"),
            sidecar_proof(&code, "nonce-1")
        );
    }

    #[test]
    fn pairing_codes_differ_and_compare_whole() {
        let (a, b) = (new_pairing_code(), new_pairing_code());
        assert_eq!(a.expose().len(), 43);
        assert_ne!(a, b);
        assert!(same_secret(a.expose().as_bytes(), a.expose().as_bytes()));
        assert!(!same_secret(a.expose().as_bytes(), b.expose().as_bytes()));
        assert!(!same_secret(&a.expose().as_bytes()[..42], a.expose().as_bytes()));
        assert!(!same_secret(b"", a.expose().as_bytes()));
    }

    #[test]
    fn the_site_defaults_to_the_upstream_and_the_sign_in_page_to_its_origin() {
        let s = spec("https://wiki.example.com/api/mcp");
        let b = s.source.session.clone().unwrap().browser.unwrap();
        assert_eq!(site_url(&s, &b), "https://wiki.example.com/api/mcp");
        assert_eq!(sign_in_url(&s, &b), "https://wiki.example.com/");
        assert_eq!(site_name(&s, &b), "wiki.example.com");
        let l = spec("http://localhost:8080/mcp");
        let b = l.source.session.clone().unwrap().browser.unwrap();
        assert_eq!(site_name(&l, &b), "localhost:8080");
        assert!(fix(&l, &b).starts_with("sign in to localhost:8080 in your browser"));
    }

    #[test]
    fn only_cookies_the_browser_sends_to_the_site_are_accepted() {
        let url = "https://wiki.example.com/mcp";
        let ok = r#"[{"name":"sid","value":"v1","domain":".example.com","hostOnly":false,"path":"/","secure":true,"session":true},
                     {"name":"h","value":"v2","domain":"wiki.example.com","hostOnly":true,"path":"/mcp","secure":false,"expirationDate":2000000000}]"#;
        let cookies = accept(ok, url).unwrap();
        assert_eq!(cookies.len(), 2);
        // Written and read back the same.
        assert_eq!(parse_json(to_json(&cookies).expose()).unwrap(), cookies);
        for (bad, what) in [
            (
                r#"[{"name":"t","value":"secretv","domain":"evil.example","path":"/"}]"#,
                "evil.example",
            ),
            (
                r#"[{"name":"t","value":"secretv","domain":"wiki.example.com","path":"/admin"}]"#,
                "/admin",
            ),
            (
                r#"[{"name":"t","value":"secretv","domain":"other.example.com","hostOnly":true,"path":"/"}]"#,
                "other.example.com",
            ),
        ] {
            let e = accept(bad, url).unwrap_err();
            assert!(e.contains(what) && !e.contains("secretv"), "{e}");
        }
        // A secure cookie is not sent over plain http to a host that is not loopback.
        let e = accept(
            r#"[{"name":"t","value":"v","domain":"wiki.example.com","path":"/","secure":true}]"#,
            "http://wiki.example.com/mcp",
        )
        .unwrap_err();
        assert!(e.contains("secure"), "{e}");
    }
}

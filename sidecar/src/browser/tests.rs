use std::os::unix::fs::PermissionsExt as _;

use http_body_util::BodyExt as _;

use axum::http::Request;
use tower::ServiceExt as _;

use super::*;

const ORIGIN: &str = "chrome-extension://ojapmpkflhddenealegioeblgpfaapag";

struct Fixture {
    dir: PathBuf,
    app: Router,
    code: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("mcp-browser-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: wiki}\n\
                spec:\n  upstream: https://wiki.example.com/mcp\n  source:\n    session:\n      browser: {}\n";
    let credential: McpCredential = serde_yaml::from_str(yaml).unwrap();
    let store = Store::new(["wiki".to_owned()]);
    let b = Browser::new(store, &[credential], &dir, &[]).unwrap().unwrap();
    let code = std::fs::read_to_string(dir.join("browser-extension/pairing-code")).unwrap();
    Fixture {
        dir,
        app: routes(b),
        code,
    }
}

/// A request from the extension (`origin`, `code`: `None` leaves the header out).
fn request(
    method: &str,
    path: &str,
    origin: Option<&str>,
    code: Option<&str>,
    body: String,
) -> Request<Body> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1:7008");
    if let Some(o) = origin {
        r = r.header("origin", o);
    }
    if let Some(c) = code {
        r = r.header("authorization", format!("Bearer {c}"));
    }
    r.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let response = app.clone().oneshot(r).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn cookies_body(domain: &str, value: &str) -> String {
    json!({
        "credential": "wiki",
        "cookies": [{"name": "sid", "value": value, "domain": domain, "hostOnly": true, "path": "/",
                     "secure": true, "session": false, "expirationDate": 4_000_000_000u64}],
    })
    .to_string()
}

fn stored(f: &Fixture) -> PathBuf {
    f.dir.join("wiki-browser/cookies.json")
}

#[tokio::test]
async fn the_pairing_code_is_made_once_readable_by_its_owner_only() {
    let f = fixture("code");
    let file = f.dir.join("browser-extension/pairing-code");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(f.code.len() >= 43);
    // The next start keeps it: the extension stays paired.
    let again = fixture_again(&f);
    assert_eq!(again, f.code);
}

fn fixture_again(f: &Fixture) -> String {
    pairing_code(&f.dir.join("browser-extension/pairing-code"))
        .unwrap()
        .expose()
        .to_owned()
}

#[tokio::test]
async fn the_paired_extension_gets_the_sites_and_its_cookies_are_stored_0600() {
    let f = fixture("accept");
    let (status, headers, body) = send(
        &f.app,
        request(
            "GET",
            "/browser/sites",
            Some(ORIGIN),
            Some(&f.code),
            String::new(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    let sites: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sites["sites"][0]["credential"], "wiki");
    assert_eq!(sites["sites"][0]["url"], "https://wiki.example.com/mcp");
    assert_eq!(sites["sites"][0]["signInUrl"], "https://wiki.example.com/");
    assert_eq!(sites["sites"][0]["state"], "signed out");

    let (status, _, body) = send(
        &f.app,
        request(
            "POST",
            "/browser/cookies",
            Some(ORIGIN),
            Some(&f.code),
            cookies_body("wiki.example.com", "s3cret"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"accepted\":1"), "{body}");
    let file = stored(&f);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let cookies =
        mcp_credentials_core::source::session::parse_json(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(cookies[0].value.expose(), "s3cret");
    assert_eq!(cookies[0].expires, Some(4_000_000_000));
}

#[tokio::test]
async fn the_preflight_is_answered_for_the_extension_only() {
    let f = fixture("preflight");
    let (status, headers, _) = send(
        &f.app,
        request("OPTIONS", "/browser/cookies", Some(ORIGIN), None, String::new()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    assert!(
        headers["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    let (status, headers, _) = send(
        &f.app,
        request(
            "OPTIONS",
            "/browser/cookies",
            Some("https://evil.example"),
            None,
            String::new(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn no_or_a_wrong_pairing_code_is_refused_and_nothing_is_stored() {
    let f = fixture("secret");
    for code in [None, Some("wrong"), Some(&f.code[..f.code.len() - 1])] {
        for (method, path, body) in [
            ("GET", "/browser/sites", String::new()),
            ("POST", "/browser/cookies", cookies_body("wiki.example.com", "v")),
        ] {
            let (status, _, text) = send(&f.app, request(method, path, Some(ORIGIN), code, body)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} {code:?}");
            assert!(text.contains("pairing code from"), "{text}");
            assert!(!text.contains(&f.code), "the refusal shows the code");
        }
    }
    assert!(!stored(&f).exists());
}

#[tokio::test]
async fn web_origins_and_rebound_host_names_are_refused_even_with_the_code() {
    let f = fixture("origin");
    for origin in [
        None,
        Some("https://evil.example"),
        Some("null"),
        Some("chrome-extension://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ] {
        let (status, headers, _) = send(
            &f.app,
            request(
                "POST",
                "/browser/cookies",
                origin,
                Some(&f.code),
                cookies_body("wiki.example.com", "v"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{origin:?}");
        assert!(headers.get("access-control-allow-origin").is_none());
    }
    // DNS rebinding: a page of evil.example whose name now points to 127.0.0.1.
    let mut r = request(
        "GET",
        "/browser/sites",
        Some(ORIGIN),
        Some(&f.code),
        String::new(),
    );
    r.headers_mut()
        .insert("host", HeaderValue::from_static("evil.example:7008"));
    assert_eq!(send(&f.app, r).await.0, StatusCode::FORBIDDEN);
    let mut r = request("GET", "/browser", None, None, String::new());
    r.headers_mut()
        .insert("host", HeaderValue::from_static("evil.example:7008"));
    assert_eq!(send(&f.app, r).await.0, StatusCode::FORBIDDEN);
    assert!(!stored(&f).exists());
}

#[tokio::test]
async fn cookies_of_a_domain_not_configured_are_refused_naming_the_domain_not_the_value() {
    let f = fixture("domain");
    for domain in ["bank.example", "example.com", "wiki.example.com.evil.example"] {
        let (status, _, text) = send(
            &f.app,
            request(
                "POST",
                "/browser/cookies",
                Some(ORIGIN),
                Some(&f.code),
                cookies_body(domain, "valuevalue"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{domain}: {text}");
        assert!(text.contains(domain) && !text.contains("valuevalue"), "{text}");
    }
    // A credential that is not a browser session.
    let body = cookies_body("wiki.example.com", "v").replace("\"wiki\"", "\"other\"");
    let (status, _, text) = send(
        &f.app,
        request("POST", "/browser/cookies", Some(ORIGIN), Some(&f.code), body),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    assert!(!stored(&f).exists());
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let f = fixture("size");
    let body = cookies_body("wiki.example.com", &"x".repeat(MAX_BODY));
    let (status, _, _) = send(
        &f.app,
        request("POST", "/browser/cookies", Some(ORIGIN), Some(&f.code), body),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!stored(&f).exists());
}

#[tokio::test]
async fn the_page_names_the_code_file_but_never_shows_the_code() {
    let f = fixture("page");
    let (status, _, page) = send(&f.app, request("GET", "/browser", None, None, String::new())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("browser-extension/pairing-code"), "{page}");
    assert!(page.contains("wiki.example.com"), "{page}");
    assert!(!page.contains(&f.code), "the page shows the code");
}

#[tokio::test]
async fn the_sidecar_proves_it_holds_the_code_to_the_extension_only() {
    let f = fixture("hello");
    let hello = |origin: Option<&'static str>, nonce: &str| {
        let mut r = request("GET", "/browser/hello", origin, None, String::new());
        r.headers_mut()
            .insert(NONCE_HEADER, HeaderValue::from_str(nonce).unwrap());
        r
    };
    let nonce = "a-fresh-random-nonce-0123456789";
    let (status, headers, body) = send(&f.app, hello(Some(ORIGIN), nonce)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    let proof: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        proof["proof"],
        browser::sidecar_proof(&SecretString::new(f.code.trim()), nonce)
    );
    assert!(!body.contains(f.code.trim()));
    // Not for a web page, and not without a usable challenge.
    let (status, headers, _) = send(&f.app, hello(Some("https://evil.example"), nonce)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("access-control-allow-origin").is_none());
    for bad in ["short", "not base64url: spaces and more spaces"] {
        assert_eq!(
            send(&f.app, hello(Some(ORIGIN), bad)).await.0,
            StatusCode::BAD_REQUEST
        );
    }
}

//! Browser sessions end to end, every part real: Debian's Chromium (headless, new mode) with the
//! unpacked extension of `extension/` loaded and driven through Playwright (tests/browser/
//! extension.py); a small site with a login form, a sign-out link and an MCP endpoint from the
//! official Rust SDK that wants the site's session cookie; the standalone sidecar with a
//! `session.browser` credential. The person signs in in the browser and pairs the extension, agents
//! call tools; the person signs out, the sidecar says to sign in again; they sign in again, and the
//! calls work again without anyone touching the sidecar.

mod e2e_support;
mod operator_support;

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
};

use axum::{
    Form, Router,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};
use e2e_support::*;
use mcp_credentials_e2e::{
    credential::{Credential, Session},
    repo_root,
};
use operator_support::wait_for;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};

const NAME: &str = "wiki";

/// The site's live sessions (the values of its `sid` cookies).
type Sessions = Arc<Mutex<HashSet<String>>>;

fn session_of(headers: &HeaderMap, sessions: &Sessions) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    let sid = cookies
        .split(';')
        .filter_map(|c| c.trim().strip_prefix("sid="))
        .find(|s| sessions.lock().unwrap().contains(*s))?;
    Some(sid.to_owned())
}

#[derive(serde::Deserialize)]
struct Login {
    user: String,
    password: String,
}

/// The site, at `http://localhost:<port>`: `/` (a login form, or "Signed in as" with a sign-out
/// link), `POST /login`, `/logout`, `/me` (200 with a live session, 401 without: the liveness
/// check) and `/mcp`, which answers only requests with a live session.
async fn site() -> String {
    let sessions: Sessions = Arc::default();
    let tools = Tools::default();
    let config = StreamableHttpServerConfig::default().with_allowed_hosts(["localhost", "127.0.0.1"]);
    let mcp: StreamableHttpService<Tools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    async fn gate(State(sessions): State<Sessions>, request: Request, next: Next) -> Response {
        match session_of(request.headers(), &sessions) {
            Some(_) => next.run(request).await,
            None => (StatusCode::UNAUTHORIZED, "sign in first").into_response(),
        }
    }
    let mcp = Router::new()
        .nest_service("/mcp", mcp)
        .layer(axum::middleware::from_fn_with_state(sessions.clone(), gate));
    let app = Router::new()
        .route(
            "/",
            get(|State(s): State<Sessions>, headers: HeaderMap| async move {
                Html(match session_of(&headers, &s) {
                    Some(_) => "<p>Signed in as alice. <a href=/logout>Sign out</a></p>".to_owned(),
                    None => {
                        "<form method=post action=/login><input name=user><input name=password type=password>\
                             <button type=submit>Sign in</button></form>"
                            .to_owned()
                    }
                })
            }),
        )
        .route(
            "/login",
            axum::routing::post(|State(s): State<Sessions>, Form(login): Form<Login>| async move {
                if login.user != "alice" || login.password != "correct horse" {
                    return (StatusCode::UNAUTHORIZED, "wrong password").into_response();
                }
                let sid = format!("{:032x}", rand_u128());
                s.lock().unwrap().insert(sid.clone());
                (
                    [(
                        header::SET_COOKIE,
                        format!("sid={sid}; Path=/; HttpOnly; Max-Age=3600"),
                    )],
                    Redirect::to("/"),
                )
                    .into_response()
            }),
        )
        .route(
            "/logout",
            get(|State(s): State<Sessions>, headers: HeaderMap| async move {
                if let Some(sid) = session_of(&headers, &s) {
                    s.lock().unwrap().remove(&sid);
                }
                (
                    [(header::SET_COOKIE, "sid=; Path=/; Max-Age=0")],
                    Redirect::to("/"),
                )
            }),
        )
        .route(
            "/me",
            get(|State(s): State<Sessions>, headers: HeaderMap| async move {
                match session_of(&headers, &s) {
                    Some(_) => StatusCode::OK,
                    None => StatusCode::UNAUTHORIZED,
                }
            }),
        )
        .with_state(sessions)
        .merge(mcp);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://localhost:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A random session id (the site's own; the test needs no strong randomness, only distinct ids).
fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    (u128::from(h.finish()) << 64)
        | u128::from(
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        )
}

/// The person's browser: tests/browser/extension.py, one command at a time.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    /// The browser with the test build of the extension (granted access to the site), or with
    /// the extension `as_shipped` (access to no site).
    fn start(site: &str, dir: &Path, as_shipped: bool) -> Self {
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/browser/extension.py"))
            .args(as_shipped.then_some("--as-shipped"))
            .arg(site)
            .arg(repo_root().join("extension"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file(dir, "browser"))
            .spawn()
            .expect("start tests/browser/extension.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, stdout }
    }

    /// Runs `command`; its answer after "ok " (the test fails on an error).
    fn run(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let verb = command.split(' ').next().unwrap_or_default();
        match line.trim_end().strip_prefix("ok") {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("the browser could not {verb}: {line:?} (see browser.log in the run folder)"),
        }
    }
}

impl Browser {
    /// Opens the popup until its site line says `state` (120 s at most).
    fn popup_until(&mut self, state: &str) -> String {
        let start = std::time::Instant::now();
        loop {
            let popup = self.run("popup");
            if popup.contains(state) {
                return popup;
            }
            assert!(
                start.elapsed() < operator_support::TIMEOUT,
                "the popup never said {state}: {popup}"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A few tool calls in a new MCP session through the sidecar.
async fn calls_succeed(sidecar: &Standalone) -> Result<(), String> {
    let session = connect(&sidecar.url).await?;
    for a in 0..3 {
        call_sum(&session, a).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_signs_in_in_their_browser_and_agents_use_that_session_until_they_sign_out() {
    let dir = run_dir("browser-session");
    let site = site().await;
    let file = dir.join("credentials.yaml");
    std::fs::write(
        &file,
        Credential::new(
            NAME,
            &format!("{site}/mcp"),
            Session::browser().check(&format!("{site}/me"), None, "2s"),
        )
        .yaml(),
    )
    .unwrap();
    let secrets: PathBuf = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let sidecar = Standalone::start(NAME, &file, &secrets, &dir);
    let site_name = site.trim_start_matches("http://");

    // Before anything: agents are told to sign in, in the browser.
    let (_, body) = wait_for("the sidecar to ask for a sign-in in the browser", || async {
        let (status, body) = sidecar.post().await?;
        (status == 503 && body["lastFailure"].as_str()?.contains("in your browser")).then_some((status, body))
    })
    .await;
    let failure = body["lastFailure"].as_str().unwrap();
    assert!(failure.contains(&format!("sign in to {site_name}")), "{failure}");
    let code_file = secrets.join("browser-extension/pairing-code");
    let code = std::fs::read_to_string(&code_file).unwrap();
    let page = reqwest::get(format!("{}/browser", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&code_file.display().to_string()) && !page.contains(code.trim()),
        "{page}"
    );

    // As shipped, the extension reads no site until the person allows it: paired, it lists the
    // site the sidecar needs with a button asking for access, and has sent nothing.
    let stored = secrets.join(format!("{NAME}-browser/cookies.json"));
    {
        let mut shipped = Browser::start(&site, &dir, true);
        assert_eq!(shipped.run("sign-in"), "signed in");
        let popup = shipped.run(&format!("pair {} {}", sidecar.admin, code.trim()));
        assert!(
            popup.contains("no access yet") && popup.contains(&format!("Allow access to {site_name}")),
            "{popup}"
        );
        assert!(
            !stored.exists(),
            "cookies were sent without the site's permission"
        );
    }

    // The person signs in to the site and pairs the extension once.
    let mut browser = Browser::start(&site, &dir, false);
    assert_eq!(browser.run("sign-in"), "signed in");
    let popup = browser.run(&format!("pair {} {}", sidecar.admin, code.trim()));
    assert!(popup.contains(site_name), "{popup}");
    wait_for("agents to call tools with the browser's session", || async {
        calls_succeed(&sidecar).await.ok()
    })
    .await;
    let popup = browser.popup_until("live");
    assert!(popup.contains("Open"), "{popup}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // The person signs out in the browser: the sidecar stops serving that session and says why.
    assert_eq!(browser.run("sign-out"), "signed out");
    let (_, body) = wait_for("the sidecar to report the signed-out session", || async {
        let (status, body) = sidecar.post().await?;
        (status == 503).then_some((status, body))
    })
    .await;
    let failure = body["lastFailure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("signed out")
            && failure.contains(&format!("sign in to {site_name} in your browser")),
        "{body}"
    );
    // The status page says it too, for the person looking at the sidecar.
    let status = reqwest::get(format!("{}/status", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains(&format!("sign in to {site_name} in your browser"))
            && status.contains("href=\"/browser\""),
        "{status}"
    );
    let popup = browser.popup_until("signed out");
    assert!(popup.contains("Sign in again"), "{popup}");

    // Signing in again in the browser is all it takes: nobody touches the sidecar.
    assert_eq!(browser.run("sign-in"), "signed in");
    wait_for("agents to call tools with the new session", || async {
        calls_succeed(&sidecar).await.ok()
    })
    .await;

    // No cookie value in the sidecar's log, the status page or the browser page.
    let sid = std::fs::read_to_string(&stored).unwrap();
    let sid: serde_json::Value = serde_json::from_str(&sid).unwrap();
    let value = sid[0]["value"].as_str().unwrap().to_owned();
    let status = reqwest::get(format!("{}/status", sidecar.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!status.contains(&value));
    drop(browser);
    drop(sidecar);
    assert_no_secrets_in_logs(&[dir.join("logs/sidecar.log")], &[value, code.trim().to_owned()]);
}

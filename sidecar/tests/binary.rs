//! The real binary: configured by environment with a credentials directory (a projected Secret
//! volume), ready once the credential loads, picks up a rewritten credential, and exits cleanly on
//! SIGTERM. Waits poll for a condition; none asserts on time.

use std::{
    process::{Child, Command},
    time::Duration,
};

use axum::Router;
use http::HeaderMap;

/// The sidecar process, killed if a test fails before it exits.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting for {what}");
}

/// The real binary serving one credential `demo` (X-API-Key `key-1`) for `upstream` from a
/// credentials directory named after `tag`, with `env` added; returns once `/readyz` answers 200.
async fn start(tag: &str, upstream: &str, env: &[(&str, &str)]) -> Sidecar {
    let dir = std::env::temp_dir().join(format!("mcp-sidecar-{tag}-{}", std::process::id()));
    let cred = dir.join("demo");
    std::fs::create_dir_all(&cred).unwrap();
    std::fs::write(cred.join("upstream"), upstream).unwrap();
    std::fs::write(cred.join("header.X-API-Key"), "key-1").unwrap();
    std::fs::write(cred.join("version"), "1").unwrap();

    let (proxy, admin) = (free_port(), free_port());
    let process = Process(
        Command::new(env!("CARGO_BIN_EXE_mcp-credentials-sidecar"))
            .env("MCP_SIDECAR_LISTEN", format!("127.0.0.1:{proxy}"))
            .env("MCP_SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("MCP_SIDECAR_CREDENTIALS", "demo")
            .env("MCP_SIDECAR_CREDENTIALS_DIR", &dir)
            .envs(env.iter().copied())
            .spawn()
            .unwrap(),
    );
    until("/readyz", async || {
        get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .is_some_and(|r| r.0 == 200)
    })
    .await;
    Sidecar {
        process,
        dir,
        proxy,
        admin,
    }
}

struct Sidecar {
    process: Process,
    /// The credentials directory (`demo/` inside).
    dir: std::path::PathBuf,
    proxy: u16,
    admin: u16,
}

/// GET `url`: the status and body, `None` when the request fails.
async fn get(url: String) -> Option<(u16, String)> {
    match reqwest::get(url).await {
        Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
        Err(_) => None,
    }
}

#[tokio::test]
async fn the_binary_serves_a_credentials_directory_reloads_it_and_stops_on_sigterm() {
    let app = Router::new().fallback(|headers: HeaderMap| async move {
        headers
            .get("x-api-key")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // A second worker thread: the first agent connection is dealt to it.
    let Sidecar {
        mut process,
        dir,
        proxy,
        admin,
    } = start("binary", &upstream, &[("MCP_SIDECAR_WORKER_THREADS", "2")]).await;
    let cred = dir.join("demo");
    assert_eq!(
        get(format!("http://127.0.0.1:{proxy}/demo/x")).await,
        Some((200, "key-1".into()))
    );

    std::fs::write(cred.join("header.X-API-Key"), "key-2").unwrap();
    std::fs::write(cred.join("version"), "2").unwrap();
    until("the rewritten credential", async || {
        get(format!("http://127.0.0.1:{proxy}/demo/x")).await == Some((200, "key-2".into()))
    })
    .await;
    let metrics = get(format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().1;
    assert!(metrics.contains(r#"mcp_credentials_sidecar_requests_total{credential="demo",status="200"}"#));
    assert!(
        !metrics.contains("key-1") && !metrics.contains("key-2"),
        "no credential in metrics"
    );

    let status = Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || process.0.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whether the sidecar closes `tcp` while the test trickles `trickle` into it one byte at a time
/// (then nothing). Gives up after a minute: far above the test's 1 s timeout, so only a sidecar that
/// never closes fails.
async fn closed_while_trickling(mut tcp: tokio::net::TcpStream, trickle: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0; 1024];
    let mut bytes = trickle.iter();
    let trickling = async {
        loop {
            tokio::select! {
                read = tcp.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    // The sidecar answers nothing to a partial head: only its close ends this.
                    Ok(n) => panic!("unexpected answer: {:?}", String::from_utf8_lossy(&buf[..n])),
                },
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Some(byte) = bytes.next()
                        && tcp.write_all(&[*byte]).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), trickling)
        .await
        .is_ok()
}

#[tokio::test]
async fn the_binary_closes_connections_that_trickle_a_request_head_and_keeps_serving_others() {
    let app = Router::new().fallback(|| async { "ok" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let Sidecar {
        process: _process,
        dir,
        proxy,
        ..
    } = start("loris", &upstream, &[("MCP_SIDECAR_HEADER_READ_TIMEOUT", "1s")]).await;

    let connect = async || {
        tokio::net::TcpStream::connect(("127.0.0.1", proxy))
            .await
            .unwrap()
    };
    // A head that never ends, one byte every 200 ms (over 30 s: far beyond the timeout), and a
    // connection that sends nothing at all.
    let head = format!(
        "GET /demo/x HTTP/1.1\r\nHost: 127.0.0.1:{proxy}\r\n{}",
        "X-A: b\r\n".repeat(20)
    );
    let slow = tokio::spawn(closed_while_trickling(connect().await, head.into_bytes().leak()));
    let silent = tokio::spawn(closed_while_trickling(connect().await, b""));
    // Meanwhile other connections are served.
    assert_eq!(
        get(format!("http://127.0.0.1:{proxy}/demo/x")).await,
        Some((200, "ok".into()))
    );
    assert!(
        slow.await.unwrap(),
        "the trickling connection is still open after a minute"
    );
    assert!(
        silent.await.unwrap(),
        "the silent connection is still open after a minute"
    );
    assert_eq!(
        get(format!("http://127.0.0.1:{proxy}/demo/x")).await,
        Some((200, "ok".into()))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Standalone mode, SIGTERM while a refresh-token request is unanswered (the authorization server
/// has spent the old token by then): the process waits for the answer, saves the rotated refresh
/// token, then exits. Stopped at once, it left the spent token on disk and the grant was lost.
#[tokio::test]
async fn sigterm_in_standalone_mode_waits_for_a_rotating_token_request_and_saves_its_answer() {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };
    let requests = Arc::new(AtomicU32::new(0));
    let counted = requests.clone();
    let app = Router::new().route(
        "/token",
        axum::routing::post(move || async move {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            // The first answer comes late: long enough for the test to stop the process meanwhile.
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            axum::Json(serde_json::json!({
                "access_token": format!("at-{n}"), "token_type": "Bearer",
                "expires_in": 3600, "refresh_token": format!("rt-{}", n + 1),
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = std::env::temp_dir().join(format!("mcp-sidecar-sigterm-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("login")).unwrap();
    std::fs::write(dir.join("login/refresh-token"), "rt-1").unwrap();
    let file = dir.join("creds.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {{name: api}}\n\
             spec:\n  upstream: http://127.0.0.1:9/mcp\n  source:\n    oauth2:\n      grant: refreshToken\n      \
             tokenUrl: {token_url}\n      clientId: c\n      refreshToken: {{name: login, key: refresh-token}}\n"
        ),
    )
    .unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let mut process = Process(
        Command::new(env!("CARGO_BIN_EXE_mcp-credentials-sidecar"))
            .args(["standalone".as_ref(), file.as_os_str(), dir.as_os_str()])
            .env("MCP_SIDECAR_LISTEN", format!("127.0.0.1:{proxy}"))
            .env("MCP_SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    until("the token request", async || requests.load(Ordering::SeqCst) == 1).await;
    let status = Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let child = std::mem::replace(&mut process.0, Command::new("true").spawn().unwrap());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{log}", output.status);
    assert_eq!(
        std::fs::read_to_string(dir.join("login/refresh-token")).unwrap(),
        "rt-2",
        "the rotated refresh token is on disk\n{log}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    assert!(!log.contains("rt-2"), "no refresh token in the log");
    std::fs::remove_dir_all(&dir).unwrap();
}

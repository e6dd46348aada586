//! The legacy HTTP+SSE transport (2024-11-05) through the sidecar, with the official Python SDK on
//! both sides (`pip install mcp uvicorn`): the server behind an API-key check announces
//! `/messages/?session_id=...` in its `endpoint` event; the sidecar rewrites it so the client's
//! follow-up POSTs come back through the sidecar and carry the credential.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

mod common;

/// The Python server, killed when dropped.
struct PythonServer {
    child: Child,
    port: u16,
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn script(name: &str) -> String {
    format!("{}/tests/legacy_sse/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn python_server(key: &str) -> PythonServer {
    let mut child = Command::new("python3")
        .arg(script("server.py"))
        .arg(key)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (the test needs `pip install mcp uvicorn`)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("server.py printed no port ({line:?}); is the Python `mcp` package installed?")
    });
    PythonServer { child, port }
}

#[tokio::test]
async fn the_python_sdks_legacy_sse_client_and_server_work_through_the_sidecar() {
    let server = python_server("legacy-key");
    let sidecar = common::sidecar(
        "legacy",
        &format!("http://127.0.0.1:{}", server.port),
        "legacy-key",
    )
    .await;

    // The endpoint event points back through the sidecar.
    let mut stream = reqwest::Client::new()
        .get(format!("{}/legacy/sse", sidecar.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Bounded, so a sidecar that held the event back fails the test instead of hanging it.
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), stream.chunk()).await;
    let first = String::from_utf8(
        chunk
            .expect("the endpoint event arrives")
            .unwrap()
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(first.contains("event: endpoint"), "{first}");
    assert!(first.contains("data: /legacy/messages/?session_id="), "{first}");
    drop(stream);

    // The SDK client, sending a wrong key of its own, calls a tool through the sidecar.
    let url = format!("{}/legacy/sse", sidecar.url);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["60", "python3"])
            .arg(script("client.py"))
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "client.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "legacy hello");
}

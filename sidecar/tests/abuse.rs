//! The real sidecar binary under abuse: thousands of idle and half-sent connections to its admin and
//! probe listeners, and a 50 MB SSE event from an upstream. Each must leave the process within a
//! 64 MiB pod's memory (its peak resident size, `VmHWM`), let a normal request through, and end what
//! it must end cleanly. Waits poll for an outcome with generous deadlines; nothing asserts on time.

use std::{
    process::{Child, Command},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The injected sidecar's memory limit.
const MEMORY_LIMIT: u64 = 64 << 20;

/// The sidecar process, killed when the test ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// The peak resident set size so far, in bytes (`VmHWM` in `/proc/<pid>/status`).
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib << 10
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Sidecar {
    process: Process,
    proxy: u16,
    admin: u16,
    probe: u16,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real binary serving credential `demo` for `upstream`, with `env` added; returns once
/// `/readyz` answers 200 on the probe listener.
async fn start(tag: &str, upstream: &str, env: &[(&str, &str)]) -> Sidecar {
    let dir = std::env::temp_dir().join(format!("mcp-sidecar-abuse-{tag}-{}", std::process::id()));
    let cred = dir.join("demo");
    std::fs::create_dir_all(&cred).unwrap();
    std::fs::write(cred.join("upstream"), upstream).unwrap();
    std::fs::write(cred.join("header.X-API-Key"), "key-1").unwrap();
    std::fs::write(cred.join("version"), "1").unwrap();
    let (proxy, admin, probe) = (free_port(), free_port(), free_port());
    let process = Process(
        Command::new(env!("CARGO_BIN_EXE_mcp-credentials-sidecar"))
            .env("MCP_SIDECAR_LISTEN", format!("127.0.0.1:{proxy}"))
            .env("MCP_SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("MCP_SIDECAR_PROBE_LISTEN", format!("127.0.0.1:{probe}"))
            .env("MCP_SIDECAR_CREDENTIALS", "demo")
            .env("MCP_SIDECAR_CREDENTIALS_DIR", &dir)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .spawn()
            .unwrap(),
    );
    for _ in 0..600 {
        if get(probe, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return Sidecar {
                process,
                proxy,
                admin,
                probe,
                _dir: TempDir(dir),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sidecar never became ready");
}

/// A one-request GET on a new connection; the whole answer, or `None` when it fails.
async fn get(port: u16, path: &str) -> Option<String> {
    let request = async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.ok()?;
        Some(String::from_utf8_lossy(&answer).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .ok()
        .flatten()
}

/// Opens `n` connections to `port`: every other one sends half a request head, the rest nothing.
async fn flood(port: u16, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        if i % 2 == 1 {
            let _ = tcp
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await;
        }
        conns.push(tcp);
    }
    conns
}

/// Whether the server has closed `tcp` (end of stream or reset) within the deadline.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0; 1024];
    let wait = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                // An answer (a 408, or the connection limit's): keep reading until it closes.
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .unwrap_or(false)
}

#[tokio::test]
async fn thousands_of_idle_and_half_sent_connections_leave_probes_working_and_memory_bounded() {
    let sidecar = start(
        "flood",
        "http://127.0.0.1:9",
        &[("MCP_SIDECAR_ADMIN_HEADER_READ_TIMEOUT", "3s")],
    )
    .await;
    let mut conns = flood(sidecar.admin, 2500).await;
    conns.extend(flood(sidecar.probe, 2500).await);
    // While all of them are open, a normal request on each listener is answered.
    let ready = get(sidecar.probe, "/readyz")
        .await
        .expect("the probe listener answers");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = get(sidecar.admin, "/metrics")
        .await
        .expect("the admin listener answers");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    // Every flood connection is closed by the sidecar: at the cap, or after the header timeout.
    let mut open = 0;
    for tcp in &mut conns {
        if !closed_by_server(tcp).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "connections the sidecar never closed");
    let peak = sidecar.process.peak_rss();
    eprintln!("peak RSS after 5,000 idle connections: {} KiB", peak >> 10);
    assert!(peak < MEMORY_LIMIT, "peak RSS {peak} bytes");
    let ready = get(sidecar.probe, "/readyz")
        .await
        .expect("the probe listener answers");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
}

/// An upstream answering every GET with an event stream: `small` events, then one event of
/// `big` bytes, written until the sidecar stops reading.
async fn sse_upstream(small: usize, big: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out = String::from(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
                );
                for i in 0..small {
                    out.push_str(&format!("id: {i}\ndata: {{\"n\":{i}}}\n\n"));
                }
                out.push_str("data: ");
                if tcp.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![b'x'; 64 << 10];
                let mut sent = 0;
                while sent < big {
                    if tcp.write_all(&piece).await.is_err() {
                        return;
                    }
                    sent += piece.len();
                }
                let _ = tcp.write_all(b"\n\n").await;
            });
        }
    });
    url
}

/// A GET of an event stream through the sidecar; the decoded body (chunked) to its end.
async fn stream(port: u16) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "GET /demo/sse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(120), tcp.read_to_end(&mut raw)).await;
    read.expect("the stream ends")
        .expect("the stream ends without an error");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // Chunked decoding; the terminating chunk must be there (a clean end, not a cut connection).
    let (mut body, mut rest) = (Vec::new(), &raw[split..]);
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap().trim(), 16).unwrap();
        rest = &rest[line + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    String::from_utf8(body).unwrap()
}

async fn a_50_mb_event_ends_the_stream_cleanly_within_the_memory_limit(fast_path: &str) {
    let small: String = (0..200)
        .map(|i| format!("id: {i}\ndata: {{\"n\":{i}}}\n\n"))
        .collect();
    let upstream = sse_upstream(200, 50_000_000).await;
    let sidecar = start(
        &format!("sse-{fast_path}"),
        &upstream,
        &[("MCP_SIDECAR_HTTP1_FAST_PATH", fast_path)],
    )
    .await;
    let body = stream(sidecar.proxy).await;
    assert!(
        body.len() < 1 << 20,
        "the big event reached the agent: {} bytes",
        body.len()
    );
    assert!(body.starts_with(&small), "the small events changed");
    assert!(
        body.ends_with("(MCP_SIDECAR_MAX_SSE_EVENT_BYTES)\n\n"),
        "{:?}",
        &body[small.len().min(body.len())..]
    );
    let peak = sidecar.process.peak_rss();
    eprintln!(
        "peak RSS after a 50 MB event (fast path {fast_path}): {} KiB",
        peak >> 10
    );
    assert!(peak < MEMORY_LIMIT, "peak RSS {peak} bytes");
    let metrics = get(sidecar.admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("mcp_credentials_sidecar_sse_events_too_large_total{credential=\"demo\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_50_mb_sse_event_on_the_fast_path_ends_the_stream_within_the_memory_limit() {
    a_50_mb_event_ends_the_stream_cleanly_within_the_memory_limit("true").await;
}

#[tokio::test]
async fn a_50_mb_sse_event_on_the_hyper_path_ends_the_stream_within_the_memory_limit() {
    a_50_mb_event_ends_the_stream_cleanly_within_the_memory_limit("false").await;
}

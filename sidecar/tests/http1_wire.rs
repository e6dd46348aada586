//! The HTTP/1.1 wire behaviour of the agent listener, pinned black-box with raw TCP on both sides, so
//! it holds whichever code parses the agent's requests (hyper, or a hand-written fast path).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

mod common;

/// Every read and write is bounded by this: a hang fails the test instead of blocking it. Generous,
/// because the machine is shared; no test measures time.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A request or response head as it came off the wire.
#[derive(Debug)]
struct Head {
    /// The request line or the status line.
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name`, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    /// Whether the comma-separated header `name` lists `token` (`Connection: close`).
    fn lists(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn method(&self) -> &str {
        self.start.split(' ').next().unwrap()
    }

    fn target(&self) -> &str {
        self.start.split(' ').nth(1).expect("a request line has a target")
    }

    fn status(&self) -> u16 {
        assert!(
            self.start.starts_with("HTTP/1.1 ") || self.start.starts_with("HTTP/1.0 "),
            "not a status line: {:?}",
            self.start
        );
        self.start[9..12].parse().expect("a status code")
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length")
            .map(|v| v.parse().expect("a numeric Content-Length"))
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
enum Framing {
    Length(usize),
    Chunked,
    /// Up to the end of the connection.
    Close,
    Done,
}

impl Framing {
    fn of_request(head: &Head) -> Framing {
        if head.lists("transfer-encoding", "chunked") {
            Framing::Chunked
        } else {
            Framing::Length(head.content_length().unwrap_or(0))
        }
    }

    /// `method` is the request's: the answer to HEAD has no body whatever its headers say.
    fn of_response(head: &Head, method: &str) -> Framing {
        let status = head.status();
        if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Done
        } else if head.lists("transfer-encoding", "chunked") {
            Framing::Chunked
        } else if let Some(n) = head.content_length() {
            Framing::Length(n)
        } else {
            Framing::Close
        }
    }
}

/// A response as the agent read it.
struct Response {
    head: Head,
    body: Vec<u8>,
    /// The body ran to the end of the connection.
    close_delimited: bool,
}

impl Response {
    fn status(&self) -> u16 {
        self.head.status()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("a JSON body: {:?}", self.text()))
    }
}

/// One end of a raw TCP connection, read with a buffer.
struct Wire(BufReader<TcpStream>);

impl Wire {
    fn new(tcp: TcpStream) -> Wire {
        Wire(BufReader::new(tcp))
    }

    /// Connects to `http://127.0.0.1:<port>`.
    async fn connect(url: &str) -> Wire {
        let addr = url.strip_prefix("http://").unwrap();
        Wire::new(within("a connection", TcpStream::connect(addr)).await.unwrap())
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("a write", self.0.get_mut().write_all(bytes.as_ref()))
            .await
            .unwrap();
    }

    /// One line without its CRLF; the connection must not end before it.
    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        let n = within("a line", self.0.read_until(b'\n', &mut line))
            .await
            .unwrap();
        assert!(n > 0, "the connection closed where a line was expected");
        String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    /// A head, or `None` when the connection ends (EOF or reset) before its first byte.
    async fn head(&mut self) -> Option<Head> {
        let mut lines: Vec<String> = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = match within("a head", self.0.read_until(b'\n', &mut line)).await {
                Ok(n) => n,
                Err(_) if lines.is_empty() => 0,
                Err(e) => panic!("the connection failed inside a head: {e}"),
            };
            if n == 0 {
                assert!(lines.is_empty(), "the connection closed inside a head: {lines:?}");
                return None;
            }
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if line.is_empty() {
                break;
            }
            lines.push(line);
        }
        let start = lines.remove(0);
        let headers = lines
            .iter()
            .map(|l| {
                let (name, value) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("a header line: {l:?}"));
                (name.trim().to_owned(), value.trim().to_owned())
            })
            .collect();
        Some(Head { start, headers })
    }

    /// The next piece of a body as it arrives (a chunk's data, or what one read returned); `None`
    /// at its end.
    async fn piece(&mut self, framing: &mut Framing) -> Option<Vec<u8>> {
        match framing {
            Framing::Done | Framing::Length(0) => None,
            Framing::Length(left) => {
                let mut buf = vec![0; (*left).min(16384)];
                let n = within("a body", self.0.read(&mut buf)).await.unwrap();
                assert!(
                    n > 0,
                    "the connection closed {left} bytes before the end of the body"
                );
                *left -= n;
                buf.truncate(n);
                Some(buf)
            }
            Framing::Chunked => {
                let size = self.line().await;
                // A chunk extension (`;name=value`) is allowed and ignored.
                let size = size.split(';').next().unwrap().trim();
                let size =
                    usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("a chunk size: {size:?}"));
                if size == 0 {
                    // Trailer fields, up to the blank line.
                    while !self.line().await.is_empty() {}
                    *framing = Framing::Done;
                    return None;
                }
                let mut data = vec![0; size + 2];
                within("a chunk", self.0.read_exact(&mut data)).await.unwrap();
                assert!(data.ends_with(b"\r\n"), "a chunk's data ends with CRLF");
                data.truncate(size);
                Some(data)
            }
            Framing::Close => {
                let mut buf = vec![0; 16384];
                let n = within("a body", self.0.read(&mut buf)).await.unwrap();
                if n == 0 {
                    *framing = Framing::Done;
                    return None;
                }
                buf.truncate(n);
                Some(buf)
            }
        }
    }

    async fn body(&mut self, mut framing: Framing) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(piece) = self.piece(&mut framing).await {
            body.extend_from_slice(&piece);
        }
        body
    }

    /// The agent side: the response to a request with `method` (an interim 1xx is a response too).
    async fn response(&mut self, method: &str) -> Response {
        let head = self.head().await.expect("a response, not a closed connection");
        let framing = Framing::of_response(&head, method);
        let close_delimited = matches!(framing, Framing::Close);
        let body = self.body(framing).await;
        Response {
            head,
            body,
            close_delimited,
        }
    }

    /// The upstream side: the next request and its body, or `None` when the connection ends. Like a
    /// server, it answers `Expect: 100-continue` before reading the body.
    async fn request(&mut self) -> Option<(Head, Vec<u8>)> {
        // An idle keep-alive connection may wait for its next request as long as the sidecar likes;
        // the test's own bounded reads catch a request that never comes.
        match self.0.fill_buf().await {
            Ok(buffered) if !buffered.is_empty() => {}
            _ => return None,
        }
        let head = self.head().await?;
        if head.lists("expect", "100-continue") {
            self.send("HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let body = self.body(Framing::of_request(&head)).await;
        Some((head, body))
    }

    /// Whether the peer closed the connection: a read returns EOF or an error (a reset).
    async fn closed(&mut self) -> bool {
        let mut byte = [0];
        match within("the connection to close", self.0.read(&mut byte)).await {
            Ok(0) | Err(_) => true,
            Ok(_) => false,
        }
    }
}

/// The scripted upstream's listener and the URL the sidecar reaches it by: itself, or, in the tests
/// run against an HTTPS upstream, a TLS front (HTTP/1.1 by ALPN, a test CA the sidecar trusts) that
/// opens one connection to it per TLS connection and passes bytes and closes through both ways, so
/// everything the scripted upstream sees and does reaches the sidecar the same way over TLS.
async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain = listener.local_addr().unwrap();
    if !over_tls() {
        return (listener, format!("http://{plain}"));
    }
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", front.local_addr().unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(test_tls().server.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = front.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut inner) = TcpStream::connect(plain).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut inner).await;
            });
        }
    });
    (listener, url)
}

tokio::task_local! {
    /// Set by the `over_tls` test modules: the scripted upstreams are reached over HTTPS.
    static OVER_TLS: bool;
}

fn over_tls() -> bool {
    OVER_TLS.try_with(|tls| *tls).unwrap_or(false)
}

/// The test CA's certificate file (for the sidecar) and the upstream's TLS configuration.
struct TestTls {
    ca_file: std::path::PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn test_tls() -> &'static TestTls {
    static TLS: std::sync::OnceLock<TestTls> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let ca_file = std::env::temp_dir().join(format!("mcp-sidecar-wire-ca-{}.pem", std::process::id()));
        std::fs::write(&ca_file, certified.cert.pem()).unwrap();
        let mut server =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![rustls_pki_types::CertificateDer::from(
                        certified.cert.der().to_vec(),
                    )],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
                )
                .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        TestTls {
            ca_file,
            server: Arc::new(server),
        }
    })
}

/// A request as the scripted upstream read it, with the number of its upstream connection (from 1).
struct Received {
    connection: usize,
    head: Head,
    body: Vec<u8>,
}

/// What the scripted upstream writes back, and whether it then closes the connection.
struct Reply {
    bytes: Vec<u8>,
    close: bool,
}

fn reply(bytes: impl Into<Vec<u8>>) -> Reply {
    Reply {
        bytes: bytes.into(),
        close: false,
    }
}

/// A 200 answer with a Content-Length body.
fn ok(body: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// One chunk of a chunked body.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// An upstream that answers every request with `answer`, recording what it read.
struct Upstream {
    url: String,
    accepted: Arc<AtomicUsize>,
    received: mpsc::UnboundedReceiver<Received>,
}

impl Upstream {
    async fn start(answer: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Upstream {
        let (listener, url) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let (record, received) = mpsc::unbounded_channel();
        let answer = Arc::new(answer);
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let connection = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let (answer, record) = (answer.clone(), record.clone());
                tokio::spawn(async move {
                    let mut wire = Wire::new(tcp);
                    while let Some((head, body)) = wire.request().await {
                        let received = Received {
                            connection,
                            head,
                            body,
                        };
                        let Reply { bytes, close } = answer(&received);
                        // Recorded before answering: once the agent has the answer, the record is there.
                        let _ = record.send(received);
                        if wire.0.get_mut().write_all(&bytes).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            url,
            accepted,
            received,
        }
    }

    /// `host:port`, what the upstream's Host must say.
    fn authority(&self) -> &str {
        self.url.split_once("://").unwrap().1
    }

    async fn next(&mut self) -> Received {
        within("a request at the upstream", self.received.recv())
            .await
            .expect("the upstream runs")
    }

    fn nothing_more(&mut self) {
        if let Ok(r) = self.received.try_recv() {
            panic!("the upstream received {:?}", r.head.start);
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An upstream answering `200` with the request target as its body.
async fn echo_target() -> Upstream {
    Upstream::start(|r| reply(ok(r.head.target()))).await
}

/// An upstream answering a POST with its body, and anything else like [`echo_target`].
async fn echo_body() -> Upstream {
    Upstream::start(|r| match r.head.method() {
        "POST" => reply(ok(&String::from_utf8_lossy(&r.body))),
        _ => reply(ok(r.head.target())),
    })
    .await
}

/// `127.0.0.1:<port>` of the sidecar, for the agent's Host.
fn host(sidecar: &common::Sidecar) -> &str {
    sidecar.url.strip_prefix("http://").unwrap()
}

fn get(sidecar: &common::Sidecar, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", host(sidecar))
}

fn post(sidecar: &common::Sidecar, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        host(sidecar),
        body.len()
    )
}

/// Sends a GET on `agent` and asserts that the upstream's `200` with the target as body comes back.
async fn get_works(agent: &mut Wire, sidecar: &common::Sidecar, path: &str) {
    agent.send(get(sidecar, &format!("/demo{path}"))).await;
    let response = agent.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.text());
    assert_eq!(response.text(), path);
}

async fn a_request_reaches_the_upstream_with_the_credential_in_place_of_the_agents(fast_path: bool) {
    let mut upstream = Upstream::start(|_| {
        reply(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Upstream: yes\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\n\r\nhello",
        )
    })
    .await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent
        .send(format!(
            "GET /demo/mcp/tools?cursor=a%20b&x=1 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer agent-token\r\n\
             Cookie: session=agent\r\nX-Api-Key: agent\r\nMcp-Session-Id: session-1\r\nMcp-Method: tools/list\r\n\
             Connection: X-Private\r\nX-Private: hop\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Authorization: Basic YWdlbnQ=\r\n\r\n",
            host(&sidecar)
        ))
        .await;
    let response = agent.response("GET").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text(), "hello");
    assert_eq!(response.head.get("x-upstream"), Some("yes"));
    // The upstream's hop-by-hop headers describe its connection to the sidecar, not the agent's.
    assert_eq!(response.head.get("x-hop"), None);
    assert_eq!(response.head.get("keep-alive"), None);
    assert!(!response.head.lists("connection", "x-hop"));

    let request = upstream.next().await;
    assert_eq!(request.head.start, "GET /mcp/tools?cursor=a%20b&x=1 HTTP/1.1");
    assert_eq!(request.head.all("host"), [upstream.authority()]);
    assert_eq!(request.head.all("x-api-key"), ["key"]);
    assert_eq!(request.head.all("mcp-session-id"), ["session-1"]);
    assert_eq!(request.head.all("mcp-method"), ["tools/list"]);
    for gone in [
        "authorization",
        "cookie",
        "x-private",
        "keep-alive",
        "proxy-authorization",
    ] {
        assert!(request.head.all(gone).is_empty(), "{gone} reached the upstream");
    }
    assert!(!request.head.lists("connection", "x-private"));
}

async fn requests_on_one_keep_alive_agent_connection_share_one_upstream_connection(fast_path: bool) {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    for i in 0..3 {
        get_works(&mut agent, &sidecar, &format!("/call/{i}")).await;
    }
    for i in 0..3 {
        let request = upstream.next().await;
        assert_eq!(request.head.target(), format!("/call/{i}"));
        assert_eq!(request.connection, 1);
    }
    assert_eq!(upstream.accepted(), 1);
}

async fn a_chunked_answer_arrives_whole_and_the_connections_stay_usable(fast_path: bool) {
    // Three chunks, one with an extension, one with an upper-case size.
    let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5;note=first\r\nhello\r\nA\r\n, chunked \r\n6\r\nworld!\r\n0\r\n\r\n";
    let (text, connections) = one_answer_then_next(fast_path, answer, false).await;
    assert_eq!(text, "hello, chunked world!");
    // The last chunk ended the answer: the upstream connection was reused, not read to its end.
    assert_eq!(connections, (1, 1));
}

async fn a_close_delimited_answer_reaches_the_agent_complete(fast_path: bool) {
    // Large enough to take many reads on both sides.
    let payload: String = (0..20_000).map(|i| format!("{i},")).collect();
    let answer = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n{payload}");
    let upstream = Upstream::start(move |r| match r.head.target() {
        "/until-close" => Reply {
            bytes: answer.clone().into_bytes(),
            close: true,
        },
        target => reply(ok(target)),
    })
    .await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent.send(get(&sidecar, "/demo/until-close")).await;
    let response = agent.response("GET").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.body == payload.as_bytes(),
        "{} of {} bytes",
        response.body.len(),
        payload.len()
    );
    // Re-framed (chunked) instead of closing: then the agent connection must go on working.
    if !response.close_delimited {
        get_works(&mut agent, &sidecar, "/next").await;
    }
}

async fn answers_without_a_body_leave_the_agent_connection_in_step(fast_path: bool) {
    let upstream = Upstream::start(|r| match r.head.target() {
        "/head" => reply("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"),
        "/no-content" => reply("HTTP/1.1 204 No Content\r\n\r\n"),
        // A 304 may carry the Content-Length of the representation; it still has no body.
        "/not-modified" => reply("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 10\r\n\r\n"),
        target => reply(ok(target)),
    })
    .await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;

    agent
        .send(format!(
            "HEAD /demo/head HTTP/1.1\r\nHost: {}\r\n\r\n",
            host(&sidecar)
        ))
        .await;
    let head = agent.response("HEAD").await;
    assert_eq!(head.status(), 200);
    // Any Content-Length is the one a GET would have had (RFC 9110 §9.3.2).
    assert!(
        matches!(head.head.content_length(), None | Some(1234)),
        "{:?}",
        head.head
    );
    // Had body bytes followed, this next answer would not start with a status line.
    get_works(&mut agent, &sidecar, "/after-head").await;

    agent.send(get(&sidecar, "/demo/no-content")).await;
    assert_eq!(agent.response("GET").await.status(), 204);
    get_works(&mut agent, &sidecar, "/after-204").await;

    agent.send(get(&sidecar, "/demo/not-modified")).await;
    let not_modified = agent.response("GET").await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.head.get("etag"), Some("\"v1\""));
    get_works(&mut agent, &sidecar, "/after-304").await;
}

async fn a_get_after_the_upstream_closed_its_idle_connection_goes_out_on_a_new_one(fast_path: bool) {
    let (listener, url) = listen().await;
    let (closed, upstream_closed) = oneshot::channel();
    let upstream = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut first = Wire::new(tcp);
        let (head, _) = first.request().await.unwrap();
        assert_eq!(head.target(), "/first");
        // A keep-alive answer (no `Connection: close`), then the connection closes while idle.
        first.send(ok("/first")).await;
        drop(first);
        closed.send(()).unwrap();
        let (tcp, _) = within("a second upstream connection", listener.accept())
            .await
            .unwrap();
        let mut second = Wire::new(tcp);
        let (head, _) = second.request().await.unwrap();
        second.send(ok(head.target())).await;
        head.start
    });
    let sidecar = sidecar(&url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    get_works(&mut agent, &sidecar, "/first").await;
    within("the upstream to close", upstream_closed).await.unwrap();
    // The FIN is in flight: give the sidecar a moment to see it, as it would between real requests.
    // (A GET written while the FIN is in flight: see the fast path's own test below.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    get_works(&mut agent, &sidecar, "/second").await;
    assert_eq!(upstream.await.unwrap(), "GET /second HTTP/1.1");
}

async fn an_upstream_connection_close_ends_only_the_upstream_connection(fast_path: bool) {
    let answer = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok";
    let (text, connections) = one_answer_then_next(fast_path, answer, true).await;
    assert_eq!(text, "ok");
    assert_eq!(connections, (1, 2));
}

/// The upstream answers `GET /special` with `answer` (then closes if `close`) and echoes the rest;
/// the agent sends that GET and then `/next` on one connection, which must work. Returns the first
/// answer's body and the upstream connections the two requests went out on.
async fn one_answer_then_next(
    fast_path: bool,
    answer: &'static str,
    close: bool,
) -> (String, (usize, usize)) {
    let mut upstream = Upstream::start(move |r| match r.head.target() {
        "/special" => Reply {
            bytes: answer.as_bytes().to_vec(),
            close,
        },
        target => reply(ok(target)),
    })
    .await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent.send(get(&sidecar, "/demo/special")).await;
    let response = agent.response("GET").await;
    assert_eq!(response.status(), 200);
    get_works(&mut agent, &sidecar, "/next").await;
    let first = upstream.next().await.connection;
    (response.text(), (first, upstream.next().await.connection))
}

async fn pipelined_requests_are_answered_in_order(fast_path: bool) {
    let upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent
        .send(get(&sidecar, "/demo/first") + &get(&sidecar, "/demo/second"))
        .await;
    for path in ["/first", "/second"] {
        let response = agent.response("GET").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text(), path);
    }
}

async fn a_pipelined_post_body_ends_where_its_content_length_says(fast_path: bool) {
    let mut upstream = echo_body().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    // The GET after the body must be read as a request, not as more body.
    let body = r#"{"jsonrpc":"2.0","id":1}"#;
    agent
        .send(post(&sidecar, "/demo/mcp", body) + &get(&sidecar, "/demo/after"))
        .await;
    let first = agent.response("POST").await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.text(), body);
    let second = agent.response("GET").await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.text(), "/after");
    assert_eq!(upstream.next().await.body, body.as_bytes());
    assert_eq!(upstream.next().await.head.start, "GET /after HTTP/1.1");
}

async fn a_body_just_under_one_mebibyte_goes_through_whole_and_the_connection_goes_on(fast_path: bool) {
    let mut upstream = echo_body().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    // The largest body that is still kept for a replay, written in pieces as a slow client would.
    let body: String = (0..(1 << 20) - 10)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let request = post(&sidecar, "/demo/big", &body);
    for piece in request.as_bytes().chunks(100_000) {
        agent.send(piece).await;
    }
    let answer = agent.response("POST").await;
    assert_eq!(answer.status(), 200);
    assert!(answer.text() == body, "the body came back changed");
    assert_eq!(upstream.next().await.body.len(), body.len());
    get_works(&mut agent, &sidecar, "/after").await;
}

async fn an_agent_connection_close_is_honoured_after_the_answer(fast_path: bool) {
    let upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent
        .send(format!(
            "GET /demo/only HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            host(&sidecar)
        ))
        .await;
    let response = agent.response("GET").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text(), "/only");
    assert!(agent.closed().await, "the sidecar kept the connection open");
}

async fn an_event_stream_answer_to_a_post_is_forwarded_event_by_event(fast_path: bool) {
    let (listener, url) = listen().await;
    let (release, released) = oneshot::channel::<()>();
    let upstream = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut wire = Wire::new(tcp);
        let (head, body) = wire.request().await.unwrap();
        wire.send(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
                .to_owned()
                + &chunk("event: message\ndata: one\n\n"),
        )
        .await;
        // The second event waits until the agent has seen the first.
        within("the test to release the second event", released)
            .await
            .unwrap();
        wire.send(chunk("event: message\ndata: two\n\n") + "0\r\n\r\n")
            .await;
        (head, body)
    });
    let sidecar = sidecar(&url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#;
    agent.send(post(&sidecar, "/demo/mcp", call)).await;
    let head = agent.head().await.expect("a response");
    assert_eq!(head.status(), 200);
    assert_eq!(head.get("content-type"), Some("text/event-stream"));
    let mut framing = Framing::of_response(&head, "POST");
    let mut seen = Vec::new();
    while !seen.ends_with(b"\n\n") {
        let piece = agent.piece(&mut framing).await;
        seen.extend(piece.expect("the first event before the end of the stream"));
    }
    assert_eq!(String::from_utf8_lossy(&seen), "event: message\ndata: one\n\n");
    release.send(()).unwrap();
    seen.extend(agent.body(framing).await);
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "event: message\ndata: one\n\nevent: message\ndata: two\n\n"
    );
    let (head, body) = upstream.await.unwrap();
    assert_eq!(head.start, "POST /mcp HTTP/1.1");
    assert_eq!(body, call.as_bytes());
}

async fn an_agent_that_goes_away_closes_the_upstream_connection_of_its_request(fast_path: bool) {
    let (listener, url) = listen().await;
    let (requested, upstream_requested) = oneshot::channel();
    let upstream = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut wire = Wire::new(tcp);
        wire.request().await.unwrap();
        requested.send(()).unwrap();
        // Never answers: only the sidecar can end this connection.
        wire.closed().await
    });
    let sidecar = sidecar(&url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent.send(post(&sidecar, "/demo/mcp", r#"{"id":1}"#)).await;
    within("the request at the upstream", upstream_requested)
        .await
        .unwrap();
    drop(agent);
    assert!(
        upstream.await.unwrap(),
        "the upstream connection carried data instead of closing"
    );
}

async fn a_malformed_upstream_answer_gives_the_agent_a_502_and_the_next_request_works(fast_path: bool) {
    let mut upstream = Upstream::start(|r| match r.connection {
        1 => reply("garbage\r\n\r\n"),
        _ => reply(ok(r.head.target())),
    })
    .await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent.send(get(&sidecar, "/demo/broken")).await;
    let response = agent.response("GET").await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.head.get("content-type"), Some("application/json"));
    assert_eq!(response.json()["error"], "upstream_unreachable");
    assert_eq!(response.json()["credential"], "demo");
    if response.head.lists("connection", "close") {
        agent = Wire::connect(&sidecar.url).await;
    }
    get_works(&mut agent, &sidecar, "/after").await;
    assert_eq!(upstream.next().await.head.target(), "/broken");
    // Never again on the connection that sent garbage.
    assert_eq!(upstream.next().await.connection, 2);
}

async fn refused_requests_never_reach_the_upstream(fast_path: bool) {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let host = host(&sidecar);
    let cases = [
        (
            format!("GET http://evil.example/x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            400,
            "not_a_forward_proxy",
        ),
        (
            "GET /demo/x HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_owned(),
            403,
            "foreign_host",
        ),
        (
            format!("GET /nope/x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            404,
            "unknown_credential",
        ),
        (
            format!("GET /demo/../x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            400,
            "bad_path",
        ),
        (
            format!("GET /demo/a%2fb HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            400,
            "bad_path",
        ),
    ];
    let mut valid = 0;
    for (request, status, error) in cases {
        let mut agent = Wire::connect(&sidecar.url).await;
        agent.send(&request).await;
        let response = agent.response("GET").await;
        assert_eq!(response.status(), status, "{request:?}");
        assert_eq!(response.json()["error"], error, "{request:?}");
        assert_eq!(response.head.get("x-mcp-credentials-error"), Some(error));
        if status == 404 {
            assert_eq!(response.json()["credentials"], json!(["demo"]));
            assert!(
                !response.head.lists("connection", "close"),
                "a 404 ends no connection"
            );
        }
        // Each refused request was complete and well framed: the connection goes on unless the
        // sidecar said otherwise.
        if !response.head.lists("connection", "close") {
            get_works(&mut agent, &sidecar, "/valid").await;
            valid += 1;
        }
    }
    for _ in 0..valid {
        assert_eq!(upstream.next().await.head.target(), "/valid");
    }
    upstream.nothing_more();
}

async fn a_chunked_request_body_reaches_the_upstream_complete(fast_path: bool) {
    let mut upstream = echo_body().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent
        .send(format!(
            "POST /demo/mcp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{}3;part=2\r\n\"2.\r\n{}0\r\n\r\n",
            host(&sidecar),
            chunk(r#"{"jsonrpc":"#),
            chunk(r#"0","id":1}"#)
        ))
        .await;
    let response = agent.response("POST").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text(), r#"{"jsonrpc":"2.0","id":1}"#);
    let request = upstream.next().await;
    assert_eq!(request.head.method(), "POST");
    assert_eq!(request.body, br#"{"jsonrpc":"2.0","id":1}"#);
    get_works(&mut agent, &sidecar, "/next").await;
}

async fn a_request_expecting_100_continue_gets_it_and_its_body_reaches_the_upstream(fast_path: bool) {
    let mut upstream = echo_body().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    let body = r#"{"jsonrpc":"2.0","id":1}"#;
    agent
        .send(format!(
            "POST /demo/mcp HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\n\r\n",
            host(&sidecar),
            body.len()
        ))
        .await;
    // The body goes only after the go-ahead (RFC 9110 §10.1.1: the server must send it, or answer).
    assert_eq!(agent.response("POST").await.status(), 100);
    agent.send(body).await;
    let response = agent.response("POST").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text(), body);
    assert_eq!(upstream.next().await.body, body.as_bytes());
    get_works(&mut agent, &sidecar, "/next").await;
}

async fn a_legacy_sse_endpoint_event_is_rewritten_and_its_posts_get_through(fast_path: bool) {
    let (listener, url) = listen().await;
    let upstream = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = Wire::new(tcp);
        let (get, _) = stream.request().await.unwrap();
        stream
            .send(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_owned()
                    + &chunk("event: endpoint\ndata: /messages/?session_id=1\n\n"),
            )
            .await;
        let (tcp, _) = within("the POST's upstream connection", listener.accept())
            .await
            .unwrap();
        let mut messages = Wire::new(tcp);
        let (post, body) = messages.request().await.unwrap();
        messages
            .send("HTTP/1.1 202 Accepted\r\nContent-Length: 8\r\n\r\nAccepted")
            .await;
        // The legacy transport answers on the stream.
        stream
            .send(chunk("event: message\ndata: {\"id\":1}\n\n") + "0\r\n\r\n")
            .await;
        (get, post, body)
    });
    // The credential sits at the upstream's root, where the endpoint's path is.
    let sidecar = sidecar(&url, fast_path).await;
    let mut stream = Wire::connect(&sidecar.url).await;
    stream
        .send(format!(
            "GET /demo/sse HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            host(&sidecar)
        ))
        .await;
    let head = stream.head().await.expect("a response");
    assert_eq!(head.status(), 200);
    let mut framing = Framing::of_response(&head, "GET");
    let mut events = Vec::new();
    while !events.ends_with(b"\n\n") {
        let piece = stream.piece(&mut framing).await;
        events.extend(piece.expect("the endpoint event before the end of the stream"));
    }
    assert_eq!(
        String::from_utf8_lossy(&events),
        "event: endpoint\ndata: /demo/messages/?session_id=1\n\n"
    );

    let mut agent = Wire::connect(&sidecar.url).await;
    agent
        .send(post(&sidecar, "/demo/messages/?session_id=1", r#"{"id":1}"#))
        .await;
    let response = agent.response("POST").await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.text(), "Accepted");
    events.extend(stream.body(framing).await);
    assert!(
        events.ends_with(b"event: message\ndata: {\"id\":1}\n\n"),
        "{}",
        String::from_utf8_lossy(&events)
    );

    let (get, post, body) = upstream.await.unwrap();
    assert_eq!(get.start, "GET /sse HTTP/1.1");
    assert_eq!(post.start, "POST /messages/?session_id=1 HTTP/1.1");
    assert_eq!(post.all("x-api-key"), ["key"]);
    assert_eq!(body, br#"{"id":1}"#);
}

async fn oversized_request_headers_are_refused_before_the_upstream(fast_path: bool) {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    let big = "a".repeat(70 * 1024);
    // A sidecar may stop reading and close while this is still being written.
    let _ = within(
        "the oversized request to be written",
        agent.0.get_mut().write_all(
            format!(
                "GET /demo/big HTTP/1.1\r\nHost: {}\r\nX-Big: {big}\r\n\r\n",
                host(&sidecar)
            )
            .as_bytes(),
        ),
    )
    .await;
    // Closing without an answer is allowed too, as long as nothing was forwarded.
    if let Some(head) = agent.head().await {
        assert_eq!(head.status(), 431, "{head:?}");
        let body = agent.body(Framing::of_response(&head, "GET")).await;
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "headers_too_large");
    }
    // The upstream is there, and saw nothing but this.
    let mut agent = Wire::connect(&sidecar.url).await;
    get_works(&mut agent, &sidecar, "/small").await;
    assert_eq!(upstream.next().await.head.target(), "/small");
    upstream.nothing_more();
}

/// The fast path resends an idempotent request once when a reused upstream connection closes before
/// answering (RFC 9112 §9.3.1): here the upstream closes right after the request arrives, the race a
/// keep-alive close can lose. (The hyper path's client answers 502 in this case.)
#[tokio::test]
async fn the_fast_path_resends_a_get_whose_reused_connection_closed_unanswered() {
    let (listener, url) = listen().await;
    let upstream = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut first = Wire::new(tcp);
        let (head, _) = first.request().await.unwrap();
        first.send(ok(head.target())).await;
        // The next request arrives, and the connection closes without an answer.
        let (head, _) = first.request().await.unwrap();
        assert_eq!(head.target(), "/second");
        drop(first);
        let (tcp, _) = within("a second upstream connection", listener.accept())
            .await
            .unwrap();
        let mut second = Wire::new(tcp);
        let (head, _) = second.request().await.unwrap();
        second.send(ok(head.target())).await;
        head.start
    });
    let sidecar = sidecar(&url, true).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    get_works(&mut agent, &sidecar, "/first").await;
    get_works(&mut agent, &sidecar, "/second").await;
    assert_eq!(upstream.await.unwrap(), "GET /second HTTP/1.1");
}

/// An agent speaking HTTP/2 with prior knowledge: the fast path hands its preface to hyper, which
/// serves the connection (and the upstream still gets HTTP/1.1 with the credential).
#[tokio::test]
async fn an_http2_agent_connection_is_served_by_the_hyper_path() {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, true).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..2 {
        let response = within(
            "an HTTP/2 answer",
            client.get(format!("{}/demo/h2?x=1", sidecar.url)).send(),
        )
        .await
        .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "/h2?x=1");
        let received = upstream.next().await;
        assert_eq!(received.head.start, "GET /h2?x=1 HTTP/1.1");
        assert_eq!(received.head.get("x-api-key"), Some("key"));
    }
    assert_eq!(
        handoffs(&sidecar).get("not_http1"),
        Some(&1),
        "{:?}",
        handoffs(&sidecar)
    );
}

/// `http1_handoffs_total` by reason, from the sidecar's metrics.
fn handoffs(sidecar: &common::Sidecar) -> std::collections::BTreeMap<String, u64> {
    let text = sidecar.metrics.render(&sidecar.store);
    text.lines()
        .filter_map(|l| l.strip_prefix("mcp_credentials_sidecar_http1_handoffs_total{reason=\""))
        .map(|l| {
            let (reason, count) = l.split_once("\"} ").unwrap();
            (reason.to_owned(), count.parse().unwrap())
        })
        .collect()
}

/// An HTTPS upstream that speaks HTTP/1.1 is served on the fast path, over its own TLS connection:
/// nothing is handed to hyper, and the agent connection's requests share one upstream connection.
#[tokio::test]
async fn an_https_upstream_speaking_http1_stays_on_the_fast_path() {
    OVER_TLS
        .scope(true, async {
            let mut upstream = echo_target().await;
            assert!(upstream.url.starts_with("https://"));
            let sidecar = sidecar(&upstream.url, true).await;
            let mut agent = Wire::connect(&sidecar.url).await;
            for i in 0..3 {
                get_works(&mut agent, &sidecar, &format!("/tls/{i}")).await;
                assert_eq!(upstream.next().await.connection, 1);
            }
            assert_eq!(upstream.accepted(), 1);
            assert!(handoffs(&sidecar).is_empty(), "{:?}", handoffs(&sidecar));
        })
        .await
}

/// Ordinary requests stay on the fast path; each kind the fast path leaves to hyper is handed over
/// with its reason, and hyper then answers it and the connection's later requests.
#[tokio::test]
async fn ordinary_requests_stay_on_the_fast_path_and_the_rest_is_handed_over_by_reason() {
    let upstream = echo_body().await;
    let sidecar = sidecar(&upstream.url, true).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    for _ in 0..3 {
        get_works(&mut agent, &sidecar, "/x?a=1").await;
        agent.send(post(&sidecar, "/demo/mcp", "{}")).await;
        assert_eq!(agent.response("POST").await.text(), "{}");
        // A GET for an event stream too (the legacy endpoint rewrite runs on the fast path).
        agent
            .send(format!(
                "GET /demo/sse HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
                host(&sidecar)
            ))
            .await;
        assert_eq!(agent.response("GET").await.text(), "/sse");
    }
    assert!(handoffs(&sidecar).is_empty(), "{:?}", handoffs(&sidecar));
    let h = host(&sidecar);
    for (request, reason) in [
        (
            format!("GET /nope/x HTTP/1.1\r\nHost: {h}\r\n\r\n"),
            "unknown_credential",
        ),
        (
            format!("GET http://evil.example/x HTTP/1.1\r\nHost: {h}\r\n\r\n"),
            "request_target",
        ),
        (
            "GET /demo/x HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_owned(),
            "request_header",
        ),
        (format!("GET /demo/x HTTP/1.0\r\nHost: {h}\r\n\r\n"), "not_http1"),
        (
            format!("POST /demo/x HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            "request_header",
        ),
        (
            format!("GET /demo/x HTTP/1.1\r\nHost: {h}\r\nConnection: keep-alive, X-Private\r\n\r\n"),
            "connection_header",
        ),
    ] {
        let before = handoffs(&sidecar).get(reason).copied().unwrap_or(0);
        let mut agent = Wire::connect(&sidecar.url).await;
        agent.send(&request).await;
        let answer = agent.response("GET").await;
        assert!(answer.status() > 0, "{request:?}");
        assert_eq!(
            handoffs(&sidecar).get(reason).copied().unwrap_or(0),
            before + 1,
            "{request:?}: {:?}",
            handoffs(&sidecar)
        );
        // hyper now serves this connection, ordinary requests included (HTTP/1.0 closed it).
        if !request.contains("HTTP/1.0") && answer.status() != 400 {
            get_works(&mut agent, &sidecar, "/after").await;
        }
    }
}

/// A sidecar serving `demo` (an API key) and `session` (a session cookie) for `upstream`.
async fn sidecar_with_a_session(upstream: &str, fast_path: bool) -> common::Sidecar {
    let store = mcp_credentials_sidecar::store::Store::new(["demo".to_owned(), "session".to_owned()]);
    store.set("demo", common::credential(upstream, "key", "1", None));
    let session =
        mcp_credentials_sidecar::credential::Credential::from_data(&std::collections::BTreeMap::from([
            ("upstream".to_owned(), upstream.as_bytes().to_vec()),
            ("header.Cookie".to_owned(), b"sid=session-secret".to_vec()),
            ("version".to_owned(), b"1".to_vec()),
        ]))
        .unwrap();
    store.set("session", session);
    let ca = over_tls().then(|| test_tls().ca_file.clone());
    common::sidecar_trusting(store, fast_path, ca).await
}

async fn an_upstreams_cookies_never_reach_the_agent_whatever_the_credential(fast_path: bool) {
    // The upstream sets a cookie holding the credential it received (a rolling session, or a session
    // cookie handed out after bearer auth), in every spelling, on ordinary and event-stream answers.
    let mut upstream = Upstream::start(|r| {
        let received = r.head.get("x-api-key").or(r.head.get("cookie")).unwrap_or("none");
        let (kind, body) = match r.head.target() {
            "/sse" => ("text/event-stream", "data: 1\n\n"),
            _ => ("text/plain", "hello"),
        };
        reply(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nSet-Cookie: sid={received}; Path=/; HttpOnly\r\n\
             set-cookie: other=1\r\nSET-COOKIE2: sid={received}\r\nX-Upstream: yes\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    })
    .await;
    let sidecar = sidecar_with_a_session(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    for (path, secret) in [
        ("/demo/x", "key"),
        ("/session/x", "sid=session-secret"),
        ("/demo/sse", "key"),
        ("/session/sse", "sid=session-secret"),
    ] {
        agent
            .send(format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream, text/plain\r\n\r\n",
                host(&sidecar)
            ))
            .await;
        let response = agent.response("GET").await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.head.get("x-upstream"), Some("yes"), "{path}");
        for name in ["set-cookie", "set-cookie2"] {
            assert!(
                response.head.all(name).is_empty(),
                "{path}: {name} reached the agent"
            );
        }
        assert!(
            !response.head.headers.iter().any(|(_, v)| v.contains(secret)),
            "{path}: the credential reached the agent: {:?}",
            response.head
        );
        assert_eq!(
            upstream.next().await.head.target(),
            &path[path[1..].find('/').unwrap() + 1..]
        );
    }
}

async fn a_null_origin_and_cross_site_browser_requests_are_refused(fast_path: bool) {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let h = host(&sidecar);
    for (headers, method, error) in [
        ("Origin: null\r\n", "GET", "null_origin"),
        (
            "Origin: null\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n",
            "POST",
            "null_origin",
        ),
        (
            "Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\n",
            "GET",
            "cross_site_request",
        ),
        (
            "Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\n",
            "GET",
            "cross_site_request",
        ),
    ] {
        let body = if method == "POST" { "{}" } else { "" };
        let request = format!("{method} /demo/refused HTTP/1.1\r\nHost: {h}\r\n{headers}\r\n{body}");
        let mut agent = Wire::connect(&sidecar.url).await;
        agent.send(&request).await;
        let response = agent.response(method).await;
        assert_eq!(response.status(), 403, "{request:?}");
        assert_eq!(response.json()["error"], error, "{request:?}");
        assert!(response.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(response.head.get("x-mcp-credentials-error"), Some(error));
    }
    // A page served from this machine (cross-site to 127.0.0.1 when it is on localhost), requests no
    // other site made, and clients that are not browsers at all get through.
    for headers in [
        "Origin: http://localhost:3000\r\nSec-Fetch-Site: cross-site\r\n",
        "Sec-Fetch-Site: same-origin\r\n",
        "Sec-Fetch-Site: none\r\n",
        "",
    ] {
        let mut agent = Wire::connect(&sidecar.url).await;
        agent
            .send(format!(
                "GET /demo/allowed HTTP/1.1\r\nHost: {h}\r\n{headers}\r\n"
            ))
            .await;
        let response = agent.response("GET").await;
        assert_eq!(response.status(), 200, "{headers:?}: {}", response.text());
        assert_eq!(upstream.next().await.head.target(), "/allowed");
    }
    upstream.nothing_more();
}

async fn trace_and_track_are_refused_and_never_reach_the_upstream(fast_path: bool) {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    for method in ["TRACE", "TRACK", "trace"] {
        agent
            .send(format!(
                "{method} /demo/echo HTTP/1.1\r\nHost: {}\r\n\r\n",
                host(&sidecar)
            ))
            .await;
        let response = agent.response(method).await;
        assert_eq!(response.status(), 405, "{method}");
        assert_eq!(response.json()["error"], "method_not_allowed", "{method}");
        assert!(!response.text().contains("key"), "{method}: {}", response.text());
        if response.head.lists("connection", "close") {
            agent = Wire::connect(&sidecar.url).await;
        }
    }
    // The connection goes on, and only this GET reached the upstream.
    get_works(&mut agent, &sidecar, "/after").await;
    assert_eq!(upstream.next().await.head.start, "GET /after HTTP/1.1");
    upstream.nothing_more();
}

async fn dot_segments_in_disguise_and_double_encoding_are_refused(fast_path: bool) {
    let mut upstream = echo_target().await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    for path in [
        "/demo/..;/other",
        "/demo/..;jsessionid=1/other",
        "/demo/.;/x",
        "/demo/%2e%2e;/other",
        "/demo/..%3B/other",
        "/demo/%252e%252e/other",
        "/demo/a%252fb",
        "/demo/a%255cb",
        "/demo/%2e/x",
    ] {
        let mut agent = Wire::connect(&sidecar.url).await;
        agent.send(get(&sidecar, path)).await;
        let response = agent.response("GET").await;
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(response.json()["error"], "bad_path", "{path}");
    }
    // Path parameters and escapes that change no path still pass.
    let mut agent = Wire::connect(&sidecar.url).await;
    get_works(&mut agent, &sidecar, "/a;v=1/b%20c").await;
    assert_eq!(upstream.next().await.head.target(), "/a;v=1/b%20c");
    upstream.nothing_more();
}

async fn a_legacy_endpoint_event_that_leads_out_of_the_credentials_routes_is_dropped(fast_path: bool) {
    // A malicious (or broken) upstream names endpoints that an agent's client would resolve to
    // another credential's route, or to the sidecar's root.
    const ENDPOINTS: [&str; 5] = [
        "../other/messages",
        "/../other/messages",
        "/%2e%2e/other/messages",
        "http://127.0.0.1:7007/other/messages",
        "//localhost:7007/other/messages",
    ];
    let upstream = Upstream::start(|r| {
        let case: usize = r.head.target().rsplit('=').next().unwrap().parse().unwrap();
        let events = format!(
            "event: endpoint\ndata: {}\n\nevent: message\ndata: 1\n\n",
            ENDPOINTS[case]
        );
        reply(format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{events}",
            events.len()
        ))
    })
    .await;
    let sidecar = sidecar(&upstream.url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    for (case, endpoint) in ENDPOINTS.iter().enumerate() {
        agent
            .send(format!(
                "GET /demo/sse?case={case} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
                host(&sidecar)
            ))
            .await;
        let response = agent.response("GET").await;
        assert_eq!(response.status(), 200, "{endpoint}");
        let text = response.text();
        assert!(!text.contains("other"), "{endpoint}: {text:?}");
        assert!(!text.contains("event: endpoint"), "{endpoint}: {text:?}");
        // The rest of the stream passes.
        assert!(
            text.ends_with("event: message\ndata: 1\n\n"),
            "{endpoint}: {text:?}"
        );
    }
}

async fn a_replay_goes_to_the_newer_credentials_upstream_and_never_to_the_old_one(fast_path: bool) {
    // Upstream A rejects the credential; meanwhile the credential moves to upstream B.
    let mut a = Upstream::start(|_| {
        reply(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer error=\"invalid_token\"\r\n\
             Content-Length: 0\r\n\r\n",
        )
    })
    .await;
    let mut b = echo_body().await;
    let sidecar = sidecar(&a.url, fast_path).await;
    let store = sidecar.store.clone();
    let b_url = b.url.clone();
    let mut requests = store.refresh_requests();
    tokio::spawn(async move {
        while let Ok(request) = requests.recv().await {
            store.set(&request.name, common::credential(&b_url, "key-2", "2", None));
        }
    });
    let mut agent = Wire::connect(&sidecar.url).await;
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    agent.send(post(&sidecar, "/demo/mcp?x=1", call)).await;
    let response = agent.response("POST").await;
    assert_eq!(response.status(), 200, "{}", response.text());
    assert_eq!(response.text(), call);
    let first = a.next().await;
    assert_eq!(first.head.all("x-api-key"), ["key"]);
    let replayed = b.next().await;
    assert_eq!(replayed.head.start, "POST /mcp?x=1 HTTP/1.1");
    assert_eq!(replayed.head.all("host"), [b.authority()]);
    assert_eq!(replayed.head.all("x-api-key"), ["key-2"]);
    assert_eq!(replayed.body, call.as_bytes());
    // The old upstream never saw the new credential, and the connection goes on with the new one.
    a.nothing_more();
    get_works(&mut agent, &sidecar, "/after").await;
    assert_eq!(b.next().await.head.all("x-api-key"), ["key-2"]);
    a.nothing_more();
}

/// A sidecar serving credential `demo` for `upstream` with `X-API-Key: key`, on the fast path or
/// with every request on hyper's path.
async fn sidecar(upstream: &str, fast_path: bool) -> common::Sidecar {
    let store = mcp_credentials_sidecar::store::Store::new(["demo".to_owned()]);
    store.set("demo", common::credential(upstream, "key", "1", None));
    let ca = over_tls().then(|| test_tls().ca_file.clone());
    common::sidecar_trusting(store, fast_path, ca).await
}

/// Every test runs on both paths: the HTTP/1.1 fast path and the hyper path must agree on the wire.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod fast_path {
            $(#[tokio::test]
            async fn $name() {
                super::$name(true).await
            })*
        }
        mod hyper_path {
            $(#[tokio::test]
            async fn $name() {
                super::$name(false).await
            })*
        }
        /// The same against an HTTPS upstream speaking HTTP/1.1.
        mod over_tls {
            mod fast_path {
                $(#[tokio::test]
                async fn $name() {
                    crate::OVER_TLS.scope(true, crate::$name(true)).await
                })*
            }
            mod hyper_path {
                $(#[tokio::test]
                async fn $name() {
                    crate::OVER_TLS.scope(true, crate::$name(false)).await
                })*
            }
        }
    };
}

on_both_paths!(
    a_body_just_under_one_mebibyte_goes_through_whole_and_the_connection_goes_on,
    a_request_reaches_the_upstream_with_the_credential_in_place_of_the_agents,
    requests_on_one_keep_alive_agent_connection_share_one_upstream_connection,
    a_chunked_answer_arrives_whole_and_the_connections_stay_usable,
    a_close_delimited_answer_reaches_the_agent_complete,
    answers_without_a_body_leave_the_agent_connection_in_step,
    a_get_after_the_upstream_closed_its_idle_connection_goes_out_on_a_new_one,
    an_upstream_connection_close_ends_only_the_upstream_connection,
    pipelined_requests_are_answered_in_order,
    a_pipelined_post_body_ends_where_its_content_length_says,
    an_agent_connection_close_is_honoured_after_the_answer,
    an_event_stream_answer_to_a_post_is_forwarded_event_by_event,
    an_agent_that_goes_away_closes_the_upstream_connection_of_its_request,
    a_malformed_upstream_answer_gives_the_agent_a_502_and_the_next_request_works,
    refused_requests_never_reach_the_upstream,
    a_chunked_request_body_reaches_the_upstream_complete,
    a_request_expecting_100_continue_gets_it_and_its_body_reaches_the_upstream,
    a_legacy_sse_endpoint_event_is_rewritten_and_its_posts_get_through,
    oversized_request_headers_are_refused_before_the_upstream,
    an_upstreams_cookies_never_reach_the_agent_whatever_the_credential,
    a_null_origin_and_cross_site_browser_requests_are_refused,
    trace_and_track_are_refused_and_never_reach_the_upstream,
    dot_segments_in_disguise_and_double_encoding_are_refused,
    a_legacy_endpoint_event_that_leads_out_of_the_credentials_routes_is_dropped,
    a_replay_goes_to_the_newer_credentials_upstream_and_never_to_the_old_one,
);

/// A 50 MB event, far over the 1 MiB default limit, ends the stream: the agent gets every event
/// before it unchanged, a comment saying why, and a clean end of the chunked body (the connection
/// stays usable); none of the big event's bytes reach it, and the metric counts it.
async fn an_sse_event_over_the_limit_ends_the_stream_cleanly_after_the_small_events(fast_path: bool) {
    const SMALL: usize = 500;
    let small: String = (0..SMALL)
        .map(|i| format!("id: {i}\ndata: {{\"n\":{i}}}\n\n"))
        .collect();
    let (listener, url) = listen().await;
    let events = small.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let mut stream = Wire::new(tcp);
            let _ = stream.request().await.unwrap();
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
            let _ = stream.0.get_mut().write_all(head.as_bytes()).await;
            // The small events one chunk each, then one event of 50 MB in 64 KiB chunks.
            for event in events.split_inclusive("\n\n") {
                let _ = stream.0.get_mut().write_all(chunk(event).as_bytes()).await;
            }
            let big = chunk(&"x".repeat(64 << 10));
            let _ = stream.0.get_mut().write_all(chunk("data: ").as_bytes()).await;
            for _ in 0..(50_000_000 / (64 << 10)) {
                // The sidecar stops reading and closes this connection once the event is over the limit.
                if stream.0.get_mut().write_all(big.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        // Later requests: answered with their target.
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut wire = Wire::new(tcp);
                while let Some((head, _)) = wire.request().await {
                    let _ = wire.0.get_mut().write_all(ok(head.target()).as_bytes()).await;
                }
            });
        }
    });
    let sidecar = sidecar(&url, fast_path).await;
    let mut agent = Wire::connect(&sidecar.url).await;
    agent
        .send(format!(
            "GET /demo/sse HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            host(&sidecar)
        ))
        .await;
    let head = agent.head().await.expect("a response");
    assert_eq!(head.status(), 200);
    let body = agent.body(Framing::of_response(&head, "GET")).await;
    let text = String::from_utf8_lossy(&body);
    let comment = ": mcp-credentials: an event over 1048576 bytes was dropped and the stream ended \
                   (MCP_SIDECAR_MAX_SSE_EVENT_BYTES)\n\n";
    assert!(
        text.len() < 2 * small.len(),
        "the big event leaked: {} bytes",
        text.len()
    );
    assert_eq!(text, format!("{small}{comment}"));
    // The chunked body ended cleanly: the agent connection carries the next request.
    get_works(&mut agent, &sidecar, "/after").await;
    let rendered = sidecar.metrics.render(&sidecar.store);
    assert!(
        rendered.contains("mcp_credentials_sidecar_sse_events_too_large_total{credential=\"demo\"} 1"),
        "{rendered}"
    );
}

mod sse_limit {
    use super::*;

    on_both_paths!(an_sse_event_over_the_limit_ends_the_stream_cleanly_after_the_small_events);
}

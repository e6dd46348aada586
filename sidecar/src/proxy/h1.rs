//! The HTTP/1.1 fast path. An agent connection's ordinary requests are parsed with httparse and
//! forwarded as bytes on the connection's own upstream connection (plain TCP, or TLS speaking
//! HTTP/1.1, see [`super::own_io`]), and the
//! answer is streamed back as it arrives: no message types, header maps or tasks in between, which is
//! how nginx proxies too. The same steps run as on the hyper path (guard, route, strip, attach,
//! forward, measure), and the checks are the same functions.
//!
//! Everything else goes to the hyper path, which takes over the connection for good with the bytes
//! already read: HTTP/2, HTTP/1.0, every refusal (so its answer is the hyper path's, word for word),
//! request bodies that are chunked or over [`replay::MAX_BODY`], `Expect`, upgrades and other
//! hop-by-hop request headers, and HTTPS upstreams that speak only HTTP/2 (the shared pool).

use std::{mem::MaybeUninit, pin::Pin, sync::Arc, time::Duration};

use http::{
    StatusCode,
    uri::{Authority, Scheme},
};
use mcp_credentials_core::report::Rejection;
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    time::{Instant, Sleep},
};

use super::{
    Proxy, forward,
    guard::{self, is_loopback_authority},
    measure::{self, Handles},
    replay, route, sse,
    strip::{is_hop_by_hop_name, is_withheld_answer_header},
    tls::{Connected, OwnIo},
};
use crate::{credential::Credential, error::ProxyError};

/// Header lines parsed per message; hyper's limit too, so a request over it goes to hyper's refusal.
const MAX_HEADERS: usize = 100;
/// The largest upstream response head read (hyper's client reads up to about 400 KiB).
const MAX_RESPONSE_HEAD: usize = 256 << 10;
/// Chunked trailers larger than this end the exchange (they are passed through, not kept).
const MAX_TRAILERS: usize = 64 << 10;
/// Response body bytes copied behind the head for one write; larger ones go as a second buffer.
const COPY_BEHIND_HEAD: usize = 16 << 10;

/// How a connection left the fast path.
pub(crate) enum Exit {
    /// It is finished: closed by either side, timed out, or the sidecar is stopping.
    Closed,
    /// The hyper path takes over; `read` holds the bytes read and not answered yet.
    Hyper { tcp: TcpStream, read: Vec<u8> },
}

/// Serves `tcp` until it closes or a request needs the hyper path.
pub(crate) async fn serve(
    proxy: &Proxy,
    tcp: TcpStream,
    stop: &mut watch::Receiver<bool>,
    header_read_timeout: Duration,
) -> Exit {
    let now = Instant::now();
    let mut conn = Conn {
        proxy,
        agent: tcp,
        read: Vec::with_capacity(8 << 10),
        out: Vec::with_capacity(4 << 10),
        upstreams: Vec::new(),
        handles: None,
        head_since: now,
        timer: Box::pin(tokio::time::sleep_until(now + header_read_timeout)),
        header_read_timeout,
    };
    match conn.run(stop).await {
        Ok(()) | Err(End::Closed) => Exit::Closed,
        Err(End::Hyper(reason)) => {
            tracing::debug!(reason, "agent connection handed to the hyper path");
            proxy.metrics.http1_handoffs.with_label_values(&[reason]).inc();
            Exit::Hyper {
                tcp: conn.agent,
                read: conn.read,
            }
        }
    }
}

/// Why the request loop stopped.
enum End {
    Closed,
    Hyper(&'static str),
}

/// One agent connection on the fast path.
struct Conn<'p> {
    proxy: &'p Proxy,
    agent: TcpStream,
    /// Bytes read from the agent and not answered yet; the current request starts at 0.
    read: Vec<u8>,
    /// The head being written (to the upstream, then to the agent).
    out: Vec<u8>,
    /// Own connections to the plain-http upstreams this agent connection used, most recent last.
    upstreams: Vec<UpstreamConn>,
    /// The metric handles of the credential used last.
    handles: Option<Arc<Handles>>,
    /// When the wait for the current request head began (the header read timeout counts from here).
    head_since: Instant,
    /// Fires at or before `head_since + header_read_timeout`; re-armed only when it fires early, so
    /// a busy connection resets no timer per request.
    timer: Pin<Box<Sleep>>,
    header_read_timeout: Duration,
}

/// An agent connection's own connection to one upstream (plain TCP, or TLS speaking HTTP/1.1).
struct UpstreamConn {
    authority: Authority,
    https: bool,
    tcp: OwnIo,
    /// Bytes read from the upstream and not passed on yet.
    read: Vec<u8>,
    last_used: Instant,
}

/// A request the fast path forwards; its upstream head is in `Conn::out`.
struct Planned {
    head_len: usize,
    body_len: usize,
    credential: Arc<Credential>,
    handles: Arc<Handles>,
    /// A HEAD request: the answer has no body whatever its headers say.
    head_method: bool,
    /// Safe to send again when a reused upstream connection turns out to be closed (RFC 9110 §9.2.2).
    idempotent: bool,
    /// The agent asked to close the connection after this answer.
    close: bool,
    /// A GET that accepts an event stream: the upstream path it went to, against which a legacy
    /// `endpoint` event is resolved.
    sse_path: Option<String>,
}

enum Plan {
    /// The head is not complete yet.
    Partial,
    /// The hyper path answers this request, for this reason (a metric label).
    Hyper(&'static str),
    Forward(Planned),
}

impl Conn<'_> {
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), End> {
        loop {
            let planned = loop {
                match plan(self.proxy, self.handles.as_ref(), &self.read, None, &mut self.out) {
                    Plan::Forward(planned) => break planned,
                    Plan::Hyper(reason) => return Err(End::Hyper(reason)),
                    Plan::Partial => self.read_head_bytes(stop).await?,
                }
            };
            let length = planned.head_len + planned.body_len;
            while self.read.len() < length {
                self.read.reserve(length - self.read.len());
                match self.agent.read_buf(&mut self.read).await {
                    Ok(0) | Err(_) => return Err(End::Closed),
                    Ok(_) => {}
                }
            }
            let keep_open = self.exchange(&planned, stop).await?;
            self.read.drain(..length);
            // A large request body's buffer is not kept for the connection's life.
            if self.read.capacity() > 64 << 10 {
                self.read.shrink_to(8 << 10);
            }
            self.head_since = Instant::now();
            if !keep_open {
                return Ok(());
            }
        }
    }

    /// Waits for more bytes of a request head, within the header read timeout.
    async fn read_head_bytes(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), End> {
        let idle = self.read.is_empty();
        if idle && *stop.borrow() {
            return Err(End::Closed);
        }
        make_room(&mut self.read, 8 << 10);
        loop {
            tokio::select! {
                biased;
                read = self.agent.read_buf(&mut self.read) => return match read {
                    Ok(1..) => Ok(()),
                    Ok(0) | Err(_) => Err(End::Closed),
                },
                () = self.timer.as_mut() => {
                    let deadline = self.head_since + self.header_read_timeout;
                    if Instant::now() >= deadline {
                        tracing::debug!("agent connection sent no complete request head in time; closed");
                        return Err(End::Closed);
                    }
                    self.timer.as_mut().reset(deadline);
                }
                // Stopping: an idle connection closes now; one mid-head gets its answer first.
                Ok(()) = stop.changed(), if idle => if *stop.borrow() {
                    return Err(End::Closed);
                },
            }
        }
    }

    /// Forwards the planned request and streams the answer back. `Ok(false)`: close the connection.
    async fn exchange(&mut self, planned: &Planned, stop: &watch::Receiver<bool>) -> Result<bool, End> {
        let proxy = self.proxy;
        let handles = &planned.handles;
        self.handles = Some(handles.clone());
        let mut replayed = None;
        let started = Instant::now();
        let (mut up, mut answer) = match self.send(planned, started).await {
            Ok(sent) => sent,
            Err(Failed::AgentGone) => return Err(End::Closed),
            Err(Failed::Hyper(reason)) => return Err(End::Hyper(reason)),
            Err(Failed::Upstream(source)) => return self.refuse(planned, source).await,
        };
        handles.upstream_duration.observe(started.elapsed().as_secs_f64());
        if let Some(reason) = answer.rejection {
            proxy
                .metrics
                .upstream_rejections
                .with_label_values(&[&handles.name, reason.as_str()])
                .inc();
            if replay::worth_replaying(&proxy.store, &handles.name, reason)
                && let Some(newer) = Box::pin(replay::newer_credential(
                    &proxy.store,
                    &handles.name,
                    &planned.credential,
                    reason,
                    answer.challenged_scope.take(),
                ))
                .await
            {
                tracing::info!(credential = %handles.name, version = %newer.version, "replaying once with the new credential");
                // The rejected answer is not read to its end: that connection closes.
                drop(up);
                // The same request planned again with the newer credential: its headers, and its
                // upstream, which may have changed since the request was planned. One this path
                // cannot send (an HTTPS upstream now) goes to the hyper path, which sends it with
                // the current credential; nothing of the rejected answer has reached the agent.
                let again = match plan(proxy, Some(handles), &self.read, Some(&newer), &mut self.out) {
                    Plan::Forward(again) => replayed.insert(again),
                    Plan::Hyper(reason) => return Err(End::Hyper(reason)),
                    Plan::Partial => return Err(End::Closed),
                };
                (up, answer) = match Box::pin(self.send(again, Instant::now())).await {
                    Ok(sent) => sent,
                    Err(Failed::AgentGone) => return Err(End::Closed),
                    Err(Failed::Hyper(reason)) => return Err(End::Hyper(reason)),
                    Err(Failed::Upstream(source)) => return self.refuse(planned, source).await,
                };
            }
        }
        // What was sent last: the replay, if there was one.
        let sent = replayed.as_ref().unwrap_or(planned);
        measure::count(proxy, Some(handles), answer.status);
        // A GET's event stream is re-framed as chunks of whole events (legacy endpoints rewritten),
        // like the hyper path's `EndpointRewrite`; everything else passes as it is.
        let events = match (&sent.sse_path, answer.reframed) {
            (Some(path), true) => Some(
                sse::Endpoints::new(&handles.name, sent.credential.upstream.clone(), path.clone()).counting(
                    proxy
                        .metrics
                        .sse_events_too_large
                        .with_label_values(&[&handles.name]),
                ),
            ),
            _ => None,
        };
        let until_close = matches!(answer.framing, Framing::UntilClose) && events.is_none();
        let close = planned.close || until_close || *stop.borrow();
        // `out` holds the answer's head lines; the connection's own ones end it.
        if close {
            header_line(&mut self.out, b"connection", b"close");
        }
        self.out.extend_from_slice(b"\r\n");
        up.read.drain(..answer.head_len);
        let reusable = self.stream_body(&mut up, answer.framing, events).await?;
        if reusable && answer.upstream_keeps_alive {
            up.last_used = started;
            self.put_back(up);
        }
        Ok(!close)
    }

    /// Sends the planned request (its head in `out`, at `now`) to its credential's upstream and reads
    /// the answer head into the connection's buffer. A reused connection that the upstream had closed
    /// is replaced once.
    async fn send(&mut self, planned: &Planned, now: Instant) -> Result<(UpstreamConn, Answer), Failed> {
        let (scheme, authority) = (
            &planned.credential.upstream.scheme,
            &planned.credential.upstream.authority,
        );
        let body = planned.head_len..planned.head_len + planned.body_len;
        let mut reused = self.take_upstream(scheme, authority, now);
        loop {
            let was_reused = reused.is_some();
            let mut up = match reused.take() {
                Some(up) => up,
                None => self.connect(scheme, authority).await?,
            };
            let sent = write_two(&mut up.tcp, &self.out, &self.read[body.clone()]).await;
            let result = match sent {
                Ok(()) => {
                    read_answer_head(
                        &mut up,
                        &self.agent,
                        &mut self.read,
                        (planned.head_method, planned.sse_path.is_some()),
                        &mut self.out,
                    )
                    .await
                }
                Err(e) => Err(Failed::Upstream(e.into())),
            };
            match result {
                Ok(answer) => return Ok((up, answer)),
                // Closed before answering: a reused connection the upstream had given up on. The
                // request head is still in `out` (only a complete answer head replaces it).
                Err(Failed::Upstream(_)) if was_reused && up.read.is_empty() && planned.idempotent => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The agent's own connection to `authority`, if it has a live one.
    fn take_upstream(
        &mut self,
        scheme: &Scheme,
        authority: &Authority,
        now: Instant,
    ) -> Option<UpstreamConn> {
        let https = *scheme == Scheme::HTTPS;
        let i = self
            .upstreams
            .iter()
            .position(|u| u.authority == *authority && u.https == https)?;
        let mut up = self.upstreams.swap_remove(i);
        let idle = now.saturating_duration_since(up.last_used);
        // Readable while idle means closed (or stray bytes): either way it cannot carry a request.
        (up.tcp.is_idle_and_open() && idle < self.proxy.client.idle_timeout()).then_some(up)
    }

    /// A new connection; an HTTPS upstream that speaks only HTTP/2 sends the request to the hyper
    /// path (nothing was sent).
    async fn connect(&self, scheme: &Scheme, authority: &Authority) -> Result<UpstreamConn, Failed> {
        let tcp = match Box::pin(self.proxy.client.connect_own(scheme, authority)).await {
            Ok(Connected::Io(io)) => io,
            Ok(Connected::Http2) => return Err(Failed::Hyper("http2_upstream")),
            Err(e) => return Err(Failed::Upstream(e)),
        };
        Ok(UpstreamConn {
            authority: authority.clone(),
            https: *scheme == Scheme::HTTPS,
            tcp,
            read: Vec::with_capacity(8 << 10),
            last_used: Instant::now(),
        })
    }

    /// Keeps `up` for the next request; the least recently used one goes when there are too many.
    fn put_back(&mut self, mut up: UpstreamConn) {
        if up.read.capacity() > 64 << 10 {
            up.read.shrink_to(8 << 10);
        }
        if self.upstreams.len() == forward::MAX_OWN
            && let Some(oldest) = (0..self.upstreams.len()).min_by_key(|&i| self.upstreams[i].last_used)
        {
            self.upstreams.swap_remove(oldest);
        }
        self.upstreams.push(up);
    }

    /// Writes the agent head (in `out`) and the body as it arrives: passed through as it is, or, for
    /// a GET's event stream (`events`), as chunks of complete events with legacy `endpoint` events
    /// rewritten. `Ok(true)`: the body ended where its framing said, so the upstream connection can
    /// carry another request.
    async fn stream_body(
        &mut self,
        up: &mut UpstreamConn,
        framing: Framing,
        mut events: Option<sse::Endpoints>,
    ) -> Result<bool, End> {
        let mut left = framing;
        let mut chunks = Chunks::default();
        let mut head_pending = true;
        let mut agent_quiet = false;
        let mut upstream_closed = false;
        // The body's data in this round's bytes, when it is rewritten.
        let mut data = Vec::new();
        loop {
            let keep_data = events.is_some();
            data.clear();
            // The part of the upstream's bytes that belongs to this body.
            let (take, ended) = match &mut left {
                Framing::Empty => (0, true),
                Framing::Length(n) => {
                    let take = (*n).min(up.read.len() as u64) as usize;
                    *n -= take as u64;
                    if keep_data {
                        data.extend_from_slice(&up.read[..take]);
                    }
                    (take, *n == 0)
                }
                Framing::Chunked => chunks
                    .scan(&up.read, |range| {
                        if keep_data {
                            data.extend_from_slice(&up.read[range]);
                        }
                    })
                    .map_err(|()| {
                        tracing::debug!("upstream sent malformed chunked framing; connection closed");
                        End::Closed
                    })?,
                Framing::UntilClose => {
                    if keep_data {
                        data.extend_from_slice(&up.read);
                    }
                    (up.read.len(), upstream_closed)
                }
            };
            let written = match &mut events {
                None if head_pending && take <= COPY_BEHIND_HEAD => {
                    self.out.extend_from_slice(&up.read[..take]);
                    self.agent.write_all(&self.out).await
                }
                None if head_pending => write_two(&mut self.agent, &self.out, &up.read[..take]).await,
                None if take > 0 => self.agent.write_all(&up.read[..take]).await,
                None => Ok(()),
                Some(events) => {
                    if !head_pending {
                        self.out.clear();
                    }
                    if let Some(complete) = (!data.is_empty())
                        .then(|| events.push(bytes::Bytes::copy_from_slice(&data)))
                        .flatten()
                    {
                        push_chunk(&mut self.out, &complete);
                    }
                    if events.is_over() {
                        // An event over the limit: the agent's stream ends cleanly after the
                        // comment saying so; the upstream connection, mid-answer, is dropped.
                        self.out.extend_from_slice(b"0\r\n\r\n");
                        self.agent.write_all(&self.out).await.map_err(|_| End::Closed)?;
                        return Ok(false);
                    }
                    if ended {
                        if let Some(rest) = events.finish() {
                            push_chunk(&mut self.out, &rest);
                        }
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    match self.out.is_empty() {
                        true => Ok(()),
                        false => self.agent.write_all(&self.out).await,
                    }
                }
            };
            written.map_err(|_| End::Closed)?;
            head_pending = false;
            up.read.drain(..take);
            if ended {
                // Bytes after the end of the answer: the upstream is out of step; drop the connection.
                return Ok(up.read.is_empty() && !upstream_closed);
            }
            make_room(&mut up.read, 16 << 10);
            tokio::select! {
                biased;
                read = up.tcp.read_buf(&mut up.read) => match read {
                    Ok(1..) => {}
                    // The end of a body that runs until the connection closes.
                    Ok(0) if matches!(left, Framing::UntilClose) => upstream_closed = true,
                    Ok(0) | Err(_) => {
                        tracing::debug!("upstream closed in the middle of an answer");
                        return Err(End::Closed);
                    }
                },
                gone = agent_gone(&self.agent, &mut self.read), if !agent_quiet => match gone {
                    true => return Err(End::Closed),
                    // Pipelined bytes: kept for the next request; the agent is not watched again.
                    false => agent_quiet = true,
                },
            }
        }
    }

    /// Answers the agent with the hyper path's error for an unreachable upstream.
    async fn refuse(&mut self, planned: &Planned, source: forward::UpstreamError) -> Result<bool, End> {
        let error = ProxyError::Upstream {
            name: planned.handles.name.clone(),
            source,
        };
        let status = error.status();
        measure::count(self.proxy, Some(&planned.handles), status);
        let response = axum::response::IntoResponse::into_response(error);
        let (parts, body) = response.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out.extend_from_slice(status.as_str().as_bytes());
        self.out.push(b' ');
        self.out
            .extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        self.out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if name != http::header::CONTENT_LENGTH {
                header_line(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        header_line(
            &mut self.out,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
        if planned.close {
            header_line(&mut self.out, b"connection", b"close");
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(&body);
        self.agent.write_all(&self.out).await.map_err(|_| End::Closed)?;
        Ok(!planned.close)
    }
}

/// Makes room for a read of at least 1 KiB, growing the buffer by `grow` when it is nearly full.
fn make_room(buffer: &mut Vec<u8>, grow: usize) {
    if buffer.capacity() - buffer.len() < 1024 {
        buffer.reserve(grow);
    }
}

/// Appends `data` as one chunk of a chunked body.
fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Why a request could not be forwarded.
enum Failed {
    /// The agent closed its connection while waiting: the upstream request is dropped (cancelled).
    AgentGone,
    /// The upstream could not be reached or answered with something that is not HTTP/1.x.
    Upstream(forward::UpstreamError),
    /// Nothing was sent: the hyper path takes the connection over, for this reason.
    Hyper(&'static str),
}

/// Whether the agent closed its connection (`true`), or sent more bytes (`false`, kept in `read`).
async fn agent_gone(agent: &TcpStream, read: &mut Vec<u8>) -> bool {
    loop {
        if agent.readable().await.is_err() {
            return true;
        }
        read.reserve(4 << 10);
        match agent.try_read_buf(read) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
}

/// Parses the request at the start of `read` and, when the fast path forwards it, writes its
/// upstream head to `out`: the upstream's path and Host, the agent's headers minus its credentials
/// and connection headers, then the credential's headers (`with` for a replay, else the current one).
fn plan(
    proxy: &Proxy,
    cached: Option<&Arc<Handles>>,
    read: &[u8],
    with: Option<&Arc<Credential>>,
    out: &mut Vec<u8>,
) -> Plan {
    if read.is_empty() {
        return Plan::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(read, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        // hyper answers a head over the limit (431) or a malformed one (400).
        Ok(httparse::Status::Partial) if read.len() <= proxy.max_header_bytes + (8 << 10) => {
            return Plan::Partial;
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Plan::Hyper("headers_too_large");
        }
        // HTTP/2's preface, or not HTTP at all.
        Err(_) => return Plan::Hyper("not_http1"),
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version) else {
        return Plan::Hyper("not_http1");
    };
    // Step 1, guard: the method rule, and origin-form targets only (no absolute form, no `*`).
    if guard::check_method(method).is_err()
        || !target.starts_with('/')
        || !target.bytes().all(is_plain_target_byte)
    {
        return Plan::Hyper("request_target");
    }
    // Step 2, route.
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let Ok((name, rest)) = route::split(path) else {
        return Plan::Hyper("request_target");
    };
    if name.is_empty() {
        return Plan::Hyper("request_target");
    }
    let credential = match with {
        Some(c) => c.clone(),
        None => match proxy.store.get(name).map(|slot| slot.current) {
            Some(Some(c)) => c,
            Some(None) => return Plan::Hyper("credential_unavailable"),
            None => return Plan::Hyper("unknown_credential"),
        },
    };
    // Step 4's refusal (expired) is the hyper path's; HTTPS upstreams use its TLS pool.
    if credential.is_expired_now() {
        return Plan::Hyper("credential_unavailable");
    }
    // An HTTPS upstream that speaks only HTTP/2 is the pool's: this path speaks HTTP/1.1.
    if credential.upstream.scheme == Scheme::HTTPS
        && proxy.client.prefers_http2(&credential.upstream.authority)
    {
        return Plan::Hyper("http2_upstream");
    }
    let handles = match cached {
        Some(h) if *h.name == *name => h.clone(),
        _ => Arc::new(Handles::new(&proxy.metrics, name)),
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    credential.upstream.push_path(rest, query, out);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(
        forward::host(&credential.upstream.scheme, &credential.upstream.authority).as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let is_get = method == "GET";
    let mut sse = false;
    let mut size = 0;
    let mut body_len = None;
    let mut close = false;
    // The first values, as the hyper path's guard reads them (`HeaderMap::get`).
    let (mut origin, mut fetch_site) = (None, None);
    // Steps 1 and 3 over the headers: guard Host and Origin, strip credentials and connection headers.
    for header in request.headers.iter() {
        let (name, value) = (header.name, header.value);
        size += name.len() + value.len() + 4;
        match RequestHeader::of(name) {
            RequestHeader::Host if is_loopback_authority(value) => continue,
            RequestHeader::Origin => _ = origin.get_or_insert(value),
            RequestHeader::SecFetchSite => _ = fetch_site.get_or_insert(value),
            RequestHeader::Credential => continue,
            RequestHeader::ContentLength => match (parse_length(value), body_len) {
                (Some(n), None) => body_len = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Plan::Hyper("content_length"),
            },
            RequestHeader::Connection => {
                for token in value.split(|&b| b == b',') {
                    match token.trim_ascii() {
                        b"" => {}
                        t if t.eq_ignore_ascii_case(b"keep-alive") => {}
                        t if t.eq_ignore_ascii_case(b"close") => close = true,
                        // It names other headers to drop: the hyper path's strip handles that.
                        _ => return Plan::Hyper("connection_header"),
                    }
                }
                continue;
            }
            RequestHeader::Accept if is_get && contains(value, b"text/event-stream") => sse = true,
            RequestHeader::Accept | RequestHeader::Other => {}
            RequestHeader::Host | RequestHeader::Hyper => {
                return Plan::Hyper("request_header");
            }
        }
        // Step 4 replaces whatever the agent sent under the credential's header names.
        if credential
            .headers
            .iter()
            .any(|(n, _)| n.as_str().as_bytes().eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        header_line(out, name.as_bytes(), value);
    }
    if size > proxy.max_header_bytes {
        return Plan::Hyper("headers_too_large");
    }
    // The guard's browser rule; its refusal is the hyper path's.
    if guard::check_browser(origin, fetch_site).is_err() {
        return Plan::Hyper("request_header");
    }
    let body_len = body_len.unwrap_or(0);
    // Larger bodies stream through the hyper path (and are never replayed).
    if body_len as u64 > replay::MAX_BODY {
        return Plan::Hyper("large_body");
    }
    // Step 4: attach.
    for (name, value) in &credential.headers {
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let sse_path = sse.then(|| {
        let mut path = Vec::new();
        credential.upstream.push_path(rest, None, &mut path);
        String::from_utf8_lossy(&path).into_owned()
    });
    Plan::Forward(Planned {
        head_len,
        body_len,
        credential,
        handles,
        head_method: method == "HEAD",
        // (TRACE is idempotent too, but never forwarded.)
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        close,
        sse_path,
    })
}

/// What the fast path does with a request header, by name.
enum RequestHeader {
    Host,
    Origin,
    SecFetchSite,
    /// `Authorization` and `Cookie`: never forwarded.
    Credential,
    ContentLength,
    Connection,
    Accept,
    /// Hop-by-hop headers, `Transfer-Encoding` and `Expect`: the hyper path handles them.
    Hyper,
    Other,
}

impl RequestHeader {
    fn of(name: &str) -> Self {
        let is = |lower: &str| name.eq_ignore_ascii_case(lower);
        match name.len() {
            4 if is("host") => Self::Host,
            6 if is("origin") => Self::Origin,
            6 if is("cookie") => Self::Credential,
            6 if is("accept") => Self::Accept,
            6 if is("expect") => Self::Hyper,
            13 if is("authorization") => Self::Credential,
            14 if is("content-length") => Self::ContentLength,
            14 if is("sec-fetch-site") => Self::SecFetchSite,
            10 if is("connection") => Self::Connection,
            2 | 7 | 10 | 16 | 17 | 18 | 19 if is_hop_by_hop_name(name) => Self::Hyper,
            _ => Self::Other,
        }
    }
}

/// Bytes a request target may hold on the fast path: unreserved, sub-delims, `:@/?%` (RFC 3986).
/// Anything else goes to the hyper path, which accepts or refuses it.
fn is_plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A Content-Length value: digits only.
fn parse_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 15 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How the upstream's answer body ends (RFC 9112 §6.3).
#[derive(Clone, Copy)]
enum Framing {
    /// No body: HEAD, 204, 304.
    Empty,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    /// `Transfer-Encoding: chunked`, passed through as it is.
    Chunked,
    /// Neither: the body runs until the upstream closes (the agent's connection then closes too).
    UntilClose,
}

/// The upstream's answer head, parsed.
struct Answer {
    status: StatusCode,
    head_len: usize,
    framing: Framing,
    /// The upstream connection can carry another request after this answer.
    upstream_keeps_alive: bool,
    /// A 401/403's reason, from `WWW-Authenticate`.
    rejection: Option<Rejection>,
    /// The `scope` of a 403 `insufficient_scope` challenge (a step-up's).
    challenged_scope: Option<String>,
    /// An event stream answering a GET: its head says `Transfer-Encoding: chunked` and its body is
    /// re-framed, event by event.
    reframed: bool,
}

/// Reads the upstream's answer head into `up.read` and writes the agent's head lines (status line
/// and headers, without the final blank line) to `out`. The agent is watched meanwhile: if it
/// closes its connection, the upstream request is abandoned (dropping the connection cancels it).
async fn read_answer_head(
    up: &mut UpstreamConn,
    agent: &TcpStream,
    pipelined: &mut Vec<u8>,
    (head_method, sse_get): (bool, bool),
    out: &mut Vec<u8>,
) -> Result<Answer, Failed> {
    let mut agent_quiet = false;
    loop {
        if !up.read.is_empty() {
            match parse_answer(&up.read, head_method, sse_get, out) {
                Ok(Parsed::Final(answer)) => return Ok(answer),
                // 1xx answers are dropped, as the hyper path's client does.
                Ok(Parsed::Informational(n)) => {
                    up.read.drain(..n);
                    continue;
                }
                Ok(Parsed::Partial) if up.read.len() <= MAX_RESPONSE_HEAD => {}
                Ok(Parsed::Partial) => {
                    return Err(Failed::Upstream("the upstream's answer head is too large".into()));
                }
                Err(why) => return Err(Failed::Upstream(why.into())),
            }
        }
        make_room(&mut up.read, 8 << 10);
        tokio::select! {
            biased;
            read = up.tcp.read_buf(&mut up.read) => match read {
                Ok(1..) => {}
                Ok(0) => return Err(Failed::Upstream("the upstream closed the connection before answering".into())),
                Err(e) => return Err(Failed::Upstream(e.into())),
            },
            gone = agent_gone(agent, pipelined), if !agent_quiet => match gone {
                true => return Err(Failed::AgentGone),
                false => agent_quiet = true,
            },
        }
    }
}

enum Parsed {
    Partial,
    Informational(usize),
    Final(Answer),
}

/// Parses an answer head; a final one's head lines, minus connection headers, go to `out`. The event
/// stream answering a GET that accepts one (`sse_get`) is re-framed as chunked (see [`Answer::reframed`]).
fn parse_answer(
    read: &[u8],
    head_method: bool,
    sse_get: bool,
    out: &mut Vec<u8>,
) -> Result<Parsed, &'static str> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        read,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err("the upstream's answer is not HTTP/1.x"),
    };
    let (Some(version), Some(code)) = (response.version, response.code) else {
        return Err("the upstream's answer is not HTTP/1.x");
    };
    let status = StatusCode::from_u16(code).map_err(|_| "the upstream's status code is invalid")?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the upstream switched protocols unasked");
    }
    if status.is_informational() {
        return Ok(Parsed::Informational(head_len));
    }
    // The connection headers first: they decide the framing and what else is dropped.
    let (mut close, mut keep_alive, mut chunked, mut encoded) = (false, false, false, false);
    let mut length = None;
    let mut named = 0;
    let mut event_stream = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !token.is_empty() {
                    named += 1;
                }
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // Chunked only when it is the final coding (RFC 9112 §6.3); otherwise the body runs to the close.
            chunked = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("content-type") {
            event_stream = header
                .value
                .trim_ascii_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(header.value).ok_or("the upstream's Content-Length is invalid")? as u64;
            if length.is_some_and(|m| m != n) {
                return Err("the upstream sent conflicting Content-Length headers");
            }
            length = Some(n);
        }
    }
    let framing = if head_method || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Empty
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    let reframed = sse_get && event_stream && !matches!(framing, Framing::Empty);
    let named_by_connection = |name: &str| {
        named > 0
            && response.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection")
                    && h.value
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
            })
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut challenges = false;
    for header in response.headers.iter() {
        let name = header.name;
        let keep = if name.eq_ignore_ascii_case("transfer-encoding") {
            !reframed
        } else if name.eq_ignore_ascii_case("content-length") {
            !encoded && !reframed
        } else {
            challenges |= name.eq_ignore_ascii_case("www-authenticate");
            // The hyper path's rule (`strip_answer_headers`): no connection headers, no cookies.
            !is_withheld_answer_header(name) && !named_by_connection(name)
        };
        if keep {
            header_line(out, name.as_bytes(), header.value);
        }
    }
    if reframed {
        header_line(out, b"transfer-encoding", b"chunked");
    }
    let rejection = super::forward::rejection_reason(status, || {
        response
            .headers
            .iter()
            .filter(|h| challenges && h.name.eq_ignore_ascii_case("www-authenticate"))
            .map(|h| h.value)
    });
    let challenged_scope = super::forward::challenged_scope(
        rejection,
        response
            .headers
            .iter()
            .filter(|h| challenges && h.name.eq_ignore_ascii_case("www-authenticate"))
            .map(|h| h.value),
    );
    Ok(Parsed::Final(Answer {
        challenged_scope,
        status,
        head_len,
        framing,
        upstream_keeps_alive: !matches!(framing, Framing::UntilClose)
            && if version == 1 { !close } else { keep_alive },
        rejection,
        reframed,
    }))
}

/// Finds where a chunked body ends (RFC 9112 §7.1) in bytes that are passed through unchanged, so
/// the framing is checked strictly: only well-formed chunks reach the agent.
#[derive(Default)]
struct Chunks {
    state: ChunkState,
    /// The current chunk's size, then what is left of it.
    size: u64,
    /// Hex digits of the current size line.
    digits: u8,
    trailer_bytes: usize,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// A chunk extension, up to its CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// How many of `bytes` belong to the body, and whether the body ends there.
    /// `on_data` gets the ranges of `bytes` that are chunk data.
    fn scan(
        &mut self,
        bytes: &[u8],
        mut on_data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<(usize, bool), ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() && self.state != Done {
            if self.state == Data {
                let take = self.size.min((bytes.len() - i) as u64);
                on_data(i..i + take as usize);
                i += take as usize;
                self.size -= take;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    // 15 hex digits hold any real size; more could overflow.
                    if self.size >> 56 != 0 {
                        return Err(());
                    }
                    self.digits = self.digits.saturating_add(1);
                    self.size = self.size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => Extension,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(()),
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.digits = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, b'\n') => return Err(()),
                (TrailerStart | Trailer, _) => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(());
                    }
                    Trailer
                }
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(()),
            };
        }
        Ok((i, self.state == Done))
    }
}

/// Writes `head` then `body` (either may be empty), as one write when the socket takes it.
async fn write_two<W: AsyncWrite + Unpin>(tcp: &mut W, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() {
        let n = tcp
            .write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    tcp.write_all(body).await?;
    // TLS may hold the last record back until flushed; plain TCP has nothing to flush.
    tcp.flush().await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        credential::fixtures::data,
        metrics::Metrics,
        proxy::{ClientSettings, upstream_client},
        store::Store,
    };

    /// `data` chunked in pieces of `sizes` (cycled), with a chunk extension and a trailer if asked.
    fn chunked(data: &[u8], sizes: &[usize], extension: bool, trailer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = data;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at((*size).min(rest.len()));
            out.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
            if extension {
                out.extend_from_slice(b";name=\"v;\\\"x\"");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
            rest = after;
        }
        out.extend_from_slice(b"0\r\n");
        if trailer {
            out.extend_from_slice(b"X-Checksum: 1\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Header names and values that steer framing and connection handling, mixed at random.
    fn header_line_strategy() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "Connection",
            "connection",
            "Keep-Alive",
            "Transfer-Encoding",
            "Content-Length",
            "Content-Type",
            "X-A",
            "Upgrade",
            "Trailer",
            "TE",
            "WWW-Authenticate",
            "Authorization",
            "Cookie",
            "X-Api-Key",
            "Host",
            "Origin",
            "Accept",
            "Expect",
            "Mcp-Session-Id",
        ]);
        let values = prop::sample::select(vec![
            "close",
            "keep-alive",
            "chunked",
            "gzip, chunked",
            "chunked, gzip",
            "5",
            "0",
            "1, 2",
            "-1",
            "text/event-stream",
            "X-A",
            "Bearer error=\"invalid_token\"",
            "127.0.0.1:7007",
            "evil.example",
            "http://localhost:3000",
            "100-continue",
            "s1",
        ]);
        (names, values).prop_map(|(n, v)| format!("{n}: {v}\r\n"))
    }

    /// One proxy for every case (loading the system's CA certificates takes a while).
    static PROXY: std::sync::LazyLock<Proxy> = std::sync::LazyLock::new(test_proxy);

    fn test_proxy() -> Proxy {
        crate::install_crypto_provider();
        let store = Store::new(["demo".to_owned()]);
        let credential =
            Credential::from_data(&data("http://127.0.0.1:9/base", "X-API-Key", "secret")).unwrap();
        store.set("demo", credential);
        Proxy {
            store,
            client: upstream_client(&ClientSettings {
                connect_timeout: Duration::from_secs(1),
                pool_idle_timeout: Duration::from_secs(30),
                extra_ca_file: None,
            })
            .unwrap(),
            metrics: Metrics::register(),
            max_header_bytes: 8192,
            header_read_timeout: Duration::from_secs(60),
            http1_fast_path: true,
        }
    }

    /// The names of the header lines of a head (after its first line).
    fn names(head: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(head)
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_ascii_lowercase()))
            .collect()
    }

    proptest! {
        #[test]
        fn any_chunked_body_cut_anywhere_yields_its_data_and_ends_exactly(
            data in prop::collection::vec(any::<u8>(), 0..1500),
            sizes in prop::collection::vec(1usize..400, 1..8),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            extension: bool,
            trailer: bool,
            after in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut body = chunked(&data, &sizes, extension, trailer);
            let end = body.len();
            body.extend_from_slice(&after);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
            points.push(0);
            points.push(body.len());
            points.sort_unstable();
            let pieces: Vec<&[u8]> = points.windows(2).map(|w| &body[w[0]..w[1]]).collect();
            prop_assert_eq!(scan_data(&pieces), Ok((end, true, data)));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_answer_parsers(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = scan_all(&[&bytes]);
            let mut out = Vec::new();
            if let Ok(Parsed::Final(answer)) = parse_answer(&bytes, false, true, &mut out) {
                prop_assert!(out.starts_with(b"HTTP/1.1 ") && answer.head_len <= bytes.len());
            }
        }

        #[test]
        fn an_answer_head_never_passes_connection_headers_or_two_framings(
            status in prop::sample::select(vec![200u16, 204, 304, 401, 403, 500]),
            lines in prop::collection::vec(header_line_strategy(), 0..8),
            head_method: bool,
            sse_get: bool,
        ) {
            let head = format!("HTTP/1.1 {status} X\r\n{}\r\n", lines.concat());
            let mut out = Vec::new();
            if let Ok(Parsed::Final(answer)) = parse_answer(head.as_bytes(), head_method, sse_get, &mut out) {
                let names = names(&out);
                for hop in ["connection", "keep-alive", "upgrade", "trailer", "te"] {
                    prop_assert!(!names.iter().any(|n| n == hop), "{hop} passed in {names:?}");
                }
                let framings = names.iter().filter(|n| *n == "content-length" || *n == "transfer-encoding").count();
                prop_assert!(
                    !(names.contains(&"content-length".to_owned()) && names.contains(&"transfer-encoding".to_owned())),
                    "two framings: {names:?} ({framings})"
                );
                if answer.reframed {
                    prop_assert!(names.iter().filter(|n| *n == "transfer-encoding").count() == 1);
                }
            }
        }

    }

    proptest! {
        // More cases than the default: most random requests are (rightly) left to the hyper path.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn a_planned_request_carries_the_credential_and_nothing_the_agent_could_use_to_steer_it(
            method in prop::sample::select(vec!["GET", "POST", "HEAD", "DELETE", "CONNECT", "OPTIONS"]),
            target in prop::sample::select(vec![
                "/demo/x", "/demo", "/demo/?q=1", "/demo/../x", "/demo/a%2fb", "/nope/x", "http://evil/x",
                "/demo/a b", "*", "/demo/%2E%2E/x", "/demo/x?next=http://evil/",
            ]),
            version in prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0"]),
            lines in prop::collection::vec(header_line_strategy(), 0..8),
        ) {
            let proxy = &*PROXY;
            let request = format!("{method} {target} {version}\r\n{}\r\n", lines.concat());
            let mut out = Vec::new();
            if let Plan::Forward(planned) = plan(proxy, None, request.as_bytes(), None, &mut out) {
                let text = String::from_utf8_lossy(&out).into_owned();
                prop_assert!(text.starts_with(&format!("{method} /base")), "{text}");
                let names = names(&out);
                prop_assert_eq!(names.iter().filter(|n| *n == "host").count(), 1);
                prop_assert_eq!(names.iter().filter(|n| *n == "x-api-key").count(), 1);
                prop_assert!(text.contains("host: 127.0.0.1:9\r\n"), "{text}");
                prop_assert!(text.contains("x-api-key: secret\r\n"), "{text}");
                for never in [
                    "authorization",
                    "cookie",
                    "connection",
                    "transfer-encoding",
                    "expect",
                    "upgrade",
                    "keep-alive",
                    "te",
                    "trailer",
                ] {
                    prop_assert!(!names.iter().any(|n| n == never), "{never} forwarded: {text}");
                }
                prop_assert_eq!(planned.head_len, request.len());
            }
        }
    }

    fn scan_all(pieces: &[&[u8]]) -> Result<(usize, bool), ()> {
        scan_data(pieces).map(|(n, done, _)| (n, done))
    }

    /// What `scan` says of `pieces` given in turn, and the chunk data it found.
    fn scan_data(pieces: &[&[u8]]) -> Result<(usize, bool, Vec<u8>), ()> {
        let mut chunks = Chunks::default();
        let mut seen = Vec::new();
        let mut total = 0;
        for piece in pieces {
            let mut data = Vec::new();
            let (n, done) = chunks.scan(piece, |r| data.extend_from_slice(&piece[r]))?;
            seen.extend_from_slice(&data);
            total += n;
            if done {
                return Ok((total, true, seen));
            }
        }
        Ok((total, false, seen))
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers_whatever_the_pieces() {
        let body: &[u8] = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(scan_all(&[body]), Ok((end, true)));
        // Byte by byte gives the same end.
        let pieces: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan_all(&pieces), Ok((end, true)));
        // The data, for a body that is rewritten, is the chunks' content alone.
        let data = b"hello0123456789abcdef".to_vec();
        assert_eq!(scan_data(&[body]), Ok((end, true, data.clone())));
        assert_eq!(scan_data(&pieces), Ok((end, true, data)));
        assert_eq!(scan_all(&[b"0\r\n\r\n"]), Ok((5, true)));
        assert_eq!(scan_all(&[b"3\r\nab"]), Ok((5, false)));
    }

    #[test]
    fn malformed_chunked_framing_is_refused() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n",
            b"3\r\nabcX\r\n",
            b"1;ext\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\nbad\n",
        ] {
            assert_eq!(scan_all(&[bad]), Err(()), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn answer_heads_lose_their_connection_headers_and_keep_their_framing() {
        let mut out = Vec::new();
        let head = b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nMcp-Session-Id: s\r\n\r\n";
        let Ok(Parsed::Final(answer)) = parse_answer(head, false, false, &mut out) else {
            panic!("not parsed");
        };
        assert!(matches!(answer.framing, Framing::Chunked));
        assert!(!answer.upstream_keeps_alive);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nMcp-Session-Id: s\r\n"
        );
        let mut out = Vec::new();
        let head = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer error=\"invalid_token\"\r\nContent-Length: 0\r\n\r\n";
        let Ok(Parsed::Final(answer)) = parse_answer(head, false, false, &mut out) else {
            panic!("not parsed");
        };
        assert_eq!(
            answer.rejection,
            Some(Rejection::Curable(
                mcp_credentials_core::report::Reason::InvalidToken
            ))
        );
        assert!(matches!(answer.framing, Framing::Length(0)));
        assert!(answer.upstream_keeps_alive);
        for bad in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(parse_answer(bad, false, false, &mut Vec::new()).is_err());
        }
        assert!(matches!(
            parse_answer(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                false,
                false,
                &mut Vec::new()
            ),
            Ok(Parsed::Informational(_))
        ));
        // A GET's event stream is re-framed as chunked whatever the upstream's framing; a POST's passes.
        let sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 40\r\n\r\n";
        let mut out = Vec::new();
        let Ok(Parsed::Final(answer)) = parse_answer(sse, false, true, &mut out) else {
            panic!("not parsed");
        };
        assert!(answer.reframed && matches!(answer.framing, Framing::Length(40)));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
        );
        let Ok(Parsed::Final(answer)) = parse_answer(sse, false, false, &mut Vec::new()) else {
            panic!("not parsed");
        };
        assert!(!answer.reframed);
        // HEAD and 204/304 answers have no body whatever their headers say; no length means until close.
        for (head, head_method) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", false),
        ] {
            let Ok(Parsed::Final(answer)) = parse_answer(head, head_method, false, &mut Vec::new()) else {
                panic!("not parsed");
            };
            assert!(matches!(answer.framing, Framing::Empty));
        }
        let Ok(Parsed::Final(answer)) =
            parse_answer(b"HTTP/1.0 200 OK\r\n\r\n", false, false, &mut Vec::new())
        else {
            panic!("not parsed");
        };
        assert!(matches!(answer.framing, Framing::UntilClose) && !answer.upstream_keeps_alive);
    }
}

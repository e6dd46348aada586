//! The HTTP/1.1 fast path. An agent connection's ordinary requests are parsed with httparse and
//! forwarded as bytes on the connection's own upstream connection (plain TCP, or TLS speaking
//! HTTP/1.1, see [`super::tls`]), and the answer is streamed back as it arrives: no message types,
//! header maps or tasks in between, which is how nginx proxies too. The same steps run as on the
//! hyper path (guard, route, strip, attach, forward, measure), and the checks are the same functions.
//!
//! This file is the connection loop (read a request, send it, stream the answer, keep or drop the
//! upstream connection); [`request`] plans the upstream head from the agent's, [`response`] reads
//! and parses the answer head, [`chunked`] follows a chunked body's framing.
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
    own, replay, route, sse,
    strip::{is_hop_by_hop_name, is_withheld_answer_header},
    tls::{Connected, OwnIo},
};
use crate::{credential::Credential, error::ProxyError};

mod chunked;
mod request;
mod response;
#[cfg(test)]
mod tests;

use chunked::*;
use request::*;
use response::*;

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

impl own::Own for UpstreamConn {
    fn last_used(&self) -> Instant {
        self.last_used
    }
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
            // Every request of the fast path can go out again: its body is in `read`.
            let rejected = (reason, answer.challenged_scope.take());
            if let Some(newer) =
                replay::after_rejection(proxy, &handles.name, &planned.credential, rejected, true).await
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
        let idle_timeout = self.proxy.client.idle_timeout();
        let is_for = |u: &UpstreamConn| u.authority == *authority && u.https == https;
        let mut up = own::take(&mut self.upstreams, is_for, now, idle_timeout)?;
        // Readable while idle means closed (or stray bytes): either way it cannot carry a request.
        up.tcp.is_idle_and_open().then_some(up)
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
        own::put(&mut self.upstreams, up);
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

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
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

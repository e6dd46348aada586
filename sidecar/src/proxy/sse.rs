//! The legacy HTTP+SSE transport (2024-11-05) announces where to POST with an `endpoint` event. This
//! body wrapper rewrites that URI to `/<credential>/...` so follow-up POSTs come back through the
//! sidecar. Every other byte passes unchanged, and each complete event is forwarded as soon as it
//! arrives: only an incomplete trailing event is held, up to the event size limit
//! (`MCP_SIDECAR_MAX_SSE_EVENT_BYTES`); an event over it ends the stream.

use std::{
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::{guard::is_loopback_authority, route};
use crate::credential::Upstream;

/// The default largest event held ([`crate::config::MAX_SSE_EVENT_BYTES`]).
pub const MAX_EVENT: usize = 1 << 20;

/// Whether a `Content-Type` value says `text/event-stream` (parameters and case aside); both paths
/// use it to find the streams whose legacy `endpoint` events are rewritten.
pub(super) fn is_event_stream(content_type: &[u8]) -> bool {
    content_type
        .trim_ascii_start()
        .get(..17)
        .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
}

static MAX_EVENT_SETTING: OnceLock<usize> = OnceLock::new();

/// Sets the event size limit for this process (`MCP_SIDECAR_MAX_SSE_EVENT_BYTES`), once, at
/// start-up; default [`MAX_EVENT`].
pub fn set_max_event(bytes: usize) {
    let _ = MAX_EVENT_SETTING.set(bytes);
}

fn max_event() -> usize {
    MAX_EVENT_SETTING.get().copied().unwrap_or(MAX_EVENT)
}

/// A response body whose legacy `endpoint` events point back through the sidecar.
pub struct EndpointRewrite<B> {
    inner: B,
    events: Endpoints,
}

impl<B> EndpointRewrite<B> {
    /// Wraps the SSE body of a GET to `request_path` on `upstream`, for credential `name`.
    pub fn new(inner: B, name: &str, upstream: Upstream, request_path: String) -> Self {
        EndpointRewrite {
            inner,
            events: Endpoints::new(name, upstream, request_path),
        }
    }

    /// Counts a stream ended for an event over the limit in `counter`.
    pub fn counting(mut self, counter: prometheus::IntCounter) -> Self {
        self.events.too_large = Some(counter);
        self
    }
}

/// The rewriting itself, without I/O: bytes of the stream in, complete events (rewritten) out. The
/// hyper path's body wrapper and the HTTP/1.1 fast path both use it.
pub struct Endpoints {
    pending: BytesMut,
    /// How much of `pending` holds no event end (only bytes after it are scanned again).
    scanned: usize,
    max_event: usize,
    /// Set once an event went over `max_event`: the stream is over.
    over: bool,
    too_large: Option<prometheus::IntCounter>,
    prefix: String,
    upstream: Upstream,
    request_path: String,
}

impl Endpoints {
    /// For the SSE stream of a GET to `request_path` on `upstream`, for credential `name`.
    pub fn new(name: &str, upstream: Upstream, request_path: String) -> Self {
        Endpoints {
            pending: BytesMut::new(),
            scanned: 0,
            max_event: max_event(),
            over: false,
            too_large: None,
            prefix: format!("/{name}"),
            upstream,
            request_path,
        }
    }

    /// Counts a stream ended for an event over the limit in `counter`.
    pub fn counting(mut self, counter: prometheus::IntCounter) -> Self {
        self.too_large = Some(counter);
        self
    }

    /// Takes the next bytes of the stream; returns the events they complete, rewritten. Only an
    /// incomplete trailing event is held back. When that event grows over the limit, what is held
    /// is dropped and an SSE comment saying so comes back instead: the stream is then
    /// [over](Self::is_over), and the caller ends it there.
    pub fn push(&mut self, data: Bytes) -> Option<Bytes> {
        if self.over {
            return None;
        }
        // The common case: whole events and no endpoint event, forwarded without a copy.
        if self.pending.is_empty()
            && data.last().is_some_and(|b| matches!(b, b'\n' | b'\r'))
            && last_event_end(&data, 0) == Some(data.len())
        {
            return Some(self.rewrite(data));
        }
        self.pending.extend_from_slice(&data);
        let Some(end) = last_event_end(&self.pending, self.scanned) else {
            self.scanned = self.pending.len();
            return self.check_size();
        };
        let complete = self.pending.split_to(end).freeze();
        self.scanned = self.pending.len();
        let events = self.rewrite(complete);
        match self.check_size() {
            None => Some(events),
            Some(comment) => Some([events, comment].concat().into()),
        }
    }

    /// Ends the stream when the event held is over the limit: drops it, counts it, and returns the
    /// comment the agent gets instead (SSE clients ignore comments).
    fn check_size(&mut self) -> Option<Bytes> {
        if self.pending.len() <= self.max_event {
            return None;
        }
        self.over = true;
        self.pending = BytesMut::new();
        self.scanned = 0;
        if let Some(counter) = &self.too_large {
            counter.inc();
        }
        tracing::warn!(
            credential = %&self.prefix[1..],
            max_bytes = self.max_event,
            "an SSE event from the upstream is over MCP_SIDECAR_MAX_SSE_EVENT_BYTES; the stream is ended"
        );
        Some(Bytes::from(format!(
            ": mcp-credentials: an event over {} bytes was dropped and the stream ended (MCP_SIDECAR_MAX_SSE_EVENT_BYTES)\n\n",
            self.max_event
        )))
    }

    /// Whether an event over the limit ended the stream.
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// The stream ended: what is left of an incomplete event, unchanged.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }

    fn rewrite(&self, events: Bytes) -> Bytes {
        if memchr(b"endpoint", &events).is_none() {
            return events;
        }
        let Ok(text) = std::str::from_utf8(&events) else {
            return events;
        };
        let mut out = String::with_capacity(text.len() + self.prefix.len());
        let mut event: Vec<&str> = Vec::new();
        for line in text.split_inclusive('\n') {
            let bare = line.trim_end_matches(['\r', '\n']);
            if !bare.is_empty() {
                event.push(bare);
                continue;
            }
            let is_endpoint = event
                .iter()
                .any(|l| field(l, "event").is_some_and(|v| v == "endpoint"));
            let mapped: Vec<Option<Mapped>> = event
                .iter()
                .map(|l| field(l, "data").filter(|_| is_endpoint).map(|v| self.map(v)))
                .collect();
            if mapped.iter().any(|m| matches!(m, Some(Mapped::Refused))) {
                // Fail closed: the legacy client gets no endpoint (it stops) rather than one that
                // leads out of this credential's routes. A comment line, which SSE clients ignore,
                // says why to whoever reads the stream.
                event.clear();
                out.push_str(": mcp-credentials: endpoint event dropped, it leads outside ");
                out.push_str(&self.prefix);
                out.push_str("/\n\n");
                continue;
            }
            for (l, mapped) in event.drain(..).zip(mapped) {
                match mapped {
                    Some(Mapped::To(mapped)) => {
                        out.push_str("data: ");
                        out.push_str(&mapped);
                    }
                    _ => out.push_str(l),
                }
                out.push('\n');
            }
            out.push('\n');
        }
        // Lines after the last blank line (only at the end of a stream) pass unchanged.
        for l in event {
            out.push_str(l);
            out.push('\n');
        }
        Bytes::from(out)
    }

    /// Maps an endpoint URI on the upstream to the sidecar path that reaches it. What this produces
    /// always stays below `/<credential>/` (the router's own path check holds for it); an endpoint that
    /// would lead the agent to another of the sidecar's routes, rewritten or not, is refused.
    fn map(&self, endpoint: &str) -> Mapped {
        let path_and_query = if let Some(rest) = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
        {
            let scheme_ok = endpoint.starts_with(self.upstream.scheme.as_str());
            let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
            if !scheme_ok || !authority.eq_ignore_ascii_case(self.upstream.authority.as_str()) {
                // A loopback address may be the sidecar itself (`http://127.0.0.1:7007/other/`).
                if is_loopback_authority(authority.as_bytes()) {
                    tracing::warn!("legacy endpoint event names a loopback origin; dropped");
                    return Mapped::Refused;
                }
                tracing::warn!("legacy endpoint event names another origin; left unchanged");
                return Mapped::Unchanged;
            }
            if path.is_empty() {
                "/".to_owned()
            } else {
                path.to_owned()
            }
        } else if endpoint.starts_with("//") {
            // A network-path reference: the agent resolves it to another origin, possibly this one.
            tracing::warn!("legacy endpoint event is a network-path reference; dropped");
            return Mapped::Refused;
        } else if endpoint.starts_with('/') {
            endpoint.to_owned()
        } else {
            // Relative to the stream's own URL (RFC 3986 §5.2).
            let dir = &self.request_path[..self.request_path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{endpoint}")
        };
        // Dot segments (and their disguises) anywhere in the path could climb out of the prefix,
        // whether the event is rewritten or left for the agent to resolve.
        let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
        if route::check_rest(path).is_err() {
            tracing::warn!("legacy endpoint event has a path the sidecar refuses; dropped");
            return Mapped::Refused;
        }
        let base = &self.upstream.base_path;
        let below = path_and_query
            .strip_prefix(base.as_str())
            .filter(|r| r.is_empty() || r.starts_with(['/', '?']));
        match below {
            Some(rest) => Mapped::To(format!("{}{rest}", self.prefix)),
            // Only an absolute path gets here (a relative one resolves below the stream's own path,
            // which is below the base). The agent would resolve it against the sidecar's root, where
            // `/other/...` is another credential's route: an upstream must not steer the agent there.
            None => {
                tracing::warn!(
                    "legacy endpoint event is outside the upstream's path; dropped (configure the upstream at a common prefix)"
                );
                Mapped::Refused
            }
        }
    }
}

/// What becomes of an `endpoint` event's URI.
enum Mapped {
    /// Rewritten to this sidecar path, below `/<credential>/`.
    To(String),
    /// Passed as it is: another origin (which the agent reaches without any credential).
    Unchanged,
    /// The event is dropped: the URI would lead out of the credential's routes.
    Refused,
}

/// The value of an SSE field line `name: value` (one optional space after the colon).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let value = line.strip_prefix(name)?.strip_prefix(':')?;
    Some(value.strip_prefix(' ').unwrap_or(value))
}

fn memchr(needle: &[u8], haystack: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The end of the last complete event in `buf` (just after its blank line) that ends at or after
/// `from` (the bytes before it were scanned already), if any. Lines end with CRLF, LF or CR (the SSE
/// grammar), so a blank line is a line terminator right after another one.
fn last_event_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).rev().find_map(|i| {
        let start = match buf[i] {
            b'\n' if i > 0 && buf[i - 1] == b'\r' => i - 1,
            b'\n' | b'\r' => i,
            _ => return None,
        };
        (start > 0 && matches!(buf[start - 1], b'\n' | b'\r')).then_some(i + 1)
    })
}

impl<B> Body for EndpointRewrite<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            let this = &mut *self;
            if this.events.is_over() {
                // An event over the limit ended the stream: the upstream's body is not read further.
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                // The stream ended inside an event: pass what there is.
                None => return Poll::Ready(this.events.finish().map(|rest| Ok(Frame::data(rest)))),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            };
            if let Some(events) = this.events.push(data) {
                return Poll::Ready(Some(Ok(Frame::data(events))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.events.is_over() || (self.events.pending.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Rewriting changes the length.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewriter(upstream: &str, path: &str) -> Endpoints {
        Endpoints::new("legacy", Upstream::parse(upstream).unwrap(), path.into())
    }

    fn rewrite(r: &Endpoints, s: &str) -> String {
        String::from_utf8(r.rewrite(Bytes::from(s.to_owned())).to_vec()).unwrap()
    }

    #[test]
    fn the_endpoint_event_points_back_through_the_sidecar() {
        let r = rewriter("http://127.0.0.1:9000", "/sse");
        assert_eq!(
            rewrite(&r, "event: endpoint\ndata: /messages/?session_id=abc\n\n"),
            "event: endpoint\ndata: /legacy/messages/?session_id=abc\n\n"
        );
        assert_eq!(
            rewrite(
                &r,
                "event:endpoint\r\ndata:http://127.0.0.1:9000/messages?s=1\r\n\r\n"
            ),
            "event:endpoint\ndata: /legacy/messages?s=1\n\n"
        );
        assert_eq!(
            rewrite(&r, "event: endpoint\ndata: messages?s=1\n\n"),
            "event: endpoint\ndata: /legacy/messages?s=1\n\n"
        );
        let r = rewriter("https://h.example/mcp/", "/mcp/sse");
        assert_eq!(
            rewrite(&r, "event: endpoint\ndata: /mcp/msg\n\n"),
            "event: endpoint\ndata: /legacy/msg\n\n"
        );
        // Outside the upstream's path: dropped, since `/other` on the sidecar is another
        // credential's route. On another origin: unchanged (the agent goes there with no credential).
        assert_eq!(
            rewrite(&r, "event: endpoint\ndata: /other\n\n"),
            ": mcp-credentials: endpoint event dropped, it leads outside /legacy/\n\n"
        );
        assert_eq!(
            rewrite(&r, "event: endpoint\ndata: https://evil.example/mcp/x\n\n"),
            "event: endpoint\ndata: https://evil.example/mcp/x\n\n"
        );
    }

    #[test]
    fn an_endpoint_event_that_would_leave_the_credentials_routes_is_dropped() {
        let dropped = ": mcp-credentials: endpoint event dropped, it leads outside /legacy/\n\n";
        for (upstream, path) in [
            ("http://127.0.0.1:9000", "/sse"),
            ("https://h.example/mcp/", "/mcp/sse"),
        ] {
            let r = rewriter(upstream, path);
            for endpoint in [
                "../other/messages",
                "../../other/messages?s=1",
                "/../other",
                "/mcp/../other",
                "/mcp/../../other/x",
                "/mc/../mcp/x",
                "./messages",
                "/%2e%2e/other",
                "/mcp/..;/other",
                "/mcp/%252e%252e/other",
                "//127.0.0.1:7007/other/messages",
                "//evil.example/x",
                "http://127.0.0.1:7007/other/messages",
                "http://localhost:7007/other",
            ] {
                let event = format!("event: endpoint\ndata: {endpoint}\n\n");
                assert_eq!(rewrite(&r, &event), dropped, "{upstream} {endpoint}");
            }
            // The events around it pass.
            let s = "data: 1\n\nevent: endpoint\ndata: ../other\n\nevent: message\ndata: 2\n\n";
            assert_eq!(
                rewrite(&r, s),
                format!("data: 1\n\n{dropped}event: message\ndata: 2\n\n")
            );
        }
        // The upstream's own loopback origin is still its own.
        let r = rewriter("http://127.0.0.1:9000", "/sse");
        assert_eq!(
            rewrite(
                &r,
                "event: endpoint\ndata: http://127.0.0.1:9000/messages?s=1\n\n"
            ),
            "event: endpoint\ndata: /legacy/messages?s=1\n\n"
        );
    }

    #[test]
    fn events_end_at_a_blank_line_whatever_the_line_endings() {
        assert_eq!(last_event_end(b"data: x\n\n", 0), Some(9));
        assert_eq!(last_event_end(b"data: x\r\n\r\ndata: y", 0), Some(11));
        assert_eq!(last_event_end(b"data: x\r\rdata", 0), Some(9));
        assert_eq!(last_event_end(b"data: x\r\ndata: y\r\n", 0), None);
        assert_eq!(last_event_end(b"data: x\n", 0), None);
        // Only ends at or after `from` are looked for, but a blank line may start before it.
        assert_eq!(last_event_end(b"data: x\n\n", 9), None);
        assert_eq!(last_event_end(b"data: x\n\n", 8), Some(9));
        assert_eq!(last_event_end(b"data: x\r\n\r\n", 10), Some(11));
    }

    #[test]
    fn an_event_over_the_limit_ends_the_stream_with_a_comment_and_nothing_of_it() {
        let mut r = rewriter("http://127.0.0.1:9000", "/sse");
        r.max_event = 64;
        let counter = prometheus::IntCounter::new("t", "t").unwrap();
        let mut r = r.counting(counter.clone());
        assert_eq!(
            r.push(Bytes::from_static(b"data: 1\n\ndata: ")).unwrap(),
            "data: 1\n\n"
        );
        // Small pieces of one event: held, and only the new bytes are scanned.
        for _ in 0..5 {
            assert_eq!(r.push(Bytes::from_static(b"0123456789")), None);
        }
        let end = r.push(Bytes::from_static(b"0123456789012345")).unwrap();
        assert!(
            end.starts_with(b": mcp-credentials: an event over 64 bytes"),
            "{end:?}"
        );
        assert!(end.ends_with(b"\n\n") && !end.windows(4).any(|w| w == b"0123"));
        assert!(r.is_over() && r.pending.is_empty() && r.pending.capacity() == 0);
        assert_eq!(r.push(Bytes::from_static(b"\n\ndata: 2\n\n")), None);
        assert_eq!(r.finish(), None);
        assert_eq!(counter.get(), 1);
        // Events up to the limit pass.
        let mut r = rewriter("http://127.0.0.1:9000", "/sse");
        r.max_event = 64;
        let event = format!("data: {}\n\n", "x".repeat(56));
        assert_eq!(r.push(Bytes::from(event[..40].to_owned())), None);
        assert_eq!(r.push(Bytes::from(event[40..].to_owned())).unwrap(), event);
    }

    #[test]
    fn other_events_pass_unchanged_even_when_they_mention_endpoints() {
        let r = rewriter("http://127.0.0.1:9000", "/sse");
        let s = "event: message\ndata: {\"endpoint\":\"/x\"}\n\nid: 7\ndata: y\n\n";
        assert_eq!(rewrite(&r, s), s);
    }

    #[tokio::test]
    async fn events_split_across_chunks_are_forwarded_once_complete() {
        use http_body_util::{BodyExt, StreamBody};
        let chunks = [
            "event: endp",
            "oint\ndata: /messages/?s=1\n",
            "\nevent: message\ndata: 1\n\n",
            "data: par",
        ];
        let stream = futures_util::stream::iter(
            chunks.map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c)))),
        );
        let mut body = EndpointRewrite::new(
            StreamBody::new(stream),
            "legacy",
            Upstream::parse("http://127.0.0.1:9000").unwrap(),
            "/sse".into(),
        );
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(String::from_utf8(frame.unwrap().into_data().unwrap().to_vec()).unwrap());
        }
        assert_eq!(
            frames,
            // The third chunk completes two events at once: both go out together, the partial one after.
            [
                "event: endpoint\ndata: /legacy/messages/?s=1\n\nevent: message\ndata: 1\n\n",
                "data: par"
            ]
        );
    }
}

//! The upstream's answer head: read while the agent is watched, parsed, connection headers
//! dropped, its framing found ([`parse_answer`]).

use super::*;

/// The largest upstream response head read (hyper's client reads up to about 400 KiB).
pub(super) const MAX_RESPONSE_HEAD: usize = 256 << 10;

/// How the upstream's answer body ends (RFC 9112 §6.3).
#[derive(Clone, Copy)]
pub(super) enum Framing {
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
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) head_len: usize,
    pub(super) framing: Framing,
    /// The upstream connection can carry another request after this answer.
    pub(super) upstream_keeps_alive: bool,
    /// A 401/403's reason, from `WWW-Authenticate`.
    pub(super) rejection: Option<Rejection>,
    /// The `scope` of a 403 `insufficient_scope` challenge (a step-up's).
    pub(super) challenged_scope: Option<String>,
    /// An event stream answering a GET: its head says `Transfer-Encoding: chunked` and its body is
    /// re-framed, event by event.
    pub(super) reframed: bool,
}

/// Reads the upstream's answer head into `up.read` and writes the agent's head lines (status line
/// and headers, without the final blank line) to `out`. The agent is watched meanwhile: if it
/// closes its connection, the upstream request is abandoned (dropping the connection cancels it).
pub(super) async fn read_answer_head(
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

pub(super) enum Parsed {
    Partial,
    Informational(usize),
    Final(Answer),
}

/// Parses an answer head; a final one's head lines, minus connection headers, go to `out`. The event
/// stream answering a GET that accepts one (`sse_get`) is re-framed as chunked (see [`Answer::reframed`]).
pub(super) fn parse_answer(
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
            event_stream = sse::is_event_stream(header.value);
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

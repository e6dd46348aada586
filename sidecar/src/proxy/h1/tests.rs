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
    let credential = Credential::from_data(&data("http://127.0.0.1:9/base", "X-API-Key", "secret")).unwrap();
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
    let Ok(Parsed::Final(answer)) = parse_answer(b"HTTP/1.0 200 OK\r\n\r\n", false, false, &mut Vec::new())
    else {
        panic!("not parsed");
    };
    assert!(matches!(answer.framing, Framing::UntilClose) && !answer.upstream_keeps_alive);
}

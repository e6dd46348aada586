//! For the sources' unit tests: a map-backed secret resolver, and an in-process HTTP server that
//! answers exactly what each test needs, including the malformed, slow and huge answers real
//! servers sometimes give.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::CredentialSource;

#[derive(Default)]
pub struct MapResolver(pub HashMap<(String, String), String>, pub Option<jwt::SigningKey>);

impl MapResolver {
    pub fn with(mut self, name: &str, key: &str, value: &str) -> Self {
        self.0.insert((name.into(), key.into()), value.into());
        self
    }

    pub fn with_signing_key(mut self, key: jwt::SigningKey) -> Self {
        self.1 = Some(key);
        self
    }
}

impl SecretResolver for MapResolver {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        self.0
            .get(&(r.name.clone(), r.key.clone()))
            .map(|v| SecretString::new(v.clone()))
            .ok_or_else(|| ResolveError::NotFound {
                name: r.name.clone(),
                key: r.key.clone(),
            })
    }

    async fn signing_key(&self, alg: crate::JwtAlgorithm) -> Result<jwt::SigningKey, ResolveError> {
        self.1
            .clone()
            .filter(|k| k.algorithm == alg)
            .ok_or(ResolveError::NoSigningKey)
    }
}

/// What the test server answers.
#[derive(Clone)]
pub enum Answer {
    /// A JSON body with this status.
    Json(u16, String),
    /// A body with this status and content type.
    Raw(u16, &'static str, String),
    /// A status, extra headers and a JSON body.
    With(u16, Vec<(String, String)>, String),
    /// Headers promising a body that never finishes.
    SlowBody,
    /// Never answers.
    Hang,
}

/// A request the test server received: the head (request line and headers) and the body.
#[derive(Clone, Debug)]
pub struct Seen {
    pub head: String,
    pub body: String,
}

impl Seen {
    /// A form parameter of the body, decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        self.body.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| decode(v))
        })
    }

    /// The request line's path.
    pub fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// The `id:secret` of an HTTP Basic `Authorization` header, decoded.
    pub fn basic(&self) -> Option<String> {
        use base64::Engine;
        let value = self.head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().to_owned())
        })?;
        let encoded = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
        String::from_utf8(bytes).ok()
    }
}

/// A credential for `https://mcp.example.com/mcp` with this source and nothing else set.
pub fn spec(source: CredentialSource) -> McpCredentialSpec {
    McpCredentialSpec {
        upstream: "https://mcp.example.com/mcp".into(),
        source,
        inject: None,
        refresh: None,
        secret_name: None,
        access: None,
    }
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

pub type Log = Arc<Mutex<Vec<Seen>>>;

/// A server answering every request with `answer`; returns its `/token` URL.
pub async fn server(answer: Answer) -> (String, Log) {
    let (base, seen) = routed(move |_| answer.clone()).await;
    (format!("{base}/token"), seen)
}

/// A server answering each request with `route(request)`; returns `http://127.0.0.1:<port>`.
pub async fn routed(route: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Log = Arc::default();
    let log = seen.clone();
    let route = Arc::new(route);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (log, route) = (log.clone(), route.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break (head.to_owned(), body.to_owned());
                        }
                    }
                };
                let request = Seen { head, body };
                log.lock().unwrap().push(request.clone());
                let (status, headers, body) = match route(&request) {
                    Answer::Json(s, b) => (s, vec![("content-type".into(), "application/json".into())], b),
                    Answer::Raw(s, t, b) => (s, vec![("content-type".into(), t.into())], b),
                    Answer::With(s, mut h, b) => {
                        h.push(("content-type".into(), "application/json".into()));
                        (s, h, b)
                    }
                    Answer::SlowBody => {
                        let _ = sock
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{")
                            .await;
                        for _ in 0..3600 {
                            if sock.write_all(b" ").await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        return;
                    }
                    Answer::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let mut resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    resp.push_str(&format!("{k}: {v}\r\n"));
                }
                resp.push_str("\r\n");
                resp.push_str(&body);
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    (base, seen)
}

/// A source context for tests: short timeouts, loopback allowed (the test servers are on it).
pub fn context() -> SourceContext {
    SourceContext::new(Duration::from_secs(2), OutboundPolicy { allow_loopback: true }).unwrap()
}

//! The operator's listeners under abuse, with the real binary and the real API server: thousands of
//! idle and half-sent connections to the webhook (TLS), metrics and JWKS ports are closed by the
//! operator while normal requests are still answered, and a flood of reports with forged bearer
//! tokens costs the API server few TokenReviews and gets 429s. Waits poll for outcomes with
//! generous deadlines; nothing asserts on time.

mod operator_support;

use std::time::Duration;

use operator_support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The chart's memory limit of the operator container.
const MEMORY_LIMIT: u64 = 256 << 20;

/// The peak resident set size of `pid` so far, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib << 10
}

/// Opens `n` connections to `addr`: every other one sends the start of something (`partial`), the
/// rest nothing at all.
async fn flood(addr: &str, n: usize, partial: &[u8]) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            let _ = tcp.write_all(partial).await;
        }
        conns.push(tcp);
    }
    conns
}

/// Whether the server closed `tcp` (end of stream or reset) within the deadline.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut buf = [0; 1024];
    let wait = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait)
        .await
        .unwrap_or(false)
}

fn operator_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

struct Listeners {
    op: WebhookOperator,
    jwks: String,
    client: reqwest::Client,
}

async fn start(ns: &str, cp: &mcp_credentials_e2e::ControlPlane) -> Listeners {
    let dir = std::env::temp_dir().join(format!("mcp-listeners-certs-{ns}"));
    let jwks = format!("127.0.0.1:{}", free_port());
    let op = WebhookOperator::start(cp, ns, "a", &dir, &["--jwks-listen", &jwks]);
    let client = operator_client(&op.ca_pem);
    let report = format!("https://{}/v1/report", op.listen);
    let jwks_url = format!("http://{jwks}/.well-known/jwks.json");
    wait_for("the operator's listeners", || async {
        let webhook = client.post(&report).body("{}").send().await.ok()?;
        let jwks = reqwest::get(&jwks_url).await.ok()?;
        (webhook.status() == 400 && jwks.status() == 200 && !op.operator.metrics().await.is_empty())
            .then_some(())
    })
    .await;
    Listeners { op, jwks, client }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_sent_connections_to_every_listener_are_closed_and_requests_still_answered() {
    let (cp, ns) = setup("listeners");
    let Listeners { op, jwks, client } = start(&ns, cp).await;
    let metrics = format!("127.0.0.1:{}", op.operator.port);
    let mut conns = flood(&op.listen, 2000, &[0x16, 0x03, 0x01, 0x02]).await;
    conns.extend(flood(&metrics, 1500, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").await);
    conns.extend(flood(&jwks, 1500, b"GET /.well-known/jwks.json HTTP/1.1\r\nX-Slow: ").await);

    // While they are open, each listener still answers.
    let report = format!("https://{}/v1/report", op.listen);
    let answer = client
        .post(&report)
        .body("{}")
        .send()
        .await
        .expect("the webhook listener answers");
    assert_eq!(answer.status(), 400);
    let answer = reqwest::get(format!("http://{jwks}/.well-known/jwks.json"))
        .await
        .expect("the JWKS listener answers");
    assert_eq!(answer.status(), 200);
    assert!(
        !op.operator.metrics().await.is_empty(),
        "the metrics listener answers"
    );

    // Every flood connection is closed by the operator: to make room, or at its deadline.
    let mut open = 0;
    for tcp in &mut conns {
        if !closed_by_server(tcp).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "connections the operator never closed");
    let peak = peak_rss(op.operator.pid());
    eprintln!(
        "operator peak RSS after 5,000 idle connections: {} KiB",
        peak >> 10
    );
    assert!(peak < MEMORY_LIMIT, "peak RSS {peak} bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_reports_with_forged_tokens_costs_few_token_reviews_and_gets_429s() {
    let (cp, ns) = setup("report-flood");
    let Listeners { op, client, .. } = start(&ns, cp).await;
    let report = format!("https://{}/v1/report", op.listen);
    let body = serde_json::json!({
        "namespace": ns, "credential": "github", "reason": "invalid_token", "version": "1"
    });
    let reviews_series = |text: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains("resource=\"tokenreviews\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = reviews_series(&op.operator.metrics().await);
    const REQUESTS: usize = 300;
    let (mut throttled, mut unauthenticated) = (0, 0);
    for i in 0..REQUESTS {
        let answer = client
            .post(&report)
            .bearer_auth(format!("forged-{i}"))
            .json(&body)
            .send()
            .await
            .expect("an answer");
        match answer.status().as_u16() {
            429 => {
                assert!(
                    answer.headers().contains_key("retry-after"),
                    "{:?}",
                    answer.headers()
                );
                throttled += 1;
            }
            401 => unauthenticated += 1,
            other => panic!("unexpected {other}: {}", answer.text().await.unwrap_or_default()),
        }
    }
    let text = op.operator.metrics().await;
    let reviews = reviews_series(&text) - before;
    eprintln!(
        "{REQUESTS} forged reports: {throttled} got 429, {unauthenticated} got 401, {reviews} TokenReviews"
    );
    assert_eq!(
        reviews as usize, unauthenticated,
        "one TokenReview per report let through"
    );
    assert!(
        reviews * 3.0 < REQUESTS as f64,
        "{reviews} TokenReviews for {REQUESTS} reports"
    );
    assert!(throttled > REQUESTS / 2, "{throttled} answered 429");
    assert_eq!(
        metric_value(&text, r#"mcp_credentials_reports_total{result="throttled"}"#) as usize,
        throttled
    );
}

//! The end-to-end scenario, every part real: kube-apiserver, the independent OAuth server
//! (oidc-provider), four MCP servers from the official Rust SDK each demanding a JWT for its own
//! audience (three credentials from client credentials, one from a rotating refresh token), the operator and the sidecar as processes, MCP clients calling tools through the
//! sidecar, and the Debian package's Prometheus scraping operator and sidecar. The assertions go
//! through PromQL; at the end every log line of the run is scanned for token bytes.

mod e2e_support;
mod operator_support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use e2e_support::*;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::credential::{Credential, OAuth2};
use operator_support::*;

/// Short tokens, so that each credential is renewed twice within the test.
const TOKEN_TTL: u64 = 12;
const NAMES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
/// The credential that comes from a user's refresh token (rotated on every use) instead.
const FROM_REFRESH_TOKEN: &str = "delta";

#[tokio::test(flavor = "multi_thread")]
async fn mcp_clients_call_four_audience_bound_servers_through_the_sidecar_while_prometheus_watches() {
    let started = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    let (cp, ns) = setup("e2e");
    let dir = run_dir("scenario");
    let oauth = OAuth::start(&dir, TOKEN_TTL);
    create_secret(cp, &ns, "idp", &[("secret", CLIENT_SECRET)]);
    let mut servers = Vec::new();
    for name in NAMES {
        let server = McpServer::start(&oauth, &dir).await;
        if name == FROM_REFRESH_TOKEN {
            let login = oauth.mint_refresh_token(&server.url).await;
            create_rt_client_login(cp, &ns, &login);
            apply(
                cp,
                &ns,
                &Credential::new(
                    name,
                    &server.url,
                    OAuth2::rt_client().token_url(&oauth.token_url()),
                )
                .yaml(),
            );
        } else {
            apply(
                cp,
                &ns,
                &credential(name, &server.url, &oauth.token_url(), 33).yaml(),
            );
        }
        servers.push(server);
    }
    let operator = Operator::start(cp, &ns, "e2e", &[]);
    let kube = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(kube.clone(), &ns);
    for name in NAMES {
        wait_condition(&creds, name, "Ready", "True", None).await;
    }
    let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
    step("credentials Ready");
    let sidecar = SidecarProcess::start(cp, &ns, &names, &dir);
    wait_for("the sidecar is ready", || async {
        sidecar.ready().await.then_some(())
    })
    .await;
    let prometheus = Prometheus::start(
        &[
            ("operator", format!("127.0.0.1:{}", operator.port)),
            ("sidecar", format!("127.0.0.1:{}", sidecar.admin_port)),
        ],
        &dir,
    );

    step("sidecar ready, Prometheus started");
    // Each server takes only its own audience's token: alpha's credential opens nothing else.
    let secrets: Api<Secret> = Api::namespaced(kube, &ns);
    let alpha = data(
        &secrets.get("alpha-mcp-credential").await.unwrap(),
        "header.Authorization",
    )
    .unwrap();
    let post = |url: String, authorization: Option<String>| async move {
        let mut r = reqwest::Client::new()
            .post(url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
        if let Some(a) = authorization {
            r = r.header("authorization", a);
        }
        r.send().await.unwrap().status().as_u16()
    };
    assert_ne!(
        post(servers[0].url.clone(), Some(alpha.clone())).await,
        401,
        "alpha takes its token"
    );
    assert_eq!(
        post(servers[1].url.clone(), Some(alpha)).await,
        401,
        "beta refuses alpha's token"
    );
    assert_eq!(
        post(servers[2].url.clone(), None).await,
        401,
        "gamma refuses no token"
    );
    let refused_on_purpose = 2;

    let first_refreshes = wait_for("Prometheus has scraped the operator", || async {
        prometheus
            .scalar(r#"sum(mcp_credentials_refreshes_total{result="success"})"#)
            .await
    })
    .await;

    step("Prometheus scrapes");
    // MCP clients (one per server, holding no credential) call a tool through the sidecar until
    // every credential has been renewed twice.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for name in NAMES {
        let (url, stop, calls) = (format!("{}/{name}", sidecar.url), stop.clone(), calls.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut session = None;
            let mut a = 0;
            while !stop.load(Ordering::Relaxed) {
                let result = match &session {
                    Some(s) => call_sum(s, a).await,
                    None => connect(&url).await.map(|s| session = Some(s)),
                };
                match result {
                    Ok(()) => {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures.push(format!("{url}: {e}"));
                        session = None;
                    }
                }
                a += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            failures
        }));
    }
    wait_for("two renewals of every credential, seen by Prometheus", || async {
        let renewed = prometheus
            .scalar("count(changes(mcp_credentials_credential_expiration_timestamp_seconds[10m]) >= 2)")
            .await?;
        (renewed == NAMES.len() as f64).then_some(())
    })
    .await;
    // The sidecar picked up the last renewal too (it exports what it attaches).
    wait_for("the sidecar exports the current expirations", || async {
        let behind = prometheus
            .scalar(
                "count(max by (name) (mcp_credentials_credential_expiration_timestamp_seconds) \
                 > on (name) label_replace(mcp_credentials_sidecar_credential_expiration_timestamp_seconds, \
                 \"name\", \"$1\", \"credential\", \"(.*)\")) or vector(0)",
            )
            .await?;
        (behind == 0.0).then_some(())
    })
    .await;
    step("two renewals of each credential");
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "client-visible failures: {failures:#?}");
    assert!(calls.load(Ordering::Relaxed) > 0, "no tool call succeeded");

    // The assertions, through PromQL.
    let q = |promql: &'static str| {
        let p = &prometheus;
        async move {
            p.scalar(promql)
                .await
                .unwrap_or_else(|| panic!("no result for {promql}"))
        }
    };
    let refreshes = q(r#"sum(mcp_credentials_refreshes_total{result="success"})"#).await;
    assert!(
        refreshes >= first_refreshes + 2.0 * NAMES.len() as f64,
        "refresh counter rose from {first_refreshes} to {refreshes}"
    );
    assert_eq!(
        q(r#"sum(mcp_credentials_refreshes_total{result!="success"}) or vector(0)"#).await,
        0.0,
        "failed refreshes"
    );
    // At every scrape of the test, every expiration was still ahead (operator's and sidecar's view).
    let ahead =
        q("min_over_time((min(mcp_credentials_credential_expiration_timestamp_seconds) - time())[10m:1s])")
            .await;
    assert!(ahead > 0.0, "an operator expiration was {ahead} s in the past");
    let ahead = q(
        "min_over_time((min(mcp_credentials_sidecar_credential_expiration_timestamp_seconds) - time())[10m:1s])",
    )
    .await;
    assert!(ahead > 0.0, "a sidecar expiration was {ahead} s in the past");
    assert_eq!(
        q("count(mcp_credentials_credential_ready == 1)").await,
        NAMES.len() as f64,
        "every credential Ready"
    );
    assert_eq!(
        q("sum(mcp_credentials_sidecar_expired_refusals_total) or vector(0)").await,
        0.0,
        "expired-credential refusals"
    );
    assert_eq!(
        q("sum(mcp_credentials_sidecar_upstream_rejections_total) or vector(0)").await,
        0.0,
        "upstream 401/403 through the sidecar"
    );
    assert_eq!(
        q(r#"count(sum by (credential) (mcp_credentials_sidecar_requests_total{status="200"}) > 0)"#).await,
        NAMES.len() as f64,
        "successful requests to every upstream"
    );
    let refused: u64 = servers.iter().map(|s| s.counts().1).sum();
    assert_eq!(
        refused, refused_on_purpose,
        "the servers refused only the test's own probes"
    );

    // Security: no token, refresh token or client secret in any log line of the run.
    drop(prometheus);
    drop(sidecar);
    let operator_log = operator.log.clone();
    drop(operator);
    let secrets_of_run = secrets_of_run(&oauth.issued_file());
    assert!(
        secrets_of_run.len() > 2 * 9,
        "tokens recorded: {}",
        secrets_of_run.len()
    );
    let mut logs = all_logs(&dir);
    logs.push(operator_log);
    // The scan finds what it looks for: a line with a token cut short of its last character.
    let planted = dir.join("logs/planted.txt");
    let token = secrets_of_run
        .iter()
        .find(|s| s.matches('.').count() == 2)
        .unwrap();
    std::fs::write(
        &planted,
        format!("Authorization: Bearer {}\n", &token[..token.len() - 1]),
    )
    .unwrap();
    assert_eq!(
        scan_logs(&[planted], &secrets_of_run).0.len(),
        1,
        "the scan missed a planted token"
    );
    assert_no_secrets_in_logs(&logs, &secrets_of_run);
    cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    let _ = std::fs::remove_dir_all(&dir);
}

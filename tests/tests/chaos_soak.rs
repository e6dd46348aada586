//! The chaos soak: 15-second tokens, ten MCP servers (official Rust SDK) each demanding its own
//! audience, two operator replicas with leader election, the sidecar, and concurrent MCP clients
//! calling tools through it, while the test restarts the OAuth server, kills the operator leader,
//! restarts kube-apiserver, deletes an output Secret by hand and takes the OAuth server away for
//! longer than a token lives. Prints the client-visible failures by cause and by event, and fails
//! when a goal is missed:
//!
//! 1. no authentication failure (upstream 401) while the OAuth server is reachable;
//! 2. no failure at all during an OAuth outage shorter than the tokens' remaining lifetime;
//! 3. after an outage longer than that, no failure later than 5 s after the server's return.
//!
//! `MCP_SOAK_SECONDS` (default 80: one round of events, as `tests/run` runs it) sets the length;
//! `tests/chaos/soak.sh <seconds>` runs longer soaks. Ends with the log scan for token bytes.

mod e2e_support;
mod operator_support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use e2e_support::*;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::repo_root;
use operator_support::*;

const TOKEN_TTL: u64 = 15;
const UPSTREAMS: usize = 10;
const CLIENTS_PER_UPSTREAM: usize = 2;
/// Renew with 2/3 of the lifetime left (10 s of 15): a kube-apiserver restart takes about 8 s here,
/// and no Secret can be written while it is down. The default (1/3 left, 5 s) is too little for
/// 15-second tokens.
const RENEW_BEFORE_PERCENTAGE: u32 = 66;
/// A lease this short lets a standby take over well within a token's remaining life.
const LEASE_SECONDS: &str = "4";
/// One round of events; the soak repeats rounds until its time is up.
const ROUND: Duration = Duration::from_secs(80);
const SHORT_OUTAGE: Duration = Duration::from_secs(3);
/// Longer than a token lives, so every credential expires during it.
const LONG_OUTAGE: Duration = Duration::from_secs(20);
const RECOVERY: Duration = Duration::from_secs(5);

/// One thing the soak did, at an offset from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Steady,
    OAuthRestart,
    LeaderKilled,
    ApiServerRestart,
    SecretDeleted,
    LongOAuthOutage,
    OAuthBack,
}

impl Event {
    fn label(self) -> &'static str {
        match self {
            Event::Steady => "steady",
            Event::OAuthRestart => "oauth restart (3 s)",
            Event::LeaderKilled => "leader killed",
            Event::ApiServerRestart => "apiserver restart",
            Event::SecretDeleted => "secret deleted",
            Event::LongOAuthOutage => "oauth down 20 s",
            Event::OAuthBack => "oauth back",
        }
    }
}

/// A client-visible failure.
#[derive(Clone, Debug)]
struct Failure {
    at: Duration,
    credential: String,
    cause: &'static str,
    detail: String,
}

/// The operator replicas, restarted as a kubelet would when one exits on its own (a lost Lease),
/// and every log they wrote, for the scan.
struct Operators<'a> {
    cp: &'a mcp_credentials_e2e::ControlPlane,
    ns: &'a str,
    running: Vec<(String, Operator)>,
    logs: Vec<std::path::PathBuf>,
    started: usize,
    restarts: u32,
}

impl<'a> Operators<'a> {
    fn start(cp: &'a mcp_credentials_e2e::ControlPlane, ns: &'a str, replicas: usize) -> Self {
        let mut operators = Operators {
            cp,
            ns,
            running: Vec::new(),
            logs: Vec::new(),
            started: 0,
            restarts: 0,
        };
        for _ in 0..replicas {
            operators.add();
        }
        operators
    }

    /// Starts one more replica, `op-<n>`.
    fn add(&mut self) {
        let id = format!("op-{}", self.started);
        self.started += 1;
        let op = Operator::start(self.cp, self.ns, &id, &["--lease-duration", LEASE_SECONDS]);
        self.logs.push(op.log.clone());
        self.running.push((id, op));
    }

    /// Restarts replicas that exited until `until`.
    async fn supervise_until(&mut self, until: Instant) {
        loop {
            for (id, op) in self.running.iter_mut() {
                if op.exited() {
                    self.restarts += 1;
                    eprintln!("operator {id} exited on its own; starting it again");
                    *id = format!("{id}-r{}", self.restarts);
                    *op = Operator::start(self.cp, self.ns, id, &["--lease-duration", LEASE_SECONDS]);
                    self.logs.push(op.log.clone());
                }
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(500))).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_see_no_authentication_failure_through_restarts_kills_and_outages() {
    let seconds: u64 = std::env::var("MCP_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUND.as_secs());
    let (cp, ns) = setup("soak");
    let dir = run_dir("soak");
    let mut oauth = OAuth::start(&dir, TOKEN_TTL);
    create_secret(cp, &ns, "idp", &[("secret", CLIENT_SECRET)]);
    let mut servers = Vec::new();
    let mut names = Vec::new();
    for i in 0..UPSTREAMS {
        let server = McpServer::start(&oauth, &dir).await;
        let name = format!("upstream-{i}");
        apply(
            cp,
            &ns,
            &credential_yaml(&name, &server.url, &oauth.token_url(), RENEW_BEFORE_PERCENTAGE),
        );
        servers.push(server);
        names.push(name);
    }
    let mut operators = Operators::start(cp, &ns, 2);
    let creds: Api<McpCredential> = Api::namespaced(client(cp).await, &ns);
    for name in &names {
        wait_condition(&creds, name, "Ready", "True", None).await;
    }
    let sidecar = SidecarProcess::start(cp, &ns, &names, &dir);
    wait_for("the sidecar is ready", || async {
        sidecar.ready().await.then_some(())
    })
    .await;

    // Concurrent MCP clients, each keeping a session and opening a new one after a failure.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<Failure>::new()));
    let mut clients = Vec::new();
    for (i, name) in names
        .iter()
        .cycle()
        .take(UPSTREAMS * CLIENTS_PER_UPSTREAM)
        .enumerate()
    {
        let url = format!("{}/{name}", sidecar.url);
        let name = name.clone();
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            let mut session = None;
            let mut a = i as i64;
            while !stop.load(Ordering::Relaxed) {
                let attempt = async {
                    match &session {
                        Some(s) => call_sum(s, a).await.map(|()| None),
                        None => connect(&url).await.map(Some),
                    }
                };
                let result = tokio::time::timeout(Duration::from_secs(20), attempt)
                    .await
                    .unwrap_or_else(|_| Err("timed out after 20 s".into()));
                match result {
                    Ok(Some(s)) => session = Some(s),
                    Ok(None) => {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(Failure {
                            at: start.elapsed(),
                            credential: name.clone(),
                            cause: cause(&e),
                            detail: format!("{url}: {}", e.chars().take(300).collect::<String>()),
                        });
                        session = None;
                    }
                }
                a += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    // The events, round after round.
    let mut timeline: Vec<(Duration, Event)> = vec![(Duration::ZERO, Event::Steady)];
    let mut long_outage_returns = Vec::new();
    let mut short_outages = Vec::new();
    let at = |offset: u64, round: u32| ROUND * round + Duration::from_secs(offset);

    let mut round = 0;
    while ROUND * (round + 1) <= Duration::from_secs(seconds.max(ROUND.as_secs())) {
        operators.supervise_until(start + at(5, round)).await;
        let began = start.elapsed();
        timeline.push((began, Event::OAuthRestart));
        eprintln!("[{:>6.1}s] restarting the OAuth server", began.as_secs_f64());
        oauth.stop();
        operators.supervise_until(Instant::now() + SHORT_OUTAGE).await;
        oauth.resume();
        short_outages.push((began, start.elapsed()));

        operators.supervise_until(start + at(18, round)).await;
        // Leadership may be changing hands (after the last kube-apiserver restart): wait for a leader.
        let ops = &operators.running;
        let leader = wait_for("an operator leads", || async move {
            for (i, (id, op)) in ops.iter().enumerate() {
                if op
                    .metric(&format!(r#"mcp_credentials_leader{{identity="{id}"}}"#))
                    .await
                    == 1.0
                {
                    return Some(i);
                }
            }
            None
        })
        .await;
        timeline.push((start.elapsed(), Event::LeaderKilled));
        eprintln!(
            "[{:>6.1}s] killing the leader (SIGKILL)",
            start.elapsed().as_secs_f64()
        );
        operators.running.remove(leader).1.kill();
        operators.add();

        operators.supervise_until(start + at(28, round)).await;
        timeline.push((start.elapsed(), Event::ApiServerRestart));
        eprintln!(
            "[{:>6.1}s] restarting kube-apiserver",
            start.elapsed().as_secs_f64()
        );
        let restarted = tokio::task::spawn_blocking(|| {
            std::process::Command::new(repo_root().join("tests/control-plane"))
                .arg("restart-apiserver")
                .status()
                .unwrap()
                .success()
        })
        .await
        .unwrap();
        assert!(restarted, "tests/control-plane restart-apiserver failed");
        eprintln!(
            "[{:>6.1}s] kube-apiserver is ready again",
            start.elapsed().as_secs_f64()
        );

        operators.supervise_until(start + at(42, round)).await;
        let victim = format!("{}-mcp-credential", names[round as usize % names.len()]);
        timeline.push((start.elapsed(), Event::SecretDeleted));
        eprintln!(
            "[{:>6.1}s] deleting Secret {victim}",
            start.elapsed().as_secs_f64()
        );
        let out = cp.kubectl(&["delete", "secret", &victim, "-n", &ns]);
        assert!(out.success, "deleting {victim}: {}", out.stderr);

        operators.supervise_until(start + at(46, round)).await;
        timeline.push((start.elapsed(), Event::LongOAuthOutage));
        eprintln!(
            "[{:>6.1}s] stopping the OAuth server for 20 s",
            start.elapsed().as_secs_f64()
        );
        oauth.stop();
        operators.supervise_until(Instant::now() + LONG_OUTAGE).await;
        oauth.resume();
        let back = start.elapsed();
        timeline.push((back, Event::OAuthBack));
        eprintln!("[{:>6.1}s] the OAuth server is back", back.as_secs_f64());
        long_outage_returns.push(back);
        round += 1;
        operators.supervise_until(start + ROUND * round).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = start.elapsed();
    let failures = failures.lock().unwrap().clone();
    let calls = calls.load(Ordering::Relaxed);

    // The report: failures by cause and by the last event before them.
    let phase = |t: Duration| timeline.iter().rev().find(|(s, _)| *s <= t).unwrap().1;
    let mut table: BTreeMap<&str, BTreeMap<Event, u64>> = BTreeMap::new();
    for f in &failures {
        *table.entry(f.cause).or_default().entry(phase(f.at)).or_default() += 1;
    }
    let events = [
        Event::Steady,
        Event::OAuthRestart,
        Event::LeaderKilled,
        Event::ApiServerRestart,
        Event::SecretDeleted,
        Event::LongOAuthOutage,
        Event::OAuthBack,
    ];
    let restarts = operators.restarts;
    let mut report = format!(
        "\nsoak: {:.0} s, {round} round(s), {UPSTREAMS} upstreams, {} clients, {TOKEN_TTL}-second tokens: \
         {calls} tool calls succeeded, {} failed; operators that exited on their own (restarted): {restarts}\n\n{:<44}",
        elapsed.as_secs_f64(),
        UPSTREAMS * CLIENTS_PER_UPSTREAM,
        failures.len(),
        "client-visible failures by cause / after event"
    );
    for e in events {
        report.push_str(&format!(" | {:>19}", e.label()));
    }
    report.push('\n');
    for (cause, by_event) in &table {
        report.push_str(&format!("{cause:<44}"));
        for e in events {
            report.push_str(&format!(" | {:>19}", by_event.get(&e).copied().unwrap_or(0)));
        }
        report.push('\n');
    }
    if table.is_empty() {
        report.push_str("(none)\n");
    }
    // Which credentials failed after which event: a deleted Secret should hurt its own only.
    let mut who: BTreeMap<Event, BTreeMap<&str, u64>> = BTreeMap::new();
    for f in &failures {
        *who.entry(phase(f.at))
            .or_default()
            .entry(&f.credential)
            .or_default() += 1;
    }
    for (event, by_credential) in who {
        let list: Vec<String> = by_credential.iter().map(|(c, n)| format!("{c} ({n})")).collect();
        report.push_str(&format!("  after {}: {}\n", event.label(), list.join(", ")));
    }
    // When, after each event, its failures began and ended.
    for (i, (t, event)) in timeline.iter().enumerate() {
        let end = timeline.get(i + 1).map(|(n, _)| *n).unwrap_or(elapsed);
        let mut span = failures
            .iter()
            .filter(|f| f.at >= *t && f.at < end)
            .map(|f| f.at - *t);
        if let Some(first) = span.next() {
            let last = span.next_back().unwrap_or(first);
            report.push_str(&format!(
                "  {} at {:.1} s: failures from +{:.1} s to +{:.1} s\n",
                event.label(),
                t.as_secs_f64(),
                first.as_secs_f64(),
                last.as_secs_f64()
            ));
        }
    }
    let metrics = sidecar.metrics().await;
    let sum = |prefix: &str, containing: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(containing))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    };
    report.push_str(&format!(
        "\nsidecar: {} expired-credential refusals, {} upstream 401/403, {} answers 503 in all\n",
        sum("mcp_credentials_sidecar_expired_refusals_total", ""),
        sum("mcp_credentials_sidecar_upstream_rejections_total", ""),
        sum("mcp_credentials_sidecar_requests_total", r#"status="503""#),
    ));
    let mut recoveries = Vec::new();
    for back in &long_outage_returns {
        let last = failures
            .iter()
            .filter(|f| f.at >= *back && f.at < *back + Duration::from_secs(30))
            .map(|f| f.at)
            .max();
        recoveries.push(last.map(|l| l.saturating_sub(*back)).unwrap_or_default());
    }
    report.push_str(&format!(
        "recovery after each 20 s OAuth outage (last failure after its return): {:?}\n",
        recoveries
            .iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
    ));

    // The goals.
    let outage = |t: Duration| {
        timeline
            .iter()
            .any(|(s, e)| *e == Event::LongOAuthOutage && t >= *s && t < *s + LONG_OUTAGE + RECOVERY)
    };
    let mut missed = Vec::new();
    let auth: Vec<_> = failures
        .iter()
        .filter(|f| f.cause.starts_with("upstream 401") && !outage(f.at))
        .collect();
    if !auth.is_empty() {
        missed.push(format!(
            "{} authentication failures while the OAuth server was reachable",
            auth.len()
        ));
    }
    for (from, to) in &short_outages {
        let during: Vec<_> = failures
            .iter()
            .filter(|f| f.at >= *from && f.at < *to + Duration::from_secs(5))
            .collect();
        if !during.is_empty() {
            missed.push(format!(
                "{} failures during a {} s OAuth outage shorter than the tokens' life",
                during.len(),
                SHORT_OUTAGE.as_secs()
            ));
        }
    }
    for (back, took) in long_outage_returns.iter().zip(&recoveries) {
        if *took > RECOVERY {
            missed.push(format!(
                "recovery took {:.1} s after the OAuth server returned at {:.0} s",
                took.as_secs_f64(),
                back.as_secs_f64()
            ));
        }
    }
    report.push_str(&format!(
        "goals: {}\n",
        if missed.is_empty() {
            "all met".to_owned()
        } else {
            format!("MISSED: {}", missed.join("; "))
        }
    ));
    let mut samples: BTreeMap<&str, &Failure> = BTreeMap::new();
    for f in &failures {
        samples.entry(f.cause).or_insert(f);
    }
    for (cause, f) in samples {
        report.push_str(&format!(
            "first {cause} at {:.1} s: {}\n",
            f.at.as_secs_f64(),
            f.detail
        ));
    }
    eprintln!("{report}");
    std::fs::write(dir.join("report.txt"), &report).unwrap();
    eprintln!("logs and report: {} (kept when a check fails)", dir.display());
    assert!(calls > 0, "no tool call succeeded");

    // Security: no token bytes in any log line of the run.
    drop(sidecar);
    let operator_logs = std::mem::take(&mut operators.logs);
    drop(operators);
    drop(oauth);
    let secrets_of_run = secrets_of_run(&dir.join("issued-tokens"));
    let mut logs = all_logs(&dir);
    logs.extend(operator_logs);
    assert_no_secrets_in_logs(&logs, &secrets_of_run);
    assert!(missed.is_empty(), "soak goals missed:{report}");
    cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    if std::env::var_os("MCP_SOAK_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

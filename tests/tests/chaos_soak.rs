//! The chaos soak: 20-second tokens, ten MCP servers (official Rust SDK) each demanding its own
//! audience and one taking an API key, two operator replicas with leader election (watching every namespace, each reaching the
//! API server through its own TCP fault proxy, and all of them through one more), the sidecar, and
//! concurrent MCP clients calling tools through it, while the test restarts the OAuth server, floods
//! the operators' metrics listeners and the sidecar's admin listener with idle and half-sent
//! connections, kills the operator leader, restarts kube-apiserver, deletes an output Secret by
//! hand, takes the OAuth server away for longer than a token lives, makes every API connection of
//! the operators fail for 10 s right after a rotating refresh token is answered, blackholes the
//! leader's API connections, and rotates an API key (the upstream takes both keys until the new one
//! has reached the credential's Secret, then only the new one). Throughout, a slow tenant (16 credentials in another namespace whose
//! upstream names 1,000 authorization servers that never answer) competes for the operators.
//! Prints the client-visible failures by cause and by event, and fails when a goal is missed:
//!
//! 1. no authentication failure (upstream 401) while the OAuth server is reachable;
//! 2. no failure at all during an OAuth outage shorter than the tokens' remaining lifetime;
//! 3. after an outage longer than that, no failure later than 5 s after the server's return;
//! 4. the slow tenant adds no failure: none after the start, the listener flood or the leader kill
//!    (and the slow credentials do fail, saying why);
//! 5. every flood connection is closed by the servers;
//! 6. the refresh token rotated while every API write fails is not lost: the Secret holds the live
//!    one of its chain after each round, and the credential never needs a new sign-in;
//! 7. a standby takes over from the blackholed leader, which has stopped leading by then, and from
//!    then to the end of the round exactly one replica (the new leader) writes Secrets;
//! 8. no upstream 401 or 403 after any of the new events (flood, API writes, blackhole, API-key
//!    rotation);
//! 9. the API-key credential (which never expires) sees no failure at all, rotations included.
//!
//! `MCP_SOAK_SECONDS` (default 115: one round of events, as `tests/run` runs it) sets the length;
//! `tests/chaos/soak.sh <seconds>` runs longer soaks. Ends with the log scan for token bytes.

mod e2e_support;
mod operator_support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use e2e_support::*;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, OAuth2, SHARD_LABEL, api_key, secret_key, yaml_stream},
    fault_proxy::{Fault, FaultProxy, contains},
    repo_root,
};
use operator_support::*;
use rmcp::transport::streamable_http_server::{StreamableHttpService, session::local::LocalSessionManager};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// 20 s: the operator renews no sooner than 10 s after issue (`MIN_RENEWAL_INTERVAL`), so shorter
/// tokens would have less than 10 s left at renewal (15-second ones: 5 s, less than a leader
/// takeover and its first renewals take here).
const TOKEN_TTL: u64 = 20;
const UPSTREAMS: usize = 10;
const CLIENTS_PER_UPSTREAM: usize = 2;
/// Renew with half of the lifetime left (10 s of 20, at the minimum renewal interval): a
/// kube-apiserver restart takes about 8 s here, and no Secret can be written while it is down.
const RENEW_BEFORE_PERCENTAGE: i32 = 50;
/// A lease this short lets a standby take over well within a token's remaining life.
const LEASE_SECONDS: &str = "4";
/// One round of events; the soak repeats rounds until its time is up.
const ROUND: Duration = Duration::from_secs(115);
const SHORT_OUTAGE: Duration = Duration::from_secs(3);
/// Longer than a token lives, so every credential expires during it.
const LONG_OUTAGE: Duration = Duration::from_secs(25);
const RECOVERY: Duration = Duration::from_secs(5);
/// How long every API connection of the operators fails after the rotating token's answer.
const API_FAULT: Duration = Duration::from_secs(10);
/// How long the leader's API connections are blackholed (longer, if no standby has taken over).
const BLACKHOLE: Duration = Duration::from_secs(8);
/// The access-token lifetime of the rotating refresh-token credential (renewed at 2/3 of it): long
/// enough that a SIGKILL of the leader rarely falls between a rotation's answer and its write-back.
const ROTATING_TTL: u64 = 30;
/// The slow tenant: credentials, and the authorization servers their upstream names.
const SLOW_CREDENTIALS: usize = 16;
const SLOW_SERVERS: usize = 1000;
/// The listener flood: connections to each operator's metrics listener and to the sidecar's admin
/// listener (about 2,000 in all with two replicas).
const FLOOD_PER_OPERATOR: usize = 600;
const FLOOD_SIDECAR: usize = 800;
/// How long the flood's connections may stay open before the servers count as not closing them.
const FLOOD_CLOSE_DEADLINE: Duration = Duration::from_secs(90);
/// How long after the credential's Secret holds the new API key the upstream drops the old one: a
/// moment for the sidecar's watch.
const KEY_GAP: Duration = Duration::from_millis(300);
const SECRET_WRITES: &str = r#"mcp_credentials_kube_api_requests_total{method="PATCH",resource="secrets"}"#;

/// One thing the soak did, at an offset from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Steady,
    OAuthRestart,
    ListenerFlood,
    LeaderKilled,
    ApiServerRestart,
    SecretDeleted,
    LongOAuthOutage,
    OAuthBack,
    ApiWritesFail,
    LeaderBlackholed,
    ApiKeyRotated,
}

impl Event {
    const ALL: [Event; 11] = [
        Event::Steady,
        Event::OAuthRestart,
        Event::ListenerFlood,
        Event::LeaderKilled,
        Event::ApiServerRestart,
        Event::SecretDeleted,
        Event::LongOAuthOutage,
        Event::OAuthBack,
        Event::ApiWritesFail,
        Event::LeaderBlackholed,
        Event::ApiKeyRotated,
    ];

    fn label(self) -> &'static str {
        match self {
            Event::Steady => "steady",
            Event::OAuthRestart => "oauth restart (3 s)",
            Event::ListenerFlood => "listener flood",
            Event::LeaderKilled => "leader killed",
            Event::ApiServerRestart => "apiserver restart",
            Event::SecretDeleted => "secret deleted",
            Event::LongOAuthOutage => "oauth down 25 s",
            Event::OAuthBack => "oauth back",
            Event::ApiWritesFail => "api writes fail 10 s",
            Event::LeaderBlackholed => "leader blackholed",
            Event::ApiKeyRotated => "api key rotated",
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

fn leader_series(id: &str) -> String {
    format!(r#"mcp_credentials_leader{{identity="{id}"}}"#)
}

/// One operator replica, with its own fault proxy in front of the shared one: its network.
struct Replica {
    id: String,
    op: Operator,
    proxy: FaultProxy,
    kubeconfig: PathBuf,
}

/// The operator replicas, each watching every namespace (`--selector`: this run's credentials only)
/// with its Lease in the run's namespace, and reaching the API server through its own fault proxy
/// and then a shared one. Restarted as a kubelet would when one exits on its own, and every log
/// they wrote is kept, for the scan.
struct Operators {
    lease_ns: String,
    selector: String,
    /// In front of kube-apiserver, shared by every replica: faults for all of them.
    api: FaultProxy,
    /// The token kubeconfig's text, and its server URL (replaced by each replica's proxy).
    kubeconfig: String,
    server: String,
    running: Vec<Replica>,
    logs: Vec<PathBuf>,
    started: usize,
    restarts: u32,
}

impl Operators {
    async fn start(cp: &ControlPlane, lease_ns: &str, selector: &str, replicas: usize) -> Self {
        let kubeconfig = std::fs::read_to_string(token_kubeconfig(cp)).unwrap();
        let server = kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix("server:").map(|v| v.trim().to_owned()))
            .expect("a server in the kubeconfig");
        let addr: SocketAddr = server
            .strip_prefix("https://")
            .expect("an https server")
            .trim_end_matches('/')
            .parse()
            .expect("an IP:port server");
        let mut operators = Operators {
            lease_ns: lease_ns.to_owned(),
            selector: selector.to_owned(),
            api: FaultProxy::start(addr).await,
            kubeconfig,
            server,
            running: Vec::new(),
            logs: Vec::new(),
            started: 0,
            restarts: 0,
        };
        for _ in 0..replicas {
            operators.add().await;
        }
        operators
    }

    fn spawn(&self, id: &str, kubeconfig: &std::path::Path) -> Operator {
        Operator::start_cluster_wide_with_kubeconfig(
            &self.lease_ns,
            id,
            &[
                "--lease-duration",
                LEASE_SECONDS,
                "--selector",
                &self.selector,
                // The slow tenant's upstream and its authorization servers are on 127.0.0.1.
                "--discovery-allow-loopback",
            ],
            kubeconfig,
        )
    }

    /// Starts one more replica, `op-<n>`, behind a fresh proxy of its own. The proxy listens on
    /// 127.0.0.1 as the API server does, so the server's certificate still matches.
    async fn add(&mut self) {
        let id = format!("op-{}", self.started);
        self.started += 1;
        let proxy = FaultProxy::start(self.api.addr()).await;
        let kubeconfig = std::env::temp_dir().join(format!(
            "mcp-e2e-{}-soak-{id}-proxied.kubeconfig",
            std::process::id()
        ));
        let text = self
            .kubeconfig
            .replace(&self.server, &format!("https://{}", proxy.addr()));
        std::fs::write(&kubeconfig, text).unwrap();
        let op = self.spawn(&id, &kubeconfig);
        self.logs.push(op.log.clone());
        self.running.push(Replica {
            id,
            op,
            proxy,
            kubeconfig,
        });
    }

    /// Restarts replicas that exited until `until` (behind the same proxy).
    async fn supervise_until(&mut self, until: Instant) {
        loop {
            for i in 0..self.running.len() {
                if self.running[i].op.exited() {
                    self.restarts += 1;
                    let id = format!("{}-r{}", self.running[i].id, self.restarts);
                    eprintln!(
                        "operator {} exited on its own; starting it again as {id}",
                        self.running[i].id
                    );
                    let op = self.spawn(&id, &self.running[i].kubeconfig);
                    self.logs.push(op.log.clone());
                    self.running[i].op = op;
                    self.running[i].id = id;
                }
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(500))).await;
        }
    }

    /// The replica that says it leads, other than `except`.
    async fn leader(&self, except: Option<&str>) -> Option<usize> {
        for (i, r) in self.running.iter().enumerate() {
            if Some(r.id.as_str()) != except && r.op.metric(&leader_series(&r.id)).await == 1.0 {
                return Some(i);
            }
        }
        None
    }

    /// Each replica's Secret writes so far (read until its metrics listener answers).
    async fn secret_writes(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for r in &self.running {
            let n = wait_for(&format!("the metrics of {}", r.id), || async {
                let text = r.op.metrics().await;
                (!text.is_empty()).then(|| metric_value(&text, SECRET_WRITES))
            })
            .await;
            out.insert(r.id.clone(), n);
        }
        out
    }
}

impl Drop for Operators {
    fn drop(&mut self) {
        for r in &self.running {
            let _ = std::fs::remove_file(&r.kubeconfig);
        }
    }
}

// ---- The listener flood (as in listeners.rs and sidecar/tests/abuse.rs) ----------------------------

/// What one flood did: connections opened (and refused), and those the servers had not closed by
/// the deadline.
#[derive(Clone, Copy, Debug, Default)]
struct Flooded {
    opened: usize,
    refused: usize,
    still_open: usize,
}

/// Opens `n` connections to each target (every other one sends the start of a request, the rest
/// nothing at all), then waits until the servers have closed them, or [`FLOOD_CLOSE_DEADLINE`].
async fn flood(targets: Vec<(SocketAddr, usize, &'static [u8])>) -> Flooded {
    let mut out = Flooded::default();
    let mut conns = Vec::new();
    for (addr, n, partial) in targets {
        for i in 0..n {
            match TcpStream::connect(addr).await {
                Ok(mut tcp) => {
                    if i % 2 == 1 {
                        let _ = tcp.write_all(partial).await;
                    }
                    conns.push(tcp);
                }
                Err(_) => out.refused += 1,
            }
        }
    }
    out.opened = conns.len();
    let deadline = tokio::time::Instant::now() + FLOOD_CLOSE_DEADLINE;
    let mut buf = [0; 1024];
    for tcp in &mut conns {
        let closed = async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // An answer (a 408, or the connection limit's): read on until it closes.
                    Ok(_) => continue,
                }
            }
        };
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            out.still_open += 1;
        }
    }
    out
}

// ---- An upstream that takes exactly one API key (as in sidecar/tests/rotation.rs) ------------------

/// The keys an upstream accepts now.
type Keys = Arc<Mutex<Vec<String>>>;

/// An rmcp server at `url` that accepts only the current `X-API-Key`s (anything else: 401 with an
/// API-key challenge, no Bearer `invalid_token`), and how many requests it refused.
struct KeyUpstream {
    url: String,
    keys: Keys,
    refused: Arc<AtomicU64>,
}

impl KeyUpstream {
    async fn start(key: &str) -> Self {
        let keys = Arc::new(Mutex::new(vec![key.to_owned()]));
        let refused = Arc::new(AtomicU64::new(0));
        let service: StreamableHttpService<Tools, LocalSessionManager> =
            StreamableHttpService::new(|| Ok(Tools::default()), Default::default(), Default::default());
        let app = Router::new()
            .nest_service("/mcp", service)
            .layer(axum::middleware::from_fn_with_state(
                (keys.clone(), refused.clone()),
                check_key,
            ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        KeyUpstream { url, keys, refused }
    }

    /// From now on `key` is accepted too.
    fn also_accept(&self, key: &str) {
        self.keys.lock().unwrap().push(key.to_owned());
    }

    /// From now on only `key` is accepted.
    fn accept_only(&self, key: &str) {
        *self.keys.lock().unwrap() = vec![key.to_owned()];
    }
}

async fn check_key(
    State((keys, refused)): State<(Keys, Arc<AtomicU64>)>,
    request: Request,
    next: Next,
) -> Response {
    let sent = request.headers().get("x-api-key").and_then(|v| v.to_str().ok());
    if !sent.is_some_and(|sent| keys.lock().unwrap().iter().any(|k| k == sent)) {
        refused.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", r#"ApiKey realm="mcp", header="X-API-Key""#)],
        )
            .into_response();
    }
    next.run(request).await
}

// ---- The rotating refresh token ---------------------------------------------------------------------

/// The refresh-token credential's request to refresh now (`refresh-requested-at`).
fn force(v: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {"mcpcredentials.dev/refresh-requested-at": v}}})
}

/// The refresh request the credential's Secret was last made for.
fn handled(s: &Secret) -> Option<String> {
    s.metadata
        .annotations
        .as_ref()?
        .get("mcpcredentials.dev/refresh-requested-at")
        .cloned()
}

/// True when `token` is the live refresh token of its chain (issued, not consumed by a rotation).
async fn refresh_token_is_live(oauth: &OAuth, token: &str) -> bool {
    let url = reqwest::Url::parse_with_params(
        &format!("{}/test/refresh-token-status", oauth.issuer()),
        [("token", token)],
    )
    .unwrap();
    let Ok(answer) = reqwest::get(url).await else {
        return false;
    };
    answer
        .json::<serde_json::Value>()
        .await
        .is_ok_and(|v| v["found"] == true && v["consumed"] == false)
}

/// Whether the Secret `login` holds the live refresh token, asked a few times (a rotation may be
/// between its answer and its write-back).
async fn login_token_is_live(secrets: &Api<Secret>, oauth: &OAuth) -> bool {
    for _ in 0..20 {
        if let Ok(s) = secrets.get("login").await
            && let Some(token) = data(&s, "refresh-token")
            && refresh_token_is_live(oauth, &token).await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// What the API fault of one round did to the rotating credential.
#[derive(Debug, Default)]
struct ApiFaultRound {
    /// The token answer started the fault.
    started: bool,
    connections_reset: u64,
    /// The forced refresh completed afterwards.
    refreshed: bool,
    reauth_required: bool,
    live: bool,
}

/// What the blackhole of one round showed.
#[derive(Debug, Default)]
struct BlackholeRound {
    old: String,
    /// The standby that took over, and after how long (reported, not a goal).
    new: Option<(String, Duration)>,
    /// The old leader still said it led when the new one did.
    old_still_led: bool,
    /// The replicas that wrote Secrets from the takeover to the end of the round.
    writers: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_see_no_authentication_failure_through_restarts_kills_and_outages() {
    let seconds: u64 = std::env::var("MCP_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUND.as_secs());
    let setup_began = Instant::now();
    let (cp, ns) = setup("soak");
    let slow_ns = cp.namespace("soak-slow");
    let shard = ns.clone();
    let selector = format!("{SHARD_LABEL}={shard}");
    let dir = run_dir("soak");
    let mut oauth = OAuth::start(&dir, TOKEN_TTL);
    create_secret(cp, &ns, "idp", &[("secret", CLIENT_SECRET)]);
    let mut servers = Vec::new();
    let mut names = Vec::new();
    for i in 0..UPSTREAMS {
        let server = McpServer::start(&oauth, &dir).await;
        let name = format!("upstream-{i}");
        let credential = credential(&name, &server.url, &oauth.token_url(), RENEW_BEFORE_PERCENTAGE);
        apply(cp, &ns, &credential.label(SHARD_LABEL, &shard).yaml());
        servers.push(server);
        names.push(name);
    }

    // The slow tenant: 16 credentials in another namespace whose upstream's metadata names 1,000
    // authorization servers that accept a connection and never answer.
    let hole = blackhole().await;
    let slow_url = slow_upstream(hole, SLOW_SERVERS).await;
    create_secret(cp, &slow_ns, "idp", &[("secret", "unused")]);
    let slow_credentials = (0..SLOW_CREDENTIALS).map(|i| {
        Credential::new(&format!("slow-{i}"), &slow_url, OAuth2::cc_basic()).label(SHARD_LABEL, &shard)
    });
    apply(cp, &slow_ns, &yaml_stream(slow_credentials));

    // A rotating refresh-token credential, from an OAuth server of its own that is never restarted
    // (oidc-provider keeps its grants in memory), reached through a proxy that sees its answers.
    let rt_oauth = OAuth::start(&dir, ROTATING_TTL);
    let token_proxy = FaultProxy::start(([127, 0, 0, 1], rt_oauth.port).into()).await;
    let rotating_upstream = format!("http://127.0.0.1:{}/rotating", free_port());
    let rt0 = rt_oauth.mint_refresh_token(&rotating_upstream).await;
    create_secret(
        cp,
        &ns,
        "login",
        &[("client-secret", RT_CLIENT_SECRET), ("refresh-token", &rt0)],
    );
    apply(
        cp,
        &ns,
        &Credential::new(
            "rotating",
            &rotating_upstream,
            OAuth2::rt_client().token_url(&format!("http://{}/token", token_proxy.addr())),
        )
        .label(SHARD_LABEL, &shard)
        .yaml(),
    );

    // An API-key credential served by the sidecar too, rotated twice a round.
    let key_of = |round: u32, n: u32| format!("soak-api-key-{}-{round}-{n}", std::process::id());
    let mut api_keys = vec![key_of(0, 0)];
    let key_upstream = KeyUpstream::start(&api_keys[0]).await;
    create_secret(cp, &ns, "keys", &[("api-key", &api_keys[0])]);
    apply(
        cp,
        &ns,
        &Credential::new(
            "apikey",
            &key_upstream.url,
            api_key(secret_key("keys", "api-key")),
        )
        .label(SHARD_LABEL, &shard)
        .header("X-API-Key")
        .format("{token}")
        .yaml(),
    );
    let mut served = names.clone();
    served.push("apikey".to_owned());

    let mut operators = Operators::start(cp, &ns, &selector, 2).await;
    let kube = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(kube.clone(), &ns);
    let slow: Api<McpCredential> = Api::namespaced(kube.clone(), &slow_ns);
    let secrets: Api<Secret> = Api::namespaced(kube, &ns);
    for name in served.iter().chain(["rotating".to_owned()].iter()) {
        wait_condition(&creds, name, "Ready", "True", None).await;
    }
    // The next token answer with a refresh token, once armed, makes every API connection of the
    // operators fail for 10 s before they read it: the write-back of the rotated token meets a
    // dead API server.
    let armed = Arc::new(AtomicBool::new(false));
    {
        let (armed, control) = (armed.clone(), operators.api.control());
        token_proxy.on_upstream_bytes(move |chunk| {
            if contains(chunk, b"\"refresh_token\"") && armed.swap(false, Ordering::SeqCst) {
                control.fault_for(Fault::Reset, API_FAULT);
            }
        });
    }
    let sidecar = SidecarProcess::start(cp, &ns, &served, &dir);
    wait_for("the sidecar is ready", || async {
        sidecar.ready().await.then_some(())
    })
    .await;

    // Concurrent MCP clients, each keeping a session and opening a new one after a failure.
    eprintln!("setup took {:.1} s", setup_began.elapsed().as_secs_f64());
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<Failure>::new()));
    let mut clients = Vec::new();
    for (i, name) in served
        .iter()
        .cycle()
        .take(served.len() * CLIENTS_PER_UPSTREAM)
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
    let mut floods = Vec::new();
    let mut api_faults: Vec<ApiFaultRound> = Vec::new();
    let mut blackholes: Vec<BlackholeRound> = Vec::new();
    let at = |offset: u64, round: u32| ROUND * round + Duration::from_secs(offset);
    let log = |what: &str| eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64());
    let metrics_partial: &'static [u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let admin_partial: &'static [u8] = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    let admin: SocketAddr = ([127, 0, 0, 1], sidecar.admin_port).into();

    let mut round = 0;
    while ROUND * (round + 1) <= Duration::from_secs(seconds.max(ROUND.as_secs())) {
        operators.supervise_until(start + at(5, round)).await;
        let began = start.elapsed();
        timeline.push((began, Event::OAuthRestart));
        log("restarting the OAuth server");
        oauth.stop();
        operators.supervise_until(Instant::now() + SHORT_OUTAGE).await;
        oauth.resume();
        short_outages.push((began, start.elapsed()));

        operators.supervise_until(start + at(12, round)).await;
        timeline.push((start.elapsed(), Event::ListenerFlood));
        log("flooding the operators' metrics and the sidecar's admin listeners");
        let mut targets: Vec<(SocketAddr, usize, &'static [u8])> = operators
            .running
            .iter()
            .map(|r| {
                (
                    ([127, 0, 0, 1], r.op.port).into(),
                    FLOOD_PER_OPERATOR,
                    metrics_partial,
                )
            })
            .collect();
        targets.push((admin, FLOOD_SIDECAR, admin_partial));
        floods.push(tokio::spawn(flood(targets)));

        operators.supervise_until(start + at(18, round)).await;
        // Leadership may be changing hands (after the last blackhole): wait for a leader.
        let ops = &operators;
        let leader = wait_for("an operator leads", || async move { ops.leader(None).await }).await;
        timeline.push((start.elapsed(), Event::LeaderKilled));
        log("killing the leader (SIGKILL)");
        operators.running.remove(leader).op.kill();
        operators.add().await;

        operators.supervise_until(start + at(28, round)).await;
        timeline.push((start.elapsed(), Event::ApiServerRestart));
        log("restarting kube-apiserver");
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
        log("kube-apiserver is ready again");

        operators.supervise_until(start + at(42, round)).await;
        let victim = format!("{}-mcp-credential", names[round as usize % names.len()]);
        timeline.push((start.elapsed(), Event::SecretDeleted));
        log(&format!("deleting Secret {victim}"));
        let out = cp.kubectl(&["delete", "secret", &victim, "-n", &ns]);
        assert!(out.success, "deleting {victim}: {}", out.stderr);

        operators.supervise_until(start + at(46, round)).await;
        timeline.push((start.elapsed(), Event::LongOAuthOutage));
        log("stopping the OAuth server for 25 s");
        oauth.stop();
        operators.supervise_until(Instant::now() + LONG_OUTAGE).await;
        oauth.resume();
        let back = start.elapsed();
        timeline.push((back, Event::OAuthBack));
        log("the OAuth server is back");
        long_outage_returns.push(back);

        // API writes fail right after a token answer: force a refresh of the rotating credential;
        // its answer (a rotated refresh token) starts 10 s of reset API connections.
        operators.supervise_until(start + at(77, round)).await;
        let control = operators.api.control();
        let (faults, resets) = (control.faults_started(), control.connections_reset());
        timeline.push((start.elapsed(), Event::ApiWritesFail));
        log("forcing a rotation; its token answer starts 10 s of failing API connections");
        let request = format!("soak-{round}");
        armed.store(true, Ordering::SeqCst);
        creds
            .patch(
                "rotating",
                &PatchParams::default(),
                &Patch::Merge(&force(&request)),
            )
            .await
            .unwrap();
        let mut outcome = ApiFaultRound::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && (control.faults_started() == faults || control.current() != Fault::None)
        {
            operators
                .supervise_until(Instant::now() + Duration::from_millis(250))
                .await;
        }
        armed.store(false, Ordering::SeqCst);
        outcome.started = control.faults_started() > faults;
        outcome.connections_reset = control.connections_reset() - resets;
        log(&format!(
            "the API fault {} ({} connections reset)",
            if outcome.started { "ended" } else { "never started" },
            outcome.connections_reset
        ));
        // The forced refresh completes, or the credential needs a new sign-in: by the round's
        // schedule, and at least 30 s after the fault ended (the operator's write-back and
        // retries wait out their backoff; the next events start late then, which they allow).
        let fault_over = Instant::now();
        let refresh_deadline = (start + at(93, round)).max(fault_over + Duration::from_secs(30));
        while Instant::now() < refresh_deadline {
            let c = creds.get("rotating").await.ok();
            if c.as_ref()
                .and_then(|c| condition(c, "ReauthRequired"))
                .is_some_and(|(s, _, _)| s == "True")
            {
                outcome.reauth_required = true;
                break;
            }
            let s = secrets.get("rotating-mcp-credential").await.ok();
            let ready = c
                .as_ref()
                .and_then(|c| condition(c, "Ready"))
                .is_some_and(|(s, _, _)| s == "True");
            if ready && s.as_ref().and_then(handled).as_deref() == Some(request.as_str()) {
                outcome.refreshed = true;
                log(&format!(
                    "the forced refresh completed {:.1} s after the API fault ended",
                    fault_over.elapsed().as_secs_f64()
                ));
                break;
            }
            operators
                .supervise_until(Instant::now() + Duration::from_millis(500))
                .await;
        }
        outcome.live = login_token_is_live(&secrets, &rt_oauth).await;
        log(&format!(
            "rotating credential: refreshed {}, ReauthRequired {}, refresh token live {}",
            outcome.refreshed, outcome.reauth_required, outcome.live
        ));
        api_faults.push(outcome);

        // The leader blackholed: its API connections stay open and carry nothing.
        operators.supervise_until(start + at(95, round)).await;
        let ops = &operators;
        let old = wait_for("an operator leads", || async move { ops.leader(None).await }).await;
        let old_id = operators.running[old].id.clone();
        let hole_control = operators.running[old].proxy.control();
        timeline.push((start.elapsed(), Event::LeaderBlackholed));
        log(&format!("blackholing the leader {old_id}"));
        hole_control.set(Fault::Blackhole);
        let holed = Instant::now();
        let mut outcome = BlackholeRound {
            old: old_id.clone(),
            ..Default::default()
        };
        let mut before = BTreeMap::new();
        while holed.elapsed() < BLACKHOLE * 3 {
            operators
                .supervise_until(Instant::now() + Duration::from_millis(250))
                .await;
            if let Some(i) = operators.leader(Some(&old_id)).await {
                let took = holed.elapsed();
                let new_id = operators.running[i].id.clone();
                outcome.old_still_led = match operators.running.iter().find(|r| r.id == old_id) {
                    Some(r) => r.op.metric(&leader_series(&old_id)).await == 1.0,
                    None => false,
                };
                before = operators.secret_writes().await;
                log(&format!("{new_id} took over after {:.1} s", took.as_secs_f64()));
                outcome.new = Some((new_id, took));
                break;
            }
        }
        operators.supervise_until(holed + BLACKHOLE).await;
        hole_control.set(Fault::None);
        log(&format!("{old_id}'s API connections flow again"));

        // The API key rotated as one is in a cluster: the upstream accepts the new key as well, the
        // Secret gets it, and once the credential's Secret (which the sidecar watches) holds it, the
        // upstream takes the new key only, a moment later. (Without the overlap, the sidecar in
        // Kubernetes mode replays no API-key rejection: see README, "The chaos soak".)
        operators.supervise_until(start + at(106, round)).await;
        let key = key_of(round, 1);
        api_keys.push(key.clone());
        timeline.push((start.elapsed(), Event::ApiKeyRotated));
        log("rotating the API key");
        key_upstream.also_accept(&key);
        let patch = serde_json::json!({"stringData": {"api-key": key}});
        secrets
            .patch("keys", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let s = secrets.get("apikey-mcp-credential").await.ok();
            if s.and_then(|s| data(&s, "header.X-API-Key")).as_deref() == Some(key.as_str()) {
                break;
            }
            operators
                .supervise_until(Instant::now() + Duration::from_millis(100))
                .await;
        }
        tokio::time::sleep(KEY_GAP).await;
        key_upstream.accept_only(&key);
        log("the upstream takes the new API key only");

        round += 1;
        operators.supervise_until(start + ROUND * round).await;
        if outcome.new.is_some() {
            let after = operators.secret_writes().await;
            outcome.writers = after
                .iter()
                .filter(|(id, n)| **n > before.get(*id).copied().unwrap_or(0.0))
                .map(|(id, _)| id.clone())
                .collect();
        }
        log(&format!(
            "replicas that wrote Secrets since the takeover: {:?}",
            outcome.writers
        ));
        blackholes.push(outcome);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = start.elapsed();
    let failures = failures.lock().unwrap().clone();
    let calls = calls.load(Ordering::Relaxed);
    let mut flooded = Vec::new();
    for f in floods {
        flooded.push(f.await.unwrap());
    }
    // The slow tenant's failures, as its credentials' status says them (an attempt walks three
    // metadata requests of --token-timeout each; a leader change drops the attempts in flight).
    let mut slow_failing = 0;
    let mut slow_message = String::new();
    for i in 0..SLOW_CREDENTIALS {
        let message = slow
            .get(&format!("slow-{i}"))
            .await
            .ok()
            .and_then(|c| c.status?.last_failure_message);
        if let Some(m) = message {
            slow_failing += 1;
            if !slow_message.contains("not tried") {
                slow_message = m;
            }
        }
    }
    // Its end says why: "… 997 not tried (…): at most the first 3 are …".
    let slow_why = match slow_message.find("the other authorization servers") {
        Some(i) => slow_message[i..].chars().take(160).collect::<String>(),
        None => slow_message.chars().take(160).collect(),
    };
    let rotating = creds.get("rotating").await.unwrap();
    let final_reauth = condition(&rotating, "ReauthRequired").is_some_and(|(s, _, _)| s == "True");
    let final_live = login_token_is_live(&secrets, &rt_oauth).await;

    // The report: failures by cause and by the last event before them.
    let phase = |t: Duration| timeline.iter().rev().find(|(s, _)| *s <= t).unwrap().1;
    let mut table: BTreeMap<&str, BTreeMap<Event, u64>> = BTreeMap::new();
    for f in &failures {
        *table.entry(f.cause).or_default().entry(phase(f.at)).or_default() += 1;
    }
    let restarts = operators.restarts;
    let mut report = format!(
        "\nsoak: {:.0} s, {round} round(s), {UPSTREAMS} OAuth upstreams and 1 API-key upstream, {} clients, {TOKEN_TTL}-second tokens: \
         {calls} tool calls succeeded, {} failed; operators that exited on their own (restarted): {restarts}\n\n{:<44}",
        elapsed.as_secs_f64(),
        served.len() * CLIENTS_PER_UPSTREAM,
        failures.len(),
        "client-visible failures by cause / after event"
    );
    for e in Event::ALL {
        report.push_str(&format!(" | {:>20}", e.label()));
    }
    report.push('\n');
    for (cause, by_event) in &table {
        report.push_str(&format!("{cause:<44}"));
        for e in Event::ALL {
            report.push_str(&format!(" | {:>20}", by_event.get(&e).copied().unwrap_or(0)));
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
        // Until the next event (the API write fault comes 5 s later).
        let next = timeline
            .iter()
            .map(|(t, _)| *t)
            .find(|t| t > back)
            .unwrap_or(elapsed);
        let last = failures
            .iter()
            .filter(|f| f.at >= *back && f.at < next)
            .map(|f| f.at)
            .max();
        recoveries.push(last.map(|l| l.saturating_sub(*back)).unwrap_or_default());
    }
    report.push_str(&format!(
        "recovery after each 25 s OAuth outage (last failure after its return): {:?}\n",
        recoveries
            .iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
    ));
    report.push_str(&format!(
        "slow tenant: {SLOW_CREDENTIALS} credentials in {slow_ns}, {slow_failing} with a failure in their status: {slow_why:?}\n"
    ));
    for (i, f) in flooded.iter().enumerate() {
        report.push_str(&format!(
            "listener flood {}: {} connections opened ({} refused), {} not closed by the servers within {} s\n",
            i + 1,
            f.opened,
            f.refused,
            f.still_open,
            FLOOD_CLOSE_DEADLINE.as_secs()
        ));
    }
    for (i, a) in api_faults.iter().enumerate() {
        report.push_str(&format!(
            "api writes fail {}: fault started {}, {} API connections reset; forced rotation done {}, \
             ReauthRequired {}, refresh token in the Secret live {}\n",
            i + 1,
            a.started,
            a.connections_reset,
            a.refreshed,
            a.reauth_required,
            a.live
        ));
    }
    for (i, b) in blackholes.iter().enumerate() {
        report.push_str(&format!(
            "leader blackholed {}: {} blackholed; {}; it still led then: {}; Secret writers from then to the round's end: {:?}\n",
            i + 1,
            b.old,
            match &b.new {
                Some((id, took)) => format!("{id} took over after {:.1} s", took.as_secs_f64()),
                None => "no standby took over".to_owned(),
            },
            b.old_still_led,
            b.writers
        ));
    }
    let key_failures = failures.iter().filter(|f| f.credential == "apikey").count();
    report.push_str(&format!(
        "api key: {} rotations; the upstream refused {} requests; {key_failures} client failures\n",
        api_keys.len() - 1,
        key_upstream.refused.load(Ordering::Relaxed),
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
    // The slow tenant: no failure where nothing else was in the way.
    let quiet = [Event::Steady, Event::ListenerFlood, Event::LeaderKilled];
    let added = failures.iter().filter(|f| quiet.contains(&phase(f.at))).count();
    if added > 0 {
        missed.push(format!(
            "{added} failures after the start, a listener flood or a leader kill (the slow tenant's share)"
        ));
    }
    if !slow_message.contains("not tried") {
        missed.push(format!(
            "the slow tenant did not fail as it should (its status says {slow_why:?})"
        ));
    }
    for (i, f) in flooded.iter().enumerate() {
        if f.still_open > 0 || f.opened == 0 {
            missed.push(format!(
                "listener flood {}: {} of {} connections not closed by the servers",
                i + 1,
                f.still_open,
                f.opened
            ));
        }
    }
    for (i, a) in api_faults.iter().enumerate() {
        if !(a.started && a.refreshed && !a.reauth_required && a.live) {
            missed.push(format!(
                "api writes fail {}: the rotated refresh token was lost or the fault did not happen ({a:?})",
                i + 1
            ));
        }
    }
    if final_reauth || !final_live {
        missed.push(format!(
            "at the end, the rotating credential's refresh token is lost (ReauthRequired {final_reauth}, live {final_live})"
        ));
    }
    for (i, b) in blackholes.iter().enumerate() {
        let ok = match &b.new {
            Some((id, _)) => !b.old_still_led && b.writers == [id.clone()],
            None => false,
        };
        if !ok {
            missed.push(format!(
                "leader blackholed {}: not exactly one leader writing afterwards ({b:?})",
                i + 1
            ));
        }
    }
    let new_events = [
        Event::ListenerFlood,
        Event::ApiWritesFail,
        Event::LeaderBlackholed,
        Event::ApiKeyRotated,
    ];
    let rejected = failures
        .iter()
        .filter(|f| f.cause.starts_with("upstream 4") && new_events.contains(&phase(f.at)))
        .count();
    if rejected > 0 {
        missed.push(format!(
            "{rejected} upstream 401/403 after a listener flood, API write fault, blackhole or API-key rotation"
        ));
    }
    if key_failures > 0 {
        missed.push(format!(
            "{key_failures} failures of the API-key credential (it never expires)"
        ));
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
    drop(rt_oauth);
    let mut secrets_of_run = secrets_of_run(&dir.join("issued-tokens"));
    secrets_of_run.push(RT_CLIENT_SECRET.to_owned());
    secrets_of_run.extend(api_keys);
    let mut logs = all_logs(&dir);
    logs.extend(operator_logs);
    assert_no_secrets_in_logs(&logs, &secrets_of_run);
    assert!(missed.is_empty(), "soak goals missed:{report}");
    cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    cp.kubectl(&["delete", "namespace", &slow_ns, "--wait=false"]);
    if std::env::var_os("MCP_SOAK_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

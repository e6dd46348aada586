//! Reports from sidecars: `POST /v1/report` on the webhook's HTTPS listener. A sidecar whose upstream
//! rejected the credential (401 `invalid_token`, 403 `insufficient_scope`) asks for a refresh now,
//! authenticated with its pod's service-account token. The operator checks the token with a
//! TokenReview, checks that the service account may use the credential (its namespace and
//! `spec.access`), and, when the reported version is still the current one and no refresh was forced
//! in the last `--report-min-interval` (10 s), writes the refresh-request annotation: the leader's controller then
//! refreshes. Any replica may answer, because the annotation is how the request reaches the leader.
//!
//! [`decide`] holds every rule as a pure function; [`handle`] gathers its facts from the API.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use jiff::Timestamp;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Secret,
};
use kube::{
    Api, Client, Resource as _,
    api::{Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use mcp_credentials_core::{
    McpCredential,
    secret::{VERSION_KEY, secret_name},
    source::sign_in::{
        self,
        step_up::{self, StepUp},
    },
};
use tracing::{info, warn};

use crate::{controller::REFRESH_REQUESTED_ANNOTATION, metrics::Metrics};

pub use mcp_credentials_core::report::{PATH, Reason, Report};

/// The default of `--report-min-interval`: at most one refresh forced by reports per credential in
/// this window. Enough for a token request and the new Secret to reach every sidecar, short enough
/// that a credential revoked twice in a row is replaced again soon. Reports within the window get
/// 429 and cause nothing.
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(10);
/// The field manager of the refresh-request annotation written for a report.
const FIELD_MANAGER: &str = "mcp-credentials-report";

/// Who sent the report, according to the TokenReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No bearer token, or the API server did not authenticate it.
    Unauthenticated,
    /// Authenticated, but not as a service account.
    User(String),
    /// A service account, and the pod its token is bound to (absent for tokens not bound to a pod).
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The pod its token is bound to.
        pod: Option<String>,
    },
}

impl Identity {
    /// From a TokenReview's status: `system:serviceaccount:<namespace>:<name>`, with the pod name
    /// the API server adds for pod-bound tokens.
    pub fn from_review(review: &TokenReview) -> Identity {
        let Some(status) = review.status.as_ref().filter(|s| s.authenticated == Some(true)) else {
            return Identity::Unauthenticated;
        };
        let Some(user) = status.user.as_ref() else {
            return Identity::Unauthenticated;
        };
        let username = user.username.clone().unwrap_or_default();
        match username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        {
            Some((namespace, name)) => Identity::ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                pod: user
                    .extra
                    .as_ref()
                    .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
                    .and_then(|v| v.first())
                    .cloned(),
            },
            None => Identity::User(username),
        }
    }
}

/// What the handler found, for [`decide`].
#[derive(Debug)]
pub struct Facts<'a> {
    /// The report.
    pub report: &'a Report,
    /// Its sender.
    pub identity: &'a Identity,
    /// The credential, `None` when it does not exist.
    pub credential: Option<&'a McpCredential>,
    /// The `version` of the credential's Secret now (`None`: no Secret yet).
    pub current_version: Option<&'a str>,
    /// The last refresh forced for this credential (by a report, or by anyone through the annotation).
    pub last_forced: Option<Timestamp>,
    /// At most one forced refresh per credential in this long.
    pub window: Duration,
    /// Now.
    pub now: Timestamp,
}

/// The answer to a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 202: a refresh is requested now.
    Refresh,
    /// 202: the reported version is no longer the current one; the sidecar will see the newer one.
    AlreadyNewer,
    /// 202: a step-up was recorded in the sign-in Secret (a signed-in credential's 403
    /// `insufficient_scope`). No refresh is forced: none widens a grant, and the write changed an
    /// input of the credential, whose reconcile publishes a new version anyway.
    StepUpRecorded,
    /// 400: the body is not a report.
    BadRequest(String),
    /// 401: no valid service-account token.
    Unauthenticated,
    /// 403: the sender may not use the credential.
    Forbidden(String),
    /// 404: no such credential.
    NotFound(String),
    /// 429: a refresh was forced less than the window ago; retry after this many seconds.
    RateLimited(u64),
    /// 429: too many reports from this sender or from everyone, before any token is checked; retry
    /// after this many seconds.
    Throttled(u64),
    /// 500: the API server could not be asked (retry later).
    Unavailable,
}

impl Answer {
    /// The metric label.
    pub fn result(&self) -> &'static str {
        match self {
            Answer::Refresh => "refresh_requested",
            Answer::AlreadyNewer => "already_newer",
            Answer::StepUpRecorded => "step_up_recorded",
            Answer::BadRequest(_) => "bad_request",
            Answer::Unauthenticated => "unauthenticated",
            Answer::Forbidden(_) => "forbidden",
            Answer::NotFound(_) => "not_found",
            Answer::RateLimited(_) => "rate_limited",
            Answer::Throttled(_) => "throttled",
            Answer::Unavailable => "error",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Answer::Refresh | Answer::AlreadyNewer | Answer::StepUpRecorded => StatusCode::ACCEPTED,
            Answer::BadRequest(_) => StatusCode::BAD_REQUEST,
            Answer::Unauthenticated => StatusCode::UNAUTHORIZED,
            Answer::Forbidden(_) => StatusCode::FORBIDDEN,
            Answer::NotFound(_) => StatusCode::NOT_FOUND,
            Answer::RateLimited(_) | Answer::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Answer::Unavailable => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> String {
        match self {
            Answer::Refresh => "refresh requested".into(),
            Answer::AlreadyNewer => "a newer credential is already published".into(),
            Answer::StepUpRecorded => {
                "the credential lacks consent, which no refresh gives: recorded in its sign-in Secret; its \
                 ReauthRequired condition says what to do"
                    .into()
            }
            Answer::BadRequest(m) | Answer::Forbidden(m) | Answer::NotFound(m) => m.clone(),
            Answer::Unauthenticated => {
                "a valid service-account token is required (Authorization: Bearer <token>)".into()
            }
            Answer::RateLimited(s) => {
                format!("a refresh of this credential was just requested; retry in {s} s")
            }
            Answer::Throttled(s) => format!("too many reports; retry in {s} s"),
            Answer::Unavailable => "cannot check the report now; retry later".into(),
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"result": self.result(), "message": self.message()}));
        let mut response = (self.status(), body).into_response();
        if let Answer::RateLimited(s) | Answer::Throttled(s) = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        response
    }
}

/// Who may report: an authenticated service account of the credential's namespace that its access
/// policy allows. Returns the credential, or the answer that ends the report.
pub fn authorize<'a>(
    report: &Report,
    identity: &Identity,
    credential: Option<&'a McpCredential>,
) -> Result<&'a McpCredential, Answer> {
    let (sa_namespace, sa_name) = match identity {
        Identity::Unauthenticated => return Err(Answer::Unauthenticated),
        Identity::User(user) => {
            return Err(Answer::Forbidden(format!(
                "{user:?} is not a service account; only a sidecar's service account may report"
            )));
        }
        Identity::ServiceAccount { namespace, name, .. } => (namespace, name),
    };
    let (namespace, name) = (&report.namespace, &report.credential);
    // Before the lookup, so that a service account cannot learn what exists in other namespaces.
    if sa_namespace != namespace {
        return Err(Answer::Forbidden(format!(
            "service account {sa_namespace}/{sa_name} may not report on McpCredential {namespace}/{name}: \
             only service accounts of its own namespace may"
        )));
    }
    let Some(credential) = credential else {
        return Err(Answer::NotFound(format!(
            "McpCredential {namespace}/{name} does not exist"
        )));
    };
    let allowed = credential.spec.allowed();
    if !allowed.permits(sa_name) {
        return Err(Answer::Forbidden(format!(
            "service account {sa_namespace}/{sa_name} may not use McpCredential {namespace}/{name}: \
             it allows {allowed}"
        )));
    }
    Ok(credential)
}

/// Every rule, in order: who sent it and whether it may use the credential ([`authorize`]), whether
/// the report is still news, and whether a refresh was forced too recently.
pub fn decide(f: &Facts) -> Answer {
    if let Err(answer) = authorize(f.report, f.identity, f.credential) {
        return answer;
    }
    if f.current_version != Some(f.report.version.as_str()) {
        return Answer::AlreadyNewer;
    }
    if let Some(last) = f.last_forced {
        let since = f.now.duration_since(last);
        let window = jiff::SignedDuration::try_from(f.window).unwrap_or(jiff::SignedDuration::MAX);
        if since < window {
            let left = (window - since.max(jiff::SignedDuration::ZERO))
                .as_secs_f64()
                .ceil();
            return Answer::RateLimited(left as u64);
        }
    }
    Answer::Refresh
}

/// What the report endpoint shares.
pub struct ReportApp {
    client: Client,
    metrics: Metrics,
    recorder: Recorder,
    window: Duration,
    /// The last refresh each credential (`namespace/name`) was forced by a report on this replica.
    /// The annotation carries it across replicas; this closes the gap until the watch shows it.
    forced: Mutex<HashMap<String, Timestamp>>,
    /// Reports let through to a TokenReview, by sender and in all.
    limiter: Mutex<Limiter>,
}

/// A token bucket's refill rate and size.
#[derive(Clone, Copy, Debug)]
struct Rate {
    per_second: f64,
    burst: f64,
}

/// Reports from all senders that may cost a TokenReview: a sidecar reports only when an upstream
/// rejects a credential, so even a cluster-wide revocation reaching a thousand pods is answered
/// within a minute, while a flood of forged tokens costs the API server at most this much.
const ALL_REPORTS: Rate = Rate {
    per_second: 20.0,
    burst: 100.0,
};
/// Reports from one address (one pod): a pod with a few credentials rejected at once fits the
/// burst, and its sidecar retries later anyway.
const PEER_REPORTS: Rate = Rate {
    per_second: 1.0,
    burst: 10.0,
};
/// Senders remembered; past this, the ones whose bucket is full again are forgotten.
const MAX_PEERS: usize = 4096;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn full(rate: Rate, now: std::time::Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: std::time::Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// Seconds until a token is available (0: one is).
    fn wait(&self, rate: Rate) -> u64 {
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) / rate.per_second).ceil().max(1.0) as u64
        }
    }
}

/// A global token bucket and one per sender, checked before any TokenReview.
#[derive(Debug)]
struct Limiter {
    all: Bucket,
    peers: HashMap<std::net::IpAddr, Bucket>,
}

impl Limiter {
    fn new(now: std::time::Instant) -> Self {
        Limiter {
            all: Bucket::full(ALL_REPORTS, now),
            peers: HashMap::new(),
        }
    }

    /// Takes a token from both buckets, or says how many seconds to wait.
    fn take(&mut self, peer: Option<std::net::IpAddr>, now: std::time::Instant) -> Result<(), u64> {
        self.all.refill(ALL_REPORTS, now);
        let mut wait = self.all.wait(ALL_REPORTS);
        if let Some(ip) = peer {
            if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&ip) {
                self.peers.retain(|_, b| {
                    b.refill(PEER_REPORTS, now);
                    b.tokens < PEER_REPORTS.burst
                });
                if self.peers.len() >= MAX_PEERS {
                    // Still full: every sender is busy; the global bucket alone decides.
                    self.peers.clear();
                }
            }
            let bucket = self
                .peers
                .entry(ip)
                .or_insert_with(|| Bucket::full(PEER_REPORTS, now));
            bucket.refill(PEER_REPORTS, now);
            wait = wait.max(bucket.wait(PEER_REPORTS));
            if wait == 0 {
                bucket.tokens -= 1.0;
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        self.all.tokens -= 1.0;
        Ok(())
    }
}

impl ReportApp {
    /// The endpoint's state; `identity` names this replica in events; `window`: at most one forced
    /// refresh per credential in this long.
    pub fn new(client: Client, metrics: Metrics, identity: &str, window: Duration) -> Arc<Self> {
        let reporter = Reporter {
            controller: "mcp-credentials-operator".into(),
            instance: Some(identity.into()),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            window,
            forced: Mutex::default(),
            limiter: Mutex::new(Limiter::new(std::time::Instant::now())),
        })
    }
}

/// `POST /v1/report` as a Router, to merge into the webhook's.
pub fn router(app: Arc<ReportApp>) -> Router {
    Router::new()
        .route(PATH, post(handle))
        .layer(DefaultBodyLimit::max(mcp_credentials_core::report::MAX_BODY))
        .with_state(app)
}

/// The handler: gathers the facts [`decide`] needs, in an order that asks the API server only what
/// the previous answer allows, then acts on the decision.
pub async fn handle(
    State(app): State<Arc<ReportApp>>,
    peer: Option<axum::Extension<mcp_credentials_core::listen::Peer>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer = peer.map(|axum::Extension(p)| p.0.ip());
    let answer = answer(&app, peer, &headers, &body).await;
    app.metrics.reports.with_label_values(&[answer.result()]).inc();
    answer.into_response()
}

async fn answer(app: &ReportApp, peer: Option<std::net::IpAddr>, headers: &HeaderMap, body: &[u8]) -> Answer {
    let report = match Report::parse(body) {
        Ok(r) => r,
        Err(m) => return Answer::BadRequest(m),
    };
    let identity = match bearer(headers) {
        None => Identity::Unauthenticated,
        Some(token) => {
            // Anyone can send a token: a TokenReview is paid for only within the rate limits.
            let allowed = app
                .limiter
                .lock()
                .expect("limiter lock")
                .take(peer, std::time::Instant::now());
            if let Err(wait) = allowed {
                return Answer::Throttled(wait);
            }
            match review(&app.client, token).await {
                Ok(identity) => identity,
                Err(e) => {
                    warn!(error = %e, "TokenReview failed");
                    return Answer::Unavailable;
                }
            }
        }
    };
    let same_namespace =
        matches!(&identity, Identity::ServiceAccount { namespace, .. } if *namespace == report.namespace);
    let credential = if same_namespace {
        let creds: Api<McpCredential> = Api::namespaced(app.client.clone(), &report.namespace);
        match creds.get_opt(&report.credential).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, namespace = %report.namespace, credential = %report.credential, "reading the McpCredential failed");
                return Answer::Unavailable;
            }
        }
    } else {
        None
    };
    let credential = match authorize(&report, &identity, credential.as_ref()) {
        Ok(c) => c,
        // Not allowed or not found: nothing more to read.
        Err(answer) => return logged(&report, &identity, answer),
    };
    let mut facts = Facts {
        report: &report,
        identity: &identity,
        credential: Some(credential),
        current_version: None,
        last_forced: None,
        window: app.window,
        now: Timestamp::now(),
    };
    let secrets: Api<Secret> = Api::namespaced(app.client.clone(), &report.namespace);
    let secret = secret_name(&report.credential, credential.spec.secret_name.as_deref());
    let current_version = match secrets.get_opt(&secret).await {
        Ok(s) => s.and_then(|s| {
            let bytes = s.data?.remove(VERSION_KEY)?;
            String::from_utf8(bytes.0).ok()
        }),
        Err(e) => {
            warn!(error = %e, namespace = %report.namespace, secret = %secret, "reading the credential's Secret failed");
            return Answer::Unavailable;
        }
    };
    if report.reason == Reason::InsufficientScope
        && current_version.as_deref() == Some(report.version.as_str())
        && let Some(o) = credential
            .spec
            .source
            .oauth2
            .as_ref()
            .filter(|_| sign_in::applies(&credential.spec))
    {
        // A signed-in credential lacks consent: no refresh widens a grant, a person must sign in.
        match record_step_up(app, &secrets, &report, credential, o).await {
            Err(answer) => return logged(&report, &identity, answer),
            Ok(true) => return logged(&report, &identity, Answer::StepUpRecorded),
            Ok(false) => {}
        }
    }
    let key = format!("{}/{}", report.namespace, report.credential);
    // Check and record under one lock, so two concurrent reports force one refresh.
    let answer = {
        let mut forced = app.forced.lock().expect("report lock");
        let annotated = credential
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REFRESH_REQUESTED_ANNOTATION))
            .and_then(|v| v.parse::<Timestamp>().ok());
        facts.current_version = current_version.as_deref();
        facts.last_forced = forced.get(&key).copied().max(annotated);
        let answer = decide(&facts);
        if answer == Answer::Refresh {
            forced.insert(key, facts.now);
        }
        answer
    };
    if answer != Answer::Refresh {
        return logged(&report, &identity, answer);
    }
    let patch = serde_json::json!({
        "metadata": {"annotations": {REFRESH_REQUESTED_ANNOTATION: facts.now.to_string()}}
    });
    let creds: Api<McpCredential> = Api::namespaced(app.client.clone(), &report.namespace);
    if let Err(e) = creds
        .patch(
            &report.credential,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Merge(&patch),
        )
        .await
    {
        warn!(error = %e, namespace = %report.namespace, credential = %report.credential, "requesting the refresh failed");
        app.forced
            .lock()
            .expect("report lock")
            .remove(&format!("{}/{}", report.namespace, report.credential));
        return Answer::Unavailable;
    }
    let who = match &identity {
        Identity::ServiceAccount {
            pod: Some(pod), name, ..
        } => format!("sidecar of pod {pod} (service account {name})"),
        Identity::ServiceAccount { name, .. } => format!("service account {name}"),
        _ => String::new(),
    };
    let note = format!(
        "refresh requested by {who}: the upstream answered {}",
        report.reason.as_str()
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "RefreshRequested".into(),
        note: Some(note),
        action: "Report".into(),
        secondary: None,
    };
    if let Err(e) = app.recorder.publish(&event, &credential.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
    logged(&report, &identity, Answer::Refresh)
}

/// Records the step-up a 403 `insufficient_scope` asks for (core's [`step_up::decide`]) in the
/// credential's sign-in Secret, key [`step_up::STEP_UP_KEY`], which `kubectl mcpcred login` reads;
/// the reconcile then says in `ReauthRequired` that more consent is needed and names the command.
/// Nothing is written while the same step-up waits for its sign-in. True when it wrote.
async fn record_step_up(
    app: &ReportApp,
    secrets: &Api<Secret>,
    report: &Report,
    credential: &McpCredential,
    o: &mcp_credentials_core::OAuth2Source,
) -> Result<bool, Answer> {
    let name = sign_in::secret_name(&report.credential, o);
    let secret = match secrets.get_opt(&name).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, namespace = %report.namespace, secret = %name, "reading the sign-in Secret failed");
            return Err(Answer::Unavailable);
        }
    };
    let value = |key: &str| {
        secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let previous = value(step_up::STEP_UP_KEY).and_then(|t| {
        StepUp::parse(&t).unwrap_or_else(|e| {
            warn!(namespace = %report.namespace, credential = %report.credential, error = %e, "the stored step-up is ignored");
            None
        })
    });
    let granted = value(sign_in::REGISTRATION_KEY)
        .and_then(|t| sign_in::Registrations::parse(&t).ok())
        .and_then(|r| r.granted_scope().map(str::to_owned));
    let challenged = report.scope.as_deref().unwrap_or("");
    let command = crate::controller::sign_in_command(&report.credential, &report.namespace);
    let (state, reason, note) = match step_up::decide(previous.as_ref(), granted.as_deref(), challenged) {
        step_up::Decision::Waiting(_) => return Ok(false),
        step_up::Decision::Ask(s) => {
            let note = s.message(&command);
            (s, "StepUpRequested", note)
        }
        step_up::Decision::GiveUp(s) if previous.as_ref() == Some(&s) => return Ok(false),
        step_up::Decision::GiveUp(s) => {
            let note = s.gave_up_message(challenged);
            (s, "StepUpExhausted", note)
        }
    };
    let patch = serde_json::json!({
        "data": {step_up::STEP_UP_KEY: base64::engine::general_purpose::STANDARD.encode(state.to_json().expose())}
    });
    if let Err(e) = secrets
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        warn!(error = %e, namespace = %report.namespace, secret = %name, "recording the step-up failed");
        return Err(Answer::Unavailable);
    }
    info!(namespace = %report.namespace, credential = %report.credential, scope = %state.scope, reason, "step-up recorded");
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Report".into(),
        secondary: None,
    };
    if let Err(e) = app.recorder.publish(&event, &credential.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
    Ok(true)
}

fn logged(report: &Report, identity: &Identity, answer: Answer) -> Answer {
    let sender = match identity {
        Identity::ServiceAccount { namespace, name, .. } => format!("{namespace}/{name}"),
        Identity::User(u) => u.clone(),
        Identity::Unauthenticated => "(unauthenticated)".into(),
    };
    info!(
        namespace = %report.namespace,
        credential = %report.credential,
        reason = report.reason.as_str(),
        sender = %sender,
        result = answer.result(),
        "sidecar report"
    );
    answer
}

/// The bearer token of the request, if any (never logged).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn review(client: &Client, token: &str) -> Result<Identity, kube::Error> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(Identity::from_review(&reviewed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::credential;

    fn report(version: &str) -> Report {
        Report {
            namespace: "agents".into(),
            credential: "github".into(),
            reason: Reason::InvalidToken,
            version: version.into(),
            scope: None,
        }
    }

    fn sa(namespace: &str, name: &str) -> Identity {
        Identity::ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
            pod: Some("agent-0".into()),
        }
    }

    fn now() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    fn decide_with(identity: &Identity, cred: Option<&McpCredential>, last: Option<i64>) -> Answer {
        decide(&Facts {
            report: &report("v1"),
            identity,
            credential: cred,
            current_version: Some("v1"),
            last_forced: last.map(|ago| now() - jiff::SignedDuration::from_secs(ago)),
            window: DEFAULT_RATE_WINDOW,
            now: now(),
        })
    }

    #[test]
    fn an_allowed_service_account_reporting_the_current_version_gets_a_refresh() {
        let cred = credential("github", &["research"], None);
        assert_eq!(
            decide_with(&sa("agents", "research"), Some(&cred), None),
            Answer::Refresh
        );
        let mut anyone = credential("github", &[], None);
        anyone.spec.access.as_mut().unwrap().all_service_accounts = Some(true);
        assert_eq!(
            decide_with(&sa("agents", "other"), Some(&anyone), Some(60)),
            Answer::Refresh
        );
        // Without an access list, nobody may use (or report on) the credential.
        let closed = credential("github", &[], None);
        assert!(matches!(
            decide_with(&sa("agents", "other"), Some(&closed), Some(60)),
            Answer::Forbidden(_)
        ));
    }

    #[test]
    fn authorization_alone_needs_no_secret_or_rate_limit_facts() {
        let cred = credential("github", &["research"], None);
        let ok = authorize(&report("v1"), &sa("agents", "research"), Some(&cred));
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn a_report_without_a_valid_token_is_unauthenticated() {
        let cred = credential("github", &[], None);
        let answer = decide_with(&Identity::Unauthenticated, Some(&cred), None);
        assert_eq!(answer, Answer::Unauthenticated);
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_service_account_outside_the_access_policy_is_forbidden_with_both_names() {
        let cred = credential("github", &["research"], None);
        let answer = decide_with(&sa("agents", "intruder"), Some(&cred), None);
        let Answer::Forbidden(message) = &answer else {
            panic!("{answer:?}")
        };
        assert!(
            message.contains("agents/intruder") && message.contains("agents/github"),
            "{message}"
        );
        assert_eq!(answer.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_service_account_of_another_namespace_is_forbidden_before_any_lookup() {
        let answer = decide_with(&sa("elsewhere", "research"), None, None);
        assert!(matches!(answer, Answer::Forbidden(_)), "{answer:?}");
    }

    #[test]
    fn a_user_that_is_not_a_service_account_is_forbidden() {
        let cred = credential("github", &[], None);
        let answer = decide_with(&Identity::User("alice".into()), Some(&cred), None);
        assert!(matches!(answer, Answer::Forbidden(_)), "{answer:?}");
    }

    #[test]
    fn an_unknown_credential_is_not_found() {
        let answer = decide_with(&sa("agents", "research"), None, None);
        assert!(matches!(answer, Answer::NotFound(_)), "{answer:?}");
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_report_on_an_old_version_requests_nothing() {
        let cred = credential("github", &["research"], None);
        let answer = decide(&Facts {
            report: &report("v1"),
            identity: &sa("agents", "research"),
            credential: Some(&cred),
            current_version: Some("v2"),
            last_forced: None,
            window: DEFAULT_RATE_WINDOW,
            now: now(),
        });
        assert_eq!(answer, Answer::AlreadyNewer);
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
    }

    #[test]
    fn a_second_refresh_within_ten_seconds_is_rate_limited() {
        let cred = credential("github", &["research"], None);
        let answer = decide_with(&sa("agents", "research"), Some(&cred), Some(3));
        assert_eq!(answer, Answer::RateLimited(7));
        let response = answer.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(
            decide_with(&sa("agents", "research"), Some(&cred), Some(10)),
            Answer::Refresh
        );
    }

    #[test]
    fn the_rate_limit_never_lets_a_stranger_learn_anything() {
        // A forbidden sender is told so even while a refresh was just forced.
        let cred = credential("github", &["research"], None);
        let answer = decide_with(&sa("agents", "intruder"), Some(&cred), Some(1));
        assert!(matches!(answer, Answer::Forbidden(_)), "{answer:?}");
    }

    #[test]
    fn a_malformed_report_is_refused_with_what_a_report_looks_like() {
        let e = Report::parse(b"{\"credential\":\"github\"}").unwrap_err();
        assert!(e.contains("expected"), "{e}");
        let e = Report::parse(
            br#"{"namespace":"agents","credential":"../x","reason":"invalid_token","version":"1"}"#,
        )
        .unwrap_err();
        assert!(e.contains("credential"), "{e}");
        let e = Report::parse(br#"{"namespace":"agents","credential":"x","reason":"bored","version":"1"}"#)
            .unwrap_err();
        assert!(e.contains("reason") || e.contains("variant"), "{e}");
        assert_eq!(
            Report::parse(
                br#"{"namespace":"agents","credential":"github","reason":"insufficient_scope","version":"v1"}"#
            )
            .unwrap()
            .reason,
            Reason::InsufficientScope
        );
    }

    #[test]
    fn a_token_review_names_the_service_account_and_its_pod() {
        let review: TokenReview = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {},
            "status": {"authenticated": true, "user": {
                "username": "system:serviceaccount:agents:research",
                "extra": {"authentication.kubernetes.io/pod-name": ["agent-0"]}
            }}
        }))
        .unwrap();
        assert_eq!(Identity::from_review(&review), sa("agents", "research"));
        let rejected: TokenReview = serde_json::from_value(serde_json::json!({
            "spec": {}, "status": {"authenticated": false, "error": "invalid bearer token"}
        }))
        .unwrap();
        assert_eq!(Identity::from_review(&rejected), Identity::Unauthenticated);
    }

    #[test]
    fn reports_past_the_burst_wait_for_the_refill_per_sender_and_in_all() {
        let t0 = std::time::Instant::now();
        let mut limiter = Limiter::new(t0);
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..PEER_REPORTS.burst as usize {
            assert_eq!(limiter.take(Some(a), t0), Ok(()));
        }
        assert_eq!(limiter.take(Some(a), t0), Err(1));
        // Another sender is not held back by the first one.
        assert_eq!(limiter.take(Some("10.0.0.2".parse().unwrap()), t0), Ok(()));
        assert_eq!(limiter.take(Some(a), t0 + Duration::from_secs(1)), Ok(()));
        // Everyone together: the global bucket.
        let mut limiter = Limiter::new(t0);
        let mut allowed = 0;
        for i in 0..1000u32 {
            let ip = std::net::IpAddr::from(i.to_be_bytes());
            allowed += usize::from(limiter.take(Some(ip), t0).is_ok());
        }
        assert_eq!(allowed, ALL_REPORTS.burst as usize);
        let answer = Answer::Throttled(1).into_response();
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn only_a_bearer_token_counts() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
    }
}

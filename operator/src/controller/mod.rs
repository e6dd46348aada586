//! Reconciles each McpCredential into its Secret: decide whether a refresh is due, obtain the
//! credential, persist a rotated refresh token, apply the Secret, write the status.
//!
//! All state survives a restart in the API: the Secret holds `expires-at`, `version` and
//! annotations (issue time, a fingerprint of the inputs, the last handled refresh request), and
//! the status holds `failedAttempts`. A restarted operator therefore re-issues nothing that is
//! still valid. The "invalid_grant for these inputs" marker is in the status too
//! (`invalidGrantInputs`), so a restarted operator does not redeem a dead refresh token again. Only
//! the next retry time lives in memory, keyed by the object's UID: a credential deleted and created
//! again under the same name starts clean, and what deleted credentials leave (memory, metrics) is
//! forgotten every [`FORGET_INTERVAL`].
//!
//! Fairness: one refresh takes at most `--refresh-timeout`, and when the operator watches every
//! namespace, at most `--namespace-concurrency` refreshes of one namespace run at once; a
//! credential whose namespace has no free slot tries again shortly, without holding a worker. So a
//! namespace whose servers never answer cannot delay another namespace's renewals.
//!
//! One more thing lives in memory, briefly: a rotated refresh token that is not written back yet
//! ([`PendingRefreshToken`]). It is kept from the moment the token answer is read until the
//! write-back succeeds, retried with backoff across reconciles (no token request meanwhile: the
//! one in the Secret is already revoked), and written on shutdown or loss of the Lease within a
//! grace period ([`flush_pending_refresh_tokens`]). The write-back only replaces the token we
//! redeemed (a resourceVersion precondition, re-read on conflict): a Secret that meanwhile holds
//! another refresh token (a new sign-in, or another credential sharing the key) is left alone.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Secret, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::Store,
    },
};
use mcp_credentials_core::{
    McpCredential, McpCredentialSpec, McpCredentialStatus, SecretKeyRef, SecretString, SessionCheck,
    policy::{self, Next},
    secret::{
        CREDENTIAL_LABEL, CredentialData, MANAGED_BY, MANAGED_BY_LABEL, SECRET_TYPE, VERSION_KEY, secret_name,
    },
    source::{
        self, Issued, ResolveError, SecretResolver, SourceContext, SourceError, session::SESSION_EXPIRED,
        token_exchange,
    },
    timing,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, debug, info, warn};

use crate::{keys::Keys, metrics::Metrics};

mod inputs;
mod output;
mod session;
mod status;
mod watches;
mod write_back;

use inputs::*;
use output::*;
use session::*;
use status::*;
use write_back::*;
pub use write_back::{
    flush_pending_refresh_tokens, pending_refresh_tokens, token_requests_finished, token_requests_running,
};

/// The one field manager for every write.
pub const FIELD_MANAGER: &str = "mcp-credentials-operator";
pub use mcp_credentials_core::REFRESH_REQUESTED_ANNOTATION;
/// Secret annotation: when the credential was issued (RFC 3339).
pub const ISSUED_AT_ANNOTATION: &str = "mcpcredentials.dev/issued-at";
/// Secret annotation: fingerprint of the spec and the referenced Secrets' versions it was made from.
pub const INPUTS_ANNOTATION: &str = "mcpcredentials.dev/inputs";
/// How long to wait after an API error before trying again.
const API_ERROR_REQUEUE: Duration = Duration::from_secs(5);
/// How often what deleted credentials leave behind (memory, metric series) is forgotten. Well under
/// the one minute `McpCredentialExpiringWithoutRenewal` waits before it fires.
pub const FORGET_INTERVAL: Duration = Duration::from_secs(10);
/// A credential whose namespace has no free refresh slot tries again after this, plus up to as much
/// jitter: short, since a slot frees as soon as one refresh ends, and it holds no worker meanwhile.
const NAMESPACE_BUSY_REQUEUE: Duration = Duration::from_secs(2);

/// Why a reconcile failed (API errors only: source failures are reported in status, not here).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a Secret failed.
    #[error("reading Secret {namespace}/{name}")]
    ReadSecret {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing the rotated refresh token back failed; the new access token was not published.
    #[error("persisting the rotated refresh token to Secret {namespace}/{name}")]
    PersistRefreshToken {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Applying the credential Secret failed.
    #[error("applying Secret {namespace}/{name}")]
    ApplySecret {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing the McpCredential's status failed.
    #[error("writing the status of McpCredential {namespace}/{name}")]
    ApplyStatus {
        /// Namespace.
        namespace: String,
        /// McpCredential name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// The last failed attempt (lost on restart, see the module doc).
#[derive(Default, Clone)]
struct LastFailure {
    /// The inputs fingerprint of the last failed attempt.
    failed_inputs: String,
    /// The refresh request annotation at the last failed attempt.
    failed_request: Option<String>,
    /// The last failure was invalid_grant: no retry until the inputs or the request change.
    reauth: bool,
    /// No attempt before this time (backoff after a failure) unless the inputs or the request change.
    next_retry: Option<SystemTime>,
}

/// Everything a reconcile remembers about one credential between runs (lost on restart, forgotten
/// when the credential is deleted).
#[derive(Default, Clone)]
struct Remembered {
    /// The last failed attempt, until an attempt succeeds.
    failure: Option<LastFailure>,
    /// The status this process last wrote. We are the only writer of status, so it is newer than a
    /// status read from the watch cache, which lags behind our own writes: using it avoids a
    /// second, redundant status write when a reconcile runs on a stale object.
    written: Option<McpCredentialStatus>,
    /// When a session credential's liveness was last checked (a restart checks again at once).
    checked: Option<SystemTime>,
}

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    /// HTTP clients and the discovery cache, shared by every refresh.
    sources: SourceContext,
    recorder: Recorder,
    metrics: Metrics,
    /// What reconciles remember about each credential, by [`memory_key`].
    remembered: Mutex<HashMap<String, Remembered>>,
    /// The signing keys of `jwt` credentials (`None`: this operator does not mint).
    keys: Option<Arc<Keys>>,
    /// Rotated refresh tokens not yet written back, by credential (`namespace/name`).
    pending: Mutex<HashMap<String, PendingRefreshToken>>,
    /// The credentials (`namespace/name`) whose token request is running: it runs to its end even
    /// when the reconcile that started it is gone (a lost Lease, the refresh timeout), so that a
    /// rotated refresh token in its answer is kept ([`write_back::obtain_to_the_end`]).
    in_flight: tokio::sync::watch::Sender<HashSet<String>>,
    /// The longest one refresh (discovery and token request) may take.
    refresh_timeout: Duration,
    /// At most this many refreshes of one namespace at once (`None`: no per-namespace limit).
    namespace_concurrency: Option<usize>,
    /// The refresh slots of each namespace.
    namespaces: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Until then, credentials that redeem a refresh token are not refreshed: this term took the
    /// Lease over from a leader that may still write back a rotated token.
    handover_until: Option<SystemTime>,
    /// The watches of the Secrets of the namespaces that hold credentials (every namespace watched).
    secret_watches: watches::NamespaceWatches,
    /// Which credentials write or read each Secret.
    secret_index: Mutex<watches::SecretIndex>,
}

/// The default of `--refresh-timeout`: well under any real token's lifetime, and long enough for
/// discovery plus one token request on a slow network.
pub const DEFAULT_REFRESH_TIMEOUT: Duration = Duration::from_secs(60);

/// The key of what a reconcile remembers about `cred`: namespace, name and UID, so that a
/// credential created again under the same name inherits nothing.
fn memory_key(cred: &McpCredential) -> String {
    format!(
        "{}/{}/{}",
        cred.namespace().unwrap_or_default(),
        cred.name_any(),
        cred.uid().unwrap_or_default()
    )
}

/// What `invalidGrantInputs` holds for these inputs and this refresh request.
fn reauth_marker(fingerprint: &str, requested: Option<&str>) -> String {
    match requested {
        None => fingerprint.to_owned(),
        Some(r) => format!("{fingerprint}-{:016x}", fnv1a(r.as_bytes())),
    }
}

impl Context {
    /// A context for `client`, using `sources` for token requests and discovery.
    pub fn new(client: Client, sources: SourceContext, metrics: Metrics, identity: &str) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.into()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            sources,
            metrics,
            remembered: Mutex::default(),
            keys: None,
            pending: Mutex::default(),
            in_flight: tokio::sync::watch::Sender::new(HashSet::new()),
            refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
            namespace_concurrency: None,
            namespaces: Mutex::default(),
            handover_until: None,
            secret_watches: watches::NamespaceWatches::default(),
            secret_index: Mutex::default(),
        }
    }

    /// Leaves credentials that redeem a refresh token alone until `until`.
    pub fn with_handover(mut self, until: SystemTime) -> Self {
        self.handover_until = Some(until);
        self
    }

    /// Gives up a refresh after `refresh_timeout`, and runs at most `namespace_concurrency`
    /// refreshes of one namespace at once (`None`: no per-namespace limit).
    pub fn with_limits(mut self, refresh_timeout: Duration, namespace_concurrency: Option<usize>) -> Self {
        self.refresh_timeout = refresh_timeout;
        self.namespace_concurrency = namespace_concurrency.map(|n| n.max(1));
        self
    }

    /// A refresh slot of `namespace`: `Some` (holding a permit while there is a limit), or `None`
    /// when every slot of the namespace is taken.
    fn namespace_slot(&self, namespace: &str) -> Option<Option<OwnedSemaphorePermit>> {
        let Some(limit) = self.namespace_concurrency else {
            return Some(None);
        };
        let semaphore = self
            .namespaces
            .lock()
            .unwrap()
            .entry(namespace.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone();
        semaphore.try_acquire_owned().ok().map(Some)
    }

    /// Forgets what credentials not in `store` left: memory, last written status, session check
    /// times, metric series, idle namespace slots.
    fn forget_deleted(&self, store: &Store<McpCredential>) {
        let state = store.state();
        let keys: HashSet<String> = state.iter().map(|c| memory_key(c)).collect();
        let names: HashSet<(String, String)> = state
            .iter()
            .map(|c| (c.namespace().unwrap_or_default(), c.name_any()))
            .collect();
        let namespaces: HashSet<&str> = names.iter().map(|(ns, _)| ns.as_str()).collect();
        self.remembered.lock().unwrap().retain(|k, _| keys.contains(k));
        self.namespaces
            .lock()
            .unwrap()
            .retain(|ns, s| namespaces.contains(ns.as_str()) || Arc::strong_count(s) > 1);
        self.secret_watches.retain(&namespaces);
        self.secret_index.lock().unwrap().retain(&names);
        let forgotten = self.metrics.forget_all_but(&names);
        if forgotten > 0 {
            debug!(forgotten, "forgot the metric series of deleted credentials");
        }
    }

    /// What is remembered about the credential `key` ([`memory_key`]).
    fn recall(&self, key: &str) -> Remembered {
        self.remembered
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes what is remembered about the credential `key`.
    fn remember(&self, key: &str, change: impl FnOnce(&mut Remembered)) {
        change(self.remembered.lock().unwrap().entry(key.to_owned()).or_default());
    }

    /// Mints `jwt` credentials with `keys`.
    pub fn with_keys(mut self, keys: Arc<Keys>) -> Self {
        self.keys = Some(keys);
        self
    }
}

/// Runs the controller until `shutdown` resolves. `namespace`: watch only that namespace;
/// `selector`: only the McpCredentials with these labels.
pub async fn run(ctx: Arc<Context>, namespace: Option<&str>, concurrency: u16, selector: Option<&str>) {
    let creds: Api<McpCredential> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (store, credentials) = crate::credentials::watch(creds, selector, crate::credentials::Keep::Status);
    // Our own status writes change neither the generation nor an annotation: they wake nothing.
    let credentials =
        credentials.predicate_filter(crate::credentials::spec_or_annotations, Default::default());
    // At most `concurrency` reconciles run at once, and they start in the order they fell due:
    // the controller's own limit would keep the ones beyond it in a set that it takes from in no
    // particular order, so under load the same credentials were renewed again and again while
    // others waited without end (10,000 credentials: 4,299 Ready, then no more). Unbounded there,
    // every due reconcile waits here instead, for a fair (first-come) semaphore's permit.
    let workers = Arc::new(Semaphore::new(usize::from(concurrency.max(1))));
    let controller = Controller::for_stream(credentials, store.clone());
    // Deleted credentials are never reconciled again: forget what they left, from the watch's view.
    let sweep = {
        let (ctx, store) = (ctx.clone(), store.clone());
        async move {
            if store.wait_until_ready().await.is_err() {
                return std::future::pending().await;
            }
            loop {
                tokio::time::sleep(FORGET_INTERVAL).await;
                ctx.forget_deleted(&store);
            }
        }
    };
    // Only the Secrets the operator manages are watched, by their metadata only (see `watches`):
    // a change of one wakes up the credentials that write it or read it.
    let mapper = {
        let ctx = ctx.clone();
        move |s: PartialObjectMeta<Secret>| {
            ctx.secret_index.lock().unwrap().affected(
                &s.namespace().unwrap_or_default(),
                &s.name_any(),
                s.resource_version().as_deref(),
            )
        }
    };
    let controller = match namespace {
        Some(ns) => controller.watches_stream(
            watches::secret_changes(ctx.client.clone(), Some(ns), None),
            mapper,
        ),
        None => controller
            .watches_stream(
                watches::secret_changes(ctx.client.clone(), None, Some(&watches::managed_selector())),
                mapper.clone(),
            )
            .watches_stream(ctx.secret_watches.start(ctx.client.clone()), mapper),
    };
    let controller = controller
        .run(
            move |cred, ctx| {
                // One span per reconcile: every line it logs names the credential and its generation.
                let span = tracing::info_span!(
                    "reconcile",
                    credential = %format!("{}/{}", cred.namespace().unwrap_or_default(), cred.name_any()),
                    generation = cred.metadata.generation.unwrap_or_default(),
                );
                let workers = workers.clone();
                async move {
                    let _worker = workers.acquire_owned().await;
                    // Boxed: a reconcile waiting for its turn holds only a pointer, not the
                    // whole reconcile's state.
                    Box::pin(reconcile(cred, ctx)).await
                }
                .instrument(span)
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move {
            match r {
                // Logged and counted by `error_policy`.
                Ok(_) | Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => warn!(error = %ErrorChain(&e), "the controller's queue failed"),
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = sweep => {}
    }
    ctx.secret_watches.stop();
}

use mcp_credentials_core::process::ErrorChain;

/// What kind of API failure a reconcile met, for the log, the metric and the wait before the next try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCategory {
    /// 403: the operator's RBAC does not allow it; an administrator must fix that.
    Forbidden,
    /// 404: the object went away meanwhile.
    NotFound,
    /// 409: another writer was first; read again and retry at once.
    Conflict,
    /// 429, 5xx, or no answer at all: the API server is busy or unreachable.
    Unavailable,
    /// Anything else (a 4xx the operator did not expect, a body it could not read).
    Other,
}

impl ErrorCategory {
    /// The `category` label of `mcp_credentials_reconcile_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::Other => "other",
        }
    }

    /// How long to wait before reconciling again.
    pub fn requeue(self) -> Duration {
        match self {
            // Only a change of RBAC helps: no hurry, but not forever (the watch may not tell).
            Self::Forbidden => Duration::from_secs(30),
            Self::NotFound | Self::Conflict => Duration::from_secs(1),
            Self::Unavailable | Self::Other => API_ERROR_REQUEUE,
        }
    }
}

impl Error {
    /// The kind of the underlying API failure.
    pub fn category(&self) -> ErrorCategory {
        let (Error::ReadSecret { source, .. }
        | Error::PersistRefreshToken { source, .. }
        | Error::ApplySecret { source, .. }
        | Error::ApplyStatus { source, .. }) = self;
        match source {
            kube::Error::Api(s) => match s.code {
                403 => ErrorCategory::Forbidden,
                404 => ErrorCategory::NotFound,
                409 => ErrorCategory::Conflict,
                429 | 500..=599 => ErrorCategory::Unavailable,
                _ => ErrorCategory::Other,
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) => ErrorCategory::Unavailable,
            _ => ErrorCategory::Other,
        }
    }
}

/// A reconcile that failed on the API: logged with its category, counted, and tried again after
/// the category's wait. (Source failures never get here: they are the status's business.)
fn error_policy(cred: Arc<McpCredential>, e: &Error, ctx: Arc<Context>) -> Action {
    let category = e.category();
    warn!(
        credential = %format!("{}/{}", cred.namespace().unwrap_or_default(), cred.name_any()),
        category = category.as_str(),
        error = %ErrorChain(e),
        "reconcile failed"
    );
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[category.as_str()])
        .inc();
    Action::requeue(category.requeue())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One reconcile of one credential: what every step needs to know about it.
struct Run<'a> {
    cred: &'a McpCredential,
    ctx: &'a Context,
    /// Its namespace and name.
    ns: String,
    name: String,
    /// `namespace/name`, for logs and jitter.
    key: String,
    /// What the context remembers it by ([`memory_key`]).
    mkey: String,
    /// The Secrets and McpCredentials of its namespace.
    secrets: Api<Secret>,
    creds: Api<McpCredential>,
    /// When this reconcile started.
    now: SystemTime,
}

impl<'a> Run<'a> {
    fn new(cred: &'a McpCredential, ctx: &'a Context) -> Self {
        let ns = cred.namespace().unwrap_or_default();
        let name = cred.name_any();
        Run {
            cred,
            ctx,
            key: format!("{ns}/{name}"),
            mkey: memory_key(cred),
            secrets: Api::namespaced(ctx.client.clone(), &ns),
            creds: Api::namespaced(ctx.client.clone(), &ns),
            ns,
            name,
            now: SystemTime::now(),
        }
    }
}

/// Reconciles one McpCredential.
pub async fn reconcile(cred: Arc<McpCredential>, ctx: Arc<Context>) -> Result<Action, Error> {
    let run = Run::new(&cred, &ctx);
    // A change of a Secret it writes or reads wakes it up from now on: the Secrets are in its
    // namespace, watched from now on (when every namespace is watched).
    ctx.secret_index.lock().unwrap().set(
        &run.ns,
        &run.name,
        source::referenced_secrets(&run.name, &cred.spec)
            .into_iter()
            .map(|r| r.name)
            .chain([secret_name(&run.name, cred.spec.secret_name.as_deref())])
            .collect(),
    );
    ctx.secret_watches.ensure(&run.ns);
    let Run {
        ns,
        name,
        key,
        mkey,
        secrets,
        creds,
        ..
    } = &run;
    let secret_name = secret_name(name, cred.spec.secret_name.as_deref());
    let read_err = |n: &str| {
        let (namespace, name) = (ns.clone(), n.to_owned());
        move |source| Error::ReadSecret {
            namespace,
            name,
            source,
        }
    };
    let now = run.now;
    let last_written = ctx.recall(mkey).written;
    let mut status = StatusBuilder::new(&cred, &secret_name, last_written);

    // Step 1: the Secret we write must be ours.
    let existing = secrets
        .get_opt(&secret_name)
        .await
        .map_err(read_err(&secret_name))?;
    if let Some(s) = &existing
        && !owned_by(s, &cred)
    {
        let msg = format!(
            "Secret {secret_name} exists and is not owned by this McpCredential; nothing was written. \
             Delete it or set spec.secretName to another name"
        );
        let newly = status.previous_reason("Ready") != Some("SecretNotOwned");
        status.condition("Ready", false, "SecretNotOwned", &msg);
        status.apply(creds, &ctx).await?;
        if newly {
            publish(&ctx, &cred, EventType::Warning, "SecretNotOwned", "Apply", &msg).await;
        }
        return Ok(Action::await_change());
    }
    let current = existing.as_ref().and_then(Current::from_secret);
    status.describe_current(current.as_ref(), &cred.spec, key);

    // Step 2: read the referenced Secrets and fingerprint the inputs.
    let refs = source::referenced_secrets(name, &cred.spec);
    let mut inputs = match Inputs::fetch(secrets, &refs).await {
        Ok(i) => i,
        Err(source) => {
            return Err(Error::ReadSecret {
                namespace: ns.clone(),
                name: "(referenced)".into(),
                source,
            });
        }
    };
    // Step 2b: a rotated refresh token not written back yet goes first; until it is, no token
    // request (the one in the Secret is revoked) and nothing else is written.
    if let Err(retry) = write_back_pending(&ctx, secrets, key, &mut inputs).await {
        return Ok(retry);
    }
    let fingerprint = inputs.fingerprint(&cred);
    let requested = cred.annotations().get(REFRESH_REQUESTED_ANNOTATION).cloned();
    let forced = requested.is_some() && requested != current.as_ref().and_then(|c| c.handled_request.clone());
    let inputs_changed = current.as_ref().is_some_and(|c| c.inputs != fingerprint);
    let memory = ctx.recall(mkey).failure.unwrap_or_default();

    // Step 3: decide whether a token request is due.
    // Our own status writes wake us up too: only new inputs or a new request skip the wait.
    let same_as_failure = memory.failed_inputs == fingerprint && memory.failed_request == requested;
    // The marker in the status outlives a restart: the refresh token it names is dead.
    let marked = status.previous.invalid_grant_inputs.as_deref()
        == Some(reauth_marker(&fingerprint, requested.as_deref()).as_str());
    if (memory.reauth && same_as_failure) || marked {
        // invalid_grant for exactly these inputs: wait for the referenced Secret (or spec) to change.
        status.keep_failure_conditions();
        status.apply(creds, &ctx).await?;
        return Ok(requeue_at_expiry(current.as_ref(), now));
    }
    // Step 3a: a session's liveness check, on its own interval, with the cookies in use.
    let session = cred.spec.source.session.as_ref();
    let check = session.and_then(|s| s.check.as_ref());
    let form_login = session.is_some_and(|s| s.form_login.is_some());
    let mut session_dead = check.is_some() && status.previous_status("SessionExpired") == Some("True");
    if let (Some(check), Some(c), Some((header, value))) =
        (check, &current, existing.as_ref().and_then(served_header))
        && c.valid_at(now)
        && !inputs_changed
        && !forced
        && ctx.check_due(mkey, check, now)
        && let Some(alive) = check_session(&run, &mut status, check, &header, &value).await
    {
        session_dead = !alive;
    }
    let renewal = status.renewal;
    let due = policy::Situation {
        has_credential: current.is_some(),
        inputs_changed,
        requested: forced,
        renewal,
        session_dead,
        form_login,
    }
    .due(now);
    if !due {
        status.ready_describe_current(current.as_ref(), now);
        if let Some(m) = inputs.more_consent(&cred) {
            status.more_consent_required(&m);
        }
        if session_dead {
            status.session_expired_not_ready();
        }
        status.apply(creds, &ctx).await?;
        return Ok(wake(renewal, ctx.next_check(mkey, check), now));
    }
    if let Some(retry) = memory.next_retry
        && retry > now
        && same_as_failure
    {
        return Ok(Action::requeue(until(retry, now)));
    }

    // Step 4: obtain the credential (at most one token request, after discovery when no token
    // URL is configured and none is cached), in one of the namespace's slots, within the deadline.
    // Not while an earlier token request of it still runs: its answer may rotate the refresh token.
    if ctx.in_flight.borrow().contains(key.as_str()) {
        debug!(credential = %key, "an earlier token request is still running; waiting for its answer");
        return Ok(Action::requeue(IN_FLIGHT_REQUEUE));
    }
    // Nor, right after a takeover, before the previous leader could write back a refresh token it
    // redeemed: the one in the Secret may be spent, and redeeming a spent one revokes the grant at
    // IdPs that detect reuse. Even an access token expiring meanwhile is the smaller loss.
    if let Some(until) = ctx.handover_until
        && now < until
        && source::redeems_refresh_token(&cred.spec)
    {
        info!(credential = %key, "waiting for the previous leader's write-back before redeeming the refresh token");
        return Ok(Action::requeue(until.duration_since(now).unwrap_or_default()));
    }
    let Some(_slot) = ctx.namespace_slot(ns) else {
        let jitter = timing::jitter_fraction(&format!("{key}#{}", timing::unix_seconds(now)));
        debug!(credential = %key, "every refresh slot of the namespace is taken; trying again shortly");
        return Ok(Action::requeue(NAMESPACE_BUSY_REQUEUE.mul_f64(1.0 + jitter)));
    };
    let kind = source::kind(&cred.spec);
    let cached = ctx.sources.discovered(&cred.spec);
    let timer = ctx.metrics.refresh_duration.start_timer();
    let result = tokio::time::timeout(
        ctx.refresh_timeout,
        write_back::obtain_to_the_end(&ctx, &cred, key, &inputs),
    )
    .await
    .unwrap_or(Err(SourceError::RefreshTimedOut {
        seconds: ctx.refresh_timeout.as_secs(),
    }));
    timer.observe_duration();
    let discovered = ctx.sources.discovered(&cred.spec);
    // The endpoint used: configured, discovered now, or (when a failure dropped it) cached before;
    // GitHub's API; a login form.
    let src = &cred.spec.source;
    let endpoint = source::configured_token_url(&cred.spec)
        .map(str::to_owned)
        .or_else(|| discovered.as_ref().and_then(|d| d.token_endpoint.clone()))
        .or_else(|| cached.and_then(|d| d.token_endpoint))
        .or_else(|| src.github_app.as_ref().map(source::github_app::access_tokens_url))
        .or_else(|| {
            src.session
                .as_ref()
                .and_then(|s| s.form_login.as_ref())
                .map(|f| f.url.clone())
        });
    if let Some(url) = endpoint
        && result
            .as_ref()
            .err()
            .is_none_or(SourceError::reached_token_endpoint)
    {
        ctx.metrics
            .token_requests
            .with_label_values(&[&issuer_label(&url)])
            .inc();
    }
    status.discovered(discovered);
    let issued = match result {
        Ok(issued) => issued,
        Err(e) => {
            // The access token was refused, but a rotated refresh token in the same answer is the
            // only valid one now: write it back before anything else.
            if let Err(retry) = write_back_pending(&ctx, secrets, key, &mut inputs).await {
                return Ok(retry);
            }
            return failed(
                &run,
                status,
                current.as_ref(),
                &fingerprint,
                requested.as_deref(),
                e,
            )
            .await;
        }
    };

    // Step 5: a rotated refresh token is persisted before the new access token is published. It
    // has been kept since the answer was read (`Resolver::refresh_token_rotated`); a failed
    // write-back leaves it kept, and the next reconcile tries again before anything else.
    let mut fingerprint = fingerprint;
    match write_back_pending(&ctx, secrets, key, &mut inputs).await {
        Ok(Some(WriteBack::Written(_))) => fingerprint = inputs.fingerprint(&cred),
        // Someone stored another refresh token since we read ours: publish nothing made from
        // ours; the next reconcile starts over from theirs (the inputs changed).
        Ok(Some(WriteBack::Superseded(_) | WriteBack::Gone)) => {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Ok(None) => {}
        Err(retry) => return Ok(retry),
    }

    // Step 6: apply the Secret (one write), then the status (one write).
    let secret = desired_secret(&cred, &secret_name, &issued, &fingerprint, requested.as_deref());
    let version = secret_version(&secret);
    let written = secrets
        .patch(
            &secret_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|source| Error::ApplySecret {
            namespace: ns.clone(),
            name: secret_name.clone(),
            source,
        })?;
    // The watch's news of this write is no reason to reconcile again.
    ctx.secret_index
        .lock()
        .unwrap()
        .wrote(ns, &secret_name, written.resource_version());
    ctx.metrics.refreshes.with_label_values(&["success"]).inc();
    let after_failure = status.previous.failed_attempts.unwrap_or(0) > 0;
    ctx.remember(mkey, |r| r.failure = None);
    let new_current = Current {
        not_before: issued.not_before,
        expires_at: issued.expires_at,
        version,
        inputs: fingerprint,
        handled_request: requested,
    };
    status.describe_current(Some(&new_current), &cred.spec, key);
    status.succeeded(kind, now);
    status.ready_describe_current(Some(&new_current), now);
    if let Some(m) = inputs.more_consent(&cred) {
        // Served with what was granted; a person must consent to more.
        status.more_consent_required(&m);
    }
    if let Some(check) = check {
        // New cookies: check them at once, so stale imported ones show before an agent uses them.
        let (header, value) = source::header(&cred.spec, &issued);
        if check_session(&run, &mut status, check, &header, &value).await == Some(false) {
            status.session_expired_not_ready();
        }
    }
    let newly_short = status.short_lifetime && status.previous_reason("Ready") != Some(SHORT_LIFETIME);
    status.apply(creds, &ctx).await?;
    info!(credential = %key, source = kind, expires_at = ?issued.expires_at.map(rfc3339), "refreshed");
    if newly_short {
        let msg = short_lifetime_message(&new_current);
        warn!(credential = %key, "{msg}");
        publish(&ctx, &cred, EventType::Warning, SHORT_LIFETIME, "Refresh", &msg).await;
    }
    if after_failure {
        publish(
            &ctx,
            &cred,
            EventType::Normal,
            "Refreshed",
            "Refresh",
            "credential refreshed after earlier failures",
        )
        .await;
    }
    Ok(wake(
        status.renewal,
        ctx.next_check(mkey, check),
        SystemTime::now(),
    ))
}

/// The command that signs the credential `credential` of `namespace` in: the kubectl plugin, run
/// with the person's own kubeconfig (so their RBAC decides).
pub fn sign_in_command(credential: &str, namespace: &str) -> String {
    format!("kubectl mcpcred login {credential} -n {namespace}")
}

/// Wakes up at the renewal or the next session check, whichever comes first.
fn wake(renewal: Option<SystemTime>, next_check: Option<SystemTime>, now: SystemTime) -> Action {
    match renewal.into_iter().chain(next_check).min() {
        Some(t) => Action::requeue(until(t, now)),
        None => Action::await_change(),
    }
}

/// Records a failed attempt: status, event, metric, backoff (or ReauthRequired for invalid_grant).
async fn failed(
    run: &Run<'_>,
    mut status: StatusBuilder,
    current: Option<&Current>,
    fingerprint: &str,
    requested: Option<&str>,
    e: SourceError,
) -> Result<Action, Error> {
    let Run {
        cred,
        ctx,
        creds,
        key,
        now,
        ..
    } = run;
    let (cred, ctx, key, now) = (*cred, *ctx, key.as_str(), *now);
    let category = e.category();
    ctx.metrics.refreshes.with_label_values(&[category]).inc();
    let attempts = status.previous.failed_attempts.unwrap_or(0).saturating_add(1);
    let message = e.to_string();
    warn!(credential = %key, reason = e.reason(), category, attempts, error = %message, "refresh failed");
    let expires_at = current.and_then(|c| c.expires_at);
    let next = policy::after_failure(&e, u32::try_from(attempts).unwrap_or(1), now, expires_at, key);
    let reauth = next == Next::AwaitNewInputs;
    status.next.invalid_grant_inputs = reauth.then(|| reauth_marker(fingerprint, requested));
    let (action, next_retry) = if let Some(retry) = next.at() {
        let wait = until(retry, now);
        status.condition(
            "Refreshing",
            true,
            e.reason(),
            &format!("{message} ({category}); retrying in {}s", wait.as_secs()),
        );
        (Action::requeue(wait), Some(retry))
    } else if matches!(e, SourceError::SignInRequired { .. }) {
        // The message names the command (`kubectl mcpcred login <name> -n <namespace>`).
        status.condition("ReauthRequired", true, "SignInRequired", &message);
        status.condition(
            "Refreshing",
            false,
            "ReauthRequired",
            "waiting for a person to sign in",
        );
        (requeue_at_expiry(current, now), None)
    } else {
        status.condition(
            "ReauthRequired",
            true,
            "InvalidGrant",
            &format!(
                "{message}. Store a new refresh token (or subject token) in the referenced Secret to resume"
            ),
        );
        status.condition(
            "Refreshing",
            false,
            "ReauthRequired",
            "waiting for a new refresh token",
        );
        (requeue_at_expiry(current, now), None)
    };
    status.failed(attempts, now, &message);
    match current {
        Some(c) if c.valid_at(now) => status.ready_describe_current(Some(c), now),
        Some(_) => status.condition(
            "Ready",
            false,
            "Expired",
            &format!("the credential expired and refreshing failed: {message}"),
        ),
        None => status.condition("Ready", false, e.reason(), &message),
    }
    // A dead session stays not Ready while logging in again fails.
    if status
        .next
        .conditions
        .iter()
        .any(|c| c.type_ == "SessionExpired" && c.status == "True")
    {
        status.session_expired_not_ready();
    }
    ctx.remember(&memory_key(cred), |r| {
        r.failure = Some(LastFailure {
            failed_inputs: fingerprint.to_owned(),
            failed_request: requested.map(str::to_owned),
            reauth,
            next_retry,
        });
    });
    status.apply(creds, ctx).await?;
    let reason = if reauth { "ReauthRequired" } else { "RefreshFailed" };
    publish(ctx, cred, EventType::Warning, reason, "Refresh", &message).await;
    Ok(action)
}

fn requeue_at_expiry(current: Option<&Current>, now: SystemTime) -> Action {
    match current.and_then(|c| c.expires_at).filter(|e| *e > now) {
        Some(e) => Action::requeue(until(e, now) + Duration::from_secs(1)),
        None => Action::await_change(),
    }
}

fn until(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now)
        .unwrap_or_default()
        .max(Duration::from_millis(100))
}

async fn publish(
    ctx: &Context,
    cred: &McpCredential,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &cred.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
}

#[cfg(test)]
mod tests;

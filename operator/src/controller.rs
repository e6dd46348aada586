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
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use mcp_credentials_core::{
    McpCredential, McpCredentialStatus, SecretKeyRef, SecretString, SessionCheck,
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
use tracing::{debug, info, warn};

use crate::{keys::Keys, metrics::Metrics};

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

/// What a reconcile remembers between runs (lost on restart, see the module doc).
#[derive(Default, Clone)]
struct Memory {
    /// The inputs fingerprint of the last failed attempt.
    failed_inputs: String,
    /// The refresh request annotation at the last failed attempt.
    failed_request: Option<String>,
    /// The last failure was invalid_grant: no retry until the inputs or the request change.
    reauth: bool,
    /// No attempt before this time (backoff after a failure) unless the inputs or the request change.
    next_retry: Option<SystemTime>,
}

/// A rotated refresh token not written back yet. Kept across reconciles (apart from [`Memory`],
/// which a failure or a success replaces) until it is in the Secret.
#[derive(Clone)]
struct PendingRefreshToken {
    /// Where it goes: the credential's `oauth2.refreshToken`.
    secret: SecretKeyRef,
    /// The token we redeemed: the write-back replaces only this one.
    redeemed: SecretString,
    /// The new token.
    token: SecretString,
    /// Failed write-backs so far (for the backoff).
    attempts: u32,
}

/// What a write-back found.
enum WriteBack {
    /// The Secret holds the new token now (written by us, now or earlier).
    Written(Secret),
    /// The Secret holds neither the token we redeemed nor the new one: someone stored another
    /// refresh token since, which is newer than ours. Left alone.
    Superseded(Secret),
    /// The Secret is gone.
    Gone,
}

/// Shared by every reconcile.
pub struct Context {
    client: Client,
    /// HTTP clients and the discovery cache, shared by every refresh.
    sources: SourceContext,
    recorder: Recorder,
    metrics: Metrics,
    memory: Mutex<HashMap<String, Memory>>,
    /// The status this process last wrote for each credential. We are the only writer of status, so
    /// it is newer than a status read from the watch cache, which lags behind our own writes: using
    /// it avoids a second, redundant status write when a reconcile runs on a stale object.
    written: Mutex<HashMap<String, McpCredentialStatus>>,
    /// The signing keys of `jwt` credentials (`None`: this operator does not mint).
    keys: Option<Arc<Keys>>,
    /// When each session credential's liveness was last checked (a restart checks again at once).
    checks: Mutex<HashMap<String, SystemTime>>,
    /// Rotated refresh tokens not yet written back, by credential (`namespace/name`).
    pending: Mutex<HashMap<String, PendingRefreshToken>>,
    /// The longest one refresh (discovery and token request) may take.
    refresh_timeout: Duration,
    /// At most this many refreshes of one namespace at once (`None`: no per-namespace limit).
    namespace_concurrency: Option<usize>,
    /// The refresh slots of each namespace.
    namespaces: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Until then, refresh-token credentials whose access token is still valid are not refreshed:
    /// this term took the Lease over from a leader that may still write back a rotated token.
    handover_until: Option<SystemTime>,
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
            memory: Mutex::default(),
            written: Mutex::default(),
            keys: None,
            checks: Mutex::default(),
            pending: Mutex::default(),
            refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
            namespace_concurrency: None,
            namespaces: Mutex::default(),
            handover_until: None,
        }
    }

    /// Leaves refresh-token credentials whose access token outlives `until` alone until then.
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
        self.memory.lock().unwrap().retain(|k, _| keys.contains(k));
        self.written.lock().unwrap().retain(|k, _| keys.contains(k));
        self.checks.lock().unwrap().retain(|k, _| keys.contains(k));
        self.namespaces
            .lock()
            .unwrap()
            .retain(|ns, s| namespaces.contains(ns.as_str()) || Arc::strong_count(s) > 1);
        let forgotten = self.metrics.forget_all_but(&names);
        if forgotten > 0 {
            debug!(forgotten, "forgot the metric series of deleted credentials");
        }
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
    // Secrets are watched for their metadata only: the operator reacts to a change of a Secret it
    // writes or reads, and reads the data of those few itself, so it never holds the data of the
    // cluster's other Secrets (nor their memory).
    let (creds, secrets): (Api<McpCredential>, Api<PartialObjectMeta<Secret>>) = match namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let controller = Controller::new(creds, crate::credential_watch(selector))
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    let store = controller.store();
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
    let controller = controller
        // One watch on Secrets covers both the Secrets we write (a foreign or edited one) and the
        // Secrets a credential references (a new API key, a replaced refresh token).
        .watches(secrets, watcher::Config::default(), move |s: PartialObjectMeta<Secret>| {
            affected(&store, &s)
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %ErrorChain(&e), "reconcile failed");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = sweep => {}
    }
}

use mcp_credentials_core::process::ErrorChain;

/// The credentials in the Secret's namespace that write it or read it.
fn affected(store: &Store<McpCredential>, s: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<McpCredential>> {
    let ns = s.namespace();
    let name = s.name_any();
    store
        .state()
        .iter()
        .filter(|c| c.namespace() == ns)
        .filter(|c| {
            secret_name(&c.name_any(), c.spec.secret_name.as_deref()) == name
                || source::referenced_secrets(&c.name_any(), &c.spec)
                    .iter()
                    .any(|r| r.name == name)
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

fn error_policy(_: Arc<McpCredential>, _: &Error, _: Arc<Context>) -> Action {
    Action::requeue(API_ERROR_REQUEUE)
}

/// The credential currently in the Secret, as the Secret describes it.
#[derive(Debug, Clone, PartialEq)]
struct Current {
    not_before: SystemTime,
    expires_at: Option<SystemTime>,
    version: String,
    inputs: String,
    handled_request: Option<String>,
}

impl Current {
    fn from_secret(s: &Secret) -> Option<Self> {
        let data = read_data(s)?;
        let ann = s.metadata.annotations.as_ref();
        let version = data.version.to_owned();
        let expires_at = data.expires_at;
        let not_before = ann
            .and_then(|a| a.get(ISSUED_AT_ANNOTATION))
            .and_then(|t| parse_time(t))?;
        Some(Self {
            not_before,
            expires_at,
            version,
            inputs: ann
                .and_then(|a| a.get(INPUTS_ANNOTATION))
                .cloned()
                .unwrap_or_default(),
            handled_request: ann.and_then(|a| a.get(REFRESH_REQUESTED_ANNOTATION)).cloned(),
        })
    }

    fn valid_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// Secret types never read as inputs, whoever wrote the McpCredential (the admission webhook may be
/// off, or the credential older than it): the cluster's own credentials, which a source would send
/// to a URL of the author's choice. A service account's identity goes through
/// `tokenExchange.subject.serviceAccount` instead: a short-lived token, for one allowed audience.
const REFUSED_INPUT_TYPES: [&str; 2] = [
    "kubernetes.io/service-account-token",
    "bootstrap.kubernetes.io/token",
];

/// The referenced Secrets, read once per reconcile: resolves keys and fingerprints the inputs.
struct Inputs(BTreeMap<String, Option<Secret>>);

impl Inputs {
    async fn fetch(api: &Api<Secret>, refs: &[SecretKeyRef]) -> Result<Self, kube::Error> {
        let mut map = BTreeMap::new();
        for r in refs {
            if !map.contains_key(&r.name) {
                map.insert(r.name.clone(), api.get_opt(&r.name).await?);
            }
        }
        Ok(Self(map))
    }

    /// A fingerprint of the spec and the referenced Secrets' resource versions (no secret values).
    fn fingerprint(&self, cred: &McpCredential) -> String {
        let mut text = serde_json::to_string(&cred.spec).unwrap_or_default();
        for (name, s) in &self.0 {
            let rv = s
                .as_ref()
                .and_then(|s| s.resource_version())
                .unwrap_or_else(|| "absent".into());
            text.push_str(&format!("|{name}={rv}"));
        }
        format!("{:016x}", fnv1a(text.as_bytes()))
    }
}

impl SecretResolver for Inputs {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        self.value(r)
    }
}

impl Inputs {
    /// The value of `r` in the Secrets read.
    fn value(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        let not_found = || ResolveError::NotFound {
            name: r.name.clone(),
            key: r.key.clone(),
        };
        let secret = self
            .0
            .get(&r.name)
            .and_then(Option::as_ref)
            .ok_or_else(not_found)?;
        if let Some(type_) = secret
            .type_
            .as_deref()
            .filter(|t| REFUSED_INPUT_TYPES.contains(t))
        {
            return Err(ResolveError::RefusedType {
                name: r.name.clone(),
                type_: type_.to_owned(),
            });
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .ok_or_else(not_found)?;
        let text = String::from_utf8(bytes.0.clone()).map_err(|_| ResolveError::Unavailable {
            name: r.name.clone(),
            reason: format!("key {:?} is not UTF-8", r.key),
        })?;
        // Values made with `kubectl create secret --from-file` often end with a newline.
        Ok(SecretString::new(text.trim_end_matches(['\r', '\n'])))
    }
}

/// What a source may read in the credential's namespace: the referenced Secrets (read once per
/// reconcile), for tokenExchange the tokens of service accounts that allow it, and the operator's
/// JWT signing keys.
struct Resolver<'a> {
    /// The credential's namespace, which minted `jwt` tokens are bound to.
    namespace: &'a str,
    /// The credential (`namespace/name`), whose rotated refresh token is kept in `pending`.
    key: &'a str,
    pending: &'a Mutex<HashMap<String, PendingRefreshToken>>,
    inputs: &'a Inputs,
    service_accounts: Api<ServiceAccount>,
    keys: Option<&'a Keys>,
}

impl SecretResolver for Resolver<'_> {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        self.inputs.get(r).await
    }

    fn namespace(&self) -> Option<&str> {
        Some(self.namespace)
    }

    /// Keeps the new refresh token at once, before the answer is checked and before anything can
    /// cancel this reconcile: from here on it is written back whatever happens.
    fn refresh_token_rotated(&self, r: &SecretKeyRef, token: &SecretString) {
        let Ok(redeemed) = self.inputs.value(r) else {
            return;
        };
        self.pending.lock().unwrap().insert(
            self.key.to_owned(),
            PendingRefreshToken {
                secret: r.clone(),
                redeemed,
                token: token.clone(),
                attempts: 0,
            },
        );
    }

    /// A TokenRequest for the service account, if its annotation allows `audience`: otherwise
    /// anyone who may create an McpCredential could have the operator mint a token of any
    /// service account in the namespace, for any audience, and send it to a URL of their choice.
    async fn service_account_token(
        &self,
        name: &str,
        audience: &str,
        expiration_seconds: i64,
    ) -> Result<SecretString, ResolveError> {
        let fail = |reason: String, transient: bool| ResolveError::ServiceAccountToken {
            name: name.to_owned(),
            reason,
            transient,
        };
        let api_fail = |e: kube::Error| match &e {
            kube::Error::Api(s) if s.code == 404 => fail("it does not exist".into(), false),
            kube::Error::Api(s) if s.code == 403 => fail(
                "the operator may not read it or request its token (RBAC: get serviceaccounts, create \
                 serviceaccounts/token)"
                    .into(),
                false,
            ),
            _ => fail(format!("the API server did not answer: {e}"), true),
        };
        let sa = self.service_accounts.get(name).await.map_err(api_fail)?;
        let allowed = sa
            .annotations()
            .get(token_exchange::SERVICE_ACCOUNT_AUDIENCES_ANNOTATION)
            .is_some_and(|list| list.split(',').any(|a| a.trim() == audience));
        if !allowed {
            return Err(fail(
                format!(
                    "it does not allow tokens for the audience {audience:?}: annotate it with {}={audience}",
                    token_exchange::SERVICE_ACCOUNT_AUDIENCES_ANNOTATION
                ),
                false,
            ));
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.to_owned()]),
                expiration_seconds: Some(expiration_seconds),
                ..Default::default()
            }),
            ..Default::default()
        };
        let issued = self
            .service_accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(api_fail)?;
        match issued.status.and_then(|s| s.token).filter(|t| !t.is_empty()) {
            Some(token) => Ok(SecretString::new(token)),
            None => Err(fail("the TokenRequest answer holds no token".into(), true)),
        }
    }

    async fn signing_key(
        &self,
        alg: mcp_credentials_core::JwtAlgorithm,
    ) -> Result<source::jwt::SigningKey, ResolveError> {
        match self.keys {
            Some(k) => k.signing_key(alg),
            None => Err(ResolveError::NoSigningKey),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reconciles one McpCredential.
pub async fn reconcile(cred: Arc<McpCredential>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cred.namespace().unwrap_or_default();
    let name = cred.name_any();
    let key = format!("{ns}/{name}");
    let mkey = memory_key(&cred);
    let secret_name = secret_name(&name, cred.spec.secret_name.as_deref());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let creds: Api<McpCredential> = Api::namespaced(ctx.client.clone(), &ns);
    let read_err = |n: &str| {
        let (namespace, name) = (ns.clone(), n.to_owned());
        move |source| Error::ReadSecret {
            namespace,
            name,
            source,
        }
    };
    let now = SystemTime::now();
    let last_written = ctx.written.lock().unwrap().get(&mkey).cloned();
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
        status.apply(&creds, &ctx).await?;
        if newly {
            publish(&ctx, &cred, EventType::Warning, "SecretNotOwned", "Apply", &msg).await;
        }
        return Ok(Action::await_change());
    }
    let current = existing.as_ref().and_then(Current::from_secret);
    status.describe_current(current.as_ref(), cred.spec.refresh.as_ref(), &key);

    // Step 2: read the referenced Secrets and fingerprint the inputs.
    let refs = source::referenced_secrets(&cred.name_any(), &cred.spec);
    let mut inputs = match Inputs::fetch(&secrets, &refs).await {
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
    if let Err(retry) = write_back_pending(&ctx, &secrets, &key, &mut inputs).await {
        return Ok(retry);
    }
    let fingerprint = inputs.fingerprint(&cred);
    let requested = cred.annotations().get(REFRESH_REQUESTED_ANNOTATION).cloned();
    let forced = requested.is_some() && requested != current.as_ref().and_then(|c| c.handled_request.clone());
    let inputs_changed = current.as_ref().is_some_and(|c| c.inputs != fingerprint);
    let memory = ctx.memory.lock().unwrap().get(&mkey).cloned().unwrap_or_default();

    // Step 3: decide whether a token request is due.
    // Our own status writes wake us up too: only new inputs or a new request skip the wait.
    let same_as_failure = memory.failed_inputs == fingerprint && memory.failed_request == requested;
    // The marker in the status outlives a restart: the refresh token it names is dead.
    let marked = status.previous.invalid_grant_inputs.as_deref()
        == Some(reauth_marker(&fingerprint, requested.as_deref()).as_str());
    if (memory.reauth && same_as_failure) || marked {
        // invalid_grant for exactly these inputs: wait for the referenced Secret (or spec) to change.
        status.keep_failure_conditions();
        status.apply(&creds, &ctx).await?;
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
        && ctx.check_due(&mkey, check, now)
        && let Some(alive) = check_session(&ctx, &cred, &mut status, &key, check, &header, &value, now).await
    {
        session_dead = !alive;
    }
    let renewal = status.renewal;
    let due = match &current {
        None => true,
        // A dead session behind a form login: log in again now.
        Some(_) => {
            inputs_changed || forced || renewal.is_some_and(|r| r <= now) || (session_dead && form_login)
        }
    };
    if !due {
        status.ready_describe_current(current.as_ref(), now);
        if session_dead {
            status.session_expired_not_ready();
        }
        status.apply(&creds, &ctx).await?;
        return Ok(wake(renewal, ctx.next_check(&mkey, check), now));
    }
    if let Some(retry) = memory.next_retry
        && retry > now
        && same_as_failure
    {
        return Ok(Action::requeue(until(retry, now)));
    }

    // Step 4: obtain the credential (at most one token request, after discovery when no token
    // URL is configured and none is cached), in one of the namespace's slots, within the deadline.
    if let Some(until) = ctx.handover_until
        && now < until
        && cred
            .spec
            .source
            .oauth2
            .as_ref()
            .is_some_and(|o| o.refresh_token.is_some())
        && current
            .as_ref()
            .is_some_and(|c| c.expires_at.is_none_or(|e| e > until))
    {
        info!(credential = %key, "waiting for the previous leader's write-back before redeeming the refresh token");
        return Ok(Action::requeue(until.duration_since(now).unwrap_or_default()));
    }
    let Some(_slot) = ctx.namespace_slot(&ns) else {
        let jitter = timing::jitter_fraction(&format!("{key}#{}", timing::unix_seconds(now)));
        debug!(credential = %key, "every refresh slot of the namespace is taken; trying again shortly");
        return Ok(Action::requeue(NAMESPACE_BUSY_REQUEUE.mul_f64(1.0 + jitter)));
    };
    let kind = source::kind(&cred.spec);
    let cached = ctx.sources.discovered(&cred.spec);
    let resolver = Resolver {
        namespace: &ns,
        key: &key,
        pending: &ctx.pending,
        inputs: &inputs,
        service_accounts: Api::namespaced(ctx.client.clone(), &ns),
        keys: ctx.keys.as_deref(),
    };
    let timer = ctx.metrics.refresh_duration.start_timer();
    let result = tokio::time::timeout(
        ctx.refresh_timeout,
        source::obtain(&name, &cred.spec, &resolver, &ctx.sources),
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
            if let Err(retry) = write_back_pending(&ctx, &secrets, &key, &mut inputs).await {
                return Ok(retry);
            }
            return failed(
                &cred,
                &ctx,
                &creds,
                status,
                current.as_ref(),
                &key,
                &fingerprint,
                requested.as_deref(),
                e,
                now,
            )
            .await;
        }
    };

    // Step 5: a rotated refresh token is persisted before the new access token is published. It
    // has been kept since the answer was read (`Resolver::refresh_token_rotated`); a failed
    // write-back leaves it kept, and the next reconcile tries again before anything else.
    let mut fingerprint = fingerprint;
    match write_back_pending(&ctx, &secrets, &key, &mut inputs).await {
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
    secrets
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
    ctx.metrics.refreshes.with_label_values(&["success"]).inc();
    let after_failure = status.previous.failed_attempts.unwrap_or(0) > 0;
    ctx.memory.lock().unwrap().remove(&mkey);
    let new_current = Current {
        not_before: issued.not_before,
        expires_at: issued.expires_at,
        version,
        inputs: fingerprint,
        handled_request: requested,
    };
    status.describe_current(Some(&new_current), cred.spec.refresh.as_ref(), &key);
    status.succeeded(kind, now);
    status.ready_describe_current(Some(&new_current), now);
    if let Some(check) = check {
        // New cookies: check them at once, so stale imported ones show before an agent uses them.
        let (header, value) = source::header(&cred.spec, &issued);
        if check_session(&ctx, &cred, &mut status, &key, check, &header, &value, now).await == Some(false) {
            status.session_expired_not_ready();
        }
    }
    let newly_short = status.short_lifetime && status.previous_reason("Ready") != Some(SHORT_LIFETIME);
    status.apply(&creds, &ctx).await?;
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
        ctx.next_check(&mkey, check),
        SystemTime::now(),
    ))
}

/// The Ready reason (and event reason) of a credential that lives shorter than the renewal floor.
const SHORT_LIFETIME: &str = "ShortLifetime";

fn short_lifetime_message(c: &Current) -> String {
    let lifetime = c
        .expires_at
        .map(|e| timing::unix_seconds(e).saturating_sub(timing::unix_seconds(c.not_before)))
        .unwrap_or_default();
    format!(
        "the server issued a credential that lives only {lifetime}s: it is renewed {}s after issue at the \
         earliest (the operator's minimum renewal interval), so it is expired part of the time; configure the \
         server to issue longer-lived tokens",
        timing::MIN_RENEWAL_INTERVAL.as_secs()
    )
}

/// Wakes up at the renewal or the next session check, whichever comes first.
fn wake(renewal: Option<SystemTime>, next_check: Option<SystemTime>, now: SystemTime) -> Action {
    match renewal.into_iter().chain(next_check).min() {
        Some(t) => Action::requeue(until(t, now)),
        None => Action::await_change(),
    }
}

impl Context {
    fn check_due(&self, key: &str, check: &SessionCheck, now: SystemTime) -> bool {
        self.checks
            .lock()
            .unwrap()
            .get(key)
            .is_none_or(|t| *t + source::session::check_interval(check) <= now)
    }

    fn next_check(&self, key: &str, check: Option<&SessionCheck>) -> Option<SystemTime> {
        let check = check?;
        let last = *self.checks.lock().unwrap().get(key)?;
        Some(last + source::session::check_interval(check))
    }
}

/// The header the credential's Secret serves: (name, value).
fn served_header(s: &Secret) -> Option<(String, SecretString)> {
    let data = read_data(s)?;
    let (name, value) = data.headers.first()?;
    Some((
        (*name).to_owned(),
        SecretString::new(std::str::from_utf8(value).ok()?),
    ))
}

/// The credential in a Secret the operator wrote, read as the sidecar reads it (`None` when it is
/// not one).
fn read_data(s: &Secret) -> Option<CredentialData<'_>> {
    let data = s.data.as_ref()?;
    CredentialData::from_entries(data.iter().map(|(k, v)| (k.as_str(), v.0.as_slice()))).ok()
}

/// Checks a session and records the result: the metric, the SessionExpired condition, and a
/// Warning event when the session has just died. `Some(alive)`, or `None` when the check could
/// not tell (the check URL is unreachable or failing: nothing changes).
#[allow(clippy::too_many_arguments)]
async fn check_session(
    ctx: &Context,
    cred: &McpCredential,
    status: &mut StatusBuilder,
    key: &str,
    check: &SessionCheck,
    header: &str,
    value: &SecretString,
    now: SystemTime,
) -> Option<bool> {
    ctx.checks.lock().unwrap().insert(memory_key(cred), now);
    let result = source::session::check(check, header, value, ctx.sources.http()).await;
    let label = match &result {
        Ok(()) => "alive",
        Err(e) if e.reason() == SESSION_EXPIRED => "expired",
        Err(_) => "error",
    };
    ctx.metrics
        .session_checks
        .with_label_values(&[&status.namespace, &status.name, label])
        .inc();
    match result {
        Ok(()) => {
            status.condition(
                "SessionExpired",
                false,
                "SessionAlive",
                "the session check answered the expected status",
            );
            Some(true)
        }
        Err(e) if label == "expired" => {
            let fix = if cred
                .spec
                .source
                .session
                .as_ref()
                .is_some_and(|s| s.form_login.is_some())
            {
                "logging in again"
            } else {
                "export fresh cookies into the referenced Secret"
            };
            let message = format!("{e}; {fix}");
            let newly = status.previous_status("SessionExpired") != Some("True");
            warn!(credential = %key, error = %e, "the session has expired");
            status.condition("SessionExpired", true, SESSION_EXPIRED, &message);
            if newly {
                publish(ctx, cred, EventType::Warning, SESSION_EXPIRED, "Check", &message).await;
            }
            Some(false)
        }
        Err(e) => {
            warn!(credential = %key, error = %e, "the session check could not tell");
            None
        }
    }
}

/// Records a failed attempt: status, event, metric, backoff (or ReauthRequired for invalid_grant).
#[allow(clippy::too_many_arguments)]
async fn failed(
    cred: &McpCredential,
    ctx: &Context,
    creds: &Api<McpCredential>,
    mut status: StatusBuilder,
    current: Option<&Current>,
    key: &str,
    fingerprint: &str,
    requested: Option<&str>,
    e: SourceError,
    now: SystemTime,
) -> Result<Action, Error> {
    let category = e.category();
    ctx.metrics.refreshes.with_label_values(&[category]).inc();
    let attempts = status.previous.failed_attempts.unwrap_or(0).saturating_add(1);
    let message = e.to_string();
    warn!(credential = %key, reason = e.reason(), category, attempts, error = %message, "refresh failed");
    let expires_at = current.and_then(|c| c.expires_at);
    let reauth = category == "invalid_grant";
    status.next.invalid_grant_inputs = reauth.then(|| reauth_marker(fingerprint, requested));
    let (action, next_retry) = if reauth {
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
    } else {
        let wait = timing::backoff(u32::try_from(attempts).unwrap_or(1), now, expires_at, key);
        status.condition(
            "Refreshing",
            true,
            e.reason(),
            &format!("{message} ({category}); retrying in {}s", wait.as_secs()),
        );
        (Action::requeue(wait), Some(now + wait))
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
    ctx.memory.lock().unwrap().insert(
        memory_key(cred),
        Memory {
            failed_inputs: fingerprint.to_owned(),
            failed_request: requested.map(str::to_owned),
            reauth,
            next_retry,
        },
    );
    status.apply(creds, ctx).await?;
    let reason = if category == "invalid_grant" {
        "ReauthRequired"
    } else {
        "RefreshFailed"
    };
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

fn owned_by(s: &Secret, cred: &McpCredential) -> bool {
    let uid = cred.uid();
    s.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
}

/// The longest wait between two write-backs of a rotated refresh token.
const WRITE_BACK_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Writes `p.token` into its Secret, over `p.redeemed` only: the patch carries the resourceVersion
/// it was decided on, and a conflict is decided again on a fresh read. A few quick tries (an API
/// server restart is short); the caller keeps `p` on `Err` and tries again later.
/// Writes back the credential's rotated refresh token, if one is kept: `Ok(None)` when none is,
/// `Ok(Some(outcome))` once it is written (or another token superseded it; `inputs` then holds the
/// Secret as it is now), `Err(action)` when the write failed (kept, retried after `action`).
async fn write_back_pending(
    ctx: &Context,
    secrets: &Api<Secret>,
    key: &str,
    inputs: &mut Inputs,
) -> Result<Option<WriteBack>, Action> {
    let Some(p) = ctx.pending.lock().unwrap().get(key).cloned() else {
        return Ok(None);
    };
    let known = inputs.0.get(&p.secret.name).cloned().flatten();
    match write_back_refresh_token(secrets, &p, key, known).await {
        Ok(outcome) => {
            ctx.pending.lock().unwrap().remove(key);
            if let WriteBack::Written(s) | WriteBack::Superseded(s) = &outcome {
                inputs.0.insert(p.secret.name.clone(), Some(s.clone()));
            }
            Ok(Some(outcome))
        }
        Err(e) => Err(write_back_failed(ctx, key, &p.secret, &e)),
    }
}

async fn write_back_refresh_token(
    api: &Api<Secret>,
    p: &PendingRefreshToken,
    credential: &str,
    mut known: Option<Secret>,
) -> Result<WriteBack, kube::Error> {
    use base64::Engine;
    let value = base64::engine::general_purpose::STANDARD.encode(p.token.expose());
    let mut last = None;
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        // The Secret as this reconcile read it, first; after a failure or a conflict, afresh.
        let read = match known.take() {
            Some(s) => Ok(Some(s)),
            None => api.get_opt(&p.secret.name).await,
        };
        let secret = match read {
            Ok(Some(s)) => s,
            Ok(None) => {
                warn!(credential, secret = %p.secret.name, "the Secret of the rotated refresh token is gone; the new token is lost");
                return Ok(WriteBack::Gone);
            }
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let held = Inputs(BTreeMap::from([(p.secret.name.clone(), Some(secret.clone()))])).value(&p.secret);
        match held {
            Ok(t) if t == p.token => return Ok(WriteBack::Written(secret)),
            Ok(t) if t == p.redeemed => {}
            _ => {
                warn!(
                    credential,
                    secret = %p.secret.name,
                    key = %p.secret.key,
                    "the Secret holds another refresh token than the one redeemed (a new sign-in, or another \
                     McpCredential sharing the key): keeping it, not writing the rotated one over it"
                );
                return Ok(WriteBack::Superseded(secret));
            }
        }
        // A resourceVersion in a merge patch is a precondition: 409 if the Secret changed since.
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": secret.resource_version() },
            "data": { p.secret.key.clone(): value },
        });
        match api
            .patch(&p.secret.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(s) => {
                info!(credential, secret = %p.secret.name, "wrote the rotated refresh token back");
                return Ok(WriteBack::Written(s));
            }
            Err(e) => {
                warn!(credential, secret = %p.secret.name, attempt, error = %e, "writing the rotated refresh token back failed");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// A write-back failed: the token stays kept; try again after a backoff (1 s doubling to
/// [`WRITE_BACK_MAX_BACKOFF`]), for as long as it takes.
fn write_back_failed(ctx: &Context, key: &str, secret: &SecretKeyRef, e: &kube::Error) -> Action {
    let attempts = ctx
        .pending
        .lock()
        .unwrap()
        .get_mut(key)
        .map(|p| {
            p.attempts = p.attempts.saturating_add(1);
            p.attempts
        })
        .unwrap_or(1);
    let wait = Duration::from_secs(1u64 << attempts.min(5)).min(WRITE_BACK_MAX_BACKOFF);
    let error = Error::PersistRefreshToken {
        namespace: key.split('/').next().unwrap_or_default().to_owned(),
        name: secret.name.clone(),
        source: clone_error(e),
    };
    warn!(
        credential = %key,
        attempts,
        retry_in_seconds = wait.as_secs(),
        error = %ErrorChain(&error),
        "the rotated refresh token is kept in memory until it is written back"
    );
    Action::requeue(wait)
}

/// kube::Error is not Clone: enough of it for a log line.
fn clone_error(e: &kube::Error) -> kube::Error {
    match e {
        kube::Error::Api(s) => kube::Error::Api(s.clone()),
        other => kube::Error::Service(other.to_string().into()),
    }
}

/// Writes every kept rotated refresh token back, retrying until each is written (or found
/// superseded): on shutdown and on loss of the Lease, bounded by the caller's grace period.
/// Safe after the Lease is lost: a write-back only replaces the token this process redeemed,
/// so it never overwrites what a new leader stored. Returns how many are still not written.
pub async fn flush_pending_refresh_tokens(ctx: &Context) -> usize {
    let wait = Duration::from_millis(500);
    loop {
        let pending: Vec<(String, PendingRefreshToken)> = ctx
            .pending
            .lock()
            .unwrap()
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        if pending.is_empty() {
            return 0;
        }
        info!(
            count = pending.len(),
            "writing kept rotated refresh tokens back before stopping"
        );
        for (key, p) in pending {
            let ns = key.split('/').next().unwrap_or_default();
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
            if write_back_refresh_token(&api, &p, &key, None).await.is_ok() {
                ctx.pending.lock().unwrap().remove(&key);
            }
        }
        if ctx.pending.lock().unwrap().is_empty() {
            return 0;
        }
        // Often: the API server may be back any moment, and a new leader is waiting for this.
        tokio::time::sleep(wait).await;
    }
}

/// How many rotated refresh tokens are kept, not yet written back.
pub fn pending_refresh_tokens(ctx: &Context) -> usize {
    ctx.pending.lock().unwrap().len()
}

fn desired_secret(
    cred: &McpCredential,
    name: &str,
    issued: &Issued,
    fingerprint: &str,
    handled: Option<&str>,
) -> Secret {
    let (header, value) = source::header(&cred.spec, issued);
    // A new value for every credential: issue time in milliseconds, then the object's generation.
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let version = format!("{millis:x}-{}", cred.metadata.generation.unwrap_or(0));
    let data: BTreeMap<String, ByteString> = CredentialData {
        upstream: &cred.spec.upstream,
        headers: vec![(&header, value.expose().as_bytes())],
        expires_at: issued.expires_at,
        version: &version,
    }
    .to_data()
    .into_iter()
    .map(|(k, v)| (k, ByteString(v)))
    .collect();
    let mut annotations = BTreeMap::from([
        (ISSUED_AT_ANNOTATION.to_owned(), rfc3339(issued.not_before)),
        (INPUTS_ANNOTATION.to_owned(), fingerprint.to_owned()),
    ]);
    if let Some(h) = handled {
        annotations.insert(REFRESH_REQUESTED_ANNOTATION.to_owned(), h.to_owned());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: cred.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (CREDENTIAL_LABEL.to_owned(), cred.name_any()),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "mcpcredentials.dev/v1alpha1".into(),
                kind: "McpCredential".into(),
                name: cred.name_any(),
                uid: cred.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

fn secret_version(s: &Secret) -> String {
    s.data
        .as_ref()
        .and_then(|d| d.get(VERSION_KEY))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default()
}

/// Scheme, host and port of a token URL: a bounded label without path or query.
fn issuer_label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "invalid".into(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    to_time(t).0.to_string()
}

fn to_time(t: SystemTime) -> Time {
    Time(jiff::Timestamp::from_second(timing::unix_seconds(t) as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(ts.as_second()).ok()?))
}

/// Builds the status a reconcile wants and writes it only when it differs from what is there.
struct StatusBuilder {
    previous: McpCredentialStatus,
    next: McpCredentialStatus,
    generation: Option<i64>,
    renewal: Option<SystemTime>,
    /// The current credential lives shorter than the renewal floor.
    short_lifetime: bool,
    namespace: String,
    name: String,
    /// [`memory_key`] of the credential.
    memory_key: String,
}

impl StatusBuilder {
    fn new(cred: &McpCredential, secret_name: &str, last_written: Option<McpCredentialStatus>) -> Self {
        let previous = last_written.or_else(|| cred.status.clone()).unwrap_or_default();
        let mut next = previous.clone();
        next.observed_generation = cred.metadata.generation;
        next.source = Some(source::kind(&cred.spec).to_owned());
        next.secret_name = Some(secret_name.to_owned());
        Self {
            previous,
            next,
            generation: cred.metadata.generation,
            renewal: None,
            short_lifetime: false,
            namespace: cred.namespace().unwrap_or_default(),
            name: cred.name_any(),
            memory_key: memory_key(cred),
        }
    }

    fn previous_status(&self, type_: &str) -> Option<&str> {
        self.previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.as_str())
    }

    /// Ready=False while the session check says the session is dead.
    fn session_expired_not_ready(&mut self) {
        self.condition(
            "Ready",
            false,
            SESSION_EXPIRED,
            "the session check failed: see the SessionExpired condition",
        );
    }

    fn previous_reason(&self, type_: &str) -> Option<&str> {
        self.previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.as_str())
    }

    fn describe_current(
        &mut self,
        current: Option<&Current>,
        refresh: Option<&mcp_credentials_core::Refresh>,
        key: &str,
    ) {
        let Some(c) = current else {
            self.renewal = None;
            self.short_lifetime = false;
            return;
        };
        self.renewal = c
            .expires_at
            .map(|e| timing::scheduled_renewal(c.not_before, e, refresh, key));
        self.short_lifetime = c
            .expires_at
            .is_some_and(|e| timing::renewal_floored(c.not_before, e, refresh, key));
        self.next.not_before = Some(to_time(c.not_before));
        self.next.not_after = c.expires_at.map(to_time);
        self.next.renewal_time = self.renewal.map(to_time);
        self.next.credential_version = Some(c.version.clone());
    }

    fn condition(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        let status_s = if status { "True" } else { "False" };
        let previous = self.previous.conditions.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status_s => p.last_transition_time.clone(),
            _ => Time(
                jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                    .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            ),
        };
        let c = Condition {
            type_: type_.to_owned(),
            status: status_s.to_owned(),
            reason: reason.to_owned(),
            message: message.chars().take(2000).collect(),
            observed_generation: self.generation,
            last_transition_time,
        };
        match self.next.conditions.iter_mut().find(|x| x.type_ == type_) {
            Some(x) => *x = c,
            None => self.next.conditions.push(c),
        }
    }

    /// Keeps the failure conditions as they are (nothing new happened).
    fn keep_failure_conditions(&mut self) {
        for c in &mut self.next.conditions {
            c.observed_generation = self.generation;
        }
    }

    fn ready_describe_current(&mut self, current: Option<&Current>, now: SystemTime) {
        match current {
            Some(c) if c.valid_at(now) => {
                let msg = match c.expires_at {
                    Some(e) => format!("the credential is valid until {}", rfc3339(e)),
                    None => "the credential does not expire".to_owned(),
                };
                if self.short_lifetime {
                    let msg = format!("{msg}; {}", short_lifetime_message(c));
                    self.condition("Ready", true, SHORT_LIFETIME, &msg);
                } else {
                    self.condition("Ready", true, "CredentialValid", &msg);
                }
            }
            Some(_) => self.condition("Ready", false, "Expired", "the credential expired"),
            None => self.condition("Ready", false, "Pending", "no credential obtained yet"),
        }
    }

    fn succeeded(&mut self, kind: &str, now: SystemTime) {
        self.next.last_refresh_time = Some(to_time(now));
        self.next.failed_attempts = None;
        self.next.last_failure_time = None;
        self.next.last_failure_message = None;
        self.next.invalid_grant_inputs = None;
        self.condition(
            "Refreshing",
            false,
            "Succeeded",
            &format!("obtained a new credential from {kind}"),
        );
        self.condition("ReauthRequired", false, "Authorized", "the grant is valid");
    }

    /// What discovery found (`None`: nothing, or the token URL is configured), after an attempt.
    fn discovered(&mut self, found: Option<mcp_credentials_core::DiscoveryStatus>) {
        self.next.discovery = found;
    }

    fn failed(&mut self, attempts: i32, now: SystemTime, message: &str) {
        self.next.failed_attempts = Some(attempts);
        self.next.last_failure_time = Some(to_time(now));
        self.next.last_failure_message = Some(message.chars().take(1000).collect());
    }

    /// One status write, only if something changed.
    async fn apply(&self, api: &Api<McpCredential>, ctx: &Context) -> Result<(), Error> {
        let ready = self
            .next
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ctx.metrics
            .ready
            .with_label_values(&[&self.namespace, &self.name])
            .set(i64::from(ready));
        if let Some(t) = &self.next.not_after {
            ctx.metrics
                .expiration
                .with_label_values(&[&self.namespace, &self.name])
                .set(t.0.as_second() as f64);
        }
        if let Some(r) = self.renewal {
            ctx.metrics
                .renewal
                .with_label_values(&[&self.namespace, &self.name])
                .set(timing::unix_seconds(r) as f64);
        }
        if self.next == self.previous {
            return Ok(());
        }
        let patch = serde_json::json!({
            "apiVersion": "mcpcredentials.dev/v1alpha1",
            "kind": "McpCredential",
            "status": self.next,
        });
        api.patch_status(
            &self.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::ApplyStatus {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        ctx.written
            .lock()
            .unwrap()
            .insert(self.memory_key.clone(), self.next.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests;

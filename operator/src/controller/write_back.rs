//! A rotated refresh token, kept from the moment the answer is read until it is in its Secret:
//! the token request that may rotate it runs to its end whatever happens to the reconcile; the
//! new token is written back with a resourceVersion precondition, re-read on conflict, drained on
//! shutdown and on a lost Lease.

use super::*;

/// A rotated refresh token not written back yet. Kept across reconciles (apart from [`Remembered`],
/// which a failure or a success replaces) until it is in the Secret.
#[derive(Clone)]
pub(super) struct PendingRefreshToken {
    /// Where it goes: the credential's `oauth2.refreshToken`.
    pub(super) secret: SecretKeyRef,
    /// The token we redeemed: the write-back replaces only this one.
    pub(super) redeemed: SecretString,
    /// The new token.
    pub(super) token: SecretString,
    /// Failed write-backs so far (for the backoff).
    pub(super) attempts: u32,
}

/// How soon a credential whose earlier token request still runs looks again.
pub(super) const IN_FLIGHT_REQUEUE: Duration = Duration::from_secs(1);

/// Obtains the credential. A source that redeems a refresh token sends its token request from a
/// task of its own, which runs to its end (bounded by the HTTP client's timeout) even when this
/// future is dropped: by a lost Lease, shutdown, or the refresh timeout. The authorization server
/// spends the refresh token as soon as it reads the request, and only the answer holds the new
/// one ([`Resolver::refresh_token_rotated`] keeps it for the write-back): a request cancelled in
/// between loses the grant. Until the task ends, the credential is in `in_flight`: no other token
/// request of it starts, and a drain waits for it ([`token_requests_finished`]).
pub(super) async fn obtain_to_the_end(
    ctx: &Arc<Context>,
    cred: &Arc<McpCredential>,
    key: &str,
    inputs: &Inputs,
) -> Result<Issued, SourceError> {
    async fn obtain(
        ctx: &Context,
        cred: &McpCredential,
        key: &str,
        inputs: &Inputs,
    ) -> Result<Issued, SourceError> {
        let (ns, name) = (cred.namespace().unwrap_or_default(), cred.name_any());
        let resolver = Resolver {
            namespace: &ns,
            key,
            pending: &ctx.pending,
            inputs,
            service_accounts: Api::namespaced(ctx.client.clone(), &ns),
            keys: ctx.keys.as_deref(),
        };
        source::obtain(&name, &cred.spec, &resolver, &ctx.sources).await
    }
    if !source::redeems_refresh_token(&cred.spec) {
        return obtain(ctx, cred, key, inputs).await;
    }
    let running = InFlight::enter(ctx.clone(), key);
    let (ctx, cred, key, inputs) = (ctx.clone(), cred.clone(), key.to_owned(), inputs.clone());
    let task = tokio::spawn(
        async move {
            let _running = running;
            obtain(&ctx, &cred, &key, &inputs).await
        }
        .in_current_span(),
    );
    match task.await {
        Ok(result) => result,
        // Never aborted: a panic in the source is the reconcile's, as if it ran here.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A credential's token request while it runs: in `in_flight` until dropped.
struct InFlight {
    ctx: Arc<Context>,
    key: String,
}

impl InFlight {
    fn enter(ctx: Arc<Context>, key: &str) -> Self {
        ctx.in_flight.send_modify(|s| {
            s.insert(key.to_owned());
        });
        Self {
            ctx,
            key: key.to_owned(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ctx.in_flight.send_modify(|s| {
            s.remove(&self.key);
        });
    }
}

/// Waits until no token request that may rotate a refresh token is running (their answers are
/// kept in `pending` by then): before a drain writes the kept tokens back.
pub async fn token_requests_finished(ctx: &Context) {
    let mut running = ctx.in_flight.subscribe();
    let _ = running.wait_for(HashSet::is_empty).await;
}

/// How many token requests that may rotate a refresh token are running.
pub fn token_requests_running(ctx: &Context) -> usize {
    ctx.in_flight.borrow().len()
}

/// What a write-back found.
pub(super) enum WriteBack {
    /// The Secret holds the new token now (written by us, now or earlier).
    Written(Secret),
    /// The Secret holds neither the token we redeemed nor the new one: someone stored another
    /// refresh token since, which is newer than ours. Left alone.
    Superseded(Secret),
    /// The Secret is gone.
    Gone,
}

/// The longest wait between two write-backs of a rotated refresh token.
pub(super) const WRITE_BACK_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Writes `p.token` into its Secret, over `p.redeemed` only: the patch carries the resourceVersion
/// it was decided on, and a conflict is decided again on a fresh read. A few quick tries (an API
/// server restart is short); the caller keeps `p` on `Err` and tries again later.
/// Writes back the credential's rotated refresh token, if one is kept: `Ok(None)` when none is,
/// `Ok(Some(outcome))` once it is written (or another token superseded it; `inputs` then holds the
/// Secret as it is now), `Err(action)` when the write failed (kept, retried after `action`).
pub(super) async fn write_back_pending(
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

pub(super) async fn write_back_refresh_token(
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
pub(super) fn write_back_failed(ctx: &Context, key: &str, secret: &SecretKeyRef, e: &kube::Error) -> Action {
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
pub(super) fn clone_error(e: &kube::Error) -> kube::Error {
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

//! Standalone mode (no cluster): McpCredential YAML plus local secret files, with core's credential
//! sources run in-process, one task per credential that renews it on core's schedule and publishes
//! each new credential to the store exactly as the operator would write it into a Secret.
//! An API key is read again the moment its file changes (an inotify watch on the secrets directory)
//! and whenever its upstream answers 401/403, so a rotated key is in use at once.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use kube::ResourceExt;
use mcp_credentials_core::{
    McpCredential, McpCredentialSpec, OAuth2Grant, SecretKeyRef, SecretString,
    policy::{self, Next},
    secret::CredentialData,
    source::{self, Issued, OutboundPolicy, ResolveError, SecretResolver, SourceContext, SourceError},
};
use mcp_credentials_core::{
    report::{Reason, Rejection},
    source::sign_in::step_up::{self, StepUp},
};
use serde::Deserialize;
use tokio::{
    sync::{broadcast::error::RecvError, watch as changes},
    task::JoinHandle,
};

use super::{Store, dirwatch};
use crate::credential::Credential;

/// With no attempt scheduled (a credential that does not expire, or a dead grant waiting for new
/// inputs), the files it reads are compared this often as well as on every change the directory
/// watch reports (the fallback when it cannot run); reading a few small files costs nothing, and
/// no token request is made unless they changed.
const INPUT_POLL: Duration = Duration::from_secs(5);
/// An upstream's rejection renews the credential at once, but at most this often: an upstream that
/// rejects every token must not turn into a loop of token requests.
const MIN_FORCED_RENEWAL_INTERVAL: Duration = Duration::from_secs(5);
/// A rotated refresh token that could not be written is written again this often (it is kept in
/// memory meanwhile, and used for the next refresh).
const PERSIST_RETRY: Duration = Duration::from_secs(5);
/// Token requests give up after this long: a hanging token endpoint is a transient failure.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why standalone mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// The McpCredential file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A YAML document is not an McpCredential.
    #[error("{path} holds a document that is not a valid McpCredential")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// The file holds no McpCredential.
    #[error("{0} holds no McpCredential documents")]
    Empty(PathBuf),
    /// The token endpoint clients could not be built.
    #[error("cannot build the token endpoint clients")]
    HttpClient(#[source] reqwest::Error),
}

/// Reads the McpCredentials in `credentials_file` and starts keeping each one fresh, with `policy`
/// for URLs learned through discovery. The handle ends when every credential task has (never,
/// unless aborted).
pub async fn start(
    store: Arc<Store>,
    credentials_file: &Path,
    secrets_dir: &Path,
    policy: OutboundPolicy,
) -> Result<(JoinHandle<()>, TokenRequests), StandaloneError> {
    let credentials = load(credentials_file)?;
    // One context for every credential: the discovery cache is shared.
    let sources =
        Arc::new(SourceContext::new(TOKEN_REQUEST_TIMEOUT, policy).map_err(StandaloneError::HttpClient)?);
    let secrets = Arc::new(SecretFiles::new(secrets_dir.to_path_buf()).with_login(credentials_file));
    // One watch for every credential; each API key's task reads its file again on any change.
    let watch = dirwatch::DirWatch::new(secrets_dir);
    let mut tasks = tokio::task::JoinSet::new();
    for credential in credentials {
        let name = credential.name_any();
        if credential.spec.source.api_key.is_some() {
            store.set_rereads(Some(&name));
        }
        tracing::info!(credential = %name, source = source::kind(&credential.spec), upstream = %credential.spec.upstream, "standalone credential");
        tasks.spawn(keep_fresh(
            store.clone(),
            name,
            credential.spec,
            secrets.clone(),
            sources.clone(),
            watch.receiver(),
        ));
    }
    let requests = TokenRequests(secrets.in_flight.subscribe());
    let task = tokio::spawn(async move {
        // The watch lives as long as the tasks.
        let _watch = watch;
        while tasks.join_next().await.is_some() {}
    });
    Ok((task, requests))
}

/// The token requests that may rotate a refresh token, while they run: shutting down waits for
/// them ([`TokenRequests::finished`]) before it stops the refresh tasks. The authorization server
/// spends the refresh token as soon as it reads the request; cancelled before its answer is
/// saved, the request loses the grant (the next start redeems a spent token).
pub struct TokenRequests(tokio::sync::watch::Receiver<usize>);

impl TokenRequests {
    /// How many run now.
    pub fn running(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until none runs (each one's rotated refresh token is on disk, or kept and retried).
    pub async fn finished(&mut self) {
        let _ = self.0.wait_for(|n| *n == 0).await;
    }
}

/// One token request that may rotate a refresh token, counted while it and the saving of its
/// answer run.
struct Redeeming<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> Redeeming<'a> {
    fn start(counter: &'a tokio::sync::watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter)
    }
}

impl Drop for Redeeming<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The McpCredential documents of a multi-document YAML file (empty documents skipped).
pub fn load(path: &Path) -> Result<Vec<McpCredential>, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::Read {
        path: path.into(),
        source,
    })?;
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|source| StandaloneError::Parse {
            path: path.into(),
            source,
        })?;
        if value.is_null() {
            continue;
        }
        out.push(
            serde_yaml::from_value(value).map_err(|source| StandaloneError::Parse {
                path: path.into(),
                source,
            })?,
        );
    }
    if out.is_empty() {
        return Err(StandaloneError::Empty(path.into()));
    }
    Ok(out)
}

/// Secrets as files: `<dir>/<secret-name>/<key>`, the layout of a mounted Secret. Service-account
/// tokens cannot be had without a cluster: the trait's default says to use a stored subject token.
/// A rotated refresh token that could not be written yet is kept here and read in place of its file,
/// so the next refresh redeems the newest token whatever the disk did.
pub(crate) struct SecretFiles {
    dir: PathBuf,
    unsaved: Mutex<BTreeMap<PathBuf, SecretString>>,
    /// Token requests that may rotate a refresh token, running now ([`TokenRequests`]).
    in_flight: tokio::sync::watch::Sender<usize>,
    /// The credentials file, for the sign-in command a credential's messages name.
    credentials_file: Option<PathBuf>,
}

impl SecretFiles {
    pub(crate) fn new(dir: PathBuf) -> Self {
        SecretFiles {
            dir,
            unsaved: Mutex::default(),
            in_flight: tokio::sync::watch::Sender::new(0),
            credentials_file: None,
        }
    }

    fn with_login(mut self, credentials_file: &Path) -> Self {
        self.credentials_file = Some(credentials_file.to_path_buf());
        self
    }

    fn path(&self, r: &SecretKeyRef) -> PathBuf {
        self.dir.join(&r.name).join(&r.key)
    }

    /// Keeps `value` as the content of `path` and writes it there; on an error it stays in memory
    /// (and is what [`SecretResolver::get`] returns) until [`SecretFiles::save`] succeeds.
    async fn store(&self, path: PathBuf, value: SecretString) -> Result<(), SaveError> {
        self.unsaved.lock().expect("unsaved secrets").insert(path, value);
        self.save().await
    }

    /// Writes every value kept in memory to its file; the first failure is returned.
    async fn save(&self) -> Result<(), SaveError> {
        let unsaved: Vec<(PathBuf, SecretString)> = self
            .unsaved
            .lock()
            .expect("unsaved secrets")
            .iter()
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect();
        for (path, value) in unsaved {
            let (p, v) = (path.clone(), value.clone());
            let written = tokio::task::spawn_blocking(move || write_private_file(&p, v.expose().as_bytes()))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match written {
                Ok(()) => {
                    let mut unsaved = self.unsaved.lock().expect("unsaved secrets");
                    // A newer value that arrived meanwhile stays to be written.
                    if unsaved.get(&path) == Some(&value) {
                        unsaved.remove(&path);
                    }
                }
                Err(source) => return Err(SaveError { path, source }),
            }
        }
        Ok(())
    }

    /// The value kept for `r` that is not on disk yet.
    fn unsaved_value(&self, r: &SecretKeyRef) -> Option<SecretString> {
        self.unsaved
            .lock()
            .expect("unsaved secrets")
            .get(&self.path(r))
            .cloned()
    }

    fn has_unsaved(&self) -> bool {
        !self.unsaved.lock().expect("unsaved secrets").is_empty()
    }
}

/// A secret file that could not be written (the message names the file, never its content).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}", path.display())]
struct SaveError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Replaces `path` with `content`, readable by its owner only (0600), durably: a temporary file in
/// the same directory, written and synced, renamed over `path`, then the directory synced, so a
/// crash leaves the old file or the new one, never a torn or lost one.
pub(crate) fn write_private_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.rotating"));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // `mode` applies only to a file it creates: a leftover temporary file is narrowed too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// Standalone `jwt` credentials sign with keys the user keeps beside the secrets:
/// `<secrets dir>/jwt-signing-key/{es256,rs256}.pem` (PKCS#8), and the `iss` in its `issuer` file.
/// There is no JWKS server in standalone mode: give the upstream the public key.
const SIGNING_KEY_DIR: &str = "jwt-signing-key";
/// The `iss` of standalone tokens when `jwt-signing-key/issuer` does not exist.
const DEFAULT_ISSUER: &str = "urn:mcp-credentials:standalone";

impl SecretResolver for SecretFiles {
    /// Kept at once, and read in place of its file from now on: the answer may still be refused
    /// (an expired or misbound access token), and the server has revoked the token we sent. The
    /// refresh loop writes it to disk after the attempt, whatever its outcome.
    fn refresh_token_rotated(&self, r: &SecretKeyRef, token: &SecretString) {
        self.unsaved
            .lock()
            .expect("unsaved secrets")
            .insert(self.path(r), token.clone());
    }

    fn sign_in_command(&self, credential: &str) -> Option<String> {
        let file = self.credentials_file.as_ref()?;
        Some(crate::login::command(credential, file, &self.dir))
    }

    async fn signing_key(
        &self,
        alg: mcp_credentials_core::JwtAlgorithm,
    ) -> Result<source::jwt::SigningKey, ResolveError> {
        let file = |key: &str| SecretKeyRef {
            name: SIGNING_KEY_DIR.into(),
            key: key.into(),
        };
        let key_file = format!("{alg:?}.pem").to_ascii_lowercase();
        let pem = self.get(&file(&key_file)).await?;
        let kid = source::jwt::kid(alg, &pem).map_err(|e| ResolveError::Unavailable {
            name: SIGNING_KEY_DIR.into(),
            reason: format!("{key_file} is not a PKCS#8 PEM {alg:?} private key ({})", e.0),
        })?;
        let issuer = match self.get(&file("issuer")).await {
            Ok(i) if !i.is_empty() => i.expose().to_owned(),
            _ => DEFAULT_ISSUER.to_owned(),
        };
        Ok(source::jwt::SigningKey {
            kid,
            algorithm: alg,
            private_key_pem: pem,
            issuer,
        })
    }

    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        let path = self.path(r);
        if let Some(unsaved) = self.unsaved.lock().expect("unsaved secrets").get(&path) {
            return Ok(unsaved.clone());
        }
        match tokio::fs::read_to_string(path).await {
            // A trailing newline from an editor is never part of a secret.
            Ok(s) => Ok(SecretString::new(s.trim_end_matches(['\n', '\r']))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ResolveError::NotFound {
                name: r.name.clone(),
                key: r.key.clone(),
            }),
            Err(e) => Err(ResolveError::Unavailable {
                name: r.name.clone(),
                reason: e.kind().to_string(),
            }),
        }
    }
}

/// Obtains the credential, publishes it, sleeps until its renewal time (or a backoff after a
/// failure), forever. The last good credential stays in the store until it expires.
async fn keep_fresh(
    store: Arc<Store>,
    name: String,
    spec: McpCredentialSpec,
    secrets: Arc<SecretFiles>,
    sources: Arc<SourceContext>,
    mut files: changes::Receiver<u64>,
) {
    // An API key is one file: it is read again on every change to the secrets directory and on
    // every upstream rejection, with no rate limit (reading a small file costs nothing).
    let api_key = spec.source.api_key.is_some();
    // A signed-in credential answered 403 insufficient_scope needs more consent, not a refresh.
    let sign_in = source::sign_in::applies(&spec);
    let mut failures = 0u32;
    let mut published: Option<(String, Option<SystemTime>)> = None;
    let mut version = 0u64;
    let mut renewal_requests = store.refresh_requests();
    // A session's liveness check, as the operator runs it: on its own interval, with the cookies served.
    let session = spec.source.session.as_ref();
    let check = session.and_then(|s| s.check.clone());
    let form_login = session.is_some_and(|s| s.form_login.is_some());
    // A browser session is renewed by the person, in their browser.
    let browser_fix = session
        .and_then(|s| s.browser.as_ref())
        .map(|b| source::session::browser::fix(&spec, b));
    let mut served: Option<Credential> = None;
    let mut session_dead = false;
    let mut next_check = None;
    // When to write an unsaved rotated refresh token again.
    let mut save_at = None;
    loop {
        let attempted = tokio::time::Instant::now();
        // What this attempt reads: someone else's change to it afterwards is new inputs.
        let mut inputs = read_inputs(&name, &spec, &secrets).await;
        // From the request until its answer is saved: what shutting down waits for.
        let redeeming = source::redeems_refresh_token(&spec).then(|| Redeeming::start(&secrets.in_flight));
        let next = match source::obtain(&name, &spec, &*secrets, &sources).await {
            Ok(issued) => {
                failures = 0;
                // Kept in memory at once (the next refresh redeems it), on disk before it is used.
                let unsaved = persist_rotated_refresh_token(&name, &spec, &secrets, &issued)
                    .await
                    .err();
                if let Some(token) = &issued.rotated_refresh_token {
                    own_write_back(&mut inputs, &name, &spec, token);
                }
                let (header, value) = source::header(&spec, &issued);
                let fingerprint = (format!("{header}\n{}", value.expose()), issued.expires_at);
                if published.as_ref() != Some(&fingerprint) {
                    version += 1;
                    match Credential::from_data(&secret_data(&spec, &header, &value, &issued, version)) {
                        Ok(credential) => {
                            store.set(&name, credential.clone());
                            served = Some(credential);
                        }
                        Err(e) => store.fail(&name, e.to_string()),
                    }
                    published = Some(fingerprint);
                }
                if sign_in {
                    // After publishing, which clears it: a step-up nobody signed in for yet.
                    pending_step_up(&store, &name, &spec, &secrets).await;
                }
                if let Some(e) = unsaved {
                    // After publishing, which clears the last failure: the credential says so until saved.
                    store.fail(&name, unsaved_message(&e));
                    save_at = Some(tokio::time::Instant::now() + PERSIST_RETRY);
                }
                policy::after_success(&spec, &issued, &name)
            }
            Err(e) => {
                failures += 1;
                // A rotated refresh token in a refused answer was kept: on disk now, or retried.
                if let Some(r) = rotated_refresh_token_ref(&name, &spec)
                    && let Some(token) = secrets.unsaved_value(&r)
                {
                    own_write_back(&mut inputs, &name, &spec, &token);
                    if let Err(e) = secrets.save().await {
                        tracing::warn!(credential = %name, error = %unsaved_message(&e), "the rotated refresh token is not saved yet");
                        save_at = Some(tokio::time::Instant::now() + PERSIST_RETRY);
                    }
                }
                let next = policy::after_failure(
                    &e,
                    failures,
                    SystemTime::now(),
                    published.as_ref().and_then(|p| p.1),
                    &name,
                );
                if e.reason() == source::session::browser::SIGNED_OUT {
                    // The person signed out (or never sent a session): the old cookies are dead,
                    // nothing is served until the extension sends new ones.
                    store.remove(&name, &e.to_string());
                    published = None;
                    served = None;
                } else if matches!(e, SourceError::SignInRequired { .. }) {
                    // The message is the one to act on: it names the command. The credential
                    // starts the moment `login` writes its files (they are among its inputs).
                    store.needs_sign_in(&name, e.to_string(), secrets.sign_in_command(&name));
                } else {
                    let message = match next {
                        Next::AwaitNewInputs => format!(
                            "{e} ({}); nothing is tried again until the files it reads change",
                            e.category()
                        ),
                        _ => format!("{e} ({})", e.category()),
                    };
                    store.fail(&name, message);
                }
                next
            }
        };
        drop(redeeming);
        let scheduled = next.at();
        let wait = |scheduled: Option<SystemTime>| match scheduled {
            Some(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_secs(1)),
            None => INPUT_POLL,
        };
        let deadline = tokio::time::sleep(wait(scheduled));
        tokio::pin!(deadline);
        loop {
            let check_at = match (&check, &served) {
                (Some(check), Some(_)) => Some(*next_check.get_or_insert_with(|| {
                    tokio::time::Instant::now() + source::session::check_interval(check)
                })),
                _ => None,
            };
            tokio::select! {
                () = &mut deadline => {
                    if scheduled.is_some() || read_inputs(&name, &spec, &secrets).await != inputs {
                        break;
                    }
                    deadline.as_mut().reset(tokio::time::Instant::now() + INPUT_POLL);
                }
                () = dirwatch::changed(&mut files) => {
                    if read_inputs(&name, &spec, &secrets).await != inputs {
                        break;
                    }
                }
                () = sleep_until(save_at) => {
                    match secrets.save().await {
                        Ok(()) if !secrets.has_unsaved() => {
                            tracing::info!(credential = %name, "the rotated refresh token is saved");
                            save_at = None;
                            // The same version again: the store keeps it and forgets the failure.
                            if let Some(served) = &served {
                                store.set(&name, served.clone());
                            }
                        }
                        Ok(()) => save_at = Some(tokio::time::Instant::now() + PERSIST_RETRY),
                        Err(e) => {
                            store.fail(&name, unsaved_message(&e));
                            save_at = Some(tokio::time::Instant::now() + PERSIST_RETRY);
                        }
                    }
                }
                () = sleep_until(check_at) => {
                    next_check = None;
                    if let (Some(check), Some(served)) = (&check, &served)
                        && check_session(&store, &name, check, served, (form_login, browser_fix.as_deref()), &sources, &mut session_dead).await
                    {
                        tracing::info!(credential = %name, "the session has expired: logging in again");
                        break;
                    }
                }
                request = renewal_requests.recv() => match request {
                    Ok(r) if r.name == name && api_key => {
                        tracing::debug!(credential = %name, "the upstream rejected the key: reading its file again");
                        break;
                    }
                    Ok(r) if r.name == name && sign_in && r.reason == Rejection::Curable(Reason::InsufficientScope) => {
                        step_up(&store, &name, &spec, &secrets, r.scope.as_deref().unwrap_or("")).await;
                    }
                    Ok(r) if r.name == name && attempted.elapsed() >= MIN_FORCED_RENEWAL_INTERVAL => {
                        tracing::info!(credential = %name, "the upstream rejected the credential: renewing now");
                        break;
                    }
                    // Requests were lost; one of them may have been this key's.
                    Err(RecvError::Lagged(_)) if api_key => break,
                    Err(RecvError::Closed) => {
                        (&mut deadline).await;
                        break;
                    }
                    _ => {}
                },
            }
        }
    }
}

/// The stored step-up state of the sign-in credential `name`, and the granted scopes.
async fn step_up_state(
    name: &str,
    spec: &McpCredentialSpec,
    secrets: &SecretFiles,
) -> (Option<StepUp>, Option<String>) {
    let Some(o) = spec.source.oauth2.as_ref() else {
        return (None, None);
    };
    let step_up = match secrets.get(&step_up::step_up_ref(name, o)).await {
        Ok(text) => StepUp::parse(text.expose()).unwrap_or_else(|e| {
            tracing::warn!(credential = %name, error = %e, "the stored step-up is ignored");
            None
        }),
        Err(_) => None,
    };
    let granted = match secrets.get(&source::sign_in::registration_ref(name, o)).await {
        Ok(text) => source::sign_in::Registrations::parse(text.expose())
            .ok()
            .and_then(|r| r.granted_scope().map(str::to_owned)),
        Err(_) => None,
    };
    (step_up, granted)
}

/// Says so when the credential `name` waits for a step-up sign-in (after a restart, or a
/// renewal, which clear what the store said).
async fn pending_step_up(store: &Store, name: &str, spec: &McpCredentialSpec, secrets: &SecretFiles) {
    if let (Some(s), _) = step_up_state(name, spec, secrets).await
        && s.pending
    {
        let command = secrets.sign_in_command(name).unwrap_or_default();
        store.needs_more_consent(name, s.message(&command), command);
    }
}

/// An upstream answered 403 `insufficient_scope` to the signed-in credential `name`, challenging
/// `challenged`: records the step-up (the union of the granted and the challenged scopes, which the
/// next `login` asks for) and says that a person must sign in for it, at most
/// [`step_up::MAX_ATTEMPTS`] times per scope set. The credential keeps being served.
async fn step_up(
    store: &Store,
    name: &str,
    spec: &McpCredentialSpec,
    secrets: &SecretFiles,
    challenged: &str,
) {
    let Some(o) = spec.source.oauth2.as_ref() else {
        return;
    };
    let (previous, granted) = step_up_state(name, spec, secrets).await;
    let command = secrets.sign_in_command(name).unwrap_or_default();
    let (state, message) = match step_up::decide(previous.as_ref(), granted.as_deref(), challenged) {
        step_up::Decision::Waiting(s) => {
            store.needs_more_consent(name, s.message(&command), command);
            return;
        }
        step_up::Decision::Ask(s) => {
            tracing::info!(credential = %name, scope = %s.scope, attempt = s.attempts_for(&s.scope), "the upstream needs more scopes: a step-up sign-in is needed");
            let m = s.message(&command);
            (s, m)
        }
        step_up::Decision::GiveUp(s) => {
            let m = s.gave_up_message(challenged);
            if previous.as_ref() == Some(&s)
                && store.get(name).and_then(|s| s.last_failure).as_deref() == Some(&m)
            {
                // Said already, and nothing to write.
                return;
            }
            (s, m)
        }
    };
    let path = secrets.path(&step_up::step_up_ref(name, o));
    if let Some(dir) = path.parent() {
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    }
    if let Err(e) = secrets.store(path, state.to_json()).await {
        tracing::warn!(credential = %name, error = %crate::error::error_chain(&e), "cannot write the step-up; the next login asks for the default scopes");
    }
    if state.pending {
        store.needs_more_consent(name, message, command);
    } else {
        store.more_consent_refused(name, message);
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the session's liveness check with the header of the credential being served (published again
/// to clear the failure once the check passes again). A dead session is recorded as
/// the credential's last failure (shown in 503 bodies and `/readyz`) and the cookies keep being sent,
/// as the operator does; `true` when a form login should log in again now. A check that cannot tell
/// (the URL unreachable or failing) changes nothing.
async fn check_session(
    store: &Store,
    name: &str,
    check: &mcp_credentials_core::SessionCheck,
    served: &Credential,
    (form_login, browser_fix): (bool, Option<&str>),
    sources: &SourceContext,
    dead: &mut bool,
) -> bool {
    // A session credential is its one header (`Cookie` unless `inject` names another).
    let Some((header, value)) = served.headers.first() else {
        return false;
    };
    let value = SecretString::new(String::from_utf8_lossy(value.as_bytes()));
    match source::session::check(check, header.as_str(), &value, sources.http()).await {
        Ok(()) => {
            if std::mem::take(dead) {
                tracing::info!(credential = %name, "the session check passes again");
                // The same version again: the store keeps it and forgets the failure.
                store.set(name, served.clone());
            }
            false
        }
        Err(e) if e.reason() == source::session::SESSION_EXPIRED => {
            let fix = match (form_login, browser_fix) {
                (true, _) => "logging in again",
                (false, Some(fix)) => fix,
                (false, None) => "export fresh cookies into the cookies file",
            };
            tracing::warn!(credential = %name, error = %e, "the session has expired");
            store.fail(name, format!("{e}; {fix}"));
            *dead = true;
            form_login
        }
        Err(e) => {
            tracing::warn!(credential = %name, error = %e, "the session check could not tell");
            false
        }
    }
}

/// What the credential's source reads: a digest of each referenced file's content (or of why it
/// cannot be read), in the order of [`source::referenced_secrets`], to tell new inputs from none.
/// In memory only, never shown.
async fn read_inputs(name: &str, spec: &McpCredentialSpec, secrets: &SecretFiles) -> Vec<u64> {
    let mut out = Vec::new();
    for r in source::referenced_secrets(name, spec) {
        out.push(match secrets.get(&r).await {
            Ok(v) => digest(v.expose()),
            Err(e) => digest(&e.to_string()),
        });
    }
    out
}

fn digest(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// What the operator would write into the credential's Secret.
fn secret_data(
    spec: &McpCredentialSpec,
    header: &str,
    value: &SecretString,
    issued: &Issued,
    version: u64,
) -> BTreeMap<String, Vec<u8>> {
    let version = version.to_string();
    CredentialData {
        upstream: &spec.upstream,
        headers: vec![(header, value.expose().as_bytes())],
        expires_at: issued.expires_at,
        version: &version,
    }
    .to_data()
}

/// Writes a rotated refresh token back to its file (atomically, durably, mode 0600) before the new
/// token is used. On an error the token is kept in memory (the next refresh redeems it) and written
/// again every [`PERSIST_RETRY`].
async fn persist_rotated_refresh_token(
    name: &str,
    spec: &McpCredentialSpec,
    secrets: &SecretFiles,
    issued: &Issued,
) -> Result<(), SaveError> {
    let (Some(token), Some(r)) = (
        &issued.rotated_refresh_token,
        rotated_refresh_token_ref(name, spec),
    ) else {
        return Ok(());
    };
    secrets.store(secrets.path(&r), token.clone()).await
}

/// Our own write-back of the rotated refresh `token` is not a new input of the credential.
fn own_write_back(inputs: &mut [u64], name: &str, spec: &McpCredentialSpec, token: &SecretString) {
    if let Some(r) = rotated_refresh_token_ref(name, spec)
        && let Some(i) = source::referenced_secrets(name, spec)
            .iter()
            .position(|x| *x == r)
    {
        inputs[i] = digest(token.expose());
    }
}

/// Where a rotated refresh token goes: a sign-in credential's sign-in directory, else
/// `oauth2.refreshToken`.
fn rotated_refresh_token_ref(name: &str, spec: &McpCredentialSpec) -> Option<SecretKeyRef> {
    let o = spec.source.oauth2.as_ref()?;
    match o.grant {
        OAuth2Grant::AuthorizationCode => Some(source::sign_in::refresh_token_ref(name, o)),
        _ => o.refresh_token.clone(),
    }
}

/// The credential's last failure while a rotated refresh token is not on disk.
fn unsaved_message(e: &SaveError) -> String {
    let cause = e.source.to_string();
    format!(
        "{e} ({cause}): the rotated refresh token is kept in memory and written again every {}s; \
         make the file writable, or the token is lost when the sidecar stops",
        PERSIST_RETRY.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mcp-standalone-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_rotated_refresh_token_replaces_its_file_whole_readable_by_its_owner_only() {
        let dir = temp_dir("mode");
        let path = dir.join("refresh-token");
        std::fs::write(&path, "rt-old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A temporary file left by a crash, world-readable: narrowed and replaced, not reused as is.
        std::fs::write(dir.join(".refresh-token.rotating"), "stale").unwrap();
        std::fs::set_permissions(
            dir.join(".refresh-token.rotating"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();

        write_private_file(&path, b"rt-new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "rt-new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        assert!(
            !dir.join(".refresh-token.rotating").exists(),
            "the temporary file is renamed away"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_refresh_token_that_cannot_be_written_is_kept_served_and_written_later() {
        let dir = temp_dir("unsaved");
        // `login` is a file, not a directory: `login/refresh-token` cannot be written (as root, too).
        std::fs::write(dir.join("login"), "in the way").unwrap();
        let files = SecretFiles::new(dir.clone());
        let r = SecretKeyRef {
            name: "login".into(),
            key: "refresh-token".into(),
        };
        let failed = files
            .store(files.path(&r), SecretString::new("rt-rotated"))
            .await
            .expect_err("the write fails");
        let message = unsaved_message(&failed);
        assert!(
            message.contains("login/refresh-token") && message.contains("kept in memory"),
            "{message}"
        );
        assert!(
            !message.contains("rt-rotated"),
            "the message holds the token: {message}"
        );
        assert!(files.has_unsaved());
        // The next refresh redeems the rotated token, not what is (or is not) on disk.
        assert_eq!(files.get(&r).await.unwrap().expose(), "rt-rotated");

        std::fs::remove_file(dir.join("login")).unwrap();
        std::fs::create_dir(dir.join("login")).unwrap();
        files.save().await.unwrap();
        assert!(!files.has_unsaved());
        assert_eq!(
            std::fs::read_to_string(dir.join("login/refresh-token")).unwrap(),
            "rt-rotated"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_api_key_file_becomes_a_credential_and_edits_are_picked_up() {
        let dir = std::env::temp_dir().join(format!("mcp-sidecar-standalone-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("demo-key")).unwrap();
        std::fs::write(dir.join("demo-key/api-key"), "key-one\n").unwrap();
        let file = dir.join("creds.yaml");
        std::fs::write(
            &file,
            "---\napiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: demo}\n\
             spec:\n  upstream: http://127.0.0.1:9/mcp\n  source:\n    apiKey:\n      secretKeyRef: {name: demo-key, key: api-key}\n  \
             inject: {header: X-API-Key}\n---\n",
        )
        .unwrap();
        let store = Store::new(["demo".to_owned()]);
        let mut changes = store.subscribe();
        let (task, _) = start(store.clone(), &file, &dir, OutboundPolicy::default())
            .await
            .unwrap();
        changes
            .wait_for(|_| store.get("demo").unwrap().current.is_some())
            .await
            .unwrap();
        let c = store.get("demo").unwrap().current.unwrap();
        assert_eq!(c.headers[0].0, "x-api-key");
        assert_eq!(c.headers[0].1, "key-one");
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:9/mcp");
        assert_eq!(c.expires_at, None);

        std::fs::write(dir.join("demo-key/api-key"), "key-two").unwrap();
        changes
            .wait_for(|_| store.get("demo").unwrap().current.unwrap().headers[0].1 == "key-two")
            .await
            .unwrap();
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A token endpoint for the refresh-token grant that accepts only `good` (answering access
    /// tokens living `lifetime` seconds, without rotation) and answers `invalid_grant` to anything
    /// else, and how many token requests it got.
    async fn token_endpoint(
        good: &'static str,
        lifetime: u64,
    ) -> (String, Arc<std::sync::atomic::AtomicU32>) {
        use axum::{Json, http::StatusCode, response::IntoResponse, routing};
        let requests = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = requests.clone();
        let app = axum::Router::new().route(
            "/token",
            routing::post(move |form: String| async move {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if form.split('&').any(|p| p == format!("refresh_token={good}")) {
                    let body = serde_json::json!({"access_token": format!("at-{n}"), "token_type": "Bearer", "expires_in": lifetime});
                    Json(body).into_response()
                } else {
                    (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": "invalid_grant"}))).into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, requests)
    }

    /// Standalone mode on credential `api`, a refresh-token grant at `token_url` with the refresh
    /// token in `dir/api-oauth/refresh-token`.
    async fn start_refreshing(
        dir: &Path,
        token_url: &str,
        refresh_token: &str,
    ) -> (Arc<Store>, JoinHandle<()>) {
        std::fs::create_dir_all(dir.join("api-oauth")).unwrap();
        std::fs::write(dir.join("api-oauth/refresh-token"), refresh_token).unwrap();
        let file = dir.join("creds.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {{name: api}}\n\
                 spec:\n  upstream: http://127.0.0.1:9/mcp\n  source:\n    oauth2:\n      grant: refreshToken\n      \
                 tokenUrl: {token_url}\n      clientId: c\n      refreshToken: {{name: api-oauth, key: refresh-token}}\n"
            ),
        )
        .unwrap();
        let store = Store::new(["api".to_owned()]);
        let policy = OutboundPolicy { allow_loopback: true };
        let (task, _) = start(store.clone(), &file, dir, policy).await.unwrap();
        (store, task)
    }

    #[tokio::test]
    async fn after_invalid_grant_no_token_request_until_the_refresh_token_file_changes_then_at_once() {
        let (url, requests) = token_endpoint("rt-new", 3600).await;
        let dir = temp_dir("invalid-grant");
        let (store, task) = start_refreshing(&dir, &url, "rt-dead").await;
        let failure = || {
            store
                .get("api")
                .and_then(|s| s.last_failure)
                .map(|f| f.to_string())
        };
        until("the invalid_grant failure", || {
            failure().is_some_and(|f| f.contains("invalid_grant"))
        })
        .await;
        let message = failure().unwrap();
        assert!(message.contains("until the files it reads change"), "{message}");
        // An unrelated file changes: still no token request (the dead token is not redeemed again).
        std::fs::write(dir.join("notes"), "unrelated").unwrap();
        // A person stores a new refresh token: redeemed at once (the directory watch), once.
        std::fs::write(dir.join("api-oauth/refresh-token"), "rt-new\n").unwrap();
        until("the credential from the new refresh token", || {
            store.get("api").and_then(|s| s.current).is_some()
        })
        .await;
        assert_eq!(
            requests.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one dead attempt, one good"
        );
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A server that rotates the refresh token but answers `expires_in: 0`: the access token is
    /// refused, the rotated refresh token (the only live one now) is still written to its file,
    /// and the next refresh redeems it.
    #[tokio::test]
    async fn a_rotated_refresh_token_in_a_refused_answer_is_written_to_its_file() {
        use axum::{Json, routing};
        let forms = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = forms.clone();
        let app = axum::Router::new().route(
            "/token",
            routing::post(move |form: String| async move {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(form);
                    seen.len()
                };
                Json(serde_json::json!({
                    "access_token": format!("at-{n}"), "token_type": "Bearer",
                    "expires_in": 0, "refresh_token": format!("rt-{}", n + 1),
                }))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = temp_dir("refused-rotated");
        let (store, task) = start_refreshing(&dir, &url, "rt-1").await;
        until("the refusal of the expired access token", || {
            store.get("api").and_then(|s| s.last_failure).is_some()
        })
        .await;
        let failure = store.get("api").and_then(|s| s.last_failure).unwrap().to_string();
        assert!(failure.contains("expires_in 0"), "{failure}");
        until("the rotated refresh token on disk", || {
            std::fs::read_to_string(dir.join("api-oauth/refresh-token")).is_ok_and(|t| t != "rt-1")
        })
        .await;
        let on_disk = std::fs::read_to_string(dir.join("api-oauth/refresh-token")).unwrap();
        let sent = forms.lock().unwrap().clone();
        assert!(sent[0].contains("refresh_token=rt-1"), "{sent:?}");
        // What is on disk is the newest token the server issued, never a spent one.
        assert_eq!(on_disk, format!("rt-{}", sent.len() + 1), "{sent:?}");
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_one_second_token_is_renewed_no_sooner_than_ten_seconds_after_issue() {
        let (url, requests) = token_endpoint("rt", 1).await;
        let dir = temp_dir("short-lived");
        let (store, task) = start_refreshing(&dir, &url, "rt").await;
        until("the first token", || {
            store.get("api").and_then(|s| s.current).is_some()
        })
        .await;
        // Renewing at 2/3 of one second would be a token request a second; the floor is 10 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A site with a form login and a session check: `/login` sets `sid=<n>` (n counts logins),
    /// `/check` answers 200 for a session that is not revoked and 401 otherwise.
    struct Site {
        url: String,
        logins: Arc<std::sync::atomic::AtomicU32>,
        revoked: Arc<std::sync::Mutex<Vec<String>>>,
    }

    async fn site() -> Site {
        use axum::{http::HeaderMap, routing};
        let logins = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let revoked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (l, r) = (logins.clone(), revoked.clone());
        let app = axum::Router::new()
            .route(
                "/login",
                routing::post(move || async move {
                    let n = l.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    ([("set-cookie", format!("sid={n}; Path=/"))], "welcome")
                }),
            )
            .route(
                "/check",
                routing::get(move |headers: HeaderMap| async move {
                    let cookie = headers.get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("");
                    match !cookie.is_empty() && !r.lock().unwrap().iter().any(|c| c == cookie) {
                        true => axum::http::StatusCode::OK,
                        false => axum::http::StatusCode::UNAUTHORIZED,
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Site { url, logins, revoked }
    }

    /// Polls `condition` until it holds (10 s at most).
    async fn until(what: &str, condition: impl Fn() -> bool) {
        for _ in 0..200 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Standalone mode on credential `wiki`: a session (`session`, YAML at the session's indentation,
    /// `{url}` standing for the site) with a check of the site every second.
    async fn start_wiki(dir: &Path, site: &Site, session: &str) -> (Arc<Store>, JoinHandle<()>) {
        let file = dir.join("creds.yaml");
        let yaml = format!(
            "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {{name: wiki}}\n\
             spec:\n  upstream: {{url}}/mcp\n  source:\n    session:\n      {session}\n      \
             check: {{url: {{url}}/check, interval: 1s}}\n"
        );
        std::fs::write(&file, yaml.replace("{url}", &site.url)).unwrap();
        let store = Store::new(["wiki".to_owned()]);
        let (task, _) = start(store.clone(), &file, dir, OutboundPolicy::default())
            .await
            .unwrap();
        (store, task)
    }

    fn cookie(store: &Store) -> Option<String> {
        let c = store.get("wiki")?.current?;
        Some(c.headers[0].1.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn a_session_check_that_fails_logs_in_again_with_a_form_login() {
        let site = site().await;
        let dir = std::env::temp_dir().join(format!("mcp-sidecar-session-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("wiki-login")).unwrap();
        std::fs::write(dir.join("wiki-login/username"), "ann").unwrap();
        std::fs::write(dir.join("wiki-login/password"), "pw").unwrap();
        let (store, task) = start_wiki(
            &dir,
            &site,
            "formLogin:\n        url: {url}/login\n        username: {name: wiki-login, key: username}\n        \
             password: {name: wiki-login, key: password}",
        )
        .await;
        until("the first login", || cookie(&store).as_deref() == Some("sid=1")).await;
        // The site ends that session: the next check fails, and the sidecar logs in again.
        site.revoked.lock().unwrap().push("sid=1".into());
        until("a second login", || cookie(&store).as_deref() == Some("sid=2")).await;
        assert_eq!(site.logins.load(std::sync::atomic::Ordering::SeqCst), 2);
        // The new session passes its checks: no further login, no failure left.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(site.logins.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(store.get("wiki").unwrap().last_failure.is_none());
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_dead_imported_session_is_reported_until_its_check_passes_again() {
        let site = site().await;
        let dir = std::env::temp_dir().join(format!("mcp-sidecar-cookies-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("wiki-cookies")).unwrap();
        std::fs::write(
            dir.join("wiki-cookies/cookies.txt"),
            "127.0.0.1\tFALSE\t/\tFALSE\t0\tsid\timported\n",
        )
        .unwrap();
        let (store, task) = start_wiki(
            &dir,
            &site,
            "cookies:\n        secretKeyRef: {name: wiki-cookies, key: cookies.txt}",
        )
        .await;
        until("the imported cookies", || {
            cookie(&store).as_deref() == Some("sid=imported")
        })
        .await;
        site.revoked.lock().unwrap().push("sid=imported".into());
        let failure = || store.get("wiki").unwrap().last_failure.map(|f| f.to_string());
        until("the expired session to be reported", || failure().is_some()).await;
        let message = failure().unwrap();
        assert!(message.contains("export fresh cookies"), "{message}");
        assert!(
            !message.contains("imported"),
            "the cookie value leaked: {message}"
        );
        // The cookies keep being served (the site may still take them for other paths).
        assert_eq!(cookie(&store).as_deref(), Some("sid=imported"));
        // The site takes the session back: the next passing check clears the failure.
        site.revoked.lock().unwrap().clear();
        until("the failure to clear", || failure().is_none()).await;
        assert_eq!(site.logins.load(std::sync::atomic::Ordering::SeqCst), 0);
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_browser_session_is_served_until_the_person_signs_out_and_again_once_signed_in() {
        use source::session::{Cookie, browser};
        let site = site().await;
        let dir = temp_dir("browser");
        let (store, task) = start_wiki(&dir, &site, "browser: {}").await;
        let failure = || store.get("wiki").unwrap().last_failure.map(|f| f.to_string());
        until("the request to sign in", || {
            failure().is_some_and(|f| f.contains("sign in to 127.0.0.1:") && f.contains("in your browser"))
        })
        .await;
        // What the sidecar's endpoint writes when the extension sends the browser's cookies.
        let send = |value: Option<&str>| {
            let cookies: Vec<Cookie> = value
                .map(|v| Cookie {
                    name: "sid".into(),
                    value: SecretString::new(v),
                    domain: "127.0.0.1".into(),
                    include_subdomains: false,
                    path: "/".into(),
                    secure: false,
                    expires: None,
                })
                .into_iter()
                .collect();
            let r = browser::cookies_ref("wiki");
            std::fs::create_dir_all(dir.join(&r.name)).unwrap();
            write_private_file(
                &dir.join(&r.name).join(&r.key),
                browser::to_json(&cookies).expose().as_bytes(),
            )
            .unwrap();
        };
        send(Some("b1"));
        until("the browser's session", || {
            cookie(&store).as_deref() == Some("sid=b1")
        })
        .await;
        // The person signs out: nothing is served, and the message says what to do.
        send(None);
        until("the signed-out session to be dropped", || {
            cookie(&store).is_none()
        })
        .await;
        let message = failure().unwrap();
        assert!(
            message.contains("signed out") && message.contains("in your browser"),
            "{message}"
        );
        send(Some("b2"));
        until("the new session", || cookie(&store).as_deref() == Some("sid=b2")).await;
        assert!(failure().is_none());
        // The site ends the session: the check says so, in the browser's words.
        site.revoked.lock().unwrap().push("sid=b2".into());
        until("the failing check", || {
            failure().is_some_and(|f| f.contains("expected 200") && f.contains("sign in to 127.0.0.1:"))
        })
        .await;
        assert!(!failure().unwrap().contains("b2"), "the cookie value leaked");
        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_offline_example_loads_its_api_key() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/standalone");
        let store = Store::new(["demo".to_owned()]);
        let mut changes = store.subscribe();
        let (task, _) = start(
            store.clone(),
            &dir.join("mcpcredentials.yaml"),
            &dir.join("secrets"),
            OutboundPolicy::default(),
        )
        .await
        .unwrap();
        changes
            .wait_for(|_| store.get("demo").unwrap().current.is_some())
            .await
            .unwrap();
        let c = store.get("demo").unwrap().current.unwrap();
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:8931/mcp");
        assert_eq!(c.headers[0].0, "x-api-key");
        assert_eq!(c.headers[0].1, "demo-key-change-me");
        task.abort();
    }

    #[tokio::test]
    async fn a_standalone_jwt_is_signed_with_the_key_file_and_names_its_kid() {
        use mcp_credentials_core::{JwtAlgorithm, source::jwt};
        let dir = std::env::temp_dir().join(format!("mcp-sidecar-standalone-jwt-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(SIGNING_KEY_DIR)).unwrap();
        let (pem, kid) = jwt::generate_key(JwtAlgorithm::ES256).unwrap();
        std::fs::write(dir.join(SIGNING_KEY_DIR).join("es256.pem"), pem.expose()).unwrap();
        std::fs::write(
            dir.join(SIGNING_KEY_DIR).join("issuer"),
            "https://laptop.example\n",
        )
        .unwrap();
        let files = SecretFiles::new(dir.clone());
        let key = files.signing_key(JwtAlgorithm::ES256).await.unwrap();
        assert_eq!(
            (key.kid.as_str(), key.issuer.as_str()),
            (kid.as_str(), "https://laptop.example")
        );
        let missing = files.signing_key(JwtAlgorithm::RS256).await.unwrap_err();
        assert!(missing.to_string().contains("rs256.pem"), "{missing}");
        std::fs::write(dir.join(SIGNING_KEY_DIR).join("rs256.pem"), "not a key").unwrap();
        let bad = files.signing_key(JwtAlgorithm::RS256).await.unwrap_err();
        assert!(bad.to_string().contains("PKCS#8"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_without_credentials_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("mcp-sidecar-empty-{}.yaml", std::process::id()));
        std::fs::write(&file, "---\n").unwrap();
        let e = load(&file).unwrap_err();
        assert!(e.to_string().contains("no McpCredential"), "{e}");
        std::fs::remove_file(&file).unwrap();
    }
}

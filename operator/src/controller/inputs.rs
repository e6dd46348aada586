//! What a reconcile reads: the referenced Secrets (once per reconcile, fingerprinted), and the
//! resolver a source reads through (those Secrets, service-account tokens, the signing keys).

use super::*;
use mcp_credentials_core::source::sign_in::step_up;

/// Secret types never read as inputs, whoever wrote the McpCredential (the admission webhook may be
/// off, or the credential older than it): the cluster's own credentials, which a source would send
/// to a URL of the author's choice. A service account's identity goes through
/// `tokenExchange.subject.serviceAccount` instead: a short-lived token, for one allowed audience.
pub(super) const REFUSED_INPUT_TYPES: [&str; 2] = [
    "kubernetes.io/service-account-token",
    "bootstrap.kubernetes.io/token",
];

/// The referenced Secrets, read once per reconcile: resolves keys and fingerprints the inputs.
#[derive(Clone)]
pub(super) struct Inputs(pub(super) BTreeMap<String, Option<Secret>>);

impl Inputs {
    pub(super) async fn fetch(api: &Api<Secret>, refs: &[SecretKeyRef]) -> Result<Self, kube::Error> {
        let mut map = BTreeMap::new();
        for r in refs {
            if !map.contains_key(&r.name) {
                map.insert(r.name.clone(), api.get_opt(&r.name).await?);
            }
        }
        Ok(Self(map))
    }

    /// A fingerprint of the spec and the referenced Secrets' resource versions (no secret values).
    pub(super) fn fingerprint(&self, cred: &McpCredential) -> String {
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

impl Inputs {
    /// What `ReauthRequired` says while a step-up (SEP-2350) waits for a person to sign in for more
    /// scopes, naming the command; `None` when none does.
    pub(super) fn more_consent(&self, cred: &McpCredential) -> Option<String> {
        let o = cred
            .spec
            .source
            .oauth2
            .as_ref()
            .filter(|_| source::sign_in::applies(&cred.spec))?;
        let name = cred.name_any();
        let text = self.value(&step_up::step_up_ref(&name, o)).ok()?;
        let state = step_up::StepUp::parse(text.expose()).ok()??;
        let command = sign_in_command(&name, &cred.namespace().unwrap_or_default());
        state.pending.then(|| state.message(&command))
    }
}

impl SecretResolver for Inputs {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        self.value(r)
    }
}

impl Inputs {
    /// The value of `r` in the Secrets read.
    pub(super) fn value(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
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
pub(super) struct Resolver<'a> {
    /// The credential's namespace, which minted `jwt` tokens are bound to.
    pub(super) namespace: &'a str,
    /// The credential (`namespace/name`), whose rotated refresh token is kept in `pending`.
    pub(super) key: &'a str,
    pub(super) pending: &'a Mutex<HashMap<String, PendingRefreshToken>>,
    pub(super) inputs: &'a Inputs,
    pub(super) service_accounts: Api<ServiceAccount>,
    pub(super) keys: Option<&'a Keys>,
}

impl SecretResolver for Resolver<'_> {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretString, ResolveError> {
        self.inputs.get(r).await
    }

    fn namespace(&self) -> Option<&str> {
        Some(self.namespace)
    }

    /// A person signs a credential in with the kubectl plugin, with their own kubeconfig.
    fn sign_in_command(&self, credential: &str) -> Option<String> {
        Some(sign_in_command(credential, self.namespace))
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

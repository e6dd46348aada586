//! The validating admission webhook on McpCredentials: creating or changing one must never give
//! its author more than their own RBAC gives them (DESIGN.md, "Trust"). The operator reads the
//! Secrets a credential names, writes its output Secret and requests service-account tokens, all
//! with its own, wider permissions; so before it accepts a spec it asks the API server, by
//! SubjectAccessReview *as the requesting user*, whether that user could do each of those things.
//!
//! What is checked, in the credential's namespace:
//! - `get` on every Secret the spec reads (`source::referenced_secrets`);
//! - `create` and `patch` on the output Secret: the operator writes it by server-side apply, a
//!   PATCH that creates the Secret when it is missing, so these are the verbs the author would
//!   need to write it themselves (`update` is never used, so it is not required);
//! - `create` on `serviceaccounts/token` of every service account whose token a `tokenExchange`
//!   source exchanges (what `kubectl create token` needs).
//!
//! An UPDATE that leaves the spec as it was (labels, annotations, finalizers; status is a
//! subresource and never sent here) needs no check: the operator's own writes are of that kind.
//! Any change of the spec re-checks everything the new spec reads, so a permitted author cannot
//! swap in a Secret they may not read.

use std::{collections::BTreeMap, future::Future, time::Duration};

use k8s_openapi::api::{
    authentication::v1::UserInfo,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{
    Api, Client,
    api::PostParams,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, Operation},
    },
};
use mcp_credentials_core::{McpCredential, McpCredentialSpec, SecretKeyRef, secret::secret_name, source};

/// Where the webhook listens on the operator's HTTPS listener.
pub const PATH: &str = "/validate-mcpcredential";

/// How long all the SubjectAccessReviews of one request may take together: less than the
/// webhook's `timeoutSeconds` (5 in the chart), so the author reads our message, not a timeout.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(4);

/// Something the operator would do for the author, which the author must be allowed to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Read this Secret (an input).
    ReadSecret(String),
    /// Write this Secret (the output).
    WriteSecret(String),
    /// Request a token of this service account (a `tokenExchange` subject).
    ServiceAccountToken(String),
}

impl Target {
    /// The verbs the author must hold, in the order they are reported.
    fn verbs(&self) -> &'static [&'static str] {
        match self {
            Self::ReadSecret(_) => &["get"],
            Self::WriteSecret(_) => &["create", "patch"],
            Self::ServiceAccountToken(_) => &["create"],
        }
    }

    /// The attributes of one SubjectAccessReview.
    fn attributes(&self, namespace: &str, verb: &str) -> ResourceAttributes {
        let (resource, subresource, name) = match self {
            Self::ReadSecret(n) | Self::WriteSecret(n) => ("secrets", None, n),
            Self::ServiceAccountToken(n) => ("serviceaccounts", Some("token".to_owned()), n),
        };
        ResourceAttributes {
            namespace: Some(namespace.to_owned()),
            verb: Some(verb.to_owned()),
            group: Some(String::new()),
            version: Some("v1".into()),
            resource: Some(resource.into()),
            subresource,
            // A real create of a Secret carries no name (RBAC `resourceNames` cannot grant it),
            // so neither does the review; a TokenRequest names its service account.
            name: (verb != "create" || matches!(self, Self::ServiceAccountToken(_))).then(|| name.clone()),
            ..ResourceAttributes::default()
        }
    }
}

/// One permission a spec asks for, and the field that asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The field, as the author wrote it: `spec.source.oauth2.clientSecret`.
    pub field: String,
    /// What the operator would do.
    pub target: Target,
}

/// Every permission the spec of credential `name` asks the operator to use on its author's behalf.
pub fn needs(name: &str, spec: &McpCredentialSpec) -> Vec<Need> {
    let mut out = Vec::new();
    let mut read = |field: &str, r: &SecretKeyRef| {
        out.push(Need {
            field: field.to_owned(),
            target: Target::ReadSecret(r.name.clone()),
        });
    };
    let labelled = labelled_secrets(spec);
    for (field, r) in &labelled {
        read(field, r);
    }
    // A sign-in credential's Secret: the operator reads it and writes the rotated refresh token
    // back, so its author must be allowed to read it (`kubectl mcpcred login` writes it with the
    // person's own rights).
    let sign_in = spec
        .source
        .oauth2
        .as_ref()
        .filter(|_| source::sign_in::applies(spec))
        .map(|o| source::sign_in::secret_name(name, o));
    if let Some(secret) = &sign_in {
        read(
            "spec.source.oauth2.signIn.secretName",
            &SecretKeyRef {
                name: secret.clone(),
                key: source::sign_in::REFRESH_TOKEN_KEY.into(),
            },
        );
    }
    // A reference added to core but not labelled here is still checked, under a coarser name.
    for r in source::referenced_secrets(name, spec) {
        if sign_in.as_ref() != Some(&r.name) && !labelled.iter().any(|(_, l)| **l == r) {
            read("spec.source", &r);
        }
    }
    if let Some(sa) = spec
        .source
        .token_exchange
        .as_ref()
        .and_then(|t| t.subject.service_account.as_ref())
    {
        out.push(Need {
            field: "spec.source.tokenExchange.subject.serviceAccount.name".into(),
            target: Target::ServiceAccountToken(sa.name.clone()),
        });
    }
    out.push(Need {
        field: "spec.secretName".into(),
        target: Target::WriteSecret(secret_name(name, spec.secret_name.as_deref())),
    });
    out
}

/// The Secret references of [`source::referenced_secrets`], each with its field path.
fn labelled_secrets(spec: &McpCredentialSpec) -> Vec<(&'static str, &SecretKeyRef)> {
    let s = &spec.source;
    let mut out: Vec<(&'static str, &SecretKeyRef)> = Vec::new();
    if let Some(o) = &s.oauth2 {
        out.extend(
            o.client_secret
                .iter()
                .map(|r| ("spec.source.oauth2.clientSecret", r)),
        );
        out.extend(o.private_key.iter().map(|r| ("spec.source.oauth2.privateKey", r)));
        out.extend(
            o.refresh_token
                .iter()
                .map(|r| ("spec.source.oauth2.refreshToken", r)),
        );
    }
    if let Some(a) = &s.api_key {
        out.push(("spec.source.apiKey.secretKeyRef", &a.secret_key_ref));
    }
    if let Some(t) = &s.token_exchange {
        out.extend(
            t.client_secret
                .iter()
                .map(|r| ("spec.source.tokenExchange.clientSecret", r)),
        );
        out.extend(
            t.subject
                .secret_key_ref
                .iter()
                .map(|r| ("spec.source.tokenExchange.subject.secretKeyRef", r)),
        );
        out.extend(
            t.cross_app_access
                .iter()
                .filter_map(|x| x.client_secret.as_ref())
                .map(|r| ("spec.source.tokenExchange.crossAppAccess.clientSecret", r)),
        );
    }
    if let Some(g) = &s.github_app {
        out.push(("spec.source.githubApp.privateKey", &g.private_key));
    }
    if let Some(sess) = &s.session {
        if let Some(c) = &sess.cookies {
            out.push(("spec.source.session.cookies.secretKeyRef", &c.secret_key_ref));
        }
        if let Some(f) = &sess.form_login {
            out.push(("spec.source.session.formLogin.username", &f.username));
            out.push(("spec.source.session.formLogin.password", &f.password));
        }
    }
    out
}

/// Answers one SubjectAccessReview question: may `user` do what `attributes` say?
pub trait Authorizer {
    /// True when allowed; an error when the API server could not answer.
    fn allowed(
        &self,
        user: &UserInfo,
        attributes: ResourceAttributes,
    ) -> impl Future<Output = Result<bool, kube::Error>> + Send;
}

impl Authorizer for Client {
    async fn allowed(&self, user: &UserInfo, attributes: ResourceAttributes) -> Result<bool, kube::Error> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(attributes),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.clone());
        let answer = api.create(&PostParams::default(), &review).await?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}

/// Decides one admission request: `Ok` admits it, `Err` denies it with a message for the author.
/// Requests that are not a CREATE or UPDATE of an McpCredential are admitted untouched, so a
/// misconfigured webhook never blocks unrelated objects.
pub async fn review(auth: &impl Authorizer, request: &AdmissionRequest<DynamicObject>) -> Result<(), String> {
    if !matches!(request.operation, Operation::Create | Operation::Update)
        || request.kind.group != "mcpcredentials.dev"
        || request.kind.kind != "McpCredential"
        || request.sub_resource.as_deref().is_some_and(|s| !s.is_empty())
    {
        return Ok(());
    }
    let Some(object) = &request.object else {
        return Ok(());
    };
    let credential = parse(object).map_err(|e| format!("unreadable McpCredential: {e}"))?;
    if request.operation == Operation::Update
        && let Some(old) = request.old_object.as_ref().and_then(|o| parse(o).ok())
        && old.spec == credential.spec
    {
        return Ok(());
    }
    let namespace = request
        .namespace
        .clone()
        .or_else(|| credential.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    // On CREATE with generateName the request's name is empty; the object has the generated one.
    let name = credential
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| request.name.clone());
    let needs = needs(&name, &credential.spec);
    let user = &request.user_info;
    let answers = tokio::time::timeout(REVIEW_TIMEOUT, ask(auth, user, &namespace, &needs))
        .await
        .map_err(|_| {
            format!(
                "could not check your permissions in time (SubjectAccessReview took longer than {}s); \
                 try again",
                REVIEW_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| {
            format!("could not check your permissions (SubjectAccessReview failed: {e}); try again")
        })?;
    let who = user.username.as_deref().unwrap_or("anonymous");
    let refusals: Vec<String> = needs
        .iter()
        .filter_map(|need| {
            let missing: Vec<&str> = need
                .target
                .verbs()
                .iter()
                .copied()
                .filter(|verb| answers.get(&key(&need.target, verb)) != Some(&true))
                .collect();
            (!missing.is_empty()).then(|| refusal(who, &namespace, need, &missing))
        })
        .collect();
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(refusals.join("\n"))
    }
}

fn parse(object: &DynamicObject) -> Result<McpCredential, serde_json::Error> {
    serde_json::to_value(object).and_then(serde_json::from_value)
}

/// The distinct questions of `needs`, asked concurrently.
async fn ask(
    auth: &impl Authorizer,
    user: &UserInfo,
    namespace: &str,
    needs: &[Need],
) -> Result<BTreeMap<(String, String), bool>, kube::Error> {
    let mut questions = BTreeMap::new();
    for need in needs {
        for verb in need.target.verbs() {
            questions
                .entry(key(&need.target, verb))
                .or_insert_with(|| need.target.attributes(namespace, verb));
        }
    }
    let answers = futures::future::try_join_all(
        questions
            .into_iter()
            .map(|(k, attributes)| async move { auth.allowed(user, attributes).await.map(|a| (k, a)) }),
    )
    .await?;
    Ok(answers.into_iter().collect())
}

fn key(target: &Target, verb: &str) -> (String, String) {
    (format!("{target:?}"), verb.to_owned())
}

/// What the author reads: the field, the object, the missing permission, why it matters, the fix.
fn refusal(who: &str, namespace: &str, need: &Need, missing: &[&str]) -> String {
    let verbs = missing.join(" and ");
    let field = &need.field;
    match &need.target {
        Target::ReadSecret(name) => format!(
            "{field}: you ({who}) may not get secret {name:?} in namespace {namespace:?}; the operator would \
             read it for you. Ask for get on that Secret, or reference one you can read."
        ),
        Target::WriteSecret(name) => format!(
            "{field}: you ({who}) may not {verbs} secret {name:?} in namespace {namespace:?}; the operator \
             would write the credential there for you. Ask for {verbs} on that Secret, or set spec.secretName \
             to one you may write."
        ),
        Target::ServiceAccountToken(name) => format!(
            "{field}: you ({who}) may not create serviceaccounts/token for service account {name:?} in \
             namespace {namespace:?}; the operator would request its token for you. Ask for create on \
             serviceaccounts/token of that service account, or name one you may request tokens for."
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::fixtures;

    /// Allows exactly the listed `(verb, resource, name)` triples and records every question.
    #[derive(Default)]
    struct Fake {
        allow: Vec<(&'static str, &'static str, &'static str)>,
        asked: Mutex<Vec<ResourceAttributes>>,
        fail: bool,
    }

    impl Authorizer for Fake {
        async fn allowed(&self, user: &UserInfo, a: ResourceAttributes) -> Result<bool, kube::Error> {
            assert_eq!(user.username.as_deref(), Some("alice"));
            if self.fail {
                return Err(kube::Error::LinesCodecMaxLineLengthExceeded);
            }
            let resource = match a.subresource.as_deref() {
                Some(sub) => format!("{}/{sub}", a.resource.as_deref().unwrap_or_default()),
                None => a.resource.clone().unwrap_or_default(),
            };
            let ok = self.allow.iter().any(|(v, r, n)| {
                Some(*v) == a.verb.as_deref()
                    && *r == resource
                    && (n.is_empty() || Some(*n) == a.name.as_deref())
            });
            self.asked.lock().unwrap().push(a);
            Ok(ok)
        }
    }

    /// A credential `name` whose source is `source` (JSON, as a user writes it).
    fn with_source(name: &str, secret_name: Option<&str>, source: serde_json::Value) -> McpCredential {
        let mut c = fixtures::credential(name, &[], secret_name);
        c.spec.source = serde_json::from_value(source).unwrap();
        c
    }

    /// An oauth2 client-credentials credential `name` reading its client secret from `secret`.
    fn oauth2(name: &str, secret: &str) -> McpCredential {
        with_source(
            name,
            None,
            serde_json::json!({"oauth2": {"grant": "clientCredentials", "clientId": "agent",
                "tokenUrl": "https://idp.example.com/token", "clientSecret": {"name": secret, "key": "password"}}}),
        )
    }

    fn request(
        operation: &str,
        object: &McpCredential,
        old: Option<&McpCredential>,
    ) -> AdmissionRequest<DynamicObject> {
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "1",
                "kind": {"group": "mcpcredentials.dev", "version": "v1alpha1", "kind": "McpCredential"},
                "resource": {"group": "mcpcredentials.dev", "version": "v1alpha1", "resource": "mcpcredentials"},
                "name": object.metadata.name,
                "namespace": "agents",
                "operation": operation,
                "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
                "object": object,
                "oldObject": old,
            }
        });
        let review: kube::core::admission::AdmissionReview<DynamicObject> =
            serde_json::from_value(review).unwrap();
        review.try_into().unwrap()
    }

    const WRITE_OUTPUT: [(&str, &str, &str); 2] = [("create", "secrets", ""), ("patch", "secrets", "")];

    #[tokio::test]
    async fn a_secret_the_author_may_not_get_is_refused_naming_it_the_field_and_the_verb() {
        let auth = Fake {
            allow: WRITE_OUTPUT.to_vec(),
            ..Fake::default()
        };
        let message = review(&auth, &request("CREATE", &oauth2("github", "db"), None))
            .await
            .unwrap_err();
        assert_eq!(
            message,
            "spec.source.oauth2.clientSecret: you (alice) may not get secret \"db\" in namespace \"agents\"; the \
             operator would read it for you. Ask for get on that Secret, or reference one you can read."
        );
    }

    #[tokio::test]
    async fn an_author_with_every_permission_is_admitted_after_one_question_each() {
        let mut allow = WRITE_OUTPUT.to_vec();
        allow.push(("get", "secrets", "db"));
        let auth = Fake {
            allow,
            ..Fake::default()
        };
        review(&auth, &request("CREATE", &oauth2("github", "db"), None))
            .await
            .unwrap();
        let asked = auth.asked.lock().unwrap();
        assert_eq!(asked.len(), 3, "{asked:?}");
        let create = asked
            .iter()
            .find(|a| a.verb.as_deref() == Some("create"))
            .unwrap();
        assert_eq!(create.name, None, "a create carries no name, as the real request");
        assert!(asked.iter().all(|a| a.namespace.as_deref() == Some("agents")));
        let patch = asked.iter().find(|a| a.verb.as_deref() == Some("patch")).unwrap();
        assert_eq!(patch.name.as_deref(), Some("github-mcp-credential"));
    }

    #[tokio::test]
    async fn a_metadata_only_update_asks_nothing_and_a_swapped_secret_is_checked_again() {
        let auth = Fake::default();
        let old = oauth2("github", "db");
        let mut labelled = old.clone();
        labelled.metadata.labels = Some([("team".to_owned(), "a".to_owned())].into());
        review(&auth, &request("UPDATE", &labelled, Some(&old)))
            .await
            .unwrap();
        assert!(auth.asked.lock().unwrap().is_empty());

        let auth = Fake {
            allow: vec![("get", "secrets", "mine"), WRITE_OUTPUT[0], WRITE_OUTPUT[1]],
            ..Fake::default()
        };
        let old = oauth2("github", "mine");
        let message = review(&auth, &request("UPDATE", &oauth2("github", "db"), Some(&old)))
            .await
            .unwrap_err();
        assert!(message.contains("may not get secret \"db\""), "{message}");
    }

    #[tokio::test]
    async fn a_service_account_subject_needs_create_on_its_token() {
        let c = with_source(
            "exchange",
            Some("out"),
            serde_json::json!({"tokenExchange": {"subject": {"serviceAccount": {"name": "builder", "audience": "idp"}}}}),
        );
        let auth = Fake {
            allow: WRITE_OUTPUT.to_vec(),
            ..Fake::default()
        };
        let message = review(&auth, &request("CREATE", &c, None)).await.unwrap_err();
        assert!(
            message.starts_with(
                "spec.source.tokenExchange.subject.serviceAccount.name: you (alice) may not create \
                 serviceaccounts/token for service account \"builder\""
            ),
            "{message}"
        );
        let asked = auth.asked.lock().unwrap();
        let token = asked
            .iter()
            .find(|a| a.subresource.as_deref() == Some("token"))
            .unwrap();
        assert_eq!(token.name.as_deref(), Some("builder"));
        assert_eq!(token.resource.as_deref(), Some("serviceaccounts"));
    }

    #[tokio::test]
    async fn an_output_secret_the_author_may_not_write_is_refused_with_the_missing_verbs() {
        let auth = Fake {
            allow: vec![("get", "secrets", "k"), ("create", "secrets", "")],
            ..Fake::default()
        };
        let c = fixtures::credential("github", &[], Some("gh-token"));
        let message = review(&auth, &request("CREATE", &c, None)).await.unwrap_err();
        assert_eq!(
            message,
            "spec.secretName: you (alice) may not patch secret \"gh-token\" in namespace \"agents\"; the operator \
             would write the credential there for you. Ask for patch on that Secret, or set spec.secretName to \
             one you may write."
        );
    }

    #[tokio::test]
    async fn when_permissions_cannot_be_checked_the_request_is_refused() {
        let auth = Fake {
            fail: true,
            ..Fake::default()
        };
        let c = fixtures::credential("github", &[], None);
        let message = review(&auth, &request("CREATE", &c, None)).await.unwrap_err();
        assert!(
            message.starts_with("could not check your permissions"),
            "{message}"
        );
    }

    #[test]
    fn every_secret_core_reads_is_labelled_with_its_field() {
        let full: McpCredentialSpec = serde_json::from_value(serde_json::json!({
            "upstream": "https://x.example.com",
            "source": {
                "oauth2": {"grant": "refreshToken", "clientId": "c",
                    "clientSecret": {"name": "a", "key": "k"}, "privateKey": {"name": "b", "key": "k"},
                    "refreshToken": {"name": "c", "key": "k"}},
                "apiKey": {"secretKeyRef": {"name": "d", "key": "k"}},
                "tokenExchange": {"clientSecret": {"name": "e", "key": "k"},
                    "subject": {"secretKeyRef": {"name": "f", "key": "k"}},
                    "crossAppAccess": {"tokenUrl": "https://idp.example.com/token", "clientId": "i",
                        "clientSecret": {"name": "l", "key": "k"}}},
                "githubApp": {"appId": "1", "installationId": 1, "privateKey": {"name": "g", "key": "k"}},
                "session": {"cookies": {"secretKeyRef": {"name": "h", "key": "k"}},
                    "formLogin": {"url": "https://x.example.com/login",
                        "username": {"name": "i", "key": "k"}, "password": {"name": "j", "key": "k"}}}
            }
        }))
        .unwrap();
        let labelled = labelled_secrets(&full);
        let core = source::referenced_secrets("x", &full);
        assert_eq!(labelled.len(), core.len());
        assert!(labelled.iter().zip(&core).all(|((_, l), c)| *l == c));
        assert!(needs("x", &full).iter().all(|n| n.field != "spec.source"));
    }
}

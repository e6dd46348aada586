//! The McpCredential admission webhook as the real API server uses it: an ordinary namespace user
//! (alice, impersonated with `kubectl --as`) may have the operator read, write and request only
//! what her own RBAC lets her; and the operator itself never reads a service-account token Secret,
//! whoever created the credential.

mod operator_support;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::{ControlPlane, Outcome};
use operator_support::{Operator, WebhookOperator, client, condition, create_secret, setup, wait_condition};

const ALICE: &str = "alice";

/// An operator serving the webhook for one namespace, registered with the API server for that
/// namespace only; unregistered (and its files removed) on drop, even when the test fails.
struct Admission {
    cp: &'static ControlPlane,
    ns: String,
    webhook: String,
    dir: PathBuf,
    operator: WebhookOperator,
}

impl Admission {
    fn start(prefix: &str) -> Self {
        let (cp, ns) = setup(prefix);
        let dir = std::env::temp_dir().join(format!("mcp-admission-{ns}"));
        let operator = WebhookOperator::start(cp, &ns, "admission", &dir, &[]);
        let webhook = format!("mcp-credentials-admission-{ns}");
        register_webhook(cp, &webhook, &operator.listen, &ns, &operator.ca_pem);
        // What alice may do in her namespace: manage McpCredentials and write Secrets, read none.
        grant(
            cp,
            &ns,
            "alice-credentials",
            "mcpcredentials.mcpcredentials.dev",
            "get,list,create,update,patch",
            None,
        );
        grant(cp, &ns, "alice-write-secrets", "secrets", "create,patch", None);
        Self {
            cp,
            ns,
            webhook,
            dir,
            operator,
        }
    }

    /// `kubectl apply` as alice, retried while the operator's webhook is not answering yet.
    fn apply_as_alice(&self, yaml: &str) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.cp.tool(
                "kubectl",
                &["apply", "-n", &self.ns, "--as", ALICE, "-f", "-"],
                Some(yaml),
            );
            if out.success || !out.stderr.contains("failed calling webhook") || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn log(&self) -> String {
        self.operator.operator.log_text()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let _ = self
            .cp
            .kubectl(&["delete", "validatingwebhookconfiguration", &self.webhook]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Registers `https://<listen>/validate-mcpcredential` for McpCredentials of `ns` only, as the
/// chart does (CREATE and UPDATE of the main resource; status writes never reach it).
fn register_webhook(cp: &ControlPlane, name: &str, listen: &str, ns: &str, ca_pem: &str) {
    use base64::Engine;
    let config = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "validate.mcpcredentials.dev",
            "clientConfig": {
                "url": format!("https://{listen}/validate-mcpcredential"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
            "rules": [{
                "apiGroups": ["mcpcredentials.dev"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": ["mcpcredentials"], "scope": "Namespaced",
            }],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "admissionReviewVersions": ["v1"],
        }]
    });
    let out = cp.tool("kubectl", &["apply", "-f", "-"], Some(&config.to_string()));
    assert!(out.success, "{}", out.stderr);
}

/// A Role `name` allowing `verbs` on `resource` (only the named object, if given), bound to alice.
fn grant(cp: &ControlPlane, ns: &str, name: &str, resource: &str, verbs: &str, object: Option<&str>) {
    let verb = format!("--verb={verbs}");
    let resource = format!("--resource={resource}");
    let mut args = vec!["create", "role", name, "-n", ns, &verb, &resource];
    let object = object.map(|o| format!("--resource-name={o}"));
    if let Some(o) = &object {
        args.push(o);
    }
    let out = cp.kubectl(&args);
    assert!(out.success, "creating role {name}: {}", out.stderr);
    let role = format!("--role={name}");
    let user = format!("--user={ALICE}");
    let out = cp.kubectl(&["create", "rolebinding", name, "-n", ns, &role, &user]);
    assert!(out.success, "binding role {name}: {}", out.stderr);
}

/// An oauth2 credential whose client secret is key `password` of Secret `secret`. The token URL
/// refuses connections: what matters here is who may make the operator read the secret.
fn oauth2(name: &str, secret: &str) -> String {
    format!(
        "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {{name: {name}}}\nspec:\n  \
         upstream: https://mcp.example.com/mcp\n  source:\n    oauth2:\n      grant: clientCredentials\n      \
         tokenUrl: https://127.0.0.1:1/token\n      clientId: agent\n      clientSecret: {{name: {secret}, key: password}}\n"
    )
}

#[test]
fn a_user_cannot_make_the_operator_read_a_secret_they_may_not_get() {
    let a = Admission::start("admission-get");
    create_secret(a.cp, &a.ns, "db", &[("password", "hunter2-db")]);

    let refused = a.apply_as_alice(&oauth2("github", "db"));
    assert!(
        !refused.success,
        "admitted a credential reading a Secret alice may not get"
    );
    assert!(
        refused.stderr.contains(&format!(
            "spec.source.oauth2.clientSecret: you (alice) may not get secret \"db\" in namespace \"{}\"",
            a.ns
        )),
        "the refusal names the field, the Secret and the verb: {}\noperator log:\n{}",
        refused.stderr,
        a.log()
    );
    assert!(
        !refused.stderr.contains("hunter2"),
        "no secret value in the message"
    );
    let stored = a.cp.kubectl(&["get", "mcpcredential", "github", "-n", &a.ns]);
    assert!(!stored.success, "nothing was stored");

    // The same credential once alice may read `db` herself.
    grant(a.cp, &a.ns, "alice-read-db", "secrets", "get", Some("db"));
    let admitted = a.apply_as_alice(&oauth2("github", "db"));
    assert!(
        admitted.success,
        "with get on db the credential is admitted: {}\noperator log:\n{}",
        admitted.stderr,
        a.log()
    );
    // The operator's own status writes are not held up by the webhook.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let api: Api<McpCredential> = Api::namespaced(client(a.cp).await, &a.ns);
        operator_support::wait_for("a status written by the operator", || async {
            let c = api.get_opt("github").await.ok()??;
            condition(&c, "Ready")
        })
        .await;
    });
}

#[test]
fn an_update_that_swaps_in_an_unreadable_secret_is_refused() {
    let a = Admission::start("admission-swap");
    create_secret(a.cp, &a.ns, "mine", &[("password", "alice-own")]);
    create_secret(a.cp, &a.ns, "db", &[("password", "hunter2-db")]);
    grant(a.cp, &a.ns, "alice-read-mine", "secrets", "get", Some("mine"));

    let created = a.apply_as_alice(&oauth2("github", "mine"));
    assert!(created.success, "{}\noperator log:\n{}", created.stderr, a.log());
    // A change of metadata alone asks nothing more.
    let labelled = a.cp.kubectl(&[
        "label",
        "mcpcredential",
        "github",
        "-n",
        &a.ns,
        "--as",
        ALICE,
        "team=a",
    ]);
    assert!(labelled.success, "{}", labelled.stderr);

    let swapped = a.apply_as_alice(&oauth2("github", "db"));
    assert!(
        !swapped.success,
        "an update swapped in a Secret alice may not get"
    );
    assert!(
        swapped.stderr.contains("may not get secret \"db\""),
        "{}\noperator log:\n{}",
        swapped.stderr,
        a.log()
    );
    let kept = a.cp.kubectl(&[
        "get",
        "mcpcredential",
        "github",
        "-n",
        &a.ns,
        "-o",
        "jsonpath={.spec.source.oauth2.clientSecret.name}",
    ]);
    assert_eq!(
        kept.stdout, "mine",
        "the stored spec still reads alice's own Secret"
    );
}

#[test]
fn a_token_exchange_subject_needs_create_on_its_service_account_token() {
    let a = Admission::start("admission-sa");
    assert!(
        a.cp.kubectl(&["create", "serviceaccount", "builder", "-n", &a.ns])
            .success
    );
    let exchange = "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: exchange}\nspec:\n  \
         upstream: https://mcp.example.com/mcp\n  source:\n    tokenExchange:\n      tokenUrl: https://127.0.0.1:1/token\n      \
         subject: {serviceAccount: {name: builder, audience: https://idp.example.com}}\n";

    let refused = a.apply_as_alice(exchange);
    assert!(
        !refused.success,
        "admitted a token exchange of a service account alice may not impersonate"
    );
    assert!(
        refused.stderr.contains(
            "spec.source.tokenExchange.subject.serviceAccount.name: you (alice) may not create \
             serviceaccounts/token for service account \"builder\""
        ),
        "{}\noperator log:\n{}",
        refused.stderr,
        a.log()
    );

    grant(
        a.cp,
        &a.ns,
        "alice-token-builder",
        "serviceaccounts/token",
        "create",
        Some("builder"),
    );
    let admitted = a.apply_as_alice(exchange);
    assert!(
        admitted.success,
        "{}\noperator log:\n{}",
        admitted.stderr,
        a.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_refuses_a_service_account_token_secret_as_an_input() {
    let (cp, ns) = setup("admission-satoken");
    assert!(
        cp.kubectl(&["create", "serviceaccount", "victim", "-n", &ns])
            .success
    );
    // Created by an admin with no webhook registered: only the operator stands in the way.
    let token_secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: victim-token\n  annotations: \
         {kubernetes.io/service-account.name: victim}\ntype: kubernetes.io/service-account-token\n";
    operator_support::apply(cp, &ns, token_secret);
    let credential = "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: stolen}\nspec:\n  \
         upstream: https://mcp.example.com/mcp\n  source: {apiKey: {secretKeyRef: {name: victim-token, key: token}}}\n";
    operator_support::apply(cp, &ns, credential);
    let operator = Operator::start(cp, &ns, "satoken", &[]);

    let kube = client(cp).await;
    let api: Api<McpCredential> = Api::namespaced(kube.clone(), &ns);
    let c = wait_condition(&api, "stolen", "Ready", "False", Some("SecretTypeRefused")).await;
    let (_, _, message) = condition(&c, "Ready").unwrap();
    assert!(
        message.contains("secret \"victim-token\"")
            && message.contains("kubernetes.io/service-account-token"),
        "the condition names the Secret and its type: {message}\noperator log:\n{}",
        operator.log_text()
    );
    let secrets: Api<Secret> = Api::namespaced(kube, &ns);
    assert!(
        secrets.get_opt("stolen-mcp-credential").await.unwrap().is_none(),
        "the token was not copied into an output Secret"
    );
    let log = operator.log_text();
    let token = secrets
        .get("victim-token")
        .await
        .unwrap()
        .data
        .and_then(|d| d.get("token").map(|t| String::from_utf8_lossy(&t.0).into_owned()));
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        assert!(!log.contains(&token), "the token is in the operator's log");
    }
}

#[test]
fn the_chart_registers_the_webhook_on_mcpcredentials_and_lets_the_operator_ask() {
    let cp = mcp_credentials_e2e::control_plane();
    let docs = cp.rendered_chart(&[]);
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let hook = find("ValidatingWebhookConfiguration", "mcpc-mcp-credentials");
    let hook = &hook["webhooks"][0];
    assert_eq!(hook["clientConfig"]["service"]["path"], "/validate-mcpcredential");
    assert_eq!(
        hook["clientConfig"]["service"]["name"],
        "mcpc-mcp-credentials-webhook"
    );
    assert_eq!(hook["failurePolicy"], "Fail", "safe by default");
    assert_eq!(hook["sideEffects"], "None");
    let rule = &hook["rules"][0];
    assert_eq!(rule["apiGroups"], serde_json::json!(["mcpcredentials.dev"]));
    assert_eq!(rule["operations"], serde_json::json!(["CREATE", "UPDATE"]));
    assert_eq!(
        rule["resources"],
        serde_json::json!(["mcpcredentials"]),
        "the main resource only: status writes never reach the webhook"
    );
    assert!(
        hook["namespaceSelector"].is_null(),
        "every namespace the operator acts in"
    );

    let asks = find("ClusterRole", "mcpc-mcp-credentials-admission");
    assert_eq!(
        asks["rules"],
        serde_json::json!([{"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}])
    );
    let ca = find("ClusterRole", "mcpc-mcp-credentials-webhook-ca");
    assert!(
        ca["rules"][0]["resources"]
            .to_string()
            .contains("validatingwebhookconfigurations"),
        "self-managed certificates patch its caBundle too: {ca}"
    );

    let watching = cp.rendered_chart(&["--set", "operator.watchNamespace=team-a"]);
    let hook = watching
        .iter()
        .find(|d| d["kind"] == "ValidatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        hook["webhooks"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "team-a"
    );
    let with_cert_manager = cp.rendered_chart(&["--set", "webhook.certManager.enabled=true"]);
    let hook = with_cert_manager
        .iter()
        .find(|d| d["kind"] == "ValidatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "default/mcpc-mcp-credentials-webhook"
    );
    let off = cp.rendered_chart(&["--set", "webhook.enabled=false"]);
    assert!(!off.iter().any(|d| d["kind"] == "ValidatingWebhookConfiguration"));
}

#[test]
fn self_managed_certificates_keep_the_validating_webhooks_ca_bundle_current() {
    let (cp, ns) = setup("admission-ca");
    let dir = std::env::temp_dir().join(format!("mcp-admission-ca-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let listen = format!("127.0.0.1:{}", operator_support::free_port());
    let name = format!("mcp-credentials-admission-ca-{ns}");
    // Both registered without a caBundle, as the chart's first install does: the leader fills them in.
    let mutating = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.mcpcredentials.dev",
            "clientConfig": {"url": format!("https://{listen}/mutate")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "objectSelector": {"matchLabels": {"mcpcredentials.dev/inject": "true"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }]
    });
    let out = cp.tool("kubectl", &["apply", "-f", "-"], Some(&mutating.to_string()));
    assert!(out.success, "{}", out.stderr);
    let validating = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "validate.mcpcredentials.dev",
            "clientConfig": {"url": format!("https://{listen}/validate-mcpcredential")},
            "rules": [{"apiGroups": ["mcpcredentials.dev"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"], "resources": ["mcpcredentials"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }]
    });
    let out = cp.tool("kubectl", &["apply", "-f", "-"], Some(&validating.to_string()));
    assert!(out.success, "{}", out.stderr);

    let operator = Operator::start_issuing_webhook_certs(cp, &ns, "ca", &dir, &listen, &name, &[]);
    let bundle_of = |kind: &str| {
        cp.kubectl(&[
            "get",
            kind,
            &name,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ])
        .stdout
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let trusted = loop {
        let trusted = cp
            .kubectl(&[
                "get",
                "secret",
                "webhook-tls",
                "-n",
                &ns,
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ])
            .stdout;
        if !trusted.is_empty() && bundle_of("validatingwebhookconfiguration") == trusted {
            break trusted;
        }
        assert!(
            Instant::now() < deadline,
            "the validating caBundle was not set:\n{}",
            operator.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(bundle_of("mutatingwebhookconfiguration"), trusted);
    for kind in ["mutatingwebhookconfiguration", "validatingwebhookconfiguration"] {
        let _ = cp.kubectl(&["delete", kind, &name]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

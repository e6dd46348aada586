//! The injection webhook as the real API server uses it: a MutatingWebhookConfiguration points at
//! the operator process over HTTPS, and pods created through `kubectl` come back with the sidecar,
//! untouched, or denied with a message that says why.

mod operator_support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, api_key, secret_key, yaml_stream},
};
use operator_support::{Operator, WebhookOperator, free_port, setup};

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn pod(name: &str, service_account: &str, labelled: bool, credentials: Option<&str>) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": if labelled { serde_json::json!({"mcpcredentials.dev/inject": "true"}) } else { serde_json::json!({}) },
            "annotations": credentials.map(|c| serde_json::json!({"mcpcredentials.dev/credentials": c})).unwrap_or(serde_json::json!({})),
        },
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{"name": "agent", "image": "example.com/agent:1"}]
        }
    })
    .to_string()
}

/// Registers a webhook at `https://<listen>/mutate` for labelled pods of namespace `ns` only, so
/// other tests sharing the API server never reach it.
fn register_webhook(cp: &ControlPlane, name: &str, listen: &str, ns: &str, ca_bundle: Option<&str>) {
    let mut client_config = serde_json::json!({"url": format!("https://{listen}/mutate")});
    if let Some(ca) = ca_bundle {
        client_config["caBundle"] = ca.into();
    }
    let config = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.mcpcredentials.dev",
            "clientConfig": client_config,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "objectSelector": {"matchLabels": {"mcpcredentials.dev/inject": "true"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "admissionReviewVersions": ["v1"],
        }]
    });
    let out = cp.tool("kubectl", &["apply", "-f", "-"], Some(&config.to_string()));
    assert!(out.success, "{}", out.stderr);
}

fn create(cp: &ControlPlane, ns: &str, doc: &str) -> mcp_credentials_e2e::Outcome {
    cp.tool("kubectl", &["create", "-n", ns, "-f", "-"], Some(doc))
}

/// The GitHub MCP server's credential, an API key from Secret `gh`.
fn github() -> Credential {
    Credential::new(
        "github",
        "https://api.githubcopilot.com/mcp/",
        api_key(secret_key("gh", "token")),
    )
}

#[test]
fn the_api_server_injects_the_sidecar_through_the_operators_webhook() {
    let (cp, ns) = setup("webhook");
    let dir = std::env::temp_dir().join(format!("mcp-webhook-{ns}"));
    let WebhookOperator {
        operator,
        listen,
        ca_pem: ca,
    } = WebhookOperator::start(
        cp,
        &ns,
        "webhook",
        &dir,
        &["--sidecar-image", "example.com/mcp-credentials-sidecar:test"],
    );

    for sa in ["coding-agent", "research"] {
        assert!(cp.kubectl(&["create", "serviceaccount", sa, "-n", &ns]).success);
    }
    let credentials = yaml_stream([
        github().service_accounts(&["coding-agent"]),
        Credential::new(
            "slack",
            "https://mcp.slack.com/mcp",
            api_key(secret_key("sl", "token")),
        )
        .secret_name("slack-token")
        .service_accounts(&["coding-agent"]),
    ]);
    let out = cp.apply(&ns, &credentials);
    assert!(out.success, "{}", out.stderr);

    // Only this test's namespace and only labelled pods reach the webhook.
    let webhook_name = format!("mcp-credentials-test-{ns}");
    register_webhook(cp, &webhook_name, &listen, &ns, Some(&b64(&ca)));

    // The operator (and its webhook) may still be starting: retry until the webhook answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let created = loop {
        let out = create(
            cp,
            &ns,
            &pod("agent", "coding-agent", true, Some("github, slack")),
        );
        if out.success || !out.stderr.contains("failed calling webhook") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        created.success,
        "the labelled pod was not admitted: {}\noperator log:\n{}",
        created.stderr,
        operator.log_text()
    );

    let injected: serde_json::Value = serde_json::from_str(
        &cp.kubectl(&["get", "pod", "agent", "-n", &ns, "-o", "json"])
            .stdout,
    )
    .unwrap();
    let sidecar = &injected["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "mcp-credentials-sidecar", "{injected:#}");
    assert_eq!(
        sidecar["restartPolicy"], "Always",
        "a native sidecar on Kubernetes 1.37"
    );
    assert_eq!(sidecar["image"], "example.com/mcp-credentials-sidecar:test");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    let sidecar_env = sidecar["env"].as_array().unwrap();
    assert!(
        sidecar_env
            .iter()
            .any(|e| e["name"] == "MCP_SIDECAR_CREDENTIALS" && e["value"] == "github,slack=slack-token")
    );
    // The sidecar reports rejected credentials to the operator's Service, trusting the webhook's CA
    // (`ca.crt` next to the certificate).
    let report_url = format!("https://mcp-credentials-webhook.{ns}.svc/v1/report");
    assert!(
        sidecar_env
            .iter()
            .any(|e| e["name"] == "MCP_SIDECAR_REPORT_URL" && e["value"] == report_url.as_str()),
        "{sidecar_env:?}"
    );
    assert!(
        sidecar_env
            .iter()
            .any(|e| e["name"] == "MCP_SIDECAR_REPORT_CA" && e["value"] == ca.as_str()),
        "{sidecar_env:?}"
    );
    let agent_env = injected["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        agent_env
            .iter()
            .any(|e| e["name"] == "MCP_GITHUB_URL" && e["value"] == "http://127.0.0.1:7007/github")
    );
    assert!(
        agent_env
            .iter()
            .any(|e| e["name"] == "MCP_SLACK_URL" && e["value"] == "http://127.0.0.1:7007/slack")
    );
    assert_eq!(
        injected["metadata"]["annotations"]["mcpcredentials.dev/injected"],
        "github,slack"
    );
    // The API server mounts the service-account token into every container, and that token may
    // read the credential Secrets: the agent must not have it. The sidecar has a token of its own.
    let token_path = "/var/run/secrets/kubernetes.io/serviceaccount";
    let agent_mounts = injected["spec"]["containers"][0]["volumeMounts"].to_string();
    assert!(
        !agent_mounts.contains(token_path),
        "the agent still holds a token: {agent_mounts}"
    );
    assert!(sidecar["volumeMounts"].to_string().contains(token_path));
    assert!(
        !injected["spec"]["volumes"]
            .to_string()
            .contains("kube-api-access"),
        "{injected:#}"
    );
    assert_eq!(
        injected["spec"]["automountServiceAccountToken"], false,
        "or the API server mounts it again"
    );
    assert_eq!(
        injected["spec"]["containers"].as_array().unwrap().len(),
        1,
        "nothing else added"
    );

    // An unlabelled pod never reaches the webhook and is stored as written.
    let out = create(cp, &ns, &pod("plain", "research", false, Some("github")));
    assert!(out.success, "{}", out.stderr);
    let plain = cp.kubectl(&[
        "get",
        "pod",
        "plain",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.initContainers}",
    ]);
    assert_eq!(plain.stdout, "", "an unlabelled pod is untouched");

    // A service account the credential does not allow is denied, naming both.
    let out = create(cp, &ns, &pod("intruder", "research", true, Some("github")));
    assert!(!out.success, "a disallowed service account was admitted");
    assert!(
        out.stderr
            .contains("service account \"research\" may not use McpCredential \"github\"")
            && out.stderr.contains("coding-agent"),
        "{}",
        out.stderr
    );
    // A credential that does not exist, and a labelled pod that names none.
    let out = create(cp, &ns, &pod("typo", "coding-agent", true, Some("githib")));
    assert!(
        !out.success && out.stderr.contains("McpCredential \"githib\""),
        "{}",
        out.stderr
    );
    let out = create(cp, &ns, &pod("unnamed", "coding-agent", true, None));
    assert!(
        !out.success && out.stderr.contains("names no credential"),
        "{}",
        out.stderr
    );

    assert!(
        cp.kubectl(&["delete", "mutatingwebhookconfiguration", &webhook_name])
            .success
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the kubelet does for a mounted Secret: copy its keys to files when it changes.
fn mount_secret_until(
    cp: &ControlPlane,
    ns: &str,
    secret: &str,
    dir: &Path,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut last = String::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let out = cp.kubectl(&["get", "secret", secret, "-n", ns, "-o", "json"]);
        if out.success && out.stdout != last {
            let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            use base64::Engine;
            let decode = |k: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(s["data"][k].as_str().unwrap_or(""))
                    .unwrap_or_default()
            };
            // The key first: the webhook reloads when the certificate file changes.
            std::fs::write(dir.join("tls.key"), decode("tls.key")).unwrap();
            std::fs::write(dir.join("tls.crt"), decode("tls.crt")).unwrap();
            last = out.stdout;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn self_managed_webhook_certificates_are_issued_trusted_and_rotated() {
    let (cp, ns) = setup("webhook-certs");
    let dir = std::env::temp_dir().join(format!("mcp-webhook-certs-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let webhook_name = format!("mcp-credentials-certs-{ns}");
    // Registered without a caBundle: the operator fills it in.
    register_webhook(cp, &webhook_name, &listen, &ns, None);
    let credential = github().service_accounts(&["default"]).yaml();
    assert!(cp.apply(&ns, &credential).success);

    let operator = Operator::start_issuing_webhook_certs(
        cp,
        &ns,
        "certs",
        &dir,
        &listen,
        &webhook_name,
        &[
            "--webhook-service",
            "mcp-credentials-webhook",
            // 90 s certificates: renewed after about 60 s, within this test.
            "--webhook-cert-validity",
            "90",
        ],
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| mount_secret_until(cp, &ns, "webhook-tls", &dir, &stop));
        let admit = |name: &str| {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let out = create(cp, &ns, &pod(name, "default", true, Some("github")));
                if out.success || Instant::now() > deadline {
                    break out;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        };
        let first = admit("before-rotation");
        assert!(
            first.success,
            "{}\noperator log:\n{}",
            first.stderr,
            operator.log_text()
        );

        let secret = |key: &str| {
            cp.kubectl(&[
                "get",
                "secret",
                "webhook-tls",
                "-n",
                &ns,
                "-o",
                &format!("jsonpath={{.data.{key}}}"),
            ])
            .stdout
        };
        let bundle = cp
            .kubectl(&[
                "get",
                "mutatingwebhookconfiguration",
                &webhook_name,
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ])
            .stdout;
        assert_eq!(
            bundle,
            secret("ca\\.crt"),
            "the caBundle is the Secret's trust bundle"
        );
        let first_cert = secret("tls\\.crt");

        // Rotation: a new serving certificate from the same CA, served without a failed admission.
        let deadline = Instant::now() + Duration::from_secs(180);
        while secret("tls\\.crt") == first_cert {
            assert!(
                Instant::now() < deadline,
                "the certificate was not renewed:\n{}",
                operator.log_text()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        std::thread::sleep(Duration::from_secs(2)); // the files follow, as the kubelet's would
        let out = create(cp, &ns, &pod("after-rotation", "default", true, Some("github")));
        assert!(
            out.success,
            "admission failed after rotation: {}\n{}",
            out.stderr,
            operator.log_text()
        );
        let injected = cp.kubectl(&[
            "get",
            "pod",
            "after-rotation",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.initContainers[0].name}",
        ]);
        assert_eq!(injected.stdout, "mcp-credentials-sidecar");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(
        cp.kubectl(&["delete", "mutatingwebhookconfiguration", &webhook_name])
            .success
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pod-level exposure, through the real API server: a host-network pod is denied (its loopback is
/// the node's, open to every process there), and an injected pod listens on its pod IP only for
/// the kubelet's probes, with the credential-bearing proxy and the metrics on loopback.
#[test]
fn host_network_pods_are_denied_and_only_the_probes_face_the_pod_network() {
    let (cp, ns) = setup("webhook-exposure");
    let dir = std::env::temp_dir().join(format!("mcp-webhook-{ns}"));
    let WebhookOperator {
        operator,
        listen,
        ca_pem: ca,
    } = WebhookOperator::start(
        cp,
        &ns,
        "webhook-exposure",
        &dir,
        &["--sidecar-image", "example.com/mcp-credentials-sidecar:test"],
    );
    assert!(
        cp.kubectl(&["create", "serviceaccount", "coding-agent", "-n", &ns])
            .success
    );
    let credential = github().service_accounts(&["coding-agent"]).yaml();
    assert!(cp.apply(&ns, &credential).success);
    let webhook_name = format!("mcp-credentials-test-{ns}");
    register_webhook(cp, &webhook_name, &listen, &ns, Some(&b64(&ca)));

    let mut host: serde_json::Value =
        serde_json::from_str(&pod("host", "coding-agent", true, Some("github"))).unwrap();
    host["spec"]["hostNetwork"] = true.into();
    let deadline = Instant::now() + Duration::from_secs(120);
    let denied = loop {
        let out = create(cp, &ns, &host.to_string());
        if !out.stderr.contains("failed calling webhook") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        !denied.success,
        "a hostNetwork pod was admitted with the sidecar; operator log:\n{}",
        operator.log_text()
    );
    assert!(
        denied.stderr.contains("hostNetwork") && denied.stderr.contains("node's loopback"),
        "{}",
        denied.stderr
    );

    let out = create(cp, &ns, &pod("agent", "coding-agent", true, Some("github")));
    assert!(out.success, "{}", out.stderr);
    let injected: serde_json::Value = serde_json::from_str(
        &cp.kubectl(&["get", "pod", "agent", "-n", &ns, "-o", "json"])
            .stdout,
    )
    .unwrap();
    let sidecar = &injected["spec"]["initContainers"][0];
    let env = |name: &str| {
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(env("MCP_SIDECAR_LISTEN").as_deref(), Some("127.0.0.1:7007"));
    assert_eq!(env("MCP_SIDECAR_ADMIN_LISTEN").as_deref(), Some("127.0.0.1:7008"));
    assert_eq!(env("MCP_SIDECAR_PROBE_LISTEN").as_deref(), Some("0.0.0.0:7009"));
    assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], "mcp-probe");
    assert_eq!(sidecar["ports"][0]["containerPort"], 7009);
    assert_eq!(sidecar["ports"].as_array().map(Vec::len), Some(1), "{sidecar:#}");

    assert!(
        cp.kubectl(&["delete", "mutatingwebhookconfiguration", &webhook_name])
            .success
    );
    let _ = std::fs::remove_dir_all(&dir);
}

//! The Helm chart with real `helm` against the real API server: it lints, its output passes the API
//! server's own validation, it installs, and its values schema rejects what it should.

use mcp_credentials_e2e::{ControlPlane, control_plane, repo_root};

fn chart() -> String {
    repo_root().join("charts/mcp-credentials").display().to_string()
}

fn helm(cp: &ControlPlane, args: &[&str]) -> mcp_credentials_e2e::Outcome {
    cp.tool("helm", args, None)
}

#[test]
fn the_chart_lints_clean() {
    let cp = control_plane();
    let out = helm(cp, &["lint", "--strict", &chart()]);
    assert!(out.success, "helm lint failed:\n{}{}", out.stdout, out.stderr);
}

#[test]
fn every_rendered_object_passes_server_side_validation() {
    let cp = control_plane();
    let ns = cp.namespace("chart-dry-run");
    let watch = format!("operator.watchNamespace={ns}");
    for extra in [
        &[][..],
        &["--set", watch.as_str(), "--set", "networkPolicy.enabled=true"][..],
        &["--set", "operator.replicas=1"][..],
    ] {
        let chart_path = chart();
        let mut args = vec![
            "template",
            "mcpc",
            chart_path.as_str(),
            "--namespace",
            ns.as_str(),
        ];
        args.extend_from_slice(extra);
        let rendered = helm(cp, &args);
        assert!(
            rendered.success,
            "helm template {extra:?} failed: {}",
            rendered.stderr
        );
        assert!(
            rendered.stdout.contains("kind: CustomResourceDefinition"),
            "CRDs are templated by default"
        );
        let out = cp.tool(
            "kubectl",
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            Some(&rendered.stdout),
        );
        assert!(
            out.success,
            "the API server rejected the chart rendered with {extra:?}:\n{}",
            out.stderr
        );
    }
}

#[test]
fn a_pod_disruption_budget_only_with_more_than_one_replica() {
    let cp = control_plane();
    let two = helm(cp, &["template", "mcpc", &chart()]);
    assert!(two.stdout.contains("kind: PodDisruptionBudget"));
    let one = helm(
        cp,
        &["template", "mcpc", &chart(), "--set", "operator.replicas=1"],
    );
    assert!(one.success, "{}", one.stderr);
    assert!(
        !one.stdout.contains("kind: PodDisruptionBudget"),
        "a PDB on one replica would block drains"
    );
}

#[test]
fn the_operator_runs_with_restricted_pod_security() {
    let cp = control_plane();
    let ns = cp.namespace("chart-restricted");
    let out = cp.kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    assert!(out.success, "{}", out.stderr);
    let rendered = helm(
        cp,
        &[
            "template",
            "mcpc",
            &chart(),
            "--namespace",
            &ns,
            "--set",
            "crds.enabled=false",
        ],
    );
    assert!(rendered.success, "{}", rendered.stderr);
    // The Deployment's pod template, as a bare Pod, must be admitted by the restricted profile.
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered.stdout)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .collect();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the chart renders the operator Deployment");
    let pod = serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "restricted-check"},
        "spec": serde_json::to_value(&deployment["spec"]["template"]["spec"]).unwrap(),
    }))
    .unwrap();
    let out = cp.tool(
        "kubectl",
        &["create", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(&pod.replace(
            "serviceAccountName: mcpc-mcp-credentials",
            "serviceAccountName: default",
        )),
    );
    assert!(
        out.success,
        "the restricted profile refused the operator pod:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("would violate"), "{}", out.stderr);
}

#[test]
fn unknown_values_are_rejected_with_the_key_named() {
    let cp = control_plane();
    let out = helm(cp, &["template", "mcpc", &chart(), "--set", "operator.replica=3"]);
    assert!(!out.success, "a misspelt key must fail");
    assert!(
        out.stderr.contains("replica"),
        "the error names the key: {}",
        out.stderr
    );
    let out = helm(
        cp,
        &["template", "mcpc", &chart(), "--set", "operator.replicas=two"],
    );
    assert!(!out.success, "a string for an integer must fail");
}

#[test]
fn the_crd_is_kept_on_uninstall_unless_asked_otherwise() {
    let cp = control_plane();
    let kept = helm(cp, &["template", "mcpc", &chart()]);
    assert!(kept.stdout.contains("helm.sh/resource-policy: keep"));
    let dropped = helm(cp, &["template", "mcpc", &chart(), "--set", "crds.keep=false"]);
    assert!(dropped.success && !dropped.stdout.contains("helm.sh/resource-policy"));
    let none = helm(cp, &["template", "mcpc", &chart(), "--set", "crds.enabled=false"]);
    assert!(none.success && !none.stdout.contains("kind: CustomResourceDefinition"));
}

#[test]
fn helm_install_creates_a_least_privilege_operator() {
    let cp = control_plane();
    // `kubectl auth can-i` resolves resources through discovery, so the CRD must be served.
    cp.install_crds();
    let ns = cp.namespace("chart-install");
    let release = format!("mcpc-{}", std::process::id());
    // The CRD is shared by every test on this API server, so this release does not own it.
    // failurePolicy Ignore: this release's webhook has no running operator behind it, and other
    // tests create labelled pods on the same API server.
    let settings = [
        "--set",
        "crds.enabled=false",
        "--set",
        "webhook.failurePolicy=Ignore",
    ];
    let chart_path = chart();
    // `helm install` or `helm upgrade` of this release with these settings.
    let release_args = |verb: &'static str| -> Vec<&str> {
        [
            verb,
            release.as_str(),
            chart_path.as_str(),
            "--namespace",
            ns.as_str(),
        ]
        .into_iter()
        .chain(settings)
        .collect()
    };
    let out = helm(cp, &release_args("install"));
    assert!(out.success, "helm install failed:\n{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("kubectl get mcpcred"),
        "NOTES.txt gives the next step: {}",
        out.stdout
    );

    let deploy = cp.kubectl(&[
        "get",
        "deployment",
        "-n",
        &ns,
        "-o",
        "jsonpath={.items[*].spec.replicas}",
    ]);
    assert_eq!(deploy.stdout, "2", "two operator replicas by default");
    let sa = format!("system:serviceaccount:{ns}:{release}-mcp-credentials");
    for (verb, resource, expected) in [
        ("patch", "mcpcredentials.mcpcredentials.dev/status", "yes"),
        ("create", "secrets", "yes"),
        ("create", "events.events.k8s.io", "yes"),
        // Sidecar reports are authenticated with TokenReviews.
        ("create", "tokenreviews.authentication.k8s.io", "yes"),
        ("get", "serviceaccounts", "yes"),
        ("create", "serviceaccounts", "no"),
        ("delete", "secrets", "no"),
        // Secrets are written by server-side apply and merge patches only.
        ("update", "secrets", "no"),
        // The access policy's Roles and RoleBindings are applied, never read back or deleted.
        ("list", "rolebindings.rbac.authorization.k8s.io", "no"),
        ("delete", "roles.rbac.authorization.k8s.io", "no"),
        ("create", "pods", "no"),
        ("create", "mcpcredentials.mcpcredentials.dev", "no"),
    ] {
        let out = cp.kubectl(&["auth", "can-i", verb, resource, "-n", &ns, "--as", &sa]);
        assert_eq!(
            out.stdout.trim(),
            expected,
            "can the operator {verb} {resource}? {}",
            out.stderr
        );
    }
    // TokenRequest, for tokenExchange subjects (`can-i` reads `a/b` as a name, hence --subresource).
    let out = cp.kubectl(&[
        "auth",
        "can-i",
        "create",
        "serviceaccounts",
        "--subresource=token",
        "-n",
        &ns,
        "--as",
        &sa,
    ]);
    assert_eq!(
        out.stdout.trim(),
        "yes",
        "can the operator request service-account tokens? {}",
        out.stderr
    );
    // Validators of minted JWTs reach the JWKS through a Service on port 80.
    let jwks = cp.kubectl(&[
        "get",
        "service",
        &format!("{release}-mcp-credentials-jwks"),
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.ports[0].port}/{.spec.ports[0].targetPort}",
    ]);
    assert_eq!(jwks.stdout, "80/jwks", "the JWKS Service: {}", jwks.stderr);
    let hook_name = format!("{release}-mcp-credentials");
    let hook = cp.kubectl(&["get", "mutatingwebhookconfiguration", &hook_name, "-o", "json"]);
    assert!(hook.success, "the webhook is registered: {}", hook.stderr);
    let hook: serde_json::Value = serde_json::from_str(&hook.stdout).unwrap();
    assert_eq!(hook["webhooks"][0]["timeoutSeconds"], 5);
    assert_eq!(
        hook["webhooks"][0]["objectSelector"]["matchLabels"]["mcpcredentials.dev/inject"],
        "true"
    );
    let excluded = hook["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"].to_string();
    assert!(
        excluded.contains("kube-system") && excluded.contains(&ns),
        "system and own namespaces excluded: {excluded}"
    );
    // The operator patches the caBundle; an upgrade must carry it over, not blank it.
    let bundle = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .encode("-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n")
    };
    let patch = format!(r#"[{{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"{bundle}"}}]"#);
    let out = cp.kubectl(&[
        "patch",
        "mutatingwebhookconfiguration",
        &hook_name,
        "--type=json",
        "-p",
        &patch,
    ]);
    assert!(out.success, "{}", out.stderr);
    let out = helm(cp, &release_args("upgrade"));
    assert!(out.success, "helm upgrade failed: {}", out.stderr);
    let after = cp.kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        &hook_name,
        "-o",
        "jsonpath={.webhooks[0].clientConfig.caBundle}",
    ]);
    assert_eq!(
        after.stdout, bundle,
        "helm upgrade blanked the caBundle the operator set"
    );
    // The operator may patch exactly this webhook's caBundle, and no other.
    let sa = format!("system:serviceaccount:{ns}:{release}-mcp-credentials");
    let can = |name: &str| {
        cp.kubectl(&[
            "auth",
            "can-i",
            "patch",
            &format!("mutatingwebhookconfiguration/{name}"),
            "--as",
            &sa,
        ])
        .stdout
        .trim()
        .to_owned()
    };
    assert_eq!(can(&hook_name), "yes");
    assert_eq!(can("someone-elses"), "no");

    let out = helm(cp, &["uninstall", &release, "--namespace", &ns]);
    assert!(out.success, "{}", out.stderr);
    let gone = cp.kubectl(&["get", "mutatingwebhookconfiguration", &hook_name]);
    assert!(!gone.success, "uninstall removes the webhook");
}

#[test]
fn with_cert_manager_the_chart_asks_for_a_certificate_and_ca_injection() {
    let cp = control_plane();
    let docs = cp.rendered_chart(&["--set", "webhook.certManager.enabled=true"]);
    assert!(docs.iter().any(|d| d["kind"] == "Certificate"));
    assert!(
        docs.iter().any(|d| d["kind"] == "Issuer"),
        "a self-signed Issuer when none is named"
    );
    assert!(
        !docs.iter().any(|d| d["kind"] == "Secret"),
        "cert-manager writes the Secret"
    );
    let hook = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "default/mcpc-mcp-credentials-webhook"
    );
}

/// Runs `promtool check rules` on `groups` (a rule file's `groups:` list).
fn promtool_check(groups: &serde_json::Value) -> mcp_credentials_e2e::Outcome {
    let file = std::env::temp_dir().join(format!("mcp-rules-{}-{}.yaml", std::process::id(), rand_suffix()));
    std::fs::write(
        &file,
        serde_yaml::to_string(&serde_json::json!({ "groups": groups })).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool is installed by tests/run (Debian package prometheus)");
    let _ = std::fs::remove_file(&file);
    mcp_credentials_e2e::Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn the_alerts_are_valid_prometheus_rules_on_the_operators_metrics() {
    let cp = control_plane();
    let docs = cp.rendered_chart(&["--set", "metrics.prometheusRule.enabled=true"]);
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let out = promtool_check(&rule["spec"]["groups"]);
    assert!(
        out.success,
        "promtool rejected the alerts:\n{}{}",
        out.stdout, out.stderr
    );
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        [
            "McpCredentialExpiringWithoutRenewal",
            "McpCredentialNotReady",
            "McpCredentialRefreshFailing",
            "McpCredentialReauthRequired"
        ]
    );
    let text = serde_json::to_string(rule).unwrap();
    assert!(text.contains("< 300"), "the expiry threshold comes from values");
    assert!(!text.contains("EXPIRING_WITHIN_SECONDS"));
}

#[test]
fn the_dashboard_is_json_whose_queries_prometheus_accepts() {
    let cp = control_plane();
    let docs = cp.rendered_chart(&["--set", "metrics.dashboard.enabled=true"]);
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: serde_json::Value =
        serde_json::from_str(cm["data"]["mcp-credentials.json"].as_str().unwrap())
            .expect("the dashboard is JSON");
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap())
        })
        .collect();
    assert!(exprs.len() >= 7);
    // promtool parses each query as a recording rule.
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": e}))
        .collect();
    let out = promtool_check(&serde_json::json!([{"name": "dashboard", "rules": rules}]));
    assert!(
        out.success,
        "promtool rejected a dashboard query:\n{}{}",
        out.stdout, out.stderr
    );
}

#[test]
fn every_metric_the_alerts_and_dashboard_use_is_one_the_operator_exports() {
    let m = mcp_credentials_operator::metrics::Metrics::register().expect("metrics register");
    // Vector metrics are exported once they have a child.
    m.refreshes.with_label_values(&["success"]).inc();
    m.refresh_duration.observe(0.1);
    m.expiration.with_label_values(&["ns", "cred"]).set(1.0);
    m.renewal.with_label_values(&["ns", "cred"]).set(1.0);
    m.ready.with_label_values(&["ns", "cred"]).set(1);
    m.token_requests
        .with_label_values(&["https://idp.example.com"])
        .inc();
    m.leader.with_label_values(&["me"]).set(1);
    let exported = m.render();

    let root = repo_root().join("charts/mcp-credentials/files");
    let text = std::fs::read_to_string(root.join("alerts.yaml")).unwrap()
        + &std::fs::read_to_string(root.join("dashboard.json")).unwrap();
    let mut used: Vec<&str> = text
        .match_indices("mcp_credentials_")
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    used.sort();
    used.dedup();
    assert!(used.len() >= 5, "{used:?}");
    for name in used {
        let base = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(
            exported.contains(&format!("# TYPE {base} ")),
            "{name} is not exported by the operator"
        );
    }
}

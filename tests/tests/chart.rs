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
    let ns = cp.namespace("chart-install");
    let release = format!("mcpc-{}", std::process::id());
    // The CRD is shared by every test on this API server, so this release does not own it.
    let out = helm(
        cp,
        &[
            "install",
            &release,
            &chart(),
            "--namespace",
            &ns,
            "--set",
            "crds.enabled=false",
        ],
    );
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
        ("delete", "secrets", "no"),
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
    let out = helm(cp, &["uninstall", &release, "--namespace", &ns]);
    assert!(out.success, "{}", out.stderr);
}

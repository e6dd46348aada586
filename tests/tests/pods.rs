//! Real pods, as an operator user runs them: `helm install` of the chart with the images built
//! from the Dockerfile (tests/images/build), on the node of `tests/control-plane up --node`
//! (containerd, runc, kubelet, kube-proxy, CoreDNS). The operator's two replicas become Ready with
//! leader election and their own webhook certificates; an agent pod labelled for injection starts
//! with the sidecar as a native sidecar, has no service-account token and calls a real MCP server
//! (the Rust SDK's, on the host, HTTPS) through `$MCP_SUM_URL` with no credential of its own, once
//! a second, through every event that follows: the credential rotates; the upstream revokes the
//! token in use, the sidecar reports it and replays with the refreshed one; the leader pod is
//! deleted. Not one call fails. `helm uninstall` then leaves only what the chart documents it keeps.
//!
//! Ignored in a plain `cargo test`: it needs the node and the images, which tests/run provides
//! (`cargo test -p mcp-credentials-e2e --test pods -- --ignored`, see tests/run).

mod e2e_support;
mod operator_support;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use e2e_support::{CLIENT_SECRET, McpServer, OAuth, credential_yaml, run_dir};
use mcp_credentials_e2e::{ControlPlane, control_plane, repo_root};
use operator_support::wait_for;

/// The node's bridge address (tests/control-plane NODE_IP): the host as pods reach it.
const NODE_IP: &str = "10.244.0.1";
const RELEASE: &str = "mcpc";
const RELEASE_NS: &str = "mcp-system";
const AGENTS: &str = "agents";
/// Access tokens live 20 s; renewed at half their lifetime, so about every 10 s.
const TOKEN_TTL: u64 = 20;

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl(args);
    assert!(out.success, "kubectl {} failed: {}", args.join(" "), out.stderr);
    out.stdout
}

fn try_kubectl(cp: &ControlPlane, args: &[&str]) -> Option<String> {
    let out = cp.kubectl(args);
    out.success.then_some(out.stdout)
}

/// A certificate for `NODE_IP` signed by the e2e CA that tests/images/build made (and appended to
/// the images' CA roots, as a user appends their organisation's): (certificate, key).
fn server_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let images = repo_root().join("target/images");
    let (ca, ca_key) = (images.join("e2e-ca.crt"), images.join("e2e-ca.key"));
    assert!(
        ca.exists(),
        "{} is missing: run tests/images/build first",
        ca.display()
    );
    let (cert, key, csr, ext) = (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("server.csr"),
        dir.join("server.ext"),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:{NODE_IP}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=e2e-servers",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (cert, key)
}

/// The agent container's log lines.
fn agent_log(cp: &ControlPlane) -> Vec<String> {
    try_kubectl(cp, &["logs", "-n", AGENTS, "agent", "-c", "agent"])
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn ok_calls(log: &[String]) -> usize {
    log.iter().filter(|l| l.contains(" ok")).count()
}

fn failed_calls(log: &[String]) -> Vec<String> {
    log.iter().filter(|l| l.contains("failed")).cloned().collect()
}

/// Waits until the agent made `more` successful calls beyond what it had made, and checks that
/// none failed (`during` names the event).
async fn agent_keeps_working(cp: &ControlPlane, more: usize, during: &str) {
    let before = ok_calls(&agent_log(cp));
    wait_for(
        &format!("{more} more successful agent calls ({during})"),
        || async {
            let log = agent_log(cp);
            let failed = failed_calls(&log);
            assert!(
                failed.is_empty(),
                "agent calls failed {during}: {failed:?}\nlog: {log:#?}"
            );
            (ok_calls(&log) >= before + more).then_some(())
        },
    )
    .await;
}

/// The version of the credential the operator last published (changes with every new token).
fn current_token(cp: &ControlPlane) -> Option<String> {
    try_kubectl(
        cp,
        &[
            "get",
            "mcpcred",
            "-n",
            AGENTS,
            "sum",
            "-o",
            "jsonpath={.status.credentialVersion}",
        ],
    )
    .filter(|t| !t.is_empty())
}

fn leader(cp: &ControlPlane) -> Option<String> {
    try_kubectl(
        cp,
        &[
            "get",
            "lease",
            "-n",
            RELEASE_NS,
            &format!("{RELEASE}-mcp-credentials-operator"),
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
    .filter(|h| !h.is_empty())
}

fn ready_operator_pods(cp: &ControlPlane) -> Vec<String> {
    let out = try_kubectl(
        cp,
        &[
            "get", "pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/component=operator", "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
        ],
    )
    .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name, Ready (no deletionTimestamp: two fields).
            (f.len() == 2 && f[1] == "True").then(|| f[0].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the node and the images: tests/run runs it after tests/control-plane up --node and tests/images/build"]
async fn the_chart_runs_real_pods_and_no_agent_call_fails() {
    let cp = control_plane();
    assert!(
        try_kubectl(cp, &["get", "node", "mcp-node"]).is_some(),
        "no node: start the control plane with tests/control-plane up --node"
    );
    // A failed earlier run on the same control plane (a developer's rerun) left its objects.
    let _ = cp.tool(
        "helm",
        &["uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait"],
        None,
    );
    let _ = cp.kubectl(&[
        "delete",
        "namespace",
        AGENTS,
        RELEASE_NS,
        "--ignore-not-found",
        "--wait=true",
    ]);
    let dir = run_dir("pods");
    let (cert, key) = server_certificate(&dir);
    let ca = repo_root().join("target/images/e2e-ca.crt");
    let oauth = OAuth::start_on(&dir, TOKEN_TTL, NODE_IP, Some((cert.clone(), key.clone())));
    let mcp = McpServer::start_on(&oauth, &dir, NODE_IP, Some((cert, key, ca))).await;

    // ---- helm install, as the README says, with the images built here.
    let chart = repo_root().join("charts/mcp-credentials");
    let out = cp.tool(
        "helm",
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            RELEASE_NS,
            "--create-namespace",
            "--set",
            "operator.image.repository=mcp-credentials/operator",
            "--set",
            "operator.image.tag=dev",
            "--set",
            "sidecar.image.repository=mcp-credentials/sidecar",
            "--set",
            "sidecar.image.tag=dev",
            "--wait",
            "--timeout",
            "5m",
        ],
        None,
    );
    if !out.success {
        let pods = cp.kubectl(&["get", "pods", "-n", RELEASE_NS, "-o", "wide"]);
        let events = cp.kubectl(&["get", "events", "-n", RELEASE_NS]);
        panic!(
            "helm install failed: {}\n{}\n{}",
            out.stderr, pods.stdout, events.stdout
        );
    }
    let operators = wait_for("two Ready operator pods", || async {
        let ready = ready_operator_pods(cp);
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let first_leader = wait_for("a leader among the operator pods", || async {
        leader(cp).filter(|l| operators.contains(l))
    })
    .await;
    wait_for("the webhook's caBundle", || async {
        try_kubectl(
            cp,
            &[
                "get",
                "mutatingwebhookconfiguration",
                &format!("{RELEASE}-mcp-credentials"),
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ],
        )
        .filter(|b| !b.is_empty())
    })
    .await;

    // ---- The credential and the agent.
    kubectl(cp, &["create", "namespace", AGENTS]);
    kubectl(cp, &["create", "serviceaccount", "-n", AGENTS, "agent"]);
    kubectl(
        cp,
        &[
            "create",
            "secret",
            "generic",
            "-n",
            AGENTS,
            "idp",
            &format!("--from-literal=secret={CLIENT_SECRET}"),
        ],
    );
    // The scenario's client-credentials credential, usable by the agent's service account.
    let credential = format!(
        "{}  access:\n    serviceAccounts: [agent]\n",
        credential_yaml("sum", &mcp.url, &oauth.token_url(), 50)
    );
    // The webhook's Service may lag the pods' readiness by a moment (seen once in CI: "failed
    // calling webhook ... connection refused"): that error alone is waited out; any other fails.
    wait_for(
        "the McpCredential applied through the admission webhook",
        || async {
            let out = cp.apply(AGENTS, &credential);
            assert!(
                out.success || out.stderr.contains("failed calling webhook"),
                "applying the McpCredential failed: {}",
                out.stderr
            );
            out.success.then_some(())
        },
    )
    .await;
    wait_for("the credential's Secret", || async { current_token(cp) }).await;

    let agent = r#"apiVersion: v1
kind: Pod
metadata:
  name: agent
  labels: {mcpcredentials.dev/inject: "true"}
  annotations: {mcpcredentials.dev/credentials: sum}
spec:
  serviceAccountName: agent
  containers:
    - name: agent
      image: mcp-credentials/e2e-agent:dev
      args: [MCP_SUM_URL]
"#;
    let out = cp.apply(AGENTS, agent);
    assert!(
        out.success,
        "creating the agent pod failed (webhook?): {}",
        out.stderr
    );
    let pod: serde_json::Value =
        serde_json::from_str(&kubectl(cp, &["get", "pod", "-n", AGENTS, "agent", "-o", "json"])).unwrap();
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(
        sidecar["name"], "mcp-credentials-sidecar",
        "the sidecar is the first init container: {pod:#}"
    );
    assert_eq!(
        sidecar["restartPolicy"], "Always",
        "a native sidecar: {sidecar:#}"
    );
    assert_eq!(sidecar["image"], "mcp-credentials/sidecar:dev");
    let agent_container = &pod["spec"]["containers"][0];
    let mounts = agent_container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !mounts.iter().any(|m| m["mountPath"]
            .as_str()
            .unwrap_or_default()
            .starts_with("/var/run/secrets")),
        "the agent container mounts a token: {mounts:?}"
    );
    wait_for("the agent pod Running with its sidecar Ready", || async {
        let pod: serde_json::Value = serde_json::from_str(&try_kubectl(
            cp,
            &["get", "pod", "-n", AGENTS, "agent", "-o", "json"],
        )?)
        .ok()?;
        let status = &pod["status"];
        let sidecar_ready = status["initContainerStatuses"][0]["ready"] == true;
        let agent_running = status["containerStatuses"][0]["state"]["running"].is_object();
        (sidecar_ready && agent_running).then_some(())
    })
    .await;
    let log = agent_log(cp);
    assert!(
        log.iter().any(|l| l == "agent: no service-account token"),
        "the agent container must not see a service-account token: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("agent: calling http://127.0.0.1:")),
        "the agent calls the sidecar on loopback through $MCP_SUM_URL: {log:#?}"
    );
    agent_keeps_working(cp, 3, "at start").await;

    // ---- Rotation: two new access tokens, the agent unaffected.
    let mut seen = vec![current_token(cp).unwrap()];
    while seen.len() < 3 {
        let token = wait_for("a rotated access token", || async {
            current_token(cp).filter(|t| !seen.contains(t))
        })
        .await;
        seen.push(token);
        agent_keeps_working(cp, 2, "across a rotation").await;
    }

    // ---- The upstream revokes the token in use: the sidecar reports, the operator refreshes, the
    // sidecar replays; the agent sees a normal answer.
    let (_, rejected_before) = mcp.counts();
    let before = current_token(cp).unwrap();
    mcp.revoke_next_token();
    wait_for("the upstream to refuse the revoked token", || async {
        (mcp.counts().1 > rejected_before).then_some(())
    })
    .await;
    agent_keeps_working(cp, 3, "after the upstream revoked the token").await;
    let after = current_token(cp).unwrap();
    assert_ne!(before, after, "the report led to a new token");
    // The report reached the operator through the webhook Service (DNS name, ClusterIP, TLS with
    // the operator's CA), authenticated by the sidecar's projected token: the operator says so.
    let note = wait_for("the operator's RefreshRequested event", || async {
        try_kubectl(
            cp,
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                AGENTS,
                "--field-selector",
                "reason=RefreshRequested",
                "-o",
                "jsonpath={.items[*].note}",
            ],
        )
        .filter(|n| !n.is_empty())
    })
    .await;
    assert!(
        note.contains("sidecar of pod agent (service account agent)") && note.contains("invalid_token"),
        "{note}"
    );

    // ---- Deleting the leader pod: another replica takes over, no call fails.
    kubectl(
        cp,
        &["delete", "pod", "-n", RELEASE_NS, &first_leader, "--wait=false"],
    );
    let second_leader = wait_for("a new leader", || async {
        leader(cp).filter(|l| *l != first_leader)
    })
    .await;
    wait_for("two Ready operator pods again", || async {
        (ready_operator_pods(cp).len() == 2).then_some(())
    })
    .await;
    let token = current_token(cp).unwrap();
    wait_for("a rotation by the new leader", || async {
        current_token(cp).filter(|t| *t != token)
    })
    .await;
    agent_keeps_working(
        cp,
        3,
        &format!("after deleting the leader (new leader {second_leader})"),
    )
    .await;

    // ---- helm uninstall leaves only what the chart documents it keeps.
    kubectl(
        cp,
        &["delete", "namespace", AGENTS, "--wait=true", "--timeout=120s"],
    );
    let out = cp.tool(
        "helm",
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            RELEASE_NS,
            "--wait",
            "--timeout",
            "2m",
        ],
        None,
    );
    assert!(out.success, "helm uninstall failed: {}", out.stderr);
    wait_for("the operator pods gone", || async {
        try_kubectl(cp, &["get", "pods", "-n", RELEASE_NS, "-o", "name"]).filter(String::is_empty)
    })
    .await;
    let left = kubectl(
        cp,
        &[
            "get",
            "all,secrets,configmaps,leases,roles,rolebindings,serviceaccounts,networkpolicies,poddisruptionbudgets",
            "-n",
            RELEASE_NS,
            "-o",
            "name",
        ],
    );
    let left: Vec<&str> = left
        .lines()
        // Kubernetes' own, in every namespace.
        .filter(|l| *l != "configmap/kube-root-ca.crt" && *l != "serviceaccount/default")
        .collect();
    // What the operator wrote at run time and the chart documents it keeps (README, "Install with
    // Helm"; NOTES.txt): the JWT signing keys, the webhook CA and its leader Lease.
    let kept = [
        format!("secret/{RELEASE}-mcp-credentials-jwt-keys"),
        format!("secret/{RELEASE}-mcp-credentials-webhook-tls"),
        format!("lease.coordination.k8s.io/{RELEASE}-mcp-credentials-operator"),
    ];
    let undocumented: Vec<&&str> = left.iter().filter(|l| !kept.iter().any(|k| k == *l)).collect();
    assert!(
        undocumented.is_empty(),
        "helm uninstall left these in {RELEASE_NS}, which the chart does not document: {undocumented:?}"
    );
    let cluster = kubectl(
        cp,
        &[
            "get",
            "clusterroles,clusterrolebindings,mutatingwebhookconfigurations,validatingwebhookconfigurations",
            "-o",
            "name",
        ],
    );
    let cluster: Vec<&str> = cluster
        .lines()
        .filter(|l| l.contains("mcp-credentials"))
        .collect();
    assert!(cluster.is_empty(), "helm uninstall left: {cluster:?}");
    // Documented: the CRD stays (crds.keep), so McpCredentials survive a reinstall.
    assert!(
        try_kubectl(cp, &["get", "crd", "mcpcredentials.mcpcredentials.dev"]).is_some(),
        "the CRD is kept on uninstall (crds.keep=true)"
    );
}

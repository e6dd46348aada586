//! Least privilege and memory: the operator watches Secrets by their metadata only, so the data of
//! Secrets it will never manage is neither held nor paid for. Measured against the real API server
//! as a user would see it: the operator's resident memory in a namespace full of unrelated Secrets,
//! next to the same operator in an empty one.

mod operator_support;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use operator_support::{Operator, client, create_secret, data, setup, wait_condition, wait_for};

/// Unrelated Secrets and their size: 16 MiB of data the operator must not hold.
const UNRELATED: usize = 1000;
const SECRET_BYTES: usize = 16 * 1024;
/// How much more memory the operator may use next to them. Holding their data (as a full watch
/// does, through its list pages and the allocator keeping what they used) costs more than the
/// 16 MiB they weigh; their metadata is about 0.3 KiB each.
const ALLOWED_GROWTH: u64 = 6 * 1024 * 1024;

/// Creates `count` Secrets of `bytes` of incompressible data each, in one `kubectl create`.
fn create_unrelated(cp: &mcp_credentials_e2e::ControlPlane, ns: &str, count: usize, bytes: usize) {
    use base64::Engine;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let items: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let blob: Vec<u8> = (0..bytes)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("unrelated-{i}"), "namespace": ns},
                "data": {"blob": base64::engine::general_purpose::STANDARD.encode(blob)},
            })
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let out = cp.tool(
        "kubectl",
        &["create", "-f", "-", "-o", "name"],
        Some(&list.to_string()),
    );
    assert!(out.success, "creating the unrelated Secrets: {}", out.stderr);
}

/// Starts an operator in `ns` with one API-key credential, waits until it is Ready, changes the key
/// and waits for the new one (watch events arrive in order, so by then the operator has seen every
/// Secret created before), and returns its resident memory.
async fn settled_rss(cp: &'static mcp_credentials_e2e::ControlPlane, ns: &str) -> u64 {
    create_secret(cp, ns, "key", &[("token", "first-key")]);
    let operator = Operator::start(cp, ns, "memory", &[]);
    let yaml = "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: tool}\nspec:\n  upstream: https://mcp.example.com/mcp\n  source: {apiKey: {secretKeyRef: {name: key, key: token}}}\n";
    assert!(cp.apply(ns, yaml).success);
    let kube = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(kube.clone(), ns);
    wait_condition(&creds, "tool", "Ready", "True", None).await;
    let out = cp.kubectl(&[
        "create",
        "secret",
        "generic",
        "key",
        "-n",
        ns,
        "--from-literal=token=second-key",
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    assert!(
        cp.tool("kubectl", &["apply", "-f", "-"], Some(&out.stdout))
            .success
    );
    let secrets: Api<Secret> = Api::namespaced(kube, ns);
    wait_for("the new key", || async {
        let s = secrets.get_opt("tool-mcp-credential").await.ok()??;
        (data(&s, "header.Authorization")? == "Bearer second-key").then_some(())
    })
    .await;
    // Let the allocator settle after start-up, as a scrape of a long-running operator would see it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rss = operator.rss_bytes();
    assert!(rss > 0, "cannot read the operator's memory");
    rss
}

#[tokio::test(flavor = "multi_thread")]
async fn unrelated_secrets_cost_the_operator_no_memory_for_their_data() {
    let (cp, empty) = setup("memory-empty");
    let baseline = settled_rss(cp, &empty).await;

    let full = cp.namespace("memory-full");
    create_unrelated(cp, &full, UNRELATED, SECRET_BYTES);
    let beside = settled_rss(cp, &full).await;

    let growth = beside.saturating_sub(baseline);
    println!(
        "operator RSS: {:.1} MiB alone, {:.1} MiB beside {UNRELATED} unrelated Secrets of {} KiB (+{:.1} MiB)",
        baseline as f64 / 1048576.0,
        beside as f64 / 1048576.0,
        SECRET_BYTES / 1024,
        growth as f64 / 1048576.0
    );
    assert!(
        growth <= ALLOWED_GROWTH,
        "the operator grew by {growth} bytes next to {UNRELATED} Secrets it does not manage: it holds their data"
    );
}

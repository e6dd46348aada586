//! Fairness between namespaces, with the operator as a real process watching every namespace: 16
//! credentials in one namespace whose upstream's protected-resource metadata names 1,000
//! authorization servers that accept a connection and never answer, and one ordinary credential
//! (client credentials from the real OAuth server) in another namespace. The ordinary one must keep
//! being renewed before it expires, and the slow ones must say why they fail.
//!
//! On the code before the fix, every reconcile slot was held by a slow credential walking its
//! 1,000 servers (up to three metadata requests of `--token-timeout` each), so the ordinary
//! credential's Secret expired. Outcomes are asserted (each renewal is issued before the previous
//! credential expires; the failure message), never durations.

mod operator_support;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::credential::{Credential, OAuth2, SHARD_LABEL, yaml_stream};
use operator_support::*;

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_credentials_whose_servers_never_answer_do_not_delay_another_namespaces_renewals() {
    let (cp, fast_ns) = setup("fair-fast");
    let slow_ns = cp.namespace("fair-slow");
    // Only this test's credentials: the operator watches every namespace, other tests' too.
    let shard = format!("{SHARD_LABEL}={fast_ns}");

    let hole = blackhole().await;
    let upstream = slow_upstream(hole, 1000).await;
    create_secret(cp, &slow_ns, "idp", &[("secret", "unused")]);
    // One apply for all 16 (one kubectl run).
    let slow_credentials = (0..16).map(|i| {
        Credential::new(&format!("slow-{i}"), &upstream, OAuth2::cc_basic()).label(SHARD_LABEL, &fast_ns)
    });
    apply(cp, &slow_ns, &yaml_stream(slow_credentials));
    let oauth = OAuthServer::start(0, 30);
    create_secret(cp, &fast_ns, "idp", &[("secret", "cc-basic-secret")]);
    apply(
        cp,
        &fast_ns,
        &Credential::new(
            "ordinary",
            "http://127.0.0.1:7001/mcp",
            OAuth2::cc_basic().token_url(&oauth.token_url()),
        )
        .label(SHARD_LABEL, &fast_ns)
        .yaml(),
    );
    // The defaults that matter: 16 reconcile slots, so a quarter (4) per namespace; a refresh
    // deadline of 60 s.
    let op = Operator::start_cluster_wide(
        cp,
        &fast_ns,
        "a",
        &[
            "--selector",
            &shard,
            "--discovery-allow-loopback",
            "--concurrency",
            "16",
        ],
    );
    let client = client(cp).await;
    let fast: Api<McpCredential> = Api::namespaced(client.clone(), &fast_ns);
    let slow: Api<McpCredential> = Api::namespaced(client.clone(), &slow_ns);
    let secrets: Api<Secret> = Api::namespaced(client, &fast_ns);

    // The ordinary one is renewed again and again, each time before it expires.
    wait_condition(&fast, "ordinary", "Ready", "True", Some("CredentialValid")).await;
    let issued = |s: &Secret| -> Option<(String, i64, i64)> {
        let annotations = s.metadata.annotations.as_ref()?;
        let issued_at = annotations.get("mcpcredentials.dev/issued-at")?;
        let issued_at = issued_at
            .parse::<i64>()
            .ok()
            .or_else(|| issued_at.parse::<jiff::Timestamp>().ok().map(|t| t.as_second()))?;
        let expires_at = data(s, "expires-at")?
            .parse::<jiff::Timestamp>()
            .ok()?
            .as_second();
        Some((data(s, "version")?, issued_at, expires_at))
    };
    let mut seen: Vec<(String, i64, i64)> = Vec::new();
    for renewal in 0..3 {
        let last = seen.last().cloned();
        let next = wait_for(
            &format!("renewal {renewal} of the ordinary credential"),
            || async {
                let s = secrets.get("ordinary-mcp-credential").await.ok()?;
                let now = issued(&s)?;
                (last.as_ref().map(|l| &l.0) != Some(&now.0)).then_some(now)
            },
        )
        .await;
        if let Some((version, _, expires_at)) = &last {
            assert!(
                next.1 <= *expires_at,
                "version {} was issued at {}, after version {version} expired at {expires_at}",
                next.0,
                next.1
            );
        }
        seen.push(next);
    }
    // Meanwhile the slow ones fail, and say that the rest of the 1,000 servers were not tried.
    // Any of the 16: four run at a time for up to the discovery budget (45 s) each, in an order
    // the queue chooses, so a given one may be in the last wave.
    let failed = wait_for("a slow credential's failure", || async {
        let list = slow.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .find_map(|c| c.status?.last_failure_message.filter(|m| m.contains("not tried")))
    })
    .await;
    assert!(failed.contains("997 not tried"), "{failed}");

    drop(op);
}

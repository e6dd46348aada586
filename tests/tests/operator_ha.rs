//! High availability of the operator, as real processes against the real control plane and the
//! real OAuth server: a restart re-issues nothing still valid; a standby takes over from a killed leader.

mod operator_support;

use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::credential::{Credential, OAuth2};
use operator_support::*;

fn credential(name: &str, token_url: &str) -> String {
    let upstream = format!("http://127.0.0.1:7100/{name}");
    Credential::new(name, &upstream, OAuth2::cc_basic().token_url(token_url)).yaml()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_valid_credentials_makes_no_token_requests() {
    let (cp, ns) = setup("op-restart");
    let oauth = OAuthServer::start(0, 3600);
    create_secret(cp, &ns, "idp", &[("secret", "cc-basic-secret")]);
    let names = ["one", "two", "three"];
    for n in names {
        apply(cp, &ns, &credential(n, &oauth.token_url()));
    }
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let mut first = Operator::start(cp, &ns, "first", &["--leader-election", "false"]);
    for n in names {
        wait_condition(&creds, n, "Ready", "True", None).await;
    }
    let issued = oauth.token_requests().await;
    assert_eq!(issued, 3);
    let before = versions(&secrets, &names).await;
    first.kill();

    let second = Operator::start(cp, &ns, "second", &["--leader-election", "false"]);
    // The new process has looked at every credential once it reports each as ready.
    for n in names {
        let series = format!(r#"mcp_credentials_credential_ready{{name="{n}",namespace="{ns}"}}"#);
        wait_for(&format!("{n} reconciled by the restarted operator"), || async {
            (second.metric(&series).await == 1.0).then_some(())
        })
        .await;
    }
    assert_eq!(
        oauth.token_requests().await,
        issued,
        "no token request after the restart\n{}",
        second.log_text()
    );
    assert_eq!(versions(&secrets, &names).await, before, "no Secret rewritten");
    let m = second.metrics().await;
    let writes = metric_value(
        &m,
        r#"mcp_credentials_kube_api_requests_total{method="PATCH",resource="secrets"}"#,
    );
    assert_eq!(writes, 0.0, "no Secret write after the restart");
}

async fn versions(secrets: &Api<Secret>, names: &[&str]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for n in names {
        out.push(data(
            &secrets.get(&format!("{n}-mcp-credential")).await.unwrap(),
            "version",
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    let (cp, ns) = setup("op-ha");
    let oauth = OAuthServer::start(0, 3600);
    create_secret(cp, &ns, "idp", &[("secret", "cc-basic-secret")]);
    apply(cp, &ns, &credential("github", &oauth.token_url()));
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);

    let mut a = Operator::start(cp, &ns, "a", &[]);
    wait_condition(&creds, "github", "Ready", "True", None).await;
    wait_for("a leads", || async {
        (a.metric(r#"mcp_credentials_leader{identity="a"}"#).await == 1.0).then_some(())
    })
    .await;
    let b = Operator::start(cp, &ns, "b", &[]);
    wait_for("b serves metrics", || async {
        (!b.metrics().await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        b.metric(r#"mcp_credentials_leader{identity="b"}"#).await,
        0.0,
        "b is a standby"
    );
    let requests = oauth.token_requests().await;

    // While b is a standby, a forced refresh is done by a alone.
    let force = |v: &str| serde_json::json!({"metadata": {"annotations": {"mcpcredentials.dev/refresh-requested-at": v}}});
    let v1 = data(&secrets.get("github-mcp-credential").await.unwrap(), "version").unwrap();
    creds
        .patch("github", &PatchParams::default(), &Patch::Merge(&force("1")))
        .await
        .unwrap();
    let v2 = wait_for("a's forced refresh", || async {
        let v = data(&secrets.get("github-mcp-credential").await.ok()?, "version")?;
        (v != v1).then_some(v)
    })
    .await;
    assert_eq!(
        oauth.token_requests().await,
        requests + 1,
        "only the leader refreshed"
    );

    let killed = Instant::now();
    a.kill();
    wait_for("b leads", || async {
        (b.metric(r#"mcp_credentials_leader{identity="b"}"#).await == 1.0).then_some(())
    })
    .await;
    // Reported, not asserted (shared machine): the goal is under 20 s with a 12 s Lease.
    eprintln!("takeover after {:?}", killed.elapsed());
    creds
        .patch("github", &PatchParams::default(), &Patch::Merge(&force("2")))
        .await
        .unwrap();
    wait_for("b's forced refresh", || async {
        let v = data(&secrets.get("github-mcp-credential").await.ok()?, "version")?;
        (v != v2).then_some(())
    })
    .await;
    wait_condition(&creds, "github", "Ready", "True", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_and_hands_the_lease_over_at_once() {
    let (cp, ns) = setup("op-term");
    let mut a = Operator::start(cp, &ns, "a", &["--lease-duration", "300"]);
    wait_for("a leads", || async {
        (a.metric(r#"mcp_credentials_leader{identity="a"}"#).await == 1.0).then_some(())
    })
    .await;
    let b = Operator::start(cp, &ns, "b", &["--lease-duration", "300"]);
    wait_for("b serves metrics", || async {
        (!b.metrics().await.is_empty()).then_some(())
    })
    .await;
    assert!(a.terminate(), "exit status 0 on SIGTERM\n{}", a.log_text());
    // With a 300 s Lease, b can only lead this soon if a released the Lease on its way out.
    let start = Instant::now();
    wait_for("b leads", || async {
        (b.metric(r#"mcp_credentials_leader{identity="b"}"#).await == 1.0).then_some(())
    })
    .await;
    assert!(start.elapsed().as_secs() < 300);
}

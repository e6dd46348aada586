//! Faults between the operator and the API server, injected by a TCP fault proxy
//! (`mcp_credentials_e2e::fault_proxy`) in front of the real kube-apiserver, with the real OAuth
//! server (oidc-provider, which rotates the refresh token on every use and revokes the grant when
//! a used one comes back):
//! - every API connection fails for 10 s right after the token answer: the rotated refresh token
//!   is still written back, and the next refresh works;
//! - the leader's connections are blackholed without being reset: it stops leading before the
//!   standby takes over, and only the standby writes afterwards.
//!
//! Outcomes are asserted (what the Secret holds, which process wrote), never durations.

mod operator_support;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use mcp_credentials_core::McpCredential;
use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, OAuth2},
    fault_proxy::{Fault, FaultProxy, contains},
};
use operator_support::*;

/// The API server's address, from the token kubeconfig.
fn apiserver(kubeconfig: &std::path::Path) -> (String, SocketAddr) {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:").map(|v| v.trim().to_owned()))
        .expect("a server in the kubeconfig");
    let addr = server
        .strip_prefix("https://")
        .expect("an https server")
        .trim_end_matches('/')
        .parse()
        .expect("an IP:port server");
    (server, addr)
}

/// A proxy in front of the API server, and a kubeconfig (named after `who`) that goes through it.
/// The proxy listens on 127.0.0.1 as the API server does, so its certificate still matches.
async fn api_proxy(cp: &ControlPlane, who: &str) -> (FaultProxy, PathBuf) {
    let direct = token_kubeconfig(cp);
    let (server, addr) = apiserver(&direct);
    let proxy = FaultProxy::start(addr).await;
    let text = std::fs::read_to_string(&direct)
        .unwrap()
        .replace(&server, &format!("https://{}", proxy.addr()));
    let path = std::env::temp_dir().join(format!("mcp-e2e-{}-{who}-proxied.kubeconfig", std::process::id()));
    std::fs::write(&path, text).unwrap();
    (proxy, path)
}

fn force(v: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {"mcpcredentials.dev/refresh-requested-at": v}}})
}

/// The refresh request the credential's Secret was last made for.
fn handled(s: &Secret) -> Option<String> {
    s.metadata
        .annotations
        .as_ref()?
        .get("mcpcredentials.dev/refresh-requested-at")
        .cloned()
}

/// Where the fault of [`rotated_refresh_token_survives_failed_api_writes`] falls.
#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    /// One replica; every API connection fails for 10 s right after the token answer.
    ApiWrites,
    /// Two replicas; only the leader is cut off (12 s), after it read the answer.
    LeaderCutOff,
    /// Two replicas; the leader is cut off (6 s) while the answer is held back (5 s): it loses the
    /// Lease with its token request still running.
    AnswerHeld,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_refresh_token_survives_ten_seconds_of_failed_api_writes() {
    rotated_refresh_token_survives_failed_api_writes(Scenario::ApiWrites).await;
}

/// The same with two replicas and a 4 s Lease, only the leader cut off (12 s): it loses the Lease
/// during the fault, and the standby that takes over must not redeem the spent refresh token before
/// the old leader's write-back lands (oidc-provider would then revoke the whole grant).
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_loses_the_lease_mid_rotation_hands_over_the_rotated_refresh_token() {
    rotated_refresh_token_survives_failed_api_writes(Scenario::LeaderCutOff).await;
}

/// The leader loses the Lease between sending the token request and reading its answer (the
/// authorization server has rotated the refresh token by then): the request is not cancelled with
/// the controller, its answer is kept and written back, and the standby that took over waits for it.
/// The chaos soak found this: the old code dropped the request with the term, and the grant with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_loses_the_lease_while_its_token_request_runs_keeps_the_answer() {
    rotated_refresh_token_survives_failed_api_writes(Scenario::AnswerHeld).await;
}

async fn rotated_refresh_token_survives_failed_api_writes(scenario: Scenario) {
    let two_replicas = scenario != Scenario::ApiWrites;
    let (cp, ns) = setup(match scenario {
        Scenario::ApiWrites => "fault-rt",
        Scenario::LeaderCutOff => "fault-rt-ha",
        Scenario::AnswerHeld => "fault-rt-held",
    });
    let oauth = OAuthServer::start(0, 300);
    // The operator reaches the token endpoint through a proxy too: it sees the token answer pass.
    let oauth_proxy = FaultProxy::start(([127, 0, 0, 1], oauth.port).into()).await;
    let (api, kubeconfig) = api_proxy(cp, &ns).await;
    let upstream = "http://127.0.0.1:7005/mcp";
    let rt0 = oauth.mint_refresh_token(upstream).await;
    create_rt_client_login(cp, &ns, &rt0);
    apply(
        cp,
        &ns,
        &Credential::new(
            "rotating",
            upstream,
            OAuth2::rt_client().token_url(&format!("http://{}/token", oauth_proxy.addr())),
        )
        .yaml(),
    );
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let (op, standby) = if two_replicas {
        // The held answer must arrive within the token timeout: a request that times out after the
        // authorization server read it loses the rotated token whatever the operator does.
        let ha = ["--lease-duration", "4", "--token-timeout", "15"];
        let a = Operator::start_with_kubeconfig(cp, &ns, "a", &ha, &kubeconfig);
        wait_condition(&creds, "rotating", "Ready", "True", None).await;
        // Only the leader is cut off: the standby reaches the API server directly, takes the
        // Lease over while the leader still holds the rotated token, and must wait for it.
        let direct = token_kubeconfig(cp);
        (
            a,
            Some(Operator::start_with_kubeconfig(cp, &ns, "b", &ha, &direct)),
        )
    } else {
        let a = Operator::start_with_kubeconfig(cp, &ns, "a", &["--leader-election", "false"], &kubeconfig);
        (a, None)
    };
    let logs = || {
        let mut text = op.log_text();
        if let Some(b) = &standby {
            text.push_str("\n--- replica b ---\n");
            text.push_str(&b.log_text());
        }
        text
    };
    wait_condition(&creds, "rotating", "Ready", "True", None).await;
    let rt1 = data(&secrets.get("login").await.unwrap(), "refresh-token").unwrap();
    assert_ne!(rt1, rt0);

    // With two replicas, longer than the standby takes to lead (4 s Lease): it leads while the
    // cut-off leader still holds the only copy of the rotated token.
    let fault = Duration::from_secs(match scenario {
        Scenario::ApiWrites => 10,
        Scenario::LeaderCutOff => 12,
        // Longer than the leader's renew deadline (2/3 of the Lease): it stops leading before
        // the answer arrives.
        Scenario::AnswerHeld => 6,
    });
    // The next token answer that carries a refresh token starts 10 s of reset API connections
    // before the operator reads it: the write-back of the rotated token meets a dead API server.
    // Held back, the answer reaches the operator only after the leader lost its Lease.
    let armed = Arc::new(AtomicBool::new(true));
    let control = api.control();
    let token_control = oauth_proxy.control();
    let trigger = armed.clone();
    oauth_proxy.on_upstream_bytes(move |chunk| {
        if contains(chunk, b"\"refresh_token\"") && trigger.swap(false, Ordering::SeqCst) {
            control.fault_for(Fault::Reset, fault);
            if scenario == Scenario::AnswerHeld {
                token_control.fault_for(Fault::Blackhole, Duration::from_secs(5));
            }
        }
    });
    creds
        .patch("rotating", &PatchParams::default(), &Patch::Merge(&force("1")))
        .await
        .unwrap();
    let control = api.control();
    wait_for("the fault started and ended", || async {
        (control.faults_started() == 1 && control.current() == Fault::None).then_some(())
    })
    .await;
    assert!(!armed.load(Ordering::SeqCst));
    assert!(control.connections_reset() > 0, "the fault reset API connections");

    // The forced refresh completes, or the credential needs a new sign-in (the old code's end).
    let outcome = |v: &'static str| {
        let (creds, secrets) = (creds.clone(), secrets.clone());
        async move {
            wait_for(&format!("refresh {v} done, or ReauthRequired"), || async {
                let c = creds.get("rotating").await.ok()?;
                if condition(&c, "ReauthRequired").is_some_and(|(s, _, _)| s == "True") {
                    return Some(Err(condition(&c, "ReauthRequired").unwrap().2));
                }
                let s = secrets.get("rotating-mcp-credential").await.ok()?;
                let ready = condition(&c, "Ready").is_some_and(|(s, _, _)| s == "True");
                (handled(&s).as_deref() == Some(v) && ready).then_some(Ok(()))
            })
            .await
        }
    };
    if let Err(message) = outcome("1").await {
        panic!("the rotated refresh token was lost: {message}\n{}", logs());
    }
    let rt2 = data(&secrets.get("login").await.unwrap(), "refresh-token").unwrap();
    assert_ne!(rt2, rt1, "a newer refresh token was written back");
    assert!(
        oauth.refresh_token_is_live(&rt2).await,
        "the Secret holds the newest refresh token of the chain\n{}",
        logs()
    );

    // And the one after it works: the chain is intact.
    creds
        .patch("rotating", &PatchParams::default(), &Patch::Merge(&force("2")))
        .await
        .unwrap();
    if let Err(message) = outcome("2").await {
        panic!("the next refresh failed: {message}\n{}", logs());
    }
    let rt3 = data(&secrets.get("login").await.unwrap(), "refresh-token").unwrap();
    assert!(oauth.refresh_token_is_live(&rt3).await);
    let c = creds.get("rotating").await.unwrap();
    assert_ne!(
        condition(&c, "ReauthRequired").map(|(s, _, _)| s),
        Some("True".into())
    );
    let log = logs();
    if two_replicas {
        assert!(
            log.contains("stopped leading"),
            "the fault cost the leader its Lease\n{log}"
        );
    }
    for token in [&rt0, &rt1, &rt2, &rt3] {
        assert!(!log.contains(token.as_str()), "no refresh token in the log");
    }
    eprintln!(
        "API connections reset during the fault: {}",
        control.connections_reset()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_leader_stops_leading_before_the_standby_takes_over() {
    let (cp, ns) = setup("fault-ha");
    let oauth = OAuthServer::start(0, 3600);
    create_secret(cp, &ns, "idp", &[("secret", "cc-basic-secret")]);
    apply(
        cp,
        &ns,
        &Credential::new(
            "github",
            "http://127.0.0.1:7100/github",
            OAuth2::cc_basic().token_url(&oauth.token_url()),
        )
        .yaml(),
    );
    let client = client(cp).await;
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    // a reaches the API server through the proxy, b directly.
    let (api, kubeconfig) = api_proxy(cp, "fault-ha-a").await;
    let a = Operator::start_with_kubeconfig(cp, &ns, "a", &[], &kubeconfig);
    let leader = |op: &Operator, id: &str| {
        let series = format!(r#"mcp_credentials_leader{{identity="{id}"}}"#);
        let port = op.port;
        async move {
            let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            Some(metric_value(&text, &series))
        }
    };
    wait_for("a leads", || async {
        (leader(&a, "a").await? == 1.0).then_some(())
    })
    .await;
    wait_condition(&creds, "github", "Ready", "True", None).await;
    let b = Operator::start(cp, &ns, "b", &[]);
    wait_for("b serves metrics", || async {
        (leader(&b, "b").await? == 0.0).then_some(())
    })
    .await;

    // Partition a from the API server: its sockets stay open, nothing flows.
    api.control().set(Fault::Blackhole);
    wait_for("b leads", || async {
        (leader(&b, "b").await? == 1.0).then_some(())
    })
    .await;
    // The property itself: by the time b may lead, a has stopped.
    assert_eq!(
        leader(&a, "a").await,
        Some(0.0),
        "a still leads while b leads\n{}",
        a.log_text()
    );
    assert!(
        a.log_text().contains("stopped leading"),
        "a says it stopped leading\n{}",
        a.log_text()
    );
    let secret_writes = r#"mcp_credentials_kube_api_requests_total{method="PATCH",resource="secrets"}"#;
    let a_writes = a.metric(secret_writes).await;

    // b refreshes while a is partitioned, and again once a is back.
    let version = |s: &Secret| data(s, "version");
    let mut before = version(&secrets.get("github-mcp-credential").await.unwrap());
    for (i, restore) in [("1", false), ("2", true)] {
        if restore {
            api.control().set(Fault::None);
            // a is back: it reads the Lease again (as a standby).
            let leases = r#"mcp_credentials_kube_api_requests_total{method="GET",resource="leases"}"#;
            let seen = a.metric(leases).await;
            wait_for("a reads the Lease again", || async {
                (a.metric(leases).await > seen).then_some(())
            })
            .await;
        }
        creds
            .patch("github", &PatchParams::default(), &Patch::Merge(&force(i)))
            .await
            .unwrap();
        before = wait_for(&format!("forced refresh {i}"), || async {
            let v = version(&secrets.get("github-mcp-credential").await.ok()?);
            (v != before).then_some(v)
        })
        .await;
    }
    wait_condition(&creds, "github", "Ready", "True", None).await;
    assert_eq!(
        a.metric(secret_writes).await,
        a_writes,
        "a wrote no Secret after it stopped leading\n{}",
        a.log_text()
    );
    assert!(b.metric(secret_writes).await >= 2.0, "b wrote both refreshes");
    assert_eq!(leader(&a, "a").await, Some(0.0), "a stays a standby");
    assert_eq!(leader(&b, "b").await, Some(1.0));
    assert_eq!(
        a.metric(r#"mcp_credentials_leadership_lost_total{reason="renew_deadline"}"#)
            .await,
        1.0
    );
}

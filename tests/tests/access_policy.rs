//! The access policy against the real API server: the operator keeps a Role and RoleBinding per
//! McpCredential, and `kubectl auth can-i` shows each service account reads exactly the Secrets of
//! the credentials it may use, and nothing else in the namespace.

mod operator_support;

use std::time::{Duration, Instant};

use mcp_credentials_e2e::ControlPlane;
use operator_support::{Operator, setup};

fn can_i(cp: &ControlPlane, ns: &str, sa: &str, args: &[&str]) -> String {
    let who = format!("system:serviceaccount:{ns}:{sa}");
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-n", ns, "--as", &who]);
    cp.kubectl(&all).stdout.trim().to_owned()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn each_service_account_reads_only_the_secrets_of_credentials_it_may_use() {
    let (cp, ns) = setup("access");
    let operator = Operator::start(cp, &ns, "access", &[]);
    let credentials = "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: github}\nspec:\n  upstream: https://api.githubcopilot.com/mcp/\n  source: {apiKey: {secretKeyRef: {name: gh, key: token}}}\n  access: {serviceAccounts: [coding-agent]}\n---\n\
         apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata: {name: wiki}\nspec:\n  upstream: https://wiki.example.com/mcp\n  source: {apiKey: {secretKeyRef: {name: wk, key: token}}}\n  secretName: wiki-token\n";
    let out = cp.apply(&ns, credentials);
    assert!(out.success, "{}", out.stderr);
    wait_for("the RoleBindings", || {
        cp.kubectl(&["get", "rolebinding", "-n", &ns, "-o", "name"])
            .stdout
            .lines()
            .count()
            == 2
    });

    // coding-agent may read the github Secret (by name: get, and a watch selecting that name).
    assert_eq!(
        can_i(cp, &ns, "coding-agent", &["get", "secret/github-mcp-credential"]),
        "yes"
    );
    assert_eq!(
        can_i(
            cp,
            &ns,
            "coding-agent",
            &["watch", "secret/github-mcp-credential"]
        ),
        "yes"
    );
    // research may not; nobody may list every Secret or read one that is not a credential's.
    assert_eq!(
        can_i(cp, &ns, "research", &["get", "secret/github-mcp-credential"]),
        "no"
    );
    assert_eq!(can_i(cp, &ns, "coding-agent", &["list", "secrets"]), "no");
    assert_eq!(
        can_i(cp, &ns, "coding-agent", &["get", "secret/gh"]),
        "no",
        "the source Secret stays private"
    );
    assert_eq!(
        can_i(
            cp,
            &ns,
            "coding-agent",
            &["update", "secret/github-mcp-credential"]
        ),
        "no"
    );
    // wiki has no access list: every service account of the namespace, and only there.
    assert_eq!(can_i(cp, &ns, "research", &["get", "secret/wiki-token"]), "yes");
    assert_eq!(can_i(cp, &ns, "anyone", &["get", "secret/wiki-token"]), "yes");
    let other = "system:serviceaccount:elsewhere:research";
    let out = cp.kubectl(&[
        "auth",
        "can-i",
        "get",
        "secret/wiki-token",
        "-n",
        &ns,
        "--as",
        other,
    ]);
    assert_eq!(
        out.stdout.trim(),
        "no",
        "service accounts of other namespaces get nothing"
    );

    // Changing the access list moves the permission.
    let out = cp.kubectl(&[
        "patch",
        "mcpcred",
        "github",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"access":{"serviceAccounts":["research"]}}}"#,
    ]);
    assert!(out.success, "{}", out.stderr);
    wait_for("the new access list", || {
        can_i(cp, &ns, "research", &["get", "secret/github-mcp-credential"]) == "yes"
    });
    assert_eq!(
        can_i(cp, &ns, "coding-agent", &["get", "secret/github-mcp-credential"]),
        "no"
    );
    drop(operator);
}

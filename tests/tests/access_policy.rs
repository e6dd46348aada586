//! The access policy against the real API server: the operator keeps a Role and RoleBinding per
//! McpCredential, and `kubectl auth can-i` shows each service account reads exactly the Secrets of
//! the credentials it may use, and nothing else in the namespace: not a Secret the credential does
//! not own, and nothing at all by default.

mod operator_support;

use std::time::{Duration, Instant};

use mcp_credentials_e2e::{
    ControlPlane,
    credential::{Credential, api_key, secret_key, yaml_stream},
};
use operator_support::{Operator, create_secret, setup};

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
    create_secret(cp, &ns, "gh", &[("token", "gh-key")]);
    create_secret(cp, &ns, "wk", &[("token", "wiki-key")]);
    let credentials = yaml_stream([
        Credential::new(
            "github",
            "https://api.githubcopilot.com/mcp/",
            api_key(secret_key("gh", "token")),
        )
        .service_accounts(&["coding-agent"]),
        Credential::new(
            "wiki",
            "https://wiki.example.com/mcp",
            api_key(secret_key("wk", "token")),
        )
        .secret_name("wiki-token")
        .all_service_accounts(),
        Credential::new(
            "jira",
            "https://jira.example.com/mcp",
            api_key(secret_key("gh", "token")),
        ),
    ]);
    let out = cp.apply(&ns, &credentials);
    assert!(out.success, "{}", out.stderr);
    // Each Role names its Secret once the operator has written it (and so owns it).
    wait_for("the grants", || {
        can_i(cp, &ns, "coding-agent", &["get", "secret/github-mcp-credential"]) == "yes"
            && can_i(cp, &ns, "research", &["get", "secret/wiki-token"]) == "yes"
            && cp
                .kubectl(&["get", "secret", "jira-mcp-credential", "-n", &ns])
                .success
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
    // jira has no access list: nobody may read its Secret, not even the namespace's `default`.
    for sa in ["default", "coding-agent", "research"] {
        assert_eq!(
            can_i(cp, &ns, sa, &["get", "secret/jira-mcp-credential"]),
            "no",
            "{sa} reads a credential that lists nobody"
        );
    }
    // wiki opts in to every service account of the namespace, and only there.
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

/// The attack: a user who may create McpCredentials names a Secret that is not the credential's
/// (`secretName: db-password`) and lists their own service account. The operator refuses to write
/// it (SecretNotOwned), and the access policy must not hand it out either.
#[test]
fn a_secret_the_credential_does_not_own_is_never_granted() {
    let (cp, ns) = setup("access-foreign");
    let operator = Operator::start(cp, &ns, "access-foreign", &[]);
    create_secret(cp, &ns, "db-password", &[("password", "hunter2-not-for-agents")]);
    create_secret(cp, &ns, "key", &[("token", "api-key")]);
    let credential = |name: &str| {
        Credential::new(
            name,
            "https://mcp.example.com/mcp",
            api_key(secret_key("key", "token")),
        )
        .service_accounts(&["mine"])
    };
    let credentials = yaml_stream([
        credential("thief").secret_name("db-password"),
        credential("honest"),
    ]);
    let out = cp.apply(&ns, &credentials);
    assert!(out.success, "{}", out.stderr);
    // Both Roles exist; the honest one grants its own Secret, so the access controller has run.
    wait_for("the honest credential's grant", || {
        can_i(cp, &ns, "mine", &["get", "secret/honest-mcp-credential"]) == "yes"
    });
    wait_for("the thief's Role", || {
        cp.kubectl(&["get", "role", "mcp-credential-thief", "-n", &ns])
            .success
    });
    assert_eq!(
        can_i(cp, &ns, "mine", &["get", "secret/db-password"]),
        "no",
        "the access policy handed out a Secret the credential does not own"
    );
    assert_eq!(can_i(cp, &ns, "mine", &["watch", "secret/db-password"]), "no");
    let rules = cp.kubectl(&[
        "get",
        "role",
        "mcp-credential-thief",
        "-n",
        &ns,
        "-o",
        "jsonpath={.rules}",
    ]);
    assert!(
        !rules.stdout.contains("db-password"),
        "the Role names the foreign Secret: {}",
        rules.stdout
    );
    // Another credential's Secret is just as foreign: pointing at honest's Secret gains nothing.
    let out = cp.kubectl(&[
        "patch",
        "mcpcred",
        "thief",
        "-n",
        &ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"secretName":"honest-mcp-credential","access":{"serviceAccounts":["other"]}}}"#,
    ]);
    assert!(out.success, "{}", out.stderr);
    wait_for("the thief's RoleBinding to name other", || {
        cp.kubectl(&[
            "get",
            "rolebinding",
            "mcp-credential-thief",
            "-n",
            &ns,
            "-o",
            "jsonpath={.subjects[*].name}",
        ])
        .stdout
            == "other"
    });
    assert_eq!(
        can_i(cp, &ns, "other", &["get", "secret/honest-mcp-credential"]),
        "no",
        "a second credential naming another's Secret bypassed that credential's access list"
    );
    drop(operator);
}

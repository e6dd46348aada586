//! The McpCredential CRD against the real kube-apiserver: it installs, realistic credentials are
//! accepted, every invalid combination is rejected by the API server with a message that says what
//! to change, and `kubectl get` / `kubectl explain` show what users need.

use mcp_credentials_e2e::{ControlPlane, control_plane, repo_root};

fn cluster() -> &'static ControlPlane {
    let cp = control_plane();
    cp.install_crds();
    cp
}

/// An McpCredential named `name` whose spec is the YAML `spec` (indented by the caller as a block).
fn credential(name: &str, spec: &str) -> String {
    let spec = spec.trim_matches('\n');
    let indent = spec.len() - spec.trim_start().len();
    let spec: String = spec
        .lines()
        .map(|l| format!("  {}\n", l.get(indent..).unwrap_or("")))
        .collect();
    format!(
        "apiVersion: mcpcredentials.dev/v1alpha1\nkind: McpCredential\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

const VALID_SOURCE: &str = "source:\n  apiKey:\n    secretKeyRef: {name: key, key: api-key}\n";

/// Every McpCredential document under `examples/`, with the file it came from.
fn example_documents() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read examples/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("examples"), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read example");
        for doc in text.split("\n---") {
            if doc.contains("kind: McpCredential") {
                docs.push((file.display().to_string(), doc.to_string()));
            }
        }
    }
    docs
}

#[test]
fn every_example_is_accepted_by_the_api_server() {
    let cp = cluster();
    let ns = cp.namespace("crd-examples");
    let docs = example_documents();
    assert!(
        docs.len() >= 8,
        "expected the examples for GitHub, Slack, Jira, Linear, Notion, JWT, session and token exchange, found {}",
        docs.len()
    );
    for (file, doc) in &docs {
        let out = cp.apply(&ns, doc);
        assert!(out.success, "{file} was rejected: {}", out.stderr);
    }
    let out = cp.kubectl(&["get", "mcpcred", "-n", &ns, "-o", "name"]);
    assert_eq!(
        out.stdout.lines().count(),
        docs.len(),
        "every example is stored: {}",
        out.stdout
    );
}

#[test]
fn invalid_credentials_are_rejected_with_a_message_naming_the_fix() {
    let cp = cluster();
    let ns = cp.namespace("crd-invalid");
    let cases: &[(&str, String, &str)] = &[
        (
            "no source",
            credential("no-source", "upstream: https://mcp.example.com/mcp\n"),
            "spec.source: Required value",
        ),
        (
            "an empty source",
            credential(
                "empty-source",
                "upstream: https://mcp.example.com/mcp\nsource: {}\n",
            ),
            "spec.source must set exactly one of oauth2, tokenExchange, jwt, githubApp, apiKey or session",
        ),
        (
            "two sources",
            credential(
                "two-sources",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  apiKey: {secretKeyRef: {name: key, key: api-key}}
                  jwt: {subject: agent}
                ",
            ),
            "spec.source must set exactly one of",
        ),
        (
            "a session from both imported cookies and the browser",
            credential(
                "session-cookies-and-browser",
                "
                upstream: https://wiki.example.com/mcp
                source:
                  session:
                    cookies: {secretKeyRef: {name: wiki, key: cookies.txt}}
                    browser: {}
                ",
            ),
            "session must set exactly one of cookies, formLogin or browser",
        ),
        (
            "a browser session whose site is plain http and not loopback",
            credential(
                "session-browser-http",
                "
                upstream: https://wiki.example.com/mcp
                source:
                  session:
                    browser: {url: http://wiki.example.com/}
                ",
            ),
            "session.browser.url must be an absolute https:// URL",
        ),
        (
            "an http upstream that is not loopback",
            credential(
                "http-upstream",
                &format!("upstream: http://mcp.example.com/mcp\n{VALID_SOURCE}"),
            ),
            "spec.upstream must be an absolute https:// URL (plain http:// is allowed only for loopback",
        ),
        (
            "an upstream with credentials in the URL",
            credential(
                "userinfo-upstream",
                &format!("upstream: https://user:pw@mcp.example.com/\n{VALID_SOURCE}"),
            ),
            "spec.upstream must be an absolute https:// URL",
        ),
        (
            "a relative upstream",
            credential("relative-upstream", &format!("upstream: /mcp\n{VALID_SOURCE}")),
            "spec.upstream must be an absolute https:// URL",
        ),
        (
            "an http token URL that is not loopback",
            credential(
                "http-token-url",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  oauth2:
                    grant: clientCredentials
                    clientId: agent
                    tokenUrl: http://login.example.com/token
                ",
            ),
            "oauth2.tokenUrl must be an absolute https:// URL",
        ),
        (
            "both renewBefore and renewBeforePercentage",
            credential(
                "both-renewals",
                &format!(
                    "upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}refresh: {{renewBefore: 10m, renewBeforePercentage: 20}}\n"
                ),
            ),
            "set at most one of refresh.renewBefore and refresh.renewBeforePercentage",
        ),
        (
            "a percentage of 0",
            credential(
                "percentage-zero",
                &format!(
                    "upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}refresh: {{renewBeforePercentage: 0}}\n"
                ),
            ),
            "refresh.renewBeforePercentage must be between 1 and 99",
        ),
        (
            "a percentage of 100",
            credential(
                "percentage-hundred",
                &format!(
                    "upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}refresh: {{renewBeforePercentage: 100}}\n"
                ),
            ),
            "refresh.renewBeforePercentage must be between 1 and 99",
        ),
        (
            "a minted JWT living 30 seconds",
            credential(
                "jwt-too-short",
                "upstream: https://mcp.example.com/mcp\nsource: {jwt: {subject: agent, ttl: 30s}}\n",
            ),
            "jwt.ttl must be a duration between 1m and 24h",
        ),
        (
            "a minted JWT living 25 hours",
            credential(
                "jwt-too-long",
                "upstream: https://mcp.example.com/mcp\nsource: {jwt: {subject: agent, ttl: 25h}}\n",
            ),
            "jwt.ttl must be a duration between 1m and 24h",
        ),
        (
            "a ttl that is not a duration",
            credential(
                "jwt-not-duration",
                "upstream: https://mcp.example.com/mcp\nsource: {jwt: {subject: agent, ttl: one-hour}}\n",
            ),
            "jwt.ttl must be a duration between 1m and 24h",
        ),
        (
            "a header name with a space",
            credential(
                "bad-header",
                &format!(
                    "upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}inject: {{header: 'X API Key'}}\n"
                ),
            ),
            "inject.header must be a valid HTTP header name",
        ),
        (
            "a header name with a colon",
            credential(
                "colon-header",
                &format!(
                    "upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}inject: {{header: 'Authorization:'}}\n"
                ),
            ),
            "inject.header must be a valid HTTP header name",
        ),
        (
            "a hop-by-hop header",
            credential(
                "hop-header",
                &format!(
                    "upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}inject: {{header: Transfer-Encoding}}\n"
                ),
            ),
            "inject.header cannot be a header that controls the connection",
        ),
        (
            "a format without {token}",
            credential(
                "format-without-token",
                &format!("upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}inject: {{format: Bearer}}\n"),
            ),
            "inject.format must contain {token}",
        ),
        (
            "a secretName with capitals and an underscore",
            credential(
                "bad-secret-name",
                &format!("upstream: https://mcp.example.com/mcp\n{VALID_SOURCE}secretName: My_Secret\n"),
            ),
            "spec.secretName must be a valid Kubernetes object name",
        ),
        (
            "a refresh-token grant without the refresh token",
            credential(
                "refresh-without-token",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  oauth2: {grant: refreshToken, clientId: agent}
                ",
            ),
            "oauth2.refreshToken is required when grant is refreshToken",
        ),
        (
            "private_key_jwt without a key",
            credential(
                "pkjwt-without-key",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  oauth2: {grant: clientCredentials, clientId: agent, clientAuth: privateKeyJwt}
                ",
            ),
            "oauth2.privateKey is required when clientAuth is privateKeyJwt",
        ),
        (
            "a token exchange with two subjects",
            credential(
                "two-subjects",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  tokenExchange:
                    subject:
                      serviceAccount: {name: agent, audience: https://idp.example.com}
                      secretKeyRef: {name: t, key: token}
                ",
            ),
            "tokenExchange.subject must set exactly one of serviceAccount or secretKeyRef",
        ),
        (
            "cross-app access with the token-exchange grant",
            credential(
                "xaa-token-exchange",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  tokenExchange:
                    subject: {secretKeyRef: {name: sso, key: id-token}}
                    crossAppAccess: {tokenUrl: https://idp.example.com/token}
                ",
            ),
            "tokenExchange.crossAppAccess needs grant: jwtBearer",
        ),
        (
            "cross-app access with a configured token URL and no audience",
            credential(
                "xaa-no-audience",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  tokenExchange:
                    grant: jwtBearer
                    tokenUrl: https://as.example.com/token
                    subject: {secretKeyRef: {name: sso, key: id-token}}
                    crossAppAccess: {tokenUrl: https://idp.example.com/token}
                ",
            ),
            "tokenExchange.crossAppAccess.audience is required when tokenExchange.tokenUrl is set",
        ),
        (
            "cross-app access with an IdP secret and no IdP client",
            credential(
                "xaa-secret-no-client",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  tokenExchange:
                    grant: jwtBearer
                    subject: {secretKeyRef: {name: sso, key: id-token}}
                    crossAppAccess:
                      tokenUrl: https://idp.example.com/token
                      clientSecret: {name: idp, key: secret}
                ",
            ),
            "tokenExchange.crossAppAccess.clientId is required with tokenExchange.crossAppAccess.clientSecret",
        ),
        (
            "cross-app access at a plain-http identity provider",
            credential(
                "xaa-http-idp",
                "
                upstream: https://mcp.example.com/mcp
                source:
                  tokenExchange:
                    grant: jwtBearer
                    subject: {secretKeyRef: {name: sso, key: id-token}}
                    crossAppAccess: {tokenUrl: http://idp.example.com/token}
                ",
            ),
            "tokenExchange.crossAppAccess.tokenUrl must be an absolute https:// URL",
        ),
        (
            "a minted JWT overriding aud",
            credential(
                "jwt-reserved-claim",
                "upstream: https://mcp.example.com/mcp\nsource: {jwt: {subject: agent, claims: {aud: other}}}\n",
            ),
            "jwt.claims cannot set the registered claims",
        ),
    ];
    for (what, doc, message) in cases {
        let out = cp.apply(&ns, doc);
        assert!(!out.success, "{what} was accepted:\n{doc}");
        assert!(
            out.stderr.contains(message),
            "{what}: expected the API server to say {message:?}, it said:\n{}",
            out.stderr
        );
    }
    // Nothing invalid was stored.
    let out = cp.kubectl(&["get", "mcpcred", "-n", &ns, "-o", "name"]);
    assert_eq!(out.stdout.trim(), "", "no invalid credential is stored");
}

#[test]
fn loopback_http_is_accepted_for_local_servers() {
    let cp = cluster();
    let ns = cp.namespace("crd-loopback");
    for (i, url) in [
        "http://127.0.0.1:8080/mcp",
        "http://localhost:3000/",
        "http://[::1]:9000/mcp",
    ]
    .iter()
    .enumerate()
    {
        let doc = credential(&format!("local-{i}"), &format!("upstream: {url}\n{VALID_SOURCE}"));
        let out = cp.apply(&ns, &doc);
        assert!(out.success, "{url} was rejected: {}", out.stderr);
    }
}

/// `session.browser` is for standalone mode (the sidecar beside the person's browser): the API
/// server refuses it at admission, naming the field and what to use in a cluster, and stores
/// nothing. (Standalone mode reads the same YAML without the API server: tests/browser_session.rs.)
#[test]
fn a_browser_session_is_refused_at_admission_with_the_fix() {
    let cp = cluster();
    let ns = cp.namespace("crd-browser");
    for (name, browser) in [
        ("wiki", "{}"),
        (
            "wiki-sso",
            "{url: https://wiki.example.com/api, signInUrl: https://sso.example.com/login}",
        ),
    ] {
        let doc = credential(
            name,
            &format!(
                "upstream: https://wiki.example.com/api/mcp\nsource:\n  session:\n    browser: {browser}\n    \
                 check: {{url: https://wiki.example.com/api/me}}\n"
            ),
        );
        let out = cp.apply(&ns, &doc);
        assert!(!out.success, "{browser} was accepted");
        for part in [
            "spec.source.session.browser",
            "session.browser works only in standalone mode",
            "in a cluster use session.cookies or session.formLogin instead",
        ] {
            assert!(out.stderr.contains(part), "{part:?} is not in: {}", out.stderr);
        }
        let got = cp.kubectl(&["get", "mcpcred", name, "-n", &ns]);
        assert!(!got.success, "{name} was stored: {}", got.stdout);
    }
}

#[test]
fn kubectl_get_shows_ready_source_upstream_expiry_and_renewal() {
    let cp = cluster();
    let ns = cp.namespace("crd-columns");
    let out = cp.apply(
        &ns,
        &credential(
            "github",
            &format!("upstream: https://api.githubcopilot.com/mcp/\n{VALID_SOURCE}"),
        ),
    );
    assert!(out.success, "{}", out.stderr);
    let status = r#"{"status":{"source":"apiKey","notAfter":"2099-01-01T00:00:00Z","renewalTime":"2098-12-31T00:00:00Z","secretName":"github-mcp-credential","conditions":[{"type":"Ready","status":"True","reason":"Issued","message":"credential is current","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    let out = cp.kubectl(&[
        "patch",
        "mcpcred",
        "github",
        "-n",
        &ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ]);
    assert!(
        out.success,
        "the status subresource accepts a status: {}",
        out.stderr
    );

    let out = cp.kubectl(&["get", "mcpcred", "-n", &ns]);
    assert!(out.success, "{}", out.stderr);
    let header: Vec<&str> = out
        .stdout
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "SOURCE", "UPSTREAM", "EXPIRES", "RENEWAL", "AGE"]
    );
    let row: Vec<&str> = out
        .stdout
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..4],
        ["github", "True", "apiKey", "https://api.githubcopilot.com/mcp/"]
    );

    let out = cp.kubectl(&["get", "mcpcred", "-n", &ns, "-o", "wide"]);
    assert!(
        out.stdout.lines().next().unwrap_or("").contains("REASON"),
        "wide adds REASON: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("github-mcp-credential"),
        "wide adds the Secret: {}",
        out.stdout
    );

    // The short name and the category work too.
    assert!(cp.kubectl(&["get", "mcpcredentials", "-n", &ns]).success);
    assert!(cp.kubectl(&["get", "mcp", "-n", &ns]).stdout.contains("github"));

    // A spec change bumps the generation; a status change does not.
    let generation = cp.kubectl(&[
        "get",
        "mcpcred",
        "github",
        "-n",
        &ns,
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(generation.stdout, "1");
}

#[test]
fn kubectl_explain_shows_the_field_docs() {
    let cp = cluster();
    let out = cp.kubectl(&["explain", "mcpcredential.spec.source"]);
    assert!(out.success, "{}", out.stderr);
    for needle in [
        "Set exactly one of",
        "oauth2",
        "tokenExchange",
        "githubApp",
        "apiKey",
        "session",
        "jwt",
    ] {
        assert!(
            out.stdout.contains(needle),
            "explain spec.source lacks {needle:?}:\n{}",
            out.stdout
        );
    }
    let out = cp.kubectl(&["explain", "mcpcredential.spec.refresh.renewBeforePercentage"]);
    assert!(
        out.stdout.contains("Default: 33"),
        "defaults are stated:\n{}",
        out.stdout
    );
    let out = cp.kubectl(&["explain", "mcpcredential.spec.source.oauth2.resource"]);
    assert!(out.stdout.contains("RFC 8707"), "{}", out.stdout);
}

//! The Kubernetes store against the real control plane (`mcp_credentials_e2e::control_plane()`: a
//! kube-apiserver and etcd on loopback): Secrets written through the API reach the next request, a
//! deleted Secret stops the credential, and the watch works under least-privilege RBAC
//! (`resourceNames`), as the sidecar runs in a pod.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use mcp_credentials_core::secret::{CREDENTIAL_LABEL, MANAGED_BY, MANAGED_BY_LABEL, SECRET_TYPE};
use mcp_credentials_sidecar::{
    config::Wanted,
    store::{Store, kubernetes},
};
use serde_json::json;

mod common;

fn secret(name: &str, credential: &str, upstream: &str, key: &str, version: &str) -> Secret {
    let data = BTreeMap::from([
        ("upstream".to_owned(), ByteString(upstream.into())),
        ("header.X-API-Key".to_owned(), ByteString(key.into())),
        ("version".to_owned(), ByteString(version.into())),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (CREDENTIAL_LABEL.to_owned(), credential.to_owned()),
            ])),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    }
}

/// A client authenticated as service account `name` of `namespace` (created here), bound to `role`
/// in that namespace. Tokens, not the admin kubeconfig: its X.509 v1 client certificate is refused by
/// rustls (`UnsupportedCertVersion`).
async fn service_account_client(
    cp: &mcp_credentials_e2e::ControlPlane,
    namespace: &str,
    name: &str,
    role: &str,
) -> kube::Client {
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {name}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: {role}}}\n\
         subjects: [{{kind: ServiceAccount, name: {name}, namespace: {namespace}}}]\n"
    );
    let out = cp.apply(namespace, &yaml);
    assert!(out.success, "{}", out.stderr);
    let token = cp.kubectl(&["create", "token", name, "-n", namespace]);
    assert!(token.success, "{}", token.stderr);
    let kubeconfig = kube::config::Kubeconfig::read_from(&cp.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.stdout.trim().to_owned().into()),
        ..Default::default()
    };
    kube::Client::try_from(config).unwrap()
}

/// A client that may do anything with Secrets in `namespace`: the test's own hands.
async fn secret_writer(cp: &mcp_credentials_e2e::ControlPlane, namespace: &str) -> kube::Client {
    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: secret-writer}\n\
                rules: [{apiGroups: [''], resources: [secrets], verbs: ['*']}]\n";
    let out = cp.apply(namespace, role);
    assert!(out.success, "{}", out.stderr);
    service_account_client(cp, namespace, "secret-writer", "Role, name: secret-writer").await
}

/// An upstream that answers with the X-API-Key it received.
async fn key_echo() -> String {
    let app = axum::Router::new().fallback(|headers: http::HeaderMap| async move {
        headers
            .get("x-api-key")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Waits (on store changes, not on time) until `name` has `version`, or none when `None`.
async fn wait_for_version(store: &Arc<Store>, name: &str, version: Option<&str>) {
    let mut changes = store.subscribe();
    changes
        .wait_for(|_| {
            store
                .get(name)
                .and_then(|s| s.current)
                .map(|c| c.version.clone())
                .as_deref()
                == version
        })
        .await
        .unwrap();
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn secrets_written_through_the_api_reach_the_next_request_under_least_privilege() {
    mcp_credentials_sidecar::install_crypto_provider();
    let cp = mcp_credentials_e2e::control_plane();
    let ns = cp.namespace("sidecar-watch");
    let admin = secret_writer(cp, &ns).await;
    let upstream = key_echo().await;
    let secrets: Api<Secret> = Api::namespaced(admin, &ns);
    secrets
        .create(
            &PostParams::default(),
            &secret("demo-mcp-credential", "demo", &upstream, "key-1", "1"),
        )
        .await
        .unwrap();
    // A Secret this pod may not read, in the same namespace.
    secrets
        .create(
            &PostParams::default(),
            &secret("other-mcp-credential", "other", &upstream, "no", "1"),
        )
        .await
        .unwrap();

    // The sidecar's identity: may get/list/watch its two named Secrets and nothing else.
    let role = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: agent-credentials}
rules:
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [demo-mcp-credential, renamed-secret]
  verbs: [get, list, watch]
"#;
    let out = cp.apply(&ns, role);
    assert!(out.success, "{}", out.stderr);
    let agent = service_account_client(cp, &ns, "agent", "Role, name: agent-credentials").await;

    let store = Store::new(["demo".to_owned(), "custom".to_owned()]);
    let wanted = vec![Wanted::parse("demo"), Wanted::parse("custom=renamed-secret")];
    let watch = tokio::spawn(kubernetes::run(store.clone(), agent, ns.clone(), wanted));
    let sidecar = common::sidecar_with_store(store.clone()).await;

    wait_for_version(&store, "demo", Some("1")).await;
    assert_eq!(
        get(&format!("{}/demo/x", sidecar.url)).await,
        (200, "key-1".to_owned())
    );
    assert!(
        store.get("other").is_none(),
        "a Secret outside the pod's list is never loaded"
    );

    // A new version written through the API is used by the next request.
    let patch = json!({ "data": {
        "header.X-API-Key": ByteString(b"key-2".to_vec()),
        "version": ByteString(b"2".to_vec()),
    }});
    let written = std::time::Instant::now();
    secrets
        .patch(
            "demo-mcp-credential",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    wait_for_version(&store, "demo", Some("2")).await;
    // Reported, not asserted (shared machine): the target is well under 100 ms.
    eprintln!(
        "new version in the store {:?} after the patch was sent",
        written.elapsed()
    );
    assert_eq!(
        get(&format!("{}/demo/x", sidecar.url)).await,
        (200, "key-2".to_owned())
    );

    // Before its Secret exists, a named credential answers 503 saying so (once its watch has listed).
    let mut changes = store.subscribe();
    changes
        .wait_for(|_| store.get("custom").unwrap().last_failure.is_some())
        .await
        .unwrap();
    let (status, body) = get(&format!("{}/custom/y", sidecar.url)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Secret renamed-secret not found"), "{body}");

    // `name=secret-name` for a credential whose spec.secretName differs, created after the watch began.
    secrets
        .create(
            &PostParams::default(),
            &secret("renamed-secret", "custom", &upstream, "key-c", "7"),
        )
        .await
        .unwrap();
    wait_for_version(&store, "custom", Some("7")).await;
    assert_eq!(
        get(&format!("{}/custom/y", sidecar.url)).await,
        (200, "key-c".to_owned())
    );

    // A deleted Secret of a credential that expires: the last credential keeps being served until
    // it expires (it is still valid upstream, and the operator recreates the Secret in seconds).
    let expires = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600)).to_string();
    let patch = json!({ "data": {
        "expires-at": ByteString(expires.into_bytes()),
        "version": ByteString(b"8".to_vec()),
    }});
    secrets
        .patch("renamed-secret", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for_version(&store, "custom", Some("8")).await;
    secrets
        .delete("renamed-secret", &DeleteParams::default())
        .await
        .unwrap();
    let mut changes = store.subscribe();
    changes
        .wait_for(|_| store.get("custom").unwrap().last_failure.is_some())
        .await
        .unwrap();
    assert_eq!(
        get(&format!("{}/custom/y", sidecar.url)).await,
        (200, "key-c".to_owned())
    );

    // A deleted Secret of a credential that never expires (an API key) stops it at once: deleting
    // the Secret is how one revokes a key. 503, never a stale or missing header.
    secrets
        .delete("demo-mcp-credential", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_version(&store, "demo", None).await;
    let (status, body) = get(&format!("{}/demo/x", sidecar.url)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("credential_unavailable"), "{body}");

    watch.abort();
    cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

#[tokio::test]
async fn without_names_every_managed_secret_of_the_namespace_is_served() {
    mcp_credentials_sidecar::install_crypto_provider();
    let cp = mcp_credentials_e2e::control_plane();
    let ns = cp.namespace("sidecar-watch-all");
    let client = secret_writer(cp, &ns).await;
    let upstream = key_echo().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &secret("a-secret", "alpha", &upstream, "key-a", "1"),
        )
        .await
        .unwrap();
    // Not managed by mcp-credentials: ignored.
    let mut plain = secret("plain", "plain", &upstream, "key-p", "1");
    plain.metadata.labels = None;
    plain.type_ = Some("Opaque".into());
    secrets.create(&PostParams::default(), &plain).await.unwrap();

    let store = Store::new([]);
    let watch = tokio::spawn(kubernetes::run(store.clone(), client, ns.clone(), Vec::new()));
    wait_for_version(&store, "alpha", Some("1")).await;
    secrets
        .create(
            &PostParams::default(),
            &secret("b-secret", "beta", &upstream, "key-b", "1"),
        )
        .await
        .unwrap();
    wait_for_version(&store, "beta", Some("1")).await;
    assert_eq!(store.names(), ["alpha", "beta"]);
    watch.abort();
    cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

/// The real binary in Kubernetes mode (`KUBECONFIG` with a service-account token, as in-cluster
/// config would give it): ready once its Secret loads, then proxies with it.
#[tokio::test]
async fn the_binary_in_kubernetes_mode_serves_its_secret() {
    mcp_credentials_sidecar::install_crypto_provider();
    let cp = mcp_credentials_e2e::control_plane();
    let ns = cp.namespace("sidecar-binary");
    let writer = secret_writer(cp, &ns).await;
    let upstream = key_echo().await;
    let role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: sidecar}\n\
                rules: [{apiGroups: [''], resources: [secrets], resourceNames: [demo-mcp-credential], verbs: [get, list, watch]}]\n";
    assert!(cp.apply(&ns, role).success);
    let _ = service_account_client(cp, &ns, "sidecar", "Role, name: sidecar").await;
    let token = cp.kubectl(&["create", "token", "sidecar", "-n", &ns]);
    assert!(token.success, "{}", token.stderr);
    let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let field = |k: &str| {
        admin
            .lines()
            .find_map(|l| l.trim().strip_prefix(k).map(|v| v.trim().to_owned()))
            .unwrap()
    };
    let kubeconfig = std::env::temp_dir().join(format!("mcp-sidecar-kubeconfig-{}", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{}', certificate-authority: '{}'}}}}]\n\
             users: [{{name: u, user: {{token: '{}'}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u, namespace: {ns}}}}}]\n\
             current-context: x\n",
            field("server:"),
            field("certificate-authority:"),
            token.stdout.trim()
        ),
    )
    .unwrap();

    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (proxy, admin_port) = (free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-credentials-sidecar"))
        .env("KUBECONFIG", &kubeconfig)
        .env("MCP_SIDECAR_LISTEN", format!("127.0.0.1:{proxy}"))
        .env("MCP_SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("MCP_SIDECAR_CREDENTIALS", "demo")
        .spawn()
        .unwrap();
    Api::<Secret>::namespaced(writer, &ns)
        .create(
            &PostParams::default(),
            &secret("demo-mcp-credential", "demo", &upstream, "key-k", "1"),
        )
        .await
        .unwrap();
    let mut ready = false;
    for _ in 0..600 {
        if reqwest::get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let answer = get(&format!("http://127.0.0.1:{proxy}/demo/x")).await;
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_file(&kubeconfig).unwrap();
    cp.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    assert!(ready, "the sidecar never became ready");
    assert_eq!(answer, (200, "key-k".to_owned()));
}

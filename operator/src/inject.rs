//! What the injection webhook does to a pod, as pure functions: which credentials it asks for, whether
//! its service account may use them, and the pod with the sidecar added. The admission server (TLS,
//! AdmissionReview) wraps these; keeping them pure makes every rule testable without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, KeyToPath, Pod, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString};
use mcp_credentials_core::{McpCredential, secret::secret_name};

/// The opt-in pod label; the webhook's object selector matches only pods carrying it.
pub const INJECT_LABEL: &str = "mcpcredentials.dev/inject";
/// The pod annotation naming the credentials: `github,slack`.
pub const CREDENTIALS_ANNOTATION: &str = "mcpcredentials.dev/credentials";
/// Set on a pod once injected, with the credentials injected.
pub const INJECTED_ANNOTATION: &str = "mcpcredentials.dev/injected";
/// Set to `"true"` to keep the service-account token mounted in the agent's containers. By default
/// it is removed from them: that token may read the credential Secrets (the access policy grants
/// the pod's service account exactly that), and the agent must never hold a credential.
pub const AGENT_API_ACCESS_ANNOTATION: &str = "mcpcredentials.dev/agent-api-access";
/// The injected container's name.
pub const SIDECAR_NAME: &str = "mcp-credentials-sidecar";
/// The sidecar's own service-account token volume (it must not depend on the pod's automount).
const TOKEN_VOLUME: &str = "mcp-credentials-api-access";
/// Where the sidecar reads the API token, the cluster CA and its namespace (the standard path,
/// so kube's in-cluster configuration finds them).
const TOKEN_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
use mcp_credentials_core::sidecar_env as sidecar;
/// The sidecar's ports: the proxy on loopback; admin (metrics, and probes with details) on loopback
/// unless the pod opts in with [`EXPOSE_METRICS_ANNOTATION`]; probes on the pod IP.
pub use mcp_credentials_core::sidecar_env::{ADMIN_PORT, PROBE_PORT, PROXY_PORT};
/// Set to `"true"` to serve the sidecar's `/metrics` on the pod IP (port 7008), for a Prometheus
/// that scrapes pods. By default it listens on loopback only.
pub const EXPOSE_METRICS_ANNOTATION: &str = "mcpcredentials.dev/expose-sidecar-metrics";

/// How the sidecar is injected.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The sidecar image.
    pub image: String,
    /// Kubernetes 1.29 or later: inject a native sidecar (an init container that keeps running), so
    /// the agent starts only once its credentials are ready and the sidecar outlives it.
    pub native_sidecar: bool,
    /// Where the sidecar reports credentials its upstream rejected (`MCP_SIDECAR_REPORT_URL`).
    pub report_url: Option<String>,
    /// The PEM CA bundle the sidecar trusts for that URL (`MCP_SIDECAR_REPORT_CA`). It travels in
    /// the pod spec because the operator's certificate Secret lives in the operator's namespace,
    /// which the pod cannot read; a CA is public.
    pub report_ca: Option<String>,
}

/// Why a pod is refused. The message is shown by `kubectl` to whoever created the pod.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    /// The annotation is missing or names nothing.
    #[error(
        "pod is labelled {INJECT_LABEL}=true but its annotation {CREDENTIALS_ANNOTATION} names no credential; \
         set it to a comma-separated list of McpCredential names, for example \"github,slack\""
    )]
    NoCredentials,
    /// A name in the annotation is not a valid McpCredential name.
    #[error("{CREDENTIALS_ANNOTATION} names {0:?}, which is not a valid McpCredential name")]
    InvalidName(String),
    /// A named credential does not exist in the pod's namespace.
    #[error(
        "McpCredential {name:?} (named in {CREDENTIALS_ANNOTATION}) does not exist in namespace {namespace:?}"
    )]
    NotFound {
        /// The credential.
        name: String,
        /// The pod's namespace.
        namespace: String,
    },
    /// The pod's service account is not in the credential's `spec.access.serviceAccounts`.
    #[error(
        "service account {service_account:?} may not use McpCredential {name:?}: it allows {allowed}; run the pod \
         as an allowed service account, or add {service_account:?} to the credential's spec.access.serviceAccounts"
    )]
    NotAllowed {
        /// The credential.
        name: String,
        /// The pod's service account.
        service_account: String,
        /// Who may use it, in words.
        allowed: String,
    },
    /// The pod shares the node's network namespace.
    #[error(
        "pod uses hostNetwork: true, where the sidecar's 127.0.0.1:{PROXY_PORT} would be the node's loopback, \
         open to every process on the node; credentials are not injected into host-network pods: run the agent \
         without hostNetwork"
    )]
    HostNetwork,
    /// Two credentials would get the same environment variable.
    #[error("credentials {0:?} and {1:?} would both set the environment variable {2}; rename one of them")]
    EnvCollision(String, String, String),
}

/// The credentials a pod asks for, from its annotation: trimmed, deduplicated, in order.
pub fn requested_credentials(pod: &Pod) -> Result<Vec<String>, Denied> {
    let value = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREDENTIALS_ANNOTATION))
        .map(String::as_str)
        .unwrap_or("");
    let mut names: Vec<String> = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let valid = name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid {
            return Err(Denied::InvalidName(name.to_owned()));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        return Err(Denied::NoCredentials);
    }
    Ok(names)
}

/// Checks that every requested credential exists in `namespace` and that `service_account` may use
/// it; returns them with their Secret names, in the requested order.
pub fn authorize(
    requested: &[String],
    namespace: &str,
    service_account: &str,
    existing: &[McpCredential],
) -> Result<Vec<(String, String)>, Denied> {
    requested
        .iter()
        .map(|name| {
            let cred = existing
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))
                .ok_or_else(|| Denied::NotFound {
                    name: name.clone(),
                    namespace: namespace.to_owned(),
                })?;
            let allowed = cred.spec.allowed();
            if !allowed.permits(service_account) {
                return Err(Denied::NotAllowed {
                    name: name.clone(),
                    service_account: service_account.to_owned(),
                    allowed: allowed.to_string(),
                });
            }
            Ok((name.clone(), secret_name(name, cred.spec.secret_name.as_deref())))
        })
        .collect()
}

/// The environment variable that tells agent containers where a credential's upstream is served:
/// `github` -> `MCP_GITHUB_URL`, `my.internal-api` -> `MCP_MY_INTERNAL_API_URL`.
pub fn url_env_name(credential: &str) -> String {
    let upper: String = credential
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("MCP_{upper}_URL")
}

fn pod_annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The pod with the sidecar injected, or `None` when it already has it (reinvocation and
/// re-admission are no-ops). `credentials` are `(name, secret name)` from [`authorize`].
pub fn inject(
    pod: &Pod,
    credentials: &[(String, String)],
    config: &InjectConfig,
) -> Result<Option<Pod>, Denied> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let already = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_NAME);
    if already {
        return Ok(None);
    }
    if spec.host_network == Some(true) {
        return Err(Denied::HostNetwork);
    }
    let mut env_names: BTreeMap<String, &str> = BTreeMap::new();
    for (name, _) in credentials {
        if let Some(other) = env_names.insert(url_env_name(name), name) {
            return Err(Denied::EnvCollision(
                other.to_owned(),
                name.clone(),
                url_env_name(name),
            ));
        }
    }

    let mut pod = pod.clone();
    let url_env: Vec<EnvVar> = credentials
        .iter()
        .map(|(name, _)| EnvVar {
            name: url_env_name(name),
            value: Some(format!("http://127.0.0.1:{PROXY_PORT}/{name}")),
            ..EnvVar::default()
        })
        .collect();
    let keep_token = pod_annotation(&pod, AGENT_API_ACCESS_ANNOTATION) == Some("true");
    let expose_metrics = pod_annotation(&pod, EXPOSE_METRICS_ANNOTATION) == Some("true");
    let spec = pod.spec.as_mut().expect("checked above");
    for container in &mut spec.containers {
        let env = container.env.get_or_insert_with(Vec::new);
        for var in &url_env {
            if !env.iter().any(|e| e.name == var.name) {
                env.push(var.clone());
            }
        }
    }
    if !keep_token {
        remove_service_account_token(spec);
    }

    spec.volumes.get_or_insert_with(Vec::new).push(token_volume());
    let sidecar = sidecar_container(credentials, config, expose_metrics);
    if config.native_sidecar {
        // First, so it is running (and ready, through its startup probe) before any other init
        // container or the agent starts.
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, sidecar);
    } else {
        spec.containers.push(sidecar);
    }
    let names: Vec<&str> = credentials.iter().map(|(n, _)| n.as_str()).collect();
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.into(), names.join(","));
    Ok(Some(pod))
}

/// Takes the API server's service-account token out of every container. Removing the mounts is
/// not enough: the API server re-runs its ServiceAccount plugin after a webhook changed the pod,
/// which would mount it again, unless automounting is off for the pod.
fn remove_service_account_token(spec: &mut k8s_openapi::api::core::v1::PodSpec) {
    spec.automount_service_account_token = Some(false);
    let mut removed = Vec::new();
    for container in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.retain(|m| {
                let token = m.mount_path == TOKEN_MOUNT;
                if token {
                    removed.push(m.name.clone());
                }
                !token
            });
        }
    }
    // The API server's own token volume (`kube-api-access-<random>`), now unused.
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| !(removed.contains(&v.name) && v.name.starts_with("kube-api-access-")));
    }
}

fn sidecar_container(
    credentials: &[(String, String)],
    config: &InjectConfig,
    expose_metrics: bool,
) -> Container {
    let wanted: Vec<String> = credentials
        .iter()
        .map(|(name, secret)| {
            if *secret == secret_name(name, None) {
                name.clone()
            } else {
                format!("{name}={secret}")
            }
        })
        .collect();
    let env = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("mcp-probe".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(1),
        ..Probe::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        restart_policy: config.native_sidecar.then(|| "Always".into()),
        env: Some(
            [
                Some(env(sidecar::CREDENTIALS, wanted.join(","))),
                Some(env(sidecar::LISTEN, format!("127.0.0.1:{PROXY_PORT}"))),
                Some(env(
                    sidecar::ADMIN_LISTEN,
                    format!(
                        "{}:{ADMIN_PORT}",
                        if expose_metrics { "0.0.0.0" } else { "127.0.0.1" }
                    ),
                )),
                Some(env(sidecar::PROBE_LISTEN, format!("0.0.0.0:{PROBE_PORT}"))),
                // Reports authenticate with the token of the volume below (the sidecar's default path).
                config.report_url.clone().map(|url| env(sidecar::REPORT_URL, url)),
                config.report_ca.clone().map(|ca| env(sidecar::REPORT_CA, ca)),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        ports: Some(
            [
                Some(ContainerPort {
                    name: Some("mcp-probe".into()),
                    container_port: PROBE_PORT.into(),
                    ..ContainerPort::default()
                }),
                expose_metrics.then(|| ContainerPort {
                    name: Some("mcp-metrics".into()),
                    container_port: ADMIN_PORT.into(),
                    ..ContainerPort::default()
                }),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        // The agent starts only when every credential it needs is present and unexpired.
        startup_probe: Some(Probe {
            failure_threshold: Some(300),
            ..probe("/readyz")
        }),
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            ..probe("/readyz")
        }),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..probe("/healthz")
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// A short-lived, kubelet-rotated token of the pod's service account, with the cluster CA and the
/// namespace: what the sidecar needs to watch its Secrets, even in a pod that turns automount off.
fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3600),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(k8s_openapi::api::core::v1::ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    downward_api: Some(k8s_openapi::api::core::v1::DownwardAPIProjection {
                        items: Some(vec![k8s_openapi::api::core::v1::DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                                field_path: "metadata.namespace".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::credential;

    fn pod(annotation: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "agent", "namespace": "agents",
                "labels": {INJECT_LABEL: "true"},
                "annotations": annotation.map(|a| serde_json::json!({CREDENTIALS_ANNOTATION: a})),
            },
            "spec": {
                "serviceAccountName": "research",
                "containers": [
                    {"name": "agent", "image": "agent:1", "env": [{"name": "MODE", "value": "batch"}]},
                    {"name": "tools", "image": "tools:1"}
                ]
            }
        }))
        .unwrap()
    }

    fn config(native: bool) -> InjectConfig {
        InjectConfig {
            image: "ghcr.io/mcp-credentials/sidecar:0.1.0".into(),
            native_sidecar: native,
            report_url: Some("https://mcp-credentials-webhook.mcp-system.svc/v1/report".into()),
            report_ca: Some("-----BEGIN CERTIFICATE-----\n...".into()),
        }
    }

    #[test]
    fn the_annotation_is_split_trimmed_and_deduplicated() {
        assert_eq!(
            requested_credentials(&pod(Some(" github, slack,github,"))).unwrap(),
            ["github", "slack"]
        );
        assert_eq!(requested_credentials(&pod(None)), Err(Denied::NoCredentials));
        assert_eq!(
            requested_credentials(&pod(Some(" , "))),
            Err(Denied::NoCredentials)
        );
        assert_eq!(
            requested_credentials(&pod(Some("GitHub"))),
            Err(Denied::InvalidName("GitHub".into()))
        );
    }

    #[test]
    fn a_service_account_not_in_the_access_list_is_denied_with_both_names() {
        let mut open = credential("slack", &[], None);
        open.spec.access.as_mut().unwrap().all_service_accounts = Some(true);
        let creds = [credential("github", &["coding-agent"], None), open.clone()];
        let err = authorize(&["slack".into(), "github".into()], "agents", "research", &creds).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("\"research\"")
                && message.contains("\"github\"")
                && message.contains("coding-agent")
        );
        // An empty list means nobody, until the author lists the service account (or opts the whole
        // namespace in).
        let closed = [credential("slack", &[], None)];
        let err = authorize(&["slack".into()], "agents", "research", &closed).unwrap_err();
        assert!(err.to_string().contains("no service account yet"), "{err}");
        assert!(authorize(&["slack".into()], "agents", "research", &[open]).is_ok());
    }

    #[test]
    fn a_missing_credential_is_denied_naming_it_and_the_namespace() {
        let err = authorize(&["jira".into()], "agents", "research", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "McpCredential \"jira\" (named in mcpcredentials.dev/credentials) does not exist in namespace \"agents\""
        );
    }

    #[test]
    fn a_native_sidecar_starts_first_and_every_agent_container_gets_the_urls() {
        let creds = [
            credential("github", &["research"], None),
            credential("my.api", &["research"], Some("api-token")),
        ];
        let wanted = authorize(&["github".into(), "my.api".into()], "agents", "research", &creds).unwrap();
        let out = inject(&pod(Some("github,my.api")), &wanted, &config(true))
            .unwrap()
            .unwrap();
        let spec = out.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar.name, SIDECAR_NAME);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            sidecar
                .startup_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        let env = sidecar.env.as_ref().unwrap();
        assert_eq!(env[0].value.as_deref(), Some("github,my.api=api-token"));
        let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
        assert_eq!(
            value("MCP_SIDECAR_REPORT_URL").as_deref(),
            Some("https://mcp-credentials-webhook.mcp-system.svc/v1/report")
        );
        assert!(value("MCP_SIDECAR_REPORT_CA").unwrap().starts_with("-----BEGIN"));
        // The sidecar keeps the token it reports with, at the path it reads by default.
        assert!(
            sidecar
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == TOKEN_MOUNT)
        );
        for c in &spec.containers {
            let env = c.env.as_ref().unwrap();
            assert!(
                env.iter().any(|e| e.name == "MCP_GITHUB_URL"
                    && e.value.as_deref() == Some("http://127.0.0.1:7007/github"))
            );
            assert!(
                env.iter().any(|e| e.name == "MCP_MY_API_URL"
                    && e.value.as_deref() == Some("http://127.0.0.1:7007/my.api"))
            );
        }
        assert_eq!(spec.containers.len(), 2, "no container added beside the agent's");
        assert_eq!(
            out.metadata.annotations.unwrap()[INJECTED_ANNOTATION],
            "github,my.api"
        );
    }

    #[test]
    fn before_kubernetes_1_29_the_sidecar_is_a_plain_container() {
        let wanted = [("github".to_string(), "github-mcp-credential".to_string())];
        let out = inject(&pod(Some("github")), &wanted, &config(false))
            .unwrap()
            .unwrap();
        let spec = out.spec.unwrap();
        assert!(spec.init_containers.is_none());
        let last = spec.containers.last().unwrap();
        assert_eq!(last.name, SIDECAR_NAME);
        assert_eq!(last.restart_policy, None);
    }

    #[test]
    fn the_agent_loses_its_service_account_token_unless_it_asks_to_keep_it() {
        let wanted = [("github".to_string(), "github-mcp-credential".to_string())];
        let mut with_token = pod(Some("github"));
        with_token.spec.as_mut().unwrap().containers[0].volume_mounts = Some(vec![
            VolumeMount {
                name: "kube-api-access-x".into(),
                mount_path: TOKEN_MOUNT.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "data".into(),
                mount_path: "/data".into(),
                ..VolumeMount::default()
            },
        ]);
        with_token.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: "kube-api-access-x".into(),
            ..Volume::default()
        }]);
        let out = inject(&with_token, &wanted, &config(true)).unwrap().unwrap();
        let spec = out.spec.unwrap();
        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "or the API server mounts it again"
        );
        let volumes: Vec<_> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(
            volumes,
            [TOKEN_VOLUME],
            "the API server's token volume is gone, the sidecar's is there"
        );
        let mounts: Vec<_> = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/data"], "the agent keeps its other mounts");
        let sidecar = &spec.init_containers.unwrap()[0];
        assert_eq!(
            sidecar.volume_mounts.as_ref().unwrap()[0].mount_path,
            TOKEN_MOUNT,
            "the sidecar has its own token"
        );

        with_token
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(AGENT_API_ACCESS_ANNOTATION.into(), "true".into());
        let kept = inject(&with_token, &wanted, &config(true)).unwrap().unwrap();
        assert_eq!(
            kept.spec.unwrap().containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let wanted = [("github".to_string(), "github-mcp-credential".to_string())];
        let once = inject(&pod(Some("github")), &wanted, &config(true))
            .unwrap()
            .unwrap();
        assert_eq!(inject(&once, &wanted, &config(true)).unwrap(), None);
    }

    #[test]
    fn credentials_that_would_share_an_environment_variable_are_refused() {
        let wanted = [
            ("my-api".to_string(), "a".to_string()),
            ("my.api".to_string(), "b".to_string()),
        ];
        let err = inject(&pod(Some("my-api,my.api")), &wanted, &config(true)).unwrap_err();
        assert!(matches!(err, Denied::EnvCollision(..)), "{err}");
    }

    #[test]
    fn the_sidecar_meets_the_restricted_pod_security_profile() {
        let wanted = [("github".to_string(), "github-mcp-credential".to_string())];
        let out = inject(&pod(Some("github")), &wanted, &config(true))
            .unwrap()
            .unwrap();
        let sc = out.spec.unwrap().init_containers.unwrap()[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn a_host_network_pod_is_denied_because_its_loopback_is_the_nodes() {
        let mut host = pod(Some("github"));
        host.spec.as_mut().unwrap().host_network = Some(true);
        let wanted = [("github".to_string(), "github-mcp-credential".to_string())];
        let err = inject(&host, &wanted, &config(true)).unwrap_err();
        assert_eq!(err, Denied::HostNetwork);
        assert!(err.to_string().contains("hostNetwork"), "{err}");
    }

    #[test]
    fn only_the_probes_listen_on_the_pod_ip_unless_the_pod_exposes_metrics() {
        let env_of = |pod: &Pod, name: &str| {
            let sidecar = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
            sidecar
                .env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        let wanted = [("github".to_string(), "github-mcp-credential".to_string())];
        let out = inject(&pod(Some("github")), &wanted, &config(true))
            .unwrap()
            .unwrap();
        assert_eq!(
            env_of(&out, "MCP_SIDECAR_ADMIN_LISTEN").as_deref(),
            Some("127.0.0.1:7008")
        );
        assert_eq!(
            env_of(&out, "MCP_SIDECAR_PROBE_LISTEN").as_deref(),
            Some("0.0.0.0:7009")
        );
        let sidecar = &out.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        let ports: Vec<_> = sidecar.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, [7009]);

        let mut exposed = pod(Some("github"));
        exposed
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(EXPOSE_METRICS_ANNOTATION.into(), "true".into());
        let out = inject(&exposed, &wanted, &config(true)).unwrap().unwrap();
        assert_eq!(
            env_of(&out, "MCP_SIDECAR_ADMIN_LISTEN").as_deref(),
            Some("0.0.0.0:7008")
        );
    }
}

//! Helpers for tests that run against the real control plane started by `tests/control-plane`.
//!
//! Every test binary shares one control plane (started on first use, reused after; `tests/run`
//! stops it at the end). Tests isolate themselves with [`ControlPlane::namespace`].

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

/// The root of this repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A running kube-apiserver with etcd and kube-controller-manager, and the tools built with them.
#[derive(Debug)]
pub struct ControlPlane {
    /// An admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// The folder holding `kubectl`, `helm`, `kube-apiserver`, `etcd`.
    pub bin_dir: PathBuf,
}

/// The shared control plane, started if it is not running (`tests/control-plane up`).
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let out = Command::new(repo_root().join("tests/control-plane"))
            .arg("up")
            .output()
            .expect("run tests/control-plane up");
        assert!(
            out.status.success(),
            "tests/control-plane up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let export = |name: &str| -> PathBuf {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("tests/control-plane up printed no {name}: {stdout}"))
                .into()
        };
        ControlPlane {
            kubeconfig: export("KUBECONFIG"),
            bin_dir: export("MCP_TOOLS_BIN"),
        }
    })
}

/// What a command printed, and whether it succeeded.
#[derive(Debug)]
pub struct Outcome {
    /// True when the command exited 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl ControlPlane {
    /// Runs one of the built tools (`kubectl`, `helm`) with this control plane's kubeconfig.
    pub fn tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Outcome {
        use std::io::Write;
        let mut child = Command::new(self.bin_dir.join(tool))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(stdin.unwrap_or("").as_bytes())
            .expect("write stdin");
        drop(input);
        let out = child.wait_with_output().expect("wait for tool");
        Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `kubectl` with `args`.
    pub fn kubectl(&self, args: &[&str]) -> Outcome {
        self.tool("kubectl", args, None)
    }

    /// `kubectl apply -f -` of `yaml` in `namespace`.
    pub fn apply(&self, namespace: &str, yaml: &str) -> Outcome {
        self.tool("kubectl", &["apply", "-n", namespace, "-f", "-"], Some(yaml))
    }

    /// The documents `helm template` renders from the chart (charts/mcp-credentials) with `args`
    /// added (`--set key=value`, ...); the test fails if helm does.
    pub fn rendered_chart(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let chart = repo_root().join("charts/mcp-credentials");
        let mut all = vec!["template", "mcpc", chart.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.tool("helm", &all, None);
        assert!(out.success, "helm template {args:?}: {}", out.stderr);
        serde_yaml::Deserializer::from_str(&out.stdout)
            .filter_map(|d| serde::Deserialize::deserialize(d).ok())
            .filter(|d: &serde_json::Value| !d.is_null())
            .collect()
    }

    /// Installs (or updates) the CRDs from `crds/` and waits until they are served.
    pub fn install_crds(&self) {
        let dir = repo_root().join("crds");
        let out = self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            dir.to_str().unwrap(),
        ]);
        assert!(out.success, "applying crds/ failed: {}", out.stderr);
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/mcpcredentials.mcpcredentials.dev",
        ]);
        assert!(out.success, "the CRD was not established: {}", out.stderr);
    }

    /// Creates a namespace of its own for one test: `<prefix>-<pid>-<n>`.
    pub fn namespace(&self, prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = self.kubectl(&["create", "namespace", &name]);
        assert!(out.success, "creating namespace {name} failed: {}", out.stderr);
        name
    }

    /// A kube client for this control plane, with the admin identity.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kubeconfig to config");
        kube::Client::try_from(config).expect("kube client")
    }
}

/// A TCP fault proxy (reset or blackhole all traffic on command) for fault-injection tests.
pub mod fault_proxy;

/// A typed builder for the McpCredentials the tests apply.
pub mod credential;

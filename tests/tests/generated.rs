//! Generated files are regenerated, never hand-edited: each must equal what the code prints now.

use mcp_credentials_e2e::repo_root;

#[test]
fn crds_directory_matches_the_code() {
    let committed = std::fs::read_to_string(repo_root().join("crds/mcpcredentials.yaml")).unwrap_or_default();
    assert!(
        committed == mcp_credentials_core::crds_yaml(),
        "crds/mcpcredentials.yaml drifted from core/src/crd.rs; regenerate it with:\n  \
         cargo run -q -p mcp-credentials-operator -- crd > crds/mcpcredentials.yaml"
    );
}

#[test]
fn the_charts_crds_and_values_schema_match_their_sources() {
    let out = std::process::Command::new(repo_root().join("tests/generate"))
        .arg("--check")
        .output()
        .expect("run tests/generate --check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

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
fn the_charts_copy_of_the_crds_matches_crds_directory() {
    // The chart templates the CRDs behind `crds.enabled`; its copy is the crds/ file wrapped in a
    // condition, so compare the body.
    let chart = repo_root().join("charts/mcp-credentials/templates/crds/mcpcredentials.yaml");
    let Ok(copy) = std::fs::read_to_string(&chart) else {
        assert!(
            !repo_root().join("charts/mcp-credentials").exists(),
            "the chart has no CRD copy at {chart:?}"
        );
        return;
    };
    let crd = mcp_credentials_core::crds_yaml();
    let body = crd.split_once("---\n").map(|(_, b)| b).unwrap_or(&crd);
    assert!(
        copy.contains(body),
        "{chart:?} drifted from crds/; regenerate it with tests/generate"
    );
}

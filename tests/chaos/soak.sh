#!/usr/bin/env bash
# The chaos soak (tests/tests/chaos_soak.rs) for as long as you like: 20-second tokens, ten MCP
# servers from the official Rust SDK and one taking an API key, two operator replicas (each behind
# its own TCP fault proxy), the sidecar, twenty-two MCP clients and a slow tenant (16 credentials
# whose 1,000 authorization servers never answer), while every 115 s it restarts the OAuth server,
# floods the operators' metrics and the sidecar's admin listeners with 2,000 idle and half-sent
# connections, kills the operator leader, restarts kube-apiserver, deletes an output Secret by hand,
# stops the OAuth server for 25 s, makes every API connection of the operators fail for 10 s right
# after a rotating refresh token is answered, blackholes the leader's API connections and rotates
# the API key. Prints the client-visible failures by cause and event, scans every log for token
# bytes, and exits non-zero when a goal is missed (see the test's header). tests/run runs one
# 115-second round of the same test.
#
#   tests/chaos/soak.sh [seconds]     default 460 (four rounds)
#
# Keeps the run's logs and report (the test prints where). Starts the control plane if it is not running (and stops it again); uses CARGO_TARGET_DIR if set.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
seconds=${1:-460}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: tests/chaos/soak.sh [seconds]" >&2; exit 64; }

started_here=false
if ! tests/control-plane status >/dev/null 2>&1; then started_here=true; fi
eval "$(tests/control-plane up)"
if $started_here; then trap 'tests/control-plane down' EXIT; fi

# Build first, so the soak's clock does not include compiling.
cargo test -q -p mcp-credentials-e2e --test chaos_soak --no-run
MCP_SOAK_SECONDS=$seconds MCP_SOAK_KEEP=1 cargo test -q -p mcp-credentials-e2e --test chaos_soak -- --nocapture

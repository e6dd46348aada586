#!/usr/bin/env bash
# Runs the main job offline: a demo MCP server that wants an API key, the sidecar in standalone mode
# attaching that key, and one MCP tool call through the sidecar with no credential on the client side.
# Leaves both running until Ctrl-C. Needs only cargo and curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p mcp-credentials-sidecar --bin mcp-credentials-sidecar --example demo-upstream
target="${CARGO_TARGET_DIR:-target}/debug"
"$target/examples/demo-upstream" 127.0.0.1:8931 examples/standalone/secrets/demo-api-key/api-key &
upstream=$!
"$target/mcp-credentials-sidecar" standalone examples/standalone/mcpcredentials.yaml examples/standalone/secrets &
sidecar=$!
trap 'kill $sidecar $upstream 2>/dev/null' EXIT
until curl -sf http://127.0.0.1:7008/readyz >/dev/null; do sleep 0.2; done

echo "--- tools/call echo through http://127.0.0.1:7007/demo/mcp (the client sends no API key):"
curl -sS http://127.0.0.1:7007/demo/mcp \
  -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
  -H 'mcp-protocol-version: 2025-03-26' \
  -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello through the sidecar"}}}'
echo
echo "--- The sidecar is serving http://127.0.0.1:7007/demo/mcp (metrics: http://127.0.0.1:7008/metrics). Ctrl-C stops."
wait $sidecar

#!/usr/bin/env bash
# Benchmark of the operator against the real control plane and the real OAuth server
# (oidc-provider): N McpCredentials (default 1000) with T-second tokens (default 60).
# Reports: time until all are Ready, token requests and API writes per refresh over an observation
# window (default 150 s: several refresh cycles), operator CPU seconds and peak RSS.
# Usage: tests/bench/operator-refresh.sh [count] [ttl-seconds] [observe-seconds]
# Not a test: numbers depend on the machine. It cleans up what it starts.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
count=${1:-1000}
ttl=${2:-60}
observe=${3:-150}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d)
pids=()
ns="bench-$$"
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "==> building the operator (release)"
cargo build -q --release -p mcp-credentials-operator
bin=$CARGO_TARGET_DIR/release/mcp-credentials-operator
tests/oauth-server/install
eval "$(tests/control-plane up)"
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/mcpcredentials.mcpcredentials.dev >/dev/null

# The operator authenticates with a service-account token (rustls refuses the admin cert, X.509 v1).
kubectl create namespace "$ns" >/dev/null
kubectl create serviceaccount operator -n "$ns" >/dev/null
kubectl create clusterrolebinding "$ns-operator" --clusterrole=cluster-admin --serviceaccount="$ns:operator" >/dev/null
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')
token=$(kubectl create token operator -n "$ns" --duration=2h)
cat > "$work/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "$server", certificate-authority: "$ca"}}]
users: [{name: operator, user: {token: "$token"}}]
contexts: [{name: test, context: {cluster: test, user: operator}}]
current-context: test
KC

echo "==> OAuth server (oidc-provider), ${ttl}s tokens"
node tests/oauth-server/server.mjs 0 "$ttl" > "$work/oauth.out" 2>/dev/null &
pids+=($!)
for _ in $(seq 50); do grep -q ready "$work/oauth.out" 2>/dev/null && break; sleep 0.2; done
oport=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["port"])' "$work/oauth.out")
tokens() { curl -s "http://127.0.0.1:$oport/test/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_requests"])'; }

echo "==> $count McpCredentials in namespace $ns"
kubectl create secret generic idp -n "$ns" --from-literal=secret=cc-basic-secret >/dev/null
python3 - "$count" "$oport" > "$work/creds.yaml" <<'PY'
import sys
n, port = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print(f"""---
apiVersion: mcpcredentials.dev/v1alpha1
kind: McpCredential
metadata: {{name: cred-{i}}}
spec:
  upstream: http://127.0.0.1:9/mcp-{i}
  source: {{oauth2: {{grant: clientCredentials, tokenUrl: "http://127.0.0.1:{port}/token", clientId: cc-basic, clientSecret: {{name: idp, key: secret}}}}}}""")
PY
kubectl apply --server-side -n "$ns" -f "$work/creds.yaml" >/dev/null

echo "==> operator"
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KUBECONFIG=$work/kubeconfig RUST_LOG=warn "$bin" --namespace "$ns" --listen "127.0.0.1:$mport" \
    --leader-election false 2> "$work/operator.log" &
op=$!
pids+=($op)
start=$(date +%s.%N)
metric() { curl -s "http://127.0.0.1:$mport/metrics" | awk -v s="$1" 'index($0, s" ")==1 {print $2; f=1} END {if (!f) print 0}'; }
ready() { curl -s "http://127.0.0.1:$mport/metrics" | grep -c '^mcp_credentials_credential_ready{.*} 1$' || true; }
while :; do
    r=$(ready)
    [ "$r" -ge "$count" ] && break
    if ! kill -0 $op 2>/dev/null; then echo "the operator exited:"; tail "$work/operator.log"; exit 1; fi
    sleep 0.5
done
all_ready=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
echo "all $count Ready after ${all_ready}s"

s_w='mcp_credentials_kube_api_requests_total{method="PATCH",resource="secrets"}'
st_w='mcp_credentials_kube_api_requests_total{method="PATCH",resource="mcpcredentials/status"}'
ok='mcp_credentials_refreshes_total{result="success"}'
t0=$(tokens); sw0=$(metric "$s_w"); stw0=$(metric "$st_w"); ok0=$(metric "$ok")
echo "==> observing ${observe}s of steady-state refreshes"
sleep "$observe"
t1=$(tokens); sw1=$(metric "$s_w"); stw1=$(metric "$st_w"); ok1=$(metric "$ok")
errors=$(curl -s "http://127.0.0.1:$mport/metrics" | grep '^mcp_credentials_refreshes_total{result="[a-z_]*error' || true)
read -r utime stime < <(awk '{print $14, $15}' /proc/$op/stat)
hz=$(getconf CLK_TCK)
rss=$(awk '/VmHWM/ {print $2}' /proc/$op/status)
python3 - <<PY
refreshes = $ok1 - $ok0
print(f"refreshes in window:          {refreshes:.0f}")
if refreshes:
    print(f"token requests per refresh:   {($t1 - $t0) / refreshes:.3f}")
    print(f"Secret writes per refresh:    {($sw1 - $sw0) / refreshes:.3f}")
    print(f"status writes per refresh:    {($stw1 - $stw0) / refreshes:.3f}")
print(f"time until all Ready:         $all_ready s")
print(f"operator CPU seconds (total): {($utime + $stime) / $hz:.1f}")
print(f"operator peak RSS:            {$rss / 1024:.1f} MiB")
PY
[ -n "$errors" ] && echo "failures: $errors"
echo "operator warnings: $(grep -c WARN "$work/operator.log" || true)"

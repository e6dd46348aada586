#!/usr/bin/env bash
# Benchmark of the operator against the real control plane and the real OAuth server
# (oidc-provider): N McpCredentials (default 1000) with T-second tokens (default 60).
# Reports: time until all are Ready, token requests and API writes per refresh over an observation
# window (default 150 s: several refresh cycles), operator CPU seconds and peak RSS; then the token
# requests of a restart (until all are Ready again) beside the refreshes that fell due meanwhile.
# With U unrelated Secrets (default 0), the operator watches every namespace (as a cluster-wide
# install does; `--selector` keeps it to the bench's credentials) and, after the first window, U
# Secrets of 10 KiB are created in another namespace; a second window reports the same numbers and
# the resident memory before and after them.
# Each window also lists the operator's API requests per refresh by verb and resource.
# Usage: tests/bench/operator-refresh.sh [count] [ttl-seconds] [observe-seconds] [unrelated]
# MCP_CREDENTIALS_CONCURRENCY sets --concurrency (as for the operator; also the namespace's limit);
# OPERATOR_BIN runs that operator binary instead of building this checkout's.
# Not a test: numbers depend on the machine. It cleans up what it starts.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
count=${1:-1000}
ttl=${2:-60}
observe=${3:-150}
unrelated=${4:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
work=$(mktemp -d)
pids=()
ns="bench-$$"
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    kubectl delete namespace "$ns" "$ns-unrelated" --wait=false >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

if [ -n "${OPERATOR_BIN:-}" ]; then
    bin=$OPERATOR_BIN
else
    echo "==> building the operator (release)"
    cargo build -q --release -p mcp-credentials-operator
    bin=$CARGO_TARGET_DIR/release/mcp-credentials-operator
fi
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
python3 - "$count" "$oport" "$ns" > "$work/creds.yaml" <<'PY'
import sys
n, port, ns = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for i in range(n):
    print(f"""---
apiVersion: mcpcredentials.dev/v1alpha1
kind: McpCredential
metadata: {{name: cred-{i}, labels: {{bench: {ns}}}}}
spec:
  upstream: http://127.0.0.1:9/mcp-{i}
  source: {{oauth2: {{grant: clientCredentials, tokenUrl: "http://127.0.0.1:{port}/token", clientId: cc-basic, clientSecret: {{name: idp, key: secret}}}}}}""")
PY
kubectl apply --server-side -n "$ns" -f "$work/creds.yaml" >/dev/null

if [ "$unrelated" -gt 0 ]; then
    # Every namespace, as a cluster-wide install; the bench's credentials only. One namespace
    # holds them all: no per-namespace refresh limit below --concurrency.
    scope=(--selector "bench=$ns" --namespace-concurrency "${MCP_CREDENTIALS_CONCURRENCY:-16}")
else
    scope=(--namespace "$ns")
fi
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_operator() {
    KUBECONFIG=$work/kubeconfig RUST_LOG=warn "$bin" "${scope[@]}" --listen "127.0.0.1:$mport" \
        --leader-election false 2>> "$work/operator.log" &
    op=$!
    pids+=($op)
    start=$(date +%s.%N)
}
metric() { curl -s "http://127.0.0.1:$mport/metrics" | awk -v s="$1" 'index($0, s" ")==1 {print $2; f=1} END {if (!f) print 0}'; }
ready() { curl -s "http://127.0.0.1:$mport/metrics" | grep -c '^mcp_credentials_credential_ready{.*} 1$' || true; }
wait_ready() {
    while :; do
        r=$(ready)
        [ "$r" -ge "$count" ] && break
        if ! kill -0 $op 2>/dev/null; then echo "the operator exited:"; tail "$work/operator.log"; exit 1; fi
        sleep 0.5
    done
    all_ready=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
}
rss_now() { awk '/VmRSS/ {print $2}' /proc/$op/status; }

echo "==> operator (${scope[*]})"
start_operator
wait_ready
echo "all $count Ready after ${all_ready}s"

s_w='mcp_credentials_kube_api_requests_total{method="PATCH",resource="secrets"}'
st_w='mcp_credentials_kube_api_requests_total{method="PATCH",resource="mcpcredentials/status"}'
ok='mcp_credentials_refreshes_total{result="success"}'
api_requests() { curl -s "http://127.0.0.1:$mport/metrics" | grep '^mcp_credentials_kube_api_requests_total{' > "$1" || true; }
# One observation window: refreshes, and token requests and API writes per refresh.
window() {
    local t0 sw0 stw0 ok0 t1 sw1 stw1 ok1
    t0=$(tokens); sw0=$(metric "$s_w"); stw0=$(metric "$st_w"); ok0=$(metric "$ok")
    api_requests "$work/api0"
    echo "==> observing ${observe}s of steady-state refreshes ($1)"
    sleep "$observe"
    t1=$(tokens); sw1=$(metric "$s_w"); stw1=$(metric "$st_w"); ok1=$(metric "$ok")
    api_requests "$work/api1"
    python3 - "$work/api0" "$work/api1" <<PY
import sys
refreshes = $ok1 - $ok0
print(f"refreshes in window:          {refreshes:.0f}")
if refreshes:
    print(f"token requests per refresh:   {($t1 - $t0) / refreshes:.3f}")
    print(f"Secret writes per refresh:    {($sw1 - $sw0) / refreshes:.3f}")
    print(f"status writes per refresh:    {($stw1 - $stw0) / refreshes:.3f}")
    def read(path):
        return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in open(path) if l.strip()}
    a, b = read(sys.argv[1]), read(sys.argv[2])
    for k in sorted(b):
        if b[k] - a.get(k, 0):
            print(f"  API requests per refresh, {k.split('{', 1)[1].rstrip('}')}: {(b[k] - a.get(k, 0)) / refreshes:.3f}")
PY
}
window "$count credentials"
rss_before=$(rss_now)
echo "operator RSS now:             $(python3 -c "print(round($rss_before / 1024, 1))") MiB"

if [ "$unrelated" -gt 0 ]; then
    echo "==> $unrelated unrelated Secrets of 10 KiB in namespace $ns-unrelated"
    kubectl create namespace "$ns-unrelated" >/dev/null
    python3 - "$unrelated" "$ns-unrelated" "$work" <<'PY'
import base64, json, os, sys
n, ns, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for start in range(0, n, 500):
    items = [{"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": f"unrelated-{i}", "namespace": ns},
              "data": {"blob": base64.b64encode(os.urandom(10 * 1024)).decode()}}
             for i in range(start, min(n, start + 500))]
    with open(f"{work}/unrelated-{start:06d}.json", "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
PY
    for f in "$work"/unrelated-*.json; do kubectl create -f "$f" -o name >/dev/null; rm -f "$f"; done
    window "beside $unrelated unrelated Secrets"
    rss_after=$(rss_now)
    python3 - <<PY
print(f"operator RSS before/after:    {$rss_before / 1024:.1f} / {$rss_after / 1024:.1f} MiB ({($rss_after - $rss_before) / $rss_before * 100:+.1f} %)")
PY
fi

errors=$(curl -s "http://127.0.0.1:$mport/metrics" | grep '^mcp_credentials_refreshes_total{result="[a-z_]*error' || true)
read -r utime stime < <(awk '{print $14, $15}' /proc/$op/stat)
hz=$(getconf CLK_TCK)
rss=$(awk '/VmHWM/ {print $2}' /proc/$op/status)
python3 - <<PY
print(f"time until all Ready:         $all_ready s")
print(f"operator CPU seconds (total): {($utime + $stime) / $hz:.1f}")
print(f"operator peak RSS:            {$rss / 1024:.1f} MiB")
PY
[ -n "$errors" ] && echo "failures: $errors"
echo "operator warnings: $(grep -c WARN "$work/operator.log" || true)"

echo "==> restart"
kill -TERM "$op"
wait "$op" 2>/dev/null || true
kubectl get mcpcredentials -n "$ns" -o json > "$work/before.json"
t0=$(tokens)
start_operator
wait_ready
t1=$(tokens)
kubectl get mcpcredentials -n "$ns" -o json > "$work/after.json"
# A refresh by the new process before the renewal time the old one had set was not due.
early=$(python3 - "$work/before.json" "$work/after.json" <<'PY'
import json, sys
from datetime import datetime
def times(path, field):
    return {c["metadata"]["name"]: datetime.fromisoformat(c["status"][field].replace("Z", "+00:00"))
            for c in json.load(open(path))["items"] if c.get("status", {}).get(field)}
renewal = times(sys.argv[1], "renewalTime")
last_before, last_after = times(sys.argv[1], "lastRefreshTime"), times(sys.argv[2], "lastRefreshTime")
print(sum(1 for n, t in last_after.items()
          if t != last_before.get(n) and n in renewal and (renewal[n] - t).total_seconds() > 1))
PY
)
echo "all $count Ready again after ${all_ready}s; token requests meanwhile: $((t1 - t0)), of them before the credential's renewal time: $early"

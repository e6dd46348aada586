# The e2e test's agent (busybox sh): an MCP client with no credential of its own. It reads the URL
# of the credential named by $1 from $MCP_<NAME>_URL (set by the injected sidecar's webhook), opens
# a Streamable HTTP session and calls the `sum` tool once a second, printing one line per call:
# `agent: call <n> ok` or `agent: call <n> failed: <why>` (a failed call opens a new session).
# No wget -T: busybox-static 1.35 (Debian 12) wget segfaults with it.
bb=/bin/busybox
var=$1
eval "url=\${$var:-}"
if [ -z "$url" ]; then
    echo "agent: \$$var is not set"
    exit 1
fi
echo "agent: calling $url (\$$var)"
if [ -e /var/run/secrets/kubernetes.io/serviceaccount/token ]; then
    echo "agent: has a service-account token"
else
    echo "agent: no service-account token"
fi
session=""

# POSTs a JSON-RPC message; prints the server's headers (wget -S) and body.
post() {
    if [ -n "$session" ]; then
        $bb wget -q -S -O - --header "Content-Type: application/json" \
            --header "Accept: application/json, text/event-stream" \
            --header "Mcp-Session-Id: $session" --post-data "$1" "$url" 2>&1
    else
        $bb wget -q -S -O - --header "Content-Type: application/json" \
            --header "Accept: application/json, text/event-stream" --post-data "$1" "$url" 2>&1
    fi
}

open_session() {
    session=""
    out=$(post '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e-agent","version":"1"}}}') || {
        echo "agent: initialize failed: $(echo "$out" | $bb grep -m1 -i 'HTTP/\|wget:')"
        return 1
    }
    session=$(echo "$out" | $bb sed -n 's/^ *[Mm]cp-[Ss]ession-[Ii]d: *\([^ \r]*\).*/\1/p' | $bb head -1)
    post '{"jsonrpc":"2.0","method":"notifications/initialized"}' >/dev/null || true
    echo "agent: session open"
}

n=0
while true; do
    n=$((n + 1))
    if [ -z "$session" ] && ! open_session; then
        echo "agent: call $n failed: no session"
        $bb sleep 1
        continue
    fi
    if out=$(post '{"jsonrpc":"2.0","id":'$((n + 1))',"method":"tools/call","params":{"name":"sum","arguments":{"a":'$n',"b":1}}}'); then
        if echo "$out" | $bb grep -q "\"text\":\"$((n + 1))\""; then
            echo "agent: call $n ok"
        else
            echo "agent: call $n failed: wrong answer: $(echo "$out" | $bb grep -m1 data:)"
            session=""
        fi
    else
        echo "agent: call $n failed: $(echo "$out" | $bb grep -m1 -i 'HTTP/\|wget:')"
        session=""
    fi
    $bb sleep 1
done

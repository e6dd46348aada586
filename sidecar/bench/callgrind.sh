#!/usr/bin/env bash
# User-space instructions per proxied request, counted with callgrind (repeatable on a busy machine,
# unlike times): the upstream, then the target under valgrind, wrk for a warm-up, counters zeroed,
# wrk -c$BENCH_CONNECTIONS for the measured part, counters dumped.
#   sidecar/bench/callgrind.sh [sidecar|nginx] [sidecar binary]
# BENCH_UPSTREAM=http|https|h2 picks the upstream as in run.sh.
# Needs valgrind, nginx, wrk, curl; run after sidecar/bench/run.sh has built the release binaries.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/nginx-conf.sh"
. "$(dirname "${BASH_SOURCE[0]}")/tls-upstream.sh"
target=${1:-sidecar}
bin="${CARGO_TARGET_DIR:-target}/release"
sidecar_bin=${2:-$bin/mcp-credentials-sidecar}
conns=${BENCH_CONNECTIONS:-16}
up_port=18090 port=18091 admin_port=18092
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 600); do curl -sk -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 never answered" >&2; exit 1; }

upstream_mode=${BENCH_UPSTREAM:-http} up_scheme=http up_args=()
if [ "$upstream_mode" != http ]; then
    tls_upstream_certs "$work/tls"
    up_scheme=https up_args=(--tls "$work/tls/leaf.pem" "$work/tls/leaf.key" "${upstream_mode/https/h1}")
    export NGINX_UPSTREAM_CA=$work/tls/ca.pem MCP_SIDECAR_EXTRA_CA_FILE=$work/tls/ca.pem
fi
"$bin/examples/bench-upstream" "127.0.0.1:$up_port" 2 "${up_args[@]}" & pids+=($!)
wait_http "$up_scheme://127.0.0.1:$up_port/"
mkdir -p "$work/credentials/bench" "$work/nginx"
printf '%s://127.0.0.1:%s' "$up_scheme" "$up_port" > "$work/credentials/bench/upstream"
printf 'bench-key' > "$work/credentials/bench/header.X-API-Key"
printf '1' > "$work/credentials/bench/version"
out="$work/callgrind.out"
if [ "$target" = nginx ]; then
    write_nginx_conf "$work/nginx" 1 "$port" "$up_port" $'master_process off;\ndaemon off;'
    valgrind --tool=callgrind --callgrind-out-file="$out" nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>"$work/vg.log" & vg=$!
else
    MCP_SIDECAR_LISTEN=127.0.0.1:$port MCP_SIDECAR_ADMIN_LISTEN=127.0.0.1:$admin_port \
    MCP_SIDECAR_CREDENTIALS_DIR="$work/credentials" MCP_SIDECAR_WORKER_THREADS=1 MCP_SIDECAR_LOG=warn \
        valgrind --tool=callgrind --callgrind-out-file="$out" "$sidecar_bin" 2>"$work/vg.log" & vg=$!
fi
pids+=($vg)
url="http://127.0.0.1:$port/bench/x"
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" = 200 ]; do sleep 0.2; done
wrk -t1 -c"$conns" -d2s "$url" >/dev/null
callgrind_control -z "$vg" >/dev/null 2>&1
requests=$(wrk -t1 -c"$conns" -d4s "$url" | awk '/requests in/ {print $1}')
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 1
total=0
for f in "$out".*; do
    n=$(awk '/^summary:/ {print $2} /^totals:/ {print $2}' "$f" | head -1)
    total=$((total + ${n:-0}))
done
[ -n "${CALLGRIND_KEEP:-}" ] && cp "$out".* "$CALLGRIND_KEEP"/
echo "$target ($upstream_mode upstream): $requests requests, $total instructions, $((total / requests)) per request"

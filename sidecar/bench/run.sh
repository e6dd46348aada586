#!/usr/bin/env bash
# Benchmark, side by side in one run on this machine: no proxy, nginx (Debian package, injecting the
# same static header, upstream keep-alive) and the sidecar (release build), each limited to the same
# number of workers (nginx worker_processes = sidecar MCP_SIDECAR_WORKER_THREADS = 1, then 2), in front
# of one small upstream that refuses requests without the header. Load: wrk, keep-alive, 1/16/64
# connections, BENCH_DURATION each (default 3s), BENCH_REPEAT rounds (default 3) taking the targets in
# turn, each round starting with the next one, so that load from other processes hits all of them alike
# and no target always runs right after the same other; each cell is the median of the rounds, and the
# spread column gives the lowest and highest req/s. Then an SSE stream of timestamped
# events per target. Loopback only. Needs: cargo, nginx, wrk, curl, openssl (`apt-get install -y nginx wrk curl`).
# BENCH_UPSTREAM picks the upstream: `http` (default), `https` (TLS 1.3 from a local CA, HTTP/1.1 by
# ALPN) or `h2` (the same, HTTP/2 offered first: the sidecar takes it, nginx speaks HTTP/1.1 to
# upstreams). Over TLS, "none" is wrk talking TLS to the upstream itself.
#
#   sidecar/bench/run.sh            prints a Markdown report (also written to $BENCH_OUT if set)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/nginx-conf.sh"
. "$(dirname "${BASH_SOURCE[0]}")/tls-upstream.sh"
cd "$(dirname "$0")/../.."
duration=${BENCH_DURATION:-3s}
conns=${BENCH_CONNECTIONS:-"1 16 64"}
workers=${BENCH_WORKERS:-"1 2"}
sse_events=${BENCH_SSE_EVENTS:-200}
repeat=${BENCH_REPEAT:-3}
upstream_mode=${BENCH_UPSTREAM:-http}
case $upstream_mode in http | https | h2) ;; *) echo "bench: BENCH_UPSTREAM is http, https or h2, not $upstream_mode" >&2; exit 1 ;; esac
up_port=18080 nginx_port=18081 sidecar_port=18082 admin_port=18083

for tool in nginx wrk curl cargo; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install -y nginx wrk curl)" >&2; exit 1; }
done
cargo build -q --release -p mcp-credentials-sidecar --bin mcp-credentials-sidecar --example bench-upstream --example bench-sse
bin="${CARGO_TARGET_DIR:-target}/release"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_http() { for _ in $(seq 1 100); do curl -s "${curl_tls[@]}" -o /dev/null "$1" && return 0; sleep 0.1; done; echo "bench: $1 never answered" >&2; exit 1; }
# Resident memory in KiB (VmRSS, or VmHWM = peak) of a process and its children (nginx workers).
mem() { local f=$2 total=0 p; for p in $1 $(pgrep -P "$1" || true); do total=$((total + $(awk -v f="$f:" '$1==f{print $2}' /proc/$p/status))); done; echo $total; }
# CPU time in clock ticks (user + system) of a process and its children.
cpu() { local total=0 p; for p in $1 $(pgrep -P "$1" || true); do total=$((total + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $total; }
# The median of numbers given as arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {m = int((NR + 1) / 2); if (NR % 2) print v[m]; else print (v[m] + v[m + 1]) / 2}'; }
# "lowest–highest" of numbers given as arguments, without decimals.
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.0f–%.0f", lo, hi}'; }
# wrk's "50%  12.34us" to microseconds.
us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n }'; }

up_scheme=http up_args=() curl_tls=()
if [ "$upstream_mode" != http ]; then
    tls_upstream_certs "$work/tls"
    up_scheme=https up_args=(--tls "$work/tls/leaf.pem" "$work/tls/leaf.key" "${upstream_mode/https/h1}")
    curl_tls=(--cacert "$work/tls/ca.pem")
    export NGINX_UPSTREAM_CA=$work/tls/ca.pem MCP_SIDECAR_EXTRA_CA_FILE=$work/tls/ca.pem BENCH_CA=$work/tls/ca.pem
fi
"$bin/examples/bench-upstream" "127.0.0.1:$up_port" 2 "${up_args[@]}" & pids+=($!)
wait_http "$up_scheme://127.0.0.1:$up_port/"

# The sidecar's credential, as a projected Secret volume would lay it out.
mkdir -p "$work/credentials/bench"
printf '%s://127.0.0.1:%s' "$up_scheme" "$up_port" > "$work/credentials/bench/upstream"
printf 'bench-key' > "$work/credentials/bench/header.X-API-Key"
printf '1' > "$work/credentials/bench/version"

start_nginx() {
    write_nginx_conf "$work/nginx" "$1" "$nginx_port" "$up_port"
    nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' & nginx_pid=$!
    pids+=($nginx_pid)
    wait_http "http://127.0.0.1:$nginx_port/bench/"
}

start_sidecar() {
    MCP_SIDECAR_LISTEN=127.0.0.1:$sidecar_port MCP_SIDECAR_ADMIN_LISTEN=127.0.0.1:$admin_port \
    MCP_SIDECAR_CREDENTIALS_DIR="$work/credentials" MCP_SIDECAR_WORKER_THREADS=$1 MCP_SIDECAR_LOG=warn \
        "$bin/mcp-credentials-sidecar" & sidecar_pid=$!
    pids+=($sidecar_pid)
    wait_http "http://127.0.0.1:$admin_port/readyz"
    until curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null; do sleep 0.1; done
}

declare -A url=(
    [none]="$up_scheme://127.0.0.1:$up_port/bench/x"
    [nginx]="http://127.0.0.1:$nginx_port/bench/x"
    [sidecar]="http://127.0.0.1:$sidecar_port/bench/x"
)
report="$work/report.md"
{
    echo "## mcp-credentials sidecar benchmark, $upstream_mode upstream"
    echo
    echo "$(date -u +%FT%TZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(nginx -v 2>&1), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $duration per run, $repeat rounds (medians), wrk -t1, keep-alive, load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
    [ "$upstream_mode" = http ] || echo "Upstream: TLS 1.3 (ECDSA P-256, a local CA the proxies verify), ALPN $([ "$upstream_mode" = h2 ] && echo 'h2, http/1.1' || echo 'http/1.1'); nginx: proxy_pass https:// with keepalive, proxy_ssl_session_reuse on, proxy_http_version 1.1."
    echo "The upstream (2 threads) answers 401 without the injected header; every run below had 0 non-2xx answers unless noted."
} > "$report"

for w in $workers; do
    start_nginx "$w"
    start_sidecar "$w"
    declare -A pid=([none]="" [nginx]=$nginx_pid [sidecar]=$sidecar_pid)
    declare -A idle=([nginx]=$(mem "$nginx_pid" VmRSS) [sidecar]=$(mem "$sidecar_pid" VmRSS))
    {
        echo
        echo "### $w worker(s)"
        echo
        echo "| target | conns | req/s | req/s spread | p50 µs | p99 µs | req/s vs nginx | p99 vs nginx | p50 added vs none µs | CPU s / 100k req | CPU vs nginx |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|"
    } >> "$report"
    for c in $conns; do
        declare -A all_rps=() all_p50=() all_p99=() all_cpu=()
        for round in $(seq 0 $((repeat - 1))); do
            # Each round starts with another target, so that no target always runs after the same one.
            order=(none nginx sidecar none nginx)
            for t in "${order[@]:$((round % 3)):3}"; do
                before=0; [ -n "${pid[$t]}" ] && before=$(cpu "${pid[$t]}")
                out=$(wrk -t1 -c"$c" -d"$duration" --latency -H 'Authorization: Bearer agent-token' -H 'X-API-Key: bench-key' "${url[$t]}")
                after=0; [ -n "${pid[$t]}" ] && after=$(cpu "${pid[$t]}")
                if echo "$out" | grep -q "Non-2xx"; then echo "bench: $t answered non-2xx: $out" >&2; exit 1; fi
                requests=$(echo "$out" | awk '/requests in/ {print $1}')
                all_rps[$t]+=" $(echo "$out" | awk '/Requests\/sec/ {print $2}')"
                all_p50[$t]+=" $(us "$(echo "$out" | awk '$1=="50%" {print $2}')")"
                all_p99[$t]+=" $(us "$(echo "$out" | awk '$1=="99%" {print $2}')")"
                [ -n "${pid[$t]}" ] && all_cpu[$t]+=" $(awk -v d=$((after - before)) -v r="$requests" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f", d / hz / r * 100000}')"
            done
        done
        declare -A rps=() p50=() p99=() cpu100k=()
        for t in none nginx sidecar; do
            # shellcheck disable=SC2086 # the lists are space-separated numbers
            rps[$t]=$(median ${all_rps[$t]}); p50[$t]=$(median ${all_p50[$t]}); p99[$t]=$(median ${all_p99[$t]})
            # shellcheck disable=SC2086
            [ -n "${pid[$t]}" ] && cpu100k[$t]=$(median ${all_cpu[$t]})
        done
        for t in none nginx sidecar; do
            # Only the none row is not compared with nginx; the none row's own "added" is 0.
            ratio() { [ "$t" = none ] && { echo -; return; }; awk -v a="$1" -v b="$2" 'BEGIN {if (a != "" && b > 0) printf "%.2f", a / b; else print "-"}'; }
            added=$(awk -v a="${p50[$t]}" -v b="${p50[none]}" 'BEGIN {printf "%.0f", a - b}')
            cpu_cell=$(awk -v v="${cpu100k[$t]:-}" 'BEGIN {if (v == "") print "-"; else printf "%.2f", v}')
            # shellcheck disable=SC2086
            echo "| $t | $c | $(printf '%.0f' "${rps[$t]}") | $(spread ${all_rps[$t]}) | ${p50[$t]} | ${p99[$t]} | $(ratio "${rps[$t]}" "${rps[nginx]}") | $(ratio "${p99[$t]}" "${p99[nginx]}") | $added | $cpu_cell | $(ratio "${cpu100k[$t]:-}" "${cpu100k[nginx]}") |" >> "$report"
        done
    done
    {
        echo
        echo "| | nginx | sidecar |"
        echo "|---|---|---|"
        echo "| RSS idle (MiB) | $(awk -v k="${idle[nginx]}" 'BEGIN {printf "%.1f", k/1024}') | $(awk -v k="${idle[sidecar]}" 'BEGIN {printf "%.1f", k/1024}') |"
        echo "| RSS peak under load (MiB) | $(awk -v k="$(mem "$nginx_pid" VmHWM)" 'BEGIN {printf "%.1f", k/1024}') | $(awk -v k="$(mem "$sidecar_pid" VmHWM)" 'BEGIN {printf "%.1f", k/1024}') |"
        echo
        echo "SSE, $sse_events events 10 ms apart, latency from the upstream's write to the client's read:"
        echo
        echo "| target | p50 µs | p99 µs | max µs | events |"
        echo "|---|---|---|---|---|"
    } >> "$report"
    for t in none nginx sidecar; do
        read -r s50 s99 smax n < <("$bin/examples/bench-sse" "${url[$t]%/x}/sse?n=$sse_events&ms=10")
        echo "| $t | $s50 | $s99 | $smax | $n |" >> "$report"
    done
    kill "$nginx_pid" "$sidecar_pid"; wait "$nginx_pid" "$sidecar_pid" 2>/dev/null || true
done
cat "$report"
[ -n "${BENCH_OUT:-}" ] && cp "$report" "$BENCH_OUT"
exit 0

# Sourced by run.sh and callgrind.sh: the nginx peer's configuration, one place for both.
# write_nginx_conf <dir> <worker processes> <listen port> <upstream port> [extra top-level lines]
# nginx injects a static X-API-Key (and drops any Authorization) with upstream keep-alive, as the
# sidecar does, so the two do the same work per request. With NGINX_UPSTREAM_CA set (a PEM file), the
# upstream is HTTPS, configured as a user would: verified against that CA, TLS sessions reused,
# HTTP/1.1 with keep-alive (nginx speaks no HTTP/2 to upstreams).
write_nginx_conf() {
    local dir=$1 workers=$2 port=$3 upstream=$4 extra=${5:-} scheme=http tls=""
    if [ -n "${NGINX_UPSTREAM_CA:-}" ]; then
        scheme=https
        tls="proxy_ssl_trusted_certificate $NGINX_UPSTREAM_CA;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.3;"
    fi
    mkdir -p "$dir"
    cat > "$dir/nginx.conf" <<CONF
worker_processes $workers;
$extra
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    upstream bench { server 127.0.0.1:$upstream; keepalive 128; }
    server {
        listen 127.0.0.1:$port;
        location /bench/ {
            proxy_pass $scheme://bench/;
            $tls
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-API-Key bench-key;
        }
    }
}
CONF
}

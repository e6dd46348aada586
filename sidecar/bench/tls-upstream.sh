# Sourced by run.sh and callgrind.sh: the HTTPS upstream's certificates, one place for both.
# tls_upstream_certs <dir>: a local CA and a leaf for localhost and 127.0.0.1 (ECDSA P-256, as most
# hosted servers use), written as <dir>/ca.pem, <dir>/leaf.pem, <dir>/leaf.key.
tls_upstream_certs() {
    local dir=$1
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench-ca" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout "$dir/leaf.key" -out "$dir/leaf.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$dir/leaf.ext"
    openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
        -extfile "$dir/leaf.ext" -out "$dir/leaf.pem" 2>/dev/null
    # rustls reads PKCS#8 keys.
    openssl pkcs8 -topk8 -nocrypt -in "$dir/leaf.key" -out "$dir/leaf.pk8"
    mv "$dir/leaf.pk8" "$dir/leaf.key"
}

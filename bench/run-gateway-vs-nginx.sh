#!/bin/sh
# Builds the bench in release mode and runs gateway-vs-nginx: the Switchyard
# gateway next to nginx (stream) and HAProxy (mode tcp), pinned (systems
# under test on core 0, load and backends on core 1). Installs nginx (with
# the stream module), haproxy, wrk and iperf3 only if missing.
# Arguments go to gateway-vs-nginx, e.g. --json out.json or --only l4.
set -eu
cd "$(dirname "$0")/.."
need=""
command -v nginx >/dev/null 2>&1 || need="$need nginx-light"
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need="$need libnginx-mod-stream"
command -v haproxy >/dev/null 2>&1 || need="$need haproxy"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
command -v iperf3 >/dev/null 2>&1 || need="$need iperf3"
if [ -n "$need" ]; then
    # shellcheck disable=SC2086
    apt-get install -y $need || { apt-get update && apt-get install -y $need; }
fi
cargo build --release -p switchyard-bench --bin gateway-node --bin gateway-vs-nginx
# 10k idle connections need ~10k descriptors in the client and each gateway.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec target/release/gateway-vs-nginx "$@"

#!/bin/sh
# Builds the hub and the bench in release mode and runs hub-vs-etcd.
# Installs etcd (Debian package etcd-server) only if it is missing.
# Arguments go to hub-vs-etcd (default: 10 s per level), e.g. --json out.json.
set -eu
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1; then
    apt-get install -y etcd-server || { apt-get update && apt-get install -y etcd-server; }
fi
cargo build --release -p switchyard -p switchyard-bench
exec target/release/hub-vs-etcd "$@"

#!/bin/sh
# Builds the DNS server binary (dns-serve: the agent's --dns code path) and
# the bench in release mode and runs dns-vs-knot: switchyard, Knot DNS and
# NSD on core 0, dnsperf on core 1, same zone, same queries.
# Installs knot, nsd and dnsperf (Debian packages) only if missing.
# Arguments go to dns-vs-knot (default: 10 s per run), e.g. --json out.json.
set -eu
cd "$(dirname "$0")/.."
need=""
for tool in knotd:knot nsd:nsd dnsperf:dnsperf taskset:util-linux; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need="$need ${tool##*:}"
done
if [ -n "$need" ]; then
    apt-get install -y $need || { apt-get update && apt-get install -y $need; }
fi
cargo build --release -p switchyard-bench --bin dns-serve --bin dns-vs-knot
exec target/release/dns-vs-knot "$@"

#!/bin/sh
# Leader RSS while one follower is stopped (SIGSTOP): the switchyard hub and
# etcd, each a 3-member cluster under hub-vs-etcd's load (16 clients, 40 s
# per system). In each system's level, after 8 s of load, the follower
# that is not the leader (the leader is the member with the most CPU time
# so far) is stopped for 28 s; the VmRSS of the leader and of the other
# (running) follower is printed every 4 s, then the follower is continued.
# Needs the release build: bench/run-hub-vs-etcd.sh builds it.
set -eu
cd "$(dirname "$0")/.."
out=$(mktemp)
target/release/hub-vs-etcd --clients 16 --seconds 40 >"$out" 2>&1 &
bench=$!

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/ {print $2 / 1024 " MiB"}' "/proc/$1/status"; }

stall() { # $1: system name, $2: pgrep pattern of its members
    until grep -q "level 16: $1" "$out"; do sleep 0.5; done
    sleep 8
    leader="" best=-1
    for p in $(pgrep -f "$2"); do
        c=$(cpu "$p")
        if [ "$c" -gt "$best" ]; then best=$c leader=$p; fi
    done
    follower=$(pgrep -f "$2" | grep -v "^$leader\$" | head -n 1)
    other=$(pgrep -f "$2" | grep -v "^$leader\$" | grep -v "^$follower\$" | head -n 1)
    echo "$1: leader $(rss "$leader"), running follower $(rss "$other"); stopping follower pid $follower"
    kill -STOP "$follower"
    for t in 4 8 12 16 20 24 28; do
        sleep 4
        echo "$1: follower stopped ${t} s: leader $(rss "$leader"), running follower $(rss "$other")"
    done
    kill -CONT "$follower"
    sleep 4
    echo "$1: follower continued 4 s: leader $(rss "$leader"), running follower $(rss "$other")"
}

stall switchyard "target/release/switchyard hub"
stall etcd "etcd --name"
wait "$bench" || true
grep -A3 "clients  system" "$out" || cat "$out"
rm -f "$out"

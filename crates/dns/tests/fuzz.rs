//! Fuzzing of the query path on the stable toolchain: random and mutated
//! packets through [`respond`] for the POP zone and the global zone, both
//! transports. Invariants checked on every packet: no panic; no answer
//! only for runts and responses; an answer carries the query's ID, is a
//! well-formed DNS message (hickory-proto decodes it), and over UDP is at
//! most 3x the query.
//!
//! `cargo test -p switchyard-dns --test fuzz` runs a short pass (a few
//! seconds). For a long run:
//! `SWITCHYARD_FUZZ_SECS=300 cargo test --release -p switchyard-dns --test fuzz -- --ignored --nocapture`
//! (`SWITCHYARD_FUZZ_SEED` replays a seed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_dns::global::{self, GlobalInput, GlobalPop, GlobalService};
use switchyard_dns::{respond, AnswerTable, Outcome, Transport};

fn wire(name: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for l in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        w.push(l.len() as u8);
        w.extend_from_slice(l.as_bytes());
    }
    w.push(0);
    w
}

const NAMES: &[&str] = &[
    "orders.shop.svc.clusterset.local.",
    "db.shop.svc.clusterset.local.",
    "big.shop.svc.clusterset.local.",
    "_http._tcp.orders.shop.svc.clusterset.local.",
    "_pg._tcp.db.shop.svc.clusterset.local.",
    "pop-a.orders.shop.svc.clusterset.local.",
    "db-0.pop-a.db.shop.svc.clusterset.local.",
    "dns-version.clusterset.local.",
    "epoch.switchyard.clusterset.local.",
    "clusterset.local.",
    "nope.clusterset.local.",
    "orders.shop.global.example.",
    "example.com.",
    ".",
];

/// A valid query to start mutating from.
fn seed(rng: &mut StdRng) -> Vec<u8> {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let qtype: u16 =
        [1, 2, 6, 13, 16, 28, 33, 41, 251, 252, 255, rng.random()][rng.random_range(0..12)];
    let edns = rng.random_bool(0.5);
    let mut p = vec![
        rng.random(),
        rng.random(),
        rng.random::<u8>() & 0x01,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        u8::from(edns),
    ];
    p.extend_from_slice(&wire(name));
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    if edns {
        let size: u16 = [0, 512, 1232, 4096, 65535][rng.random_range(0..5)];
        p.extend_from_slice(&[0, 0, 41]);
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        if rng.random_bool(0.5) {
            // Client Subnet, IPv4 /24.
            p.extend_from_slice(&[0, 11, 0, 8, 0, 7, 0, 1, 24, 0]);
            p.extend_from_slice(&[10, rng.random_range(0..4), rng.random()]);
        } else {
            p.extend_from_slice(&[0, 0]);
        }
    }
    p
}

fn mutate(rng: &mut StdRng, p: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..6) {
        if p.is_empty() {
            p.push(rng.random());
        }
        let at = rng.random_range(0..p.len());
        match rng.random_range(0..9) {
            0 => p[at] ^= 1 << rng.random_range(0..8),
            1 => p[at] = rng.random(),
            2 => p.insert(at, rng.random()),
            3 => {
                p.remove(at);
            }
            4 => p.truncate(at),
            // A compression pointer anywhere (loops included).
            5 => {
                let target = rng.random_range(0..p.len().max(1)) as u16;
                let ptr = (0xc000 | target).to_be_bytes();
                p[at] = ptr[0];
                if at + 1 < p.len() {
                    p[at + 1] = ptr[1];
                }
            }
            // Header counts.
            6 => {
                let i = [5usize, 7, 9, 11][rng.random_range(0..4)];
                if i < p.len() {
                    p[i] = [0, 1, 2, 255][rng.random_range(0..4)];
                }
            }
            // Oversized labels and lengths.
            7 => p[at] = [63, 64, 127, 191, 255][rng.random_range(0..5)],
            _ => {
                let extra: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                p.extend_from_slice(&extra);
            }
        }
    }
}

fn tables() -> Vec<AnswerTable> {
    let pop = switchyard_dns::zone::build(Some(&common::sample_view())).unwrap();
    let mut by_client = BTreeMap::new();
    by_client.insert("a".to_string(), vec!["a".to_string(), "b".to_string()]);
    let input = GlobalInput {
        zone: "global.example.".into(),
        applied_index: 5,
        pops: vec![
            GlobalPop {
                name: "a".into(),
                gateway: Some("192.0.2.1".parse().unwrap()),
                healthy: true,
                subnets: global::parse_subnets("10.0.0.0/8").0,
            },
            GlobalPop {
                name: "b".into(),
                gateway: Some("2001:db8::1".parse().unwrap()),
                healthy: true,
                subnets: vec![],
            },
        ],
        services: vec![GlobalService {
            namespace: "shop".into(),
            name: "orders".into(),
            ttl: 0,
            pops: vec!["a".into(), "b".into()],
            by_client,
        }],
    };
    vec![pop, global::build(&input, 5).unwrap()]
}

fn check(
    tables: &[AnswerTable],
    packet: &[u8],
    out: &mut Vec<u8>,
    counts: &mut BTreeMap<&'static str, u64>,
) {
    let client: IpAddr = "10.1.2.3".parse().unwrap();
    // Our parser and hickory-proto's agree wherever both accept a packet
    // (ours is stricter: no pointer in the question, no trailing bytes).
    if let (Ok(ours), Ok(theirs)) = (
        switchyard_dns::query::parse(packet),
        Message::from_vec(packet),
    ) {
        if let [q] = theirs.queries.as_slice() {
            let mut name = Vec::new();
            for l in q.name().iter() {
                name.push(l.len() as u8);
                name.extend(l.iter().map(u8::to_ascii_lowercase));
            }
            name.push(0);
            assert_eq!(ours.name(), name.as_slice(), "name of {packet:02x?}");
            assert_eq!(
                ours.qtype,
                u16::from(q.query_type()),
                "type of {packet:02x?}"
            );
            assert_eq!(
                ours.qclass,
                u16::from(q.query_class()),
                "class of {packet:02x?}"
            );
            assert_eq!(
                ours.edns.is_some(),
                theirs.edns.is_some(),
                "EDNS of {packet:02x?}"
            );
            *counts.entry("parsers_agree").or_default() += 1;
        }
    }
    for table in tables {
        for transport in [Transport::Udp, Transport::Tcp] {
            let o = respond(table, packet, client, transport, out);
            *counts.entry(o.as_str()).or_default() += 1;
            if o == Outcome::Dropped {
                assert!(out.is_empty());
                continue;
            }
            assert!(!out.is_empty(), "{o:?} without bytes for {packet:02x?}");
            assert_eq!(&out[0..2], &packet[0..2], "ID for {packet:02x?}");
            assert!(out[2] & 0x80 != 0, "QR set");
            if transport == Transport::Udp {
                assert!(
                    out.len() <= 3 * packet.len(),
                    "amplification {} / {} for {packet:02x?}",
                    out.len(),
                    packet.len()
                );
            }
            if let Err(e) = Message::from_vec(out) {
                panic!("answer does not decode ({e}): query {packet:02x?} answer {out:02x?}");
            }
        }
    }
}

fn run(duration: Duration, seed_value: u64) -> (u64, BTreeMap<&'static str, u64>) {
    let tables = tables();
    let mut rng = StdRng::seed_from_u64(seed_value);
    let mut out = Vec::new();
    let mut counts = BTreeMap::new();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        for _ in 0..256 {
            let mut p = if rng.random_bool(0.05) {
                (0..rng.random_range(0..600))
                    .map(|_| rng.random())
                    .collect()
            } else {
                seed(&mut rng)
            };
            if rng.random_bool(0.9) {
                mutate(&mut rng, &mut p);
            }
            check(&tables, &p, &mut out, &mut counts);
            n += 1;
        }
    }
    (n, counts)
}

fn seed_from_env() -> u64 {
    std::env::var("SWITCHYARD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

#[test]
fn short_fuzz_pass() {
    let seed = seed_from_env();
    let (n, counts) = run(Duration::from_secs(3), seed);
    println!("seed {seed}: {n} packets, outcomes {counts:?}");
    // The mutations reach every kind of outcome, not just FORMERR.
    for o in [
        "answer",
        "formerr",
        "nxdomain",
        "refused",
        "truncated",
        "dropped",
        "parsers_agree",
    ] {
        assert!(
            counts.get(o).copied().unwrap_or(0) > 0,
            "no {o} in {counts:?} (seed {seed})"
        );
    }
}

#[test]
#[ignore = "long run: SWITCHYARD_FUZZ_SECS=300 cargo test --release -p switchyard-dns --test fuzz -- --ignored"]
fn long_fuzz_run() {
    let secs = std::env::var("SWITCHYARD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let seed = seed_from_env();
    let (n, counts) = run(Duration::from_secs(secs), seed);
    println!("seed {seed}: {n} packets in {secs} s, outcomes {counts:?}");
}

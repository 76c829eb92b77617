//! The POP zone over real sockets, queried with `dig` and hickory-resolver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::Resolver;

const ORDERS: &str = "orders.shop.svc.clusterset.local.";
const DB: &str = "db.shop.svc.clusterset.local.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_answers_every_name_kind() {
    let s = serve(sample_view()).await;
    let a = s.addr;
    // ClusterSetIP: the VIP, with the policy's TTL; case-insensitive.
    assert_eq!(short(a, ORDERS, "A").await, ["127.77.0.5"]);
    assert_eq!(
        short(a, "OrDeRs.ShOp.SvC.ClUsTeRsEt.LoCaL.", "A").await,
        ["127.77.0.5"]
    );
    let full = dig(a, &["+noall", "+answer", ORDERS, "A"]).await;
    let words: Vec<&str> = full.split_whitespace().collect();
    assert_eq!(words, [ORDERS, "7", "IN", "A", "127.77.0.5"], "{full}");
    // Per-POP names (opted in): that POP's ready endpoints.
    assert_eq!(
        short(a, "pop-a.orders.shop.svc.clusterset.local.", "A").await,
        ["10.0.0.1", "10.0.0.2"]
    );
    assert_eq!(
        short(a, "pop-b.orders.shop.svc.clusterset.local.", "A").await,
        ["10.1.0.1"]
    );
    // ClusterSetIP SRV with per-POP names: priority = tier, weight = view.
    assert_eq!(
        short(a, "_http._tcp.orders.shop.svc.clusterset.local.", "SRV").await,
        [
            "0 2 80 pop-a.orders.shop.svc.clusterset.local.",
            "1 1 80 pop-b.orders.shop.svc.clusterset.local."
        ]
    );
    // Headless: endpoint addresses, best tier first; AAAA for IPv6.
    let out = dig(a, &["+short", DB, "A"]).await;
    assert_eq!(out.lines().collect::<Vec<_>>(), ["10.0.0.11", "10.0.0.12"]);
    assert_eq!(short(a, DB, "AAAA").await, ["fd00::1"]);
    assert_eq!(
        short(a, "_pg._tcp.db.shop.svc.clusterset.local.", "SRV").await,
        [
            "0 2 5432 db-0.pop-a.db.shop.svc.clusterset.local.",
            "0 2 5432 db-1.pop-a.db.shop.svc.clusterset.local.",
            "1 1 5432 fd00--1.pop-b.db.shop.svc.clusterset.local."
        ]
    );
    assert_eq!(
        short(a, "db-1.pop-a.db.shop.svc.clusterset.local.", "A").await,
        ["10.0.0.12"]
    );
    assert_eq!(
        short(a, "fd00--1.pop-b.db.shop.svc.clusterset.local.", "AAAA").await,
        ["fd00::1"]
    );
    // Per-POP names are opt-in: not for db.
    let out = dig(a, &["pop-a.db.shop.svc.clusterset.local.", "A"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}"); // an empty non-terminal
    assert_eq!(count(&out, "ANSWER"), 0, "{out}");
    // TXT: version and epoch.
    assert_eq!(
        short(a, "dns-version.clusterset.local.", "TXT").await,
        ["\"1.0.0\""]
    );
    assert_eq!(
        short(a, switchyard_dns::zone::EPOCH_NAME, "TXT").await,
        ["\"42\""]
    );
    // NXDOMAIN: no ready endpoint, or unknown; SOA in authority.
    for name in [
        "empty.shop.svc.clusterset.local.",
        "nope.shop.svc.clusterset.local.",
    ] {
        let out = dig(a, &[name, "A"]).await;
        assert_eq!(status(&out), "NXDOMAIN", "{out}");
        assert_eq!(count(&out, "AUTHORITY"), 1, "{out}");
        let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains("IN SOA ns.clusterset.local. hostmaster.clusterset.local. 42 "),
            "{out}"
        );
        assert!(out.contains(" aa"), "authoritative: {out}");
    }
    // NODATA: the name exists, the type does not.
    let out = dig(a, &[ORDERS, "TXT"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert_eq!(count(&out, "ANSWER"), 0, "{out}");
    assert_eq!(count(&out, "AUTHORITY"), 1, "{out}");
    // REFUSED outside the zone, for zone transfers, and no recursion.
    let out = dig(a, &["example.com.", "A"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
    assert!(!out.contains(" ra"), "no recursion available: {out}");
    let out = dig(a, &["clusterset.local.", "AXFR"]).await;
    assert!(out.contains("Transfer failed"), "no zone transfer: {out}");
    assert!(!out.contains("127.77.0.5"), "no zone transfer: {out}");
    // ANY: minimal (RFC 8482).
    let out = dig(a, &["+noall", "+answer", ORDERS, "ANY"]).await;
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("HINFO \"RFC8482\" \"\""), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    // SOA at the apex.
    let out = short(a, "clusterset.local.", "SOA").await;
    assert_eq!(out.len(), 1);
    assert!(
        out[0].starts_with("ns.clusterset.local. hostmaster.clusterset.local. 42 "),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_then_tcp() {
    let s = serve(sample_view()).await;
    let big = "big.shop.svc.clusterset.local.";
    // UDP only: TC=1 and no records.
    let out = dig(s.addr, &["+ignore", "+notcp", big, "A"]).await;
    assert!(out.contains(" tc"), "{out}");
    assert_eq!(count(&out, "ANSWER"), 0, "{out}");
    // dig retries over TCP and gets all 100.
    let out = dig(s.addr, &["+short", big, "A"]).await;
    assert_eq!(out.lines().count(), 100, "{out}");
    // Over TCP directly.
    let out = dig(s.addr, &["+tcp", "+short", big, "A"]).await;
    assert_eq!(out.lines().count(), 100, "{out}");
    // A small answer fits in UDP even without EDNS.
    let out = dig(s.addr, &["+noedns", "+notcp", "+ignore", ORDERS, "A"]).await;
    assert!(!out.contains(" tc"), "{out}");
    assert_eq!(count(&out, "ANSWER"), 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hickory_resolver_agrees() {
    let s = serve(sample_view()).await;
    let mut ns = NameServerConfig::udp_and_tcp(s.addr.ip());
    for c in &mut ns.connections {
        c.port = s.addr.port();
    }
    let mut cfg = ResolverConfig::default();
    cfg.add_name_server(ns);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    let r = Resolver::builder_with_config(cfg, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .unwrap();

    let ips = |l: &hickory_resolver::lookup::Lookup| {
        let mut v: Vec<String> = l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    };
    let l = r.lookup(ORDERS, RecordType::A).await.unwrap();
    assert_eq!(ips(&l), ["127.77.0.5"]);
    let l = r.lookup(DB, RecordType::AAAA).await.unwrap();
    assert_eq!(ips(&l), ["fd00::1"]);
    let l = r.lookup(DB, RecordType::A).await.unwrap();
    assert_eq!(ips(&l), ["10.0.0.11", "10.0.0.12"]);
    let l = r
        .lookup(
            "_http._tcp.orders.shop.svc.clusterset.local.",
            RecordType::SRV,
        )
        .await
        .unwrap();
    let mut srv: Vec<(u16, u16, String)> = l
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.target.to_string())),
            _ => None,
        })
        .collect();
    srv.sort();
    assert_eq!(
        srv,
        [
            (0, 2, "pop-a.orders.shop.svc.clusterset.local.".to_string()),
            (1, 1, "pop-b.orders.shop.svc.clusterset.local.".to_string())
        ]
    );
    let l = r
        .lookup("pop-b.orders.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(ips(&l), ["10.1.0.1"]);
    let l = r
        .lookup("dns-version.clusterset.local.", RecordType::TXT)
        .await
        .unwrap();
    assert!(matches!(&l.answers()[0].data, RData::TXT(t) if t.to_string() == "1.0.0"));
    // NXDOMAIN and NODATA.
    let e = r
        .lookup("empty.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap_err();
    assert!(e.is_nx_domain(), "{e:?}");
    let e = r.lookup(ORDERS, RecordType::TXT).await.unwrap_err();
    assert!(e.is_no_records_found() && !e.is_nx_domain(), "{e:?}");
    // REFUSED is an error, not an answer.
    assert!(r.lookup("example.com.", RecordType::A).await.is_err());
    // ANY: one HINFO.
    let l = r.lookup(ORDERS, RecordType::ANY).await.unwrap();
    assert_eq!(l.answers().len(), 1);
    assert_eq!(l.answers()[0].record_type(), RecordType::HINFO);
    // 100 records: truncated over UDP, completed over TCP by the resolver.
    let l = r
        .lookup("big.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(ips(&l).len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_view_reaches_answers() {
    let s = serve(sample_view()).await;
    assert_eq!(short(s.addr, ORDERS, "A").await, ["127.77.0.5"]);
    let mut v = sample_view();
    v.epoch = 43;
    v.services[0].vip = "127.77.0.9".into();
    s.views.send_replace(Some(v));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if short(s.addr, ORDERS, "A").await == ["127.77.0.9"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new view never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        short(s.addr, switchyard_dns::zone::EPOCH_NAME, "TXT").await,
        ["\"43\""]
    );
    // The service loses every ready endpoint: NXDOMAIN.
    let mut v = sample_view();
    v.epoch = 44;
    v.services[0].tiers.clear();
    s.views.send_replace(Some(v));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if status(&dig(s.addr, &[ORDERS, "A"]).await) == "NXDOMAIN" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "withdrawal never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal query for `name` (wire format) and `qtype`, optionally with an
/// OPT record advertising `edns` bytes.
fn raw_query(name: &[u8], qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut p = vec![
        0xab,
        0xcd,
        0x00,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        u8::from(edns.is_some()),
    ];
    p.extend_from_slice(name);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    if let Some(size) = edns {
        p.extend_from_slice(&[0, 0, 41]);
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    p
}

fn wire(name: &str) -> Vec<u8> {
    let mut w = Vec::new();
    for l in name.trim_end_matches('.').split('.') {
        w.push(l.len() as u8);
        w.extend_from_slice(l.as_bytes());
    }
    w.push(0);
    w
}

fn exchange(sock: &UdpSocket, packet: &[u8]) -> Option<Vec<u8>> {
    sock.send(packet).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplification_is_at_most_three_for_every_type() {
    let s = serve(sample_view()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let names = [
        ORDERS,
        DB,
        "big.shop.svc.clusterset.local.",
        "_http._tcp.orders.shop.svc.clusterset.local.",
        "_pg._tcp.db.shop.svc.clusterset.local.",
        "pop-a.orders.shop.svc.clusterset.local.",
        "dns-version.clusterset.local.",
        "clusterset.local.",
        "x.clusterset.local.",
        "svc.clusterset.local.",
    ];
    let types = [1u16, 2, 6, 13, 16, 28, 33, 255, 99];
    let mut worst = 0.0f64;
    for name in names {
        for qtype in types {
            for edns in [None, Some(512), Some(1232), Some(4096)] {
                let q = raw_query(&wire(name), qtype, edns);
                let r = exchange(&sock, &q).expect("answered");
                assert_eq!(&r[0..2], &q[0..2]);
                let ratio = r.len() as f64 / q.len() as f64;
                worst = worst.max(ratio);
                assert!(
                    ratio <= 3.0,
                    "{name} type {qtype} edns {edns:?}: {} / {}",
                    r.len(),
                    q.len()
                );
            }
        }
    }
    assert!(
        worst > 1.5,
        "the sweep reached real answers (worst {worst})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_or_nothing_and_the_server_keeps_serving() {
    let s = serve(sample_view()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(s.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let good = raw_query(&wire(ORDERS), 1, None);
    let rcode = |r: &[u8]| r[3] & 0x0f;

    // A compression pointer loop in the question (pointing at itself).
    let mut p = good[..12].to_vec();
    p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(rcode(&exchange(&sock, &p).unwrap()), 1);
    // ...and in the additional section (never followed).
    let mut p = good.clone();
    p[11] = 1;
    p.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    let r = exchange(&sock, &p).unwrap();
    assert_eq!(rcode(&r), 0, "a pointer-owned additional record is skipped");
    let mut p = good.clone();
    p[11] = 1;
    let at = p.len() as u16;
    p.extend_from_slice(&(0xc000 | at).to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert!(exchange(&sock, &p).is_some());
    // A label over 63 bytes.
    let mut p = good[..12].to_vec();
    p.push(64);
    p.extend_from_slice(&[b'a'; 64]);
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_eq!(rcode(&exchange(&sock, &p).unwrap()), 1);
    // A name over 255 bytes.
    let mut p = good[..12].to_vec();
    for _ in 0..5 {
        p.push(60);
        p.extend_from_slice(&[b'a'; 60]);
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert_eq!(rcode(&exchange(&sock, &p).unwrap()), 1);
    // Truncated at every length: FORMERR or nothing, never a crash.
    for n in 0..good.len() {
        if let Some(r) = exchange(&sock, &good[..n]) {
            assert_eq!(rcode(&r), 1, "truncated at {n}");
        }
    }
    // QDCOUNT 0 and 2.
    for qd in [0u8, 2] {
        let mut p = good.clone();
        p[5] = qd;
        assert_eq!(rcode(&exchange(&sock, &p).unwrap()), 1);
    }
    // A response is not answered.
    let mut p = good.clone();
    p[2] |= 0x80;
    assert!(exchange(&sock, &p).is_none());
    // Zone transfers: REFUSED.
    for qtype in [251u16, 252] {
        let p = raw_query(&wire("clusterset.local."), qtype, None);
        assert_eq!(rcode(&exchange(&sock, &p).unwrap()), 5);
    }
    // An unknown opcode: NOTIMP.
    let mut p = good.clone();
    p[2] |= 5 << 3;
    assert_eq!(rcode(&exchange(&sock, &p).unwrap()), 4);
    // Still serving.
    let r = exchange(&sock, &good).unwrap();
    assert_eq!(rcode(&r), 0);
    assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
    assert_eq!(short(s.addr, ORDERS, "A").await, ["127.77.0.5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optional_rate_limit_drops_a_flooding_source() {
    let (_views, rx) = tokio::sync::watch::channel(Some(sample_view()));
    let (tables, _task) =
        switchyard_dns::server::follow(rx, |v: &Option<switchyard_proto::pb::PopView>| {
            switchyard_dns::zone::build(v.as_ref()).ok()
        });
    let cfg = switchyard_dns::DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        udp_workers: 1,
        rate_limit: Some(switchyard_dns::limits::RateLimitConfig {
            per_second: 1,
            burst: 5,
            max_sources: 16,
        }),
        ..Default::default()
    };
    let server = switchyard_dns::DnsServer::bind(cfg, tables).await.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server.local_addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let q = raw_query(&wire(ORDERS), 1, None);
    let start = std::time::Instant::now();
    let answered = (0..30).filter(|_| exchange(&sock, &q).is_some()).count();
    // The burst is answered; beyond it, at most the refill of the elapsed
    // time (1 per second).
    let refill = start.elapsed().as_secs() as usize + 1;
    assert!(answered >= 5, "burst answered: {answered}");
    assert!(
        answered <= 5 + refill,
        "{answered} answered in {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelines_and_closes_only_a_bad_stream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = serve(sample_view()).await;
    let frame = |q: &[u8]| {
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(q);
        f
    };
    let read_answer = |mut c: tokio::net::TcpStream| async move {
        let mut len = [0u8; 2];
        c.read_exact(&mut len).await?;
        let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut a).await?;
        std::io::Result::Ok((c, a))
    };
    // Two queries in one write: two answers, in order.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut q1 = raw_query(&wire(ORDERS), 1, None);
    q1[0..2].copy_from_slice(&[0, 1]);
    let mut q2 = raw_query(&wire("big.shop.svc.clusterset.local."), 1, None);
    q2[0..2].copy_from_slice(&[0, 2]);
    let mut both = frame(&q1);
    both.extend_from_slice(&frame(&q2));
    c.write_all(&both).await.unwrap();
    let (c, a1) = read_answer(c).await.unwrap();
    let (_c, a2) = read_answer(c).await.unwrap();
    assert_eq!(&a1[0..2], &[0, 1]);
    assert_eq!(&a2[0..2], &[0, 2]);
    assert_eq!(u16::from_be_bytes([a2[6], a2[7]]), 100, "all 100 over TCP");
    // A frame over the size limit closes that stream, unread.
    let mut bad = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    bad.write_all(&[0xff, 0xff]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A malformed query over TCP: FORMERR, and the stream stays usable.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut q = q1.clone();
    q[5] = 2;
    c.write_all(&frame(&q)).await.unwrap();
    let (mut c, a) = read_answer(c).await.unwrap();
    assert_eq!(a[3] & 0x0f, 1);
    c.write_all(&frame(&q1)).await.unwrap();
    let (_c, a) = read_answer(c).await.unwrap();
    assert_eq!(a[3] & 0x0f, 0);
    assert_eq!(short(s.addr, ORDERS, "A").await, ["127.77.0.5"]);
}

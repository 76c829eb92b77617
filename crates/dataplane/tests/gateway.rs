//! Several real gateways in one process: real QUIC tunnels with gateway
//! certificates from a real CA, real TCP clients and backends on
//! 127.0.0.1, views fed by hand through watch channels.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use switchyard_dataplane::{ServiceKey, VipBind};

fn payload(n: usize) -> Vec<u8> {
    // Deterministic, not compressible, no ':' confusion (it is after the
    // first colon anyway).
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A at POP a imports web from b (tier 0) and c (tier 1).
struct Trio {
    a: Gw,
    b: Gw,
    c: Gw,
    _backends: Vec<tokio::task::JoinHandle<()>>,
}

async fn trio(
    ca: &switchyard_pki::CertificateAuthority,
    b_addr_for_a: Option<std::net::SocketAddr>,
) -> (Trio, Option<Relay>) {
    let (be_b, tb) = backend("b").await;
    let (be_c, tc) = backend("c").await;
    let b = Gw::start(ca, "b").await;
    let c = Gw::start(ca, "c").await;
    b.set_view(view(
        "b",
        1,
        vec![service(
            &web(),
            "127.77.1.1",
            vec![vec![target("b", &[be_b])]],
        )],
        &[],
    ))
    .await;
    c.set_view(view(
        "c",
        1,
        vec![service(
            &web(),
            "127.77.2.1",
            vec![vec![target("c", &[be_c])]],
        )],
        &[],
    ))
    .await;
    let relay = match b_addr_for_a {
        Some(_) => Some(Relay::start(b.gw.tunnel_addr).await),
        None => None,
    };
    let b_addr = relay.as_ref().map_or(b.gw.tunnel_addr, |r| r.addr);
    let a = Gw::start(ca, "a").await;
    a.set_view(view(
        "a",
        1,
        vec![service(
            &web(),
            "127.77.0.1",
            vec![vec![target("b", &[be_b])], vec![target("c", &[be_c])]],
        )],
        &[("b", b_addr), ("c", c.gw.tunnel_addr)],
    ))
    .await;
    a.wait_peer("b", true).await;
    a.wait_peer("c", true).await;
    (
        Trio {
            a,
            b,
            c,
            _backends: vec![tb, tc],
        },
        relay,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_in_tier_order_with_bytes_intact_both_ways() {
    let ca = ca();
    let (t, _) = trio(&ca, None).await;
    let vip = t.a.vip(&web());
    for n in [0usize, 1, 1000, 3 << 20] {
        let who = served_by(vip, &payload(n)).await.unwrap();
        assert_eq!(
            who,
            "b",
            "tier 0 serves ({n} bytes); {:?} {:?}",
            t.a.gw.stats(),
            t.a.gw.peer_health()
        );
    }
    let s = t.a.gw.stats();
    assert_eq!(s.served_remote, 4);
    assert_eq!(s.failed, 0);
    assert!(s.bytes_up >= 3 << 20 && s.bytes_down >= 3 << 20, "{s:?}");
    assert_eq!(t.b.gw.stats().tunnel_streams_served, 4);
    assert_eq!(t.c.gw.stats().tunnel_streams_served, 0);
    // RTTs for the agent to report: one sample per peer.
    let mut rtt = t.a.gw.rtt_samples();
    let samples = tokio::time::timeout(Duration::from_secs(10), rtt.wait_for(|s| s.len() == 2))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(samples[0].to_pop, "b");
    assert!(samples.iter().all(|s| s.rtt_us > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_endpoints_first_then_retry_on_refused_connect() {
    let ca = ca();
    let (t, _) = trio(&ca, None).await;
    let (be_a, _ta) = backend("a").await;
    let (be_b, _) = backend("unused").await;
    let with_local = |epoch, local| {
        view(
            "a",
            epoch,
            vec![service(
                &web(),
                "127.77.0.1",
                vec![vec![target("a", &[local])], vec![target("b", &[be_b])]],
            )],
            &[("b", t.b.gw.tunnel_addr), ("c", t.c.gw.tunnel_addr)],
        )
    };
    t.a.set_view(with_local(2, be_a)).await;
    let vip = t.a.vip(&web());
    // The local tier goes through a relay thread: small requests, and
    // bulk through splice(2), arrive intact both ways.
    for n in [0usize, 5, 1000, 3 << 20] {
        assert_eq!(served_by(vip, &payload(n)).await.unwrap(), "a", "{n} bytes");
    }
    let s = t.a.gw.stats();
    assert_eq!(s.served_local, 4, "{s:?}");
    assert!(s.bytes_up >= 3 << 20 && s.bytes_down >= 3 << 20, "{s:?}");
    // The local endpoint refuses: the same connection moves on to b.
    t.a.set_view(with_local(3, dead_port().await)).await;
    assert_eq!(t.a.vip(&web()), vip, "listener kept across views");
    assert_eq!(served_by(vip, b"hello").await.unwrap(), "b");
    let s = t.a.gw.stats();
    assert!(s.local_failovers >= 1, "{s:?}");
    assert_eq!(s.failed, 0);
    // An older view is refused.
    t.a.view.send_replace(Some(with_local(1, be_a)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*t.a.gw.applied_epoch().borrow(), 3);
    assert_eq!(served_by(vip, b"hello").await.unwrap(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_vanishes_is_failed_over_by_probes_without_a_view_change() {
    let ca = ca();
    let (t, relay) = trio(&ca, Some("0.0.0.0:0".parse().unwrap())).await;
    let relay = relay.unwrap();
    let vip = t.a.vip(&web());
    assert_eq!(served_by(vip, b"x").await.unwrap(), "b");
    // B's packets stop arriving, no close, no view change.
    relay.blackhole.store(true, Ordering::Relaxed);
    // The very next connection succeeds, through c.
    assert_eq!(served_by(vip, &payload(100_000)).await.unwrap(), "c");
    t.a.wait_peer("b", false).await;
    for _ in 0..5 {
        assert_eq!(served_by(vip, b"y").await.unwrap(), "c");
    }
    let s = t.a.gw.stats();
    assert!(s.local_failovers >= 1, "{s:?}");
    assert_eq!(s.failed, 0, "{s:?}");
    assert_eq!(*t.a.gw.applied_epoch().borrow(), 1);
    // B comes back: probes (over a fresh tunnel) bring it up again.
    relay.blackhole.store(false, Ordering::Relaxed);
    t.a.wait_peer("b", true).await;
    assert_eq!(served_by(vip, b"z").await.unwrap(), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_gateway_that_stops_is_failed_over() {
    let ca = ca();
    let (t, _) = trio(&ca, None).await;
    let vip = t.a.vip(&web());
    assert_eq!(served_by(vip, b"x").await.unwrap(), "b");
    let Trio { a, b, c: _c, .. } = t;
    drop(b);
    for _ in 0..5 {
        assert_eq!(served_by(vip, b"y").await.unwrap(), "c");
    }
    a.wait_peer("b", false).await;
    assert_eq!(a.gw.stats().failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_not_exported_by_the_peer_is_refused() {
    let ca = ca();
    let (be_b, _tb) = backend("b").await;
    let secret = ServiceKey::new("ns", "secret");
    let b = Gw::start(&ca, "b").await;
    // b knows `secret` but does not export it (only c does).
    b.set_view(view(
        "b",
        1,
        vec![
            service(&web(), "127.77.1.1", vec![vec![target("b", &[be_b])]]),
            service(&secret, "127.77.1.2", vec![vec![target("c", &[be_b])]]),
        ],
        &[],
    ))
    .await;
    let a = Gw::start(&ca, "a").await;
    // a's (forged) view claims b serves `secret`.
    a.set_view(view(
        "a",
        1,
        vec![
            service(&web(), "127.77.0.1", vec![vec![target("b", &[be_b])]]),
            service(&secret, "127.77.0.2", vec![vec![target("b", &[be_b])]]),
        ],
        &[("b", b.gw.tunnel_addr)],
    ))
    .await;
    a.wait_peer("b", true).await;
    assert_eq!(served_by(a.vip(&web()), b"ok").await.unwrap(), "b");
    let out = exchange(a.vip(&secret), b"steal").await.unwrap_or_default();
    assert!(out.is_empty(), "refused service answered {out:?}");
    assert_eq!(b.gw.stats().tunnel_streams_refused, 1);
    assert_eq!(a.gw.stats().failed, 1);
    // A refusal is about the service, not the peer: b stays up.
    assert!(a.gw.peer_health()[0].up);
}

mod raw {
    //! Talks to a gateway's tunnel listener directly with quinn.
    use super::*;
    use quinn::crypto::rustls::QuicClientConfig;
    use std::sync::Arc;
    use switchyard_dataplane::header::StreamHeader;
    use switchyard_dataplane::GatewayIdentity;
    use switchyard_pki::{ExpectedPeer, SpiffeId};

    pub async fn dial(
        id: &GatewayIdentity,
        trust_ca_pem: &str,
        to: std::net::SocketAddr,
    ) -> anyhow::Result<quinn::Connection> {
        let tls = switchyard_pki::client_config(
            Some((&id.cert_chain_pem, &id.key_pem)),
            trust_ca_pem,
            ExpectedPeer::AnyOfPop {
                domain: DOMAIN.into(),
                pop: "b".into(),
            },
            vec![switchyard_dataplane::tls::ALPN.to_vec()],
        )?;
        let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        Ok(ep.connect_with(cfg, to, switchyard_pki::SNI_NAME)?.await?)
    }

    /// Sends raw header bytes on a new stream, returns the status byte.
    pub async fn ask(conn: &quinn::Connection, header: &[u8]) -> anyhow::Result<u8> {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(header).await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut b)).await??;
        Ok(b[0])
    }

    pub fn header(key: &ServiceKey, port: u16) -> Vec<u8> {
        StreamHeader {
            service: key.clone(),
            port,
        }
        .encode()
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tunnel_listener_checks_identity_header_and_export() {
        let ca = ca();
        let (be_b, _tb) = backend("b").await;
        let secret = ServiceKey::new("ns", "secret");
        let limited = ServiceKey::new("ns", "limited");
        let mut only_c = service(&limited, "127.77.1.3", vec![vec![target("b", &[be_b])]]);
        only_c.import_restricted = true;
        only_c.importers = vec!["c".into()];
        let b = Gw::start(&ca, "b").await;
        b.set_view(view(
            "b",
            1,
            vec![
                service(&web(), "127.77.1.1", vec![vec![target("b", &[be_b])]]),
                service(&secret, "127.77.1.2", vec![vec![target("c", &[be_b])]]),
                only_c,
            ],
            &[],
        ))
        .await;
        let to = b.gw.tunnel_addr;

        // A gateway of POP a: served, refused per service, malformed
        // headers close only their stream.
        let gw_a = gw_identity(&ca, "a");
        let conn = dial(&gw_a, ca.cert_pem(), to).await.unwrap();
        assert_eq!(ask(&conn, &header(&web(), 80)).await.unwrap(), 0, "ok");
        assert_eq!(
            ask(&conn, &header(&secret, 80)).await.unwrap(),
            3,
            "not exported"
        );
        assert_eq!(
            ask(&conn, &header(&ServiceKey::new("ns", "nope"), 80))
                .await
                .unwrap(),
            2,
            "unknown"
        );
        assert_eq!(
            ask(&conn, &header(&web(), 81)).await.unwrap(),
            2,
            "unknown port"
        );
        assert_eq!(
            ask(&conn, &[0xff, 0xff]).await.unwrap(),
            1,
            "oversized length"
        );
        assert_eq!(
            ask(&conn, &[0x00, 0x08, 9, 0, 80, 1, b'n', 1, b'w', 0])
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            ask(&conn, &header(&web(), 80)).await.unwrap(),
            0,
            "still serving"
        );
        // `limited` is exported to c only (export_to): a is refused, c is
        // served.
        assert_eq!(
            ask(&conn, &header(&limited, 80)).await.unwrap(),
            3,
            "not exported to a"
        );
        let conn_c = dial(&gw_identity(&ca, "c"), ca.cert_pem(), to)
            .await
            .unwrap();
        assert_eq!(
            ask(&conn_c, &header(&limited, 80)).await.unwrap(),
            0,
            "exported to c"
        );

        // A POP agent's certificate (valid, same CA) is not a gateway's.
        let pop_id = identity_for(&ca, &SpiffeId::pop(DOMAIN, "a").unwrap());
        let res = match dial(&pop_id, ca.cert_pem(), to).await {
            Ok(conn) => ask(&conn, &header(&web(), 80)).await,
            Err(e) => Err(e),
        };
        assert!(res.is_err(), "POP certificate served: {res:?}");

        // A gateway certificate from another CA.
        let other = common::ca();
        let foreign = gw_identity(&other, "a");
        let res = match dial(&foreign, ca.cert_pem(), to).await {
            Ok(conn) => ask(&conn, &header(&web(), 80)).await,
            Err(e) => Err(e),
        };
        assert!(res.is_err(), "foreign CA served: {res:?}");
        assert_eq!(b.gw.stats().tunnel_streams_served, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gateway_with_a_foreign_certificate_never_gets_a_tunnel() {
        let ca = ca();
        let (be_b, _tb) = backend("b").await;
        let b = Gw::start(&ca, "b").await;
        b.set_view(view(
            "b",
            1,
            vec![service(
                &web(),
                "127.77.1.1",
                vec![vec![target("b", &[be_b])]],
            )],
            &[],
        ))
        .await;
        // a's certificate comes from another CA (a trusts both, so only
        // b's check can refuse it).
        let other = common::ca();
        let mut id = gw_identity(&other, "a");
        id.ca_pem = format!("{}{}", ca.cert_pem(), other.cert_pem());
        let a = Gw::start_with(id, "a", |_| {}).await;
        a.set_view(view(
            "a",
            1,
            vec![service(
                &web(),
                "127.77.0.1",
                vec![vec![target("b", &[be_b])]],
            )],
            &[("b", b.gw.tunnel_addr)],
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!a.gw.peer_health()[0].up);
        let out = exchange(a.vip(&web()), b"x").await.unwrap_or_default();
        assert!(out.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_leaving_the_view_stops_accepting_and_drains() {
    let ca = ca();
    let (be_a, _ta) = backend("a").await;
    // A private loopback address: no other test binds it.
    let ip = format!(
        "127.88.{}.{}",
        std::process::id() % 250,
        1 + (std::process::id() / 250) % 250
    );
    let a = Gw::start_with(gw_identity(&ca, "a"), "a", |c| {
        c.vip_bind = VipBind::Ephemeral(ip.parse().unwrap());
    })
    .await;
    a.set_view(view(
        "a",
        1,
        vec![service(
            &web(),
            "127.77.0.1",
            vec![vec![target("a", &[be_a])]],
        )],
        &[],
    ))
    .await;
    let vip = a.vip(&web());
    assert_eq!(vip.ip().to_string(), ip);
    // A connection in flight: sent half its request.
    let mut s = tokio::net::TcpStream::connect(vip).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"first half ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.set_view(view("a", 2, vec![], &[])).await;
    assert!(a.gw.listeners().is_empty());
    assert!(
        tokio::net::TcpStream::connect(vip).await.is_err(),
        "still accepting"
    );
    // The old connection drains normally.
    s.write_all(b"second half").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"a:first half second half");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_binding_and_identity_checks() {
    let ca = ca();
    let (be_a, _ta) = backend("a").await;
    let a = Gw::start_with(gw_identity(&ca, "a"), "a", |c| {
        c.vip_bind = VipBind::VipEphemeralPort;
    })
    .await;
    a.set_view(view(
        "a",
        1,
        vec![service(
            &web(),
            "127.77.250.9",
            vec![vec![target("a", &[be_a])]],
        )],
        &[],
    ))
    .await;
    let vip = a.vip(&web());
    assert_eq!(vip.ip().to_string(), "127.77.250.9");
    assert_eq!(served_by(vip, b"v").await.unwrap(), "a");
    // Renewal with a fresh certificate of the same identity works; another
    // identity is refused.
    a.gw.reload_identity(gw_identity(&ca, "a")).unwrap();
    assert!(a.gw.reload_identity(gw_identity(&ca, "b")).is_err());
    // A POP certificate cannot run a gateway.
    let pop_id = identity_for(&ca, &switchyard_pki::SpiffeId::pop(DOMAIN, "a").unwrap());
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let cfg = switchyard_dataplane::GatewayConfig::new(
        "a",
        "gw0",
        "127.0.0.1:0".parse().unwrap(),
        pop_id,
    );
    assert!(switchyard_dataplane::start(cfg, rx).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_share_one_tunnel() {
    use tokio::io::AsyncReadExt;
    let ca = ca();
    let be = greeter("b").await;
    let b = Gw::start(&ca, "b").await;
    b.set_view(view(
        "b",
        1,
        vec![service(
            &web(),
            "127.77.1.1",
            vec![vec![target("b", &[be])]],
        )],
        &[],
    ))
    .await;
    let a = Gw::start(&ca, "a").await;
    a.set_view(view(
        "a",
        1,
        vec![service(
            &web(),
            "127.77.0.1",
            vec![vec![target("b", &[be])]],
        )],
        &[("b", b.gw.tunnel_addr)],
    ))
    .await;
    a.wait_peer("b", true).await;
    let vip = a.vip(&web());
    let mut held = Vec::new();
    for _ in 0..5 {
        let burst: Vec<_> = (0..200)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(vip).await?;
                    let mut g = [0u8; 2];
                    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut g)).await??;
                    anyhow::ensure!(&g == b"b\n", "bad greeting {g:?}");
                    anyhow::Ok(s)
                })
            })
            .collect();
        for t in burst {
            held.push(t.await.unwrap().unwrap());
        }
    }
    assert_eq!(held.len(), 1000);
    let s = a.gw.stats();
    assert_eq!((s.served_remote, s.failed), (1000, 0), "{s:?}");
    assert_eq!(b.gw.stats().tunnel_streams_served, 1000);
}

//! The global zone over real sockets: gateways ordered for the client's
//! POP, found from its source address or EDNS Client Subnet (`dig +subnet`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use switchyard_dns::answers::Subnet;
use switchyard_dns::global::{self, GlobalInput, GlobalPop, GlobalService};
use switchyard_dns::{DnsConfig, DnsServer};
use tokio::sync::watch;

fn pop(name: &str, gw: &str, healthy: bool, subnets: &str) -> GlobalPop {
    GlobalPop {
        name: name.into(),
        gateway: Some(gw.parse().unwrap()),
        healthy,
        subnets: global::parse_subnets(subnets).0,
    }
}

fn input() -> GlobalInput {
    let mut by_client = BTreeMap::new();
    by_client.insert(
        "north".to_string(),
        vec!["north".to_string(), "south".to_string()],
    );
    by_client.insert(
        "south".to_string(),
        vec!["south".to_string(), "north".to_string()],
    );
    // The loopback client (127.0.0.1) belongs to east.
    by_client.insert(
        "east".to_string(),
        vec!["east".to_string(), "south".to_string(), "north".to_string()],
    );
    GlobalInput {
        zone: "global.example".into(),
        applied_index: 77,
        pops: vec![
            pop("east", "192.0.2.3", true, "127.0.0.0/8"),
            pop("north", "192.0.2.1", true, "10.1.0.0/16, 2001:db8:1::/48"),
            pop("south", "192.0.2.2", true, "10.2.0.0/16"),
            pop("west", "192.0.2.4", false, "10.4.0.0/16"),
        ],
        services: vec![GlobalService {
            namespace: "shop".into(),
            name: "orders".into(),
            ttl: 9,
            pops: vec!["east".into(), "north".into(), "south".into(), "west".into()],
            by_client,
        }],
    }
}

async fn serve_global(input: &GlobalInput) -> DnsServer {
    let table = global::build(input, 5).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(table));
    std::mem::forget(_tx);
    let cfg = DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        udp_workers: 1,
        ..Default::default()
    };
    DnsServer::bind(cfg, rx).await.unwrap()
}

async fn order(s: &DnsServer, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["+short"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["orders.shop.global.example.", "A"]);
    dig(s.local_addr(), &args)
        .await
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_are_ordered_for_the_clients_pop() {
    let s = serve_global(&input()).await;
    // Source address 127.0.0.1: east's order; west is unhealthy.
    assert_eq!(
        order(&s, &[]).await,
        ["192.0.2.3", "192.0.2.2", "192.0.2.1"]
    );
    // EDNS Client Subnet wins over the source address.
    assert_eq!(
        order(&s, &["+subnet=10.1.7.0/24"]).await,
        ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    );
    assert_eq!(
        order(&s, &["+subnet=10.2.0.0/16"]).await,
        ["192.0.2.2", "192.0.2.1", "192.0.2.3"]
    );
    assert_eq!(
        order(&s, &["+subnet=2001:db8:1:2::/64"]).await,
        ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    );
    // No POP's subnet: every healthy POP, by name.
    assert_eq!(
        order(&s, &["+subnet=198.51.100.0/24"]).await,
        ["192.0.2.3", "192.0.2.1", "192.0.2.2"]
    );
    // The ECS option is echoed with a scope.
    let out = dig(
        s.local_addr(),
        &["+subnet=10.1.7.0/24", "orders.shop.global.example.", "A"],
    )
    .await;
    assert!(out.contains("CLIENT-SUBNET: 10.1.7.0/24/16"), "{out}");
    // TTL from the service, NXDOMAIN elsewhere, REFUSED outside.
    let out = dig(
        s.local_addr(),
        &["+noall", "+answer", "orders.shop.global.example.", "A"],
    )
    .await;
    assert!(out.split_whitespace().nth(1) == Some("9"), "{out}");
    let out = dig(s.local_addr(), &["nope.shop.global.example.", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    let out = dig(s.local_addr(), &["orders.shop.svc.clusterset.local.", "A"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
    assert_eq!(
        dig(
            s.local_addr(),
            &["+short", "_applied-index.global.example.", "TXT"]
        )
        .await
        .trim(),
        "\"77\""
    );
}

#[test]
fn longest_prefix_wins() {
    let mut i = input();
    i.pops[2]
        .subnets
        .push(Subnet::parse("10.1.7.0/24").unwrap());
    let t = global::build(&i, 5).unwrap();
    let north = t.class_of("10.1.8.1".parse().unwrap());
    let south = t.class_of("10.1.7.1".parse().unwrap());
    assert_eq!(north.1, 16);
    assert_eq!(south.1, 24);
    assert_ne!(north.0, south.0);
    assert_eq!(t.class_of("203.0.113.1".parse().unwrap()), (0, 0));
}

#[test]
fn invalid_zone_and_subnets_are_reported() {
    let mut i = input();
    i.zone = "bad..zone".into();
    assert!(global::build(&i, 5).is_err());
    let (ok, bad) = global::parse_subnets("10.0.0.0/8, nonsense, 10.0.0.0/33,fd00::/8");
    assert_eq!(ok.len(), 2);
    assert_eq!(bad, ["nonsense", "10.0.0.0/33"]);
}

//! Shared helpers: views, a served table, `dig`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use switchyard_dns::{AnswerTable, DnsConfig, DnsServer};
use switchyard_proto::pb;
use tokio::sync::watch;

pub fn ep(addr: &str, port: u32, hostname: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: addr.into(),
        port,
        ready: true,
        hostname: hostname.into(),
    }
}

pub fn target(pop: &str, weight: u32, eps: Vec<pb::Endpoint>) -> pb::Target {
    pb::Target {
        pop: pop.into(),
        weight,
        endpoints: eps,
    }
}

pub fn service(
    ns: &str,
    name: &str,
    headless: bool,
    vip: &str,
    ports: &[(&str, u32)],
    tiers: Vec<Vec<pb::Target>>,
) -> pb::ServiceView {
    pb::ServiceView {
        service: Some(pb::ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }),
        vip: vip.into(),
        ports: ports.iter().map(|p| p.1).collect(),
        tiers: tiers
            .into_iter()
            .map(|targets| pb::Tier { targets })
            .collect(),
        r#type: if headless {
            pb::ServiceType::Headless as i32
        } else {
            pb::ServiceType::ClusterSetIp as i32
        },
        service_ports: ports
            .iter()
            .map(|(n, p)| pb::ServicePort {
                name: n.to_string(),
                port: *p,
                protocol: pb::Protocol::Tcp as i32,
            })
            .collect(),
        ..Default::default()
    }
}

/// The view most tests serve (see each name's expected answers in the
/// tests).
pub fn sample_view() -> pb::PopView {
    let mut orders = service(
        "shop",
        "orders",
        false,
        "127.77.0.5",
        &[("http", 80)],
        vec![
            vec![target(
                "pop-a",
                2,
                vec![ep("10.0.0.1", 8080, ""), ep("10.0.0.2", 8080, "")],
            )],
            vec![target("pop-b", 1, vec![ep("10.1.0.1", 8080, "")])],
        ],
    );
    orders.per_pop_names = true;
    orders.dns_ttl_s = 7;
    let db = service(
        "shop",
        "db",
        true,
        "",
        &[("pg", 5432)],
        vec![
            vec![target(
                "pop-a",
                2,
                vec![ep("10.0.0.11", 5432, "db-0"), ep("10.0.0.12", 5432, "db-1")],
            )],
            vec![target("pop-b", 1, vec![ep("fd00::1", 5432, "")])],
        ],
    );
    let empty = service(
        "shop",
        "empty",
        false,
        "127.77.0.6",
        &[("http", 80)],
        vec![],
    );
    let big = service(
        "shop",
        "big",
        true,
        "",
        &[("http", 80)],
        vec![vec![target(
            "pop-a",
            1,
            (0..100)
                .map(|i| ep(&format!("10.2.{}.{}", i / 200, i % 200 + 1), 80, ""))
                .collect(),
        )]],
    );
    pb::PopView {
        pop: "pop-a".into(),
        epoch: 42,
        services: vec![orders, db, empty, big],
        peers: vec![],
    }
}

pub struct Served {
    pub server: DnsServer,
    pub addr: SocketAddr,
    pub views: watch::Sender<Option<pb::PopView>>,
    pub tables: watch::Receiver<Arc<AnswerTable>>,
}

/// Serves `view` through the same path as the agent: a view watch followed
/// by the zone builder, and the server on 127.0.0.1:0.
pub async fn serve(view: pb::PopView) -> Served {
    let (views, rx) = watch::channel(Some(view));
    let (tables, _task) = switchyard_dns::server::follow(rx, |v: &Option<pb::PopView>| {
        switchyard_dns::zone::build(v.as_ref()).ok()
    });
    let cfg = DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        udp_workers: 2,
        ..Default::default()
    };
    let server = DnsServer::bind(cfg, tables.clone()).await.unwrap();
    let addr = server.local_addr();
    Served {
        server,
        addr,
        views,
        tables,
    }
}

/// Runs `dig @addr -p port <args>` and returns its output.
pub async fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+time=2", "+tries=2"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("dig runs (apt-get install bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig +short` lines, sorted.
pub async fn short(addr: SocketAddr, name: &str, qtype: &str) -> Vec<String> {
    let out = dig(addr, &["+short", name, qtype]).await;
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// The status word of a full dig answer (`NOERROR`, `NXDOMAIN`...).
pub fn status(out: &str) -> String {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_string()
}

/// Number in `ANSWER: N` / `AUTHORITY: N`.
pub fn count(out: &str, section: &str) -> usize {
    out.split(&format!("{section}: "))
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

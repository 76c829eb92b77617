//! The agent process without a hub: static stability from the
//! last-known-good file, refusal of a corrupt one, and start-up errors that
//! need no network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use switchyard_agent::config::{AgentRecord, DataDir, Identity};
use switchyard_agent::enrol::EnrolError;
use switchyard_agent::lkg::Lkg;
use switchyard_agent::run::{self, AgentConfig, AgentError};
use switchyard_pki::{CertificateAuthority, SpiffeId};
use switchyard_proto::pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const DOMAIN: &str = "shell.test";

/// A data dir enrolled as `pop` by a local CA, its uplink pointing at a
/// port where no hub listens.
fn enrolled_dir(pop: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let issued = ca
        .issue(
            &SpiffeId::pop(DOMAIN, pop).unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let data = DataDir::new(dir.path());
    data.prepare().unwrap();
    data.store_identity(&Identity {
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: ca.cert_pem().to_string(),
    })
    .unwrap();
    data.store_record(&AgentRecord {
        pop: pop.into(),
        domain: DOMAIN.into(),
        hub_grpc: vec!["127.0.0.1:1".into()],
        // Nothing listens there: every connection attempt fails.
        hub_quic: vec!["127.0.0.1:1".into()],
    })
    .unwrap();
    dir
}

fn view(pop: &str, epoch: u64) -> pb::PopView {
    pb::PopView {
        pop: pop.into(),
        epoch,
        services: vec![pb::ServiceView {
            service: Some(pb::ServiceKey {
                namespace: "shop".into(),
                name: "cart".into(),
            }),
            vip: "127.77.0.1".into(),
            ports: vec![80],
            tiers: vec![pb::Tier {
                targets: vec![pb::Target {
                    pop: "south-2".into(),
                    weight: 1,
                    endpoints: vec![pb::Endpoint {
                        address: "10.1.0.5".into(),
                        port: 8080,
                        ready: true,
                        hostname: String::new(),
                    }],
                }],
            }],
            dns_ttl_s: 5,
            ..Default::default()
        }],
        peers: vec![],
    }
}

fn config(dir: &std::path::Path) -> AgentConfig {
    AgentConfig {
        data_dir: dir.to_path_buf(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        connect_timeout: Duration::from_millis(300),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..AgentConfig::default()
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

#[tokio::test]
async fn last_known_good_is_served_with_no_hub_reachable() {
    let dir = enrolled_dir("north-1");
    Lkg::new(dir.path()).store(&view("north-1", 42)).unwrap();
    let agent = run::start(config(dir.path())).await.unwrap();

    let (code, body) = get(agent.http_addr, "/debug/view").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["source"], "lkg");
    assert_eq!(v["epoch"], 42);
    assert_eq!(v["pop"], "north-1");
    assert_eq!(v["connected"], false);
    assert_eq!(v["services"][0]["name"], "cart");
    assert_eq!(v["services"][0]["tiers"][0]["targets"][0]["pop"], "south-2");

    let (code, body) = get(agent.http_addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"lkg\""), "{body}");
    assert_eq!(get(agent.http_addr, "/healthz").await.0, 200);

    // It keeps trying hubs meanwhile, and keeps serving.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, metrics) = get(agent.http_addr, "/metrics").await;
    assert!(
        metrics.contains("switchyard_agent_connected 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_agent_view_epoch 42\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_agent_view_from_lkg 1\n"),
        "{metrics}"
    );
    let reconnects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_agent_reconnects_total "))
        .unwrap();
    assert!(reconnects.parse::<u64>().unwrap() >= 1, "{metrics}");
    assert_eq!(get(agent.http_addr, "/debug/view").await.0, 200);
    agent.shutdown().await;
}

#[tokio::test]
async fn corrupt_last_known_good_is_refused_not_half_used() {
    let dir = enrolled_dir("north-1");
    let lkg = Lkg::new(dir.path());
    lkg.store(&view("north-1", 7)).unwrap();
    // Flip one byte in the body: the checksum no longer matches.
    let mut bytes = std::fs::read(lkg.path()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(lkg.path(), bytes).unwrap();

    let agent = run::start(config(dir.path())).await.unwrap();
    let (code, body) = get(agent.http_addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let (code, _) = get(agent.http_addr, "/debug/view").await;
    assert_eq!(code, 503);
    agent.shutdown().await;
}

#[tokio::test]
async fn last_known_good_of_another_pop_is_refused() {
    let dir = enrolled_dir("north-1");
    Lkg::new(dir.path()).store(&view("south-2", 9)).unwrap();
    let agent = run::start(config(dir.path())).await.unwrap();
    assert_eq!(get(agent.http_addr, "/readyz").await.0, 503);
    agent.shutdown().await;
}

#[tokio::test]
async fn not_enrolled_and_no_token_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = run::start(config(dir.path())).await.unwrap_err();
    assert!(matches!(err, AgentError::NotEnrolled(_)), "{err}");
    assert!(err.to_string().contains("--token"), "{err}");
}

#[tokio::test]
async fn malformed_token_is_refused_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        token: Some("K10nothex::abc".into()),
        hub_grpc: vec!["127.0.0.1:1".into()],
        ..config(dir.path())
    };
    let err = run::start(cfg).await.unwrap_err();
    assert!(
        matches!(err, AgentError::Enrol(EnrolError::BadToken(_))),
        "{err}"
    );
    assert!(!DataDir::new(dir.path()).is_enrolled());
}

#[tokio::test]
async fn invalid_services_file_stops_the_start() {
    let dir = enrolled_dir("north-1");
    let services = dir.path().join("services.toml");
    std::fs::write(&services, "[[services]]\nnamespace = \"Shop\"\n").unwrap();
    let cfg = AgentConfig {
        services: Some(services),
        ..config(dir.path())
    };
    let err = run::start(cfg).await.unwrap_err();
    assert!(matches!(err, AgentError::Source(_)), "{err}");
}

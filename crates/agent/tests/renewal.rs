//! Certificate renewal over a live uplink, against an in-process hub that
//! issues short-lived POP certificates: the agent enrols, renews at half
//! life (not sooner: no renewal storm), stores the new certificate, and
//! keeps its session.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use switchyard_agent::config::DataDir;
use switchyard_agent::run::{self, AgentConfig};
use switchyard_hub::{
    server::{self, HubConfig},
    uplink::server::UplinkOptions,
};
use switchyard_pki::JoinToken;
use switchyard_proto::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_is_renewed_at_half_life_over_the_session() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("hub"))?;
    let hub = server::start(HubConfig {
        uplink_options: UplinkOptions {
            pop_cert_validity: Duration::from_secs(4),
            ..UplinkOptions::default()
        },
        ..HubConfig::loopback_bootstrap(dir.path(), "renew.test")
    })
    .await?;

    let ca_pem = hub
        .hub
        .local(|s| s.federation.as_ref().unwrap().ca_cert_pem.clone());
    let ca_der = switchyard_pki::load_certs_pem(&ca_pem)?;
    let token = JoinToken::generate(&switchyard_pki::cert_fingerprint(&ca_der[0]))?;
    let r = hub
        .hub
        .propose(pb::Command {
            kind: Some(pb::command::Kind::IssueToken(pb::IssueToken {
                token: Some(pb::JoinToken {
                    id: token.id().to_string(),
                    secret_sha256: token.secret_sha256(),
                    kind: pb::TokenKind::Pop as i32,
                    pop: "north-1".into(),
                    expires_at_ms: switchyard_hub::server::admin::now_ms() + 60_000,
                    ..Default::default()
                }),
            })),
        })
        .await?;
    assert_eq!(r.error, pb::ErrorCode::None as i32, "{}", r.message);

    let data_dir = dir.path().join("agent");
    let agent = run::start(AgentConfig {
        data_dir: data_dir.clone(),
        hub_grpc: vec![hub.grpc_addr.to_string()],
        token: Some(token.to_string()),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        backoff_min: Duration::from_millis(50),
        ..AgentConfig::default()
    })
    .await?;
    assert_eq!(agent.record.pop, "north-1");
    let first = DataDir::new(&data_dir).load_identity()?;

    // Issued with 4 s of life: renewed about 2 s later, then again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let counters = &agent.status.counters;
    while counters.cert_renewals.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "no second renewal within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewals = counters.cert_renewals.load(Ordering::Relaxed);
    // Half life each time: a handful at most, never a storm.
    assert!(renewals <= 3, "{renewals} renewals");
    assert_eq!(counters.cert_renewals_refused.load(Ordering::Relaxed), 0);
    let now = DataDir::new(&data_dir).load_identity()?;
    assert_ne!(now.cert_pem, first.cert_pem);
    assert_ne!(now.key_pem, first.key_pem, "a new key per renewal");
    assert!(agent.status.is_connected());
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

//! The agent's services for gateways against an in-process hub that issues
//! short-lived certificates: gateway certificates issued over the live
//! uplink (stored 0600, reused in the first half of their life, renewed
//! after it), the tunnel address and RTTs reaching the hub's state, and the
//! local gRPC API (secret required, view stream, identity).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchyard_agent::local_api;
use switchyard_agent::run::{self, AgentConfig, RunningAgent};
use switchyard_hub::{
    server::{self, HubConfig, RunningHub},
    uplink::server::UplinkOptions,
};
use switchyard_pki::{JoinToken, SpiffeId};
use switchyard_proto::pb;

const DOMAIN: &str = "gw.test";

async fn hub(dir: &std::path::Path, validity: Duration) -> anyhow::Result<RunningHub> {
    std::fs::create_dir_all(dir.join("hub"))?;
    Ok(server::start(HubConfig {
        uplink_options: UplinkOptions {
            pop_cert_validity: validity,
            // Every report commits (the production default limits it).
            rtt_report_interval: Duration::from_millis(10),
            ..UplinkOptions::default()
        },
        ..HubConfig::loopback_bootstrap(dir, DOMAIN)
    })
    .await?)
}

async fn agent(hub: &RunningHub, dir: &std::path::Path, pop: &str) -> anyhow::Result<RunningAgent> {
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
                    pop: pop.into(),
                    expires_at_ms: switchyard_hub::server::admin::now_ms() + 60_000,
                    ..Default::default()
                }),
            })),
        })
        .await?;
    assert_eq!(r.error, pb::ErrorCode::None as i32, "{}", r.message);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(run::start(AgentConfig {
        data_dir: dir.join(format!("agent-{pop}")),
        hub_grpc: vec![hub.grpc_addr.to_string()],
        token: Some(token.to_string()),
        http: loopback,
        gateway_api: Some(loopback),
        backoff_min: Duration::from_millis(50),
        ..AgentConfig::default()
    })
    .await?)
}

async fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what} not within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn identity_of(cert_pem: &str) -> SpiffeId {
    let der = switchyard_pki::load_certs_pem(cert_pem).unwrap();
    switchyard_pki::peer_identity_from_chain(&der).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_identity_address_and_rtts_through_the_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // 6 s certificates: renewal due after 3 s.
    let hub = hub(dir.path(), Duration::from_secs(6)).await?;
    let a = agent(&hub, dir.path(), "north-1").await?;
    agent(&hub, dir.path(), "south-1").await?;
    let gw = a.gateway.clone();

    // Issued over the uplink for this POP's gateway, stored with the key
    // 0600, and handed out again while young.
    let first = gw.identity("gw0").await?;
    assert_eq!(
        identity_of(&first.cert_pem),
        SpiffeId::gateway(DOMAIN, "north-1", "gw0")?
    );
    let tls = dir.path().join("agent-north-1").join("tls");
    assert_eq!(
        std::fs::read_to_string(tls.join("gw-gw0.crt"))?,
        first.cert_pem
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tls.join("gw-gw0.key"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(gw.identity("gw0").await?.cert_pem, first.cert_pem);
    // Not a DNS label: refused before any request.
    assert!(gw.identity("GW/0").await.is_err());

    // Past half life: a new certificate and a new key.
    tokio::time::sleep(
        first
            .renew_at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(200),
    )
    .await;
    let second = gw.identity("gw0").await?;
    assert_ne!(second.cert_pem, first.cert_pem);
    assert_ne!(second.key_pem, first.key_pem);
    assert!(second.renew_at > first.renew_at);
    assert_eq!(
        a.status
            .counters
            .gateway_certs_issued
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // The tunnel address reaches the POP's record; RTTs the hub's state.
    gw.report("127.0.0.1:7443", Vec::new()).await?;
    let addr = |h: &RunningHub| {
        h.hub
            .local(|s| s.pops.get("north-1").map(|p| p.gateway_addr.clone()))
            .unwrap_or_default()
    };
    wait("gateway address in the hub's state", || {
        addr(&hub) == "127.0.0.1:7443"
    })
    .await;
    assert!(gw.report("not an address", Vec::new()).await.is_err());
    // A wildcard IP is announced as the IP this host uses toward the hub.
    gw.report("0.0.0.0:7445", Vec::new()).await?;
    wait("concrete gateway address in the hub's state", || {
        addr(&hub) == "127.0.0.1:7445"
    })
    .await;
    let rtt = |h: &RunningHub| {
        h.hub.local(|s| {
            s.rtts
                .contains_key(&("north-1".to_string(), "south-1".to_string()))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rtt(&hub) {
        assert!(Instant::now() < deadline, "RTT not in the hub's state");
        gw.report(
            "",
            vec![pb::RttSample {
                to_pop: "south-1".into(),
                rtt_us: 12_000,
                loss_permille: 0,
            }],
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The local API: the secret is required...
    let api = a.gateway_api_addr.unwrap().to_string();
    let mut wrong = local_api::connect(&api, "not-the-secret").await?;
    let err = wrong
        .gateway_identity(pb::GatewayIdentityRequest {
            instance: "gw0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // ... and with it, the identity and the view stream.
    let secret = std::fs::read_to_string(
        dir.path()
            .join("agent-north-1")
            .join(local_api::SECRET_FILE),
    )?;
    let mut c = local_api::connect(&api, secret.trim()).await?;
    let id = c
        .gateway_identity(pb::GatewayIdentityRequest {
            instance: "gw0".into(),
        })
        .await?
        .into_inner();
    assert_eq!(id.pop, "north-1");
    assert_eq!(
        identity_of(&id.cert_pem),
        SpiffeId::gateway(DOMAIN, "north-1", "gw0")?
    );
    assert!(id.not_after_ms > 0);
    let bad = c
        .gateway_identity(pb::GatewayIdentityRequest {
            instance: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let mut views = c.watch_view(pb::WatchViewRequest {}).await?.into_inner();
    let v = tokio::time::timeout(Duration::from_secs(10), views.message())
        .await??
        .expect("a view");
    assert_eq!(v.pop, "north-1");
    c.gateway_report(pb::GatewayReportRequest {
        instance: "gw0".into(),
        tunnel_addr: "127.0.0.1:7444".into(),
        samples: Vec::new(),
    })
    .await?;
    wait("new gateway address in the hub's state", || {
        addr(&hub) == "127.0.0.1:7444"
    })
    .await;
    // An oversized request is refused by the agent from its length (a
    // client without our client's own limit), and the API serves on.
    let value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = secret.trim().parse()?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{api}"))?
        .connect()
        .await?;
    let mut raw = pb::local_gateway_client::LocalGatewayClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert(local_api::SECRET_HEADER, value.clone());
            Ok(req)
        },
    );
    let huge = raw
        .gateway_report(pb::GatewayReportRequest {
            instance: "gw0".into(),
            tunnel_addr: "x".repeat(local_api::MAX_REQUEST + 1),
            samples: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), tonic::Code::OutOfRange, "{huge}");
    raw.gateway_identity(pb::GatewayIdentityRequest {
        instance: "gw0".into(),
    })
    .await?;
    // A change of the POP record is a new view on the stream.
    let next = tokio::time::timeout(Duration::from_secs(10), views.message())
        .await??
        .expect("a newer view");
    assert!(next.epoch > v.epoch);

    a.shutdown().await;
    hub.shutdown().await;
    Ok(())
}

//! The uplink shell and enrolment against a real single-node hub started in
//! process, with a minimal QUIC client written from the wire contract (the
//! hub crate does not depend on the agent).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use switchyard_hub::server::{self, HubConfig, RunningHub};
use switchyard_pki::{ExpectedPeer, JoinToken, SpiffeId};
use switchyard_proto::{
    pb::{self, enrolment_client::EnrolmentClient, uplink_frame::Kind as FrameKind},
    uplink::{self as wire, Direction, FrameReader},
};

const DOMAIN: &str = "uplink.test";

struct TestHub {
    running: RunningHub,
    _dir: tempfile::TempDir,
}

async fn start_hub() -> Result<TestHub> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("hub"))?;
    let running = server::start(HubConfig::loopback_bootstrap(dir.path(), DOMAIN)).await?;
    Ok(TestHub { running, _dir: dir })
}

impl TestHub {
    fn ca_pem(&self) -> String {
        self.running
            .hub
            .local(|s| s.federation.as_ref().unwrap().ca_cert_pem.clone())
    }

    fn ca_fingerprint(&self) -> String {
        let pem = self.ca_pem();
        let der = switchyard_pki::load_certs_pem(&pem).unwrap();
        switchyard_pki::cert_fingerprint(&der[0])
    }

    /// Issues a POP token through Raft (as `token create --pop` does).
    async fn pop_token(&self, pop: &str, ttl: Duration) -> Result<String> {
        let token = JoinToken::generate(&self.ca_fingerprint())?;
        let now = switchyard_hub::server::admin::now_ms();
        let r = self
            .running
            .hub
            .propose(pb::Command {
                kind: Some(pb::command::Kind::IssueToken(pb::IssueToken {
                    token: Some(pb::JoinToken {
                        id: token.id().to_string(),
                        secret_sha256: token.secret_sha256(),
                        kind: pb::TokenKind::Pop as i32,
                        pop: pop.to_string(),
                        labels: Some(pb::Labels {
                            region: "eu".into(),
                            ..Default::default()
                        }),
                        expires_at_ms: now + ttl.as_millis() as i64,
                        ..Default::default()
                    }),
                })),
            })
            .await?;
        assert_eq!(r.error, pb::ErrorCode::None as i32, "{}", r.message);
        Ok(token.to_string())
    }

    async fn enrol_client(
        &self,
        token: &str,
    ) -> Result<EnrolmentClient<tonic::transport::Channel>> {
        let parsed = JoinToken::parse(token)?;
        let tls = switchyard_pki::ca_pinned_client_config(
            &parsed.ca_fingerprint(),
            vec![server::ALPN_H2.to_vec()],
        )?;
        let ch = server::channel::tls_channel(&self.running.grpc_addr.to_string(), Arc::new(tls))?;
        Ok(EnrolmentClient::new(ch))
    }

    async fn enrol(&self, token: &str, csr_for: &str) -> Result<(pb::EnrolResponse, String)> {
        let (csr, key) = switchyard_pki::generate_csr(&SpiffeId::pop(DOMAIN, csr_for)?)?;
        let mut c = self.enrol_client(token).await?;
        let r = c
            .enrol(pb::EnrolRequest {
                token: token.to_string(),
                csr_pem: csr,
                agent_version: "test".into(),
            })
            .await?
            .into_inner();
        Ok((r, key))
    }

    /// A POP enrolled with a fresh token: (cert, key).
    async fn new_pop(&self, pop: &str) -> Result<(String, String)> {
        let token = self.pop_token(pop, Duration::from_secs(60)).await?;
        let (r, key) = self.enrol(&token, pop).await?;
        Ok((r.cert_pem, key))
    }
}

fn rejected(reason: &str) -> u64 {
    let text = switchyard_hub::metrics::install()
        .map(|h| h.render())
        .unwrap_or_default();
    let needle = format!("switchyard_hub_rejected_requests_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn status_of(r: Result<(pb::EnrolResponse, String)>) -> tonic::Status {
    let e = r.expect_err("refused");
    e.downcast::<tonic::Status>().expect("a gRPC status")
}

// ----- QUIC test client ------------------------------------------------

fn client_endpoint(identity: Option<(&str, &str)>, ca_pem: &str) -> Result<quinn::Endpoint> {
    let tls = switchyard_pki::client_config(
        identity,
        ca_pem,
        ExpectedPeer::AnyHub {
            domain: DOMAIN.into(),
        },
        vec![wire::ALPN.to_vec()],
    )?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

struct Client {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
    _ep: quinn::Endpoint,
}

impl Client {
    async fn connect(hub: &TestHub, cert: &str, key: &str) -> Result<Self> {
        let chain = format!("{cert}\n{}", hub.ca_pem());
        let ep = client_endpoint(Some((&chain, key)), &hub.ca_pem())?;
        let conn = ep
            .connect(hub.running.uplink_addr, switchyard_pki::SNI_NAME)?
            .await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            conn,
            send,
            recv,
            reader: FrameReader::new(Direction::HubToAgent),
            _ep: ep,
        })
    }

    async fn send(&mut self, kind: FrameKind) -> Result<()> {
        let mut buf = BytesMut::new();
        wire::encode_frame(&pb::UplinkFrame { kind: Some(kind) }, &mut buf)?;
        self.send.write_all(&buf).await?;
        Ok(())
    }

    async fn hello(&mut self, pop: &str) -> Result<()> {
        self.send(FrameKind::Hello(pb::Hello {
            pop: pop.into(),
            agent_version: "test".into(),
            protocol_version: wire::PROTOCOL_VERSION,
            ..Default::default()
        }))
        .await
    }

    fn heartbeat(&self, seq: u64) -> Result<()> {
        let d = wire::encode_datagram(pb::uplink_datagram::Kind::Heartbeat(pb::Heartbeat {
            seq,
            sent_at_us: 0,
        }))?;
        self.conn.send_datagram(d)?;
        Ok(())
    }

    /// The next frame, or an error when the stream ends or nothing comes.
    async fn next(&mut self) -> Result<FrameKind> {
        loop {
            if let Some(f) = self.reader.next_frame()? {
                return f.kind.context("frame without kind");
            }
            let chunk = tokio::time::timeout(
                Duration::from_secs(5),
                self.recv.read_chunk(64 * 1024, true),
            )
            .await
            .context("no frame within 5 s")??;
            match chunk {
                Some(c) => self.reader.push(&c.bytes)?,
                None => bail!("stream finished"),
            }
        }
    }

    /// Frames until one matches.
    async fn until<T>(&mut self, mut f: impl FnMut(FrameKind) -> Option<T>) -> Result<T> {
        for _ in 0..50 {
            if let Some(t) = f(self.next().await?) {
                return Ok(t);
            }
        }
        bail!("no matching frame")
    }

    /// Waits for the connection to be closed by the hub; returns the code.
    async fn closed(&self) -> Result<u64> {
        let e = tokio::time::timeout(Duration::from_secs(3), self.conn.closed())
            .await
            .context("not closed within 3 s")?;
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => Ok(c.error_code.into_inner()),
            other => bail!("closed otherwise: {other}"),
        }
    }
}

fn export(ns: &str, name: &str, pop: &str, port: u32) -> pb::ServiceExport {
    pb::ServiceExport {
        service: Some(pb::ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }),
        pop: pop.into(),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            port,
            protocol: 0,
        }],
        r#type: pb::ServiceType::ClusterSetIp as i32,
        endpoints: vec![pb::Endpoint {
            address: "10.0.0.1".into(),
            port,
            ready: true,
            hostname: String::new(),
        }],
        ..Default::default()
    }
}

// ----- tests -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_issues_a_certificate_and_refuses_bad_tokens() -> Result<()> {
    let hub = start_hub().await?;

    // Good token: a certificate for the token's POP, the POP is created.
    let token = hub.pop_token("paris", Duration::from_secs(60)).await?;
    let (r, _key) = hub.enrol(&token, "paris").await?;
    assert_eq!(r.pop, "paris");
    assert_eq!(r.domain, DOMAIN);
    assert_eq!(r.labels.as_ref().unwrap().region, "eu");
    assert_eq!(r.hub_quic_addrs, vec![hub.running.uplink_addr.to_string()]);
    assert!(!r.hub_grpc_addrs.is_empty());
    let der = switchyard_pki::load_certs_pem(&r.cert_pem)?;
    assert_eq!(
        switchyard_pki::peer_identity_from_chain(&der)?,
        SpiffeId::pop(DOMAIN, "paris")?
    );
    assert!(hub.running.hub.local(|s| s.pops.contains_key("paris")));

    // Replayed.
    let before = rejected("token_replayed");
    let s = status_of(hub.enrol(&token, "paris").await);
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert_eq!(rejected("token_replayed"), before + 1);

    // Expired.
    let expired = hub.pop_token("lyon", Duration::from_millis(1)).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = rejected("token_expired");
    let s = status_of(hub.enrol(&expired, "lyon").await);
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("expired"), "{s:?}");
    assert_eq!(rejected("token_expired"), before + 1);

    // Token for A, CSR for B: refused, and the token is not spent.
    let a_token = hub.pop_token("berlin", Duration::from_secs(60)).await?;
    let before = rejected("token_wrong_pop");
    let s = status_of(hub.enrol(&a_token, "munich").await);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert_eq!(rejected("token_wrong_pop"), before + 1);
    assert!(!hub.running.hub.local(|s| s.pops.contains_key("munich")));
    let (r, _) = hub.enrol(&a_token, "berlin").await?;
    assert_eq!(r.pop, "berlin");

    // Wrong CA hash: the pinned client refuses the server itself, so the
    // secret never leaves; a server-side check counts a token that reaches
    // it with another hash (sent over a connection pinned correctly).
    let good = hub.pop_token("rome", Duration::from_secs(60)).await?;
    let other_ca = switchyard_pki::CertificateAuthority::generate(DOMAIN)?;
    let forged = good.replace(&hub.ca_fingerprint(), &other_ca.fingerprint());
    assert_ne!(forged, good);
    let (csr, _) = switchyard_pki::generate_csr(&SpiffeId::pop(DOMAIN, "rome")?)?;
    let mut c = hub.enrol_client(&good).await?;
    let before = rejected("token_wrong_ca");
    let s = c
        .enrol(pb::EnrolRequest {
            token: forged.clone(),
            csr_pem: csr,
            agent_version: String::new(),
        })
        .await
        .expect_err("wrong CA refused");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert_eq!(rejected("token_wrong_ca"), before + 1);
    // And a client pinned to the forged hash cannot even connect.
    assert!(hub.enrol(&forged, "rome").await.is_err());

    hub.running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_welcome_view_exports_and_identity() -> Result<()> {
    let hub = start_hub().await?;
    let (cert, key) = hub.new_pop("paris").await?;
    hub.new_pop("lyon").await?;

    let mut c = Client::connect(&hub, &cert, &key).await?;
    c.hello("paris").await?;
    let welcome = c
        .until(|k| match k {
            FrameKind::Welcome(w) => Some(w),
            _ => None,
        })
        .await?;
    assert_eq!(welcome.hub_node, hub.running.hub.id().to_string());
    assert_eq!(welcome.export_seq, 0);
    c.heartbeat(1)?;
    let view = c
        .until(|k| match k {
            FrameKind::ViewSnapshot(v) => v.view,
            _ => None,
        })
        .await?;
    assert_eq!(view.pop, "paris");

    // Liveness Online committed.
    wait_for(|| hub.running.hub.local(|s| s.liveness("paris")) == pb::PopLiveness::Online).await?;

    // An export naming another POP is stored under the certificate's POP.
    c.send(FrameKind::ExportDelta(pb::ExportDelta {
        seq: 1,
        upserts: vec![export("shop", "web", "lyon", 80)],
        withdrawals: vec![],
        full: true,
    }))
    .await?;
    // The ack (after commit) and the view delta carrying the POP's own
    // service come in either order; other deltas (liveness) may come too.
    let (mut acked, mut delta) = (None, None);
    while acked.is_none() || delta.is_none() {
        match c.next().await? {
            FrameKind::ExportAck(a) => acked = Some(a.seq),
            FrameKind::ViewDelta(d) if !d.upserts.is_empty() => delta = Some(d),
            _ => {}
        }
    }
    assert_eq!(acked, Some(1));
    assert!(delta.unwrap().epoch > view.epoch);
    let keys: Vec<(String, String, String)> = hub
        .running
        .hub
        .local(|s| s.exports.keys().cloned().collect());
    assert_eq!(
        keys,
        vec![("shop".to_string(), "web".to_string(), "paris".to_string())]
    );

    // Renewal over the session.
    let (csr, _) = switchyard_pki::generate_csr(&SpiffeId::pop(DOMAIN, "paris")?)?;
    c.send(FrameKind::CsrRequest(pb::CsrRequest {
        request_id: 7,
        csr_pem: csr,
        gateway_instance: String::new(),
    }))
    .await?;
    let issued = c
        .until(|k| match k {
            FrameKind::CertIssued(i) => Some(i),
            _ => None,
        })
        .await?;
    assert_eq!(issued.request_id, 7);
    assert!(issued.error.is_empty(), "{}", issued.error);
    let der = switchyard_pki::load_certs_pem(&issued.cert_pem)?;
    assert_eq!(
        switchyard_pki::peer_identity_from_chain(&der)?,
        SpiffeId::pop(DOMAIN, "paris")?
    );

    // Hello naming another POP than the certificate: forbidden.
    let mut c2 = Client::connect(&hub, &cert, &key).await?;
    c2.hello("lyon").await?;
    let err = c2
        .until(|k| match k {
            FrameKind::Error(e) => Some(e),
            _ => None,
        })
        .await?;
    assert_eq!(err.code, pb::UplinkErrorCode::Forbidden as i32);

    hub.running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_refused() -> Result<()> {
    let hub = start_hub().await?;
    let ep = client_endpoint(None, &hub.ca_pem())?;
    let r = async {
        let conn = ep
            .connect(hub.running.uplink_addr, switchyard_pki::SNI_NAME)?
            .await?;
        // TLS 1.3: the client may finish before the server refuses; the
        // refusal then closes the connection at once.
        let (mut s, _r) = conn.open_bi().await?;
        s.write_all(b"x").await?;
        let e = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await?;
        anyhow::Ok(e)
    }
    .await;
    match r {
        Err(_) => {}
        // Refused by TLS: a transport-level close (certificate required
        // alert), never a session.
        Ok(e) => assert!(
            matches!(e, quinn::ConnectionError::ConnectionClosed(_)),
            "unexpected: {e}"
        ),
    }
    hub.running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_pop_is_closed_and_refused() -> Result<()> {
    let hub = start_hub().await?;
    let (cert, key) = hub.new_pop("paris").await?;
    let mut c = Client::connect(&hub, &cert, &key).await?;
    c.hello("paris").await?;
    c.until(|k| matches!(k, FrameKind::Welcome(_)).then_some(()))
        .await?;

    let t0 = std::time::Instant::now();
    hub.running
        .hub
        .propose(pb::Command {
            kind: Some(pb::command::Kind::AddRevocation(pb::AddRevocation {
                revocation: Some(pb::Revocation {
                    kind: pb::RevocationKind::Pop as i32,
                    subject: "paris".into(),
                    at_ms: 0,
                    reason: "test".into(),
                }),
            })),
        })
        .await?;
    let code = c.closed().await?;
    assert_eq!(code, pb::UplinkErrorCode::Revoked as u64);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // A new connection is refused.
    let c2 = Client::connect(&hub, &cert, &key).await;
    if let Ok(c2) = c2 {
        assert_eq!(c2.closed().await?, pb::UplinkErrorCode::Revoked as u64);
    }
    hub.running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() -> Result<()> {
    let hub = start_hub().await?;
    let (cert_a, key_a) = hub.new_pop("paris").await?;
    let (cert_b, key_b) = hub.new_pop("lyon").await?;

    let mut b = Client::connect(&hub, &cert_b, &key_b).await?;
    b.hello("lyon").await?;
    b.until(|k| matches!(k, FrameKind::Welcome(_)).then_some(()))
        .await?;

    // Oversized length prefix.
    let mut a = Client::connect(&hub, &cert_a, &key_a).await?;
    a.send.write_all(&u32::MAX.to_be_bytes()).await?;
    let err = a
        .until(|k| match k {
            FrameKind::Error(e) => Some(e),
            _ => None,
        })
        .await?;
    assert_eq!(err.code, pb::UplinkErrorCode::Limit as i32);
    a.closed().await?;

    // Garbage body.
    let mut a = Client::connect(&hub, &cert_a, &key_a).await?;
    a.send
        .write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await?;
    let err = a
        .until(|k| match k {
            FrameKind::Error(e) => Some(e),
            _ => None,
        })
        .await?;
    assert_eq!(err.code, pb::UplinkErrorCode::Protocol as i32);
    a.closed().await?;

    // Many streams at once from one peer: only one is ever accepted, the
    // others stay blocked by flow control, nothing is buffered for them.
    let a = Client::connect(&hub, &cert_a, &key_a).await?;
    let mut opened = 0;
    for _ in 0..1000 {
        match tokio::time::timeout(Duration::from_millis(2), a.conn.open_bi()).await {
            Ok(Ok(_)) => opened += 1,
            _ => break,
        }
    }
    assert_eq!(opened, 0, "the transport allows a single bidi stream");
    let uni = tokio::time::timeout(Duration::from_millis(50), a.conn.open_uni()).await;
    assert!(uni.is_err() || uni.unwrap().is_err(), "no uni streams");
    drop(a);

    // The other POP's session still works.
    b.send(FrameKind::ExportDelta(pb::ExportDelta {
        seq: 1,
        upserts: vec![export("shop", "db", "lyon", 5432)],
        withdrawals: vec![],
        full: true,
    }))
    .await?;
    let ack = b
        .until(|k| match k {
            FrameKind::ExportAck(a) => Some(a),
            _ => None,
        })
        .await?;
    assert_eq!(ack.seq, 1);
    hub.running.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_goes_offline_and_reconnect_comes_back() -> Result<()> {
    let hub = start_hub().await?;
    let (cert, key) = hub.new_pop("paris").await?;
    let mut c = Client::connect(&hub, &cert, &key).await?;
    c.hello("paris").await?;
    c.until(|k| matches!(k, FrameKind::Welcome(_)).then_some(()))
        .await?;
    for seq in 1..=4 {
        c.heartbeat(seq)?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let live = || hub.running.hub.local(|s| s.liveness("paris"));
    assert_eq!(live(), pb::PopLiveness::Online);
    c.conn.close(0u32.into(), b"bye");
    drop(c);
    for _ in 0..150 {
        if live() == pb::PopLiveness::Offline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(live(), pb::PopLiveness::Offline);

    // Back: Online again, damped (failback) until the timer ends it.
    let mut c = Client::connect(&hub, &cert, &key).await?;
    c.hello("paris").await?;
    c.until(|k| matches!(k, FrameKind::Welcome(_)).then_some(()))
        .await?;
    wait_for(|| live() == pb::PopLiveness::Online).await?;
    assert!(hub
        .running
        .hub
        .local(|s| s.pop_status.get("paris").is_some_and(|st| st.damped)));
    hub.running.shutdown().await;
    Ok(())
}

async fn wait_for(mut f: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..100 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("condition not met within 2 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_address_and_gateway_certificates() -> Result<()> {
    let hub = start_hub().await?;
    let (cert, key) = hub.new_pop("paris").await?;
    hub.new_pop("lyon").await?;

    let mut c = Client::connect(&hub, &cert, &key).await?;
    c.send(FrameKind::Hello(pb::Hello {
        pop: "paris".into(),
        agent_version: "test".into(),
        protocol_version: wire::PROTOCOL_VERSION,
        gateway_addr: "127.0.0.1:7443".into(),
        ..Default::default()
    }))
    .await?;
    let gw = |h: &TestHub| {
        h.running
            .hub
            .local(|s| s.pops.get("paris").map(|p| p.gateway_addr.clone()))
            .unwrap_or_default()
    };
    wait_for(|| gw(&hub) == "127.0.0.1:7443").await?;
    // Announced later (a separate gateway registered with the agent).
    c.send(FrameKind::GatewayAnnounce(pb::GatewayAnnounce {
        gateway_addr: "127.0.0.1:7444".into(),
    }))
    .await?;
    wait_for(|| gw(&hub) == "127.0.0.1:7444").await?;

    // A gateway certificate of the caller's own POP is issued...
    let (csr, _) = switchyard_pki::generate_csr(&SpiffeId::gateway(DOMAIN, "paris", "gw0")?)?;
    c.send(FrameKind::CsrRequest(pb::CsrRequest {
        request_id: 1,
        csr_pem: csr,
        gateway_instance: "gw0".into(),
    }))
    .await?;
    let issued = c
        .until(|k| match k {
            FrameKind::CertIssued(i) => Some(i),
            _ => None,
        })
        .await?;
    assert!(issued.error.is_empty(), "{}", issued.error);
    let der = switchyard_pki::load_certs_pem(&issued.cert_pem)?;
    assert_eq!(
        switchyard_pki::peer_identity_from_chain(&der)?,
        SpiffeId::gateway(DOMAIN, "paris", "gw0")?
    );
    // ... one for another POP's gateway is refused, whatever the CSR says.
    let (csr, _) = switchyard_pki::generate_csr(&SpiffeId::gateway(DOMAIN, "lyon", "gw0")?)?;
    c.send(FrameKind::CsrRequest(pb::CsrRequest {
        request_id: 2,
        csr_pem: csr,
        gateway_instance: "gw0".into(),
    }))
    .await?;
    let refused = c
        .until(|k| match k {
            FrameKind::CertIssued(i) => Some(i),
            _ => None,
        })
        .await?;
    assert_eq!(refused.request_id, 2);
    assert!(refused.cert_pem.is_empty());
    assert!(refused.error.contains("paris/gw/gw0"), "{}", refused.error);

    // A malformed address closes this session with a protocol error.
    c.send(FrameKind::GatewayAnnounce(pb::GatewayAnnounce {
        gateway_addr: "not an address".into(),
    }))
    .await?;
    let err = c
        .until(|k| match k {
            FrameKind::Error(e) => Some(e),
            _ => None,
        })
        .await?;
    assert_eq!(err.code, pb::UplinkErrorCode::Protocol as i32);
    assert_eq!(gw(&hub), "127.0.0.1:7444");

    hub.running.shutdown().await;
    Ok(())
}

/// Connection migration: the agent's address changes (a new local socket,
/// as after a NAT rebinding or a DHCP renewal); the session survives, the
/// POP stays online, exports still commit, and the hub shows the new
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pop_whose_address_changes_stays_connected() -> Result<()> {
    let hub = start_hub().await?;
    let (cert, key) = hub.new_pop("paris").await?;
    let mut c = Client::connect(&hub, &cert, &key).await?;
    c.hello("paris").await?;
    c.until(|k| matches!(k, FrameKind::Welcome(_)).then_some(()))
        .await?;
    c.heartbeat(1)?;
    let live = || hub.running.hub.local(|s| s.liveness("paris"));
    wait_for(|| live() == pb::PopLiveness::Online).await?;
    let before = c._ep.local_addr()?;
    let sessions = || hub.running.hub.sessions().list();
    wait_for(|| sessions().first().is_some_and(|s| s.last_heartbeat_ms > 0)).await?;
    assert_eq!(sessions()[0].remote_addr, before.to_string());

    // A new socket on another port: quinn migrates the connection.
    let socket = std::net::UdpSocket::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let after = socket.local_addr()?;
    assert_ne!(before, after);
    c._ep.rebind(socket)?;
    for seq in 2..=6 {
        c.heartbeat(seq)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.send(FrameKind::ExportDelta(pb::ExportDelta {
        seq: 1,
        upserts: vec![export("shop", "cart", "paris", 80)],
        withdrawals: vec![],
        full: true,
    }))
    .await?;
    let ack = c
        .until(|k| match k {
            FrameKind::ExportAck(a) => Some(a),
            _ => None,
        })
        .await?;
    assert_eq!(ack.seq, 1);
    wait_for(|| {
        sessions()
            .first()
            .is_some_and(|s| s.remote_addr == after.to_string())
    })
    .await?;
    assert_eq!(sessions().len(), 1, "one session, not a reconnect");
    assert_eq!(live(), pb::PopLiveness::Online);
    assert_eq!(
        hub.running
            .hub
            .local(|s| s.pop_status.get("paris").map(|st| st.was_offline)),
        Some(false),
        "never offline"
    );
    hub.running.shutdown().await;
    Ok(())
}

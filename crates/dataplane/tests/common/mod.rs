//! Shared helpers of the gateway tests: a CA, real TCP backends, hand-built
//! views and a UDP relay that can black-hole a tunnel.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard_dataplane::{
    start, GatewayConfig, GatewayIdentity, RunningGateway, ServiceKey, VipBind,
};
use switchyard_pki::{CertificateAuthority, SpiffeId};
use switchyard_proto::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

pub const DOMAIN: &str = "test.switchyard";
pub const VALIDITY: Duration = Duration::from_secs(3600);

pub fn ca() -> CertificateAuthority {
    CertificateAuthority::generate(DOMAIN).unwrap()
}

pub fn identity_for(ca: &CertificateAuthority, id: &SpiffeId) -> GatewayIdentity {
    let kp = ca.issue(id, VALIDITY).unwrap();
    GatewayIdentity {
        cert_chain_pem: kp.cert_pem,
        key_pem: kp.key_pem,
        ca_pem: ca.cert_pem().to_owned(),
        domain: DOMAIN.to_owned(),
    }
}

pub fn gw_identity(ca: &CertificateAuthority, pop: &str) -> GatewayIdentity {
    identity_for(ca, &SpiffeId::gateway(DOMAIN, pop, "gw0").unwrap())
}

pub fn web() -> ServiceKey {
    ServiceKey::new("ns", "web")
}

/// A backend that reads everything until the client's EOF, then answers
/// `<name>:` followed by what it read, then closes. Exercises half-close
/// in both directions.
pub async fn backend(name: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = listen_deep("127.0.0.1:0".parse().unwrap());
    let addr = l.local_addr().unwrap();
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_err() {
                    return;
                }
                let _ = s.write_all(format!("{name}:").as_bytes()).await;
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A listener with a deep accept queue (bursts of hundreds of connects).
pub fn listen_deep(addr: SocketAddr) -> TcpListener {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s.listen(4096).unwrap()
}

/// A backend that greets each client with `<name>\n` and then holds the
/// connection until the client closes.
pub async fn greeter(name: &str) -> SocketAddr {
    let l = listen_deep("127.0.0.1:0".parse().unwrap());
    let addr = l.local_addr().unwrap();
    let greeting = format!("{name}\n").into_bytes();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if s.write_all(&greeting).await.is_ok() {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                }
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 where nothing listens (bound, then closed).
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Sends `data` to `addr`, half-closes, reads the whole answer.
pub async fn exchange(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.write_all(data).await.context("write")?;
    s.shutdown().await.context("shutdown")?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .context("answer timed out")?
        .context("read")?;
    Ok(out)
}

/// Which backend served `addr`: the name before the first `:`; checks
/// that the payload came back intact.
pub async fn served_by(addr: SocketAddr, data: &[u8]) -> Result<String> {
    let out = exchange(addr, data).await?;
    let Some(colon) = out.iter().position(|b| *b == b':') else {
        bail!("no answer (got {} bytes)", out.len());
    };
    if &out[colon + 1..] != data {
        bail!(
            "payload corrupted: {} bytes back, {} sent",
            out.len() - colon - 1,
            data.len()
        );
    }
    Ok(String::from_utf8_lossy(&out[..colon]).into_owned())
}

pub fn endpoint(addr: SocketAddr) -> pb::Endpoint {
    pb::Endpoint {
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
        ready: true,
        hostname: String::new(),
    }
}

pub fn target(pop: &str, eps: &[SocketAddr]) -> pb::Target {
    pb::Target {
        pop: pop.to_owned(),
        weight: eps.len().max(1) as u32,
        endpoints: eps.iter().copied().map(endpoint).collect(),
    }
}

/// One ClusterSetIP service view with port 80 and these tiers.
pub fn service(key: &ServiceKey, vip: &str, tiers: Vec<Vec<pb::Target>>) -> pb::ServiceView {
    pb::ServiceView {
        service: Some(pb::ServiceKey {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        }),
        vip: vip.to_owned(),
        ports: vec![80],
        tiers: tiers
            .into_iter()
            .map(|targets| pb::Tier { targets })
            .collect(),
        service_ports: vec![pb::ServicePort {
            name: String::new(),
            port: 80,
            protocol: pb::Protocol::Tcp as i32,
        }],
        ..Default::default()
    }
}

pub fn view(
    pop: &str,
    epoch: u64,
    services: Vec<pb::ServiceView>,
    peers: &[(&str, SocketAddr)],
) -> pb::PopView {
    pb::PopView {
        pop: pop.to_owned(),
        epoch,
        services,
        peers: peers
            .iter()
            .map(|(p, a)| pb::PeerGateway {
                pop: (*p).to_owned(),
                gateway_addr: a.to_string(),
            })
            .collect(),
    }
}

/// A gateway on loopback with ephemeral listeners, and its view sender.
pub struct Gw {
    pub gw: RunningGateway,
    pub view: watch::Sender<Option<pb::PopView>>,
}

impl Gw {
    pub async fn start(ca: &CertificateAuthority, pop: &str) -> Gw {
        Self::start_with(gw_identity(ca, pop), pop, |_| {}).await
    }

    pub async fn start_with(
        identity: GatewayIdentity,
        pop: &str,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Gw {
        let mut cfg = GatewayConfig::new(pop, "gw0", "127.0.0.1:0".parse().unwrap(), identity);
        cfg.vip_bind = VipBind::Ephemeral("127.0.0.1".parse().unwrap());
        // Tests share two cores with parallel builds: a generous probe
        // timeout keeps a slow answer from looking like a dead peer.
        cfg.limits.probe_timeout_floor = Duration::from_millis(300);
        tweak(&mut cfg);
        let (tx, rx) = watch::channel(None);
        let gw = start(cfg, rx).await.unwrap();
        Gw { gw, view: tx }
    }

    /// Sends a view and waits until it is applied.
    pub async fn set_view(&self, v: pb::PopView) {
        let epoch = v.epoch;
        self.view.send_replace(Some(v));
        let mut applied = self.gw.applied_epoch();
        tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|e| *e >= epoch))
            .await
            .expect("view applied in time")
            .unwrap();
    }

    pub fn vip(&self, key: &ServiceKey) -> SocketAddr {
        self.gw.listener(key, 80).expect("listener bound")
    }

    /// Waits until the prober sees `pop` in state `up`.
    pub async fn wait_peer(&self, pop: &str, up: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .gw
                .peer_health()
                .iter()
                .any(|p| p.pop == pop && p.up == up)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "peer {pop} never became up={up}: {:?}",
                self.gw.peer_health()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A UDP relay in front of one tunnel listener: forwards datagrams both
/// ways for a single client until `blackhole` is set, then drops them all
/// (a peer that vanished without a goodbye, like a SIGKILLed host whose
/// packets no longer arrive).
pub struct Relay {
    pub addr: SocketAddr,
    pub blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut a = vec![0u8; 65536];
            let mut b = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut a) => {
                        let Ok((n, from)) = r else { return };
                        client = Some(from);
                        if !bh.load(Ordering::Relaxed) {
                            let _ = back.send(&a[..n]).await;
                        }
                    }
                    r = back.recv(&mut b) => {
                        let Ok(n) = r else { continue };
                        if let (Some(c), false) = (client, bh.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            blackhole,
            task,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! What the agent does for its POP's gateways, whether they run in the
//! agent's process (`switchyard agent --gateway`) or as their own process
//! over the local API ([`crate::local_api`]):
//!
//! - **identity**: a certificate for `spiffe://D/pop/<pop>/gw/<instance>`,
//!   issued by the hub over the live uplink from a CSR whose key the agent
//!   generates. Stored in the data dir as `tls/gw-<instance>.crt` and
//!   `tls/gw-<instance>.key` (0600); handed out again while in the first
//!   half of its life, renewed after that (and the stored one, while still
//!   valid, when no hub answers);
//! - **view**: the POP's decision table as a `watch` of `PopView`;
//! - **reports**: the gateway's tunnel address (announced to the hub, which
//!   records it for other POPs' `peers`) and its RTT samples (sent as
//!   uplink RTT reports).
//!
//! The uplink shell in [`crate::run`] owns the session; this module talks
//! to it through channels ([`GatewayLink`]) and never blocks it.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_pki::SpiffeId;
use switchyard_proto::pb;
use switchyard_proto::uplink::{MAX_GATEWAY_ADDR_LEN, MAX_RTT_SAMPLES};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::config::{write_atomic, DataDir};
use crate::enrol;
use crate::http::Status;

/// How long an identity request waits for the hub's answer (including the
/// wait for an established uplink).
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);

/// Gateway certificate requests waiting for the uplink, at most.
const MAX_QUEUED_CSRS: usize = 16;
/// RTT reports waiting for the uplink, at most (newer ones are dropped
/// while it is full: RTTs are refreshed continuously anyway).
const MAX_QUEUED_REPORTS: usize = 8;

/// Why a gateway identity could not be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayIdentityError {
    /// The instance name is not a DNS label.
    #[error("gateway instance {0:?} is not a DNS label (a-z, 0-9, '-', at most 63)")]
    BadInstance(String),
    /// No valid stored certificate and the hub did not issue one.
    #[error("no certificate for gateway {instance}: {reason}")]
    Unavailable {
        /// The instance.
        instance: String,
        /// Why (hub unreachable, refused, ...).
        reason: String,
    },
}

/// Why a gateway report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayReportError {
    /// The tunnel address is not `host:port` or too long.
    #[error("tunnel address {0:?} is not host:port (at most 255 bytes)")]
    BadAddress(String),
}

/// A gateway's certificate, key and CA.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayIdentity {
    /// The POP.
    pub pop: String,
    /// Trust domain.
    pub domain: String,
    /// The gateway instance.
    pub instance: String,
    /// Leaf certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
    /// Federation CA, PEM.
    pub ca_pem: String,
    /// Expiry of the certificate.
    pub not_after: SystemTime,
    /// When to ask again (half life).
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for GatewayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("GatewayIdentity")
            .field("pop", &self.pop)
            .field("instance", &self.instance)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A gateway CSR for the uplink shell to send.
#[derive(Debug)]
pub(crate) struct CsrJob {
    /// Gateway instance.
    pub instance: String,
    /// The CSR, PEM.
    pub csr_pem: String,
    /// The hub's answer: the certificate PEM, or why not.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// The uplink shell's ends of the channels.
#[derive(Debug)]
pub(crate) struct GatewayLink {
    /// Gateway CSRs to send (one at a time, when the session is up).
    pub csrs: mpsc::Receiver<CsrJob>,
    /// RTT samples to report.
    pub rtts: mpsc::Receiver<Vec<pb::RttSample>>,
    /// The gateway's tunnel address (empty: none).
    pub addr: watch::Receiver<String>,
}

/// The agent's services for gateways. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GatewaySupport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    status: Arc<Status>,
    data: DataDir,
    ca_pem: String,
    csrs: mpsc::Sender<CsrJob>,
    rtts: mpsc::Sender<Vec<pb::RttSample>>,
    addr: watch::Sender<String>,
    /// QUIC uplink addresses of hub nodes: a wildcard tunnel address is
    /// announced with the IP this host uses toward them.
    hubs: Vec<String>,
    /// Serializes identity requests so one instance is issued once.
    issuing: Mutex<()>,
}

impl GatewaySupport {
    /// Support over `status` (pop, domain, view) and the data dir, plus the
    /// shell's ends of its channels. `gateway_addr`: the tunnel address
    /// known at start (empty: none yet).
    pub(crate) fn new(
        status: Arc<Status>,
        data: DataDir,
        ca_pem: String,
        gateway_addr: String,
        hubs: Vec<String>,
    ) -> (Self, GatewayLink) {
        let (csrs, csr_rx) = mpsc::channel(MAX_QUEUED_CSRS);
        let (rtts, rtt_rx) = mpsc::channel(MAX_QUEUED_REPORTS);
        let (addr, addr_rx) = watch::channel(gateway_addr);
        (
            Self {
                inner: Arc::new(Inner {
                    status,
                    data,
                    ca_pem,
                    csrs,
                    rtts,
                    addr,
                    hubs,
                    issuing: Mutex::new(()),
                }),
            },
            GatewayLink {
                csrs: csr_rx,
                rtts: rtt_rx,
                addr: addr_rx,
            },
        )
    }

    /// This POP's name.
    pub fn pop(&self) -> &str {
        &self.inner.status.pop
    }

    /// The federation's trust domain.
    pub fn domain(&self) -> &str {
        &self.inner.status.domain
    }

    /// The POP's decision table: the current one (if any) at once, then
    /// every newer one. The forwarding task ends with the agent.
    pub fn watch_view(&self) -> watch::Receiver<Option<pb::PopView>> {
        let mut held = self.inner.status.subscribe_view();
        let first = held.borrow_and_update().as_ref().map(|h| h.view.clone());
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = held.changed() => {
                        if r.is_err() {
                            return;
                        }
                        let v = held.borrow_and_update().as_ref().map(|h| h.view.clone());
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        rx
    }

    /// A gateway's tunnel address and RTT samples: the address is
    /// announced to the hub when it changed (empty: unchanged; a wildcard
    /// IP such as `0.0.0.0:7403` is replaced by the IP this host uses
    /// toward the hub nodes), the samples (at most [`MAX_RTT_SAMPLES`]) go
    /// out as an RTT report when the uplink is up, and are dropped
    /// otherwise.
    pub async fn report(
        &self,
        tunnel_addr: &str,
        mut samples: Vec<pb::RttSample>,
    ) -> Result<(), GatewayReportError> {
        if !tunnel_addr.is_empty() {
            if tunnel_addr.len() > MAX_GATEWAY_ADDR_LEN || !is_host_port(tunnel_addr) {
                return Err(GatewayReportError::BadAddress(
                    tunnel_addr.chars().take(64).collect(),
                ));
            }
            let concrete = self.concrete(tunnel_addr).await;
            let tunnel_addr = concrete.as_str();
            self.inner.addr.send_if_modified(|cur| {
                if cur == tunnel_addr {
                    false
                } else {
                    *cur = tunnel_addr.to_string();
                    true
                }
            });
        }
        samples.retain(|s| s.to_pop != self.inner.status.pop && s.rtt_us > 0);
        samples.truncate(MAX_RTT_SAMPLES);
        if !samples.is_empty() {
            // Full: the uplink is down or slow; the next report is as good.
            if self.inner.rtts.try_send(samples).is_ok() {
                self.inner
                    .status
                    .counters
                    .gateway_rtt_reports
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The certificate of gateway `instance`: the stored one while in the
    /// first half of its life; else a new one from the hub (within
    /// [`ISSUE_TIMEOUT`]); else, if the hub does not answer, the stored one
    /// while still valid.
    pub async fn identity(&self, instance: &str) -> Result<GatewayIdentity, GatewayIdentityError> {
        let id = SpiffeId::gateway(self.domain(), self.pop(), instance)
            .map_err(|_| GatewayIdentityError::BadInstance(instance.to_string()))?;
        let _one_at_a_time = self.inner.issuing.lock().await;
        let stored = self.load(instance, &id);
        let now = SystemTime::now();
        if let Some(s) = &stored {
            if now < s.renew_at {
                return Ok(s.clone());
            }
        }
        let counters = &self.inner.status.counters;
        match self.issue(instance, &id).await {
            Ok(fresh) => {
                counters
                    .gateway_certs_issued
                    .fetch_add(1, Ordering::Relaxed);
                Ok(fresh)
            }
            Err(reason) => match stored {
                Some(s) if now < s.not_after => {
                    tracing::warn!(
                        instance,
                        reason,
                        "gateway certificate not renewed; handing out the stored one"
                    );
                    Ok(s)
                }
                _ => {
                    counters
                        .gateway_certs_failed
                        .fetch_add(1, Ordering::Relaxed);
                    Err(GatewayIdentityError::Unavailable {
                        instance: instance.to_string(),
                        reason,
                    })
                }
            },
        }
    }

    /// `addr` with a wildcard IP replaced by this host's source IP toward
    /// the first resolvable hub node (a routing lookup: a connected UDP
    /// socket sends nothing); `addr` unchanged otherwise.
    async fn concrete(&self, addr: &str) -> String {
        let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
            return addr.to_string();
        };
        if !sa.ip().is_unspecified() {
            return addr.to_string();
        }
        for hub in &self.inner.hubs {
            let Ok(mut targets) = tokio::net::lookup_host(hub.as_str()).await else {
                continue;
            };
            let Some(target) = targets.find(|t| t.is_ipv4() == sa.is_ipv4()) else {
                continue;
            };
            let Ok(sock) = tokio::net::UdpSocket::bind((sa.ip(), 0)).await else {
                continue;
            };
            if sock.connect(target).await.is_err() {
                continue;
            }
            if let Ok(local) = sock.local_addr() {
                if !local.ip().is_unspecified() {
                    return std::net::SocketAddr::new(local.ip(), sa.port()).to_string();
                }
            }
        }
        tracing::warn!(
            addr,
            "gateway tunnel address is a wildcard and no hub route is known; pass --advertise"
        );
        addr.to_string()
    }

    fn cert_path(&self, instance: &str) -> PathBuf {
        self.inner.data.tls_dir().join(format!("gw-{instance}.crt"))
    }

    fn key_path(&self, instance: &str) -> PathBuf {
        self.inner.data.tls_dir().join(format!("gw-{instance}.key"))
    }

    /// The stored identity, if both files read and the certificate is for
    /// `id` (anything else is ignored and replaced by the next issue).
    fn load(&self, instance: &str, id: &SpiffeId) -> Option<GatewayIdentity> {
        let cert_pem = std::fs::read_to_string(self.cert_path(instance)).ok()?;
        let key_pem = std::fs::read_to_string(self.key_path(instance)).ok()?;
        self.identity_of(instance, id, cert_pem, key_pem).ok()
    }

    fn identity_of(
        &self,
        instance: &str,
        id: &SpiffeId,
        cert_pem: String,
        key_pem: String,
    ) -> Result<GatewayIdentity, String> {
        let chain = switchyard_pki::load_certs_pem(&cert_pem).map_err(|e| e.to_string())?;
        let got = switchyard_pki::peer_identity_from_chain(&chain).map_err(|e| e.to_string())?;
        if &got != id {
            return Err(format!("certificate is for {got}, not {id}"));
        }
        switchyard_pki::load_key_pem(&key_pem).map_err(|e| e.to_string())?;
        let validity = enrol::cert_validity(&cert_pem).ok_or("certificate has no validity")?;
        Ok(GatewayIdentity {
            pop: self.pop().to_string(),
            domain: self.domain().to_string(),
            instance: instance.to_string(),
            cert_pem,
            key_pem,
            ca_pem: self.inner.ca_pem.clone(),
            not_after: validity.1,
            renew_at: enrol::renewal_time(validity),
        })
    }

    async fn issue(&self, instance: &str, id: &SpiffeId) -> Result<GatewayIdentity, String> {
        let (csr_pem, key_pem) = switchyard_pki::generate_csr(id).map_err(|e| e.to_string())?;
        let (reply, answer) = oneshot::channel();
        let job = CsrJob {
            instance: instance.to_string(),
            csr_pem,
            reply,
        };
        let cert_pem = tokio::time::timeout(ISSUE_TIMEOUT, async {
            self.inner
                .csrs
                .send(job)
                .await
                .map_err(|_| "the agent's uplink is stopping".to_string())?;
            answer
                .await
                .map_err(|_| "the uplink session ended before the hub answered".to_string())?
        })
        .await
        .map_err(|_| format!("no answer from a hub within {ISSUE_TIMEOUT:?}"))??;
        let identity = self.identity_of(instance, id, cert_pem, key_pem)?;
        let (cert_path, key_path) = (self.cert_path(instance), self.key_path(instance));
        let (cert, key) = (identity.cert_pem.clone(), identity.key_pem.clone());
        tokio::task::spawn_blocking(move || {
            // Key first, like the POP's own identity.
            write_atomic(&key_path, key.as_bytes(), 0o600)?;
            write_atomic(&cert_path, cert.as_bytes(), 0o644)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        tracing::info!(instance, not_after = ?identity.not_after, "gateway certificate issued");
        Ok(identity)
    }
}

/// `host:port` with a non-zero numeric port (the hub checks the same).
fn is_host_port(s: &str) -> bool {
    !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && s.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert!(is_host_port("127.0.0.1:7443"));
        assert!(is_host_port("[::1]:7443"));
        assert!(is_host_port("gw.example.org:1"));
        assert!(!is_host_port("127.0.0.1"));
        assert!(!is_host_port("127.0.0.1:0"));
        assert!(!is_host_port(":1"));
        assert!(!is_host_port("a b:1"));
    }
}

//! The running gateway: wires table, listeners, tunnels and prober.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::pb;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::health::ProbeParams;
use crate::relay::Relays;
use crate::stats::Counters;
use crate::table::{compile, Table};
use crate::tunnel::Peer;
use crate::{GatewayConfig, GatewayError, GatewayIdentity, ServiceKey, VipBind};

/// One bound VIP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// The service it serves.
    pub service: ServiceKey,
    /// The service port (from the view).
    pub port: u16,
    /// The bound address (the VIP and port, or an ephemeral address; see
    /// [`crate::VipBind`]).
    pub addr: SocketAddr,
}

/// Health of one peer gateway as the prober sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHealth {
    /// Peer POP.
    pub pop: String,
    /// Tunnel address dialled.
    pub addr: String,
    /// Whether new connections may use this peer.
    pub up: bool,
    /// Smoothed RTT, if measured.
    pub srtt: Option<Duration>,
    /// Probe loss over the recent window (per mille).
    pub loss_permille: u32,
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client connections accepted on VIP listeners.
    pub accepted: u64,
    /// Client connections served to a local endpoint.
    pub served_local: u64,
    /// Client connections served through a tunnel.
    pub served_remote: u64,
    /// Client connections closed because every attempt failed.
    pub failed: u64,
    /// Attempts that failed before any byte and moved to the next target.
    pub local_failovers: u64,
    /// Tunnel streams accepted from peers and served.
    pub tunnel_streams_served: u64,
    /// Tunnel streams refused (bad header, not exported, no endpoint).
    pub tunnel_streams_refused: u64,
    /// Bytes from clients to upstreams.
    pub bytes_up: u64,
    /// Bytes from upstreams to clients.
    pub bytes_down: u64,
}

/// A started gateway. Dropping it without [`RunningGateway::shutdown`]
/// also stops it (tasks are aborted, tunnels closed).
pub struct RunningGateway {
    /// Bound UDP address of the QUIC tunnel listener.
    pub tunnel_addr: SocketAddr,
    shared: Arc<Shared>,
    applied: watch::Receiver<u64>,
    rtt: watch::Receiver<Vec<pb::RttSample>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGateway")
            .field("tunnel_addr", &self.tunnel_addr)
            .finish_non_exhaustive()
    }
}

/// State shared by the gateway's tasks.
pub(crate) struct Shared {
    pub cfg: GatewayConfig,
    pub endpoint: quinn::Endpoint,
    pub counters: Counters,
    pub relays: Relays,
    pub conn_limit: Arc<Semaphore>,
    pub stream_limit: Arc<Semaphore>,
    identity: Mutex<GatewayIdentity>,
    table: watch::Sender<Arc<Table>>,
    peers: Mutex<HashMap<String, PeerEntry>>,
    listeners: Mutex<Vec<ListenerEntry>>,
    shutdown: watch::Sender<bool>,
    seed: AtomicUsize,
}

struct PeerEntry {
    peer: Arc<Peer>,
    task: JoinHandle<()>,
}

struct ListenerEntry {
    info: ListenerInfo,
    /// What was asked for: (service, service port, bind address).
    key: (ServiceKey, u16, SocketAddr),
    task: JoinHandle<()>,
    cut: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind these locks stays consistent across a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The current table (one snapshot per connection).
    pub fn table(&self) -> Arc<Table> {
        self.table.borrow().clone()
    }

    pub fn domain(&self) -> &str {
        &self.cfg.identity.domain
    }

    pub fn next_seed(&self) -> usize {
        self.seed.fetch_add(1, Relaxed)
    }

    pub fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn peer(&self, pop: &str) -> Option<Arc<Peer>> {
        lock(&self.peers).get(pop).map(|e| e.peer.clone())
    }

    pub fn peer_usable(&self, pop: &str) -> bool {
        lock(&self.peers).get(pop).is_some_and(|e| e.peer.is_up())
    }

    pub fn peer_connected(&self, pop: &str) -> bool {
        lock(&self.peers)
            .get(pop)
            .is_some_and(|e| e.peer.is_connected())
    }

    pub fn client_config(&self, pop: &str) -> Result<quinn::ClientConfig, GatewayError> {
        let id = lock(&self.identity).clone();
        crate::tls::client_config(&id, pop)
    }

    fn probe_params(&self) -> ProbeParams {
        ProbeParams {
            interval: self.cfg.probe_interval,
            fall: self.cfg.limits.probe_fall.max(1),
            rise: self.cfg.limits.probe_rise.max(1),
            timeout_floor: self.cfg.limits.probe_timeout_floor,
        }
    }

    /// Dials new peers, drops peers that left the view (or moved).
    fn reconcile_peers(self: &Arc<Self>, wanted: &BTreeMap<String, String>) {
        let mut peers = lock(&self.peers);
        let gone: Vec<String> = peers
            .iter()
            .filter(|(pop, e)| wanted.get(*pop) != Some(&e.peer.addr))
            .map(|(pop, _)| pop.clone())
            .collect();
        for pop in gone {
            if let Some(e) = peers.remove(&pop) {
                e.task.abort();
                // Streams in flight on the old tunnel get the drain time.
                let peer = e.peer;
                let drain = self.cfg.limits.drain_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(drain).await;
                    peer.close();
                });
            }
        }
        for (pop, addr) in wanted {
            if peers.contains_key(pop) {
                continue;
            }
            let peer = Arc::new(Peer::new(pop.clone(), addr.clone(), self.probe_params()));
            let task = tokio::spawn(crate::tunnel::run_peer(self.clone(), peer.clone()));
            peers.insert(pop.clone(), PeerEntry { peer, task });
        }
    }

    /// Binds listeners of the table, drains listeners no longer in it.
    fn reconcile_listeners(self: &Arc<Self>, table: &Table) {
        let mut wanted = Vec::new();
        for (key, route) in &table.services {
            for &port in &route.ports {
                let addr = match (&self.cfg.vip_bind, route.vip) {
                    (VipBind::Vip, Some(vip)) => SocketAddr::new(vip, port),
                    (VipBind::VipEphemeralPort, Some(vip)) => SocketAddr::new(vip, 0),
                    (VipBind::Ephemeral(ip), _) => SocketAddr::new(*ip, 0),
                    (_, None) => {
                        tracing::warn!(service = %key, "service has no usable VIP: not bound");
                        continue;
                    }
                };
                wanted.push((key.clone(), port, addr));
            }
        }
        let mut listeners = lock(&self.listeners);
        let mut kept = Vec::new();
        for e in listeners.drain(..) {
            if wanted.contains(&e.key) {
                kept.push(e);
            } else {
                // Stop accepting now; connections keep running until the
                // drain time is over.
                e.task.abort();
                let drain = self.cfg.limits.drain_timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(drain).await;
                    let _ = e.cut.send(true);
                });
            }
        }
        for key in wanted {
            if kept.iter().any(|e| e.key == key) {
                continue;
            }
            let (service, port, addr) = key.clone();
            let listener = match crate::listener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(service = %service, %addr, error = %e, "cannot bind VIP listener");
                    continue;
                }
            };
            let bound = listener.get_ref().local_addr().unwrap_or(addr);
            let (cut, cut_rx) = watch::channel(false);
            let task = tokio::spawn(crate::listener::accept_loop(
                self.clone(),
                listener,
                service.clone(),
                port,
                cut_rx,
            ));
            kept.push(ListenerEntry {
                info: ListenerInfo {
                    service,
                    port,
                    addr: bound,
                },
                key,
                task,
                cut,
            });
        }
        *listeners = kept;
    }

    /// Applies one view; returns the applied epoch if it was applied.
    fn apply(self: &Arc<Self>, view: &pb::PopView) -> Option<u64> {
        if view.pop != self.cfg.pop {
            tracing::warn!(view_pop = %view.pop, pop = %self.cfg.pop, "view of another POP ignored");
            return None;
        }
        let current = self.table().epoch;
        if view.epoch < current {
            tracing::warn!(epoch = view.epoch, current, "older view ignored");
            return None;
        }
        let table = Arc::new(compile(view, &self.cfg.pop));
        self.reconcile_peers(&table.peers);
        // Swap before binding, so new listeners route with the new table.
        self.table.send_replace(table.clone());
        self.reconcile_listeners(&table);
        Some(table.epoch)
    }

    fn stop(&self) {
        self.shutdown.send_replace(true);
        for e in lock(&self.listeners).drain(..) {
            e.task.abort();
            let _ = e.cut.send(true);
        }
        for (_, e) in lock(&self.peers).drain() {
            e.task.abort();
            e.peer.close();
        }
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
    }
}

/// How often peer RTTs are published.
const RTT_PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Starts a gateway: binds the tunnel listener, then follows `view`
/// (binding VIP listeners, dialling peers) until shutdown.
pub async fn start(
    cfg: GatewayConfig,
    mut view: watch::Receiver<Option<pb::PopView>>,
) -> Result<RunningGateway, GatewayError> {
    crate::tls::check_identity(&cfg.identity, &cfg.pop, &cfg.instance)?;
    if cfg.probe_interval.is_zero() {
        return Err(GatewayError::Config(
            "probe_interval must be above 0".into(),
        ));
    }
    let server = crate::tls::server_config(&cfg.identity, &cfg.limits)?;
    let endpoint = quinn::Endpoint::server(server, cfg.tunnel_listen).map_err(|source| {
        GatewayError::BindTunnel {
            addr: cfg.tunnel_listen,
            source,
        }
    })?;
    let tunnel_addr = endpoint
        .local_addr()
        .map_err(|source| GatewayError::BindTunnel {
            addr: cfg.tunnel_listen,
            source,
        })?;
    let counters = Counters::default();
    let relays =
        Relays::start(cfg.relay_threads, counters.bytes.clone()).map_err(GatewayError::Relay)?;
    let shared = Arc::new(Shared {
        conn_limit: Arc::new(Semaphore::new(
            cfg.limits.max_connections.min(Semaphore::MAX_PERMITS),
        )),
        stream_limit: Arc::new(Semaphore::new(
            cfg.limits.max_tunnel_streams.min(Semaphore::MAX_PERMITS),
        )),
        identity: Mutex::new(cfg.identity.clone()),
        cfg,
        endpoint,
        counters,
        relays,
        table: watch::channel(Arc::new(Table::default())).0,
        peers: Mutex::new(HashMap::new()),
        listeners: Mutex::new(Vec::new()),
        shutdown: watch::channel(false).0,
        seed: AtomicUsize::new(0),
    });
    let (applied_tx, applied) = watch::channel(0u64);
    let (rtt_tx, rtt) = watch::channel(Vec::new());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(crate::tunnel::accept_loop(shared.clone())));
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let v = view.borrow_and_update().clone();
            if let Some(v) = v {
                if let Some(epoch) = s.apply(&v) {
                    applied_tx.send_replace(epoch);
                }
            }
            if view.changed().await.is_err() {
                // The sender is gone: keep serving the last view.
                return;
            }
        }
    }));
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(RTT_PUBLISH_EVERY);
        loop {
            tick.tick().await;
            let mut samples: Vec<pb::RttSample> = lock(&s.peers)
                .values()
                .filter_map(|e| {
                    let (srtt, loss) = e.peer.rtt();
                    Some(pb::RttSample {
                        to_pop: e.peer.pop.clone(),
                        rtt_us: u64::try_from(srtt?.as_micros()).unwrap_or(u64::MAX).max(1),
                        loss_permille: loss,
                    })
                })
                .collect();
            samples.sort_by(|a, b| a.to_pop.cmp(&b.to_pop));
            rtt_tx.send_if_modified(|cur| {
                let changed = *cur != samples;
                *cur = samples;
                changed
            });
        }
    }));
    Ok(RunningGateway {
        tunnel_addr,
        shared,
        applied,
        rtt,
        tasks,
    })
}

impl RunningGateway {
    /// The VIP listeners bound now.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        lock(&self.shared.listeners)
            .iter()
            .map(|e| e.info.clone())
            .collect()
    }

    /// The bound address of `service:port`, if listening.
    pub fn listener(&self, service: &ServiceKey, port: u16) -> Option<SocketAddr> {
        lock(&self.shared.listeners)
            .iter()
            .find(|e| &e.info.service == service && e.info.port == port)
            .map(|e| e.info.addr)
    }

    /// Peer RTTs (one sample per peer with a measured RTT, sorted by POP),
    /// for the agent to report to the hub. Updated about once a second.
    pub fn rtt_samples(&self) -> watch::Receiver<Vec<pb::RttSample>> {
        self.rtt.clone()
    }

    /// Epoch of the last view applied (listeners bound, table swapped).
    pub fn applied_epoch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Health of each peer gateway now, sorted by POP.
    pub fn peer_health(&self) -> Vec<PeerHealth> {
        let mut out: Vec<PeerHealth> = lock(&self.shared.peers)
            .values()
            .map(|e| {
                let (srtt, loss_permille) = e.peer.rtt();
                PeerHealth {
                    pop: e.peer.pop.clone(),
                    addr: e.peer.addr.clone(),
                    up: e.peer.is_up(),
                    srtt,
                    loss_permille,
                }
            })
            .collect();
        out.sort_by(|a, b| a.pop.cmp(&b.pop));
        out
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Replaces the identity (certificate renewal): new tunnel handshakes
    /// in both directions use it; established tunnels stay up. The new
    /// certificate must be this gateway's.
    pub fn reload_identity(&self, identity: GatewayIdentity) -> Result<(), GatewayError> {
        let cfg = &self.shared.cfg;
        crate::tls::check_identity(&identity, &cfg.pop, &cfg.instance)?;
        if identity.domain != cfg.identity.domain {
            return Err(GatewayError::Config(
                "the trust domain cannot change".into(),
            ));
        }
        let server = crate::tls::server_config(&identity, &cfg.limits)?;
        self.shared.endpoint.set_server_config(Some(server));
        *lock(&self.shared.identity) = identity;
        Ok(())
    }

    /// Stops accepting, cuts connections, closes tunnels and waits (at
    /// most a second) for the peers to learn it.
    pub async fn shutdown(self) {
        self.shared.stop();
        for t in &self.tasks {
            t.abort();
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.shared.stop();
        for t in &self.tasks {
            t.abort();
        }
    }
}

//! The running gateway: wires table, listeners, tunnels and prober.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_proto::pb;
use tokio::sync::watch;

use crate::{GatewayConfig, GatewayError, GatewayIdentity, ServiceKey};

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
/// also stops it (tasks are aborted).
pub struct RunningGateway {
    /// Bound UDP address of the QUIC tunnel listener.
    pub tunnel_addr: SocketAddr,
}

impl std::fmt::Debug for RunningGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGateway")
            .field("tunnel_addr", &self.tunnel_addr)
            .finish_non_exhaustive()
    }
}

/// Starts a gateway: binds the tunnel listener, then follows `view`
/// (binding VIP listeners, dialling peers) until shutdown.
pub async fn start(
    cfg: GatewayConfig,
    view: watch::Receiver<Option<pb::PopView>>,
) -> Result<RunningGateway, GatewayError> {
    let _ = (cfg, view);
    Err(GatewayError::Config("not implemented yet".into()))
}

impl RunningGateway {
    /// The VIP listeners bound now.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        Vec::new()
    }

    /// Peer RTTs (one sample per peer with a measured RTT), for the agent
    /// to report to the hub. Updated about once a second.
    pub fn rtt_samples(&self) -> watch::Receiver<Vec<pb::RttSample>> {
        watch::channel(Vec::new()).1
    }

    /// Epoch of the last view applied (listeners bound, table swapped).
    pub fn applied_epoch(&self) -> watch::Receiver<u64> {
        watch::channel(0).1
    }

    /// Health of each peer gateway now.
    pub fn peer_health(&self) -> Vec<PeerHealth> {
        Vec::new()
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        Stats::default()
    }

    /// Replaces the identity (certificate renewal): new tunnel handshakes
    /// in both directions use it; established tunnels stay up.
    pub fn reload_identity(&self, identity: GatewayIdentity) -> Result<(), GatewayError> {
        let _ = identity;
        Ok(())
    }

    /// Stops accepting, closes tunnels and waits for the tasks to end.
    pub async fn shutdown(self) {}
}

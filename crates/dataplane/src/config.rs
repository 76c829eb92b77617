//! Configuration of one gateway instance.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Everything a gateway needs; the view arrives through the `view` watch
/// channel given to [`crate::start`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This POP's name (DNS label); targets with this `pop` are local.
    pub pop: String,
    /// Gateway instance name (DNS label), e.g. `gw0`; must match the
    /// instance in the identity's certificate.
    pub instance: String,
    /// UDP address of the QUIC tunnel listener; port 0 picks a free port
    /// (see [`crate::RunningGateway::tunnel_addr`]).
    pub tunnel_listen: SocketAddr,
    /// How VIP listeners are bound.
    pub vip_bind: VipBind,
    /// Certificate, key and CA of this gateway.
    pub identity: GatewayIdentity,
    /// Per-connection limits and timeouts.
    pub limits: Limits,
    /// Base interval between health probes to each peer gateway (default
    /// 100 ms). The effective interval adapts: never below 2x the peer's
    /// smoothed RTT, and halved while probes go missing.
    pub probe_interval: Duration,
    /// Threads that move the bytes of TCP-to-TCP connections (default: one
    /// per core the process may run on, at most 4; at least 1).
    pub relay_threads: usize,
}

impl GatewayConfig {
    /// A configuration with default limits, probe interval and VIP binding.
    pub fn new(
        pop: impl Into<String>,
        instance: impl Into<String>,
        tunnel_listen: SocketAddr,
        identity: GatewayIdentity,
    ) -> Self {
        Self {
            pop: pop.into(),
            instance: instance.into(),
            tunnel_listen,
            vip_bind: VipBind::default(),
            identity,
            limits: Limits::default(),
            probe_interval: DEFAULT_PROBE_INTERVAL,
            relay_threads: default_relay_threads(),
        }
    }
}

/// One relay thread per core this process may use, at most 4: the edge
/// machines the gateway runs on are small, and one thread moves several
/// Gbit/s.
fn default_relay_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Default base probe interval.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// How VIP listeners are bound.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VipBind {
    /// Bind each service's VIP and port from the view (production and dev:
    /// the dev VIP pool 127.77.0.0/16 is on loopback and needs no setup).
    #[default]
    Vip,
    /// Bind this address with an OS-chosen port per (service, port) instead
    /// of the VIP (tests running in parallel; read the bound addresses with
    /// [`crate::RunningGateway::listeners`]).
    Ephemeral(IpAddr),
    /// Bind the VIP from the view, but with an OS-chosen port per
    /// (service, port).
    VipEphemeralPort,
}

/// The gateway's TLS identity: `spiffe://<domain>/pop/<pop>/gw/<instance>`.
#[derive(Clone)]
pub struct GatewayIdentity {
    /// Leaf certificate (then, optionally, the CA) in PEM.
    pub cert_chain_pem: String,
    /// Private key of the leaf in PEM.
    pub key_pem: String,
    /// Federation CA certificate(s) in PEM; peers must chain to one.
    pub ca_pem: String,
    /// Trust domain; peers must be gateways of this domain.
    pub domain: String,
}

impl std::fmt::Debug for GatewayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("GatewayIdentity")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Per-connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TCP connect timeout to a local endpoint (default 1 s).
    pub connect_timeout: Duration,
    /// How long to wait for a peer gateway to answer a tunnel stream (it
    /// connects to its endpoint first) before trying the next target
    /// (default 2 s). A peer marked down ends the wait at once.
    pub tunnel_open_timeout: Duration,
    /// A proxied connection with no bytes in either direction for this long
    /// is closed (default 300 s; checked every quarter of it, so the cut
    /// comes between 1x and 1.25x after the last byte).
    pub idle_timeout: Duration,
    /// Most concurrent proxied connections accepted on VIP listeners; more
    /// are closed at accept (default 100 000).
    pub max_connections: usize,
    /// Most concurrent tunnel streams served for peers (default 100 000).
    pub max_tunnel_streams: usize,
    /// Attempts per connection across targets and tiers before it is closed
    /// (default 3). Only attempts before any byte is exchanged are retried.
    pub max_attempts: usize,
    /// Copy buffer size per direction (bytes, default 64 KiB).
    pub buffer_size: usize,
    /// Consecutive missed probes before a peer is marked down (default 3).
    pub probe_fall: u32,
    /// Consecutive answered probes before a down peer is up again
    /// (default 2).
    pub probe_rise: u32,
    /// Lower bound of the per-probe timeout (default 100 ms); the timeout is
    /// `max(3 x smoothed RTT, this)`.
    pub probe_timeout_floor: Duration,
    /// How long listeners that left the view keep their connections before
    /// they are cut (default 30 s).
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            tunnel_open_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(300),
            max_connections: 100_000,
            max_tunnel_streams: 100_000,
            max_attempts: 3,
            buffer_size: 64 * 1024,
            probe_fall: 3,
            probe_rise: 2,
            probe_timeout_floor: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

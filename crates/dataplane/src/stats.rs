//! Counters of one gateway, mirrored to the `metrics` facade (whatever
//! recorder the process installed, e.g. the Prometheus exporter).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::{ServiceKey, Stats};

/// Metric: proxied connections by `service`, `tier` and `outcome`.
pub const CONNECTIONS: &str = "switchyard_gateway_connections_total";
/// Metric: bytes by `service` and `direction` (`up`: client to service).
pub const BYTES: &str = "switchyard_gateway_bytes_total";
/// Metric: smoothed tunnel RTT by `peer` (seconds).
pub const TUNNEL_RTT: &str = "switchyard_gateway_tunnel_rtt_seconds";
/// Metric: attempts that moved on to the next target or tier by `service`.
pub const LOCAL_FAILOVERS: &str = "switchyard_gateway_local_failovers_total";
/// Metric: tunnel streams from peers by `outcome`.
pub const TUNNEL_STREAMS: &str = "switchyard_gateway_tunnel_streams_total";

/// How a client connection ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served by a local endpoint.
    Local,
    /// Served through a tunnel.
    Remote,
    /// Every attempt failed (or there was none).
    Failed,
    /// Refused at accept: too many connections.
    Overload,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Remote => "remote",
            Self::Failed => "failed",
            Self::Overload => "overload",
        }
    }
}

/// Gateway-wide byte totals, shared with the relay threads.
#[derive(Debug, Default)]
pub struct Totals {
    /// Bytes from clients to upstreams.
    pub up: AtomicU64,
    /// Bytes from upstreams to clients.
    pub down: AtomicU64,
}

/// Live counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub served_local: AtomicU64,
    pub served_remote: AtomicU64,
    pub failed: AtomicU64,
    pub local_failovers: AtomicU64,
    pub tunnel_streams_served: AtomicU64,
    pub tunnel_streams_refused: AtomicU64,
    pub bytes: Arc<Totals>,
}

impl Counters {
    /// A snapshot.
    pub fn snapshot(&self) -> Stats {
        Stats {
            accepted: self.accepted.load(Relaxed),
            served_local: self.served_local.load(Relaxed),
            served_remote: self.served_remote.load(Relaxed),
            failed: self.failed.load(Relaxed),
            local_failovers: self.local_failovers.load(Relaxed),
            tunnel_streams_served: self.tunnel_streams_served.load(Relaxed),
            tunnel_streams_refused: self.tunnel_streams_refused.load(Relaxed),
            bytes_up: self.bytes.up.load(Relaxed),
            bytes_down: self.bytes.down.load(Relaxed),
        }
    }

    /// A client connection was routed (or not).
    pub fn connection(&self, service: &ServiceKey, tier: Option<usize>, outcome: Outcome) {
        let c = match outcome {
            Outcome::Local => &self.served_local,
            Outcome::Remote => &self.served_remote,
            Outcome::Failed | Outcome::Overload => &self.failed,
        };
        c.fetch_add(1, Relaxed);
        metrics::counter!(
            CONNECTIONS,
            "service" => service.to_string(),
            "tier" => tier.map_or_else(|| "none".to_owned(), |t| t.to_string()),
            "outcome" => outcome.label(),
        )
        .increment(1);
    }

    /// An attempt failed before any byte and the next one is tried (or a
    /// down peer was skipped).
    pub fn failover(&self, service: &ServiceKey) {
        self.local_failovers.fetch_add(1, Relaxed);
        metrics::counter!(LOCAL_FAILOVERS, "service" => service.to_string()).increment(1);
    }

    /// Bytes of one finished connection.
    pub fn bytes(&self, service: &ServiceKey, up: u64, down: u64) {
        metrics::counter!(BYTES, "service" => service.to_string(), "direction" => "up")
            .increment(up);
        metrics::counter!(BYTES, "service" => service.to_string(), "direction" => "down")
            .increment(down);
    }

    /// A tunnel stream from a peer was served or refused.
    pub fn tunnel_stream(&self, outcome: &'static str) {
        if outcome == "served" {
            self.tunnel_streams_served.fetch_add(1, Relaxed);
        } else {
            self.tunnel_streams_refused.fetch_add(1, Relaxed);
        }
        metrics::counter!(TUNNEL_STREAMS, "outcome" => outcome).increment(1);
    }
}

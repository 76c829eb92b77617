//! The Switchyard gateway dataplane: one gateway per POP (or several
//! instances) that carries TCP connections to global services.
//!
//! # Public API (stable; changes are additive only)
//!
//! ```text
//! start(GatewayConfig, watch::Receiver<Option<pb::PopView>>) -> Result<RunningGateway, GatewayError>
//! RunningGateway::tunnel_addr                 bound UDP address of the QUIC tunnel listener
//! RunningGateway::listeners()                 bound VIP listeners: (service, service port, addr)
//! RunningGateway::listener(service, port)     bound address of one listener
//! RunningGateway::rtt_samples()               watch of peer RTTs, for the agent's RttReport
//! RunningGateway::applied_epoch()             watch of the epoch of the last applied view
//! RunningGateway::peer_health()               current up/down and RTT of each peer gateway
//! RunningGateway::stats()                     counters (connections, bytes, failovers)
//! RunningGateway::reload_identity(identity)   certificate renewal: new handshakes use it
//! RunningGateway::shutdown()                  stop listeners and tunnels
//! ```
//!
//! The caller (the `switchyard gateway` process or the agent's embedded
//! gateway) feeds the POP's view through a watch channel; `None` means "no
//! view yet" and binds nothing. The gateway serves until `shutdown`.
//!
//! # How it works
//!
//! - **Table**: every view is compiled into an immutable [`table::Table`]
//!   (pure function) and swapped in atomically (a `watch` of
//!   `Arc<Table>`): each new connection reads one snapshot; connections in
//!   flight keep the snapshot they started with.
//! - **Listeners**: one TCP listener per (ClusterSetIP service, port) on
//!   its VIP (see [`VipBind`]). Listeners that leave the view stop
//!   accepting at once; their connections drain (cut after
//!   [`Limits::drain_timeout`]).
//! - **Routing**: a new connection goes to the first tier with a target
//!   that is usable now: local endpoints (this POP's targets) directly,
//!   remote POPs through a QUIC tunnel to their gateway, skipping peers the
//!   prober marked down. An attempt that fails before any byte is exchanged
//!   (refused connect, timeout, peer refused or died) moves to the next
//!   target or tier, up to [`Limits::max_attempts`]; the client's bytes are
//!   not read until an attempt succeeded. When every peer is marked down,
//!   peers with a live tunnel are still tried (last resort).
//! - **Endpoint ports**: a single-port service reaches an endpoint on the
//!   endpoint's own port (the service port if that is 0); with several
//!   ports, on the requested service port.
//! - **Copying**: both directions at once, half-close passed on, idle
//!   timeout. TCP-to-TCP connections move on relay threads of their own
//!   (an edge-triggered epoll loop each, `splice(2)` for bulk transfers);
//!   TCP-to-tunnel copies run in the connection's task and hold no buffer
//!   while quiet.
//! - **Tunnels**: one QUIC connection per peer POP gateway, mutual TLS with
//!   gateway identities (`spiffe://D/pop/<pop>/gw/<instance>`, ALPN
//!   [`tls::ALPN`]); one bi-stream per proxied connection, opened with a
//!   small header ([`header`]) naming service and port, answered with one
//!   status byte once the far gateway connected to its endpoint.
//! - **Export check** at the receiving gateway: a stream for service S
//!   from a gateway of POP P (its certificate says so: a gateway identity
//!   of the same trust domain, nothing else is accepted) is served only if
//!   S is in the receiver's own view with the receiver's POP among S's
//!   targets with ready endpoints (the receiver exports S), and, when S's
//!   policy restricts importers (`export_to`; the hub then sets
//!   `ServiceView.import_restricted` and lists `importers` in the
//!   exporter's view), P is one of them. A refusal answers one status byte
//!   and closes that stream only.
//! - **Health**: each gateway probes its peers with QUIC datagrams
//!   ([`health`]); a peer is down after `probe_fall` missed probes (probe
//!   timeout `max(3 x srtt, floor)`, probing twice as fast while probes go
//!   missing) or at once when a tunnel stream fails or the connection dies;
//!   down peers are skipped by new connections (local failover, no hub
//!   round trip). Smoothed RTTs and loss are published for the agent.
//! - **Metrics** (`metrics` facade, and [`RunningGateway::stats`]):
//!   `switchyard_gateway_connections_total{service,tier,outcome}`,
//!   `switchyard_gateway_bytes_total{service,direction}`,
//!   `switchyard_gateway_tunnel_rtt_seconds{peer}`,
//!   `switchyard_gateway_local_failovers_total{service}`.

mod config;
mod copy;
mod error;
mod gateway;
pub mod header;
pub mod health;
mod listener;
mod relay;
mod service;
mod splice;
mod stats;
pub mod table;
#[cfg(test)]
mod test_sockets;
pub mod tls;
mod tunnel;

pub use config::{GatewayConfig, GatewayIdentity, Limits, VipBind, DEFAULT_PROBE_INTERVAL};
pub use error::GatewayError;
pub use gateway::{start, ListenerInfo, PeerHealth, RunningGateway, Stats};
pub use service::ServiceKey;

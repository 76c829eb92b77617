//! QUIC/TLS configuration of the tunnels and the peer identity check.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use switchyard_pki::{ClientAuth, ExpectedPeer, SpiffeId};

use crate::{GatewayError, GatewayIdentity, Limits};

/// ALPN of gateway-to-gateway tunnels.
pub const ALPN: &[u8] = b"switchyard-gw/1";

/// Tunnels with nothing received for this long are dead (probes keep a
/// live tunnel busy far more often).
const TUNNEL_IDLE: Duration = Duration::from_secs(10);

/// Checks that the identity's certificate is this gateway's.
pub fn check_identity(id: &GatewayIdentity, pop: &str, instance: &str) -> Result<(), GatewayError> {
    let expected = SpiffeId::gateway(&id.domain, pop, instance)
        .map_err(|e| GatewayError::Config(e.to_string()))?;
    let chain = switchyard_pki::load_certs_pem(&id.cert_chain_pem)
        .map_err(|e| GatewayError::Identity(e.to_string()))?;
    let found = switchyard_pki::peer_identity_from_chain(&chain)
        .map_err(|e| GatewayError::Identity(e.to_string()))?;
    if found != expected {
        return Err(GatewayError::WrongIdentity {
            expected: expected.to_string(),
            found: found.to_string(),
        });
    }
    Ok(())
}

/// Streams a peer may open concurrently on a new tunnel connection
/// before [`StreamCredit`] raises the limit.
const INITIAL_STREAM_CREDIT: u64 = 1024;

/// The limit of concurrent streams a peer may open on one tunnel
/// connection we accepted. quinn allocates the state of every stream it
/// allows up front (about 50 bytes each), so the limit starts small and
/// doubles whenever half of it is in use, up to
/// [`Limits::max_tunnel_streams`]; a fixed limit of 100 000 cost ~5 MiB
/// per tunnel connection, idle or not. It never shrinks (quinn keeps the
/// state anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCredit {
    limit: u64,
    max: u64,
}

impl StreamCredit {
    /// The credit of a new connection for `max_tunnel_streams`.
    pub fn new(max_tunnel_streams: usize) -> Self {
        let max = u64::try_from(max_tunnel_streams).unwrap_or(u64::MAX);
        Self {
            limit: INITIAL_STREAM_CREDIT.min(max),
            max,
        }
    }

    /// The limit now.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Called with the number of streams open now (the new one included);
    /// returns the new limit to announce if it grew.
    pub fn on_open(&mut self, open: u64) -> Option<u64> {
        if open.saturating_mul(2) < self.limit || self.limit >= self.max {
            return None;
        }
        self.limit = self.limit.saturating_mul(2).max(1).min(self.max);
        Some(self.limit)
    }
}

/// `bidi_streams`: how many streams the peer may open at first.
fn transport(bidi_streams: u64) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let streams = VarInt::from_u64(bidi_streams).unwrap_or(VarInt::MAX);
    t.max_concurrent_bidi_streams(streams)
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(1)))
        // Windows sized for a few Gbit/s at LAN RTTs; they are limits, not
        // allocations.
        .stream_receive_window(VarInt::from_u32(4 << 20))
        .receive_window(VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .datagram_receive_buffer_size(Some(64 * 1024));
    if let Ok(idle) = quinn::IdleTimeout::try_from(TUNNEL_IDLE) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

/// The tunnel listener's configuration: client certificates required.
pub fn server_config(
    id: &GatewayIdentity,
    limits: &Limits,
) -> Result<quinn::ServerConfig, GatewayError> {
    let mut tls = switchyard_pki::server_config(
        &id.cert_chain_pem,
        &id.key_pem,
        &id.ca_pem,
        ClientAuth::Required,
        vec![ALPN.to_vec()],
    )
    .map_err(|e| GatewayError::Identity(e.to_string()))?;
    // 0-RTT data could be replayed; tunnels never accept it.
    tls.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| GatewayError::Identity(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let credit = StreamCredit::new(limits.max_tunnel_streams);
    cfg.transport_config(transport(credit.limit()));
    Ok(cfg)
}

/// The configuration to dial a gateway of POP `pop`.
pub fn client_config(id: &GatewayIdentity, pop: &str) -> Result<quinn::ClientConfig, GatewayError> {
    let tls = switchyard_pki::client_config(
        Some((&id.cert_chain_pem, &id.key_pem)),
        &id.ca_pem,
        ExpectedPeer::AnyOfPop {
            domain: id.domain.clone(),
            pop: pop.to_owned(),
        },
        vec![ALPN.to_vec()],
    )
    .map_err(|e| GatewayError::Identity(e.to_string()))?;
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| GatewayError::Identity(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // Streams go one way: the dialler opens them, the peer serves them
    // (it dials its own connection for its streams). Allowing none the
    // other way also spares quinn's per-stream state for them.
    cfg.transport_config(transport(0));
    Ok(cfg)
}

/// The POP of the peer at the other end of `conn` if its certificate is a
/// gateway identity of `domain` (a POP agent's or operator's certificate
/// is not enough).
pub fn gateway_pop(conn: &quinn::Connection, domain: &str) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    match switchyard_pki::peer_identity_from_chain(&chain).ok()? {
        SpiffeId::Gateway { domain: d, pop, .. } if d == domain => Some(pop),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::StreamCredit;

    #[test]
    fn credit_starts_small_and_doubles_at_half_use() {
        let mut c = StreamCredit::new(100_000);
        assert_eq!(c.limit(), 1024);
        assert_eq!(c.on_open(1), None);
        assert_eq!(c.on_open(511), None);
        assert_eq!(c.on_open(512), Some(2048));
        assert_eq!(c.on_open(513), None);
        assert_eq!(c.on_open(1024), Some(4096));
    }

    #[test]
    fn credit_stops_at_the_maximum() {
        let mut c = StreamCredit::new(3000);
        assert_eq!(c.on_open(512), Some(2048));
        assert_eq!(c.on_open(1024), Some(3000));
        assert_eq!(c.on_open(2999), None);
        let mut small = StreamCredit::new(10);
        assert_eq!(small.limit(), 10);
        assert_eq!(small.on_open(10), None);
        let mut none = StreamCredit::new(0);
        assert_eq!(none.limit(), 0);
        assert_eq!(none.on_open(1), None);
    }
}

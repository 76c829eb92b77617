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

fn transport(limits: &Limits) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let streams = u32::try_from(limits.max_tunnel_streams).unwrap_or(u32::MAX);
    t.max_concurrent_bidi_streams(VarInt::from_u32(streams))
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
    cfg.transport_config(transport(limits));
    Ok(cfg)
}

/// The configuration to dial a gateway of POP `pop`.
pub fn client_config(
    id: &GatewayIdentity,
    pop: &str,
    limits: &Limits,
) -> Result<quinn::ClientConfig, GatewayError> {
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
    cfg.transport_config(transport(limits));
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

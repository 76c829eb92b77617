//! Errors of the gateway.

use std::net::SocketAddr;

/// Why a gateway could not start (or reload its identity).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The identity's certificate, key or CA is unusable.
    #[error("gateway identity: {0}")]
    Identity(String),
    /// The certificate is not `spiffe://<domain>/pop/<pop>/gw/<instance>`
    /// of this gateway's configuration.
    #[error("gateway certificate is {found}, expected {expected}")]
    WrongIdentity {
        /// SPIFFE ID the configuration asks for.
        expected: String,
        /// SPIFFE ID in the certificate.
        found: String,
    },
    /// The tunnel listener could not bind.
    #[error("bind tunnel listener {addr}: {source}")]
    BindTunnel {
        /// Address asked for.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The threads that move connection bytes could not start.
    #[error("cannot start relay threads: {0}")]
    Relay(std::io::Error),
    /// The configuration is invalid.
    #[error("gateway config: {0}")]
    Config(String),
}

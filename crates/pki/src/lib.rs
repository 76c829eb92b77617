//! Switchyard PKI: the federation's private CA, SPIFFE identities, join tokens
//! and the rustls configurations every Switchyard component uses.
//!
//! # Model
//!
//! * One private CA per federation ([`CertificateAuthority`]), ECDSA P-256.
//! * Every leaf certificate carries exactly one URI SAN, a SPIFFE ID
//!   ([`SpiffeId`]): `spiffe://<domain>/hub/<node>`, `spiffe://<domain>/pop/<pop>`,
//!   `spiffe://<domain>/pop/<pop>/gw/<instance>` or `spiffe://<domain>/op/<name>`.
//!   There are no DNS SANs: peers are authenticated by their SPIFFE ID, never by
//!   host name, so the TLS verifiers in [`tls`] replace the host-name check by an
//!   identity check ([`ExpectedPeer`]).
//! * A POP joins with a [`JoinToken`] (`K10<ca sha256>::<id>.<secret>`): the
//!   agent pins the CA from the token ([`ca_pinned_client_config`]) before it
//!   sends the secret, generates its own key ([`generate_csr`]) and gets a
//!   short-lived certificate from the hub ([`CertificateAuthority::sign_csr`]).
//! * All TLS is TLS 1.3 only, with the `ring` crypto provider.
//!
//! Callers take a peer's identity from its verified certificate
//! ([`peer_identity_from_chain`]), never from message fields.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use switchyard_pki::*;
//!
//! # fn main() -> Result<()> {
//! let ca = CertificateAuthority::generate("example.org")?;
//! let hub = ca.issue(&SpiffeId::hub("example.org", 1)?, Duration::from_secs(86_400))?;
//! let alpn = vec![b"switchyard/1".to_vec()];
//! let server = server_config(&hub.cert_pem, &hub.key_pem, ca.cert_pem(),
//!                            ClientAuth::Optional, alpn.clone())?;
//!
//! // A POP joining with a token pins the CA, then sends a CSR.
//! let token = JoinToken::generate(&ca.fingerprint())?;
//! let join = ca_pinned_client_config(&token.ca_fingerprint(), alpn.clone())?;
//! let pop = SpiffeId::pop("example.org", "fra")?;
//! let (csr_pem, key_pem) = generate_csr(&pop)?;
//! let cert_pem = ca.sign_csr(&csr_pem, &pop, Duration::from_secs(3_600))?; // on the hub
//! let client = client_config(Some((&cert_pem, &key_pem)), ca.cert_pem(),
//!                            ExpectedPeer::AnyHub { domain: "example.org".into() }, alpn)?;
//! # let _ = (server, join, client);
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod ca;
pub mod csr;
mod error;
pub mod identity;
pub mod tls;
pub mod token;

pub use ca::{CertificateAuthority, IssuedKeyPair};
pub use csr::generate_csr;
pub use error::{PkiError, Result, TokenError};
pub use identity::{peer_identity, SpiffeId};
pub use tls::{
    ca_pinned_client_config, client_config, load_certs_pem, load_key_pem, peer_identity_from_chain,
    pinned_ca_from_chain, server_config, sni_name, ClientAuth, ExpectedPeer, SNI_NAME,
};
pub use token::JoinToken;

/// Lowercase hex SHA-256 of a DER certificate: the CA fingerprint that join
/// tokens carry and that [`ca_pinned_client_config`] pins.
pub fn cert_fingerprint(cert_der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(cert_der))
}

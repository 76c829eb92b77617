//! rustls configurations for every Switchyard connection: TLS 1.3 only, the
//! `ring` crypto provider, certificates from the federation CA, and SPIFFE
//! identity checks in place of host-name checks.
//!
//! * [`server_config`]: hubs (and later gateways). Client certificates are
//!   verified against the CA; [`ClientAuth::Optional`] also admits clients
//!   without a certificate (enrolment), which the application must then
//!   restrict. Read the client's identity with [`peer_identity_from_chain`]
//!   on `peer_certificates()`.
//! * [`client_config`]: everyone dialling a known peer. The server's chain is
//!   verified against the CA and its SPIFFE ID must match an
//!   [`ExpectedPeer`]. The DNS name is not checked; connect with
//!   [`sni_name`].
//! * [`ca_pinned_client_config`]: a joining agent that knows only the CA
//!   fingerprint from its join token.
//!
//! The same configs suit tokio-rustls (tonic) and, being TLS 1.3 only, QUIC.
//!
//! Client-side session resumption is disabled: a resumed session skips
//! certificate verification, and since every server shares one SNI name a
//! ticket from one peer must never stand in for checking another's identity.
//! Our connections are long-lived, so the cost of full handshakes is small.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::error::{PkiError, Result};
use crate::identity::{peer_identity, SpiffeId};

/// The server name clients send in SNI. Servers are identified by SPIFFE ID,
/// not by name, so one fixed, never-resolvable name (RFC 2606 `.invalid`)
/// serves every connection.
pub const SNI_NAME: &str = "switchyard.invalid";

/// [`SNI_NAME`] as a rustls [`ServerName`], for `TlsConnector::connect`.
pub fn sni_name() -> ServerName<'static> {
    // SNI_NAME is a valid DNS name (a unit test checks it), so the fallback
    // is never taken; even if it were, the connection would still work:
    // rustls sends no SNI for an IP address and our verifiers ignore names.
    ServerName::try_from(SNI_NAME).unwrap_or(ServerName::IpAddress(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
    ))
}

/// Whether a server demands client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the federation CA.
    Required,
    /// Clients may connect without a certificate (for join/enrolment calls);
    /// a certificate, if presented, must still be valid. The application
    /// must refuse certificate-less peers on everything else.
    Optional,
}

/// Which peer a client expects at the other end, checked against the
/// server certificate's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Any hub node of `domain`.
    AnyHub {
        /// Trust domain.
        domain: String,
    },
    /// Exactly hub node `node` of `domain`.
    Hub {
        /// Trust domain.
        domain: String,
        /// Raft node id.
        node: u64,
    },
    /// The POP agent `pop` of `domain`.
    Pop {
        /// Trust domain.
        domain: String,
        /// POP name.
        pop: String,
    },
    /// Any identity in `domain`.
    AnyInDomain {
        /// Trust domain.
        domain: String,
    },
}

impl ExpectedPeer {
    /// Whether `id` is acceptable.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match (self, id) {
            (Self::AnyHub { domain }, SpiffeId::Hub { domain: d, .. }) => d == domain,
            (
                Self::Hub { domain, node },
                SpiffeId::Hub {
                    domain: d, node: n, ..
                },
            ) => d == domain && n == node,
            (Self::Pop { domain, pop }, SpiffeId::Pop { domain: d, pop: p }) => {
                d == domain && p == pop
            }
            (Self::AnyInDomain { domain }, id) => id.domain() == domain,
            _ => false,
        }
    }
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AnyHub { domain } => write!(f, "any hub of {domain}"),
            Self::Hub { domain, node } => write!(f, "spiffe://{domain}/hub/{node}"),
            Self::Pop { domain, pop } => write!(f, "spiffe://{domain}/pop/{pop}"),
            Self::AnyInDomain { domain } => write!(f, "any identity in {domain}"),
        }
    }
}

/// The ring crypto provider, chosen explicitly so that no other provider
/// (aws-lc-rs) is ever pulled in or picked up from a process default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only: no legacy downgrade surface, and QUIC requires it anyway.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Parses every `CERTIFICATE` block of a PEM string (other blocks are
/// skipped). Fails if there is none.
pub fn load_certs_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: "certificate",
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM string.
pub fn load_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
        what: "private key",
        reason: e.to_string(),
    })
}

/// The SPIFFE ID of a verified peer chain (`peer_certificates()` of a
/// rustls connection): that of its first (end-entity) certificate.
pub fn peer_identity_from_chain(chain: &[CertificateDer<'_>]) -> Result<SpiffeId> {
    let leaf = chain.first().ok_or(PkiError::NoPeerCertificate)?;
    peer_identity(leaf)
}

/// After a handshake with [`ca_pinned_client_config`], returns the pinned CA
/// certificate from the server's chain, for the agent to store as its trust
/// root.
pub fn pinned_ca_from_chain(
    chain: &[CertificateDer<'_>],
    expected_ca_sha256_hex: &str,
) -> Result<CertificateDer<'static>> {
    let pin = decode_pin(expected_ca_sha256_hex)?;
    chain
        .iter()
        .find(|c| crate::cert_fingerprint(c) == pin)
        .map(|c| c.clone().into_owned())
        .ok_or_else(|| {
            PkiError::InvalidCa(format!(
                "the server's chain does not contain the CA with fingerprint {pin}"
            ))
        })
}

fn decode_pin(hex_str: &str) -> Result<String> {
    let lower = hex_str.trim().to_ascii_lowercase();
    let mut buf = [0u8; 32];
    if lower.len() != 64 || hex::decode_to_slice(&lower, &mut buf).is_err() {
        return Err(PkiError::InvalidCa(
            "CA fingerprint must be 64 hex characters (sha256 of the CA certificate DER)".into(),
        ));
    }
    Ok(lower)
}

fn root_store(ca_cert_pem: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs_pem(ca_cert_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A server configuration for a federation member.
///
/// `cert_chain_pem` is our leaf (then, optionally, the CA); if the CA is not
/// at the end of the chain it is appended from `ca_cert_pem`, because
/// joining agents ([`ca_pinned_client_config`]) need it in the chain to pin
/// it. `ca_cert_pem` may hold several CA certificates (e.g. during a CA
/// rotation); client certificates must chain to one of them and carry a
/// valid SPIFFE ID.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &str,
    ca_cert_pem: &str,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig> {
    let mut chain = load_certs_pem(cert_chain_pem)?;
    let cas = load_certs_pem(ca_cert_pem)?;
    // Fail at start-up, not at the first handshake, if our own certificate
    // is not a Switchyard identity.
    peer_identity_from_chain(&chain)?;
    if !chain.iter().skip(1).any(|c| cas.contains(c)) {
        if let Some(issuer) = issuer_of(&chain[chain.len() - 1], &cas)? {
            chain.push(issuer);
        }
    }
    let key = load_key_pem(key_pem)?;

    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca)?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let inner = match client_auth {
        ClientAuth::Required => builder.build()?,
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
    };
    let verifier = Arc::new(SpiffeClientVerifier { inner });

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn;
    Ok(config)
}

/// The CA among `cas` whose subject is `cert`'s issuer, if any.
fn issuer_of(
    cert: &CertificateDer<'_>,
    cas: &[CertificateDer<'static>],
) -> Result<Option<CertificateDer<'static>>> {
    let (_, leaf) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
    for ca in cas {
        let (_, x) = x509_parser::parse_x509_certificate(ca)
            .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
        if x.subject().as_raw() == leaf.issuer().as_raw() && x.as_ref() != leaf.as_ref() {
            return Ok(Some(ca.clone()));
        }
    }
    Ok(None)
}

/// A client configuration that verifies the server against the federation
/// CA and requires its SPIFFE ID to match `expect`.
///
/// `identity` is our `(cert_chain_pem, key_pem)`, presented for mutual TLS;
/// `None` connects without a client certificate. Connect with
/// [`sni_name`].
pub fn client_config(
    identity: Option<(&str, &str)>,
    ca_cert_pem: &str,
    expect: ExpectedPeer,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig> {
    let verifier = SpiffeServerVerifier {
        mode: VerifyMode::Expect {
            roots: Arc::new(root_store(ca_cert_pem)?),
            expect,
        },
        algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
    };
    build_client(verifier, identity, alpn)
}

/// A client configuration for joining: it trusts no CA yet, only the CA
/// fingerprint from the join token.
///
/// The server must send its chain as `[leaf, ca]` ([`server_config`] does).
/// The server is accepted only if:
/// 1. one certificate of the chain it sent hashes (sha256 of DER) to
///    `expected_ca_sha256_hex`;
/// 2. its leaf verifies against that certificate as the trust anchor (valid
///    now, EKU serverAuth, signature checks); and
/// 3. the leaf's SPIFFE ID is a hub.
///
/// A man in the middle cannot pass (2) without the CA key, so the agent can
/// safely send the token secret over this connection. No client certificate
/// is sent. Afterwards, [`pinned_ca_from_chain`] gives the CA to store.
pub fn ca_pinned_client_config(
    expected_ca_sha256_hex: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig> {
    let verifier = SpiffeServerVerifier {
        mode: VerifyMode::PinnedCa {
            fingerprint: decode_pin(expected_ca_sha256_hex)?,
        },
        algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
    };
    build_client(verifier, None, alpn)
}

fn build_client(
    verifier: SpiffeServerVerifier,
    identity: Option<(&str, &str)>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = load_certs_pem(cert_pem)?;
            peer_identity_from_chain(&chain)?;
            builder.with_client_auth_cert(chain, load_key_pem(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Wraps an error of ours as a rustls certificate error, keeping our message
/// for the logs of whichever side refuses.
fn cert_error(e: PkiError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

enum VerifyMode {
    Expect {
        roots: Arc<RootCertStore>,
        expect: ExpectedPeer,
    },
    PinnedCa {
        fingerprint: String,
    },
}

/// Verifies a server's chain with webpki (against the CA, or the pinned CA)
/// and its SPIFFE ID in place of its DNS name.
struct SpiffeServerVerifier {
    mode: VerifyMode,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SpiffeServerVerifier");
        match &self.mode {
            VerifyMode::Expect { expect, .. } => d.field("expect", expect),
            VerifyMode::PinnedCa { fingerprint } => d.field("pinned_ca", fingerprint),
        };
        d.finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        match &self.mode {
            VerifyMode::Expect { roots, expect } => {
                // Chain, validity and EKU serverAuth; deliberately no name check.
                verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    roots,
                    intermediates,
                    now,
                    self.algs.all,
                )?;
                let id = peer_identity(end_entity).map_err(cert_error)?;
                if !expect.matches(&id) {
                    return Err(cert_error(PkiError::UnexpectedPeer {
                        expected: expect.to_string(),
                        found: id.to_string(),
                    }));
                }
            }
            VerifyMode::PinnedCa { fingerprint } => {
                let ca = intermediates
                    .iter()
                    .find(|c| crate::cert_fingerprint(c) == *fingerprint)
                    .ok_or_else(|| {
                        cert_error(PkiError::InvalidCa(format!(
                            "server did not present the CA pinned by the join token \
                             (sha256 {fingerprint}); wrong hub, or the token is for another federation"
                        )))
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone())?;
                verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &roots,
                    intermediates,
                    now,
                    self.algs.all,
                )?;
                let id = peer_identity(end_entity).map_err(cert_error)?;
                if !matches!(id, SpiffeId::Hub { .. }) {
                    return Err(cert_error(PkiError::UnexpectedPeer {
                        expected: "a hub".into(),
                        found: id.to_string(),
                    }));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with our TLS 1.3-only configs; delegated for correctness.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The webpki client verifier, plus a check that the client certificate
/// carries a valid SPIFFE ID, so malformed identities fail the handshake
/// rather than surfacing later in the application.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        peer_identity(end_entity).map_err(cert_error)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

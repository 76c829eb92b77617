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
    /// The POP agent `pop` or any gateway of that POP (gateway-to-gateway
    /// connections dial a peer POP, not one instance).
    AnyOfPop {
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
            (Self::AnyOfPop { domain, pop }, id) => {
                id.domain() == domain && id.pop_name() == Some(pop.as_str())
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
            Self::AnyOfPop { domain, pop } => {
                write!(f, "spiffe://{domain}/pop/{pop} or one of its gateways")
            }
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
        let issuer = match chain.last() {
            Some(last) => issuer_of(last, &cas)?,
            None => None,
        };
        chain.extend(issuer);
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

/// The CA among `cas` that issued `cert`, if any: its subject must be the
/// certificate's issuer and, where both are present, its subject key
/// identifier must equal the certificate's authority key identifier (CAs of
/// the same domain share a subject name, e.g. old and new during rotation).
fn issuer_of(
    cert: &CertificateDer<'_>,
    cas: &[CertificateDer<'static>],
) -> Result<Option<CertificateDer<'static>>> {
    use x509_parser::extensions::ParsedExtension;

    let (_, leaf) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
    let aki = leaf
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        });
    for ca in cas {
        let (_, x) = x509_parser::parse_x509_certificate(ca)
            .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
        if x.subject().as_raw() != leaf.issuer().as_raw() {
            continue;
        }
        let ski = x
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
                _ => None,
            });
        match (aki, ski) {
            (Some(a), Some(s)) if a != s => continue,
            _ => return Ok(Some(ca.clone())),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::{generate_csr, CertificateAuthority};
    use rustls::{ClientConnection, ServerConnection};
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const DOMAIN: &str = "example.org";
    const ALPN: &[u8] = b"switchyard/1";

    fn alpn() -> Vec<Vec<u8>> {
        vec![ALPN.to_vec()]
    }

    struct Outcome {
        client: ClientConnection,
        server: ServerConnection,
        client_err: Option<rustls::Error>,
        server_err: Option<rustls::Error>,
    }

    impl Outcome {
        fn ok(&self) -> bool {
            self.client_err.is_none()
                && self.server_err.is_none()
                && !self.client.is_handshaking()
                && !self.server.is_handshaking()
        }
    }

    /// Moves all pending TLS bytes from `from` to `to`; returns whether any
    /// moved and the receiver's processing error, if any.
    fn transfer(
        from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
        to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    ) -> (bool, Option<rustls::Error>) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        if buf.is_empty() {
            return (false, None);
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            if to.read_tls(&mut rd).is_err() {
                break;
            }
            if let Err(e) = to.process_new_packets() {
                return (true, Some(e));
            }
        }
        (true, None)
    }

    /// Runs a handshake between the two configs in memory, no sockets.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Outcome {
        let mut c = ClientConnection::new(Arc::new(client), sni_name()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        let (mut client_err, mut server_err) = (None, None);
        for _ in 0..32 {
            let (moved_cs, e) = if server_err.is_none() {
                transfer(&mut c, &mut s)
            } else {
                (false, None)
            };
            server_err = server_err.or(e);
            let (moved_sc, e) = if client_err.is_none() {
                transfer(&mut s, &mut c)
            } else {
                (false, None)
            };
            client_err = client_err.or(e);
            if !moved_cs && !moved_sc {
                break;
            }
        }
        Outcome {
            client: c,
            server: s,
            client_err,
            server_err,
        }
    }

    struct Fed {
        ca: CertificateAuthority,
    }

    impl Fed {
        fn new() -> Self {
            Self {
                ca: CertificateAuthority::generate(DOMAIN).unwrap(),
            }
        }

        fn server(&self, id: &SpiffeId, auth: ClientAuth) -> ServerConfig {
            let kp = self.ca.issue(id, DAY).unwrap();
            server_config(&kp.cert_pem, &kp.key_pem, self.ca.cert_pem(), auth, alpn()).unwrap()
        }

        fn hub_server(&self, auth: ClientAuth) -> ServerConfig {
            self.server(&SpiffeId::hub(DOMAIN, 1).unwrap(), auth)
        }

        /// A client with a CSR-issued POP certificate, the way an agent gets one.
        fn pop_client(&self, expect: ExpectedPeer) -> ClientConfig {
            let id = SpiffeId::pop(DOMAIN, "fra").unwrap();
            let (csr, key) = generate_csr(&id).unwrap();
            let cert = self.ca.sign_csr(&csr, &id, DAY).unwrap();
            client_config(Some((&cert, &key)), self.ca.cert_pem(), expect, alpn()).unwrap()
        }

        fn anon_client(&self, expect: ExpectedPeer) -> ClientConfig {
            client_config(None, self.ca.cert_pem(), expect, alpn()).unwrap()
        }
    }

    fn any_hub() -> ExpectedPeer {
        ExpectedPeer::AnyHub {
            domain: DOMAIN.into(),
        }
    }

    fn err_text(e: &Option<rustls::Error>) -> String {
        e.as_ref().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn expected_peer_matching() {
        let hub = SpiffeId::hub(DOMAIN, 3).unwrap();
        let pop = SpiffeId::pop(DOMAIN, "fra").unwrap();
        let gw = SpiffeId::gateway(DOMAIN, "fra", "gw-1").unwrap();
        let other_gw = SpiffeId::gateway(DOMAIN, "ams", "gw-1").unwrap();
        let op = SpiffeId::operator(DOMAIN, "alice").unwrap();
        let d = || DOMAIN.to_string();
        let of_fra = ExpectedPeer::AnyOfPop {
            domain: d(),
            pop: "fra".into(),
        };
        assert!(of_fra.matches(&pop) && of_fra.matches(&gw));
        assert!(!of_fra.matches(&other_gw) && !of_fra.matches(&hub));
        let any_hub = ExpectedPeer::AnyHub { domain: d() };
        assert!(any_hub.matches(&hub) && !any_hub.matches(&op));
        let pop_fra = ExpectedPeer::Pop {
            domain: d(),
            pop: "fra".into(),
        };
        assert!(pop_fra.matches(&pop) && !pop_fra.matches(&gw));
        let any = ExpectedPeer::AnyInDomain { domain: d() };
        assert!([&hub, &pop, &gw, &op].iter().all(|id| any.matches(id)));
        let elsewhere = ExpectedPeer::AnyInDomain {
            domain: "other.org".into(),
        };
        assert!(!elsewhere.matches(&hub));
    }

    #[test]
    fn sni_name_is_a_dns_name() {
        assert!(matches!(sni_name(), ServerName::DnsName(_)));
    }

    #[test]
    fn mutual_tls_succeeds_and_both_sides_see_identities() {
        let fed = Fed::new();
        let expect = ExpectedPeer::Hub {
            domain: DOMAIN.into(),
            node: 1,
        };
        let out = handshake(fed.pop_client(expect), fed.hub_server(ClientAuth::Required));
        assert!(out.ok(), "{:?} / {:?}", out.client_err, out.server_err);
        let client_id = peer_identity_from_chain(out.server.peer_certificates().unwrap()).unwrap();
        assert_eq!(client_id, SpiffeId::pop(DOMAIN, "fra").unwrap());
        let server_id = peer_identity_from_chain(out.client.peer_certificates().unwrap()).unwrap();
        assert_eq!(server_id, SpiffeId::hub(DOMAIN, 1).unwrap());
        assert_eq!(out.server.alpn_protocol(), Some(ALPN));
        assert_eq!(
            out.client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // The server sends [leaf, ca] even though it was given only the leaf.
        let chain = out.client.peer_certificates().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], fed.ca.cert_der());
    }

    #[test]
    fn client_cert_from_another_ca_fails() {
        let fed = Fed::new();
        let rogue = Fed::new();
        let id = SpiffeId::pop(DOMAIN, "fra").unwrap();
        let kp = rogue.ca.issue(&id, DAY).unwrap();
        // The client trusts the real CA for the server but presents a rogue cert.
        let client = client_config(
            Some((&kp.cert_pem, &kp.key_pem)),
            fed.ca.cert_pem(),
            any_hub(),
            alpn(),
        )
        .unwrap();
        let out = handshake(client, fed.hub_server(ClientAuth::Required));
        assert!(!out.ok());
        assert!(
            out.server_err.is_some(),
            "server must refuse the rogue cert"
        );
        // Same with Optional: a certificate, if presented, must be valid.
        let client = client_config(
            Some((&kp.cert_pem, &kp.key_pem)),
            fed.ca.cert_pem(),
            any_hub(),
            alpn(),
        )
        .unwrap();
        let out = handshake(client, fed.hub_server(ClientAuth::Optional));
        assert!(out.server_err.is_some());
    }

    #[test]
    fn no_client_cert_fails_when_required_and_passes_when_optional() {
        let fed = Fed::new();
        let out = handshake(
            fed.anon_client(any_hub()),
            fed.hub_server(ClientAuth::Required),
        );
        assert!(!out.ok());
        assert_eq!(out.server_err, Some(rustls::Error::NoCertificatesPresented));

        let out = handshake(
            fed.anon_client(any_hub()),
            fed.hub_server(ClientAuth::Optional),
        );
        assert!(out.ok(), "{:?} / {:?}", out.client_err, out.server_err);
        assert!(out.server.peer_certificates().is_none());
        assert!(matches!(
            peer_identity_from_chain(out.server.peer_certificates().unwrap_or(&[])),
            Err(PkiError::NoPeerCertificate)
        ));
    }

    #[test]
    fn client_checks_the_server_identity() {
        let fed = Fed::new();
        let pop_server =
            || fed.server(&SpiffeId::pop(DOMAIN, "fra").unwrap(), ClientAuth::Optional);
        let hub1 = || fed.hub_server(ClientAuth::Optional);

        // Expecting a hub, reaching a POP.
        let out = handshake(fed.anon_client(any_hub()), pop_server());
        assert!(!out.ok());
        let msg = err_text(&out.client_err);
        assert!(msg.contains("pop/fra") && msg.contains("hub"), "{msg}");

        // Expecting hub 2, reaching hub 1.
        let expect = ExpectedPeer::Hub {
            domain: DOMAIN.into(),
            node: 2,
        };
        let out = handshake(fed.anon_client(expect), hub1());
        assert!(out.client_err.is_some());

        // Expecting the POP "ams", reaching "fra"; then "fra" itself.
        let expect = ExpectedPeer::Pop {
            domain: DOMAIN.into(),
            pop: "ams".into(),
        };
        assert!(handshake(fed.anon_client(expect), pop_server())
            .client_err
            .is_some());
        let expect = ExpectedPeer::Pop {
            domain: DOMAIN.into(),
            pop: "fra".into(),
        };
        assert!(handshake(fed.anon_client(expect), pop_server()).ok());

        // Any identity in the domain; a different domain never matches.
        let expect = ExpectedPeer::AnyInDomain {
            domain: DOMAIN.into(),
        };
        assert!(handshake(fed.anon_client(expect), pop_server()).ok());
        let expect = ExpectedPeer::AnyHub {
            domain: "other.org".into(),
        };
        assert!(handshake(fed.anon_client(expect), hub1())
            .client_err
            .is_some());
    }

    #[test]
    fn server_from_another_ca_is_rejected() {
        let fed = Fed::new();
        let rogue = Fed::new();
        let out = handshake(
            fed.anon_client(any_hub()),
            rogue.hub_server(ClientAuth::Optional),
        );
        assert!(!out.ok());
        assert!(
            matches!(
                out.client_err,
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                ))
            ),
            "{:?}",
            out.client_err
        );
    }

    #[test]
    fn pinned_ca_accepts_right_ca_and_rejects_another() {
        let fed = Fed::new();
        let rogue = Fed::new();
        let pinned = || ca_pinned_client_config(&fed.ca.fingerprint(), alpn()).unwrap();

        let out = handshake(pinned(), fed.hub_server(ClientAuth::Optional));
        assert!(out.ok(), "{:?} / {:?}", out.client_err, out.server_err);
        let chain = out.client.peer_certificates().unwrap();
        let ca = pinned_ca_from_chain(chain, &fed.ca.fingerprint()).unwrap();
        assert_eq!(&ca, fed.ca.cert_der());
        assert!(crate::JoinToken::generate(&fed.ca.fingerprint())
            .unwrap()
            .ca_matches(&ca));

        // A server of another federation (its own valid CA) is refused.
        let out = handshake(pinned(), rogue.hub_server(ClientAuth::Optional));
        assert!(out.client_err.is_some());
        assert!(err_text(&out.client_err).contains("pinned"));

        // A server that forwards our CA cert but holds a leaf from another CA
        // (a man in the middle) is refused.
        let kp = rogue
            .ca
            .issue(&SpiffeId::hub(DOMAIN, 1).unwrap(), DAY)
            .unwrap();
        let mitm_chain = format!("{}{}", kp.cert_pem, fed.ca.cert_pem());
        let mitm = server_config(
            &mitm_chain,
            &kp.key_pem,
            rogue.ca.cert_pem(),
            ClientAuth::Optional,
            alpn(),
        )
        .unwrap();
        let out = handshake(pinned(), mitm);
        assert!(
            matches!(
                out.client_err,
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                ))
            ),
            "{:?}",
            out.client_err
        );

        // A non-hub identity of the right CA is refused.
        let pop = fed.server(&SpiffeId::pop(DOMAIN, "fra").unwrap(), ClientAuth::Optional);
        let out = handshake(pinned(), pop);
        assert!(
            err_text(&out.client_err).contains("a hub"),
            "{:?}",
            out.client_err
        );
    }

    #[test]
    fn pinned_config_rejects_bad_fingerprint() {
        assert!(ca_pinned_client_config("abcd", alpn()).is_err());
        assert!(ca_pinned_client_config(&"z".repeat(64), alpn()).is_err());
    }

    #[test]
    fn loaders_report_clear_errors() {
        let e = load_certs_pem("nothing here").unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        assert!(load_key_pem("nothing").is_err());
        let fed = Fed::new();
        assert!(load_key_pem(&fed.ca.key_pem()).is_ok());
        assert_eq!(load_certs_pem(fed.ca.cert_pem()).unwrap().len(), 1);
    }

    #[test]
    fn server_config_refuses_cert_without_spiffe_id() {
        // The CA certificate itself has no valid leaf SPIFFE ID.
        let fed = Fed::new();
        let r = server_config(
            fed.ca.cert_pem(),
            &fed.ca.key_pem(),
            fed.ca.cert_pem(),
            ClientAuth::Required,
            alpn(),
        );
        assert!(r.is_err());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod rotation_tests {
    use super::*;
    use crate::CertificateAuthority;
    use std::time::Duration;

    #[test]
    fn chain_completion_picks_the_issuing_ca_among_same_named_cas() {
        let old = CertificateAuthority::generate("example.org").unwrap();
        let new = CertificateAuthority::generate("example.org").unwrap();
        let kp = new
            .issue(
                &SpiffeId::hub("example.org", 1).unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
        let leaf = load_certs_pem(&kp.cert_pem).unwrap();
        let cas = load_certs_pem(&bundle).unwrap();
        assert_eq!(
            issuer_of(&leaf[0], &cas).unwrap().as_ref(),
            Some(new.cert_der())
        );
    }
}

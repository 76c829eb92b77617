//! First start of a POP: trade a join token for a certificate.
//!
//! 1. The token is parsed before anything touches the network (a mistyped
//!    token fails at once, with no secret sent anywhere).
//! 2. The agent generates its own key and a CSR. The token does not say
//!    which POP it is for (the hub's record does), so the CSR carries no
//!    SAN and the hub signs it for the token's POP; the response names it.
//! 3. It dials the hub's gRPC addresses in order with a TLS config that
//!    trusts only the CA whose SHA-256 is in the token
//!    ([`switchyard_pki::ca_pinned_client_config`]), so the secret only
//!    goes to a hub holding the federation's CA, and calls
//!    `Enrolment.Enrol`.
//! 4. It checks the answer (the certificate is for `spiffe://D/pop/P` and
//!    chains to the CA the token pinned) and writes the CA, the key (0600),
//!    the certificate and finally `agent.toml` to the data dir.
//!
//! Errors never contain the token or its secret.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use switchyard_pki::{JoinToken, SpiffeId};
use switchyard_proto::pb;
use switchyard_proto::pb::enrolment_client::EnrolmentClient;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::{AgentRecord, ConfigError, DataDir, Identity};

/// ALPN of the hub's gRPC listener.
pub const ALPN_H2: &[u8] = b"h2";
/// Longest TCP + TLS connect to one hub address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one `Enrol` call may take (it commits through Raft).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The token does not parse (nothing was sent).
    #[error("the join token is malformed ({0}); expected K10<sha256 of CA>::<id>.<secret> from `switchyard token create --pop NAME`")]
    BadToken(String),
    /// No hub address to enrol through.
    #[error("no hub address: pass --hub ADDR[,ADDR...] (the hub's gRPC address)")]
    NoHub,
    /// A hub refused the enrolment (the token is spent, expired, unknown,
    /// for another federation, or the POP is revoked); trying other hub
    /// nodes would give the same answer.
    #[error("hub {addr} refused the enrolment ({code:?}): {message}")]
    Refused {
        /// The hub address that answered.
        addr: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The hub's explanation.
        message: String,
    },
    /// No hub address could be reached or answered.
    #[error("could not enrol through any hub address: {}", .0.join("; "))]
    Unreachable(Vec<String>),
    /// The hub's answer does not hold together.
    #[error("hub {addr} answered with an unusable enrolment: {reason}")]
    BadResponse {
        /// The hub address that answered.
        addr: String,
        /// What is wrong.
        reason: String,
    },
    /// Key or CSR generation, or a TLS config, failed.
    #[error("{0}")]
    Pki(String),
    /// The data dir cannot be written.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What a successful enrolment stored.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// `agent.toml`.
    pub record: AgentRecord,
    /// The certificate, key and CA.
    pub identity: Identity,
}

/// Enrols through the first of `hub_grpc` that answers, with `token`, and
/// stores the result in `data`. `quic_override`, when not empty, replaces
/// the QUIC addresses the hub announced.
pub async fn enrol(
    data: &DataDir,
    token: &str,
    hub_grpc: &[String],
    quic_override: &[String],
    agent_version: &str,
) -> Result<Enrolled, EnrolError> {
    let parsed = JoinToken::parse(token.trim()).map_err(|e| EnrolError::BadToken(e.to_string()))?;
    if hub_grpc.is_empty() {
        return Err(EnrolError::NoHub);
    }
    // Before spending the token: a data dir we cannot write would lose the
    // certificate it buys.
    data.prepare()?;
    let (csr_pem, key_pem) = csr_without_san()?;
    let tls =
        switchyard_pki::ca_pinned_client_config(&parsed.ca_fingerprint(), vec![ALPN_H2.to_vec()])
            .map_err(|e| EnrolError::Pki(e.to_string()))?;
    let tls = Arc::new(tls);
    let mut failures = Vec::new();
    for addr in hub_grpc {
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, connect(addr, tls.clone())).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                failures.push(format!("{addr}: {e}"));
                continue;
            }
            Err(_) => {
                failures.push(format!("{addr}: connect timed out"));
                continue;
            }
        };
        let mut client = EnrolmentClient::new(channel);
        let request = pb::EnrolRequest {
            token: token.trim().to_string(),
            csr_pem: csr_pem.clone(),
            agent_version: agent_version.chars().take(64).collect(),
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.enrol(request)).await;
        let response = match answer {
            Err(_) => {
                failures.push(format!("{addr}: no answer within {CALL_TIMEOUT:?}"));
                continue;
            }
            Ok(Err(status)) => match status.code() {
                // Worth trying another node: this one is down, has no
                // quorum, or the transport failed.
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Unimplemented => {
                    failures.push(format!("{addr}: {}", status.message()));
                    continue;
                }
                code => {
                    return Err(EnrolError::Refused {
                        addr: addr.clone(),
                        code,
                        message: status.message().to_string(),
                    })
                }
            },
            Ok(Ok(r)) => r.into_inner(),
        };
        let enrolled = check_response(addr, &parsed, response, key_pem, hub_grpc, quic_override)?;
        data.store_identity(&enrolled.identity)?;
        data.store_record(&enrolled.record)?;
        tracing::info!(
            pop = %enrolled.record.pop,
            domain = %enrolled.record.domain,
            hub = %addr,
            "enrolled"
        );
        return Ok(enrolled);
    }
    Err(EnrolError::Unreachable(failures))
}

fn check_response(
    addr: &str,
    token: &JoinToken,
    r: pb::EnrolResponse,
    key_pem: String,
    hub_grpc: &[String],
    quic_override: &[String],
) -> Result<Enrolled, EnrolError> {
    let bad = |reason: String| EnrolError::BadResponse {
        addr: addr.to_string(),
        reason,
    };
    let ca = switchyard_pki::load_certs_pem(&r.ca_cert_pem).map_err(|e| bad(e.to_string()))?;
    if !ca.iter().any(|c| token.ca_matches(c)) {
        return Err(bad("the CA it sent is not the one the token pins".into()));
    }
    let want = SpiffeId::pop(&r.domain, &r.pop).map_err(|e| bad(e.to_string()))?;
    let chain = switchyard_pki::load_certs_pem(&r.cert_pem).map_err(|e| bad(e.to_string()))?;
    let got = switchyard_pki::peer_identity_from_chain(&chain).map_err(|e| bad(e.to_string()))?;
    if got != want {
        return Err(bad(format!("certificate is for {got}, expected {want}")));
    }
    let mut hub_quic = if quic_override.is_empty() {
        r.hub_quic_addrs
    } else {
        quic_override.to_vec()
    };
    hub_quic.dedup();
    if hub_quic.is_empty() {
        return Err(bad(
            "no QUIC uplink address announced; pass --uplink-addr".into()
        ));
    }
    let mut grpc = hub_grpc.to_vec();
    for a in r.hub_grpc_addrs {
        if !grpc.contains(&a) {
            grpc.push(a);
        }
    }
    Ok(Enrolled {
        record: AgentRecord {
            pop: r.pop,
            domain: r.domain,
            hub_grpc: grpc,
            hub_quic,
        },
        identity: Identity {
            cert_pem: r.cert_pem,
            key_pem,
            ca_pem: r.ca_cert_pem,
        },
    })
}

/// A fresh ECDSA P-256 key and a CSR without SAN (the hub signs it for the
/// token's POP). Returns `(csr_pem, key_pem)`.
pub fn csr_without_san() -> Result<(String, String), EnrolError> {
    let pki = |what: &str, e: rcgen::Error| EnrolError::Pki(format!("{what}: {e}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| pki("key", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Switchyard pop");
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| pki("CSR", e))?;
    Ok((csr, key.serialize_pem()))
}

/// Validity of the first certificate in `cert_pem`: (not before, not after).
pub fn cert_validity(cert_pem: &str) -> Option<(SystemTime, SystemTime)> {
    let chain = switchyard_pki::load_certs_pem(cert_pem).ok()?;
    let der = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at =
        |t: i64| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(t).ok()?));
    Some((
        at(cert.validity().not_before.timestamp())?,
        at(cert.validity().not_after.timestamp())?,
    ))
}

/// When a certificate valid over `(not_before, not_after)` is renewed: at
/// half life. The federation CA backdates `not_before` by
/// [`CLOCK_SKEW_ALLOWANCE`](switchyard_pki::ca::CLOCK_SKEW_ALLOWANCE); the
/// life is counted from the issue time, so that a short-lived certificate
/// is not due for renewal the moment it arrives.
pub fn renewal_time(validity: (SystemTime, SystemTime)) -> SystemTime {
    let (not_before, to) = validity;
    let issued = (not_before + switchyard_pki::ca::CLOCK_SKEW_ALLOWANCE).min(to);
    let life = to.duration_since(issued).unwrap_or_default();
    issued + life / 2
}

/// Dials `addr` (`host:port`) for gRPC with our own rustls config: the
/// hub's certificate carries a SPIFFE ID, not a DNS name, so tonic's TLS
/// (which checks names) cannot be used.
pub async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let connector = TlsConnector::from(tls);
    endpoint
        .connect_with_connector(tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            async move {
                let host = uri
                    .host()
                    .unwrap_or("127.0.0.1")
                    .trim_matches(['[', ']'])
                    .to_string();
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(switchyard_pki::sni_name(), tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn malformed_token_fails_before_any_network_or_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("never-created"));
        // An address nobody listens on: if the token were not checked
        // first, this would fail differently (unreachable).
        let err = enrol(&data, "not-a-token", &["127.0.0.1:1".into()], &[], "test")
            .await
            .unwrap_err();
        assert!(matches!(err, EnrolError::BadToken(_)), "{err}");
        assert!(err.to_string().contains("K10"), "{err}");
        assert!(!data.root().exists());
    }

    #[tokio::test]
    async fn secret_is_never_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let ca = switchyard_pki::CertificateAuthority::generate("example.org").unwrap();
        let token = JoinToken::generate(&ca.fingerprint()).unwrap();
        let err = enrol(&data, &token.to_string(), &["127.0.0.1:1".into()], &[], "t")
            .await
            .unwrap_err();
        assert!(matches!(err, EnrolError::Unreachable(_)), "{err}");
        assert!(!err.to_string().contains(token.secret()));
        assert!(!data.is_enrolled());
    }

    #[tokio::test]
    async fn no_hub_address_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = switchyard_pki::CertificateAuthority::generate("example.org").unwrap();
        let token = JoinToken::generate(&ca.fingerprint()).unwrap();
        let err = enrol(&DataDir::new(dir.path()), &token.to_string(), &[], &[], "t")
            .await
            .unwrap_err();
        assert!(matches!(err, EnrolError::NoHub));
    }

    #[test]
    fn csr_without_san_is_signed_for_the_tokens_pop() {
        let ca = switchyard_pki::CertificateAuthority::generate("example.org").unwrap();
        let (csr, key) = csr_without_san().unwrap();
        let id = SpiffeId::pop("example.org", "north-1").unwrap();
        let cert = ca.sign_csr(&csr, &id, Duration::from_secs(3600)).unwrap();
        let chain = switchyard_pki::load_certs_pem(&cert).unwrap();
        assert_eq!(
            switchyard_pki::peer_identity_from_chain(&chain).unwrap(),
            id
        );
        // The key and certificate make a usable client identity.
        switchyard_pki::client_config(
            Some((&cert, &key)),
            ca.cert_pem(),
            switchyard_pki::ExpectedPeer::AnyHub {
                domain: "example.org".into(),
            },
            vec![],
        )
        .unwrap();
        let (from, to) = cert_validity(&cert).unwrap();
        let life = to.duration_since(from).unwrap();
        // Valid for the hour asked, plus the CA's backdating for clock skew.
        assert!(life >= Duration::from_secs(3599) && life <= Duration::from_secs(2 * 3600));
        // Half of the hour asked for, counted from the issue time.
        let renew = renewal_time((from, to));
        let left = to.duration_since(renew).unwrap();
        assert!(left >= Duration::from_secs(1799) && left <= Duration::from_secs(1801));
    }
}

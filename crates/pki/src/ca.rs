//! The federation's private certificate authority.
//!
//! One CA per federation signs every leaf: hub nodes and operators get a key
//! pair generated here ([`CertificateAuthority::issue`]); POP agents and
//! gateways generate their own key and send a CSR
//! ([`CertificateAuthority::sign_csr`]), so their private key never leaves
//! them.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::error::{PkiError, Result};
use crate::identity::{validate_domain, SpiffeId};

/// How long a generated CA certificate is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How far in the past `notBefore` is set, so that peers whose clocks lag a
/// little behind ours still accept a freshly issued certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Common-name prefix of generated CA certificates; the rest is the domain.
const CA_CN_PREFIX: &str = "Switchyard CA ";

/// A certificate and its freshly generated private key, both PEM.
#[derive(Clone)]
pub struct IssuedKeyPair {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key, PEM. Keep it secret.
    pub key_pem: String,
}

impl fmt::Debug for IssuedKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key, even in debug logs.
        f.debug_struct("IssuedKeyPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The federation CA: its certificate, its signing key and its trust domain.
pub struct CertificateAuthority {
    domain: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("domain", &self.domain)
            .field("fingerprint", &self.fingerprint())
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

fn to_time_duration(d: Duration) -> Result<time::Duration> {
    time::Duration::try_from(d).map_err(|_| PkiError::InvalidValidity(format!("{d:?} is too long")))
}

impl CertificateAuthority {
    /// Generates a new CA for `domain`: ECDSA P-256, valid for 10 years,
    /// CN `Switchyard CA <domain>`, and the trust-domain SPIFFE ID
    /// `spiffe://<domain>` as its URI SAN (SPIFFE allows it on signing
    /// certificates; we read the domain back from it in [`Self::from_pem`]).
    pub fn generate(domain: &str) -> Result<Self> {
        validate_domain(domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generating the CA key"))?;

        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{CA_CN_PREFIX}{domain}"));
        dn.push(DnType::OrganizationName, "Switchyard");
        // A random unit name makes every CA's subject unique, so path
        // building never confuses two CAs of the same domain (a rotation, or
        // a stranger's federation using the same domain name).
        dn.push(
            DnType::OrganizationalUnitName,
            format!("ca-{}", random_hex(4)?),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{domain}")
                .try_into()
                .map_err(rcgen_err("encoding the CA SAN"))?,
        )];
        // Path length 0: the CA signs leaves only, never intermediate CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - to_time_duration(CLOCK_SKEW_ALLOWANCE)?;
        params.not_after = now + to_time_duration(CA_VALIDITY)?;
        params.serial_number = Some(random_serial()?);

        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-signing the CA certificate"))?;
        Self::from_parts(cert.pem(), cert.der().clone(), key, Some(domain))
    }

    /// Loads an existing CA from its certificate and PKCS#8 key (PEM).
    ///
    /// The trust domain is taken from the certificate's `spiffe://<domain>`
    /// URI SAN, or else from a `Switchyard CA <domain>` common name; for a
    /// CA that has neither, use [`Self::from_pem_with_domain`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::load(cert_pem, key_pem, None)
    }

    /// Loads a supplied CA whose certificate does not name the trust domain.
    pub fn from_pem_with_domain(cert_pem: &str, key_pem: &str, domain: &str) -> Result<Self> {
        validate_domain(domain)?;
        Self::load(cert_pem, key_pem, Some(domain))
    }

    fn load(cert_pem: &str, key_pem: &str, domain: Option<&str>) -> Result<Self> {
        let certs = crate::tls::load_certs_pem(cert_pem)?;
        let [cert_der] = <[CertificateDer<'static>; 1]>::try_from(certs).map_err(|v| {
            PkiError::InvalidCa(format!(
                "expected exactly one certificate in the CA PEM, found {}",
                v.len()
            ))
        })?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err("reading the CA private key"))?;
        Self::from_parts(cert_pem.to_owned(), cert_der, key, domain)
    }

    /// Checks the certificate is a CA matching `key`, finds the domain, and
    /// builds the rcgen issuer from the certificate (so issued leaves carry
    /// the right issuer name and authority key identifier).
    fn from_parts(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
        domain: Option<&str>,
    ) -> Result<Self> {
        let (rest, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::CertificateParse(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::InvalidCa(
                "trailing bytes after the CA certificate".into(),
            ));
        }
        if !x509.is_ca() {
            return Err(PkiError::InvalidCa(
                "certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::InvalidCa(
                "private key does not match the CA certificate; check you paired the right files"
                    .into(),
            ));
        }
        let domain = match domain {
            Some(d) => d.to_owned(),
            None => domain_from_ca_cert(&x509)?,
        };
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(rcgen_err("reading the CA certificate"))?;
        Ok(Self {
            domain,
            cert_pem,
            cert_der,
            not_after,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Store it with restrictive permissions.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The federation's trust domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Lowercase hex SHA-256 of the CA certificate DER, as carried in join
    /// tokens and pinned by [`crate::ca_pinned_client_config`].
    pub fn fingerprint(&self) -> String {
        crate::cert_fingerprint(&self.cert_der)
    }

    /// Generates a P-256 key and a certificate for `id` valid for `validity`
    /// (for hub nodes and operators, whose keys we create ourselves).
    pub fn issue(&self, id: &SpiffeId, validity: Duration) -> Result<IssuedKeyPair> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generating a leaf key"))?;
        let cert_pem = self.sign_leaf(id, &key, validity)?;
        Ok(IssuedKeyPair {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a PEM CSR for `expected`, returning the certificate PEM.
    ///
    /// The CSR's signature is verified (proof of key possession). It is
    /// refused if it requests more than one SAN, or a single SAN other than
    /// `expected`'s URI. Only its public key is used: the certificate gets
    /// the expected SPIFFE ID, our key usages, `validity` and a random
    /// serial, whatever else the CSR asked for.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        validity: Duration,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::CsrRejected(format!("cannot parse or verify the CSR: {e}")))?;
        let expected_uri = expected.to_string();
        match csr.params.subject_alt_names.as_slice() {
            [] => {}
            [SanType::URI(uri)] if uri.as_str() == expected_uri => {}
            [SanType::URI(uri)] => {
                return Err(PkiError::CsrRejected(format!(
                    "CSR asks for {:?} but this request may only obtain {expected_uri}",
                    crate::error::truncate_for_error(uri.as_str())
                )))
            }
            [_] => {
                return Err(PkiError::CsrRejected(
                    "CSR asks for a SAN that is not a URI; only SPIFFE URI SANs are issued".into(),
                ))
            }
            many => {
                return Err(PkiError::CsrRejected(format!(
                    "CSR asks for {} SANs; a Switchyard certificate carries exactly one SPIFFE ID",
                    many.len()
                )))
            }
        }
        // Only the key types our peers generate or could reasonably use; this
        // keeps weak RSA keys out of the federation.
        let alg = csr.public_key.algorithm();
        if ![
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .contains(&alg)
        {
            return Err(PkiError::CsrRejected(
                "unsupported key type; use ECDSA P-256 (as generate_csr does), P-384 or Ed25519"
                    .into(),
            ));
        }
        self.sign_leaf(id_checked(expected)?, &csr.public_key, validity)
    }

    /// Builds and signs an end-entity certificate for `id` over `public_key`.
    fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<String> {
        id_checked(id)?;
        if id.domain() != self.domain {
            return Err(PkiError::WrongDomain {
                id: id.to_string(),
                domain: self.domain.clone(),
            });
        }
        if validity.is_zero() {
            return Err(PkiError::InvalidValidity(
                "validity must be positive".into(),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let mut not_after = now + to_time_duration(validity)?;
        // A leaf cannot outlive its CA: verifiers would reject it then anyway,
        // and a clear cap beats a surprise at expiry.
        if not_after > self.not_after {
            not_after = self.not_after;
        }

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // The identity is the URI SAN; the CN is only a readable hint and
        // stays short to respect the 64-character X.520 limit.
        dn.push(DnType::CommonName, format!("Switchyard {}", id.kind()));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(rcgen_err("encoding the SPIFFE ID SAN"))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - to_time_duration(CLOCK_SKEW_ALLOWANCE)?;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;

        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err("signing the certificate"))?;
        Ok(cert.pem())
    }
}

fn id_checked(id: &SpiffeId) -> Result<&SpiffeId> {
    id.validate()?;
    Ok(id)
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Rng)?;
    // Clear the sign bit (serials must be positive) and set the next one so
    // the DER integer never needs a leading zero octet or gets shortened.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> Result<String> {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Rng)?;
    Ok(hex::encode(bytes))
}

/// Reads the trust domain from a CA certificate: the `spiffe://<domain>` URI
/// SAN if there is one, else a `Switchyard CA <domain>` common name.
fn domain_from_ca_cert(x509: &x509_parser::certificate::X509Certificate<'_>) -> Result<String> {
    use x509_parser::extensions::GeneralName;

    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(domain) = uri.strip_prefix("spiffe://") {
                    validate_domain(domain)?;
                    return Ok(domain.to_owned());
                }
            }
        }
    }
    for cn in x509.subject().iter_common_name() {
        if let Some(domain) = cn.as_str().ok().and_then(|s| s.strip_prefix(CA_CN_PREFIX)) {
            validate_domain(domain)?;
            return Ok(domain.to_owned());
        }
    }
    Err(PkiError::InvalidCa(
        "cannot tell the trust domain from the CA certificate (no spiffe:// URI SAN, no \
         \"Switchyard CA <domain>\" common name); load it with from_pem_with_domain"
            .into(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::csr::generate_csr;
    use crate::identity::peer_identity;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn parse(cert_pem: &str) -> Vec<u8> {
        crate::tls::load_certs_pem(cert_pem).unwrap()[0].to_vec()
    }

    #[test]
    fn generate_and_reload() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        assert_eq!(ca.domain(), "example.org");
        assert_eq!(ca.fingerprint().len(), 64);
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.domain(), "example.org");
        assert_eq!(again.fingerprint(), ca.fingerprint());

        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(x509.is_ca());
        let cn: Vec<_> = x509
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(cn, ["Switchyard CA example.org"]);
        let years = (x509.validity().not_after.timestamp()
            - x509.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);
    }

    #[test]
    fn from_pem_rejects_mismatched_key() {
        let a = CertificateAuthority::generate("a.example").unwrap();
        let b = CertificateAuthority::generate("a.example").unwrap();
        let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn from_pem_rejects_leaf() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let leaf = ca
            .issue(&SpiffeId::hub("example.org", 1).unwrap(), DAY)
            .unwrap();
        let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn issue_produces_proper_leaf() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let id = SpiffeId::hub("example.org", 7).unwrap();
        let kp = ca.issue(&id, DAY).unwrap();
        assert!(!format!("{kp:?}").contains("PRIVATE KEY"));
        let der = parse(&kp.cert_pem);
        assert_eq!(peer_identity(&der).unwrap(), id);

        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x.is_ca());
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = x.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 1, "URI SAN only, no DNS SAN");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let nb = x.validity().not_before.timestamp();
        assert!(
            nb < now - 60 && nb > now - 600,
            "notBefore allows clock skew"
        );
        let na = x.validity().not_after.timestamp();
        assert!((na - now - DAY.as_secs() as i64).abs() < 60);
        assert!(x.raw_serial()[0] & 0x80 == 0);
    }

    #[test]
    fn serials_are_random() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let id = SpiffeId::hub("example.org", 1).unwrap();
        let s1 = parse(&ca.issue(&id, DAY).unwrap().cert_pem);
        let s2 = parse(&ca.issue(&id, DAY).unwrap().cert_pem);
        let (_, a) = x509_parser::parse_x509_certificate(&s1).unwrap();
        let (_, b) = x509_parser::parse_x509_certificate(&s2).unwrap();
        assert_ne!(a.raw_serial(), b.raw_serial());
    }

    #[test]
    fn issue_refuses_other_domain_and_zero_validity() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        assert!(matches!(
            ca.issue(&SpiffeId::hub("other.org", 1).unwrap(), DAY),
            Err(PkiError::WrongDomain { .. })
        ));
        assert!(ca
            .issue(&SpiffeId::hub("example.org", 1).unwrap(), Duration::ZERO)
            .is_err());
    }

    #[test]
    fn leaf_validity_capped_at_ca_expiry() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let id = SpiffeId::hub("example.org", 1).unwrap();
        let kp = ca.issue(&id, CA_VALIDITY * 3).unwrap();
        let der = parse(&kp.cert_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(leaf.validity().not_after <= root.validity().not_after);
    }

    #[test]
    fn sign_csr_accepts_matching_request() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let id = SpiffeId::pop("example.org", "fra").unwrap();
        let (csr, key_pem) = generate_csr(&id).unwrap();
        let cert_pem = ca.sign_csr(&csr, &id, DAY).unwrap();
        let der = parse(&cert_pem);
        assert_eq!(peer_identity(&der).unwrap(), id);
        // The certificate is for the CSR's key.
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            x.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn sign_csr_refuses_other_identity() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let asked = SpiffeId::pop("example.org", "evil").unwrap();
        let expected = SpiffeId::pop("example.org", "fra").unwrap();
        let (csr, _) = generate_csr(&asked).unwrap();
        let err = ca.sign_csr(&csr, &expected, DAY).unwrap_err();
        assert!(matches!(err, PkiError::CsrRejected(_)), "{err}");
        assert!(err.to_string().contains("pop/evil"), "{err}");
    }

    #[test]
    fn sign_csr_refuses_several_sans_and_ignores_requested_extras() {
        let ca = CertificateAuthority::generate("example.org").unwrap();
        let id = SpiffeId::pop("example.org", "fra").unwrap();
        let key = KeyPair::generate().unwrap();

        // Two SANs: the right URI plus a DNS name.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into().unwrap()),
            SanType::DnsName("hub.example.org".try_into().unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &id, DAY),
            Err(PkiError::CsrRejected(_))
        ));

        // A CSR asking to be a CA with certificate-signing usage gets a plain leaf.
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let der = parse(&ca.sign_csr(&csr, &id, DAY).unwrap());
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x.is_ca());
        assert!(!x.key_usage().unwrap().unwrap().value.key_cert_sign());

        // Garbage is refused with a clear error.
        assert!(matches!(
            ca.sign_csr("not a csr", &id, DAY),
            Err(PkiError::CsrRejected(_))
        ));
    }

    #[test]
    fn ca_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertificateAuthority>();
    }
}

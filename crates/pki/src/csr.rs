//! Certificate signing requests, made by POP agents and gateways so their
//! private key never leaves the machine.

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
};

use crate::error::{PkiError, Result};
use crate::identity::SpiffeId;

/// Generates an ECDSA P-256 key and a CSR for `id` (its SPIFFE ID as the only
/// SAN). Returns `(csr_pem, key_pem)`; keep `key_pem` secret and send only the
/// CSR to the hub.
pub fn generate_csr(id: &SpiffeId) -> Result<(String, String)> {
    id.validate()?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Rcgen {
        what: "generating a key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Switchyard {}", id.kind()));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(
        |source| PkiError::Rcgen {
            what: "encoding the SPIFFE ID SAN",
            source,
        },
    )?)];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|source| PkiError::Rcgen {
            what: "creating the CSR",
            source,
        })?;
    Ok((csr, key.serialize_pem()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_the_identity() {
        let id = SpiffeId::gateway("example.org", "fra", "gw-1").unwrap();
        let (csr, key) = generate_csr(&id).unwrap();
        assert!(csr.contains("CERTIFICATE REQUEST"));
        assert!(key.contains("PRIVATE KEY"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        match parsed.params.subject_alt_names.as_slice() {
            [SanType::URI(u)] => assert_eq!(u.as_str(), id.to_string()),
            other => panic!("unexpected SANs {other:?}"),
        }
    }
}

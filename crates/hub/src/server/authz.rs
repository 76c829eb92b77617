//! Who may call what: identities come from the verified client
//! certificate (its SPIFFE URI SAN), never from message fields.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use switchyard_pki::SpiffeId;
use tonic::{Request, Status};

use crate::metrics;

/// Identities remembered by leaf certificate: past this many, the memory
/// starts over (a federation has a few operators and hub nodes, and POPs
/// do not call these services).
const IDENTITY_CACHE_LEN: usize = 256;

/// The part of the trust policy every listener shares.
#[derive(Debug, Clone)]
pub struct Authz {
    domain: Arc<str>,
    /// Identity of each leaf certificate seen (DER bytes as the key): the
    /// same bytes always parse to the same identity, and parsing X.509 on
    /// every call was a visible share of a write's CPU.
    identities: Arc<Mutex<HashMap<Box<[u8]>, SpiffeId>>>,
}

impl Authz {
    /// A policy for the federation `domain`.
    pub fn new(domain: impl Into<Arc<str>>) -> Self {
        Self {
            domain: domain.into(),
            identities: Arc::default(),
        }
    }

    /// The caller's identity, if it presented a certificate of our CA with
    /// a SPIFFE ID in our trust domain.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let Some(chain) = req.peer_certs() else {
            metrics::rejected("no_client_cert");
            return Err(Status::unauthenticated(
                "no client certificate: this call needs the credentials in admin.toml \
                 (switchyard --config PATH), issued by this federation's CA",
            ));
        };
        let id = self.identity(&chain).map_err(|e| {
            metrics::rejected("bad_identity");
            Status::unauthenticated(format!("client certificate has no usable identity: {e}"))
        })?;
        if id.domain() != &*self.domain {
            metrics::rejected("foreign_domain");
            return Err(Status::permission_denied(format!(
                "identity {id} is not in trust domain {}",
                self.domain
            )));
        }
        Ok(id)
    }

    /// The identity in a verified chain's leaf, parsed once per distinct
    /// leaf.
    fn identity(
        &self,
        chain: &[tonic::transport::CertificateDer<'_>],
    ) -> Result<SpiffeId, switchyard_pki::PkiError> {
        let Some(leaf) = chain.first() else {
            return Err(switchyard_pki::PkiError::NoPeerCertificate);
        };
        let leaf = leaf.as_ref();
        if let Some(id) = self.cached(|m| m.get(leaf).cloned()).flatten() {
            return Ok(id);
        }
        let id = switchyard_pki::peer_identity(leaf)?;
        self.cached(|m| {
            if m.len() >= IDENTITY_CACHE_LEN {
                m.clear();
            }
            m.insert(leaf.into(), id.clone());
        });
        Ok(id)
    }

    fn cached<R>(&self, f: impl FnOnce(&mut HashMap<Box<[u8]>, SpiffeId>) -> R) -> Option<R> {
        self.identities.lock().ok().map(|mut m| f(&mut m))
    }

    /// Only hub nodes (the Raft service).
    pub fn require_hub<T>(&self, req: &Request<T>) -> Result<u64, Status> {
        match self.caller(req)? {
            SpiffeId::Hub { node, .. } => Ok(node),
            other => {
                metrics::rejected("wrong_role");
                Err(Status::permission_denied(format!(
                    "{other} may not call the hub-to-hub service (hub identities only)"
                )))
            }
        }
    }

    /// Only operators (admin calls).
    pub fn require_operator<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match self.caller(req)? {
            SpiffeId::Operator { name, .. } => Ok(name),
            other => {
                metrics::rejected("wrong_role");
                Err(Status::permission_denied(format!(
                    "{other} may not call the admin API (operator identities only)"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use switchyard_pki::{load_certs_pem, CertificateAuthority, SpiffeId};

    use super::Authz;

    #[test]
    fn identities_are_parsed_once_per_leaf_and_errors_are_not_kept() {
        let ca = CertificateAuthority::generate("fed.test").unwrap();
        let authz = Authz::new("fed.test");
        let chain = |id: &SpiffeId| {
            let issued = ca.issue(id, Duration::from_secs(3600)).unwrap();
            load_certs_pem(&issued.cert_pem).unwrap()
        };
        let op = SpiffeId::operator("fed.test", "alice").unwrap();
        let hub = SpiffeId::hub("fed.test", 2).unwrap();
        let (a, h) = (chain(&op), chain(&hub));
        for _ in 0..2 {
            assert_eq!(authz.identity(&a).unwrap(), op);
            assert_eq!(authz.identity(&h).unwrap(), hub);
        }
        assert_eq!(authz.identities.lock().unwrap().len(), 2);
        let garbage = vec![tonic::transport::CertificateDer::from(vec![
            0x30, 0x03, 1, 2, 3,
        ])];
        assert!(authz.identity(&garbage).is_err());
        assert!(authz.identity(&[]).is_err());
        assert_eq!(authz.identities.lock().unwrap().len(), 2);
    }
}

//! Who may call what: identities come from the verified client
//! certificate (its SPIFFE URI SAN), never from message fields.

use std::sync::Arc;

use switchyard_pki::SpiffeId;
use tonic::{Request, Status};

use crate::metrics;

/// The part of the trust policy every listener shares.
#[derive(Debug, Clone)]
pub struct Authz {
    domain: Arc<str>,
}

impl Authz {
    /// A policy for the federation `domain`.
    pub fn new(domain: impl Into<Arc<str>>) -> Self {
        Self {
            domain: domain.into(),
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
        let id = switchyard_pki::peer_identity_from_chain(&chain).map_err(|e| {
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

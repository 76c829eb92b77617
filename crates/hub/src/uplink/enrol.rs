//! POP enrolment (`switchyard.v1.Enrolment`) and certificate signing for
//! POPs (enrolment and renewal over the uplink).
//!
//! Order of checks in [`EnrolmentService::enrol`], chosen so that a request
//! that cannot succeed never spends the token:
//! 1. the token parses and names this federation's CA;
//! 2. the token record (linearizable read) is a POP token, and the CSR
//!    verifies and asks for `spiffe://D/pop/<token's POP>` (or no SAN);
//! 3. the POP is not revoked;
//! 4. `ConsumeToken` through Raft: exactly one caller wins; it creates the
//!    POP with the token's labels;
//! 5. the replicated CA signs the CSR.
//!
//! Refusals are counted in `switchyard_hub_rejected_requests_total{reason}`
//! and logged with the token id only, never its secret or the token.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use switchyard_pki::{CertificateAuthority, JoinToken, SpiffeId};
use switchyard_proto::pb::{self, command::Kind, enrolment_server::Enrolment, ErrorCode};
use tonic::{Request, Response, Status};

use crate::{
    metrics,
    node::{Consistency, Hub},
    server::admin::now_ms,
};

/// Default lifetime of a POP certificate (agents renew at half life).
pub const DEFAULT_POP_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Largest enrolment request we decode (bytes): a token and a CSR.
pub const MAX_ENROL_MESSAGE: usize = 64 * 1024;
/// Longest `agent_version` accepted (bytes).
const MAX_AGENT_VERSION: usize = 64;

/// Why signing a POP's CSR failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The federation is not initialised on this node yet.
    #[error("federation not initialised yet")]
    NoFederation,
    /// The replicated CA cannot be loaded.
    #[error("federation CA unusable: {0}")]
    Ca(String),
    /// The POP name is not a valid identity.
    #[error("POP name: {0}")]
    Identity(String),
    /// The CSR does not verify or asks for another identity.
    #[error("certificate request refused: {0}")]
    Csr(String),
}

/// Loads the replicated CA from this node's applied state.
pub fn federation_ca(hub: &Hub) -> Result<CertificateAuthority, SignError> {
    let fed = hub
        .local(|s| s.federation.clone())
        .ok_or(SignError::NoFederation)?;
    CertificateAuthority::from_pem_with_domain(&fed.ca_cert_pem, &fed.ca_key_pem, &fed.domain)
        .map_err(|e| SignError::Ca(e.to_string()))
}

/// Signs `csr_pem` for `spiffe://D/pop/<pop>` with the replicated CA.
pub fn sign_pop_csr(
    ca: &CertificateAuthority,
    pop: &str,
    csr_pem: &str,
    validity: Duration,
) -> Result<String, SignError> {
    let id = SpiffeId::pop(ca.domain(), pop).map_err(|e| SignError::Identity(e.to_string()))?;
    ca.sign_csr(csr_pem, &id, validity)
        .map_err(|e| SignError::Csr(e.to_string()))
}

/// Signs `csr_pem` for gateway `instance` of `pop`
/// (`spiffe://D/pop/<pop>/gw/<instance>`) with the replicated CA. The CSR
/// must ask for exactly that identity (or none).
pub fn sign_gateway_csr(
    ca: &CertificateAuthority,
    pop: &str,
    instance: &str,
    csr_pem: &str,
    validity: Duration,
) -> Result<String, SignError> {
    let id = SpiffeId::gateway(ca.domain(), pop, instance)
        .map_err(|e| SignError::Identity(e.to_string()))?;
    ca.sign_csr(csr_pem, &id, validity)
        .map_err(|e| SignError::Csr(e.to_string()))
}

/// The Enrolment service of one hub node.
#[derive(Debug, Clone)]
pub struct EnrolmentService {
    hub: Hub,
    validity: Duration,
    quic_addrs: Vec<String>,
}

impl EnrolmentService {
    /// Serves enrolments through `hub`, issuing certificates valid for
    /// `validity`; `quic_addrs` are the uplink addresses told to agents.
    pub fn new(hub: Hub, validity: Duration, quic_addrs: Vec<String>) -> Self {
        Self {
            hub,
            validity,
            quic_addrs,
        }
    }

    /// Every member's uplink address as announced in the state (so an
    /// agent can fail over to any node), this node's own when none is.
    fn quic_addrs(&self) -> Vec<String> {
        let m = self.hub.raft().metrics().borrow_watched().clone();
        let members: Vec<u64> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        let announced: Vec<String> = self.hub.local(|s| {
            members
                .iter()
                .filter_map(|id| s.hub_uplinks.get(id).cloned())
                .collect()
        });
        if announced.is_empty() {
            self.quic_addrs.clone()
        } else {
            announced
        }
    }

    fn grpc_addrs(&self) -> Vec<String> {
        let m = self.hub.raft().metrics().borrow_watched().clone();
        m.membership_config
            .membership()
            .nodes()
            .map(|(_, n)| n.addr.clone())
            .collect()
    }
}

/// Counts and logs one refusal, then returns it.
fn refuse(reason: &'static str, token_id: &str, status: Status) -> Status {
    metrics::rejected(reason);
    tracing::info!(
        reason,
        token_id,
        message = status.message(),
        "enrolment refused"
    );
    status
}

#[tonic::async_trait]
impl Enrolment for EnrolmentService {
    async fn enrol(
        &self,
        req: Request<pb::EnrolRequest>,
    ) -> Result<Response<pb::EnrolResponse>, Status> {
        let r = req.into_inner();
        let token = JoinToken::parse(&r.token).map_err(|e| {
            refuse(
                "bad_token",
                "",
                Status::invalid_argument(format!("join token: {e}")),
            )
        })?;
        let tid = token.id().to_string();
        if r.agent_version.len() > MAX_AGENT_VERSION {
            return Err(refuse(
                "bad_request",
                &tid,
                Status::invalid_argument("agent_version longer than 64 bytes"),
            ));
        }
        let ca = federation_ca(&self.hub).map_err(|e| Status::unavailable(e.to_string()))?;
        if !token.ca_matches(ca.cert_der()) {
            return Err(refuse(
                "token_wrong_ca",
                &tid,
                Status::permission_denied(
                    "join token was made for another federation (its CA hash differs)",
                ),
            ));
        }
        // Linearizable: a token created a moment ago on the leader must be
        // visible here before we judge the CSR against its POP.
        let record = self
            .hub
            .read(Consistency::Linearizable, |s| s.tokens.get(&tid).cloned())
            .await?;
        let Some(record) = record else {
            return Err(refuse(
                "token_unknown",
                &tid,
                Status::permission_denied("unknown join token"),
            ));
        };
        if record.kind != pb::TokenKind::Pop as i32 {
            return Err(refuse(
                "token_wrong_kind",
                &tid,
                Status::permission_denied("this is a hub join token, not a POP token"),
            ));
        }
        let pop = record.pop.clone();
        // Check the CSR before spending the token on it.
        if let Err(e) = sign_pop_csr(&ca, &pop, &r.csr_pem, Duration::from_secs(60)) {
            let reason = match &e {
                SignError::Csr(m) if m.contains("may only obtain") => "token_wrong_pop",
                _ => "bad_csr",
            };
            return Err(refuse(
                reason,
                &tid,
                Status::invalid_argument(e.to_string()),
            ));
        }
        if self
            .hub
            .local(|s| s.is_revoked(pb::RevocationKind::Pop, &pop))
        {
            return Err(refuse(
                "pop_revoked",
                &tid,
                Status::permission_denied(format!("POP {pop} is revoked")),
            ));
        }
        let result = self
            .hub
            .propose(pb::Command {
                kind: Some(Kind::ConsumeToken(pb::ConsumeToken {
                    id: tid.clone(),
                    secret_sha256: token.secret_sha256(),
                    kind: pb::TokenKind::Pop as i32,
                    consumer: pop.clone(),
                    now_ms: now_ms(),
                })),
            })
            .await?;
        let code = ErrorCode::try_from(result.error).unwrap_or(ErrorCode::Invalid);
        let refused = |reason, msg: &str| {
            Err(refuse(
                reason,
                &tid,
                Status::permission_denied(msg.to_string()),
            ))
        };
        match code {
            ErrorCode::None => {}
            ErrorCode::TokenConsumed => return refused("token_replayed", &result.message),
            ErrorCode::TokenExpired => return refused("token_expired", &result.message),
            ErrorCode::TokenMismatch => return refused("token_bad_secret", &result.message),
            ErrorCode::NotFound => return refused("token_unknown", &result.message),
            _ => return refused("token_refused", &result.message),
        }
        let consumed = result.token.unwrap_or(record);
        let cert_pem = sign_pop_csr(&ca, &pop, &r.csr_pem, self.validity)
            .map_err(|e| Status::internal(e.to_string()))?;
        let labels = self
            .hub
            .local(|s| s.pops.get(&pop).and_then(|p| p.labels.clone()))
            .or(consumed.labels);
        tracing::info!(
            pop,
            token_id = tid,
            agent_version = r.agent_version,
            "POP enrolled"
        );
        let validity_ms = i64::try_from(self.validity.as_millis()).unwrap_or(i64::MAX);
        Ok(Response::new(pb::EnrolResponse {
            cert_pem,
            ca_cert_pem: ca.cert_pem().to_string(),
            domain: ca.domain().to_string(),
            pop,
            labels,
            hub_quic_addrs: self.quic_addrs(),
            hub_grpc_addrs: self.grpc_addrs(),
            not_after_ms: now_ms().saturating_add(validity_ms),
        }))
    }
}

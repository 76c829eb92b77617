//! The operator API (`switchyard.v1.Admin`): thin handlers that check the
//! caller, turn requests into commands or reads, and map errors to clear
//! statuses. Any node serves any call; writes are forwarded by [`Hub`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::watch::WatchReceiver;

use switchyard_pki::{CertificateAuthority, JoinToken, SpiffeId};
use switchyard_proto::pb::{
    self, admin_client::AdminClient, admin_server::Admin, command::Kind, ErrorCode,
};
use tonic::{Request, Response, Status};

use crate::{
    metrics,
    node::{Consistency, Hub},
    server::authz::Authz,
    state::{valid_name, State},
};

/// Default lifetime of a join token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime of a join token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Lifetime of a hub node certificate.
pub const HUB_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Milliseconds since the Unix epoch, stamped into commands by the node
/// that proposes them (apply itself never reads a clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The Admin service of one hub node.
#[derive(Debug, Clone)]
pub struct AdminService {
    hub: Hub,
    authz: Authz,
}

impl AdminService {
    /// Serves admin calls through `hub`.
    pub fn new(hub: Hub, authz: Authz) -> Self {
        Self { hub, authz }
    }

    async fn write(&self, kind: Kind) -> Result<pb::CommandResult, Status> {
        let r = self.hub.propose(pb::Command { kind: Some(kind) }).await?;
        check(r)
    }

    fn ca(&self) -> Result<CertificateAuthority, Status> {
        let fed = self
            .hub
            .local(|s| s.federation.clone())
            .ok_or_else(|| Status::failed_precondition("federation not initialised yet"))?;
        CertificateAuthority::from_pem_with_domain(&fed.ca_cert_pem, &fed.ca_key_pem, &fed.domain)
            .map_err(|e| Status::internal(format!("federation CA unusable: {e}")))
    }

    /// Consumes `token` through Raft (exactly one caller wins).
    async fn consume(
        &self,
        token: &str,
        kind: pb::TokenKind,
        consumer: String,
    ) -> Result<pb::CommandResult, Status> {
        let parsed = JoinToken::parse(token).map_err(|e| {
            metrics::rejected("bad_token");
            Status::invalid_argument(format!("join token: {e}"))
        })?;
        let ca = self.ca()?;
        if !parsed.ca_matches(ca.cert_der()) {
            metrics::rejected("token_wrong_ca");
            return Err(Status::permission_denied(
                "join token was made for another federation (its CA hash differs)",
            ));
        }
        let r = self
            .hub
            .propose(pb::Command {
                kind: Some(Kind::ConsumeToken(pb::ConsumeToken {
                    id: parsed.id().to_string(),
                    secret_sha256: parsed.secret_sha256(),
                    kind: kind as i32,
                    consumer,
                    now_ms: now_ms(),
                })),
            })
            .await?;
        if r.error != ErrorCode::None as i32 {
            metrics::rejected("token_refused");
        }
        check(r)
    }

    /// Runs `f` on the leader: locally if this node leads, else through the
    /// leader's Admin service with this node's hub identity.
    async fn leader_admin<T>(
        &self,
        local: impl std::future::Future<Output = Result<T, Status>>,
        remote: impl FnOnce(
            AdminClient<tonic::transport::Channel>,
        ) -> futures::future::BoxFuture<'static, Result<T, Status>>,
    ) -> Result<T, Status> {
        let (leader, addr) = self.hub.leader().await?;
        if leader == self.hub.id() {
            return local.await;
        }
        let client = AdminClient::new(self.hub.peer_channel(&addr)?);
        remote(client).await
    }
}

/// Turns a refused command result into a status with its message.
fn check(r: pb::CommandResult) -> Result<pb::CommandResult, Status> {
    let code = ErrorCode::try_from(r.error).unwrap_or(ErrorCode::Invalid);
    let msg = r.message.clone();
    match code {
        ErrorCode::None => Ok(r),
        ErrorCode::NotFound => Err(Status::not_found(msg)),
        ErrorCode::AlreadyExists => Err(Status::already_exists(msg)),
        ErrorCode::Invalid => Err(Status::invalid_argument(msg)),
        ErrorCode::TokenConsumed | ErrorCode::TokenExpired | ErrorCode::TokenMismatch => {
            Err(Status::permission_denied(msg))
        }
        ErrorCode::NotInitialized | ErrorCode::Stale => Err(Status::failed_precondition(msg)),
    }
}

fn members(hub: &Hub) -> (Vec<pb::Member>, u64) {
    let m = hub.raft().metrics().borrow_watched().clone();
    let leader = m.current_leader.unwrap_or(0);
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let matched = m.replication.clone().unwrap_or_default();
    let list = membership
        .nodes()
        .map(|(id, node)| pb::Member {
            id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
            leader: *id == leader,
            matched_index: matched
                .get(id)
                .and_then(|l| l.as_ref().map(|l| l.index()))
                .unwrap_or(0),
        })
        .collect();
    (list, leader)
}

fn policy_key(k: Option<&pb::ServiceKey>) -> Result<(String, String), Status> {
    match k {
        Some(k) if !k.namespace.is_empty() && !k.name.is_empty() => {
            Ok((k.namespace.clone(), k.name.clone()))
        }
        _ => Err(Status::invalid_argument(
            "a service is named NAMESPACE/NAME, both non-empty",
        )),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn federation(
        &self,
        _req: Request<pb::Empty>,
    ) -> Result<Response<pb::FederationInfo>, Status> {
        let fed = self
            .hub
            .local(|s| s.federation.clone())
            .ok_or_else(|| Status::unavailable("federation not initialised yet"))?;
        let (members, _) = members(&self.hub);
        let used = self.hub.local(|s| {
            let tokens = s
                .tokens
                .values()
                .filter(|t| t.consumed && t.kind == pb::TokenKind::Hub as i32)
                .filter_map(|t| t.consumed_by.strip_prefix("hub/")?.parse::<u64>().ok());
            let revoked = s
                .revocations
                .values()
                .filter(|r| r.kind == pb::RevocationKind::Hub as i32)
                .filter_map(|r| r.subject.parse::<u64>().ok());
            tokens.chain(revoked).max().unwrap_or(0)
        });
        let next_node_id = members.iter().map(|m| m.id).max().unwrap_or(0).max(used) + 1;
        Ok(Response::new(pb::FederationInfo {
            domain: fed.domain,
            ca_cert_pem: fed.ca_cert_pem,
            next_node_id,
        }))
    }

    async fn status(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.authz.require_operator(&req)?;
        let m = self.hub.raft().metrics().borrow_watched().clone();
        let (members, leader) = members(&self.hub);
        let (domain, pops, policies, tokens_open, events) = self.hub.local(|s: &State| {
            (
                s.federation
                    .as_ref()
                    .map(|f| f.domain.clone())
                    .unwrap_or_default(),
                s.pops.len() as u32,
                s.policies.len() as u32,
                s.tokens
                    .values()
                    .filter(|t| !t.consumed && t.expires_at_ms > now_ms())
                    .count() as u32,
                s.events.iter().cloned().collect(),
            )
        });
        Ok(Response::new(pb::StatusResponse {
            node_id: self.hub.id(),
            domain,
            term: m.current_term,
            leader_id: leader,
            commit_index: m.local_committed.as_ref().map(|l| l.index()).unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0),
            members,
            pops,
            policies,
            tokens_open,
            version: env!("CARGO_PKG_VERSION").to_string(),
            state: format!("{:?}", m.state),
            events,
        }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.authz.require_operator(&req)?;
        let r = req.into_inner();
        let kind = pb::TokenKind::try_from(r.kind)
            .map_err(|_| Status::invalid_argument("unknown token kind"))?;
        if kind == pb::TokenKind::Pop && !valid_name(&r.pop) {
            return Err(Status::invalid_argument(format!(
                "POP name {:?} is not a DNS label (a-z, 0-9, '-', at most 63 characters)",
                r.pop
            )));
        }
        let ttl = match r.ttl_ms {
            0 => DEFAULT_TOKEN_TTL,
            ms => Duration::from_millis(ms),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "token TTL is above the 7 day maximum",
            ));
        }
        let ca = self.ca()?;
        let token = JoinToken::generate(&ca.fingerprint())
            .map_err(|e| Status::internal(format!("cannot make a token: {e}")))?;
        let expires_at_ms = now_ms() + ttl.as_millis() as i64;
        self.write(Kind::IssueToken(pb::IssueToken {
            token: Some(pb::JoinToken {
                id: token.id().to_string(),
                secret_sha256: token.secret_sha256(),
                kind: kind as i32,
                pop: r.pop,
                labels: r.labels,
                expires_at_ms,
                ..Default::default()
            }),
        }))
        .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.to_string(),
            id: token.id().to_string(),
            expires_at_ms,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.authz.require_operator(&req)?;
        let c = Consistency::from(req.get_ref().consistency);
        let tokens = self
            .hub
            .read(c, |s| s.tokens.values().cloned().collect())
            .await?;
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn consume_token(
        &self,
        req: Request<pb::ConsumeTokenRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        // The token itself is the credential: no certificate needed.
        let r = req.into_inner();
        let out = self
            .consume(&r.token, pb::TokenKind::Pop, r.consumer)
            .await?;
        Ok(Response::new(out))
    }

    async fn put_pop(
        &self,
        req: Request<pb::PutPopRequest>,
    ) -> Result<Response<pb::PutPopResponse>, Status> {
        self.authz.require_operator(&req)?;
        let r = req.into_inner();
        let pop = r
            .pop
            .ok_or_else(|| Status::invalid_argument("pop missing"))?;
        let name = pop.name.clone();
        let res = self
            .write(Kind::UpsertPop(pb::UpsertPop {
                pop: Some(pop),
                create_only: r.create_only,
                now_ms: now_ms(),
            }))
            .await?;
        let pop = self.hub.local(|s| s.pops.get(&name).cloned());
        Ok(Response::new(pb::PutPopResponse {
            pop,
            index: res.index,
        }))
    }

    async fn get_pop(&self, req: Request<pb::GetPopRequest>) -> Result<Response<pb::Pop>, Status> {
        self.authz.require_operator(&req)?;
        let r = req.into_inner();
        let c = Consistency::from(r.consistency);
        self.hub
            .read(c, |s| s.pops.get(&r.name).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no POP named {}", r.name)))
    }

    async fn list_pops(
        &self,
        req: Request<pb::ListPopsRequest>,
    ) -> Result<Response<pb::ListPopsResponse>, Status> {
        self.authz.require_operator(&req)?;
        let c = Consistency::from(req.get_ref().consistency);
        let (pops, statuses): (Vec<pb::Pop>, Vec<pb::PopStatus>) = self
            .hub
            .read(c, |s| {
                s.pops
                    .values()
                    .map(|p| {
                        let st = s.pop_status.get(&p.name).cloned().unwrap_or(pb::PopStatus {
                            pop: p.name.clone(),
                            ..Default::default()
                        });
                        (p.clone(), st)
                    })
                    .unzip()
            })
            .await?;
        let applied_index = self
            .hub
            .raft()
            .metrics()
            .borrow_watched()
            .last_applied
            .as_ref()
            .map(|l| l.index())
            .unwrap_or(0);
        let (sessions, unreachable_nodes) =
            super::sessions::gather(&self.hub, super::sessions::GATHER_TIMEOUT).await;
        Ok(Response::new(pb::ListPopsResponse {
            pops,
            applied_index,
            statuses,
            sessions,
            unreachable_nodes,
        }))
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.authz.require_operator(&req)?;
        let c = Consistency::from(req.get_ref().consistency);
        let services = self
            .hub
            .read(c, |s| s.services.values().cloned().collect())
            .await?;
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::ServiceDetail>, Status> {
        self.authz.require_operator(&req)?;
        let r = req.into_inner();
        let key = policy_key(r.service.as_ref())?;
        let c = Consistency::from(r.consistency);
        let from = r.from_pop;
        let detail = self
            .hub
            .read(c, |s| {
                let service = s.services.get(&key).cloned()?;
                let exports = s
                    .exports
                    .values()
                    .filter(|e| {
                        e.service
                            .as_ref()
                            .is_some_and(|k| k.namespace == key.0 && k.name == key.1)
                    })
                    .cloned()
                    .collect();
                let policy = s.policies.get(&key).cloned();
                let mut d = pb::ServiceDetail {
                    service: Some(service),
                    exports,
                    has_policy: policy.is_some(),
                    policy,
                    from_pop: from.clone(),
                    ..Default::default()
                };
                if !from.is_empty() {
                    let e = crate::decide::explain(s, &from, &key.0, &key.1);
                    d.view = e.view;
                    d.epoch = e.epoch;
                    d.visible = e.visible;
                    d.invisible_reason = e.invisible_reason;
                    d.pops = e.pops;
                }
                Some(d)
            })
            .await?;
        detail
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no POP exports {}/{}", key.0, key.1)))
    }

    async fn remove_pop(
        &self,
        req: Request<pb::RemovePopRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.authz.require_operator(&req)?;
        let name = req.into_inner().name;
        let r = self.write(Kind::RemovePop(pb::RemovePop { name })).await?;
        Ok(Response::new(pb::WriteResponse { index: r.index }))
    }

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.authz.require_operator(&req)?;
        let policy = req
            .into_inner()
            .policy
            .ok_or_else(|| Status::invalid_argument("policy missing"))?;
        policy_key(policy.service.as_ref())?;
        let r = self
            .write(Kind::SetPolicy(pb::SetPolicy {
                policy: Some(policy),
            }))
            .await?;
        Ok(Response::new(pb::WriteResponse { index: r.index }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::TrafficPolicy>, Status> {
        self.authz.require_operator(&req)?;
        let r = req.into_inner();
        let key = policy_key(r.service.as_ref())?;
        let c = Consistency::from(r.consistency);
        self.hub
            .read(c, |s| s.policies.get(&key).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no policy for {}/{}", key.0, key.1)))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.authz.require_operator(&req)?;
        let c = Consistency::from(req.get_ref().consistency);
        let policies = self
            .hub
            .read(c, |s| s.policies.values().cloned().collect())
            .await?;
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.authz.require_operator(&req)?;
        let service = req.into_inner().service;
        policy_key(service.as_ref())?;
        let r = self
            .write(Kind::DeletePolicy(pb::DeletePolicy { service }))
            .await?;
        Ok(Response::new(pb::WriteResponse { index: r.index }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.authz.require_operator(&req)?;
        let mut revocation = req
            .into_inner()
            .revocation
            .ok_or_else(|| Status::invalid_argument("revocation missing"))?;
        revocation.at_ms = now_ms();
        let r = self
            .write(Kind::AddRevocation(pb::AddRevocation {
                revocation: Some(revocation),
            }))
            .await?;
        Ok(Response::new(pb::WriteResponse { index: r.index }))
    }

    async fn list_members(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        self.authz.require_operator(&req)?;
        let (members, leader_id) = members(&self.hub);
        Ok(Response::new(pb::ListMembersResponse {
            members,
            leader_id,
        }))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        // Operators, or a hub node forwarding an operator's call.
        let caller = self.authz.caller(&req)?;
        if !matches!(caller, SpiffeId::Operator { .. } | SpiffeId::Hub { .. }) {
            metrics::rejected("wrong_role");
            return Err(Status::permission_denied(format!(
                "{caller} may not remove hub members"
            )));
        }
        let r = req.into_inner();
        let id = r.id;
        let hub = self.hub.clone();
        let index = self
            .leader_admin(
                async move { Ok(hub.remove_member(id).await?) },
                move |mut c| {
                    Box::pin(async move { Ok(c.remove_member(r).await?.into_inner().index) })
                },
            )
            .await?;
        // A removed node must not come back with its old certificate.
        self.write(Kind::AddRevocation(pb::AddRevocation {
            revocation: Some(pb::Revocation {
                kind: pb::RevocationKind::Hub as i32,
                subject: id.to_string(),
                at_ms: now_ms(),
                reason: "removed from the hub cluster".into(),
            }),
        }))
        .await?;
        Ok(Response::new(pb::WriteResponse { index }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = req.into_inner();
        if r.node_id == 0 {
            return Err(Status::invalid_argument(
                "node id 0 is reserved; pick --node-id N >= 1",
            ));
        }
        let (members, _) = members(&self.hub);
        if members.iter().any(|m| m.id == r.node_id) {
            return Err(Status::already_exists(format!(
                "hub node id {} is already a member; pick another --node-id",
                r.node_id
            )));
        }
        let ca = self.ca()?;
        let expected = SpiffeId::hub(ca.domain(), r.node_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Check the CSR before spending the token on it.
        let probe = ca.sign_csr(&r.csr_pem, &expected, Duration::from_secs(60));
        if let Err(e) = probe {
            metrics::rejected("bad_csr");
            return Err(Status::invalid_argument(format!(
                "certificate request: {e}"
            )));
        }
        self.consume(&r.token, pb::TokenKind::Hub, format!("hub/{}", r.node_id))
            .await?;
        let cert_pem = ca
            .sign_csr(&r.csr_pem, &expected, HUB_CERT_VALIDITY)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::JoinResponse {
            cert_pem,
            ca_cert_pem: ca.cert_pem().to_string(),
            domain: ca.domain().to_string(),
            members,
        }))
    }

    async fn add_hub(
        &self,
        req: Request<pb::AddHubRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let caller = self.authz.require_hub(&req)?;
        let r = req.into_inner();
        // Forwarded calls come from other members; direct ones only from
        // the node itself.
        let is_member = self.hub.raft().voter_ids().any(|v| v == caller);
        if caller != r.id && !is_member {
            metrics::rejected("wrong_role");
            return Err(Status::permission_denied(format!(
                "hub/{caller} may not add hub/{}",
                r.id
            )));
        }
        if self
            .hub
            .local(|s| s.is_revoked(pb::RevocationKind::Hub, &r.id.to_string()))
        {
            metrics::rejected("revoked");
            return Err(Status::permission_denied(format!(
                "hub/{} was removed and is revoked",
                r.id
            )));
        }
        let hub = self.hub.clone();
        let (id, addr) = (r.id, r.addr.clone());
        let index = self
            .leader_admin(
                async move { Ok(hub.add_voter(id, addr).await?) },
                move |mut c| Box::pin(async move { Ok(c.add_hub(r).await?.into_inner().index) }),
            )
            .await?;
        Ok(Response::new(pb::WriteResponse { index }))
    }
}

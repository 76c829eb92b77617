//! Applying one command to the state.

use switchyard_proto::pb::{self, command::Kind, ErrorCode};

use super::State;

/// A successful result at `index`.
pub fn result_ok(index: u64) -> pb::CommandResult {
    pb::CommandResult {
        index,
        ..Default::default()
    }
}

/// A refusal at `index`: the entry is committed, the command had no effect.
pub fn result_err(index: u64, code: ErrorCode, message: impl Into<String>) -> pb::CommandResult {
    pb::CommandResult {
        error: code as i32,
        message: message.into(),
        index,
        ..Default::default()
    }
}

/// Whether `name` can be a POP name: a DNS label (it appears in DNS names
/// and SPIFFE IDs), lowercase.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl State {
    /// Applies the command committed at `index`. Deterministic: the result
    /// depends only on the state, `index` and `cmd`.
    pub fn apply(&mut self, index: u64, cmd: &pb::Command) -> pb::CommandResult {
        let Some(kind) = &cmd.kind else {
            return result_err(index, ErrorCode::Invalid, "empty command");
        };
        if self.federation.is_none() && !matches!(kind, Kind::InitFederation(_)) {
            return result_err(
                index,
                ErrorCode::NotInitialized,
                "the federation is not initialised yet",
            );
        }
        match kind {
            Kind::InitFederation(c) => self.init_federation(index, c),
            Kind::UpsertPop(c) => self.upsert_pop(index, c),
            Kind::RemovePop(c) => match self.pops.remove(&c.name) {
                Some(old) => {
                    self.note_dev_block(&old.vip_cidr, false);
                    self.forget_pop(index, &c.name);
                    result_ok(index)
                }
                None => result_err(
                    index,
                    ErrorCode::NotFound,
                    format!("no POP named {}", c.name),
                ),
            },
            Kind::IssueToken(c) => self.issue_token(index, c),
            Kind::ConsumeToken(c) => self.consume_token(index, c),
            Kind::SetPolicy(c) => self.set_policy(index, c),
            Kind::DeletePolicy(c) => {
                let key = service_key(c.service.as_ref());
                match self.policies.remove(&key) {
                    Some(_) => {
                        // A removed policy leaves no record to carry its
                        // index into views' epochs.
                        self.tombstone_index = self.tombstone_index.max(index);
                        result_ok(index)
                    }
                    None => result_err(
                        index,
                        ErrorCode::NotFound,
                        format!("no policy for {}/{}", key.0, key.1),
                    ),
                }
            }
            Kind::AddRevocation(c) => match &c.revocation {
                Some(r) if !r.subject.is_empty() => {
                    if let std::collections::btree_map::Entry::Vacant(e) =
                        self.revocations.entry((r.kind, r.subject.clone()))
                    {
                        e.insert(r.clone());
                        // A revoked POP leaves every tier.
                        if r.kind == pb::RevocationKind::Pop as i32 {
                            self.tombstone_index = self.tombstone_index.max(index);
                        }
                    }
                    result_ok(index)
                }
                _ => result_err(index, ErrorCode::Invalid, "revocation needs a subject"),
            },
            Kind::ApplyExports(c) => self.apply_exports(index, c),
            Kind::SetPopLiveness(c) => self.set_pop_liveness(index, c),
            Kind::EndFailbackDamping(c) => self.end_failback_damping(index, c),
            Kind::ReportRtt(c) => self.report_rtt(index, c),
            Kind::SetPopGateway(c) => self.set_pop_gateway(index, c),
            Kind::SetHubUplink(c) => match &c.uplink {
                Some(u) if u.node > 0 && !u.addr.is_empty() => {
                    self.hub_uplinks.insert(u.node, u.addr.clone());
                    result_ok(index)
                }
                _ => result_err(
                    index,
                    ErrorCode::Invalid,
                    "hub uplink needs a node id and an address",
                ),
            },
        }
    }

    fn init_federation(&mut self, index: u64, c: &pb::InitFederation) -> pb::CommandResult {
        if self.federation.is_some() {
            return result_err(
                index,
                ErrorCode::AlreadyExists,
                "federation already initialised",
            );
        }
        match &c.federation {
            Some(f) if !f.domain.is_empty() && !f.ca_cert_pem.is_empty() => {
                self.federation = Some(f.clone());
                result_ok(index)
            }
            _ => result_err(
                index,
                ErrorCode::Invalid,
                "federation needs a domain and a CA",
            ),
        }
    }

    fn upsert_pop(&mut self, index: u64, c: &pb::UpsertPop) -> pb::CommandResult {
        let Some(pop) = &c.pop else {
            return result_err(index, ErrorCode::Invalid, "POP missing");
        };
        if !valid_name(&pop.name) {
            return result_err(
                index,
                ErrorCode::Invalid,
                format!(
                    "POP name {:?} is not a DNS label (a-z, 0-9, '-', at most 63)",
                    pop.name
                ),
            );
        }
        let vip_cidr = match self.resolve_vip_cidr(&pop.name, &pop.vip_cidr) {
            Ok(c) => c,
            Err(m) => return result_err(index, ErrorCode::Invalid, m),
        };
        let mut record = pop.clone();
        record.updated_index = index;
        let vips_change = self.pops.get(&pop.name).map(|p| &p.vip_cidr) != Some(&vip_cidr);
        record.vip_cidr = vip_cidr;
        match self.pops.get(&pop.name) {
            Some(_) if c.create_only => {
                return result_err(
                    index,
                    ErrorCode::AlreadyExists,
                    format!("POP {} already exists", pop.name),
                )
            }
            Some(old) => {
                record.created_index = old.created_index;
                record.created_at_ms = old.created_at_ms;
                // The gateway address is the agent's to set (SetPopGateway):
                // an operator's edit of labels or range keeps it.
                record.gateway_addr = old.gateway_addr.clone();
            }
            None => {
                record.created_index = index;
                record.created_at_ms = c.now_ms;
            }
        }
        let name = record.name.clone();
        self.note_dev_block(&record.vip_cidr, true);
        if let Some(old) = self.pops.insert(name.clone(), record) {
            self.note_dev_block(&old.vip_cidr, false);
        }
        if vips_change {
            self.reconcile_pop_vips(index, &name);
        }
        result_ok(index)
    }

    fn issue_token(&mut self, index: u64, c: &pb::IssueToken) -> pb::CommandResult {
        let Some(t) = &c.token else {
            return result_err(index, ErrorCode::Invalid, "token missing");
        };
        if t.id.is_empty() || t.secret_sha256.len() != 64 {
            return result_err(index, ErrorCode::Invalid, "token needs an id and a SHA-256");
        }
        if t.kind == pb::TokenKind::Pop as i32 && !valid_name(&t.pop) {
            return result_err(
                index,
                ErrorCode::Invalid,
                format!("POP name {:?} is not a DNS label", t.pop),
            );
        }
        if self.tokens.contains_key(&t.id) {
            return result_err(
                index,
                ErrorCode::AlreadyExists,
                format!("token id {} exists", t.id),
            );
        }
        let mut t = t.clone();
        t.consumed = false;
        t.consumed_by.clear();
        t.created_index = index;
        self.tokens.insert(t.id.clone(), t);
        result_ok(index)
    }

    /// The compare-and-swap at the heart of enrolment: exactly one consumer
    /// of a token ever wins, because every node applies the same log.
    fn consume_token(&mut self, index: u64, c: &pb::ConsumeToken) -> pb::CommandResult {
        // A hub node id is given out once: two nodes joining at the same
        // time with the same id cannot both get a certificate for it.
        if c.kind == pb::TokenKind::Hub as i32
            && self
                .tokens
                .values()
                .any(|t| t.consumed && t.kind == c.kind && t.consumed_by == c.consumer)
        {
            return result_err(
                index,
                ErrorCode::AlreadyExists,
                format!("{} was already given to another joining node", c.consumer),
            );
        }
        let Some(t) = self.tokens.get_mut(&c.id) else {
            return result_err(index, ErrorCode::NotFound, "unknown join token");
        };
        if t.kind != c.kind {
            return result_err(
                index,
                ErrorCode::Invalid,
                "join token is of another kind (POP vs hub)",
            );
        }
        if t.secret_sha256 != c.secret_sha256 {
            return result_err(
                index,
                ErrorCode::TokenMismatch,
                "join token secret does not match",
            );
        }
        if t.consumed {
            return result_err(
                index,
                ErrorCode::TokenConsumed,
                "join token was already used",
            );
        }
        if c.now_ms >= t.expires_at_ms {
            return result_err(index, ErrorCode::TokenExpired, "join token has expired");
        }
        t.consumed = true;
        t.consumed_by = c.consumer.clone();
        let token = t.clone();
        if token.kind == pb::TokenKind::Pop as i32 && !self.pops.contains_key(&token.pop) {
            // Infallible for an empty range: the next free dev block.
            let vip_cidr = self.resolve_vip_cidr(&token.pop, "").unwrap_or_default();
            self.note_dev_block(&vip_cidr, true);
            self.pops.insert(
                token.pop.clone(),
                pb::Pop {
                    name: token.pop.clone(),
                    labels: token.labels.clone(),
                    created_index: index,
                    updated_index: index,
                    created_at_ms: c.now_ms,
                    vip_cidr,
                    gateway_addr: String::new(),
                },
            );
            self.reconcile_pop_vips(index, &token.pop);
        }
        pb::CommandResult {
            token: Some(token),
            ..result_ok(index)
        }
    }

    fn set_policy(&mut self, index: u64, c: &pb::SetPolicy) -> pb::CommandResult {
        let Some(p) = &c.policy else {
            return result_err(index, ErrorCode::Invalid, "policy missing");
        };
        let key = service_key(p.service.as_ref());
        if key.0.is_empty() || key.1.is_empty() {
            return result_err(
                index,
                ErrorCode::Invalid,
                "policy needs a namespace and a name",
            );
        }
        if p.min_healthy_permille > 1000 {
            return result_err(index, ErrorCode::Invalid, "min_healthy is above 100%");
        }
        if pb::PolicyMode::try_from(p.mode).is_err() || pb::StaleMode::try_from(p.stale).is_err() {
            return result_err(index, ErrorCode::Invalid, "unknown policy or stale mode");
        }
        let mut p = p.clone();
        p.updated_index = index;
        self.policies.insert(key, p);
        result_ok(index)
    }
}

/// Whether `addr` can be a gateway tunnel address: `host:port` with a
/// numeric port, at most [`MAX_GATEWAY_ADDR_LEN`] bytes, no whitespace.
///
/// [`MAX_GATEWAY_ADDR_LEN`]: switchyard_proto::uplink::MAX_GATEWAY_ADDR_LEN
pub fn valid_gateway_addr(addr: &str) -> bool {
    if addr.is_empty()
        || addr.len() > switchyard_proto::uplink::MAX_GATEWAY_ADDR_LEN
        || addr.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return false;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

impl State {
    /// `SetPopGateway`: records the POP's gateway address; the same address
    /// again is a no-op (no index moves, so no view changes).
    fn set_pop_gateway(&mut self, index: u64, c: &pb::SetPopGateway) -> pb::CommandResult {
        if !valid_gateway_addr(&c.gateway_addr) {
            return result_err(
                index,
                ErrorCode::Invalid,
                format!(
                    "gateway address {:?} is not host:port",
                    c.gateway_addr.chars().take(64).collect::<String>()
                ),
            );
        }
        let Some(pop) = self.pops.get_mut(&c.pop) else {
            return result_err(
                index,
                ErrorCode::NotFound,
                format!("no POP named {}", c.pop),
            );
        };
        if pop.gateway_addr != c.gateway_addr {
            pop.gateway_addr = c.gateway_addr.clone();
            // Peers' views carry it: their epochs read this index.
            pop.updated_index = index;
        }
        result_ok(index)
    }
}

fn service_key(k: Option<&pb::ServiceKey>) -> (String, String) {
    k.map(|k| (k.namespace.clone(), k.name.clone()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;

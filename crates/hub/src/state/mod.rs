//! The hub's replicated state machine: deterministic, in memory.
//!
//! `apply` is a pure function of (state, index, command): no clock, no I/O.
//! Anything time-dependent (token expiry) is judged against a time the
//! proposing node stamped into the command, so every node computes the same
//! result for the same log.

mod apply;
mod exports;
mod rtt;
mod snapshot;
#[cfg(test)]
pub(crate) mod testkit;
mod vip;

pub use apply::{result_err, result_ok, valid_gateway_addr, valid_name};
pub use exports::DEFAULT_FAILBACK_AFTER_MS;
pub use rtt::{rtt_bucket, rtt_bucket_floor_us};
pub use vip::{Cidr, DEV_VIP_BASE, DEV_VIP_PREFIX};

use std::collections::{BTreeMap, VecDeque};

use switchyard_proto::pb;

/// Errors loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot was written by a newer, unknown format.
    #[error("snapshot format version {0} is newer than this binary understands ({1})")]
    Version(u32, u32),
    /// The bytes do not decode as a snapshot.
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Everything the hub replicates. Ordered maps: iteration order is part of
/// determinism (snapshots of equal states are equal bytes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The federation's domain and CA; `None` until bootstrap.
    pub federation: Option<pb::Federation>,
    /// POPs by name.
    pub pops: BTreeMap<String, pb::Pop>,
    /// Join tokens by id.
    pub tokens: BTreeMap<String, pb::JoinToken>,
    /// Traffic policies by (namespace, name).
    pub policies: BTreeMap<(String, String), pb::TrafficPolicy>,
    /// Revocations by (kind, subject).
    pub revocations: BTreeMap<(i32, String), pb::Revocation>,
    /// Every POP's export of every service, by (namespace, name, pop):
    /// keyed service first so one service's exports are one range.
    pub exports: BTreeMap<(String, String, String), pb::ServiceExport>,
    /// Global services (the merge of their exports) by (namespace, name).
    /// Exists exactly while at least one POP exports the service.
    pub services: BTreeMap<(String, String), pb::GlobalService>,
    /// Runtime status (liveness, damping, export sequence) by POP name;
    /// absent means never reported (liveness unknown, no exports applied).
    pub pop_status: BTreeMap<String, pb::PopStatus>,
    /// VIPs by (pop, namespace, name): one per global service per POP.
    pub vips: BTreeMap<(String, String, String), pb::VipAllocation>,
    /// Quantized RTTs by (from POP, to POP).
    pub rtts: BTreeMap<(String, String), pb::RttEntry>,
    /// Raft log index of the last command that removed a `decide` input
    /// (service, policy, POP, POP revocation). Removals leave no record to
    /// carry their index, so this one does: it is part of every view's
    /// epoch, which therefore never goes down.
    pub tombstone_index: u64,
    /// QUIC uplink address (host:port) of each hub node, by node id.
    pub hub_uplinks: BTreeMap<u64, String>,
    /// The newest POP liveness events, oldest first (at most
    /// [`EVENT_LOG_LEN`]): the history the status page shows.
    pub events: VecDeque<pb::PopEvent>,
    /// Derived from `pops`, not in snapshots: how many POPs use each dev
    /// VIP block (by block number), so a new POP's block is found without
    /// scanning every POP's range as text.
    pub(crate) dev_blocks: BTreeMap<u32, u32>,
    /// Derived from `dev_blocks`: the lowest block number not in it (the
    /// block a new POP gets). Kept up to date so that a new POP costs no
    /// walk over every used block: with the pool's 11,000 blocks in use
    /// that walk was a fifth of a write's CPU.
    pub(crate) dev_lowest_free: u32,
}

/// How many POP liveness events the state keeps.
pub const EVENT_LOG_LEN: usize = 100;

impl State {
    /// The whole state as one versioned message.
    pub fn to_snapshot(&self) -> pb::StateSnapshot {
        pb::StateSnapshot {
            version: switchyard_proto::STATE_SNAPSHOT_VERSION,
            federation: self.federation.clone(),
            pops: self.pops.values().cloned().collect(),
            tokens: self.tokens.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            revocations: self.revocations.values().cloned().collect(),
            exports: self.exports.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            pop_status: self.pop_status.values().cloned().collect(),
            vips: self.vips.values().cloned().collect(),
            rtts: self.rtts.values().cloned().collect(),
            tombstone_index: self.tombstone_index,
            hub_uplinks: self
                .hub_uplinks
                .iter()
                .map(|(node, addr)| pb::HubUplink {
                    node: *node,
                    addr: addr.clone(),
                })
                .collect(),
            events: self.events.iter().cloned().collect(),
        }
    }

    /// Rebuilds the state from a snapshot message.
    pub fn from_snapshot(snap: pb::StateSnapshot) -> Result<Self, SnapshotError> {
        if snap.version > switchyard_proto::STATE_SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(
                snap.version,
                switchyard_proto::STATE_SNAPSHOT_VERSION,
            ));
        }
        let mut s = State {
            federation: snap.federation,
            tombstone_index: snap.tombstone_index,
            ..State::default()
        };
        for p in snap.pops {
            s.note_dev_block(&p.vip_cidr, true);
            s.pops.insert(p.name.clone(), p);
        }
        for t in snap.tokens {
            s.tokens.insert(t.id.clone(), t);
        }
        for p in snap.policies {
            let key = p
                .service
                .as_ref()
                .map(|k| (k.namespace.clone(), k.name.clone()))
                .unwrap_or_default();
            s.policies.insert(key, p);
        }
        for r in snap.revocations {
            s.revocations.insert((r.kind, r.subject.clone()), r);
        }
        for e in snap.exports {
            let (ns, name) = key_of(e.service.as_ref());
            s.exports.insert((ns, name, e.pop.clone()), e);
        }
        for g in snap.services {
            s.services.insert(key_of(g.service.as_ref()), g);
        }
        for st in snap.pop_status {
            s.pop_status.insert(st.pop.clone(), st);
        }
        for v in snap.vips {
            let (ns, name) = key_of(v.service.as_ref());
            s.vips.insert((v.pop.clone(), ns, name), v);
        }
        for r in snap.rtts {
            s.rtts.insert((r.from_pop.clone(), r.to_pop.clone()), r);
        }
        for u in snap.hub_uplinks {
            s.hub_uplinks.insert(u.node, u.addr);
        }
        let mut events = snap.events;
        events.sort_by_key(|e| e.index);
        s.events = events.into_iter().collect();
        Ok(s)
    }

    /// Decodes bytes written by [`State::encode_snapshot`].
    pub fn decode_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let snap: pb::StateSnapshot = prost::Message::decode(bytes)?;
        Self::from_snapshot(snap)
    }

    /// The liveness of a POP (unknown when never reported).
    pub fn liveness(&self, pop: &str) -> pb::PopLiveness {
        self.pop_status
            .get(pop)
            .and_then(|s| pb::PopLiveness::try_from(s.liveness).ok())
            .unwrap_or(pb::PopLiveness::Unknown)
    }

    /// Whether other POPs may send traffic to `pop`: Online or Suspect, not
    /// in failback damping, not revoked. Suspect stays eligible because the
    /// detector's suspicion is an early warning, and gateways' own probes of
    /// peers already steer around a POP that really stopped answering.
    pub fn is_eligible(&self, pop: &str) -> bool {
        let Some(st) = self.pop_status.get(pop) else {
            return false;
        };
        let live = matches!(
            pb::PopLiveness::try_from(st.liveness),
            Ok(pb::PopLiveness::Online | pb::PopLiveness::Suspect)
        );
        live && !st.damped && !self.is_revoked(pb::RevocationKind::Pop, pop)
    }

    /// Whether a POP (or hub node, or serial) is on the deny-list.
    pub fn is_revoked(&self, kind: pb::RevocationKind, subject: &str) -> bool {
        self.revocations
            .contains_key(&(kind as i32, subject.to_string()))
    }
}

/// The (namespace, name) map key of an optional service key.
pub(crate) fn key_of(k: Option<&pb::ServiceKey>) -> (String, String) {
    k.map(|k| (k.namespace.clone(), k.name.clone()))
        .unwrap_or_default()
}

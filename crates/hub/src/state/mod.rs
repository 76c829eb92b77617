//! The hub's replicated state machine: deterministic, in memory.
//!
//! `apply` is a pure function of (state, index, command): no clock, no I/O.
//! Anything time-dependent (token expiry) is judged against a time the
//! proposing node stamped into the command, so every node computes the same
//! result for the same log.

mod apply;

pub use apply::{result_err, result_ok, valid_name};

use std::collections::BTreeMap;

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
}

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
            ..State::default()
        };
        for p in snap.pops {
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
        Ok(s)
    }

    /// Encodes the snapshot message to bytes.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.to_snapshot())
    }

    /// Decodes bytes written by [`State::encode_snapshot`].
    pub fn decode_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let snap: pb::StateSnapshot = prost::Message::decode(bytes)?;
        Self::from_snapshot(snap)
    }

    /// Whether a POP (or hub node, or serial) is on the deny-list.
    pub fn is_revoked(&self, kind: pb::RevocationKind, subject: &str) -> bool {
        self.revocations
            .contains_key(&(kind as i32, subject.to_string()))
    }
}

//! Conversions between openraft's types and the `switchyard.v1` Raft
//! messages. Everything decoded from the network is fallible: a missing
//! required field is an error, never a panic or a silent default.

use std::collections::{BTreeMap, BTreeSet};

use openraft::entry::RaftEntry;
use openraft::vote::RaftLeaderId;
use switchyard_proto::pb;

use super::types::{
    AppendEntriesRequest, AppendEntriesResponse, Entry, EntryPayload, HubNode, LeaderId, LogId,
    Membership, RaftCommand, Snapshot, SnapshotMeta, SnapshotResponse, StoredMembership,
    StreamAppendError, StreamAppendResult, Vote, VoteRequest, VoteResponse,
};

/// A message from the wire that does not describe a valid openraft value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A required field is absent.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// The membership is not self-consistent (e.g. a voter without a node).
    #[error("invalid membership: {0}")]
    Membership(String),
}

fn req<T>(v: Option<T>, field: &'static str) -> Result<T, ConvertError> {
    v.ok_or(ConvertError::Missing(field))
}

/// openraft leader id to protobuf.
pub fn leader_id_to_pb(l: &LeaderId) -> pb::LeaderId {
    pb::LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

/// Protobuf leader id to openraft.
pub fn leader_id_from_pb(l: pb::LeaderId) -> LeaderId {
    LeaderId::new(l.term, l.node_id)
}

/// openraft vote to protobuf.
pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to_pb(&v.leader_id)),
        committed: v.committed,
    }
}

/// Protobuf vote to openraft.
pub fn vote_from_pb(v: pb::Vote) -> Result<Vote, ConvertError> {
    let l = leader_id_from_pb(req(v.leader_id, "vote.leader_id")?);
    Ok(Vote {
        leader_id: l,
        committed: v.committed,
    })
}

/// openraft log id to protobuf.
pub fn log_id_to_pb(l: &LogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to_pb(&l.leader_id)),
        index: l.index,
    }
}

/// Protobuf log id to openraft.
pub fn log_id_from_pb(l: pb::LogId) -> Result<LogId, ConvertError> {
    let leader = leader_id_from_pb(req(l.leader_id, "log_id.leader_id")?);
    Ok(LogId::new(leader, l.index))
}

/// An optional log id: absent in protobuf means `None` ("no log yet").
pub fn opt_log_id_to_pb(l: &Option<LogId>) -> Option<pb::LogId> {
    l.as_ref().map(log_id_to_pb)
}

/// The inverse of [`opt_log_id_to_pb`].
pub fn opt_log_id_from_pb(l: Option<pb::LogId>) -> Result<Option<LogId>, ConvertError> {
    l.map(log_id_from_pb).transpose()
}

/// openraft membership to protobuf.
pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIdSet {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m
            .nodes()
            .map(|(id, n)| {
                (
                    *id,
                    pb::HubNode {
                        addr: n.addr.clone(),
                    },
                )
            })
            .collect(),
    }
}

/// Protobuf membership to openraft; rejects configs whose voters lack a node.
pub fn membership_from_pb(m: pb::Membership) -> Result<Membership, ConvertError> {
    let configs: Vec<BTreeSet<u64>> = m
        .configs
        .into_iter()
        .map(|c| c.ids.into_iter().collect())
        .collect();
    let nodes: BTreeMap<u64, HubNode> = m
        .nodes
        .into_iter()
        .map(|(id, n)| (id, HubNode { addr: n.addr }))
        .collect();
    Membership::new(configs, nodes).map_err(|e| ConvertError::Membership(e.to_string()))
}

/// openraft log entry to protobuf.
pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    use pb::entry::Payload;
    let payload = match &e.payload {
        EntryPayload::Blank => Payload::Blank(true),
        EntryPayload::Normal(c) => Payload::Command(c.0.clone()),
        EntryPayload::Membership(m) => Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

/// Protobuf log entry to openraft.
pub fn entry_from_pb(e: pb::Entry) -> Result<Entry, ConvertError> {
    use pb::entry::Payload;
    let log_id = log_id_from_pb(req(e.log_id, "entry.log_id")?)?;
    let payload = match req(e.payload, "entry.payload")? {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Command(c) => EntryPayload::Normal(RaftCommand(c)),
        Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(m)?),
    };
    let mut entry = Entry::new_blank(log_id);
    entry.payload = payload;
    Ok(entry)
}

/// Stored membership split into the two snapshot-meta fields.
fn stored_membership_to_pb(m: &StoredMembership) -> (Option<pb::LogId>, pb::Membership) {
    (
        opt_log_id_to_pb(m.log_id()),
        membership_to_pb(m.membership()),
    )
}

/// openraft snapshot meta to protobuf.
pub fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    let (membership_log_id, membership) = stored_membership_to_pb(&m.last_membership);
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(&m.last_log_id),
        last_membership_log_id: membership_log_id,
        last_membership: Some(membership),
        snapshot_id: match &m.last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => String::new(),
        },
    }
}

/// Protobuf snapshot meta to openraft (the informational `snapshot_id` is dropped).
pub fn snapshot_meta_from_pb(m: pb::SnapshotMeta) -> Result<SnapshotMeta, ConvertError> {
    let membership = membership_from_pb(req(m.last_membership, "snapshot_meta.last_membership")?)?;
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(m.last_log_id)?,
        last_membership: StoredMembership::new(
            opt_log_id_from_pb(m.last_membership_log_id)?,
            membership,
        ),
    })
}

/// openraft vote request to protobuf.
pub fn vote_request_to_pb(r: &VoteRequest) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to_pb(&r.vote)),
        last_log_id: opt_log_id_to_pb(&r.last_log_id),
        leadership_transfer: r.leadership_transfer,
    }
}

/// Protobuf vote request to openraft.
pub fn vote_request_from_pb(r: pb::VoteRequest) -> Result<VoteRequest, ConvertError> {
    Ok(VoteRequest {
        vote: vote_from_pb(req(r.vote, "vote_request.vote")?)?,
        last_log_id: opt_log_id_from_pb(r.last_log_id)?,
        leadership_transfer: r.leadership_transfer,
    })
}

/// openraft vote response to protobuf.
pub fn vote_response_to_pb(r: &VoteResponse) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_to_pb(&r.last_log_id),
    }
}

/// Protobuf vote response to openraft.
pub fn vote_response_from_pb(r: pb::VoteResponse) -> Result<VoteResponse, ConvertError> {
    Ok(VoteResponse {
        vote: vote_from_pb(req(r.vote, "vote_response.vote")?)?,
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_from_pb(r.last_log_id)?,
    })
}

/// openraft append-entries request to protobuf.
pub fn append_request_to_pb(r: &AppendEntriesRequest) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        vote: Some(vote_to_pb(&r.vote)),
        prev_log_id: opt_log_id_to_pb(&r.prev_log_id),
        entries: r.entries.iter().map(entry_to_pb).collect(),
        leader_commit: opt_log_id_to_pb(&r.leader_commit),
    }
}

/// Protobuf append-entries request to openraft.
pub fn append_request_from_pb(
    r: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest, ConvertError> {
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(req(r.vote, "append_entries.vote")?)?,
        prev_log_id: opt_log_id_from_pb(r.prev_log_id)?,
        entries: r
            .entries
            .into_iter()
            .map(entry_from_pb)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_from_pb(r.leader_commit)?,
    })
}

/// openraft append-entries response to protobuf.
pub fn append_response_to_pb(r: &AppendEntriesResponse) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(true),
        AppendEntriesResponse::PartialSuccess(Some(l)) => R::PartialSuccess(log_id_to_pb(l)),
        AppendEntriesResponse::PartialSuccess(None) => R::PartialSuccessNone(true),
        AppendEntriesResponse::Conflict => R::Conflict(true),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to_pb(v)),
    };
    pb::AppendEntriesResponse {
        result: Some(result),
    }
}

/// Protobuf append-entries response to openraft.
pub fn append_response_from_pb(
    r: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse, ConvertError> {
    use pb::append_entries_response::Result as R;
    Ok(match req(r.result, "append_entries_response.result")? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::PartialSuccess(l) => AppendEntriesResponse::PartialSuccess(Some(log_id_from_pb(l)?)),
        R::PartialSuccessNone(_) => AppendEntriesResponse::PartialSuccess(None),
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from_pb(v)?),
    })
}

/// One streamed append answer to protobuf.
pub fn stream_append_to_pb(r: &StreamAppendResult) -> pb::StreamAppendReply {
    use pb::stream_append_reply::{Matched, Result as R};
    let result = match r {
        Ok(matched) => R::Matched(Matched {
            log_id: opt_log_id_to_pb(matched),
        }),
        Err(StreamAppendError::Conflict(l)) => R::Conflict(log_id_to_pb(l)),
        Err(StreamAppendError::HigherVote(v)) => R::HigherVote(vote_to_pb(v)),
    };
    pb::StreamAppendReply {
        result: Some(result),
    }
}

/// Protobuf streamed append answer to openraft.
pub fn stream_append_from_pb(r: pb::StreamAppendReply) -> Result<StreamAppendResult, ConvertError> {
    use pb::stream_append_reply::Result as R;
    Ok(match req(r.result, "stream_append_reply.result")? {
        R::Matched(m) => Ok(opt_log_id_from_pb(m.log_id)?),
        R::Conflict(l) => Err(StreamAppendError::Conflict(log_id_from_pb(l)?)),
        R::HigherVote(v) => Err(StreamAppendError::HigherVote(vote_from_pb(v)?)),
    })
}

/// A full snapshot transfer as one protobuf request.
pub fn install_snapshot_to_pb(vote: &Vote, snapshot: Snapshot) -> pb::InstallSnapshotRequest {
    pb::InstallSnapshotRequest {
        vote: Some(vote_to_pb(vote)),
        meta: Some(snapshot_meta_to_pb(&snapshot.meta)),
        // Moved, not copied: the whole state, tens of MiB on a big hub.
        data: snapshot.snapshot,
    }
}

/// Protobuf snapshot transfer to openraft's (vote, snapshot).
pub fn install_snapshot_from_pb(
    r: pb::InstallSnapshotRequest,
) -> Result<(Vote, Snapshot), ConvertError> {
    let vote = vote_from_pb(req(r.vote, "install_snapshot.vote")?)?;
    let meta = snapshot_meta_from_pb(req(r.meta, "install_snapshot.meta")?)?;
    Ok((
        vote,
        Snapshot {
            meta,
            snapshot: r.data,
        },
    ))
}

/// openraft snapshot response to protobuf.
pub fn snapshot_response_to_pb(r: &SnapshotResponse) -> pb::InstallSnapshotResponse {
    pb::InstallSnapshotResponse {
        vote: Some(vote_to_pb(&r.vote)),
    }
}

/// Protobuf snapshot response to openraft.
pub fn snapshot_response_from_pb(
    r: pb::InstallSnapshotResponse,
) -> Result<SnapshotResponse, ConvertError> {
    Ok(SnapshotResponse::new(vote_from_pb(req(
        r.vote,
        "install_snapshot_response.vote",
    )?)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_log_id() -> impl Strategy<Value = LogId> {
        (0u64..1000, 0u64..10, 0u64..100_000)
            .prop_map(|(t, n, i)| LogId::new(LeaderId::new(t, n), i))
    }

    fn arb_vote() -> impl Strategy<Value = Vote> {
        (0u64..1000, 0u64..10, any::<bool>()).prop_map(|(t, n, c)| Vote {
            leader_id: LeaderId::new(t, n),
            committed: c,
        })
    }

    fn arb_membership() -> impl Strategy<Value = Membership> {
        // One or two (joint) configs over node ids 1..6, plus maybe a learner.
        (
            proptest::collection::btree_set(1u64..6, 1..4),
            proptest::option::of(proptest::collection::btree_set(1u64..6, 1..4)),
            proptest::option::of(6u64..9),
        )
            .prop_map(|(a, b, learner)| {
                let mut configs = vec![a];
                configs.extend(b);
                let mut nodes: BTreeMap<u64, HubNode> = configs
                    .iter()
                    .flatten()
                    .map(|id| (*id, HubNode::new(format!("10.0.0.{id}:7000"))))
                    .collect();
                if let Some(l) = learner {
                    nodes.insert(l, HubNode::new(format!("10.0.0.{l}:7000")));
                }
                Membership::new(configs, nodes).unwrap()
            })
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (arb_log_id(), 0u8..3, arb_membership(), ".{0,12}").prop_map(|(l, kind, m, name)| {
            let mut e = Entry::new_blank(l);
            e.payload = match kind {
                0 => EntryPayload::Blank,
                1 => EntryPayload::Normal(RaftCommand(pb::Command {
                    kind: Some(pb::command::Kind::RemovePop(pb::RemovePop { name })),
                })),
                _ => EntryPayload::Membership(m),
            };
            e
        })
    }

    proptest! {
        #[test]
        fn vote_round_trips(v in arb_vote()) {
            prop_assert_eq!(vote_from_pb(vote_to_pb(&v)).unwrap(), v);
        }

        #[test]
        fn log_id_round_trips(l in proptest::option::of(arb_log_id())) {
            prop_assert_eq!(opt_log_id_from_pb(opt_log_id_to_pb(&l)).unwrap(), l);
        }

        #[test]
        fn membership_round_trips(m in arb_membership()) {
            prop_assert_eq!(membership_from_pb(membership_to_pb(&m)).unwrap(), m);
        }

        #[test]
        fn entry_round_trips(e in arb_entry()) {
            prop_assert_eq!(entry_from_pb(entry_to_pb(&e)).unwrap(), e);
        }

        #[test]
        fn append_request_round_trips(
            v in arb_vote(),
            prev in proptest::option::of(arb_log_id()),
            commit in proptest::option::of(arb_log_id()),
            entries in proptest::collection::vec(arb_entry(), 0..4),
        ) {
            let r = AppendEntriesRequest { vote: v, prev_log_id: prev, entries, leader_commit: commit };
            let back = append_request_from_pb(append_request_to_pb(&r)).unwrap();
            prop_assert_eq!(back.vote, r.vote);
            prop_assert_eq!(back.prev_log_id, r.prev_log_id);
            prop_assert_eq!(back.leader_commit, r.leader_commit);
            prop_assert_eq!(back.entries, r.entries);
        }

        #[test]
        fn vote_messages_round_trip(v in arb_vote(), l in proptest::option::of(arb_log_id()), b in any::<bool>()) {
            let r = VoteRequest { vote: v, last_log_id: l, leadership_transfer: b };
            prop_assert_eq!(vote_request_from_pb(vote_request_to_pb(&r)).unwrap(), r);
            let resp = VoteResponse { vote: v, vote_granted: b, last_log_id: l };
            prop_assert_eq!(vote_response_from_pb(vote_response_to_pb(&resp)).unwrap(), resp);
        }

        #[test]
        fn snapshot_round_trips(
            v in arb_vote(),
            last in proptest::option::of(arb_log_id()),
            mlog in proptest::option::of(arb_log_id()),
            m in arb_membership(),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let snap = Snapshot {
                meta: SnapshotMeta { last_log_id: last, last_membership: StoredMembership::new(mlog, m) },
                snapshot: data,
            };
            let (v2, s2) = install_snapshot_from_pb(install_snapshot_to_pb(&v, snap.clone())).unwrap();
            prop_assert_eq!(v2, v);
            prop_assert_eq!(s2.meta, snap.meta);
            prop_assert_eq!(s2.snapshot, snap.snapshot);
            let resp = SnapshotResponse::new(v);
            prop_assert_eq!(snapshot_response_from_pb(snapshot_response_to_pb(&resp)).unwrap(), resp);
        }
    }

    /// A log id and a different, committed vote for the answer tests.
    fn sample_log_id_and_vote() -> (LogId, Vote) {
        let vote = Vote {
            leader_id: LeaderId::new(4, 2),
            committed: true,
        };
        (LogId::new(LeaderId::new(3, 1), 9), vote)
    }

    #[test]
    fn append_responses_round_trip() {
        let (l, v) = sample_log_id_and_vote();
        for r in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(l)),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(v),
        ] {
            assert_eq!(
                append_response_from_pb(append_response_to_pb(&r)).unwrap(),
                r
            );
        }
    }

    #[test]
    fn stream_append_replies_round_trip() {
        let (l, v) = sample_log_id_and_vote();
        for r in [
            Ok(Some(l)),
            Ok(None),
            Err(StreamAppendError::Conflict(l)),
            Err(StreamAppendError::HigherVote(v)),
        ] {
            assert_eq!(stream_append_from_pb(stream_append_to_pb(&r)).unwrap(), r);
        }
        assert!(stream_append_from_pb(pb::StreamAppendReply::default()).is_err());
    }

    #[test]
    fn missing_fields_are_errors() {
        assert!(vote_from_pb(pb::Vote::default()).is_err());
        assert!(log_id_from_pb(pb::LogId::default()).is_err());
        assert!(entry_from_pb(pb::Entry::default()).is_err());
        assert!(entry_from_pb(pb::Entry {
            log_id: Some(log_id_to_pb(&LogId::new(LeaderId::new(1, 1), 1))),
            payload: None,
        })
        .is_err());
        assert!(append_response_from_pb(pb::AppendEntriesResponse::default()).is_err());
        assert!(vote_request_from_pb(pb::VoteRequest::default()).is_err());
        assert!(install_snapshot_from_pb(pb::InstallSnapshotRequest::default()).is_err());
        assert!(snapshot_meta_from_pb(pb::SnapshotMeta::default()).is_err());
        // A voter without a node entry is not a valid membership.
        let bad = pb::Membership {
            configs: vec![pb::NodeIdSet { ids: vec![1, 2] }],
            nodes: Default::default(),
        };
        assert!(membership_from_pb(bad).is_err());
    }
}

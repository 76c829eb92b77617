//! The openraft type configuration of the hub and aliases for the openraft
//! types the rest of the crate uses.

use std::fmt;

use switchyard_proto::pb;

use crate::store::StateMachineStore;

/// The application data carried by a normal log entry: one state command.
///
/// A newtype because openraft requires `Display` on its app data and the
/// generated `pb::Command` lives in another crate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RaftCommand(pub pb::Command);

impl From<pb::Command> for RaftCommand {
    fn from(c: pb::Command) -> Self {
        RaftCommand(c)
    }
}

impl fmt::Display for RaftCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use pb::command::Kind;
        // Only the kind: commands may carry secrets (token material) that must
        // not end up in logs.
        let kind = match &self.0.kind {
            None => "empty",
            Some(Kind::InitFederation(_)) => "init_federation",
            Some(Kind::UpsertPop(_)) => "upsert_pop",
            Some(Kind::RemovePop(_)) => "remove_pop",
            Some(Kind::IssueToken(_)) => "issue_token",
            Some(Kind::ConsumeToken(_)) => "consume_token",
            Some(Kind::SetPolicy(_)) => "set_policy",
            Some(Kind::DeletePolicy(_)) => "delete_policy",
            Some(Kind::AddRevocation(_)) => "add_revocation",
            Some(Kind::ApplyExports(_)) => "apply_exports",
            Some(Kind::SetPopLiveness(_)) => "set_pop_liveness",
            Some(Kind::EndFailbackDamping(_)) => "end_failback_damping",
            Some(Kind::ReportRtt(_)) => "report_rtt",
            Some(Kind::SetHubUplink(_)) => "set_hub_uplink",
            Some(Kind::SetPopGateway(_)) => "set_pop_gateway",
        };
        write!(f, "Command({kind})")
    }
}

/// A hub node as Raft membership knows it: where its Raft gRPC service listens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HubNode {
    /// `host:port` of the node's gRPC listener.
    pub addr: String,
}

impl HubNode {
    /// A node listening on `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        HubNode { addr: addr.into() }
    }
}

impl fmt::Display for HubNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Raft node ids: stable per hub node, assigned by the operator.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The hub's openraft type configuration.
    pub TypeConfig:
        D = RaftCommand,
        R = pb::CommandResult,
        NodeId = NodeId,
        Node = HubNode,
);

/// A running Raft node of the hub.
pub type Raft = openraft::Raft<TypeConfig, StateMachineStore>;
/// Raft configuration.
pub type Config = openraft::Config;
/// A leader id (term, node): `LeaderId` of the advanced mode, total order.
pub type LeaderId = openraft::type_config::alias::LeaderIdOf<TypeConfig>;
/// A vote: leader id plus whether a quorum granted it.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// Position of a log entry.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A log entry's payload.
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<TypeConfig>;
/// A cluster membership configuration.
pub type Membership = openraft::Membership<NodeId, HubNode>;
/// A membership plus the log id it was proposed at.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// What a snapshot covers.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot: meta plus the encoded [`crate::state::State`].
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Vec<u8>>;
/// Vote RPC request.
pub type VoteRequest = openraft::raft::VoteRequest<TypeConfig>;
/// Vote RPC response.
pub type VoteResponse = openraft::raft::VoteResponse<TypeConfig>;
/// AppendEntries RPC request.
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
/// AppendEntries RPC response.
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<TypeConfig>;
/// Response to a full snapshot transfer.
pub type SnapshotResponse = openraft::raft::SnapshotResponse<TypeConfig>;
/// One answer on an AppendEntries stream.
pub type StreamAppendResult = openraft::raft::StreamAppendResult<TypeConfig>;
/// Why an AppendEntries stream stopped.
pub type StreamAppendError = openraft::raft::StreamAppendError<TypeConfig>;
/// Result of a client write on the leader.
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// Error from a Raft API call; `E` is the API-specific part.
pub type RaftError<E = openraft::errors::Infallible> = openraft::errors::RaftError<TypeConfig, E>;
/// The node stopped (storage failure, shutdown, panic).
pub type Fatal = openraft::errors::Fatal<TypeConfig>;
/// Why a client write was refused.
pub type ClientWriteError = openraft::errors::ClientWriteError<TypeConfig>;
/// Not the leader: where to go instead.
pub type ForwardToLeader = openraft::errors::ForwardToLeader<TypeConfig>;
/// Why a linearizable read could not be ordered.
pub type LinearizableReadError = openraft::errors::LinearizableReadError<TypeConfig>;
/// Why cluster initialization was refused.
pub type InitializeError = openraft::errors::InitializeError<TypeConfig>;
/// A failed outgoing Raft RPC.
pub type RPCError = openraft::errors::RPCError<TypeConfig>;
/// A failed outgoing snapshot transfer.
pub type StreamingError = openraft::errors::StreamingError<TypeConfig>;
/// A storage failure as openraft reports it.
pub type StorageError = openraft::StorageError<TypeConfig>;

//! openraft glue: type configuration, wire conversions, the gRPC network
//! and service, and [`start`] which wires a node together.
//!
//! ```text
//! backend  = Arc::new(RedbBackend::open(dir.join("raft.redb"))?)
//! node     = raft::start(id, raft::default_config()?, backend, channel_factory).await?
//! server   = RaftService::new(node.raft.clone()).into_server()   // behind the mTLS/authz layer
//! node.raft.initialize(members).await                            // once, on one node, at bootstrap
//! ```

pub mod convert;
pub mod network;
pub mod service;
mod stream_append;
pub mod types;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use network::{ChannelFactory, HubNetwork, PlainChannelFactory};
pub use service::RaftService;
pub use types::{Config, HubNode, NodeId, Raft, RaftCommand, TypeConfig};

use crate::store::{self, Backend, LogStore, StateMachineStore, StoreError};

/// Starting a Raft node failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The stores could not be opened.
    #[error("opening stores: {0}")]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    /// openraft refused to start (storage error while recovering).
    #[error("raft start: {0}")]
    Fatal(#[from] types::Fatal),
}

/// A running Raft node and the stores behind it.
#[derive(Clone)]
pub struct HubRaft {
    /// The openraft handle: writes, reads, membership, metrics.
    pub raft: Raft,
    /// The state machine: read the state, wait for applied indexes.
    pub state_machine: StateMachineStore,
    /// The log store (shares the backend with the state machine).
    pub log: LogStore,
}

impl std::fmt::Debug for HubRaft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRaft")
            .field("state_machine", &self.state_machine)
            .finish_non_exhaustive()
    }
}

/// The hub's Raft timing defaults: heartbeats every 100 ms, elections after
/// 500–1000 ms of silence, a snapshot every 50,000 applied entries, 30 s
/// for sending one.
pub fn default_config() -> Result<Config, openraft::ConfigError> {
    Config {
        cluster_name: "switchyard-hub".to_string(),
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        // A snapshot encodes the whole state: taking one every 1000 writes
        // made its cost dominate under load. The log since the last
        // snapshot costs disk only.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(50_000),
        max_in_snapshot_log_to_keep: 1000,
        // A snapshot travels whole in one message (up to 64 MiB), on a
        // connection of its own: openraft's 200 ms default would cut any
        // transfer of more than a few MiB over a WAN link, so a follower
        // that fell behind the purged log could never catch up.
        install_snapshot_timeout: 30_000,
        // A restarted leader takes office again only through an election.
        // Restored in place, its read index is its persisted committed
        // index, which may lag entries it had already acknowledged: a fully
        // restarted cluster then served a linearizable read that missed
        // the last write (`restart_all`). A new term's leader commits a
        // fresh blank entry first, and reads wait for it.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
    .validate()
}

/// Opens the stores on `backend` and starts node `id`.
///
/// A node restarted on the same backend resumes from its last snapshot and
/// replays its committed log. Call `raft.initialize` once, on one node, to
/// bootstrap a new cluster.
pub async fn start(
    id: NodeId,
    config: Config,
    backend: Arc<dyn Backend>,
    channels: Arc<dyn ChannelFactory>,
) -> Result<HubRaft, StartError> {
    let (log, state_machine) = store::open(backend).await?;
    let network = HubNetwork::new(id, channels);
    let raft = Raft::new(
        id,
        Arc::new(config),
        network,
        log.clone(),
        state_machine.clone(),
    )
    .await?;
    Ok(HubRaft {
        raft,
        state_machine,
        log,
    })
}

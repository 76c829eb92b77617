//! Durable storage of a hub node: the Raft log and the state machine's
//! snapshots, both in one redb file, behind a narrow [`backend::Backend`]
//! so tests can inject crashes.

pub mod backend;
pub mod log;
pub mod state_machine;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use backend::{Backend, BackendError, CrashableBackend, RedbBackend};
pub use log::LogStore;
pub use state_machine::{Applied, SnapshotBuilder, StateMachineStore};

/// Opening the stores failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Stored data does not decode.
    #[error("stored data: {0}")]
    Io(#[from] std::io::Error),
    /// The stored snapshot does not decode as a state.
    #[error(transparent)]
    Snapshot(#[from] crate::state::SnapshotError),
    /// A blocking storage task panicked or was cancelled.
    #[error("storage task: {0}")]
    Task(String),
}

/// Opens the log store and the state machine of one node on `backend`.
pub async fn open(backend: Arc<dyn Backend>) -> Result<(LogStore, StateMachineStore), StoreError> {
    let sm = StateMachineStore::open(backend.clone()).await?;
    Ok((LogStore::new(backend), sm))
}

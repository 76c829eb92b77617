//! Durable storage of a hub node: the Raft log and the state machine's
//! snapshots, both in one redb file, behind a narrow [`backend::Backend`]
//! so tests can inject crashes.

pub mod backend;
pub mod log;
mod memory;
pub mod state_machine;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use backend::{Backend, BackendError, CrashableBackend, RedbBackend};
pub use log::LogStore;
pub(crate) use memory::release_free_heap_soon;
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

/// Runs a blocking backend call off the async runtime.
async fn blocking<T, F>(f: F) -> std::io::Result<T>
where
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(std::io::Error::from),
        Err(e) => Err(std::io::Error::other(format!("storage task failed: {e}"))),
    }
}

/// Stored bytes that do not decode.
fn invalid(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

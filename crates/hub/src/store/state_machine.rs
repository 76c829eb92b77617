//! The Raft state machine: [`State`] in memory, snapshots in the node's redb
//! file.
//!
//! `apply` does not persist anything: after a restart the state is rebuilt
//! from the last snapshot plus the log replayed up to the persisted committed
//! log id (see `LogStore::save_committed`).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};
use prost::Message;
use switchyard_proto::pb;
use tokio::sync::watch;

use super::backend::{Backend, BackendError, Table, WriteBatch};
use super::StoreError;
use super::{blocking, invalid};
use crate::raft::convert;
use crate::raft::types::{
    EntryPayload, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::state::State;

const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the state machine has applied so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The last applied log id (`None` before the first entry).
    pub last_applied: Option<LogId>,
    /// The last membership applied (or restored from a snapshot).
    pub membership: StoredMembership,
}

struct Shared {
    backend: Arc<dyn Backend>,
    state: Arc<RwLock<State>>,
    applied: Mutex<Applied>,
    applied_tx: watch::Sender<u64>,
    // Serializes snapshot writes and reads so a slow builder cannot replace a
    // newer snapshot that was installed meanwhile.
    snapshot_lock: tokio::sync::Mutex<()>,
}

/// The hub's Raft state machine. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("applied", &*lock(&self.shared.applied))
            .finish_non_exhaustive()
    }
}

/// A stored snapshot, as read back from the backend.
fn decode_stored(meta: Option<Vec<u8>>, data: Option<Vec<u8>>) -> io::Result<Option<Snapshot>> {
    let (Some(meta), Some(data)) = (meta, data) else {
        return Ok(None);
    };
    let meta =
        pb::SnapshotMeta::decode(meta.as_slice()).map_err(|e| invalid("snapshot meta", e))?;
    let meta = convert::snapshot_meta_from_pb(meta).map_err(|e| invalid("snapshot meta", e))?;
    Ok(Some(Snapshot {
        meta,
        snapshot: data,
    }))
}

/// The raw (meta, data) records of the stored snapshot, if any.
type StoredSnapshot = (Option<Vec<u8>>, Option<Vec<u8>>);

fn read_stored(backend: &dyn Backend) -> Result<StoredSnapshot, BackendError> {
    Ok((
        backend.get(Table::Meta, KEY_SNAPSHOT_META)?,
        backend.get(Table::Meta, KEY_SNAPSHOT_DATA)?,
    ))
}

impl StateMachineStore {
    /// Opens the state machine over `backend`, restoring the last persisted
    /// snapshot (openraft then replays the committed log after it).
    pub async fn open(backend: Arc<dyn Backend>) -> Result<Self, StoreError> {
        let b = backend.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || read_stored(b.as_ref()))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let (state, applied) = match decode_stored(meta, data).map_err(StoreError::Io)? {
            Some(s) => (
                State::decode_snapshot(&s.snapshot)?,
                Applied {
                    last_applied: s.meta.last_log_id,
                    membership: s.meta.last_membership,
                },
            ),
            None => (State::default(), Applied::default()),
        };
        let index = applied.last_applied.map_or(0, |l| l.index);
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                backend,
                state: Arc::new(RwLock::new(state)),
                applied: Mutex::new(applied),
                applied_tx: watch::channel(index).0,
                snapshot_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The live state. Hold the read lock briefly: `apply` waits for it.
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.shared.state.clone()
    }

    /// Runs `f` on the current state under the read lock.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let guard = self
            .shared
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        f(&guard)
    }

    /// The last applied log id and membership.
    pub fn applied(&self) -> Applied {
        lock(&self.shared.applied).clone()
    }

    /// Watches the last applied log index (0 before anything was applied).
    /// A follower serving a linearizable read waits until it reaches the
    /// leader's read index.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    async fn persist_snapshot(&self, snap: &Snapshot, force: bool) -> io::Result<()> {
        let _g = self.shared.snapshot_lock.lock().await;
        let b = self.shared.backend.clone();
        let meta_bytes = convert::snapshot_meta_to_pb(&snap.meta).encode_to_vec();
        let data = snap.snapshot.clone();
        let new_last = snap.meta.last_log_id;
        blocking(move || {
            if !force {
                let current = b.get(Table::Meta, KEY_SNAPSHOT_META)?;
                if let Some(cur) = current {
                    let cur_last = pb::SnapshotMeta::decode(cur.as_slice())
                        .ok()
                        .and_then(|m| convert::snapshot_meta_from_pb(m).ok())
                        .and_then(|m| m.last_log_id);
                    if cur_last > new_last {
                        return Ok(());
                    }
                }
            }
            let mut wb = WriteBatch::new();
            wb.put(Table::Meta, KEY_SNAPSHOT_META, meta_bytes);
            wb.put(Table::Meta, KEY_SNAPSHOT_DATA, data);
            b.commit(wb)
        })
        .await
    }
}

/// Builds a snapshot from the state encoded between two applies.
pub struct SnapshotBuilder {
    sm: StateMachineStore,
    /// The encoded state: encoded straight from the live state (see
    /// `State::encode_snapshot`), with no copy of it.
    data: Vec<u8>,
    applied: Applied,
}

impl std::fmt::Debug for SnapshotBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotBuilder")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let snap = Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.applied.last_applied,
                last_membership: self.applied.membership.clone(),
            },
            snapshot: std::mem::take(&mut self.data),
        };
        self.sm.persist_snapshot(&snap, false).await?;
        super::memory::release_free_heap_soon();
        Ok(snap)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let a = self.applied();
        Ok((a.last_applied, a.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id;
            let index = log_id.index;
            let result = match entry.payload {
                EntryPayload::Normal(cmd) => {
                    let mut state = self
                        .shared
                        .state
                        .write()
                        .unwrap_or_else(PoisonError::into_inner);
                    state.apply(index, &cmd.0)
                }
                EntryPayload::Blank => pb::CommandResult {
                    index,
                    ..Default::default()
                },
                EntryPayload::Membership(m) => {
                    lock(&self.shared.applied).membership = StoredMembership::new(Some(log_id), m);
                    pb::CommandResult {
                        index,
                        ..Default::default()
                    }
                }
            };
            lock(&self.shared.applied).last_applied = Some(log_id);
            self.shared.applied_tx.send_replace(index);
            if let Some(r) = responder {
                r.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // openraft calls this on the same worker as `apply`, between two
        // applies, so the bytes match the applied log id exactly.
        let data = self.read(State::encode_snapshot);
        SnapshotBuilder {
            sm: self.clone(),
            data,
            applied: self.applied(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let state = State::decode_snapshot(&snapshot).map_err(|e| invalid("snapshot", e))?;
        let snap = Snapshot {
            meta: meta.clone(),
            snapshot,
        };
        self.persist_snapshot(&snap, true).await?;
        *self
            .shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner) = state;
        *lock(&self.shared.applied) = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.shared
            .applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let _g = self.shared.snapshot_lock.lock().await;
        let b = self.shared.backend.clone();
        let (meta, data) = blocking(move || read_stored(b.as_ref())).await?;
        decode_stored(meta, data)
    }
}

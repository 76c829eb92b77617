//! The Raft log store: entries, vote, committed and purged log ids, all in
//! the node's redb file through a [`Backend`].

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prost::Message;
use switchyard_proto::pb;

use super::backend::{Backend, Table, WriteBatch};
use super::{blocking, invalid};
use crate::raft::convert;
use crate::raft::types::{Entry, LogId, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    let e = pb::Entry::decode(bytes).map_err(|e| invalid("log entry", e))?;
    convert::entry_from_pb(e).map_err(|e| invalid("log entry", e))
}

fn decode_log_id(bytes: &[u8]) -> io::Result<LogId> {
    let l = pb::LogId::decode(bytes).map_err(|e| invalid("log id", e))?;
    convert::log_id_from_pb(l).map_err(|e| invalid("log id", e))
}

/// The Raft log of one node. Cheap to clone; clones share the backend and
/// serve as the log readers handed to replication tasks.
#[derive(Clone)]
pub struct LogStore {
    backend: Arc<dyn Backend>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// A log store over `backend` (usually shared with the state machine store).
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        LogStore { backend }
    }

    async fn read_meta_log_id(&self, key: &'static [u8]) -> io::Result<Option<LogId>> {
        let b = self.backend.clone();
        let raw = blocking(move || b.get(Table::Meta, key)).await?;
        raw.map(|r| decode_log_id(&r)).transpose()
    }

    async fn commit(&self, batch: WriteBatch) -> io::Result<()> {
        let b = self.backend.clone();
        blocking(move || b.commit(batch)).await
    }
}

fn bound_start(r: &impl RangeBounds<u64>) -> Option<u64> {
    match r.start_bound() {
        Bound::Included(&s) => Some(s),
        Bound::Excluded(&s) => s.checked_add(1),
        Bound::Unbounded => Some(0),
    }
}

/// Exclusive end; `None` means unbounded.
fn bound_end(r: &impl RangeBounds<u64>) -> Option<u64> {
    match r.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let Some(start) = bound_start(&range) else {
            return Ok(Vec::new());
        };
        let end = bound_end(&range);
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        let b = self.backend.clone();
        let rows = blocking(move || {
            b.scan(
                Table::Log,
                &index_key(start),
                end.map(index_key).as_ref().map(|k| &k[..]),
            )
        })
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut expect = None;
        for (_, v) in rows {
            let e = decode_entry(&v)?;
            // A hole inside the range means the store is corrupt; openraft
            // must not be fed a non-contiguous log.
            if let Some(x) = expect {
                if e.log_id.index != x {
                    return Err(invalid(
                        "log",
                        format!("hole: expected index {x}, found {}", e.log_id.index),
                    ));
                }
            }
            expect = Some(e.log_id.index + 1);
            out.push(e);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let b = self.backend.clone();
        let raw = blocking(move || b.get(Table::Meta, KEY_VOTE)).await?;
        raw.map(|r| {
            let v = pb::Vote::decode(r.as_slice()).map_err(|e| invalid("vote", e))?;
            convert::vote_from_pb(v).map_err(|e| invalid("vote", e))
        })
        .transpose()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged = self.read_meta_log_id(KEY_PURGED).await?;
        let b = self.backend.clone();
        let last = blocking(move || b.last(Table::Log)).await?;
        let last_log_id = match last {
            Some((_, v)) => Some(decode_entry(&v)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut wb = WriteBatch::new();
        wb.put(
            Table::Meta,
            KEY_VOTE,
            convert::vote_to_pb(vote).encode_to_vec(),
        );
        self.commit(wb).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let mut wb = WriteBatch::new();
        match committed {
            Some(c) => wb.put(
                Table::Meta,
                KEY_COMMITTED,
                convert::log_id_to_pb(&c).encode_to_vec(),
            ),
            None => wb.delete(Table::Meta, KEY_COMMITTED),
        }
        // The committed index is a hint for faster recovery; losing the
        // newest value in a crash is safe, so it rides on the next fsync
        // instead of costing one of its own.
        let b = self.backend.clone();
        blocking(move || b.commit_lazy(wb)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.read_meta_log_id(KEY_COMMITTED).await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One transaction and one fsync for the whole batch openraft hands us.
        let mut wb = WriteBatch::new();
        for e in entries {
            wb.put(
                Table::Log,
                index_key(e.log_id.index),
                convert::entry_to_pb(&e).encode_to_vec(),
            );
        }
        if wb.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        match self.commit(wb).await {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let mut wb = WriteBatch::new();
        wb.delete_range(Table::Log, index_key(from), None);
        self.commit(wb).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // The purged marker and the deletion go in one batch so a crash cannot
        // leave entries missing without the marker explaining why.
        let mut wb = WriteBatch::new();
        wb.put(
            Table::Meta,
            KEY_PURGED,
            convert::log_id_to_pb(&log_id).encode_to_vec(),
        );
        let end = log_id.index.checked_add(1).map(|e| index_key(e).to_vec());
        wb.delete_range(Table::Log, index_key(0), end);
        self.commit(wb).await
    }
}

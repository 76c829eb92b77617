//! The Raft log store: entries, vote, committed and purged log ids, all in
//! the node's redb file through a [`Backend`].
//!
//! Appends do not block Raft: `append` puts the entries in an in-memory
//! overlay (readable at once, as openraft requires) and queues them for a
//! dedicated writer thread, which commits every queued append in one
//! transaction (one fsync) and only then fires their `IOFlushed`
//! callbacks. So the leader replicates to followers while its own fsync
//! runs, and concurrent writes share fsyncs. Every other mutation (vote,
//! truncate, purge) goes through the same queue and is awaited, so
//! mutations reach the disk in the order Raft issued them, and when one
//! returns every earlier append is on disk. The overlay keeps the newest
//! durable entries too (see [`KEEP_ENTRIES`]): replication reads them from
//! memory.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prost::Message;
use switchyard_proto::pb;

use super::backend::{Backend, BackendError, Table, WriteBatch};
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

/// Entries kept in memory (see [`Recent`]).
type Overlay = Arc<Mutex<Recent>>;

/// How many of the newest durable entries stay in memory, so replication
/// reads them without a disk read (a blocking-pool hop, a read transaction
/// and a B-tree scan per request). Bounded by count and by size, whichever
/// is hit first.
pub(crate) const KEEP_ENTRIES: usize = 256;
/// See [`KEEP_ENTRIES`] (bytes of encoded entries).
const KEEP_BYTES: usize = 64 * 1024;

/// The newest entries of the log, encoded: every entry not yet on disk,
/// and the newest durable ones up to [`KEEP_ENTRIES`] / [`KEEP_BYTES`].
///
/// It is always a suffix of the log, without holes: appends add at the
/// end, trimming takes from the front, truncation and purge cut both the
/// disk and this. So a read whose start is in it needs no disk read.
#[derive(Debug, Default)]
struct Recent {
    entries: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    /// The highest index known to be on disk: only entries at or below it
    /// may be trimmed.
    durable: Option<u64>,
}

impl Recent {
    fn insert(&mut self, index: u64, bytes: Vec<u8>) {
        self.bytes += bytes.len();
        if let Some(old) = self.entries.insert(index, bytes) {
            self.bytes -= old.len();
        }
    }

    /// Entries up to `last` are durable; trims to the bounds.
    fn flushed(&mut self, last: u64) {
        self.durable = Some(self.durable.map_or(last, |d| d.max(last)));
        while self.entries.len() > KEEP_ENTRIES || self.bytes > KEEP_BYTES {
            match self.entries.first_key_value() {
                Some((&first, _)) if Some(first) <= self.durable => self.remove(first),
                _ => break,
            }
        }
    }

    fn remove(&mut self, index: u64) {
        if let Some(old) = self.entries.remove(&index) {
            self.bytes -= old.len();
        }
    }

    /// Drops every entry from `from` on (after a truncation).
    fn truncate_from(&mut self, from: u64) {
        for (_, v) in self.entries.split_off(&from) {
            self.bytes -= v.len();
        }
        self.durable = match from.checked_sub(1) {
            Some(before) => self.durable.map(|d| d.min(before)),
            None => None,
        };
    }

    /// Drops every entry up to `last` (after a purge).
    fn purge_upto(&mut self, last: u64) {
        let keep = match last.checked_add(1) {
            Some(next) => self.entries.split_off(&next),
            None => BTreeMap::new(),
        };
        self.entries = keep;
        self.bytes = self.entries.values().map(Vec::len).sum();
    }

    /// Whether entries from `start` on are all here (none on disk only).
    fn covers(&self, start: u64) -> bool {
        self.entries
            .first_key_value()
            .is_some_and(|(&first, _)| first <= start)
    }

    /// Copies of the entries in `start..end` (`end` `None`: to the last).
    fn range(&self, start: u64, end: Option<u64>) -> Vec<(u64, Vec<u8>)> {
        let range = match end {
            Some(e) => self.entries.range(start..e),
            None => self.entries.range(start..),
        };
        range.map(|(i, v)| (*i, v.clone())).collect()
    }

    fn last(&self) -> Option<&Vec<u8>> {
        self.entries.values().next_back()
    }
}

/// Work for the writer thread, done in queue order.
enum Job {
    /// Entries up to `last` (already in the overlay); `callback` fires
    /// once they are durable.
    Append {
        batch: WriteBatch,
        last: u64,
        callback: IOFlushed<TypeConfig>,
    },
    /// Any other mutation; `lazy` skips the fsync.
    Commit {
        batch: WriteBatch,
        lazy: bool,
        done: tokio::sync::oneshot::Sender<Result<(), BackendError>>,
    },
}

/// The Raft log of one node. Cheap to clone; clones share the backend, the
/// overlay and the writer, and serve as the log readers handed to
/// replication tasks.
#[derive(Clone)]
pub struct LogStore {
    backend: Arc<dyn Backend>,
    overlay: Overlay,
    writer: Arc<Mutex<mpsc::Sender<Job>>>,
    /// The last committed index given to `save_committed`: the writer may
    /// still hold it (see [`LAZY_HOLD`]), and a read must see it.
    committed: Arc<Mutex<Option<Option<LogId>>>>,
}

fn lock(o: &Overlay) -> std::sync::MutexGuard<'_, Recent> {
    // No method of `Recent` can panic halfway (its arithmetic only undoes
    // what it added), so a poisoned lock still holds a consistent value.
    o.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long the writer holds a lazy mutation (the committed-index hint)
/// waiting for a durable commit to ride on, before committing it alone.
/// Under load the next append comes within milliseconds, and the hint no
/// longer costs a transaction of its own per write.
pub(crate) const LAZY_HOLD: Duration = Duration::from_millis(100);

/// The writer thread: commits queued appends together, then their
/// callbacks; other mutations one by one, in order. Lazy mutations are
/// held (at most [`LAZY_HOLD`]) and put in front of the next commit, which
/// keeps them behind every job queued before them. Ends when every
/// `LogStore` clone is gone.
fn write_loop(backend: Arc<dyn Backend>, overlay: Overlay, rx: mpsc::Receiver<Job>) {
    let mut next = None;
    let mut held: Option<WriteBatch> = None;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => {
                let got = match &held {
                    Some(_) => rx.recv_timeout(LAZY_HOLD),
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match got {
                    Ok(j) => j,
                    Err(gone) => {
                        if let Some(batch) = held.take() {
                            if let Err(e) = backend.commit_lazy(batch) {
                                // Nobody waits for the hint: report it here
                                // (the next durable commit fails loudly).
                                tracing::warn!(error = %e, "saving the committed index failed");
                            }
                        }
                        if gone == mpsc::RecvTimeoutError::Disconnected {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        match job {
            Job::Commit {
                batch,
                lazy: true,
                done,
            } => {
                held.get_or_insert_with(WriteBatch::new)
                    .ops
                    .extend(batch.ops);
                let _ = done.send(Ok(()));
            }
            Job::Commit {
                batch,
                lazy: false,
                done,
            } => {
                let _ = done.send(backend.commit(with_held(&mut held, batch)));
            }
            Job::Append {
                batch,
                last,
                callback,
            } => {
                // Group commit: every append queued behind this one shares
                // its transaction and fsync.
                let mut merged = with_held(&mut held, batch);
                let mut last = last;
                let mut done = vec![callback];
                while let Ok(j) = rx.try_recv() {
                    match j {
                        Job::Append {
                            batch,
                            last: l,
                            callback,
                        } => {
                            merged.ops.extend(batch.ops);
                            last = last.max(l);
                            done.push(callback);
                        }
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                match backend.commit(merged) {
                    Ok(()) => {
                        lock(&overlay).flushed(last);
                        for cb in done {
                            cb.io_completed(Ok(()));
                        }
                    }
                    Err(e) => {
                        let e = io::Error::from(e);
                        for cb in done {
                            cb.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                        }
                    }
                }
            }
        }
    }
}

/// `batch` behind the held lazy mutations, if any.
fn with_held(held: &mut Option<WriteBatch>, batch: WriteBatch) -> WriteBatch {
    match held.take() {
        Some(mut h) => {
            h.ops.extend(batch.ops);
            h
        }
        None => batch,
    }
}

/// Decodes consecutive encoded entries, refusing a hole: a hole inside a
/// range means the store is corrupt, and openraft must not be fed a
/// non-contiguous log.
fn decode_run(rows: impl ExactSizeIterator<Item = Vec<u8>>) -> io::Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut expect = None;
    for v in rows {
        let e = decode_entry(&v)?;
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

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// A log store over `backend` (usually shared with the state machine store).
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let overlay: Overlay = Arc::default();
        let (tx, rx) = mpsc::channel();
        let (b, o) = (backend.clone(), overlay.clone());
        // A plain thread: it blocks in fsync, and must keep running while
        // the async runtime is busy.
        let spawned = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(b, o, rx));
        if let Err(e) = spawned {
            // Without a writer every mutation fails with a clear error
            // (the receiver is gone), and Raft stops on the storage error.
            tracing::error!(error = %e, "cannot start the Raft log writer thread");
        }
        LogStore {
            backend,
            overlay,
            writer: Arc::new(Mutex::new(tx)),
            committed: Arc::default(),
        }
    }

    fn send(&self, job: Job) -> Result<(), Job> {
        let tx = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        tx.send(job).map_err(|e| e.0)
    }

    async fn read_meta_log_id(&self, key: &'static [u8]) -> io::Result<Option<LogId>> {
        let b = self.backend.clone();
        let raw = blocking(move || b.get(Table::Meta, key)).await?;
        raw.map(|r| decode_log_id(&r)).transpose()
    }

    /// A mutation through the writer, after every earlier one.
    async fn commit_ordered(&self, batch: WriteBatch, lazy: bool) -> io::Result<()> {
        let (done, rx) = tokio::sync::oneshot::channel();
        if self.send(Job::Commit { batch, lazy, done }).is_err() {
            return Err(io::Error::other("the Raft log writer thread is gone"));
        }
        match rx.await {
            Ok(r) => r.map_err(io::Error::from),
            Err(_) => Err(io::Error::other("the Raft log writer thread is gone")),
        }
    }

    async fn commit(&self, batch: WriteBatch) -> io::Result<()> {
        self.commit_ordered(batch, false).await
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
        // The newest entries come from memory. It is read before the disk:
        // the writer trims an entry from memory only after committing it,
        // so an entry trimmed in between is found on one side or both (then
        // the same bytes), never neither.
        let pending = {
            let o = lock(&self.overlay);
            let pending = o.range(start, end);
            if o.covers(start) {
                return decode_run(pending.into_iter().map(|(_, v)| v));
            }
            pending
        };
        let b = self.backend.clone();
        let rows = blocking(move || {
            b.scan(
                Table::Log,
                &index_key(start),
                end.map(index_key).as_ref().map(|k| &k[..]),
            )
        })
        .await?;
        let mut rows: BTreeMap<u64, Vec<u8>> = rows
            .into_iter()
            .filter_map(|(k, v)| Some((u64::from_be_bytes(k.try_into().ok()?), v)))
            .collect();
        rows.extend(pending);
        decode_run(rows.into_values())
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
        // Overlay first, as in `try_get_log_entries`.
        let pending = lock(&self.overlay).last().cloned();
        let b = self.backend.clone();
        let last = blocking(move || b.last(Table::Log)).await?;
        let last_log_id = match pending.or(last.map(|(_, v)| v)) {
            Some(v) => Some(decode_entry(&v)?.log_id),
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
        // instead of costing one of its own. It is queued behind the appends
        // already submitted (so it never lands on disk ahead of them) but
        // not awaited: Raft calls this on every commit advance, and waiting
        // for the writer would put an fsync back on its path.
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = Some(committed);
        let (done, _ignored) = tokio::sync::oneshot::channel();
        let job = Job::Commit {
            batch: wb,
            lazy: true,
            done,
        };
        if self.send(job).is_err() {
            return Err(io::Error::other("the Raft log writer thread is gone"));
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let saved = *self.committed.lock().unwrap_or_else(|p| p.into_inner());
        match saved {
            Some(c) => Ok(c),
            None => self.read_meta_log_id(KEY_COMMITTED).await,
        }
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
        let mut wb = WriteBatch::new();
        let mut last = None;
        {
            let mut o = lock(&self.overlay);
            for e in entries {
                let i = e.log_id.index;
                let bytes = convert::entry_to_pb(&e).encode_to_vec();
                o.insert(i, bytes.clone());
                wb.put(Table::Log, index_key(i), bytes);
                last = Some(i);
            }
        }
        let Some(last) = last else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // Readable now (overlay); durable when the writer fires `callback`.
        let job = Job::Append {
            batch: wb,
            last,
            callback,
        };
        if let Err(job) = self.send(job) {
            let err = || io::Error::other("the Raft log writer thread is gone");
            if let Job::Append { callback, .. } = job {
                callback.io_completed(Err(err()));
            }
            return Err(err());
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        let mut wb = WriteBatch::new();
        wb.delete_range(Table::Log, index_key(from), None);
        // Awaiting the writer also flushes every earlier append, so
        // nothing it still holds can land after this cut.
        self.commit(wb).await?;
        lock(&self.overlay).truncate_from(from);
        Ok(())
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
        self.commit(wb).await?;
        lock(&self.overlay).purge_upto(log_id.index);
        super::memory::release_free_heap_soon();
        Ok(())
    }
}

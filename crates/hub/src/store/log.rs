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
//! memory. The committed index, a hint Raft gives on every commit, is
//! written at most every [`HINT_EVERY`] (see [`Hint`]).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Any other mutation, committed durably. `log_end`: the mutation cuts
    /// the log after this index (a truncation), so fewer entries are
    /// durable than before.
    Commit {
        batch: WriteBatch,
        log_end: Option<Option<u64>>,
        done: tokio::sync::oneshot::Sender<Result<(), BackendError>>,
    },
    /// A new committed-index hint waits in [`HintShared::slot`] and the writer had
    /// no hint due: it starts the clock.
    Hint,
}

/// The Raft log of one node. Cheap to clone; clones share the backend, the
/// overlay and the writer, and serve as the log readers handed to
/// replication tasks.
#[derive(Clone)]
pub struct LogStore {
    backend: Arc<dyn Backend>,
    overlay: Overlay,
    writer: Arc<Mutex<mpsc::Sender<Job>>>,
    hint: Arc<HintShared>,
}

/// The committed-index hint, shared by `save_committed` and the writer.
#[derive(Debug, Default)]
struct HintShared {
    /// The newest value given to `save_committed` (outer `None`: none yet
    /// this run). A read must see it even before it is written.
    slot: Mutex<Option<Option<LogId>>>,
    /// Set while the writer knows a hint is due (so `save_committed` need
    /// not wake it); the writer clears it before it reads `slot`.
    armed: AtomicBool,
}

impl HintShared {
    fn get(&self) -> Option<Option<LogId>> {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock(o: &Overlay) -> std::sync::MutexGuard<'_, Recent> {
    // No method of `Recent` can panic halfway (its arithmetic only undoes
    // what it added), so a poisoned lock still holds a consistent value.
    o.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often, at most, the writer puts the committed-index hint on disk.
/// Raft gives a new one with every commit; writing each would add a page
/// to every commit's fsync. Losing the newest hint in a crash is harmless:
/// a restarted node replays less of its log until the leader tells it the
/// committed index again.
pub(crate) const HINT_EVERY: Duration = Duration::from_millis(100);

/// The writer's side of the committed-index hint.
///
/// A hint is written only once every entry up to it is durable, so a
/// restarted node never finds a committed index past its log. Raft commits
/// an index before the node's own copy of the entry is durable (a quorum of
/// others suffices), so the newest hint may run ahead of the disk.
struct Hint {
    shared: Arc<HintShared>,
    /// The value most recently written.
    written: Option<Option<LogId>>,
    /// When the waiting hint is written at the latest; `None`: none waits.
    due: Option<Instant>,
    /// The last index of the durable log, as far as the writer knows.
    durable_last: Option<u64>,
}

impl Hint {
    fn woken(&mut self, now: Instant) {
        self.due.get_or_insert(now + HINT_EVERY);
    }

    /// How long the writer may block before the waiting hint is due.
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.due.map(|d| d.saturating_duration_since(now))
    }

    /// The hint's write, if one is due at `now` (or `force`) and every entry
    /// up to it is durable once the log ends at `log_last`.
    fn take(&mut self, now: Instant, force: bool, log_last: Option<u64>) -> Option<WriteBatch> {
        if !force && self.due.is_none_or(|d| now < d) {
            return None;
        }
        // Disarm before reading: a value stored after the read wakes the
        // writer again instead of being missed.
        self.shared.armed.store(false, Ordering::SeqCst);
        let value = match self.shared.get() {
            Some(v) if Some(v) != self.written => v,
            _ => {
                self.due = None;
                return None;
            }
        };
        if value.is_some_and(|c| log_last.is_none_or(|l| c.index > l)) {
            // Its entries are still queued: try again with a later commit.
            self.shared.armed.store(true, Ordering::SeqCst);
            self.due = Some(now + HINT_EVERY);
            return None;
        }
        self.due = None;
        self.written = Some(value);
        let mut wb = WriteBatch::new();
        match value {
            Some(c) => wb.put(
                Table::Meta,
                KEY_COMMITTED,
                convert::log_id_to_pb(&c).encode_to_vec(),
            ),
            None => wb.delete(Table::Meta, KEY_COMMITTED),
        }
        Some(wb)
    }
}

/// The writer thread: commits queued appends together, then their
/// callbacks; other mutations one by one, in order; the committed-index
/// hint with an append when due, or alone when no append comes. Ends when
/// every `LogStore` clone is gone.
fn write_loop(
    backend: Arc<dyn Backend>,
    overlay: Overlay,
    rx: mpsc::Receiver<Job>,
    mut hint: Hint,
) {
    // The log already on disk counts as durable. If it cannot be read, no
    // hint is written before the first append, which is merely late.
    hint.durable_last = match backend.last(Table::Log) {
        Ok(Some((key, _))) => key.try_into().ok().map(u64::from_be_bytes),
        _ => None,
    };
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(j) => j,
            None => {
                let got = match hint.wait(Instant::now()) {
                    Some(wait) => rx.recv_timeout(wait),
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match got {
                    Ok(j) => j,
                    Err(gone) => {
                        let last = gone == mpsc::RecvTimeoutError::Disconnected;
                        let durable_last = hint.durable_last;
                        if let Some(batch) = hint.take(Instant::now(), last, durable_last) {
                            // Alone it need not be durable at once (the next
                            // commit's fsync takes it along), but the last
                            // one has no next commit.
                            let r = if last {
                                backend.commit(batch)
                            } else {
                                backend.commit_lazy(batch)
                            };
                            if let Err(e) = r {
                                // Nobody waits for the hint: report it here
                                // (the next durable commit fails loudly).
                                tracing::warn!(error = %e, "saving the committed index failed");
                            }
                        }
                        if last {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        match job {
            Job::Hint => hint.woken(Instant::now()),
            Job::Commit {
                batch,
                log_end,
                done,
            } => {
                let r = backend.commit(batch);
                if r.is_ok() {
                    if let Some(end) = log_end {
                        hint.durable_last = end;
                    }
                }
                let _ = done.send(r);
            }
            Job::Append {
                batch,
                last,
                callback,
            } => {
                // Group commit: every append queued behind this one shares
                // its transaction and fsync.
                let mut merged = batch;
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
                        Job::Hint => hint.woken(Instant::now()),
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                // Appends extend the log from its current end (a conflict
                // is truncated first), so `last` is the log's end now.
                if let Some(h) = hint.take(Instant::now(), false, Some(last)) {
                    merged.ops.extend(h.ops);
                }
                match backend.commit(merged) {
                    Ok(()) => {
                        hint.durable_last = Some(last);
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
        let shared = Arc::new(HintShared::default());
        let (b, o) = (backend.clone(), overlay.clone());
        let hint = Hint {
            shared: shared.clone(),
            written: None,
            due: None,
            durable_last: None,
        };
        // A plain thread: it blocks in fsync, and must keep running while
        // the async runtime is busy.
        let spawned = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(b, o, rx, hint));
        if let Err(e) = spawned {
            // Without a writer every mutation fails with a clear error
            // (the receiver is gone), and Raft stops on the storage error.
            tracing::error!(error = %e, "cannot start the Raft log writer thread");
        }
        LogStore {
            backend,
            overlay,
            writer: Arc::new(Mutex::new(tx)),
            hint: shared,
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

    /// A durable mutation through the writer, after every earlier one.
    /// `log_end`: see [`Job::Commit`].
    async fn commit_ordered(
        &self,
        batch: WriteBatch,
        log_end: Option<Option<u64>>,
    ) -> io::Result<()> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let job = Job::Commit {
            batch,
            log_end,
            done,
        };
        if self.send(job).is_err() {
            return Err(io::Error::other("the Raft log writer thread is gone"));
        }
        match rx.await {
            Ok(r) => r.map_err(io::Error::from),
            Err(_) => Err(io::Error::other("the Raft log writer thread is gone")),
        }
    }

    async fn commit(&self, batch: WriteBatch) -> io::Result<()> {
        self.commit_ordered(batch, None).await
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
        // The committed index is a hint for faster recovery: the writer puts
        // it on disk at most every `HINT_EVERY`, riding on an append's
        // transaction (see `Hint`). Raft calls this on every commit advance,
        // so it neither waits for the writer nor, while a hint is already
        // due, wakes it.
        *self.hint.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(committed);
        if !self.hint.armed.swap(true, Ordering::SeqCst) && self.send(Job::Hint).is_err() {
            return Err(io::Error::other("the Raft log writer thread is gone"));
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.hint.get() {
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
        self.commit_ordered(wb, Some(from.checked_sub(1))).await?;
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

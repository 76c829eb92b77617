//! The durable key/value operations the Raft stores need, and their
//! implementations: [`RedbBackend`] (one redb file per node) and
//! [`CrashableBackend`] (for tests that inject crashes).
//!
//! The trait is deliberately narrow: byte keys and values in two tables,
//! point reads, ordered scans, and atomic batches that are durable when
//! [`Backend::commit`] returns. Everything is blocking; the stores call it
//! from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

/// A table of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Log entries keyed by big-endian index (so byte order is index order).
    Log,
    /// Small records: vote, committed and purged log ids, snapshot.
    Meta,
}

const LOG: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raft_meta");

fn def(t: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    match t {
        Table::Log => LOG,
        Table::Meta => META,
    }
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// redb reported an error (I/O, corruption, ...).
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// The (test) backend crashed: nothing can be read or written anymore.
    #[error("backend crashed")]
    Crashed,
}

impl From<BackendError> for std::io::Error {
    fn from(e: BackendError) -> Self {
        std::io::Error::other(e)
    }
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace `key`.
    Put {
        /// Target table.
        table: Table,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Remove `key` if present.
    Delete {
        /// Target table.
        table: Table,
        /// Key bytes.
        key: Vec<u8>,
    },
    /// Remove every key in `from..to` (`to` exclusive; `None`: to the end).
    DeleteRange {
        /// Target table.
        table: Table,
        /// First key removed.
        from: Vec<u8>,
        /// First key kept, or `None` for "everything from `from` on".
        to: Option<Vec<u8>>,
    },
}

/// Writes applied atomically by [`Backend::commit`]: all or none survive a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The writes, applied in order.
    pub ops: Vec<Op>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put {
            table,
            key: key.into(),
            value: value.into(),
        });
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete {
            table,
            key: key.into(),
        });
    }

    /// Adds a range delete (`to` exclusive, `None` = to the end).
    pub fn delete_range(&mut self, table: Table, from: impl Into<Vec<u8>>, to: Option<Vec<u8>>) {
        self.ops.push(Op::DeleteRange {
            table,
            from: from.into(),
            to,
        });
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A key/value pair read from a table.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The durable storage the Raft log and state machine stores run on.
pub trait Backend: Send + Sync + 'static {
    /// The value at `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError>;

    /// All pairs with `from <= key < to` (`to = None`: no upper bound), ascending.
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<KeyValue>, BackendError>;

    /// The pair with the greatest key.
    fn last(&self, table: Table) -> Result<Option<KeyValue>, BackendError>;

    /// Applies `batch` atomically. When this returns `Ok`, the batch is on
    /// stable storage (fsynced) and visible to every later read.
    fn commit(&self, batch: WriteBatch) -> Result<(), BackendError>;

    /// Applies `batch` atomically and makes it visible, but it need only
    /// reach stable storage with the next [`Backend::commit`]. For data
    /// whose loss in a crash is harmless (the committed index: Raft
    /// re-learns it from the leader). The default is a durable commit.
    fn commit_lazy(&self, batch: WriteBatch) -> Result<(), BackendError> {
        self.commit(batch)
    }
}

/// Page cache of the redb file (bytes). redb moves every page it writes
/// into this cache until the cache is full, so under steady writes it is
/// all resident within seconds; what the hub reads back (the log B-tree's
/// spine, the system tables) is a few hundred pages, which an LRU of this
/// size keeps.
pub const REDB_CACHE_BYTES: usize = 2 * 1024 * 1024;

/// [`Backend`] over one redb file, every commit with `Durability::Immediate`.
pub struct RedbBackend {
    db: Database,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend").finish_non_exhaustive()
    }
}

fn redb_err(e: impl Into<redb::Error>) -> BackendError {
    BackendError::Redb(e.into())
}

impl RedbBackend {
    /// Opens `path`, creating the file and tables when absent.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        // redb's default page cache is 1 GiB; the hub's state lives in
        // memory already and the log is read back rarely (replication of
        // recent entries, recovery), so a small cache keeps RSS small.
        let db = redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)
            .map_err(redb_err)?;
        // Creating the tables up front lets readers treat "no table" as a bug.
        let mut tx = db.begin_write().map_err(redb_err)?;
        tx.set_durability(Durability::Immediate).map_err(redb_err)?;
        tx.open_table(LOG).map_err(redb_err)?;
        tx.open_table(META).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(RedbBackend { db })
    }
}

impl Backend for RedbBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let t = tx.open_table(def(table)).map_err(redb_err)?;
        let v = t.get(key).map_err(redb_err)?.map(|v| v.value().to_vec());
        Ok(v)
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<KeyValue>, BackendError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let t = tx.open_table(def(table)).map_err(redb_err)?;
        let range = match to {
            Some(to) => t.range(from..to),
            None => t.range(from..),
        }
        .map_err(redb_err)?;
        let mut out = Vec::new();
        for item in range {
            let (k, v) = item.map_err(redb_err)?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn last(&self, table: Table) -> Result<Option<KeyValue>, BackendError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let t = tx.open_table(def(table)).map_err(redb_err)?;
        let last = t
            .last()
            .map_err(redb_err)?
            .map(|(k, v)| (k.value().to_vec(), v.value().to_vec()));
        Ok(last)
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), BackendError> {
        self.commit_with(batch, Durability::Immediate)
    }

    fn commit_lazy(&self, batch: WriteBatch) -> Result<(), BackendError> {
        self.commit_with(batch, Durability::None)
    }
}

impl RedbBackend {
    fn commit_with(&self, batch: WriteBatch, durability: Durability) -> Result<(), BackendError> {
        let mut tx = self.db.begin_write().map_err(redb_err)?;
        tx.set_durability(durability).map_err(redb_err)?;
        {
            let mut log = tx.open_table(LOG).map_err(redb_err)?;
            let mut meta = tx.open_table(META).map_err(redb_err)?;
            for op in &batch.ops {
                match op {
                    Op::Put { table, key, value } => {
                        let t = if *table == Table::Log {
                            &mut log
                        } else {
                            &mut meta
                        };
                        t.insert(key.as_slice(), value.as_slice())
                            .map_err(redb_err)?;
                    }
                    Op::Delete { table, key } => {
                        let t = if *table == Table::Log {
                            &mut log
                        } else {
                            &mut meta
                        };
                        t.remove(key.as_slice()).map_err(redb_err)?;
                    }
                    Op::DeleteRange { table, from, to } => {
                        let t = if *table == Table::Log {
                            &mut log
                        } else {
                            &mut meta
                        };
                        match to {
                            Some(to) => t.retain_in(from.as_slice()..to.as_slice(), |_, _| false),
                            None => t.retain_in(from.as_slice().., |_, _| false),
                        }
                        .map_err(redb_err)?;
                    }
                }
            }
        }
        // Durability::Immediate: returns only after the commit is fsynced.
        tx.commit().map_err(redb_err)?;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Gate {
    hold: bool,
    pending: usize,
    crashed: bool,
}

/// A test [`Backend`] that can "lose power".
///
/// [`CrashableBackend::hold`] makes every following commit stop before it
/// reaches the disk (the caller stays blocked, like a thread waiting for
/// fsync). [`CrashableBackend::crash`] then drops those writes, fails every
/// later operation and closes the file, so the test can reopen it with
/// [`CrashableBackend::open`] and see exactly what had been made durable.
pub struct CrashableBackend {
    path: PathBuf,
    inner: Mutex<Option<Arc<RedbBackend>>>,
    gate: Mutex<Gate>,
    cv: Condvar,
    pending_tx: tokio::sync::watch::Sender<usize>,
}

impl std::fmt::Debug for CrashableBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashableBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CrashableBackend {
    /// Opens (or reopens after a crash) the redb file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        let path = path.as_ref().to_path_buf();
        let inner = RedbBackend::open(&path)?;
        Ok(CrashableBackend {
            path,
            inner: Mutex::new(Some(Arc::new(inner))),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
            pending_tx: tokio::sync::watch::channel(0).0,
        })
    }

    /// The file this backend writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, commits block before reaching the disk.
    pub fn hold(&self) {
        lock(&self.gate).hold = true;
    }

    /// Lets held and future commits through.
    pub fn release(&self) {
        lock(&self.gate).hold = false;
        self.cv.notify_all();
    }

    /// Watches the number of commits currently held back.
    pub fn pending(&self) -> tokio::sync::watch::Receiver<usize> {
        self.pending_tx.subscribe()
    }

    /// Power loss: held commits are dropped (their callers get
    /// [`BackendError::Crashed`]), every later call fails, and the file is
    /// closed once in-flight reads finish.
    pub fn crash(&self) {
        lock(&self.gate).crashed = true;
        self.cv.notify_all();
        lock(&self.inner).take();
    }

    fn inner(&self) -> Result<Arc<RedbBackend>, BackendError> {
        if lock(&self.gate).crashed {
            return Err(BackendError::Crashed);
        }
        lock(&self.inner).clone().ok_or(BackendError::Crashed)
    }
}

impl Backend for CrashableBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        self.inner()?.get(table, key)
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<KeyValue>, BackendError> {
        self.inner()?.scan(table, from, to)
    }

    fn last(&self, table: Table) -> Result<Option<KeyValue>, BackendError> {
        self.inner()?.last(table)
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), BackendError> {
        self.gate()?.commit(batch)
    }

    fn commit_lazy(&self, batch: WriteBatch) -> Result<(), BackendError> {
        self.gate()?.commit_lazy(batch)
    }
}

impl CrashableBackend {
    /// Waits while commits are held; then the live backend, or `Crashed`.
    fn gate(&self) -> Result<Arc<RedbBackend>, BackendError> {
        {
            let mut g = lock(&self.gate);
            if g.hold && !g.crashed {
                g.pending += 1;
                self.pending_tx.send_replace(g.pending);
                while g.hold && !g.crashed {
                    g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                }
                g.pending -= 1;
                self.pending_tx.send_replace(g.pending);
            }
            if g.crashed {
                return Err(BackendError::Crashed);
            }
        }
        self.inner()
    }
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        (**self).get(table, key)
    }
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<KeyValue>, BackendError> {
        (**self).scan(table, from, to)
    }
    fn last(&self, table: Table) -> Result<Option<KeyValue>, BackendError> {
        (**self).last(table)
    }
    fn commit(&self, batch: WriteBatch) -> Result<(), BackendError> {
        (**self).commit(batch)
    }
    // Without this, `Arc<dyn Backend>` (what the stores hold) resolves
    // `commit_lazy` to the trait's durable default, and every committed
    // index hint cost an fsync on the write path.
    fn commit_lazy(&self, batch: WriteBatch) -> Result<(), BackendError> {
        (**self).commit_lazy(batch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn redb_batch_is_atomic_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let b = RedbBackend::open(dir.path().join("db")).unwrap();
        let mut wb = WriteBatch::new();
        for i in 0u64..10 {
            wb.put(Table::Log, i.to_be_bytes(), vec![i as u8]);
        }
        wb.put(Table::Meta, b"vote".to_vec(), b"v".to_vec());
        b.commit(wb).unwrap();
        assert_eq!(b.scan(Table::Log, &[], None).unwrap().len(), 10);
        let mut wb = WriteBatch::new();
        wb.delete_range(
            Table::Log,
            3u64.to_be_bytes(),
            Some(5u64.to_be_bytes().to_vec()),
        );
        wb.delete_range(Table::Log, 8u64.to_be_bytes(), None);
        wb.delete(Table::Meta, b"vote".to_vec());
        b.commit(wb).unwrap();
        let keys: Vec<u64> = b
            .scan(Table::Log, &[], None)
            .unwrap()
            .into_iter()
            .map(|(k, _)| u64::from_be_bytes(k.try_into().unwrap()))
            .collect();
        assert_eq!(keys, vec![0, 1, 2, 5, 6, 7]);
        assert_eq!(b.get(Table::Meta, b"vote").unwrap(), None);
        assert_eq!(
            b.last(Table::Log).unwrap().unwrap().0,
            7u64.to_be_bytes().to_vec()
        );
    }

    /// Counts durable and lazy commits, storing nothing.
    #[derive(Default)]
    struct Counting {
        durable: std::sync::atomic::AtomicUsize,
        lazy: std::sync::atomic::AtomicUsize,
    }

    impl Backend for Counting {
        fn get(&self, _: Table, _: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
            Ok(None)
        }
        fn scan(
            &self,
            _: Table,
            _: &[u8],
            _: Option<&[u8]>,
        ) -> Result<Vec<KeyValue>, BackendError> {
            Ok(Vec::new())
        }
        fn last(&self, _: Table) -> Result<Option<KeyValue>, BackendError> {
            Ok(None)
        }
        fn commit(&self, _: WriteBatch) -> Result<(), BackendError> {
            self.durable
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn commit_lazy(&self, _: WriteBatch) -> Result<(), BackendError> {
            self.lazy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn lazy_commits_stay_lazy_through_shared_handles() {
        let counting = Arc::new(Counting::default());
        // What the log and state machine stores hold.
        let shared: Arc<dyn Backend> = counting.clone();
        let twice: Arc<Arc<dyn Backend>> = Arc::new(shared.clone());
        shared.commit_lazy(WriteBatch::new()).unwrap();
        twice.commit_lazy(WriteBatch::new()).unwrap();
        shared.commit(WriteBatch::new()).unwrap();
        let load =
            |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((load(&counting.lazy), load(&counting.durable)), (2, 1));
    }

    #[test]
    fn crash_drops_held_commits_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let b = Arc::new(CrashableBackend::open(&path).unwrap());
        let mut wb = WriteBatch::new();
        wb.put(Table::Meta, b"a".to_vec(), b"1".to_vec());
        b.commit(wb).unwrap();

        b.hold();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let mut wb = WriteBatch::new();
            wb.put(Table::Meta, b"b".to_vec(), b"2".to_vec());
            b2.commit(wb)
        });
        let mut pending = b.pending();
        while *pending.borrow_and_update() == 0 {
            futures::executor::block_on(pending.changed()).unwrap();
        }
        b.crash();
        assert!(matches!(t.join().unwrap(), Err(BackendError::Crashed)));
        assert!(b.get(Table::Meta, b"a").is_err());
        drop(b);

        let b = CrashableBackend::open(&path).unwrap();
        assert_eq!(b.get(Table::Meta, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(b.get(Table::Meta, b"b").unwrap(), None);
    }
}

//! Storage tests: openraft's storage suite on redb, crash injection, and
//! snapshot/restore of the state machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::{RaftLogReader, RaftSnapshotBuilder};
use switchyard_proto::pb;
use tempfile::TempDir;

use super::*;
use crate::raft::types::{
    Entry, EntryPayload, LeaderId, LogId, RaftCommand, StorageError, TypeConfig, Vote,
};
use crate::store::backend::Table;
use crate::store::log::HINT_EVERY;
use prost::Message;

struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> =
            Arc::new(RedbBackend::open(dir.path().join("raft.redb")).unwrap());
        let (log, sm) = open(backend).await.unwrap();
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_redb() {
    Suite::test_all(RedbStoreBuilder).await.unwrap();
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(LeaderId::new(term, 1), index)
}

pub(crate) fn init_federation() -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::InitFederation(pb::InitFederation {
            federation: Some(pb::Federation {
                domain: "example.org".into(),
                ca_cert_pem: "ca".into(),
                ca_key_pem: String::new(),
            }),
        })),
    }
}

pub(crate) fn revoke(subject: &str) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::AddRevocation(pb::AddRevocation {
            revocation: Some(pb::Revocation {
                subject: subject.into(),
                ..Default::default()
            }),
        })),
    }
}

fn cmd_entry(index: u64, c: pb::Command) -> Entry {
    let mut e = Entry::new_blank(log_id(1, index));
    e.payload = EntryPayload::Normal(RaftCommand(c));
    e
}

/// One revocation entry per index, of subject `{tag}{index}`: entries from
/// different calls with different tags differ at the same index.
fn revokes(indexes: impl IntoIterator<Item = u64>, tag: &str) -> Vec<Entry> {
    indexes
        .into_iter()
        .map(|i| cmd_entry(i, revoke(&format!("{tag}{i}"))))
        .collect()
}

async fn append_acked(log: &mut LogStore, entries: Vec<Entry>) -> anyhow::Result<()> {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await??;
    Ok(())
}

fn crashable(path: &Path) -> Arc<CrashableBackend> {
    Arc::new(CrashableBackend::open(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_writes_survive_crash_and_held_ones_vanish_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let backend = crashable(&path);
    let (mut log, _sm) = open(backend.clone()).await.unwrap();

    let vote = Vote::new_committed(1, 1);
    log.save_vote(&vote).await.unwrap();
    append_acked(&mut log, revokes(1..=5, "s")).await.unwrap();

    // The next batch stalls before reaching the disk, like an fsync in flight.
    backend.hold();
    let (tx, mut rx) = TypeConfig::oneshot();
    let mut log2 = log.clone();
    let batch = revokes(6..=50, "s");
    // append returns at once (the writer thread does the fsync) and the
    // entries are readable before they are durable, as openraft requires.
    log2.append(batch, IOFlushed::signal(tx)).await.unwrap();
    let mut pending = backend.pending();
    pending.wait_for(|n| *n >= 1).await.unwrap();
    let read = log
        .get_log_reader()
        .await
        .try_get_log_entries(0..100)
        .await
        .unwrap();
    assert_eq!(
        read.len(),
        50,
        "appended entries are readable before the fsync"
    );
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 50))
    );
    assert!(
        rx.try_recv().is_err(),
        "IOFlushed must not fire before the batch is durable"
    );

    backend.crash();
    assert!(
        !matches!(rx.await, Ok(Ok(()))),
        "a lost batch is never acknowledged"
    );
    drop((log, _sm, backend));

    let backend = crashable(&path);
    let (mut log, _sm) = open(backend).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 5)));
    let entries = log
        .get_log_reader()
        .await
        .try_get_log_entries(0..100)
        .await
        .unwrap();
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        log.get_log_reader().await.read_vote().await.unwrap(),
        Some(vote)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_purge_are_atomic_under_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let backend = crashable(&path);
    let (mut log, _sm) = open(backend.clone()).await.unwrap();
    append_acked(
        &mut log,
        (1..=10).map(|i| cmd_entry(i, revoke("x"))).collect(),
    )
    .await
    .unwrap();
    log.purge(log_id(1, 3)).await.unwrap();

    // A purge that never reached the disk leaves neither the marker nor a gap.
    backend.hold();
    let mut log2 = log.clone();
    let task = tokio::spawn(async move { log2.purge(log_id(1, 7)).await });
    backend.pending().wait_for(|n| *n >= 1).await.unwrap();
    backend.crash();
    assert!(task.await.unwrap().is_err());
    drop((log, _sm, backend));

    let (mut log, _sm) = open(crashable(&path)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 10)));
    let entries = log
        .get_log_reader()
        .await
        .try_get_log_entries(0..100)
        .await
        .unwrap();
    assert_eq!(entries.first().map(|e| e.log_id.index), Some(4));
    assert_eq!(entries.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_machine_restores_from_persisted_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let backend = crashable(&path);
    let (_log, mut sm) = open(backend.clone()).await.unwrap();

    let entries = vec![
        cmd_entry(1, init_federation()),
        cmd_entry(2, revoke("a")),
        cmd_entry(3, revoke("b")),
    ];
    let stream = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
    assert_eq!(*sm.applied_index().borrow(), 3);
    let expected = sm.read(|s| s.clone());
    assert_eq!(expected.revocations.len(), 2);

    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));
    // Applied after the snapshot: not in it, and `apply` does not persist.
    let stream = futures::stream::iter([Ok((cmd_entry(4, revoke("c")), None))]);
    sm.apply(stream).await.unwrap();

    backend.crash();
    drop((_log, sm, backend));

    let (_log, mut sm) = open(crashable(&path)).await.unwrap();
    assert_eq!(sm.read(|s| s.clone()), expected);
    assert_eq!(sm.applied().last_applied, Some(log_id(1, 3)));
    assert_eq!(*sm.applied_index().borrow(), 3);
    let cur = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(cur.meta, snap.meta);
}

/// A backend whose scans are slow, so the writer thread commits (and
/// empties the overlay) while a read is between its two sources.
struct SlowScan(RedbBackend);

impl Backend for SlowScan {
    fn get(&self, t: backend::Table, k: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        self.0.get(t, k)
    }
    fn scan(
        &self,
        t: backend::Table,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<backend::KeyValue>, BackendError> {
        let r = self.0.scan(t, from, to);
        std::thread::sleep(std::time::Duration::from_millis(2));
        r
    }
    fn last(&self, t: backend::Table) -> Result<Option<backend::KeyValue>, BackendError> {
        self.0.last(t)
    }
    fn commit(&self, b: backend::WriteBatch) -> Result<(), BackendError> {
        self.0.commit(b)
    }
}

/// Reads racing the writer thread never see a hole: an entry moves from
/// the overlay to the disk while readers look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_the_writer_see_a_contiguous_log() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(SlowScan(
        RedbBackend::open(dir.path().join("raft.redb")).unwrap(),
    ));
    let (log, _sm) = open(backend).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let mut r = log.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let entries = r.try_get_log_entries(1..).await.unwrap();
                for (k, e) in entries.iter().enumerate() {
                    assert_eq!(e.log_id.index, k as u64 + 1, "hole in the log");
                }
                let state = r.get_log_state().await.unwrap();
                assert!(state.last_log_id.map_or(0, |l| l.index) >= entries.len() as u64);
                reads += 1;
            }
            reads
        })
    };
    let mut w = log.clone();
    let mut next = 1u64;
    let mut acks = Vec::new();
    while next <= 1500 {
        let n = 1 + next % 3;
        let batch: Vec<Entry> = (next..next + n)
            .map(|i| cmd_entry(i, revoke("x")))
            .collect();
        next += n;
        let (tx, rx) = TypeConfig::oneshot();
        w.append(batch, IOFlushed::signal(tx)).await.unwrap();
        acks.push(rx);
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
    for rx in acks {
        rx.await.unwrap().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.await.unwrap();
    assert!(reads > 0);
    let all = w.try_get_log_entries(1..).await.unwrap();
    assert_eq!(all.len() as u64, next - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_hint_reads_back_at_once_and_reaches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> =
        Arc::new(RedbBackend::open(dir.path().join("raft.redb")).unwrap());
    let (mut log, _sm) = open(backend.clone()).await.unwrap();
    append_acked(
        &mut log,
        (1..=3).map(|i| cmd_entry(i, revoke("x"))).collect(),
    )
    .await
    .unwrap();
    let on_disk = || backend.get(Table::Meta, b"committed").unwrap();

    let decode = |raw: Vec<u8>| {
        crate::raft::convert::log_id_from_pb(pb::LogId::decode(raw.as_slice()).unwrap()).unwrap()
    };
    // Polled with a generous deadline: a loaded machine may run the writer
    // late.
    let reaches_disk = |want: LogId| async move {
        let deadline = tokio::time::Instant::now() + HINT_EVERY * 100;
        while on_disk().map(decode) != Some(want) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hint {want} never reached the store"
            );
            tokio::time::sleep(HINT_EVERY / 4).await;
        }
    };

    // The writer may wait a while: it reads back at once anyway.
    log.save_committed(Some(log_id(1, 2))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 2)));
    // With no append to ride on, it is written alone.
    reaches_disk(log_id(1, 2)).await;

    // A hint past the durable log (Raft commits once a quorum of other
    // nodes has the entry) waits for its entries: on disk it would send a
    // restarted node past the end of its log.
    log.save_committed(Some(log_id(1, 6))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 6)));
    tokio::time::sleep(HINT_EVERY * 3).await;
    assert_eq!(on_disk().map(decode), Some(log_id(1, 2)));
    append_acked(&mut log, revokes(4..=6, "y")).await.unwrap();
    reaches_disk(log_id(1, 6)).await;

    // Entries that a truncation removed no longer count: the hint waits
    // for their replacements.
    append_acked(&mut log, revokes(7..=8, "old")).await.unwrap();
    log.truncate_after(Some(log_id(1, 6))).await.unwrap();
    log.save_committed(Some(log_id(1, 7))).await.unwrap();
    tokio::time::sleep(HINT_EVERY * 3).await;
    assert_eq!(on_disk().map(decode), Some(log_id(1, 6)));
    append_acked(&mut log, vec![cmd_entry(7, revoke("z"))])
        .await
        .unwrap();
    reaches_disk(log_id(1, 7)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_the_kept_entries_and_the_disk_agree() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> =
        Arc::new(RedbBackend::open(dir.path().join("raft.redb")).unwrap());
    let (mut log, _sm) = open(backend.clone()).await.unwrap();
    // More entries than memory keeps: the oldest are read from disk only.
    let total = crate::store::log::KEEP_ENTRIES as u64 + 500;
    for chunk in (1..=total).collect::<Vec<_>>().chunks(100) {
        append_acked(&mut log, revokes(chunk.iter().copied(), "s"))
            .await
            .unwrap();
    }
    let indexes = |es: &[Entry]| es.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    let mid = total / 2;
    for (start, end) in [
        (1, total + 1),
        (1, 10),
        (mid - 100, mid + 100),
        (total - 5, total + 1),
    ] {
        let got = log.try_get_log_entries(start..end).await.unwrap();
        assert_eq!(indexes(&got), (start..end).collect::<Vec<_>>());
    }
    let tail = log.try_get_log_entries(total - 2..).await.unwrap();
    assert_eq!(indexes(&tail), vec![total - 2, total - 1, total]);

    // A truncation cuts memory too: a new entry with the same index from
    // another term replaces the old one, and nothing after it is left.
    log.truncate_after(Some(log_id(1, total - 10)))
        .await
        .unwrap();
    let mut replaced = Entry::new_blank(log_id(2, total - 9));
    replaced.payload = EntryPayload::Normal(RaftCommand(revoke("new")));
    append_acked(&mut log, vec![replaced]).await.unwrap();
    let tail = log.try_get_log_entries(total - 11..).await.unwrap();
    assert_eq!(indexes(&tail), vec![total - 11, total - 10, total - 9]);
    assert_eq!(tail[2].log_id, log_id(2, total - 9));
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2, total - 9))
    );

    // A purge drops the front from memory and disk alike.
    log.purge(log_id(1, total - 20)).await.unwrap();
    let got = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(indexes(&got), (total - 19..=total - 9).collect::<Vec<_>>());
}

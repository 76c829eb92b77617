//! No acknowledged write is lost: writers put POP records through different
//! nodes while the leader is killed with SIGKILL and restarted, again and
//! again. Afterwards a linearizable read on every node holds every
//! acknowledged write and nothing that was never attempted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use switchyard_proto::pb;
use switchyard_tests::Cluster;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

const WRITERS: u64 = 3;
const LEADER_KILLS: usize = 5;

#[derive(Default, Debug)]
struct Outcome {
    attempted: BTreeSet<String>,
    acked: BTreeSet<String>,
    unknown: BTreeSet<String>,
    /// Failures by gRPC code.
    errors: std::collections::BTreeMap<String, usize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_across_leader_kills() {
    let mut c = Cluster::start(bin(), 3).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        // Each writer starts on a different node and moves to the next
        // one when a write fails (its node may be the one just killed).
        let clients: Vec<_> = c
            .ids()
            .iter()
            .map(|&id| c.admin_client(id).unwrap())
            .collect();
        let stop = stop.clone();
        let acked_total = acked_total.clone();
        writers.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut node = w as usize % clients.len();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{seq}");
                seq += 1;
                out.attempted.insert(name.clone());
                let mut client = clients[node].clone();
                let call = client.put_pop(pb::PutPopRequest {
                    pop: Some(pb::Pop {
                        name: name.clone(),
                        ..Default::default()
                    }),
                    create_only: true,
                });
                let r = tokio::time::timeout(Duration::from_secs(15), call)
                    .await
                    .map_err(|_| "client timeout".to_string())
                    .map(|r| r.map_err(|s| format!("{:?}", s.code())));
                match r {
                    Ok(Ok(_)) => {
                        out.acked.insert(name);
                        acked_total.fetch_add(1, Ordering::Relaxed);
                    }
                    // Failed or timed out: the write may or may not have
                    // committed, but it was not acknowledged.
                    Ok(Err(e)) | Err(e) => {
                        *out.errors.entry(e).or_default() += 1;
                        out.unknown.insert(name);
                        node = (node + 1) % clients.len();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            out
        }));
    }

    let wait_progress = |from: usize| {
        let acked_total = acked_total.clone();
        async move {
            let start = Instant::now();
            while acked_total.load(Ordering::Relaxed) < from + 20 {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no write acknowledged for 60 s (acked {})",
                    acked_total.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_progress(0).await;
    let mut killed = Vec::new();
    for round in 0..LEADER_KILLS {
        let leader = c.leader().await.unwrap();
        c.kill(leader).unwrap();
        killed.push(leader);
        // Writes go on against the survivors while they elect a new leader.
        let before = acked_total.load(Ordering::Relaxed);
        wait_progress(before).await;
        c.restart(leader).await.unwrap();
        c.wait_ready(leader).await.unwrap();
        let before = acked_total.load(Ordering::Relaxed);
        wait_progress(before).await;
        println!("round {round}: killed and restarted leader {leader}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Outcome::default();
    for w in writers {
        let o = w.await.unwrap();
        all.attempted.extend(o.attempted);
        all.acked.extend(o.acked);
        all.unknown.extend(o.unknown);
        for (k, v) in o.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    c.wait_all_ready().await.unwrap();

    let mut present_counts = Vec::new();
    for id in c.ids() {
        let pops = c
            .admin_client(id)
            .unwrap()
            .list_pops(pb::ListPopsRequest {
                consistency: pb::ReadConsistency::Linearizable as i32,
            })
            .await
            .unwrap_or_else(|s| panic!("linearizable read on node {id}: {s}"))
            .into_inner()
            .pops;
        let present: BTreeSet<String> = pops.into_iter().map(|p| p.name).collect();
        let lost: Vec<_> = all.acked.difference(&present).collect();
        assert!(
            lost.is_empty(),
            "node {id} lost acknowledged writes: {lost:?}"
        );
        let invented: Vec<_> = present.difference(&all.attempted).collect();
        assert!(
            invented.is_empty(),
            "node {id} holds writes never attempted: {invented:?}"
        );
        let unknown_present = present.intersection(&all.unknown).count();
        println!(
            "node {id}: present {} (acknowledged {}, of the failed/unknown {} present)",
            present.len(),
            all.acked.len(),
            unknown_present
        );
        present_counts.push(present.len());
    }
    assert!(
        present_counts.windows(2).all(|w| w[0] == w[1]),
        "nodes disagree: {present_counts:?}"
    );
    println!(
        "leader kills: {} ({killed:?}); attempted {}, acknowledged {}, failed/unknown {}, present on every node {}",
        killed.len(),
        all.attempted.len(),
        all.acked.len(),
        all.unknown.len(),
        present_counts[0]
    );
    println!("failed/unknown writes by error: {:?}", all.errors);
    assert!(killed.len() >= LEADER_KILLS);
    assert!(!all.acked.is_empty());
}

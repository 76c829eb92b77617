//! Quorum loss: with 2 of 3 nodes killed a write fails with a clear error
//! within a bounded time and is not acknowledged; once the nodes return,
//! writes succeed again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use switchyard_proto::pb;
use switchyard_tests::{Cluster, Options};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// Generous bound on how long a refused write may take (`--write-timeout`
/// is 2 s; the bound only guards against hanging).
const BOUND: Duration = Duration::from_secs(20);

fn put(name: &str) -> pb::PutPopRequest {
    pb::PutPopRequest {
        pop: Some(pb::Pop {
            name: name.into(),
            ..Default::default()
        }),
        create_only: true,
    }
}

/// A write through `node` must fail, clearly and in bounded time.
async fn write_refused(c: &Cluster, node: u64, name: &str) -> tonic::Status {
    let start = Instant::now();
    let r = tokio::time::timeout(BOUND, c.admin_client(node).unwrap().put_pop(put(name)))
        .await
        .unwrap_or_else(|_| panic!("write through node {node} still pending after {BOUND:?}"));
    let s = match r {
        Ok(_) => panic!("write {name} through node {node} was acknowledged without a quorum"),
        Err(s) => s,
    };
    println!(
        "write via node {node} without quorum refused after {:?}: {:?}: {}",
        start.elapsed(),
        s.code(),
        s.message()
    );
    assert!(
        matches!(
            s.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
        ),
        "unexpected code: {s}"
    );
    assert!(
        s.message().to_lowercase().contains("not acknowledged"),
        "error does not say the write was not acknowledged: {:?}",
        s.message()
    );
    assert!(
        s.message().contains("hub node"),
        "error names no node: {:?}",
        s.message()
    );
    s
}

async fn write_ok(c: &Cluster, node: u64, name: &str) {
    c.admin_client(node)
        .unwrap()
        .put_pop(put(name))
        .await
        .unwrap_or_else(|s| panic!("write {name} via node {node} after recovery: {s}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_clearly_without_quorum_and_recover() {
    let opts = Options {
        hub_args: vec!["--write-timeout".into(), "2s".into()],
        ..Default::default()
    };
    let mut c = Cluster::start_with(bin(), 3, opts).await.unwrap();
    write_ok(&c, 1, "before").await;

    // 1. The two followers die: the leader alone cannot commit.
    let leader = c.leader().await.unwrap();
    let followers: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
    for &f in &followers {
        c.kill(f).unwrap();
    }
    write_refused(&c, leader, "lonely-leader").await;
    // The CLI says so in one line and exits non-zero.
    let out = c.run_cli(["pop", "add", "via-cli"]).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("CLI without quorum: {}", err.trim());
    assert!(
        !out.status.success(),
        "CLI write acknowledged without quorum"
    );
    assert!(err.to_lowercase().contains("not acknowledged"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");

    for &f in &followers {
        c.restart(f).await.unwrap();
    }
    c.wait_all_ready().await.unwrap();
    for id in c.ids() {
        write_ok(&c, id, &format!("after-1-via-{id}")).await;
    }

    // 2. The leader and one follower die: the survivor has no leader.
    let leader = c.leader().await.unwrap();
    let other = c.ids().into_iter().find(|&i| i != leader).unwrap();
    let survivor = c
        .ids()
        .into_iter()
        .find(|&i| i != leader && i != other)
        .unwrap();
    c.kill(leader).unwrap();
    c.kill(other).unwrap();
    write_refused(&c, survivor, "lonely-follower").await;
    c.restart(leader).await.unwrap();
    c.restart(other).await.unwrap();
    c.wait_all_ready().await.unwrap();
    for id in c.ids() {
        write_ok(&c, id, &format!("after-2-via-{id}")).await;
    }

    // Everything acknowledged is there; the refused writes may or may not
    // have committed later (their outcome was unknown), never acknowledged.
    let pops = c
        .admin_client(survivor)
        .unwrap()
        .list_pops(pb::ListPopsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pops;
    let names: Vec<&str> = pops.iter().map(|p| p.name.as_str()).collect();
    for n in ["before", "after-1-via-1", "after-2-via-3"] {
        assert!(names.contains(&n), "missing {n}: {names:?}");
    }
    println!("after recovery: {names:?}");
}

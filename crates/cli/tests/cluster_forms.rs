//! 1-, 3- and 5-node hub clusters form from real `switchyard` processes; a
//! write through every node succeeds and every node reads all of them back
//! linearizably.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use switchyard_proto::pb;
use switchyard_tests::Cluster;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

async fn forms(n: usize) {
    let mut c = Cluster::start(bin(), n).await.unwrap();
    let leader = c.leader().await.unwrap();
    for id in c.ids() {
        let s = c.status(id).await.unwrap();
        assert_eq!(s.members.len(), n, "node {id} sees {:?}", s.members);
        assert!(
            s.members.iter().all(|m| m.voter),
            "node {id}: {:?}",
            s.members
        );
        assert_eq!(s.leader_id, leader, "node {id} names another leader");
    }
    // One write through every node (followers forward to the leader).
    let mut names = Vec::new();
    for id in c.ids() {
        let name = format!("via-{id}");
        let r = c
            .admin_client(id)
            .unwrap()
            .put_pop(pb::PutPopRequest {
                pop: Some(pb::Pop {
                    name: name.clone(),
                    labels: Some(pb::Labels {
                        region: "test".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                create_only: true,
            })
            .await
            .unwrap_or_else(|s| panic!("write through node {id}: {s}"))
            .into_inner();
        assert!(r.index > 0);
        names.push(name);
    }
    // Every node reads every write back (linearizable is the default).
    for id in c.ids() {
        let pops = c
            .admin_client(id)
            .unwrap()
            .list_pops(pb::ListPopsRequest::default())
            .await
            .unwrap_or_else(|s| panic!("read on node {id}: {s}"))
            .into_inner()
            .pops;
        let got: Vec<&str> = pops.iter().map(|p| p.name.as_str()).collect();
        for name in &names {
            assert!(
                got.contains(&name.as_str()),
                "node {id} misses {name}: {got:?}"
            );
        }
        let one = c
            .admin_client(id)
            .unwrap()
            .get_pop(pb::GetPopRequest {
                name: names[0].clone(),
                consistency: pb::ReadConsistency::Linearizable as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.labels.unwrap_or_default().region, "test");
    }
    println!(
        "{n}-node cluster formed (leader {leader}); {} writes read back on every node",
        names.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_cluster_forms() {
    forms(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_forms() {
    forms(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_node_cluster_forms() {
    forms(5).await;
}

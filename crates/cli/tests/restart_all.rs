//! Stop every node (SIGTERM), start them all again: POPs, policies and
//! tokens are intact, and the cluster takes writes again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use switchyard_proto::pb;
use switchyard_tests::Cluster;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn names(pops: &[pb::Pop]) -> Vec<String> {
    let mut v: Vec<String> = pops.iter().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_full_restart() {
    let mut c = Cluster::start(bin(), 3).await.unwrap();
    // State through the CLI, as an operator makes it.
    for args in [
        vec!["pop", "add", "north-1", "--region", "north", "--zone", "n1"],
        vec![
            "pop",
            "add",
            "south-1",
            "--region",
            "south",
            "--label",
            "tier=gold",
        ],
        vec!["pop", "add", "gone-1", "--region", "east"],
        vec!["pop", "remove", "gone-1"],
        vec![
            "policy",
            "set",
            "shop/web",
            "--mode",
            "failover",
            "--failover",
            "north-1,south-1",
        ],
        vec!["policy", "set", "shop/api", "--min-healthy", "0.5"],
        vec!["token", "create", "--pop", "west-1", "--region", "west"],
    ] {
        c.run_cli_ok(&args).await.unwrap();
    }
    let admin = c.admin_client(2).unwrap();
    let before_pops = admin
        .clone()
        .list_pops(pb::ListPopsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pops;
    let before_policies = admin
        .clone()
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .policies;
    let before_tokens = admin
        .clone()
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(names(&before_pops), ["north-1", "south-1"]);
    assert_eq!(before_policies.len(), 2);
    // Two hub join tokens (nodes 2 and 3, used) and the POP token.
    assert_eq!(before_tokens.len(), 3);

    for id in c.ids() {
        c.stop(id).await.unwrap();
    }
    assert!(c.running().is_empty());
    for id in c.ids() {
        c.restart(id).await.unwrap();
    }
    c.wait_all_ready().await.unwrap();

    for id in c.ids() {
        let a = c.admin_client(id).unwrap();
        let pops = a
            .clone()
            .list_pops(pb::ListPopsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .pops;
        assert_eq!(pops, before_pops, "node {id}: POPs changed");
        let policies = a
            .clone()
            .list_policies(pb::ListPoliciesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .policies;
        assert_eq!(policies, before_policies, "node {id}: policies changed");
        let tokens = a
            .clone()
            .list_tokens(pb::ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tokens;
        assert_eq!(tokens, before_tokens, "node {id}: tokens changed");
        let s = c.status(id).await.unwrap();
        assert_eq!(s.members.len(), 3, "node {id}: {:?}", s.members);
        assert!(s.members.iter().all(|m| m.voter));
    }
    // The CLI agrees and the cluster takes writes.
    let stdout = c
        .run_cli_ok(["policy", "get", "shop/web", "-o", "json"])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(v["mode"], "POLICY_MODE_FAILOVER");
    assert_eq!(v["failover"], serde_json::json!(["north-1", "south-1"]));
    c.run_cli_ok(["pop", "add", "after-restart"]).await.unwrap();
    println!(
        "after stopping and starting all 3 nodes: {} POPs, {} policies, {} tokens intact",
        before_pops.len(),
        before_policies.len(),
        before_tokens.len()
    );
}

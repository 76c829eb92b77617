//! Join tokens are single use: 50 concurrent consumers of one POP join token,
//! spread over the 3 nodes, see exactly one winner; everyone else, a replay
//! and an expired token get a clear "permission denied".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, sync::Arc, time::Duration};

use switchyard_hub::server::ALPN_H2;
use switchyard_pki::JoinToken;
use switchyard_proto::pb::{self, admin_client::AdminClient};
use switchyard_tests::Cluster;
use tokio::sync::Barrier;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

const CONSUMERS: usize = 50;

async fn create_token(c: &Cluster, pop: &str, ttl_ms: u64) -> String {
    c.admin_client(1)
        .unwrap()
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Pop as i32,
            pop: pop.into(),
            labels: Some(pb::Labels {
                region: "north".into(),
                ..Default::default()
            }),
            ttl_ms,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// A client as a joining POP has it: no certificate, the CA pinned from the
/// token.
fn joining_client(c: &Cluster, node: u64, token: &str) -> AdminClient<tonic::transport::Channel> {
    let parsed = JoinToken::parse(token).unwrap();
    let tls =
        switchyard_pki::ca_pinned_client_config(&parsed.ca_fingerprint(), vec![ALPN_H2.to_vec()])
            .unwrap();
    AdminClient::new(c.channel(node, tls).unwrap())
}

async fn consume(
    c: &Cluster,
    node: u64,
    token: &str,
    who: &str,
) -> Result<pb::CommandResult, tonic::Status> {
    joining_client(c, node, token)
        .consume_token(pb::ConsumeTokenRequest {
            token: token.into(),
            consumer: who.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_has_exactly_one_winner() {
    let c = Cluster::start(bin(), 3).await.unwrap();
    let token = create_token(&c, "edge-1", 600_000).await;

    // Connections first, then all consumers at once.
    let barrier = Arc::new(Barrier::new(CONSUMERS));
    let mut tasks = Vec::new();
    for k in 0..CONSUMERS {
        let node = (k % 3) as u64 + 1;
        let mut client = joining_client(&c, node, &token);
        let barrier = barrier.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            // Establish TLS before the race (a cheap call).
            client.federation(pb::Empty {}).await.unwrap();
            barrier.wait().await;
            let r = client
                .consume_token(pb::ConsumeTokenRequest {
                    token,
                    consumer: format!("consumer-{k}"),
                })
                .await;
            (k, node, r)
        }));
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    let mut losers_by_node = [0usize; 3];
    for t in tasks {
        let (k, node, r) = t.await.unwrap();
        match r {
            Ok(_) => winners.push((k, node)),
            Err(s) => {
                assert_eq!(
                    s.code(),
                    tonic::Code::PermissionDenied,
                    "consumer {k} via node {node}: {s}"
                );
                assert!(
                    s.message().contains("already used"),
                    "consumer {k} via node {node}: unclear error {:?}",
                    s.message()
                );
                losers += 1;
                losers_by_node[node as usize - 1] += 1;
            }
        }
    }
    println!(
        "{CONSUMERS} consumers: winners {winners:?}, refused {losers} (per node {losers_by_node:?})"
    );
    assert_eq!(
        winners.len(),
        1,
        "exactly one consumer must win: {winners:?}"
    );
    assert_eq!(losers, CONSUMERS - 1);

    // Every node agrees on who won.
    let winner = format!("consumer-{}", winners[0].0);
    for id in c.ids() {
        let tokens = c
            .admin_client(id)
            .unwrap()
            .list_tokens(pb::ListTokensRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tokens;
        let t = tokens
            .iter()
            .find(|t| t.kind == pb::TokenKind::Pop as i32)
            .expect("the POP token is listed");
        assert!(t.consumed, "node {id}: token not marked used");
        assert_eq!(t.consumed_by, winner, "node {id}");
    }

    // A replay, later and on another node, is refused.
    for id in c.ids() {
        let s = consume(&c, id, &token, "replayer").await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s}");
        assert!(s.message().contains("already used"), "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_forged_tokens_are_refused() {
    let c = Cluster::start(bin(), 3).await.unwrap();
    let token = create_token(&c, "edge-2", 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = consume(&c, 2, &token, "late").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s}");
    assert!(s.message().contains("expired"), "unclear error: {s}");

    // Right id, wrong secret.
    let good = create_token(&c, "edge-3", 600_000).await;
    let (id_part, secret) = good.rsplit_once('.').unwrap();
    let flipped: String = secret
        .chars()
        .map(|ch| if ch == 'a' { 'b' } else { 'a' })
        .collect();
    let forged = format!("{id_part}.{flipped}");
    let s = consume(&c, 3, &forged, "forger").await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s}");
    assert!(s.message().contains("does not match"), "unclear error: {s}");
    // The forgery did not burn the real token.
    consume(&c, 1, &good, "owner").await.unwrap();

    // Garbage is refused as such.
    let s = consume(&c, 1, &good, "x").await.unwrap_err();
    assert!(s.message().contains("already used"), "{s}");
    let s = joining_client(&c, 1, &good)
        .consume_token(pb::ConsumeTokenRequest {
            token: "not-a-token".into(),
            consumer: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}");
}

//! A 3-node cluster over real tonic gRPC on 127.0.0.1 (plain HTTP/2), each
//! node with its own redb file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::pb;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use super::*;
use crate::state::State;
use crate::store::RedbBackend;

/// Upper bound for any single wait, so a broken build fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

struct TestNode {
    id: NodeId,
    addr: SocketAddr,
    path: PathBuf,
    hub: Option<HubRaft>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

fn test_config() -> Config {
    Config {
        cluster_name: "test".into(),
        // Generous: a loaded 2-core CI machine must not see spurious
        // elections, which would move leadership mid-test.
        heartbeat_interval: 100,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        ..Default::default()
    }
    .validate()
    .unwrap()
}

async fn open_backend(path: &Path) -> Arc<dyn Backend> {
    // The previous incarnation's file handle closes once its last storage
    // task is gone; until then redb refuses a second open.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match RedbBackend::open(path) {
            Ok(b) => return Arc::new(b),
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen {}: {e}", path.display()),
        }
    }
}

impl TestNode {
    async fn new(id: NodeId, dir: &Path) -> Self {
        // Port 0 picks the address; the node rebinds it on every start.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut n = TestNode {
            id,
            addr,
            path: dir.join(format!("node{id}.redb")),
            hub: None,
            server: None,
        };
        n.start().await;
        n
    }

    async fn start(&mut self) {
        let backend = open_backend(&self.path).await;
        let hub = start(
            self.id,
            test_config(),
            backend,
            Arc::new(PlainChannelFactory::default()),
        )
        .await
        .unwrap();
        // A stopped node must not hold its socket: the kernel would queue
        // the leader's requests and deliver them, stale, after a restart.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        let incoming = TcpListenerStream::new(socket.listen(1024).unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let svc = RaftService::new(hub.raft.clone()).into_server();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        self.hub = Some(hub);
        self.server = Some((tx, server));
    }

    async fn stop(&mut self) {
        // Raft first: its end closes the replication streams the server
        // would otherwise wait for.
        if let Some(hub) = self.hub.take() {
            hub.raft.shutdown().await.unwrap();
        }
        if let Some((tx, h)) = self.server.take() {
            let _ = tx.send(());
            let _ = h.await;
        }
    }

    fn hub(&self) -> &HubRaft {
        self.hub.as_ref().unwrap()
    }

    fn node(&self) -> HubNode {
        HubNode::new(self.addr.to_string())
    }

    async fn client(&self) -> pb::raft_client::RaftClient<tonic::transport::Channel> {
        let ch = PlainChannelFactory::default()
            .channel(&self.addr.to_string(), Default::default())
            .unwrap();
        network::raft_client(ch)
    }

    async fn wait_applied(&self, index: u64) {
        let mut rx = self.hub().state_machine.applied_index();
        tokio::time::timeout(PATIENCE, rx.wait_for(|i| *i >= index))
            .await
            .expect("node did not catch up")
            .unwrap();
    }

    fn state(&self) -> State {
        self.hub().state_machine.read(State::clone)
    }
}

/// Waits until every running node knows the same leader.
async fn wait_leader(nodes: &[TestNode]) -> NodeId {
    let m = nodes[0]
        .hub()
        .raft
        .wait(Some(PATIENCE))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    let leader = m.current_leader.unwrap();
    for n in nodes.iter().filter(|n| n.hub.is_some()) {
        n.hub()
            .raft
            .wait(Some(PATIENCE))
            .current_leader(leader, "same leader")
            .await
            .unwrap();
    }
    leader
}

fn revoke(subject: &str) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::AddRevocation(pb::AddRevocation {
            revocation: Some(pb::Revocation {
                subject: subject.into(),
                ..Default::default()
            }),
        })),
    }
}

fn init_federation() -> pb::Command {
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

/// Proposes through gRPC, following "not leader" redirects like a hub node would.
async fn propose(nodes: &[TestNode], mut to: usize, cmd: pb::Command) -> pb::CommandResult {
    for _ in 0..50 {
        let mut c = nodes[to].client().await;
        match c
            .propose(pb::ProposeRequest {
                command: Some(cmd.clone()),
            })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
                let Some((leader, addr)) = service::leader_from_status(&s) else {
                    // No leader known yet (election in progress): ask again.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                to = nodes.iter().position(|n| n.id == leader).unwrap();
                assert_eq!(addr.as_deref(), Some(nodes[to].addr.to_string().as_str()));
            }
        }
    }
    panic!("no leader accepted the proposal");
}

/// A 3-node cluster formed under `dir`, and its leader's id.
async fn three_nodes(dir: &Path) -> (Vec<TestNode>, NodeId) {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(TestNode::new(id, dir).await);
    }
    let members: BTreeMap<NodeId, HubNode> = nodes.iter().map(|n| (n.id, n.node())).collect();
    nodes[0].hub().raft.initialize(members).await.unwrap();
    let leader = wait_leader(&nodes).await;
    (nodes, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_a_restarted_node_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, leader) = three_nodes(dir.path()).await;
    let follower = nodes.iter().position(|n| n.id != leader).unwrap();

    // Sent to a follower on purpose: it must redirect to the leader.
    let r = propose(&nodes, follower, init_federation()).await;
    assert_eq!(r.error, pb::ErrorCode::None as i32);
    let mut last = r.index;
    for i in 0..20 {
        let r = propose(&nodes, follower, revoke(&format!("cert-{i}"))).await;
        assert_eq!(r.error, pb::ErrorCode::None as i32, "{r:?}");
        assert!(r.index > last);
        last = r.index;
    }

    for n in &nodes {
        n.wait_applied(last).await;
    }
    let expected = nodes[0].state();
    assert_eq!(expected.revocations.len(), 20);
    for n in &nodes {
        assert_eq!(n.state(), expected, "node {} diverged", n.id);
    }

    // ReadIndex on the leader covers every acknowledged write; followers refuse.
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    let ri = nodes[li]
        .client()
        .await
        .read_index(pb::ReadIndexRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(ri.index >= last);
    let err = nodes[follower]
        .client()
        .await
        .read_index(pb::ReadIndexRequest {})
        .await
        .unwrap_err();
    assert_eq!(service::leader_from_status(&err).map(|l| l.0), Some(leader));

    // Restart a follower from its redb file while the others keep writing.
    let restarted = nodes.iter().position(|n| n.id != leader).unwrap();
    nodes[restarted].stop().await;
    let r = propose(&nodes, li, revoke("while-down")).await;
    assert_eq!(r.error, pb::ErrorCode::None as i32);
    last = r.index;
    nodes[restarted].start().await;
    nodes[restarted].wait_applied(last).await;
    nodes[li].wait_applied(last).await;
    assert_eq!(nodes[restarted].state(), nodes[li].state());
    assert!(nodes[restarted]
        .state()
        .revocations
        .keys()
        .any(|(_, s)| s == "while-down"));

    // Whole-cluster restart: every node comes back with the same state from
    // disk alone, elects a leader and accepts writes again.
    let before = nodes[li].state();
    for n in nodes.iter_mut() {
        n.stop().await;
    }
    for n in nodes.iter_mut() {
        n.start().await;
    }
    let leader = wait_leader(&nodes).await;
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    let r = propose(&nodes, li, revoke("after-restart")).await;
    assert_eq!(r.error, pb::ErrorCode::None as i32);
    for n in &nodes {
        n.wait_applied(r.index).await;
        let s = n.state();
        assert_eq!(s.revocations.len(), before.revocations.len() + 1);
        assert_eq!(s.federation, before.federation);
    }
    let voters: BTreeSet<NodeId> = nodes[li].hub().raft.voter_ids().collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));

    for n in nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_through_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, leader) = three_nodes(dir.path()).await;
    let li = nodes.iter().position(|n| n.id == leader).unwrap();
    let down = nodes.iter().position(|n| n.id != leader).unwrap();
    nodes[down].stop().await;

    let mut last = propose(&nodes, li, init_federation()).await.index;
    for i in 0..10 {
        last = propose(&nodes, li, revoke(&format!("s{i}"))).await.index;
    }
    // Snapshot and drop the log on every running node, so the only way for
    // the stopped node to catch up is an InstallSnapshot over gRPC, whoever
    // leads by then (a loaded machine may move leadership mid-test).
    for (i, n) in nodes.iter().enumerate() {
        if i == down {
            continue;
        }
        let raft = &n.hub().raft;
        raft.wait(Some(PATIENCE))
            .metrics(
                |m| m.last_applied.is_some_and(|a| a.index >= last),
                "applied",
            )
            .await
            .unwrap();
        raft.trigger().snapshot().await.unwrap();
        raft.wait(Some(PATIENCE))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= last), "snapshot")
            .await
            .unwrap();
        raft.trigger().purge_log(last).await.unwrap();
        raft.wait(Some(PATIENCE))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "purged")
            .await
            .unwrap();
    }

    nodes[down].start().await;
    nodes[down].wait_applied(last).await;
    assert_eq!(nodes[down].state(), nodes[li].state());
    // The log up to `last` is gone everywhere, so the node can only have
    // caught up through a snapshot; openraft reports it once installed.
    nodes[down]
        .hub()
        .raft
        .wait(Some(PATIENCE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot installed",
        )
        .await
        .unwrap();

    for n in nodes.iter_mut() {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_append_stream_ends_that_stream_only() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, leader) = three_nodes(dir.path()).await;
    let follower = nodes.iter().position(|n| n.id != leader).unwrap();

    // A request without a vote does not decode: the stream ends with
    // INVALID_ARGUMENT naming the field.
    let bad = futures::stream::iter(vec![pb::AppendEntriesRequest::default()]);
    let mut replies = nodes[follower]
        .client()
        .await
        .stream_append(bad)
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(PATIENCE, replies.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("vote"), "{status:?}");

    // Replication through the same node goes on.
    let r = propose(&nodes, follower, init_federation()).await;
    assert_eq!(r.error, pb::ErrorCode::None as i32);
    for n in &nodes {
        n.wait_applied(r.index).await;
    }
}

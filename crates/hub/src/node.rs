//! The narrow API the rest of the hub uses over Raft: propose a command,
//! read linearizably, change membership. Followers forward writes and ask
//! the leader for a read index, so any node serves any request.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use openraft::{async_runtime::watch::WatchReceiver, ChangeMembers, ReadPolicy};
use switchyard_proto::pb::{self, raft_client::RaftClient};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::{
    metrics,
    raft::types::{HubNode, NodeId, Raft, RaftCommand},
    server::channel::tls_channel,
    sessions::SessionBook,
    state::State,
};

/// How a read is ordered against writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Sees every write acknowledged before the read started.
    Linearizable,
    /// This node's applied state, possibly behind the leader.
    Local,
}

impl From<i32> for Consistency {
    fn from(v: i32) -> Self {
        match pb::ReadConsistency::try_from(v) {
            Ok(pb::ReadConsistency::Local) => Consistency::Local,
            _ => Consistency::Linearizable,
        }
    }
}

/// Why a hub operation failed. Messages say what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No leader is known: an election is running or quorum is lost.
    #[error("hub node {node}: no leader after {waited:?}; a majority of hub nodes may be down or unreachable (check `switchyard hub members list`)")]
    NoLeader {
        /// This node.
        node: NodeId,
        /// How long we waited for one.
        waited: Duration,
    },
    /// The operation did not finish in time; a write may or may not commit
    /// later, but it was not acknowledged.
    #[error("hub node {node}: {what} not committed within {after:?}; the leader may have lost its majority. The write was NOT acknowledged; retry when the cluster is healthy")]
    Timeout {
        /// This node.
        node: NodeId,
        /// What timed out.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// Forwarding to the leader failed.
    #[error("hub node {node}: forwarding to leader {leader} at {addr} failed: {message}")]
    Forward {
        /// This node.
        node: NodeId,
        /// The leader.
        leader: NodeId,
        /// Its address.
        addr: String,
        /// The transport's words.
        message: String,
    },
    /// openraft refused or failed.
    #[error("hub node {node}: raft: {message}")]
    Raft {
        /// This node.
        node: NodeId,
        /// openraft's words.
        message: String,
    },
}

impl From<HubError> for tonic::Status {
    fn from(e: HubError) -> Self {
        match &e {
            HubError::NoLeader { .. } | HubError::Forward { .. } => {
                tonic::Status::unavailable(e.to_string())
            }
            HubError::Timeout { .. } => tonic::Status::deadline_exceeded(e.to_string()),
            HubError::Raft { .. } => tonic::Status::internal(e.to_string()),
        }
    }
}

/// Timings of the hub's client-facing operations.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Longest a write waits for commit before it is reported failed (not
    /// acknowledged).
    pub write: Duration,
    /// Longest a linearizable read waits for the leader and local apply.
    pub read: Duration,
    /// Longest an operation waits for a leader to be elected.
    pub leader: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            write: Duration::from_secs(5),
            read: Duration::from_secs(5),
            leader: Duration::from_secs(3),
        }
    }
}

/// A running hub node's Raft with its state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    state: Arc<RwLock<State>>,
    applied: watch::Receiver<u64>,
    peer_tls: Arc<rustls::ClientConfig>,
    peers: Mutex<BTreeMap<String, Channel>>,
    timeouts: Timeouts,
    sessions: SessionBook,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("id", &self.inner.id).finish()
    }
}

impl Hub {
    /// Wraps a started Raft node. `peer_tls` dials other hub nodes with this
    /// node's hub identity.
    pub fn new(
        id: NodeId,
        raft: Raft,
        state: Arc<RwLock<State>>,
        applied: watch::Receiver<u64>,
        peer_tls: Arc<rustls::ClientConfig>,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                raft,
                state,
                applied,
                peer_tls,
                peers: Mutex::new(BTreeMap::new()),
                timeouts,
                sessions: SessionBook::default(),
            }),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The Raft handle (metrics, membership).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The state machine's applied-index watch: changes after every applied
    /// entry (the uplink pushes views from it).
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// Reads the applied state without any ordering guarantee.
    pub fn local<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.inner.state.read() {
            Ok(s) => f(&s),
            // A panic while holding the lock left the state as it was
            // before the panicking apply; reading it is still sound.
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The uplink sessions this node holds.
    pub fn sessions(&self) -> &SessionBook {
        &self.inner.sessions
    }

    /// A channel to another hub node.
    pub fn peer_channel(&self, addr: &str) -> Result<Channel, HubError> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = peers.get(addr) {
            return Ok(ch.clone());
        }
        let ch = tls_channel(addr, self.inner.peer_tls.clone()).map_err(|e| HubError::Forward {
            node: self.inner.id,
            leader: 0,
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
        peers.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The current leader and its address, waiting up to the leader timeout
    /// for one to be elected.
    pub async fn leader(&self) -> Result<(NodeId, String), HubError> {
        let start = Instant::now();
        let mut rx = self.inner.raft.metrics();
        loop {
            {
                let m = rx.borrow_watched();
                if let Some(l) = m.current_leader {
                    if let Some(node) = m.membership_config.membership().get_node(&l) {
                        return Ok((l, node.addr.clone()));
                    }
                }
            }
            let left = self.inner.timeouts.leader.saturating_sub(start.elapsed());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return Err(HubError::NoLeader {
                    node: self.inner.id,
                    waited: self.inner.timeouts.leader,
                });
            }
        }
    }

    /// Commits `cmd` through Raft and returns its result once applied on
    /// the leader. Forwards to the leader when this node is not it.
    /// Acknowledged (Ok) only after a majority made it durable.
    pub async fn propose(&self, cmd: pb::Command) -> Result<pb::CommandResult, HubError> {
        let start = Instant::now();
        let deadline = self.inner.timeouts.write;
        let out = tokio::time::timeout(deadline, self.propose_inner(cmd)).await;
        let out = match out {
            Ok(r) => r,
            Err(_) => Err(HubError::Timeout {
                node: self.inner.id,
                what: "write",
                after: deadline,
            }),
        };
        let outcome = match &out {
            Ok(_) => "committed",
            Err(HubError::Timeout { .. }) => "timeout",
            Err(HubError::NoLeader { .. }) => "no_leader",
            Err(_) => "failed",
        };
        metrics::counter_proposal(outcome);
        if out.is_ok() {
            ::metrics::histogram!(metrics::COMMIT_LATENCY).record(start.elapsed().as_secs_f64());
        }
        // Tell the client its write was not acknowledged, not only that no
        // leader is known or the leader was unreachable (an earlier attempt
        // may have reached a leader that then lost its majority).
        out.map_err(|e| match e {
            HubError::NoLeader { node, waited } => HubError::Timeout {
                node,
                what: "write (no leader)",
                after: waited,
            },
            HubError::Forward {
                node,
                leader,
                addr,
                message,
            } => HubError::Forward {
                node,
                leader,
                addr,
                message: format!(
                    "{message}. The write was NOT acknowledged; retry when the cluster is healthy"
                ),
            },
            e => e,
        })
    }

    async fn propose_inner(&self, cmd: pb::Command) -> Result<pb::CommandResult, HubError> {
        // Leadership can move while we forward: retry on a "not leader"
        // answer, each time against the newest leader. A leader that lost
        // its majority steps down and answers "forward to: none" until an
        // election ends, so retry until `propose`'s write deadline rather
        // than a fixed number of times (which failed such writes at once
        // with an unclear internal error).
        loop {
            let (leader, addr) = self.leader().await?;
            if leader == self.inner.id {
                match self.inner.raft.client_write(RaftCommand(cmd.clone())).await {
                    Ok(resp) => return Ok(resp.data),
                    Err(e) => {
                        if e.forward_to_leader().is_some() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        return Err(self.raft_err(e));
                    }
                }
            }
            let mut client = RaftClient::new(self.peer_channel(&addr)?);
            match client
                .propose(pb::ProposeRequest {
                    command: Some(cmd.clone()),
                })
                .await
            {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(self.forward_err(leader, &addr, s.message())),
            }
        }
    }

    /// Runs `f` on the state once it reflects every write acknowledged
    /// before this call (for `Linearizable`), on any node.
    pub async fn read<T>(
        &self,
        consistency: Consistency,
        f: impl FnOnce(&State) -> T,
    ) -> Result<T, HubError> {
        if consistency == Consistency::Linearizable {
            let deadline = self.inner.timeouts.read;
            match tokio::time::timeout(deadline, self.wait_linearizable()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(HubError::Timeout {
                        node: self.inner.id,
                        what: "linearizable read",
                        after: deadline,
                    })
                }
            }
        }
        Ok(self.local(f))
    }

    /// The leader's read index: the log index the state must reach before a
    /// read is linearizable. Only valid on the leader.
    pub async fn read_index_as_leader(&self) -> Result<u64, HubError> {
        let read = self
            .inner
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| self.raft_err(e))?;
        Ok(read.log_id().index())
    }

    async fn wait_linearizable(&self) -> Result<(), HubError> {
        let (leader, addr) = self.leader().await?;
        let index = if leader == self.inner.id {
            self.read_index_as_leader().await?
        } else {
            let mut client = RaftClient::new(self.peer_channel(&addr)?);
            client
                .read_index(pb::ReadIndexRequest {})
                .await
                .map_err(|s| self.forward_err(leader, &addr, s.message()))?
                .into_inner()
                .index
        };
        let mut applied = self.inner.applied.clone();
        applied
            .wait_for(|a| *a >= index)
            .await
            .map_err(|_| HubError::Raft {
                node: self.inner.id,
                message: "state machine stopped".into(),
            })?;
        Ok(())
    }

    /// Adds `id` at `addr` as a learner, waits for it to catch up, then
    /// makes it a voter. Leader only; callers forward.
    pub async fn add_voter(&self, id: NodeId, addr: String) -> Result<u64, HubError> {
        self.inner
            .raft
            .add_learner(id, HubNode::new(addr), true)
            .await
            .map_err(|e| self.raft_err(e))?;
        let resp = self
            .inner
            .raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| self.raft_err(e))?;
        Ok(resp.log_id.index())
    }

    /// Removes `id` from the cluster entirely. Leader only; callers forward.
    pub async fn remove_member(&self, id: NodeId) -> Result<u64, HubError> {
        let is_voter = self.inner.raft.voter_ids().any(|v| v == id);
        let change = if is_voter {
            ChangeMembers::RemoveVoters([id].into())
        } else {
            ChangeMembers::RemoveNodes([id].into())
        };
        let resp = self
            .inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.raft_err(e))?;
        Ok(resp.log_id.index())
    }

    fn raft_err(&self, e: impl std::fmt::Display) -> HubError {
        HubError::Raft {
            node: self.inner.id,
            message: e.to_string(),
        }
    }

    fn forward_err(&self, leader: NodeId, addr: &str, message: &str) -> HubError {
        HubError::Forward {
            node: self.inner.id,
            leader,
            addr: addr.to_string(),
            message: message.to_string(),
        }
    }
}

//! Outgoing Raft RPCs over tonic.
//!
//! How a channel to a peer is built (plain HTTP/2 in tests, mTLS in
//! production) is behind [`ChannelFactory`]; this module caches one lazy
//! channel per peer address and maps transport failures to the openraft
//! errors that make replication back off. A peer that lets
//! [`ABORT_AFTER_TIMEOUTS`] calls in a row time out gets its connection
//! aborted (see [`crate::server::conn_abort`]): otherwise every retried
//! call would strand its request in the stuck connection.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, ReplicationClosed, Timeout, Unreachable};
use openraft::network::{stream_append_sequential, RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::RaftNetworkV2;
use switchyard_proto::pb::raft_client::RaftClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use super::convert::{self, ConvertError};
use super::stream_append::{self, OpenError};
use super::types::{
    AppendEntriesRequest, AppendEntriesResponse, HubNode, NodeId, RPCError, Snapshot,
    SnapshotResponse, StreamAppendResult, StreamingError, TypeConfig, Vote, VoteRequest,
    VoteResponse,
};
use crate::server::channel::dial;
use crate::server::conn_abort::ConnAbort;

/// Largest Raft message accepted or sent: a whole snapshot travels in one.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Building a channel to a peer failed before any I/O happened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer address does not form a valid URI.
    #[error("invalid peer address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as found in the membership.
        addr: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Any other setup failure (e.g. TLS configuration).
    #[error("channel setup for {addr:?}: {reason}")]
    Setup {
        /// The peer address.
        addr: String,
        /// Why setup failed.
        reason: String,
    },
}

/// Builds the gRPC channel to a peer hub node at `addr` (`host:port`).
///
/// Implementations should return a lazy channel (`Endpoint::connect_lazy`):
/// it is created once per peer and reused; connection failures surface on
/// each RPC, not here. Each connection's I/O must be wrapped with
/// [`ConnAbort::wrap`] of `abort`.
pub trait ChannelFactory: Send + Sync + 'static {
    /// The channel to `addr`, its connections ended by `abort`.
    fn channel(&self, addr: &str, abort: ConnAbort) -> Result<Channel, ChannelError>;
}

/// Plain-text HTTP/2 channels: for tests and local development only.
#[derive(Debug, Clone)]
pub struct PlainChannelFactory {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

impl Default for PlainChannelFactory {
    fn default() -> Self {
        PlainChannelFactory {
            connect_timeout: Duration::from_secs(1),
        }
    }
}

impl ChannelFactory for PlainChannelFactory {
    fn channel(&self, addr: &str, abort: ConnAbort) -> Result<Channel, ChannelError> {
        let ep = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
            ChannelError::InvalidAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            }
        })?;
        let target = addr.to_string();
        let timeout = self.connect_timeout;
        Ok(
            ep.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let (target, abort) = (target.clone(), abort.clone());
                async move {
                    let tcp = dial(target, timeout).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(abort.wrap(tcp)))
                }
            })),
        )
    }
}

/// What a channel to a peer carries.
#[derive(Clone, Copy)]
enum ChannelUse {
    /// Votes, heartbeats and appends.
    Raft,
    /// Whole snapshots.
    Snapshot,
}

/// Consecutive timed-out calls after which a peer's connection is aborted:
/// three RPC deadlines (one heartbeat interval each) without any answer,
/// which is still less than the election timeout.
pub const ABORT_AFTER_TIMEOUTS: u32 = 3;

/// A peer's channel and what ends its connections.
#[derive(Clone)]
struct PeerChannel {
    channel: Channel,
    stalls: Arc<Stalls>,
}

/// Counts a peer's timed-out calls in a row on one connection and aborts
/// the connection at `limit`.
#[derive(Debug)]
struct Stalls {
    /// The peer's address, for the log.
    addr: String,
    /// [`ABORT_AFTER_TIMEOUTS`] for heartbeats and appends; 1 for snapshots,
    /// whose deadline is long and whose request is the whole state.
    limit: u32,
    abort: ConnAbort,
    in_a_row: AtomicU32,
}

impl Default for Stalls {
    fn default() -> Self {
        Stalls {
            addr: String::new(),
            limit: ABORT_AFTER_TIMEOUTS,
            abort: ConnAbort::default(),
            in_a_row: AtomicU32::new(0),
        }
    }
}

impl Stalls {
    fn observe<T>(&self, res: &Result<T, CallError>) {
        match res {
            Ok(_) => self.in_a_row.store(0, Ordering::Relaxed),
            Err(e) => self.failed(e),
        }
    }

    fn failed(&self, e: &CallError) {
        // Other failures end the connection, which is redialled anyway.
        if !matches!(e, CallError::Timeout(_)) {
            return;
        }
        if self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= self.limit {
            self.in_a_row.store(0, Ordering::Relaxed);
            tracing::warn!(
                peer = %self.addr,
                "a peer hub node let {} call(s) in a row time out; \
                 aborting its connection and dialling again",
                self.limit
            );
            self.abort.abort();
        }
    }
}

/// openraft's network factory for the hub: one [`HubPeer`] per target.
#[derive(Clone)]
pub struct HubNetwork {
    id: NodeId,
    factory: Arc<dyn ChannelFactory>,
    channels: Arc<Mutex<HashMap<String, PeerChannel>>>,
}

impl std::fmt::Debug for HubNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubNetwork")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl HubNetwork {
    /// The network of node `id`, building channels with `factory`.
    pub fn new(id: NodeId, factory: Arc<dyn ChannelFactory>) -> Self {
        HubNetwork {
            id,
            factory,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The channel to `addr` for `use_`: snapshots travel on a connection of
    /// their own, so a long transfer neither delays heartbeats and appends
    /// (which would then time out and abort it) nor is cut by their aborts.
    fn peer_channel(&self, addr: &str, use_: ChannelUse) -> Result<PeerChannel, ChannelError> {
        let key = match use_ {
            ChannelUse::Raft => addr.to_string(),
            ChannelUse::Snapshot => format!("{addr} snapshot"),
        };
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let stalls = Arc::new(Stalls {
            addr: addr.to_string(),
            limit: match use_ {
                ChannelUse::Raft => ABORT_AFTER_TIMEOUTS,
                ChannelUse::Snapshot => 1,
            },
            ..Stalls::default()
        });
        let c = PeerChannel {
            channel: self.factory.channel(addr, stalls.abort.clone())?,
            stalls,
        };
        channels.insert(key, c.clone());
        Ok(c)
    }
}

/// A Raft gRPC client with the message size limits snapshots need.
pub fn raft_client(channel: Channel) -> RaftClient<Channel> {
    RaftClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

impl RaftNetworkFactory<TypeConfig> for HubNetwork {
    type Network = HubPeer;

    async fn new_client(&mut self, target: NodeId, node: &HubNode) -> HubPeer {
        let connect = |use_| match self.peer_channel(&node.addr, use_) {
            Ok(c) => (Ok(raft_client(c.channel)), c.stalls),
            Err(e) => (Err(e.to_string()), Arc::default()),
        };
        let (client, stalls) = connect(ChannelUse::Raft);
        let (snapshot_client, snapshot_stalls) = connect(ChannelUse::Snapshot);
        HubPeer {
            id: self.id,
            target,
            client,
            stalls,
            snapshot_client,
            snapshot_stalls,
            streaming: true,
        }
    }
}

/// Connection to one peer, as openraft's replication and election tasks use it.
pub struct HubPeer {
    id: NodeId,
    target: NodeId,
    // A setup failure is kept and reported as Unreachable on every call, so
    // openraft backs off instead of the node failing.
    client: Result<RaftClient<Channel>, String>,
    /// Timed-out calls in a row, shared by every client of the channel.
    stalls: Arc<Stalls>,
    /// The client and stalls of the snapshot connection.
    snapshot_client: Result<RaftClient<Channel>, String>,
    snapshot_stalls: Arc<Stalls>,
    /// Whether the target serves `StreamAppend`; cleared when it answers
    /// UNIMPLEMENTED (an older node), after which replication uses unary
    /// AppendEntries with it.
    streaming: bool,
}

impl std::fmt::Debug for HubPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPeer")
            .field("id", &self.id)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// A failed RPC, before it is shaped into the openraft error the caller needs.
#[derive(Debug)]
pub(super) enum CallError {
    Timeout(Duration),
    Unreachable(String),
    Network(String),
}

pub(super) fn status_error(s: &Status) -> CallError {
    match s.code() {
        // Connection refused/reset, TLS handshake failure, peer shutting down.
        Code::Unavailable => CallError::Unreachable(s.to_string()),
        Code::DeadlineExceeded => CallError::Network(format!("deadline exceeded: {s}")),
        _ => CallError::Network(s.to_string()),
    }
}

pub(super) fn decode_error(e: ConvertError) -> CallError {
    CallError::Network(format!("malformed response: {e}"))
}

/// One unary call on `client` within `ttl`, counted in `stalls`.
async fn call_on<T, F, Fut>(
    client: &Result<RaftClient<Channel>, String>,
    stalls: &Stalls,
    ttl: Duration,
    f: F,
) -> Result<T, CallError>
where
    F: FnOnce(RaftClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let client = match client {
        Ok(c) => c.clone(),
        Err(e) => return Err(CallError::Unreachable(e.clone())),
    };
    let res = match tokio::time::timeout(ttl, f(client)).await {
        Err(_) => Err(CallError::Timeout(ttl)),
        Ok(Err(status)) => Err(status_error(&status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    };
    stalls.observe(&res);
    res
}

fn rpc_error(id: NodeId, target: NodeId, action: RPCTypes, e: CallError) -> RPCError {
    match e {
        CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
            action,
            id,
            target,
            timeout,
        }),
        CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
        CallError::Network(m) => RPCError::Network(NetworkError::from_string(m)),
    }
}

impl HubPeer {
    async fn call<T, F, Fut>(&self, ttl: Duration, f: F) -> Result<T, CallError>
    where
        F: FnOnce(RaftClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        call_on(&self.client, &self.stalls, ttl, f).await
    }

    fn rpc_error(&self, action: RPCTypes, e: CallError) -> RPCError {
        rpc_error(self.id, self.target, action, e)
    }

    fn streaming_error(&self, e: CallError) -> StreamingError {
        match self.rpc_error(RPCTypes::InstallSnapshot, e) {
            RPCError::Timeout(t) => StreamingError::Timeout(t),
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
        }
    }

    async fn vote_rpc(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
        pre_vote: bool,
    ) -> Result<VoteResponse, RPCError> {
        let req = convert::vote_request_to_pb(&rpc);
        let res = self
            .call(option.hard_ttl(), |mut c| async move {
                if pre_vote {
                    c.pre_vote(req).await
                } else {
                    c.vote(req).await
                }
            })
            .await
            .and_then(|r| convert::vote_response_from_pb(r).map_err(decode_error));
        res.map_err(|e| self.rpc_error(RPCTypes::Vote, e))
    }
}

impl RaftNetworkV2<TypeConfig> for HubPeer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError> {
        let req = convert::append_request_to_pb(&rpc);
        let res = self
            .call(option.hard_ttl(), |mut c| async move {
                c.append_entries(req).await
            })
            .await
            .and_then(|r| convert::append_response_from_pb(r).map_err(decode_error));
        res.map_err(|e| self.rpc_error(RPCTypes::AppendEntries, e))
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult, RPCError>>, RPCError>>
    where
        S: Stream<Item = AppendEntriesRequest> + Send + Unpin + 'static,
    {
        if !self.streaming {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let client = match &self.client {
                Ok(c) => c.clone(),
                Err(e) => {
                    let e = CallError::Unreachable(e.clone());
                    return Err(self.rpc_error(RPCTypes::AppendEntries, e));
                }
            };
            let opened = stream_append::open(client, input, option.hard_ttl()).await;
            if let Err(OpenError::Call(e)) = &opened {
                self.stalls.failed(e);
            }
            match opened {
                Ok(replies) => {
                    let (id, target) = (self.id, self.target);
                    let stalls = self.stalls.clone();
                    let replies = replies.map(move |r| {
                        stalls.observe(&r);
                        r.map_err(|e| rpc_error(id, target, RPCTypes::AppendEntries, e))
                    });
                    Ok(Box::pin(replies) as BoxStream<'s, _>)
                }
                Err(OpenError::Unimplemented) => {
                    // This session's requests are lost with the call;
                    // openraft resends them in the next session, unary.
                    self.streaming = false;
                    let e = CallError::Network("the peer has no StreamAppend".into());
                    Err(self.rpc_error(RPCTypes::AppendEntries, e))
                }
                Err(OpenError::Call(e)) => Err(self.rpc_error(RPCTypes::AppendEntries, e)),
            }
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError> {
        self.vote_rpc(rpc, option, false).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError> {
        self.vote_rpc(rpc, option, true).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse, StreamingError> {
        // The snapshot travels whole in one message.
        let req = convert::install_snapshot_to_pb(&vote, snapshot);
        let call = call_on(
            &self.snapshot_client,
            &self.snapshot_stalls,
            option.hard_ttl(),
            |mut c| async move { c.install_snapshot(req).await },
        );
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = call => res,
        };
        match res.and_then(|r| convert::snapshot_response_from_pb(r).map_err(decode_error)) {
            Ok(r) => Ok(r),
            Err(e) => {
                // The request held the whole state, more than once while
                // encoded; a peer that does not take it gets it again, so
                // return the freed memory now rather than keep it.
                crate::store::release_free_heap_soon();
                Err(self.streaming_error(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_peer_without_stream_append_gets_unary_appends() {
        // A gRPC server with no services answers UNIMPLEMENTED to every
        // method, as a node from before StreamAppend does to that one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut net = HubNetwork::new(1, Arc::new(PlainChannelFactory::default()));
        let mut peer = net.new_client(2, &HubNode::new(addr.to_string())).await;
        assert!(peer.streaming);
        let option = RPCOption::new(Duration::from_secs(10));
        let failed = peer
            .stream_append(futures::stream::empty(), option)
            .await
            .is_err();
        assert!(failed, "an unserved StreamAppend must fail the session");
        assert!(!peer.streaming, "the next session must use unary appends");
    }

    /// A peer whose TCP is up but which never answers (hung, stopped): it
    /// reads and drops whatever comes. Reports each accepted connection,
    /// and each ended one.
    async fn silent_peer() -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        use tokio::io::AsyncReadExt;
        use tokio::sync::mpsc;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let (closed_tx, closed) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let _ = accepted_tx.send(());
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                    let _ = closed_tx.send(());
                });
            }
        });
        (addr, accepted, closed)
    }

    fn heartbeat() -> AppendEntriesRequest {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_gets_its_connection_aborted() {
        let (addr, mut accepted, mut closed) = silent_peer().await;
        let mut net = HubNetwork::new(1, Arc::new(PlainChannelFactory::default()));
        let mut peer = net.new_client(2, &HubNode::new(addr.to_string())).await;
        let request = heartbeat;
        let option = RPCOption::new(Duration::from_millis(100));
        for i in 1..=ABORT_AFTER_TIMEOUTS {
            let res = peer.append_entries(request(), option.clone()).await;
            assert!(
                matches!(res, Err(RPCError::Timeout(_))),
                "call {i}: {res:?}"
            );
            if i < ABORT_AFTER_TIMEOUTS {
                assert!(closed.try_recv().is_err(), "aborted after {i} timeouts");
            }
        }
        let patience = Duration::from_secs(10);
        tokio::time::timeout(patience, accepted.recv())
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(patience, closed.recv())
            .await
            .expect("the stuck connection was never aborted")
            .unwrap();

        // The next call dials a new connection.
        let res = peer.append_entries(request(), option).await;
        assert!(matches!(res, Err(RPCError::Timeout(_))), "{res:?}");
        tokio::time::timeout(patience, accepted.recv())
            .await
            .expect("no new connection after the abort")
            .unwrap();
        assert!(
            closed.try_recv().is_err(),
            "the new connection was aborted too"
        );
    }

    #[tokio::test]
    async fn a_snapshot_travels_on_its_own_connection_aborted_at_its_first_timeout() {
        let (addr, mut accepted, mut closed) = silent_peer().await;
        let patience = Duration::from_secs(10);
        let mut net = HubNetwork::new(1, Arc::new(PlainChannelFactory::default()));
        let mut peer = net.new_client(2, &HubNode::new(addr.to_string())).await;
        let short = RPCOption::new(Duration::from_millis(100));

        // One heartbeat times out: its connection stays (one of three).
        let res = peer.append_entries(heartbeat(), short.clone()).await;
        assert!(matches!(res, Err(RPCError::Timeout(_))), "{res:?}");
        tokio::time::timeout(patience, accepted.recv())
            .await
            .unwrap()
            .unwrap();

        let snapshot = Snapshot {
            meta: Default::default(),
            snapshot: vec![7; 4096],
        };
        let never = std::future::pending::<ReplicationClosed>();
        let res = peer
            .full_snapshot(Vote::new_committed(1, 1), snapshot, never, short)
            .await;
        assert!(matches!(res, Err(StreamingError::Timeout(_))), "{res:?}");
        tokio::time::timeout(patience, accepted.recv())
            .await
            .expect("the snapshot did not dial a connection of its own")
            .unwrap();
        tokio::time::timeout(patience, closed.recv())
            .await
            .expect("the snapshot's connection was not aborted at its timeout")
            .unwrap();
        // Only that one: the heartbeat connection is still up.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            closed.try_recv().is_err(),
            "the heartbeat connection was aborted too"
        );
    }
}

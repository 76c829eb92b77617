//! The incoming side of hub-to-hub Raft RPCs: a tonic service over a
//! [`Raft`] handle. Authorization (hub certificates only) is the caller's
//! job: wrap the server in an interceptor.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures::{Stream, StreamExt};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ReadPolicy;
use switchyard_proto::pb;
use switchyard_proto::pb::raft_server::RaftServer;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::network::MAX_MESSAGE_SIZE;
use super::types::{
    ClientWriteError, Fatal, ForwardToLeader, LinearizableReadError, NodeId, Raft, RaftCommand,
    RaftError,
};

/// Metadata key carrying the leader's node id on a "not leader" status.
pub const LEADER_ID_METADATA: &str = "x-switchyard-leader-id";
/// Metadata key carrying the leader's Raft address on a "not leader" status.
pub const LEADER_ADDR_METADATA: &str = "x-switchyard-leader-addr";

/// Serves `switchyard.v1.Raft` for one node.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    sessions: crate::sessions::SessionBook,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// A service over `raft`.
    pub fn new(raft: Raft) -> Self {
        RaftService {
            raft,
            sessions: crate::sessions::SessionBook::default(),
        }
    }

    /// Answers `LocalSessions` from `book` (the node's uplink sessions).
    pub fn with_sessions(mut self, book: crate::sessions::SessionBook) -> Self {
        self.sessions = book;
        self
    }

    /// The tonic server for this service, with message limits large enough
    /// for a whole snapshot.
    pub fn into_server(self) -> RaftServer<RaftService> {
        RaftServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

fn bad_request(e: convert::ConvertError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: &Fatal) -> Status {
    // Unavailable: the caller treats this node as unreachable and backs off.
    Status::unavailable(format!("raft node stopped: {e}"))
}

fn raft_error<E: std::error::Error>(e: RaftError<E>, api: impl FnOnce(E) -> Status) -> Status {
    match e {
        RaftError::APIError(e) => api(e),
        RaftError::Fatal(f) => fatal(&f),
    }
}

/// The status a non-leader answers with: `FailedPrecondition`, naming the
/// leader in the message and in [`LEADER_ID_METADATA`] / [`LEADER_ADDR_METADATA`].
pub fn not_leader_status(f: &ForwardToLeader) -> Status {
    let (id, addr) = (f.leader_id, f.leader_node.as_ref().map(|n| n.addr.as_str()));
    let msg = match (id, addr) {
        (Some(id), Some(addr)) => format!("not leader; leader is node {id} at {addr}"),
        (Some(id), None) => format!("not leader; leader is node {id}"),
        _ => "not leader; leader unknown".to_string(),
    };
    let mut s = Status::failed_precondition(msg);
    if let Some(id) = id {
        if let Ok(v) = MetadataValue::try_from(id.to_string()) {
            s.metadata_mut().insert(LEADER_ID_METADATA, v);
        }
    }
    if let Some(addr) = addr {
        if let Ok(v) = MetadataValue::try_from(addr) {
            s.metadata_mut().insert(LEADER_ADDR_METADATA, v);
        }
    }
    s
}

/// The leader named by a [`not_leader_status`]: `(node id, address)` when known.
pub fn leader_from_status(s: &Status) -> Option<(NodeId, Option<String>)> {
    if s.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let id = s
        .metadata()
        .get(LEADER_ID_METADATA)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let addr = s
        .metadata()
        .get(LEADER_ADDR_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Some((id, addr))
}

/// The replies of one `StreamAppend` call.
pub type StreamAppendReplies =
    Pin<Box<dyn Stream<Item = Result<pb::StreamAppendReply, Status>> + Send + 'static>>;

/// The requests of a `StreamAppend` call as openraft takes them. A request
/// that does not decode (or a broken stream) ends the input; the error is
/// kept in `failed` and becomes the call's final status, after the replies
/// to every request before it.
fn append_requests(
    inbound: Streaming<pb::AppendEntriesRequest>,
    failed: Arc<Mutex<Option<Status>>>,
) -> impl Stream<Item = super::types::AppendEntriesRequest> + Send + 'static {
    inbound
        .map(|r| r.and_then(|r| convert::append_request_from_pb(r).map_err(bad_request)))
        .scan(failed, |failed, r| {
            let next = match r {
                Ok(req) => Some(req),
                Err(status) => {
                    // Trailers pass the server's status counter by; count here.
                    let code = status.code() as i32;
                    if let Some(r) = crate::metrics::rejection_reason(code, status.message()) {
                        crate::metrics::rejected(r);
                    }
                    // A client that cancels the stream is not an error to report.
                    if status.code() != tonic::Code::Cancelled {
                        *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
                    }
                    None
                }
            };
            std::future::ready(next)
        })
}

/// Resolves once `raft` has shut down. Watches the server metrics, which
/// change with the role and vote only, not on every write.
async fn raft_stopped(raft: Raft) {
    let mut metrics = raft.server_metrics();
    loop {
        if metrics.borrow_watched().state == openraft::ServerState::Shutdown {
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    type StreamAppendStream = StreamAppendReplies;

    async fn stream_append(
        &self,
        request: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<StreamAppendReplies>, Status> {
        let failed = Arc::new(Mutex::new(None));
        // Both directions end with the node: openraft's reader task holds
        // the input, and an idle stream would otherwise outlive Raft and
        // hold a graceful server shutdown open.
        let input = append_requests(request.into_inner(), failed.clone())
            .take_until(Box::pin(raft_stopped(self.raft.clone())));
        let replies = self
            .raft
            .stream_append(input)
            .map(|r| match r {
                Ok(res) => Ok(convert::stream_append_to_pb(&res)),
                Err(f) => Err(fatal(&f)),
            })
            .take_until(Box::pin(raft_stopped(self.raft.clone())));
        // After the last reply: the input's error, if it ended on one.
        let tail = futures::stream::once(async move {
            failed.lock().unwrap_or_else(PoisonError::into_inner).take()
        })
        .filter_map(|e| std::future::ready(e.map(Err)));
        Ok(Response::new(Box::pin(replies.chain(tail))))
    }
    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = convert::vote_request_from_pb(request.into_inner()).map_err(bad_request)?;
        let resp = self
            .raft
            .vote(req)
            .await
            .map_err(|e| raft_error(e, |never| match never {}))?;
        Ok(Response::new(convert::vote_response_to_pb(&resp)))
    }

    async fn pre_vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = convert::vote_request_from_pb(request.into_inner()).map_err(bad_request)?;
        let resp = self
            .raft
            .pre_vote(req)
            .await
            .map_err(|e| raft_error(e, |never| match never {}))?;
        Ok(Response::new(convert::vote_response_to_pb(&resp)))
    }

    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let req = convert::append_request_from_pb(request.into_inner()).map_err(bad_request)?;
        let resp = self
            .raft
            .append_entries(req)
            .await
            .map_err(|e| raft_error(e, |never| match never {}))?;
        Ok(Response::new(convert::append_response_to_pb(&resp)))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let (vote, snapshot) =
            convert::install_snapshot_from_pb(request.into_inner()).map_err(bad_request)?;
        let resp = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| fatal(&e))?;
        Ok(Response::new(convert::snapshot_response_to_pb(&resp)))
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::CommandResult>, Status> {
        let command = request
            .into_inner()
            .command
            .ok_or_else(|| Status::invalid_argument("missing command"))?;
        let resp = self
            .raft
            .client_write(RaftCommand(command))
            .await
            .map_err(|e| {
                raft_error(e, |e| match e {
                    ClientWriteError::ForwardToLeader(f) => not_leader_status(&f),
                    // Leadership changed after the entry was appended: it may
                    // or may not commit, so the caller must not blindly retry.
                    ClientWriteError::LogEntryDiscarded(f) => Status::aborted(format!(
                        "leader changed; the write may or may not be applied (leader now {:?})",
                        f.leader_id
                    )),
                    other => Status::failed_precondition(other.to_string()),
                })
            })?;
        Ok(Response::new(resp.data))
    }

    async fn read_index(
        &self,
        _request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        // ReadIndex, not lease: confirms leadership with a quorum round trip,
        // which stays correct under clock drift between hub nodes.
        let linearizer = self
            .raft
            .get_read_linearizer(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| {
                raft_error(e, |e| match e {
                    LinearizableReadError::ForwardToLeader(f) => not_leader_status(&f),
                    LinearizableReadError::QuorumNotEnough(q) => Status::unavailable(q.to_string()),
                })
            })?;
        Ok(Response::new(pb::ReadIndexResponse {
            index: linearizer.read_log_id().index(),
        }))
    }

    async fn local_sessions(
        &self,
        _request: Request<pb::LocalSessionsRequest>,
    ) -> Result<Response<pb::LocalSessionsResponse>, Status> {
        Ok(Response::new(pb::LocalSessionsResponse {
            sessions: self.sessions.list(),
        }))
    }
}

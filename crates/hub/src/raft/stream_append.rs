//! Streamed replication, the leader's side: one `StreamAppend` gRPC stream
//! per follower and replication session carries every AppendEntries of the
//! session. Each message costs a DATA frame each way instead of a new
//! HTTP/2 stream with headers and trailers, which took 15% of the leader's
//! CPU per write.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use switchyard_proto::pb;
use switchyard_proto::pb::raft_client::RaftClient;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use super::convert;
use super::network::{decode_error, status_error, CallError};
use super::types::{AppendEntriesRequest, StreamAppendResult};

/// Requests in flight per stream. The protocol allows more, but a second
/// request in flight makes openraft cut the log into smaller requests, and
/// the follower then commits (and fsyncs) more often: with 2, writes/s at
/// 16 clients fell by 12% (`hub-vs-etcd`, docs/BENCHMARKS.md).
const DEPTH: usize = 1;

/// Why a stream could not be opened.
pub(super) enum OpenError {
    /// The follower does not serve `StreamAppend` (an older version): use
    /// unary AppendEntries with it.
    Unimplemented,
    /// Any other failure.
    Call(CallError),
}

/// When each request still waiting for its answer was sent, oldest first:
/// the answers come back in request order, so the oldest one bounds the
/// wait for the next answer.
struct InFlight {
    sent: Mutex<VecDeque<Instant>>,
    /// Wakes a reader that had nothing in flight.
    more: Notify,
    /// Free request slots: [`DEPTH`] minus the requests in flight.
    permits: Semaphore,
}

impl InFlight {
    fn new() -> Self {
        InFlight {
            sent: Mutex::default(),
            more: Notify::new(),
            permits: Semaphore::new(DEPTH),
        }
    }

    fn push(&self) {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Instant::now());
        self.more.notify_one();
    }

    fn oldest(&self) -> Option<Instant> {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .front()
            .copied()
    }

    /// Marks the oldest request answered; false if none was in flight.
    fn pop(&self) -> bool {
        let sent = self
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
            .is_some();
        if sent {
            self.permits.add_permits(1);
        }
        sent
    }
}

/// The answers of one stream, in request order.
struct Replies {
    inbound: Streaming<pb::StreamAppendReply>,
    in_flight: Arc<InFlight>,
    /// How long one request may wait for its answer.
    ttl: Duration,
}

impl Replies {
    async fn next(&mut self) -> Option<Result<StreamAppendResult, CallError>> {
        loop {
            let got = match self.in_flight.oldest() {
                Some(sent) => {
                    match tokio::time::timeout_at(sent + self.ttl, self.inbound.next()).await {
                        Ok(got) => got,
                        Err(_) => return Some(Err(CallError::Timeout(self.ttl))),
                    }
                }
                // Nothing in flight: an idle stream is no timeout.
                None => tokio::select! {
                    got = self.inbound.next() => got,
                    () = self.in_flight.more.notified() => continue,
                },
            };
            return match got {
                None => None,
                Some(Err(status)) => Some(Err(status_error(&status))),
                Some(Ok(reply)) => Some(if self.in_flight.pop() {
                    convert::stream_append_from_pb(reply).map_err(decode_error)
                } else {
                    Err(CallError::Network(
                        "StreamAppend answer without a request".into(),
                    ))
                }),
            };
        }
    }
}

/// Opens a `StreamAppend` call that sends `input` as openraft produces it,
/// and returns its answers. Each request may wait `ttl` for its answer;
/// the stream ends after the first error.
pub(super) async fn open<S>(
    mut client: RaftClient<Channel>,
    input: S,
    ttl: Duration,
) -> Result<impl Stream<Item = Result<StreamAppendResult, CallError>> + Send + 'static, OpenError>
where
    S: Stream<Item = AppendEntriesRequest> + Send + Unpin + 'static,
{
    let in_flight = Arc::new(InFlight::new());
    let sending = in_flight.clone();
    let requests = futures::stream::unfold((input, sending), |(mut input, sending)| async move {
        // Take the slot before asking openraft for the request: it sizes the
        // request when asked, so a request that waited would be smaller.
        sending.permits.acquire().await.ok()?.forget();
        let r = input.next().await?;
        sending.push();
        Some((convert::append_request_to_pb(&r), (input, sending)))
    });
    let inbound = match tokio::time::timeout(ttl, client.stream_append(requests)).await {
        Err(_) => return Err(OpenError::Call(CallError::Timeout(ttl))),
        Ok(Err(s)) if s.code() == Code::Unimplemented => return Err(OpenError::Unimplemented),
        Ok(Err(s)) => return Err(OpenError::Call(status_error(&s))),
        Ok(Ok(r)) => r.into_inner(),
    };
    let replies = Replies {
        inbound,
        in_flight,
        ttl,
    };
    Ok(futures::stream::unfold(Some(replies), |state| async move {
        let mut replies = state?;
        let item = replies.next().await?;
        // Stop after an error or a refusal: openraft starts a new session.
        let keep = matches!(item, Ok(Ok(_)));
        Some((item, keep.then_some(replies)))
    }))
}

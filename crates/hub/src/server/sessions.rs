//! Gathers every hub node's uplink sessions (see [`crate::sessions`]): the
//! last heartbeat of a POP is known only to the node holding it.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use switchyard_proto::pb;

use crate::{node::Hub, raft::network::raft_client, sessions};

/// How long a node may take to answer for its sessions: a dead node must
/// not make `pop list` or the status page hang.
pub const GATHER_TIMEOUT: Duration = Duration::from_millis(500);

/// Every node's sessions, merged, and the nodes that did not answer.
pub async fn gather(hub: &Hub, timeout: Duration) -> (Vec<pb::SessionInfo>, Vec<u64>) {
    let peers: Vec<(u64, String)> = {
        let m = hub.raft().metrics().borrow_watched().clone();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != hub.id())
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    };
    let asks = peers.into_iter().map(|(id, addr)| async move {
        let Ok(ch) = hub.peer_channel(&addr) else {
            return Err(id);
        };
        let mut client = raft_client(ch);
        let call = client.local_sessions(pb::LocalSessionsRequest {});
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(r)) => Ok(r.into_inner().sessions),
            _ => Err(id),
        }
    });
    let answers = futures::future::join_all(asks).await;
    let mut lists = vec![hub.sessions().list()];
    let mut unreachable = Vec::new();
    for a in answers {
        match a {
            Ok(l) => lists.push(l),
            Err(id) => unreachable.push(id),
        }
    }
    (sessions::merge(lists), unreachable)
}

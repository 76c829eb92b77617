//! The uplink sessions a hub node holds right now, for `pop list` and the
//! status page: agent version, address, last heartbeat. Runtime only: only
//! liveness *transitions* go through Raft, so the last heartbeat of a POP is
//! known only to the node holding its connection, and readers ask every
//! node (see `server::sessions`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use switchyard_proto::pb;

/// Live sessions of this node, by POP (the newest session each).
#[derive(Debug, Clone, Default)]
pub struct SessionBook {
    inner: Arc<Mutex<BTreeMap<String, pb::SessionInfo>>>,
}

impl SessionBook {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, pb::SessionInfo>) -> T) -> T {
        // A panic while holding the lock leaves a map that is still
        // consistent (every update is one insert or field store).
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A session started (after its Hello); it replaces an older session of
    /// the same POP.
    pub fn open(&self, info: pb::SessionInfo) {
        self.with(|m| m.insert(info.pop.clone(), info));
    }

    /// A heartbeat of `session` arrived at `now_ms` (wall clock).
    pub fn heartbeat(&self, pop: &str, session: &str, now_ms: i64) {
        self.with(|m| {
            if let Some(s) = m.get_mut(pop).filter(|s| s.session == session) {
                s.last_heartbeat_ms = now_ms;
            }
        });
    }

    /// The agent's address changed (connection migration).
    pub fn migrated(&self, pop: &str, session: &str, remote_addr: String) {
        self.with(|m| {
            if let Some(s) = m.get_mut(pop).filter(|s| s.session == session) {
                s.remote_addr = remote_addr;
            }
        });
    }

    /// `session` ended; a newer session of the POP stays.
    pub fn close(&self, pop: &str, session: &str) {
        self.with(|m| {
            if m.get(pop).is_some_and(|s| s.session == session) {
                m.remove(pop);
            }
        });
    }

    /// Every live session, sorted by POP.
    pub fn list(&self) -> Vec<pb::SessionInfo> {
        self.with(|m| m.values().cloned().collect())
    }
}

/// Merges the session lists of several hub nodes: per POP, the session
/// with the newest heartbeat (a POP that just moved can briefly show on two
/// nodes, the old one not yet timed out).
pub fn merge(lists: impl IntoIterator<Item = Vec<pb::SessionInfo>>) -> Vec<pb::SessionInfo> {
    let mut by_pop: BTreeMap<String, pb::SessionInfo> = BTreeMap::new();
    for s in lists.into_iter().flatten() {
        let newer = by_pop.get(&s.pop).is_none_or(|cur| {
            (s.last_heartbeat_ms, s.connected_at_ms) > (cur.last_heartbeat_ms, cur.connected_at_ms)
        });
        if newer {
            by_pop.insert(s.pop.clone(), s);
        }
    }
    by_pop.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pop: &str, session: &str, connected: i64) -> pb::SessionInfo {
        pb::SessionInfo {
            pop: pop.into(),
            session: session.into(),
            connected_at_ms: connected,
            ..Default::default()
        }
    }

    #[test]
    fn a_stale_session_neither_updates_nor_removes_the_newer_one() {
        let b = SessionBook::default();
        b.open(info("a", "1/1", 10));
        b.open(info("a", "1/2", 20));
        b.heartbeat("a", "1/1", 30);
        b.close("a", "1/1");
        let l = b.list();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].session.as_str(), l[0].last_heartbeat_ms), ("1/2", 0));
        b.heartbeat("a", "1/2", 40);
        b.migrated("a", "1/2", "10.0.0.9:5000".into());
        assert_eq!(b.list()[0].last_heartbeat_ms, 40);
        assert_eq!(b.list()[0].remote_addr, "10.0.0.9:5000");
        b.close("a", "1/2");
        assert!(b.list().is_empty());
    }

    #[test]
    fn merge_keeps_the_freshest_session_per_pop() {
        let mut old = info("a", "1/1", 10);
        old.last_heartbeat_ms = 100;
        let mut new = info("a", "2/7", 90);
        new.last_heartbeat_ms = 200;
        let other = info("b", "1/3", 5);
        let m = merge([vec![old, other.clone()], vec![new.clone()]]);
        assert_eq!(m, vec![new, other]);
    }
}

//! The federation on one page: what the status page (`/api/status`) and
//! `switchyard status -o json` show. Pure: built from the applied state, the
//! gathered uplink sessions and the time passed in.

use serde::Serialize;
use switchyard_proto::pb;

use crate::{decide, state::State};

/// Views of at most this many POPs are computed per request (each is one
/// `decide`); larger federations show the first ones by name.
pub const MAX_VIEWS: usize = 64;

/// The whole page.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// Federation domain ("" before bootstrap).
    pub domain: String,
    /// The node that answered.
    pub node: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Raft term.
    pub term: u64,
    /// Log index of the state shown.
    pub applied_index: u64,
    /// Hub nodes that did not answer for their sessions (their POPs show no
    /// heartbeat).
    pub unreachable_nodes: Vec<u64>,
    /// Every POP, by name.
    pub pops: Vec<PopRow>,
    /// Every global service, by key.
    pub services: Vec<ServiceRow>,
    /// Whether some POPs' views were left out (see [`MAX_VIEWS`]).
    pub views_truncated: bool,
    /// Newest first.
    pub events: Vec<EventRow>,
}

/// One POP.
#[derive(Debug, Clone, Serialize)]
pub struct PopRow {
    /// POP name.
    pub name: String,
    /// `online`, `suspect`, `offline` or `never-seen`.
    pub state: &'static str,
    /// In failback damping (online but in no tier yet).
    pub damped: bool,
    /// Why the last liveness change happened.
    pub reason: String,
    /// region / zone / group and free labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Hub node holding its uplink (0: none known).
    pub hub_node: u64,
    /// Agent version of the live session ("" when not connected).
    pub agent_version: String,
    /// Agent address of the live session.
    pub remote_addr: String,
    /// Milliseconds since the last heartbeat; `None` when no node holding a
    /// session answered.
    pub last_heartbeat_ms_ago: Option<i64>,
    /// Gateway tunnel address ("" when the POP runs no gateway).
    pub gateway: String,
}

/// One global service and its tiers from each POP.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `ClusterSetIP` or `Headless`.
    pub r#type: &'static str,
    /// Exporting POPs.
    pub exported_by: Vec<String>,
    /// MCS conflicts, as `pop: reason`.
    pub conflicts: Vec<String>,
    /// Per importing POP: its VIP and tiers (each a list of POP names).
    pub views: Vec<ViewRow>,
}

/// One service as one POP sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ViewRow {
    /// The importing POP.
    pub pop: String,
    /// The service's VIP there ("" for headless).
    pub vip: String,
    /// Tiers, best first: the POPs of each.
    pub tiers: Vec<Vec<String>>,
}

/// One liveness event.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    /// Raft log index.
    pub index: u64,
    /// Wall clock (ms since the Unix epoch; 0: unknown).
    pub at_ms: i64,
    /// The POP.
    pub pop: String,
    /// State after the event.
    pub state: &'static str,
    /// Still damped after the event.
    pub damped: bool,
    /// Why.
    pub reason: String,
}

/// Cluster facts the state does not hold.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// The answering node.
    pub node: u64,
    /// The leader it knows.
    pub leader: u64,
    /// Raft term.
    pub term: u64,
    /// Applied log index.
    pub applied_index: u64,
}

/// A POP liveness value as a word.
pub fn liveness_word(v: i32) -> &'static str {
    match pb::PopLiveness::try_from(v) {
        Ok(pb::PopLiveness::Online) => "online",
        Ok(pb::PopLiveness::Suspect) => "suspect",
        Ok(pb::PopLiveness::Offline) => "offline",
        _ => "never-seen",
    }
}

fn labels(l: Option<&pb::Labels>) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    if let Some(l) = l {
        for (k, v) in [
            ("region", &l.region),
            ("zone", &l.zone),
            ("group", &l.group),
        ] {
            if !v.is_empty() {
                m.insert(k.to_string(), v.clone());
            }
        }
        for (k, v) in &l.extra {
            m.insert(k.clone(), v.clone());
        }
    }
    m
}

/// Builds the overview. `sessions` are every reachable node's live uplink
/// sessions (merged), `now_ms` the wall clock.
pub fn build(
    state: &State,
    facts: &NodeFacts,
    sessions: &[pb::SessionInfo],
    unreachable_nodes: Vec<u64>,
    now_ms: i64,
) -> Overview {
    let session_of = |pop: &str| sessions.iter().find(|s| s.pop == pop);
    let pops = state
        .pops
        .values()
        .map(|p| {
            let st = state.pop_status.get(&p.name);
            let sess = session_of(&p.name);
            let holder_node = st
                .and_then(|st| st.holder.split_once('/'))
                .and_then(|(n, _)| n.parse().ok())
                .unwrap_or(0);
            PopRow {
                name: p.name.clone(),
                state: liveness_word(st.map_or(0, |s| s.liveness)),
                damped: st.is_some_and(|s| s.damped),
                reason: st.map(|s| s.reason.clone()).unwrap_or_default(),
                labels: labels(p.labels.as_ref()),
                hub_node: sess.map_or(holder_node, |s| s.hub_node),
                agent_version: sess.map(|s| s.agent_version.clone()).unwrap_or_default(),
                remote_addr: sess.map(|s| s.remote_addr.clone()).unwrap_or_default(),
                last_heartbeat_ms_ago: sess
                    .filter(|s| s.last_heartbeat_ms > 0)
                    .map(|s| (now_ms - s.last_heartbeat_ms).max(0)),
                gateway: p.gateway_addr.clone(),
            }
        })
        .collect();

    let viewers: Vec<&String> = state.pops.keys().take(MAX_VIEWS).collect();
    let prepared = decide::Prepared::new(state);
    let views: Vec<pb::PopView> = viewers.iter().map(|p| prepared.view(p)).collect();
    let services = state
        .services
        .iter()
        .map(|((ns, name), g)| {
            let views = views
                .iter()
                .filter_map(|v| {
                    let sv = v.services.iter().find(|s| {
                        s.service
                            .as_ref()
                            .is_some_and(|k| &k.namespace == ns && &k.name == name)
                    })?;
                    Some(ViewRow {
                        pop: v.pop.clone(),
                        vip: sv.vip.clone(),
                        tiers: sv
                            .tiers
                            .iter()
                            .map(|t| t.targets.iter().map(|t| t.pop.clone()).collect())
                            .collect(),
                    })
                })
                .collect();
            ServiceRow {
                namespace: ns.clone(),
                name: name.clone(),
                r#type: if g.r#type == pb::ServiceType::Headless as i32 {
                    "Headless"
                } else {
                    "ClusterSetIP"
                },
                exported_by: g.pops.clone(),
                conflicts: g
                    .conflicts
                    .iter()
                    .map(|c| format!("{}: {}", c.pop, c.reason))
                    .collect(),
                views,
            }
        })
        .collect();
    let events = state
        .events
        .iter()
        .rev()
        .map(|e| EventRow {
            index: e.index,
            at_ms: e.at_ms,
            pop: e.pop.clone(),
            state: liveness_word(e.liveness),
            damped: e.damped,
            reason: e.reason.clone(),
        })
        .collect();
    Overview {
        domain: state
            .federation
            .as_ref()
            .map(|f| f.domain.clone())
            .unwrap_or_default(),
        node: facts.node,
        leader: facts.leader,
        term: facts.term,
        applied_index: facts.applied_index,
        unreachable_nodes,
        pops,
        services,
        views_truncated: state.pops.len() > MAX_VIEWS,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testkit::*;
    use pb::PopLiveness;

    #[test]
    fn shows_pops_sessions_tiers_and_events() {
        let mut s = State::default();
        let i = run(
            &mut s,
            1,
            &[
                init(),
                pop("a", "north", "n1", ""),
                pop("b", "north", "n2", ""),
                pop("c", "south", "s1", ""),
            ],
        );
        let i = run(
            &mut s,
            i,
            &[
                exports(
                    "b",
                    1,
                    vec![export("demo", "ledger", 8080, &[true])],
                    vec![],
                ),
                exports(
                    "c",
                    1,
                    vec![export("demo", "ledger", 8080, &[true])],
                    vec![],
                ),
                live("a", PopLiveness::Online),
                live("b", PopLiveness::Online),
                live("c", PopLiveness::Online),
            ],
        );
        run(&mut s, i, &[live("b", PopLiveness::Offline)]);
        let sessions = vec![pb::SessionInfo {
            pop: "a".into(),
            hub_node: 2,
            session: "2/1".into(),
            agent_version: "0.1.0".into(),
            last_heartbeat_ms: 9_800,
            ..Default::default()
        }];
        let o = build(&s, &NodeFacts::default(), &sessions, vec![3], 10_000);
        assert_eq!(o.unreachable_nodes, vec![3]);
        let a = &o.pops[0];
        assert_eq!((a.name.as_str(), a.state), ("a", "online"));
        assert_eq!(a.last_heartbeat_ms_ago, Some(200));
        assert_eq!((a.hub_node, a.agent_version.as_str()), (2, "0.1.0"));
        assert_eq!(a.labels["region"], "north");
        assert_eq!(o.pops[1].state, "offline");
        assert_eq!(o.pops[1].last_heartbeat_ms_ago, None);

        let ledger = &o.services[0];
        assert_eq!(ledger.exported_by, vec!["b", "c"]);
        let from_a = ledger.views.iter().find(|v| v.pop == "a").unwrap();
        // b is offline: only c is in a's tiers.
        assert_eq!(from_a.tiers, vec![vec!["c".to_string()]]);
        assert!(!from_a.vip.is_empty());

        // Newest event first, with its cause.
        assert_eq!(o.events[0].pop, "b");
        assert_eq!(o.events[0].state, "offline");
        assert_eq!(o.events[0].reason, "test");
    }
}

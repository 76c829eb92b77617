//! Why a service's tiers at one POP are what they are: `switchyard
//! explain`. Built on [`decide`]'s own output (the tiers are never
//! recomputed here) plus the same predicates decide uses, so the
//! explanation cannot disagree with the table the POP got.

use switchyard_proto::pb;

use super::{decide, distance, selector_matches};
use crate::state::State;

/// The explanation of one service seen from one POP.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// Whether the POP imports the service at all.
    pub visible: bool,
    /// Why not, when it does not.
    pub invisible_reason: String,
    /// The service's entry in the POP's view.
    pub view: Option<pb::ServiceView>,
    /// The view's epoch.
    pub epoch: u64,
    /// One line per exporting POP, in POP-name order.
    pub pops: Vec<pb::PopExplanation>,
}

/// Explains service `ns/name` as POP `from` sees it.
pub fn explain(state: &State, from: &str, ns: &str, name: &str) -> Explanation {
    let full = decide(state, from);
    let view = full
        .services
        .iter()
        .find(|v| {
            v.service
                .as_ref()
                .is_some_and(|k| k.namespace == ns && k.name == name)
        })
        .cloned();
    let key = (ns.to_string(), name.to_string());
    let policy = state.policies.get(&key);
    let me = state.pops.get(from);
    let invisible_reason = match (me, state.services.get(&key), &view) {
        (None, _, _) => format!("no POP named {from}"),
        (_, None, _) => format!("no POP exports {ns}/{name}"),
        (Some(_), Some(_), None) => {
            format!("{ns}/{name} is not exported to {from} (policy export_to)")
        }
        _ => String::new(),
    };
    let mut pops = Vec::new();
    if let Some(me) = me {
        let from_key = (ns.to_string(), name.to_string(), String::new());
        for ((ens, ename, q), export) in state.exports.range(from_key..) {
            if ens != ns || ename != name {
                break;
            }
            let Some(qp) = state.pops.get(q) else {
                continue;
            };
            let tier = view.as_ref().and_then(|v| {
                v.tiers
                    .iter()
                    .position(|t| t.targets.iter().any(|tg| &tg.pop == q))
            });
            let status = state.pop_status.get(q);
            let ready = export.endpoints.iter().filter(|e| e.ready).count() as u32;
            pops.push(pb::PopExplanation {
                pop: q.clone(),
                tier: tier.map_or(-1, |t| t as i32),
                reason: reason(state, policy, me, qp, tier, ready),
                liveness: status.map_or(0, |s| s.liveness),
                damped: status.is_some_and(|s| s.damped),
                ready,
                total: export.endpoints.len() as u32,
            });
        }
    }
    Explanation {
        visible: view.is_some(),
        invisible_reason,
        view,
        epoch: full.epoch,
        pops,
    }
}

fn liveness_name(state: &State, pop: &str) -> &'static str {
    match state
        .pop_status
        .get(pop)
        .and_then(|s| pb::PopLiveness::try_from(s.liveness).ok())
    {
        Some(pb::PopLiveness::Online) => "online",
        Some(pb::PopLiveness::Suspect) => "suspect",
        Some(pb::PopLiveness::Offline) => "offline",
        _ => "never seen",
    }
}

/// The one rule that decided this POP's place.
fn reason(
    state: &State,
    policy: Option<&pb::TrafficPolicy>,
    me: &pb::Pop,
    q: &pb::Pop,
    tier: Option<usize>,
    ready: u32,
) -> String {
    let own = q.name == me.name;
    if tier.is_none() {
        if !own && state.is_revoked(pb::RevocationKind::Pop, &q.name) {
            return "revoked".into();
        }
        if !own && state.pop_status.get(&q.name).is_some_and(|s| s.damped) {
            return "recovered but in failback damping".into();
        }
        if !own && !state.is_eligible(&q.name) {
            return format!("not live ({})", liveness_name(state, &q.name));
        }
        if ready == 0 {
            return "no ready endpoints".into();
        }
    }
    let mode = policy
        .and_then(|p| pb::PolicyMode::try_from(p.mode).ok())
        .unwrap_or(pb::PolicyMode::Locality);
    let placed = match mode {
        pb::PolicyMode::Locality => match distance(me, q) {
            0 => "locality: this POP".to_string(),
            1 => format!("locality: same group {}", group(q)),
            2 => format!("locality: same zone {}", zone(q)),
            3 => format!("locality: same region {}", region(q)),
            _ => "locality: another region".to_string(),
        },
        pb::PolicyMode::Failover => {
            let sels = policy.map_or(&[][..], |p| &p.failover[..]);
            match sels.iter().position(|s| selector_matches(s, q)) {
                Some(i) => format!("failover: matches selector #{}", i + 1),
                None => return "failover: matches no selector".into(),
            }
        }
        pb::PolicyMode::ActiveActive => {
            let w = policy
                .and_then(|p| p.weights.get(&q.name))
                .copied()
                .unwrap_or(1);
            if w == 0 {
                return "active-active: weight 0 (drained)".into();
            }
            format!("active-active: weight {w}")
        }
    };
    match tier {
        Some(_) => placed,
        // Placed by the mode and ready, yet in no tier: the view keeps only
        // the best MAX_TARGETS_PER_SERVICE targets.
        None => format!(
            "{placed}, but past the view's first {} targets",
            super::MAX_TARGETS_PER_SERVICE
        ),
    }
}

fn labels(p: &pb::Pop) -> pb::Labels {
    p.labels.clone().unwrap_or_default()
}
fn group(p: &pb::Pop) -> String {
    labels(p).group
}
fn zone(p: &pb::Pop) -> String {
    labels(p).zone
}
fn region(p: &pb::Pop) -> String {
    labels(p).region
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::command::Kind;

    fn apply(s: &mut State, i: u64, k: Kind) {
        let r = s.apply(i, &pb::Command { kind: Some(k) });
        assert_eq!(r.error, 0, "{r:?}");
    }

    fn pop(name: &str, region: &str) -> Kind {
        Kind::UpsertPop(pb::UpsertPop {
            pop: Some(pb::Pop {
                name: name.into(),
                labels: Some(pb::Labels {
                    region: region.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            create_only: false,
            now_ms: 0,
        })
    }

    fn export(p: &str, ready: bool) -> Kind {
        Kind::ApplyExports(pb::ApplyExports {
            pop: p.into(),
            seq: 1,
            upserts: vec![pb::ServiceExport {
                service: Some(pb::ServiceKey {
                    namespace: "demo".into(),
                    name: "ledger".into(),
                }),
                ports: vec![pb::ServicePort {
                    name: String::new(),
                    port: 8080,
                    protocol: 0,
                }],
                endpoints: vec![pb::Endpoint {
                    address: "10.0.0.1".into(),
                    port: 8080,
                    ready,
                    hostname: String::new(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn live(p: &str, l: pb::PopLiveness) -> Kind {
        Kind::SetPopLiveness(pb::SetPopLiveness {
            pop: p.into(),
            state: l as i32,
            ..Default::default()
        })
    }

    #[test]
    fn explains_each_exporter_against_decide() {
        let mut s = State::default();
        apply(
            &mut s,
            1,
            Kind::InitFederation(pb::InitFederation {
                federation: Some(pb::Federation {
                    domain: "d".into(),
                    ca_cert_pem: "c".into(),
                    ca_key_pem: "k".into(),
                }),
            }),
        );
        let mut i = 2;
        for (n, r) in [
            ("north-1", "north"),
            ("north-2", "north"),
            ("south-1", "south"),
            ("south-2", "south"),
        ] {
            apply(&mut s, i, pop(n, r));
            i += 1;
        }
        for (n, ready) in [("north-1", true), ("south-1", true), ("south-2", false)] {
            apply(&mut s, i, export(n, ready));
            i += 1;
            apply(&mut s, i, live(n, pb::PopLiveness::Online));
            i += 1;
        }
        let e = explain(&s, "north-2", "demo", "ledger");
        assert!(e.visible);
        let by: std::collections::BTreeMap<_, _> =
            e.pops.iter().map(|p| (p.pop.as_str(), p)).collect();
        assert_eq!(by["north-1"].tier, 0);
        assert!(
            by["north-1"].reason.contains("same region north"),
            "{:?}",
            by["north-1"]
        );
        assert_eq!(by["south-1"].tier, 1);
        assert_eq!(by["south-2"].tier, -1);
        assert_eq!(by["south-2"].reason, "no ready endpoints");

        apply(&mut s, i, live("north-1", pb::PopLiveness::Offline));
        let e = explain(&s, "north-2", "demo", "ledger");
        let n1 = e.pops.iter().find(|p| p.pop == "north-1").unwrap();
        assert_eq!((n1.tier, n1.reason.as_str()), (-1, "not live (offline)"));
        let s1 = e.pops.iter().find(|p| p.pop == "south-1").unwrap();
        assert_eq!(s1.tier, 0);

        let none = explain(&s, "north-2", "demo", "nope");
        assert!(!none.visible);
        assert!(none.invisible_reason.contains("no POP exports"));
    }
}

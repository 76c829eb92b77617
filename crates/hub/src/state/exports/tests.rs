use switchyard_proto::pb::{self, ErrorCode, PopLiveness};

use crate::state::testkit::*;
use crate::state::State;

fn setup() -> (State, u64) {
    let mut s = State::default();
    let next = run(
        &mut s,
        1,
        &[
            init(),
            pop("a", "r1", "z1", "g1"),
            pop("b", "r1", "z1", "g2"),
        ],
    );
    (s, next)
}

fn svc<'a>(s: &'a State, name: &str) -> &'a pb::GlobalService {
    s.services
        .get(&("shop".to_string(), name.to_string()))
        .unwrap()
}

#[test]
fn export_seq_is_idempotent() {
    let (mut s, i) = setup();
    let r = s.apply(
        i,
        &exports("a", 1, vec![export("shop", "web", 80, &[true])], vec![]),
    );
    assert_eq!((code(&r), r.export_seq), (ErrorCode::None, 1));
    let before = s.clone();
    // The same batch resent, and an older seq: acknowledged, no effect.
    for seq in [1, 0] {
        let r = s.apply(i + 1, &exports("a", seq, vec![], vec![key("shop", "web")]));
        assert_eq!((code(&r), r.export_seq), (ErrorCode::None, 1));
        assert_eq!(s, before);
    }
    // Gaps are fine; a later lower seq is then a duplicate.
    let r = s.apply(
        i + 2,
        &exports("a", 5, vec![export("shop", "db", 5432, &[true])], vec![]),
    );
    assert_eq!(r.export_seq, 5);
    let r = s.apply(i + 3, &exports("a", 4, vec![], vec![key("shop", "db")]));
    assert_eq!(r.export_seq, 5);
    assert!(s.services.contains_key(&("shop".into(), "db".into())));
    assert_eq!(s.pop_status["a"].last_export_seq, 5);
}

#[test]
fn exports_need_a_known_pop_and_valid_content() {
    let (mut s, i) = setup();
    let r = s.apply(
        i,
        &exports("zz", 1, vec![export("shop", "web", 80, &[true])], vec![]),
    );
    assert_eq!(code(&r), ErrorCode::NotFound);
    let bad = [
        export("Shop", "web", 80, &[true]),
        export("shop", "web", 0, &[true]),
        export("shop", "web", 70000, &[true]),
    ];
    for b in bad {
        let r = s.apply(i, &exports("a", 1, vec![b], vec![]));
        assert_eq!(code(&r), ErrorCode::Invalid);
    }
    let dup = exports(
        "a",
        1,
        vec![export("shop", "web", 80, &[true])],
        vec![key("shop", "web")],
    );
    assert_eq!(code(&s.apply(i, &dup)), ErrorCode::Invalid);
    // A refused batch does not consume its seq.
    let r = s.apply(
        i + 1,
        &exports("a", 1, vec![export("shop", "web", 80, &[true])], vec![]),
    );
    assert_eq!((code(&r), r.export_seq), (ErrorCode::None, 1));
    assert!(s
        .exports
        .contains_key(&("shop".into(), "web".into(), "a".into())));
}

#[test]
fn unchanged_resend_moves_no_index() {
    let (mut s, i) = setup();
    run(
        &mut s,
        i,
        &[exports(
            "a",
            1,
            vec![export("shop", "web", 80, &[true, false])],
            vec![],
        )],
    );
    let mut reordered = export("shop", "web", 80, &[true, false]);
    reordered.endpoints.reverse();
    run(&mut s, i + 10, &[exports("a", 2, vec![reordered], vec![])]);
    assert_eq!(svc(&s, "web").updated_index, i);
    assert_eq!(
        s.exports[&("shop".into(), "web".into(), "a".into())].updated_index,
        i
    );
    // A readiness change does move it.
    run(
        &mut s,
        i + 11,
        &[exports(
            "a",
            3,
            vec![export("shop", "web", 80, &[true, true])],
            vec![],
        )],
    );
    assert_eq!(svc(&s, "web").updated_index, i + 11);
}

#[test]
fn mcs_oldest_export_wins_and_conflicts_are_recorded() {
    let (mut s, i) = setup();
    let mut headless = export("shop", "web", 81, &[true]);
    headless.r#type = pb::ServiceType::Headless as i32;
    run(
        &mut s,
        i,
        &[
            exports("b", 1, vec![export("shop", "web", 80, &[true])], vec![]),
            exports("a", 1, vec![headless.clone()], vec![]),
        ],
    );
    let g = svc(&s, "web");
    assert_eq!(g.defined_by, "b");
    assert_eq!(g.ports[0].port, 80);
    assert_eq!(g.r#type, pb::ServiceType::ClusterSetIp as i32);
    assert_eq!(
        g.conflicts,
        vec![pb::ExportConflict {
            pop: "a".into(),
            reason: "ports,type".into()
        }]
    );
    assert_eq!(g.pops, vec!["a".to_string(), "b".to_string()]);
    // b updating its export keeps its age: still the winner.
    run(
        &mut s,
        i + 2,
        &[exports(
            "b",
            2,
            vec![export("shop", "web", 80, &[false])],
            vec![],
        )],
    );
    assert_eq!(svc(&s, "web").defined_by, "b");
    // The oldest withdraws: a's definition wins, no conflict left.
    run(
        &mut s,
        i + 3,
        &[exports("b", 3, vec![], vec![key("shop", "web")])],
    );
    let g = svc(&s, "web");
    assert_eq!((g.defined_by.as_str(), g.ports[0].port), ("a", 81));
    assert!(g.conflicts.is_empty());
    // b exports again: now it is the newer one, and in conflict.
    run(
        &mut s,
        i + 4,
        &[exports(
            "b",
            4,
            vec![export("shop", "web", 80, &[true])],
            vec![],
        )],
    );
    let g = svc(&s, "web");
    assert_eq!(g.defined_by, "a");
    assert_eq!(g.conflicts[0].pop, "b");
    assert_eq!(
        g.created_index, i,
        "the service itself is as old as its first export"
    );
}

#[test]
fn full_resync_withdraws_the_rest() {
    let (mut s, i) = setup();
    run(
        &mut s,
        i,
        &[
            exports(
                "a",
                1,
                vec![
                    export("shop", "web", 80, &[true]),
                    export("shop", "db", 5432, &[true]),
                ],
                vec![],
            ),
            exports("b", 1, vec![export("shop", "db", 5432, &[true])], vec![]),
        ],
    );
    let mut c = exports("a", 2, vec![export("shop", "web", 80, &[true])], vec![]);
    if let Some(pb::command::Kind::ApplyExports(e)) = &mut c.kind {
        e.full = true;
    }
    run(&mut s, i + 2, &[c]);
    assert!(!s
        .exports
        .contains_key(&("shop".into(), "db".into(), "a".into())));
    assert!(s
        .exports
        .contains_key(&("shop".into(), "db".into(), "b".into())));
    assert!(s
        .exports
        .contains_key(&("shop".into(), "web".into(), "a".into())));
}

#[test]
fn vips_are_allocated_per_pop_and_stable() {
    let mut s = State::default();
    let i = run(
        &mut s,
        1,
        &[
            init(),
            pop_with_range("a", "", "", "", "10.9.0.0/24"),
            pop("b", "", "", ""),
            pop("c", "", "", ""),
        ],
    );
    // Default ranges: consecutive dev blocks.
    assert_eq!(s.pops["b"].vip_cidr, "127.77.0.0/22");
    assert_eq!(s.pops["c"].vip_cidr, "127.77.4.0/22");
    let i = run(
        &mut s,
        i,
        &[
            exports("b", 1, vec![export("shop", "web", 80, &[true])], vec![]),
            exports("b", 2, vec![export("shop", "db", 5432, &[true])], vec![]),
        ],
    );
    let vip = |s: &State, p: &str, n: &str| {
        s.vips
            .get(&(p.to_string(), "shop".to_string(), n.to_string()))
            .map(|v| v.address.clone())
    };
    assert_eq!(vip(&s, "a", "web").as_deref(), Some("10.9.0.1"));
    assert_eq!(vip(&s, "a", "db").as_deref(), Some("10.9.0.2"));
    assert_eq!(vip(&s, "c", "web").as_deref(), Some("127.77.4.1"));
    // A POP created later gets VIPs for existing services, in key order.
    let i = run(&mut s, i, &[pop("d", "", "", "")]);
    assert_eq!(vip(&s, "d", "db").as_deref(), Some("127.77.8.1"));
    assert_eq!(vip(&s, "d", "web").as_deref(), Some("127.77.8.2"));
    // Relabelling a POP without naming a range keeps range and VIPs.
    let i = run(&mut s, i, &[pop("d", "r9", "", "")]);
    assert_eq!(vip(&s, "d", "db").as_deref(), Some("127.77.8.1"));

    // Snapshot round trip keeps every VIP; allocation continues identically.
    let mut back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back, s);
    let more = [exports(
        "b",
        3,
        vec![export("shop", "cache", 6379, &[true])],
        vec![],
    )];
    run(&mut s, i, &more);
    run(&mut back, i, &more);
    assert_eq!(back, s);
    assert_eq!(vip(&s, "a", "cache").as_deref(), Some("10.9.0.3"));

    // A gone service frees its VIPs; the next new one reuses the gap.
    let i = run(
        &mut s,
        i + 1,
        &[
            exports("b", 4, vec![], vec![key("shop", "db")]),
            exports("b", 5, vec![export("shop", "queue", 5672, &[true])], vec![]),
        ],
    );
    assert_eq!(vip(&s, "a", "db"), None);
    assert_eq!(vip(&s, "a", "queue").as_deref(), Some("10.9.0.2"));
    // A new range re-allocates what no longer fits.
    run(
        &mut s,
        i,
        &[pop_with_range("a", "", "", "", "10.10.0.0/30")],
    );
    assert_eq!(vip(&s, "a", "cache").as_deref(), Some("10.10.0.1"));
    assert_eq!(vip(&s, "a", "queue").as_deref(), Some("10.10.0.2"));
    assert_eq!(vip(&s, "a", "web"), None, "range full");
    // A bad range is refused.
    let r = s.apply(100, &pop_with_range("a", "", "", "", "10.0.0.0/99"));
    assert_eq!(code(&r), ErrorCode::Invalid);
}

#[test]
fn liveness_and_failback_damping() {
    let (mut s, i) = setup();
    run(&mut s, i, &[live("a", PopLiveness::Online)]);
    let st = &s.pop_status["a"];
    assert!(!st.damped, "a first Online is not a recovery");
    assert_eq!((st.healthy_since_index, st.healthy_since_ms), (i, 1000));
    assert!(s.is_eligible("a"));

    // Suspect and back: same healthy period, never out.
    run(&mut s, i + 1, &[live("a", PopLiveness::Suspect)]);
    assert!(s.is_eligible("a"));
    run(&mut s, i + 2, &[live("a", PopLiveness::Online)]);
    assert_eq!(s.pop_status["a"].healthy_since_index, i);
    // Repeating the current state changes nothing.
    let before = s.clone();
    run(&mut s, i + 3, &[live("a", PopLiveness::Online)]);
    assert_eq!(s, before);

    // Offline, then Online: recovering, damped until the damping ends.
    run(
        &mut s,
        i + 4,
        &[
            live("a", PopLiveness::Offline),
            live("a", PopLiveness::Online),
        ],
    );
    let st = s.pop_status["a"].clone();
    assert!(st.damped && !s.is_eligible("a"));
    assert_eq!(st.healthy_since_index, i + 5);
    // A proposal for an older period is stale.
    let stale = cmd(pb::command::Kind::EndFailbackDamping(
        pb::EndFailbackDamping {
            pop: "a".into(),
            healthy_since_index: i,
            now_ms: 0,
        },
    ));
    assert_eq!(code(&s.apply(i + 6, &stale)), ErrorCode::Stale);
    let end = end_damping(&s, "a");
    run(&mut s, i + 7, std::slice::from_ref(&end));
    assert!(s.is_eligible("a"));
    assert_eq!(s.pop_status["a"].liveness_index, i + 7);
    assert_eq!(
        code(&s.apply(i + 8, &end)),
        ErrorCode::Stale,
        "already over"
    );

    // Unknown POP, Unknown state: refused.
    assert_eq!(
        code(&s.apply(i + 9, &live("zz", PopLiveness::Online))),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(&s.apply(i + 9, &live("a", PopLiveness::Unknown))),
        ErrorCode::Invalid
    );
    // Revoked: never eligible.
    let rev = cmd(pb::command::Kind::AddRevocation(pb::AddRevocation {
        revocation: Some(pb::Revocation {
            kind: pb::RevocationKind::Pop as i32,
            subject: "a".into(),
            ..Default::default()
        }),
    }));
    run(&mut s, i + 10, &[rev]);
    assert!(!s.is_eligible("a"));
    assert_eq!(s.tombstone_index, i + 10);
}

#[test]
fn failback_after_is_the_strictest_policy() {
    let (mut s, i) = setup();
    assert_eq!(
        s.failback_after_ms("a"),
        crate::state::DEFAULT_FAILBACK_AFTER_MS
    );
    run(
        &mut s,
        i,
        &[
            exports(
                "a",
                1,
                vec![
                    export("shop", "web", 80, &[true]),
                    export("shop", "db", 5432, &[true]),
                ],
                vec![],
            ),
            policy(pb::TrafficPolicy {
                service: Some(key("shop", "web")),
                failback_after_ms: 120_000,
                ..Default::default()
            }),
            policy(pb::TrafficPolicy {
                service: Some(key("shop", "db")),
                failback_after_ms: 1_000,
                ..Default::default()
            }),
        ],
    );
    assert_eq!(s.failback_after_ms("a"), 120_000);
}

#[test]
fn rtt_is_quantized_with_hysteresis() {
    let (mut s, i) = setup();
    run(&mut s, i, &[rtt("a", "b", 10_000)]);
    let k = ("a".to_string(), "b".to_string());
    assert_eq!(s.rtts[&k].rtt_us, 9_600);
    // Jitter within one bucket or across one boundary: nothing moves.
    run(
        &mut s,
        i + 1,
        &[
            rtt("a", "b", 10_500),
            rtt("a", "b", 11_300),
            rtt("a", "b", 9_100),
        ],
    );
    assert_eq!(s.rtts[&k].updated_index, i);
    // A real change (+50 %) commits.
    run(&mut s, i + 4, &[rtt("a", "b", 15_000)]);
    assert_eq!(s.rtts[&k].updated_index, i + 4);
    for bad in [rtt("a", "a", 5), rtt("a", "b", 0)] {
        assert_eq!(code(&s.apply(i + 5, &bad)), ErrorCode::Invalid);
    }
    assert_eq!(
        code(&s.apply(i + 5, &rtt("a", "zz", 5))),
        ErrorCode::NotFound
    );
}

#[test]
fn removing_a_pop_removes_what_it_owned() {
    let (mut s, i) = setup();
    run(
        &mut s,
        i,
        &[
            exports("a", 1, vec![export("shop", "web", 80, &[true])], vec![]),
            exports(
                "b",
                1,
                vec![
                    export("shop", "web", 80, &[true]),
                    export("shop", "db", 1, &[true]),
                ],
                vec![],
            ),
            live("a", PopLiveness::Online),
            rtt("a", "b", 1000),
            rtt("b", "a", 1000),
        ],
    );
    run(&mut s, i + 5, &[remove_pop("b")]);
    assert!(s.exports.keys().all(|(_, _, p)| p != "b"));
    assert!(
        !s.services.contains_key(&("shop".into(), "db".into())),
        "only b exported db"
    );
    assert_eq!(svc(&s, "web").pops, vec!["a".to_string()]);
    assert!(s.vips.keys().all(|(p, _, _)| p != "b"));
    assert!(s.rtts.is_empty());
    assert!(!s.pop_status.contains_key("b"));
    assert_eq!(s.tombstone_index, i + 5);
    // The record of a removed POP is fresh if it comes back.
    run(&mut s, i + 6, &[pop("b", "", "", "")]);
    let r = s.apply(
        i + 7,
        &exports("b", 1, vec![export("shop", "db", 1, &[true])], vec![]),
    );
    assert_eq!(r.export_seq, 1);
}

#[test]
fn snapshot_round_trip_keeps_everything() {
    let (mut s, i) = setup();
    run(
        &mut s,
        i,
        &[
            exports("a", 1, vec![export("shop", "web", 80, &[true])], vec![]),
            exports("b", 1, vec![export("shop", "web", 81, &[false])], vec![]),
            live("a", PopLiveness::Online),
            live("a", PopLiveness::Offline),
            live("a", PopLiveness::Online),
            rtt("a", "b", 1000),
            remove_pop("a"),
            pop("a", "", "", ""),
            policy(pb::TrafficPolicy {
                service: Some(key("shop", "web")),
                ..Default::default()
            }),
            cmd(pb::command::Kind::AddRevocation(pb::AddRevocation {
                revocation: Some(pb::Revocation {
                    kind: pb::RevocationKind::Pop as i32,
                    subject: "z".into(),
                    at_ms: 5,
                    reason: "lost".into(),
                }),
            })),
            cmd(pb::command::Kind::SetHubUplink(pb::SetHubUplink {
                uplink: Some(pb::HubUplink {
                    node: 2,
                    addr: "127.0.0.1:7000".into(),
                }),
            })),
        ],
    );
    assert!(!s.policies.is_empty() && !s.revocations.is_empty() && !s.hub_uplinks.is_empty());
    let back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.encode_snapshot(), s.encode_snapshot());
    // Encoded from references, the bytes are prost's own for the message.
    assert_eq!(
        s.encode_snapshot(),
        prost::Message::encode_to_vec(&s.to_snapshot())
    );
}

#[test]
fn only_the_holding_session_takes_a_pop_down() {
    let (mut s, i) = setup();
    let ok = |r: pb::CommandResult| assert_eq!(r.error, ErrorCode::None as i32, "{r:?}");
    ok(s.apply(i, &live_from("a", PopLiveness::Online, "1/aa")));
    // The POP reconnects through hub node 2: no liveness change, new holder.
    let before = s.pop_status["a"].liveness_index;
    ok(s.apply(i + 1, &live_from("a", PopLiveness::Online, "2/bb")));
    assert_eq!(s.pop_status["a"].liveness_index, before);
    assert_eq!(s.pop_status["a"].holder, "2/bb");
    // The old connection's detector on node 1 is stale.
    let r = s.apply(i + 2, &live_from("a", PopLiveness::Offline, "1/aa"));
    assert_eq!(r.error, ErrorCode::Stale as i32, "{r:?}");
    assert_eq!(s.pop_status["a"].liveness, PopLiveness::Online as i32);
    // The holder, and an operator (no session), may.
    ok(s.apply(i + 3, &live_from("a", PopLiveness::Suspect, "2/bb")));
    ok(s.apply(i + 4, &live("a", PopLiveness::Offline)));
    assert_eq!(s.pop_status["a"].liveness, PopLiveness::Offline as i32);
}

#[test]
fn hub_uplinks_are_recorded_and_survive_snapshots() {
    let (mut s, i) = setup();
    let set = |node, addr: &str| pb::Command {
        kind: Some(pb::command::Kind::SetHubUplink(pb::SetHubUplink {
            uplink: Some(pb::HubUplink {
                node,
                addr: addr.into(),
            }),
        })),
    };
    assert_eq!(s.apply(i, &set(1, "127.0.0.1:7402")).error, 0);
    assert_eq!(s.apply(i + 1, &set(2, "127.0.0.1:7412")).error, 0);
    assert_eq!(s.apply(i + 2, &set(2, "127.0.0.1:7413")).error, 0);
    assert_ne!(s.apply(i + 3, &set(0, "x")).error, 0);
    assert_eq!(s.hub_uplinks[&2], "127.0.0.1:7413");
    let back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn liveness_changes_are_kept_in_a_bounded_event_log() {
    let (mut s, i) = setup();
    run(
        &mut s,
        i,
        &[
            live("a", PopLiveness::Online),
            live("a", PopLiveness::Online),
            live("a", PopLiveness::Offline),
            live("a", PopLiveness::Online),
        ],
    );
    let got: Vec<_> = s
        .events
        .iter()
        .map(|e| (e.index, e.pop.as_str(), e.liveness, e.damped))
        .collect();
    // A repeated state is no event; the recovery is damped.
    assert_eq!(
        got,
        vec![
            (i, "a", PopLiveness::Online as i32, false),
            (i + 2, "a", PopLiveness::Offline as i32, false),
            (i + 3, "a", PopLiveness::Online as i32, true),
        ]
    );
    let end = end_damping(&s, "a");
    run(&mut s, i + 4, &[end]);
    let last = s.events.back().unwrap();
    assert_eq!((last.index, last.damped), (i + 4, false));
    assert!(last.reason.contains("damping"));

    // Bounded: the oldest go first.
    let mut next = i + 5;
    for n in 0..super::super::EVENT_LOG_LEN {
        let to = if n % 2 == 0 {
            PopLiveness::Suspect
        } else {
            PopLiveness::Online
        };
        run(&mut s, next, &[live("a", to)]);
        next += 1;
    }
    assert_eq!(s.events.len(), super::super::EVENT_LOG_LEN);
    assert_eq!(s.events.front().unwrap().index, i + 5);
    assert_eq!(s.events.back().unwrap().index, next - 1);

    // Part of the snapshot.
    let back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn dev_blocks_follow_pops_through_removal_and_snapshots() {
    let mut s = State::default();
    let i = run(
        &mut s,
        1,
        &[
            init(),
            pop("a", "r", "", ""),
            pop("b", "r", "", ""),
            pop("c", "r", "", ""),
        ],
    );
    let range = |s: &State, p: &str| s.pops[p].vip_cidr.clone();
    assert_eq!(range(&s, "a"), "127.77.0.0/22");
    assert_eq!(range(&s, "c"), "127.77.8.0/22");
    // A freed block is the next one given out; an update keeps its block.
    let i = run(&mut s, i, &[remove_pop("b"), pop("a", "r2", "", "")]);
    assert_eq!(range(&s, "a"), "127.77.0.0/22");
    let i = run(&mut s, i, &[pop("d", "r", "", "")]);
    assert_eq!(range(&s, "d"), "127.77.4.0/22");
    assert_eq!(
        s.dev_blocks.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(s.dev_lowest_free, 3);
    // A freed block below used ones comes back first, then the walk
    // resumes above the used ones.
    let i = run(&mut s, i, &[remove_pop("a")]);
    assert_eq!(s.dev_lowest_free, 0);
    run(&mut s, i, &[pop("e", "r", "", ""), pop("f", "r", "", "")]);
    assert_eq!(range(&s, "e"), "127.77.0.0/22");
    assert_eq!(range(&s, "f"), "127.77.12.0/22");
    assert_eq!(s.dev_lowest_free, 4);
    let back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back, s, "the derived index is rebuilt from the snapshot");
}

mod incremental {
    use proptest::prelude::*;
    use switchyard_proto::pb;

    use crate::state::testkit::*;
    use crate::state::State;

    /// One export command of a random POP: upserts (service, port, type,
    /// ready) and withdrawals of service numbers, maybe as a full set.
    type Step = (usize, Vec<(usize, u32, bool, bool)>, Vec<usize>, bool);

    fn step() -> impl Strategy<Value = Step> {
        (
            0..5usize,
            proptest::collection::vec((0..3usize, 80..82u32, any::<bool>(), any::<bool>()), 0..3),
            proptest::collection::vec(0..3usize, 0..2),
            any::<bool>(),
        )
    }

    proptest! {
        /// Patching a service after one POP's export changed gives exactly
        /// what rebuilding it from every export gives.
        #[test]
        fn patched_services_equal_rebuilt_ones(steps in proptest::collection::vec(step(), 1..40)) {
            let mut s = State::default();
            let pops = ["a", "b", "c", "d", "e"];
            let mut i = run(&mut s, 1, &[init()]);
            for p in pops {
                i = run(&mut s, i, &[pop(p, "", "", "")]);
            }
            let mut seq = [0u64; 5];
            for (p, upserts, withdrawals, full) in steps {
                seq[p] += 1;
                let mut named = std::collections::BTreeSet::new();
                let upserts: Vec<pb::ServiceExport> = upserts
                    .into_iter()
                    .filter(|(svc, ..)| named.insert(*svc))
                    .map(|(svc, port, headless, ready)| {
                        let mut e = export("ns", &format!("s{svc}"), port, &[ready]);
                        if headless {
                            e.r#type = pb::ServiceType::Headless as i32;
                        }
                        e
                    })
                    .collect();
                let withdrawals = withdrawals
                    .into_iter()
                    .filter(|svc| !named.contains(svc))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .map(|svc| key("ns", &format!("s{svc}")))
                    .collect();
                let mut c = exports(pops[p], seq[p], upserts, withdrawals);
                if let Some(pb::command::Kind::ApplyExports(a)) = c.kind.as_mut() {
                    a.full = full;
                }
                i = run(&mut s, i, &[c]);
                for k in s.services.keys().cloned().collect::<Vec<_>>() {
                    let mut rebuilt = s.clone();
                    rebuilt.recompute_service(i - 1, &k);
                    // A rebuild moves the index even of an untouched
                    // service; everything else must match.
                    let mut rebuilt = rebuilt.services.remove(&k);
                    if let (Some(r), Some(have)) = (rebuilt.as_mut(), s.services.get(&k)) {
                        r.updated_index = have.updated_index;
                    }
                    prop_assert_eq!(rebuilt.as_ref(), s.services.get(&k));
                }
            }
        }
    }
}

use proptest::prelude::*;
use prost::Message;
use switchyard_proto::pb::{self, PopLiveness};

use super::{decide, Prepared, View};
use crate::state::testkit::*;
use crate::state::State;

// ---------------------------------------------------------------- helpers

/// Tiers of one service in `pop`'s view as lists of "pop:weight".
fn tiers(s: &State, pop: &str, name: &str) -> Vec<Vec<String>> {
    let v = decide(s, pop);
    let sv = v
        .services
        .iter()
        .find(|sv| sv.service.as_ref().is_some_and(|k| k.name == name))
        .unwrap_or_else(|| panic!("{pop} does not see {name}"));
    sv.tiers
        .iter()
        .map(|t| {
            t.targets
                .iter()
                .map(|x| format!("{}:{}", x.pop, x.weight))
                .collect()
        })
        .collect()
}

fn t(v: &[&[&str]]) -> Vec<Vec<String>> {
    v.iter()
        .map(|t| t.iter().map(|s| s.to_string()).collect())
        .collect()
}

/// a, b: same group; c: same zone as a; d: same region; e, f: elsewhere.
/// Everyone online and exporting shop/web with one ready endpoint.
fn world() -> (State, u64) {
    let mut s = State::default();
    let mut cmds = vec![
        init(),
        pop("a", "r1", "z1", "g1"),
        pop("b", "r1", "z2", "g1"),
        pop("c", "r1", "z1", ""),
        pop("d", "r1", "z3", ""),
        pop("e", "r2", "z1", ""),
        pop("f", "r2", "z9", "g9"),
    ];
    for p in ["a", "b", "c", "d", "e", "f"] {
        cmds.push(live(p, PopLiveness::Online));
        cmds.push(exports(
            p,
            1,
            vec![export("shop", "web", 80, &[true])],
            vec![],
        ));
    }
    let next = run(&mut s, 1, &cmds);
    (s, next)
}

// ---------------------------------------------------------------- modes

#[test]
fn locality_orders_by_topology_then_rtt_then_name() {
    let (mut s, i) = world();
    assert_eq!(
        tiers(&s, "a", "web"),
        t(&[&["a:1"], &["b:1"], &["c:1"], &["d:1"], &["e:1", "f:1"]])
    );
    // Measured RTT orders within a distance; unmeasured comes last.
    run(&mut s, i, &[rtt("a", "f", 5_000)]);
    assert_eq!(tiers(&s, "a", "web")[4], vec!["f:1", "e:1"]);
    // Without its own export, a starts with its nearest peers.
    run(
        &mut s,
        i + 1,
        &[exports("a", 2, vec![], vec![key("shop", "web")])],
    );
    assert_eq!(tiers(&s, "a", "web")[0], vec!["b:1"]);
    // Not-ready endpoints are not targets; weights count ready endpoints.
    run(
        &mut s,
        i + 2,
        &[exports(
            "b",
            2,
            vec![export("shop", "web", 80, &[true, false, true])],
            vec![],
        )],
    );
    let v = decide(&s, "a");
    let b = &v.services[0].tiers[0].targets[0];
    assert_eq!((b.pop.as_str(), b.weight, b.endpoints.len()), ("b", 2, 2));
    assert!(b.endpoints.iter().all(|e| e.ready));
}

#[test]
fn liveness_filters_targets() {
    let (mut s, i) = world();
    run(
        &mut s,
        i,
        &[
            live("b", PopLiveness::Offline),
            live("c", PopLiveness::Suspect),
            live("d", PopLiveness::Offline),
            live("d", PopLiveness::Online),
        ],
    );
    // b offline, d damped: out. c suspect: in.
    assert_eq!(
        tiers(&s, "a", "web"),
        t(&[&["a:1"], &["c:1"], &["e:1", "f:1"]])
    );
    let end = end_damping(&s, "d");
    run(&mut s, i + 4, &[end]);
    assert_eq!(tiers(&s, "a", "web")[2], vec!["d:1"]);
    // An offline POP still has its own endpoints in its own view.
    assert_eq!(tiers(&s, "b", "web")[0], vec!["b:1"]);
}

#[test]
fn failover_follows_selectors_in_order() {
    let (mut s, i) = world();
    run(
        &mut s,
        i,
        &[policy(pb::TrafficPolicy {
            service: Some(key("shop", "web")),
            mode: pb::PolicyMode::Failover as i32,
            failover: vec![by_name("e"), by_label("region", "r1"), by_name("e")],
            ..Default::default()
        })],
    );
    // f matches nothing; e only once (first selector); a is in r1 too.
    assert_eq!(
        tiers(&s, "a", "web"),
        t(&[&["e:1"], &["a:1", "b:1", "c:1", "d:1"]])
    );
    let v = decide(&s, "a");
    assert_eq!(v.services[0].mode, pb::PolicyMode::Failover as i32);
}

#[test]
fn active_active_uses_policy_weights() {
    let (mut s, i) = world();
    run(
        &mut s,
        i,
        &[
            policy(pb::TrafficPolicy {
                service: Some(key("shop", "web")),
                mode: pb::PolicyMode::ActiveActive as i32,
                weights: [("b".to_string(), 3), ("c".to_string(), 0)].into(),
                ..Default::default()
            }),
            live("f", PopLiveness::Offline),
            rtt("a", "e", 1_000),
        ],
    );
    assert_eq!(tiers(&s, "a", "web"), t(&[&["e:1", "a:1", "b:3", "d:1"]]));
}

// ---------------------------------------------------------------- min_healthy

#[test]
fn min_healthy_merges_a_degraded_tier_into_the_next() {
    let (mut s, i) = world();
    let with = |min: u32| {
        policy(pb::TrafficPolicy {
            service: Some(key("shop", "web")),
            min_healthy_permille: min,
            ..Default::default()
        })
    };
    // a: 1 of 4 ready (25 %).
    let i = run(
        &mut s,
        i,
        &[exports(
            "a",
            2,
            vec![export("shop", "web", 80, &[true, false, false, false])],
            vec![],
        )],
    );
    // Default (0): only an empty tier spills.
    assert_eq!(tiers(&s, "a", "web")[0], vec!["a:1"]);
    // 50 %: a's tier merges with b's (2 of 5 ready: still below) and then
    // c's (3 of 6 = 50 %: enough).
    let i = run(&mut s, i, &[with(500)]);
    assert_eq!(
        tiers(&s, "a", "web"),
        t(&[&["a:1", "b:1", "c:1"], &["d:1"], &["e:1", "f:1"]])
    );
    // Nothing ready locally: spills even at the default.
    let i = run(
        &mut s,
        i,
        &[
            with(0),
            exports(
                "a",
                3,
                vec![export("shop", "web", 80, &[false, false])],
                vec![],
            ),
        ],
    );
    assert_eq!(tiers(&s, "a", "web")[0], vec!["b:1"]);
    // An offline member's endpoints count as not ready: e, f tier (seen
    // from d: same-region a, b, c tier first) at 50 % with f offline.
    let i = run(&mut s, i, &[with(600), live("f", PopLiveness::Offline)]);
    // From e: e itself (1/1), then others. e's own tier is healthy.
    assert_eq!(tiers(&s, "e", "web")[0], vec!["e:1"]);
    // From b: a (0/2) + b... b's own tier first.
    run(
        &mut s,
        i,
        &[exports("b", 2, vec![], vec![key("shop", "web")])],
    );
    // From b: group g1 is a (0 of 2) -> merged with zone-less region tier
    // c, d (2 of 4 = 50 % < 60 %) -> merged with e, f (3 of 6, f offline) ->
    // last tier: emitted as is.
    assert_eq!(tiers(&s, "b", "web"), t(&[&["c:1", "d:1", "e:1"]]));
}

// ---------------------------------------------------------------- view fields

#[test]
fn export_to_vip_ports_ttl() {
    let (mut s, i) = world();
    let mut headless = export("shop", "dir", 389, &[true]);
    headless.r#type = pb::ServiceType::Headless as i32;
    run(
        &mut s,
        i,
        &[
            policy(pb::TrafficPolicy {
                service: Some(key("shop", "web")),
                export_to: vec![by_label("region", "r1"), by_name("f")],
                dns_ttl_s: 30,
                ..Default::default()
            }),
            exports(
                "b",
                2,
                vec![export("shop", "web", 80, &[true]), headless],
                vec![],
            ),
        ],
    );
    let names = |p: &str| -> Vec<String> {
        decide(&s, p)
            .services
            .iter()
            .map(|v| v.service.clone().unwrap_or_default().name)
            .collect()
    };
    assert_eq!(names("a"), vec!["dir", "web"]);
    assert_eq!(names("f"), vec!["dir", "web"]);
    assert_eq!(names("e"), vec!["dir"], "e is neither in r1 nor f");
    let v = decide(&s, "a");
    let (dir, web) = (&v.services[0], &v.services[1]);
    assert_eq!(
        web.vip,
        s.vips[&("a".into(), "shop".into(), "web".into())].address
    );
    assert!(web.vip.starts_with("127.77."));
    assert_eq!(web.ports, vec![80]);
    assert_eq!(web.dns_ttl_s, 30);
    assert_eq!(dir.vip, "", "headless services have no VIP");
    assert_eq!(dir.dns_ttl_s, super::DEFAULT_DNS_TTL_S);
    assert_eq!(dir.r#type, pb::ServiceType::Headless as i32);
    // Two POPs' views of one service carry their own VIPs.
    assert_ne!(decide(&s, "b").services[1].vip, web.vip);
}

#[test]
fn epoch_tracks_the_last_relevant_change() {
    let (mut s, i) = world();
    let e0 = decide(&s, "a").epoch;
    assert_eq!(e0, i - 1, "f's export was the last input");
    // An RTT report between two other POPs is not an input of a's view.
    run(&mut s, i, &[rtt("b", "c", 1_000)]);
    assert_eq!(decide(&s, "a").epoch, e0);
    assert_eq!(decide(&s, "b").epoch, i);
    // A withdrawal that deletes a service still moves every epoch.
    run(
        &mut s,
        i + 1,
        &[exports(
            "c",
            2,
            vec![export("shop", "solo", 1, &[true])],
            vec![],
        )],
    );
    run(
        &mut s,
        i + 2,
        &[exports("c", 3, vec![], vec![key("shop", "solo")])],
    );
    assert_eq!(decide(&s, "a").epoch, i + 2);
    // An unknown POP gets an empty view whose epoch still covers removals.
    let v = decide(&s, "nope");
    assert!(v.services.is_empty());
    assert_eq!(v.epoch, i + 2);
}

#[test]
fn exporters_of_a_restricted_service_get_its_importers() {
    let (mut s, i) = world();
    let next = run(
        &mut s,
        i,
        &[policy(pb::TrafficPolicy {
            service: Some(key("shop", "web")),
            export_to: vec![by_label("region", "r1"), by_name("f")],
            ..Default::default()
        })],
    );
    // b exports web and may import it: it learns who else may.
    let v = decide(&s, "b");
    let web = &v.services[0];
    assert!(web.import_restricted);
    assert_eq!(web.importers, vec!["a", "b", "c", "d", "f"]);
    // Unrestricted services carry no list.
    run(
        &mut s,
        next,
        &[policy(pb::TrafficPolicy {
            service: Some(key("shop", "web")),
            ..Default::default()
        })],
    );
    let web = &decide(&s, "b").services[0];
    assert!(!web.import_restricted);
    assert!(web.importers.is_empty());
}

fn gateway(pop: &str, addr: &str) -> pb::Command {
    cmd(pb::command::Kind::SetPopGateway(pb::SetPopGateway {
        pop: pop.into(),
        gateway_addr: addr.into(),
    }))
}

#[test]
fn peers_are_the_gateways_of_pops_in_tiers() {
    let (mut s, i) = world();
    let next = run(
        &mut s,
        i,
        &[
            gateway("a", "10.0.0.1:7443"),
            gateway("b", "10.0.0.2:7443"),
            gateway("e", "10.0.0.5:7443"),
        ],
    );
    let v = decide(&s, "a");
    let peers: Vec<(String, String)> = v
        .peers
        .iter()
        .map(|p| (p.pop.clone(), p.gateway_addr.clone()))
        .collect();
    // Not a itself; only POPs with a gateway; sorted by name.
    assert_eq!(
        peers,
        vec![
            ("b".to_string(), "10.0.0.2:7443".to_string()),
            ("e".to_string(), "10.0.0.5:7443".to_string()),
        ]
    );
    assert_eq!(v.epoch, next - 1, "e's gateway was the last input");
    // A moved gateway moves the views that route to it.
    run(&mut s, next, &[gateway("e", "10.0.0.55:7443")]);
    let v2 = decide(&s, "a");
    assert_eq!(v2.epoch, next);
    assert!(v2
        .peers
        .iter()
        .any(|p| p.pop == "e" && p.gateway_addr == "10.0.0.55:7443"));
    // An offline POP is in no tier, so not a peer either.
    run(&mut s, next + 1, &[live("b", PopLiveness::Offline)]);
    assert!(decide(&s, "a").peers.iter().all(|p| p.pop != "b"));
}

// ---------------------------------------------------------------- properties

const POPS: [&str; 5] = ["p0", "p1", "p2", "p3", "p4"];
const SVCS: [&str; 3] = ["s0", "s1", "s2"];

#[derive(Debug, Clone)]
enum Sel {
    Name(usize),
    Region(usize),
    Zone(usize),
    Group(usize),
}

impl Sel {
    fn pb(&self) -> pb::PopSelector {
        match self {
            Sel::Name(p) => by_name(POPS[*p]),
            Sel::Region(r) => by_label("region", &format!("r{r}")),
            Sel::Zone(z) => by_label("zone", &format!("z{z}")),
            Sel::Group(g) => by_label("group", &format!("g{g}")),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Pop(usize, usize, usize, usize),
    Remove(usize),
    Export(usize, usize, Vec<bool>, bool),
    Withdraw(usize, usize),
    Live(usize, i32),
    EndDamping(usize),
    Rtt(usize, usize, u64),
    Policy(usize, i32, Vec<Sel>, Vec<(usize, u32)>, u32, Vec<Sel>),
    DeletePolicy(usize),
    Revoke(usize),
}

fn sel() -> impl Strategy<Value = Sel> {
    prop_oneof![
        (0..5usize).prop_map(Sel::Name),
        (0..2usize).prop_map(Sel::Region),
        (0..3usize).prop_map(Sel::Zone),
        (0..2usize).prop_map(Sel::Group),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..5usize, 0..3usize, 0..4usize, 0..3usize).prop_map(|(p, r, z, g)| Op::Pop(p, r, z, g)),
        1 => (0..5usize).prop_map(Op::Remove),
        6 => (0..5usize, 0..3usize, prop::collection::vec(any::<bool>(), 0..4), any::<bool>())
            .prop_map(|(p, s, r, alt)| Op::Export(p, s, r, alt)),
        1 => (0..5usize, 0..3usize).prop_map(|(p, s)| Op::Withdraw(p, s)),
        5 => (0..5usize, 1..=3i32).prop_map(|(p, l)| Op::Live(p, l)),
        2 => (0..5usize).prop_map(Op::EndDamping),
        2 => (0..5usize, 0..5usize, 1u64..200_000).prop_map(|(a, b, us)| Op::Rtt(a, b, us)),
        2 => (
            0..3usize,
            0..3i32,
            prop::collection::vec(sel(), 0..3),
            prop::collection::vec((0..5usize, 0..4u32), 0..3),
            prop_oneof![Just(0u32), 0..=1000u32],
            prop::collection::vec(sel(), 0..2),
        )
            .prop_map(|(s, m, f, w, h, x)| Op::Policy(s, m, f, w, h, x)),
        1 => (0..3usize).prop_map(Op::DeletePolicy),
        1 => (0..5usize).prop_map(Op::Revoke),
    ]
}

/// The command for `op` in state `s` (export seqs and damping periods are
/// read from the state, as the hub would).
fn to_cmd(s: &State, op: &Op) -> pb::Command {
    use pb::command::Kind;
    let seq = |p: usize| s.pop_status.get(POPS[p]).map_or(0, |st| st.last_export_seq) + 1;
    match op {
        Op::Pop(p, r, z, g) => {
            let group = if *g == 2 {
                String::new()
            } else {
                format!("g{g}")
            };
            pop(POPS[*p], &format!("r{}", r % 2), &format!("z{z}"), &group)
        }
        Op::Remove(p) => remove_pop(POPS[*p]),
        Op::Export(p, sv, ready, alt) => {
            let mut e = export("ns", SVCS[*sv], if *alt { 81 } else { 80 }, ready);
            if *alt && *sv == 2 {
                e.r#type = pb::ServiceType::Headless as i32;
            }
            exports(POPS[*p], seq(*p), vec![e], vec![])
        }
        Op::Withdraw(p, sv) => exports(POPS[*p], seq(*p), vec![], vec![key("ns", SVCS[*sv])]),
        Op::Live(p, l) => live(
            POPS[*p],
            PopLiveness::try_from(*l).unwrap_or(PopLiveness::Online),
        ),
        Op::EndDamping(p) => end_damping(s, POPS[*p]),
        Op::Rtt(a, b, us) => rtt(POPS[*a], POPS[*b], *us),
        Op::Policy(sv, mode, failover, weights, min, export_to) => policy(pb::TrafficPolicy {
            service: Some(key("ns", SVCS[*sv])),
            mode: *mode,
            failover: failover.iter().map(Sel::pb).collect(),
            weights: weights
                .iter()
                .map(|(p, w)| (POPS[*p].to_string(), *w))
                .collect(),
            min_healthy_permille: *min,
            export_to: export_to.iter().map(Sel::pb).collect(),
            ..Default::default()
        }),
        Op::DeletePolicy(sv) => cmd(Kind::DeletePolicy(pb::DeletePolicy {
            service: Some(key("ns", SVCS[*sv])),
        })),
        Op::Revoke(p) => cmd(Kind::AddRevocation(pb::AddRevocation {
            revocation: Some(pb::Revocation {
                kind: pb::RevocationKind::Pop as i32,
                subject: POPS[*p].into(),
                ..Default::default()
            }),
        })),
    }
}

/// Checks the per-view invariants of every POP's view in `s`.
fn check_views(s: &State) -> Result<(), TestCaseError> {
    for me in POPS {
        let v = decide(s, me);
        for sv in &v.services {
            let k = sv.service.clone().unwrap_or_default();
            let skey = (k.namespace.clone(), k.name.clone());
            // export_to: a listed service is visible to this POP.
            if let (Some(p), Some(mine)) = (s.policies.get(&skey), s.pops.get(me)) {
                prop_assert!(
                    p.export_to.is_empty()
                        || p.export_to.iter().any(|x| super::selector_matches(x, mine)),
                    "{me} sees {skey:?} outside export_to"
                );
            }
            for tier in &sv.tiers {
                for target in &tier.targets {
                    if target.pop == me {
                        continue;
                    }
                    let st = s.pop_status.get(&target.pop).cloned().unwrap_or_default();
                    prop_assert!(
                        st.liveness != PopLiveness::Offline as i32,
                        "offline {} in {me}'s view",
                        target.pop
                    );
                    prop_assert!(!st.damped, "damped {} in {me}'s view", target.pop);
                    prop_assert!(s.is_eligible(&target.pop));
                }
            }
            // Locality: own ready endpoints are tier 0.
            let mode = s.policies.get(&skey).map_or(0, |p| p.mode);
            let own = s
                .exports
                .get(&(skey.0.clone(), skey.1.clone(), me.to_string()));
            let own_ready: Vec<_> = own
                .map(|e| e.endpoints.iter().filter(|e| e.ready).cloned().collect())
                .unwrap_or_default();
            if mode == pb::PolicyMode::Locality as i32 && !own_ready.is_empty() {
                let t0 = sv.tiers.first();
                let mine = t0.and_then(|t| t.targets.iter().find(|x| x.pop == me));
                prop_assert_eq!(mine.map(|x| x.endpoints.clone()), Some(own_ready));
            }
        }
        // Every visible service is there (export_to only removes).
        if let Some(mine) = s.pops.get(me) {
            let expected = s
                .services
                .keys()
                .filter(|k| {
                    s.policies.get(*k).is_none_or(|p| {
                        p.export_to.is_empty()
                            || p.export_to.iter().any(|x| super::selector_matches(x, mine))
                    })
                })
                .count();
            prop_assert_eq!(v.services.len(), expected);
        }
    }
    Ok(())
}

fn base() -> (State, u64) {
    let mut s = State::default();
    let next = run(&mut s, 1, &[init()]);
    (s, next)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After every command: view invariants hold, no epoch goes down, and
    /// a view whose content changed has the command's index as its epoch.
    #[test]
    fn views_stay_sound_and_epochs_monotone(ops in prop::collection::vec(op(), 1..60)) {
        let (mut s, mut index) = base();
        let mut prev: Vec<pb::PopView> = POPS.iter().map(|p| decide(&s, p)).collect();
        for op in &ops {
            let c = to_cmd(&s, op);
            s.apply(index, &c);
            check_views(&s)?;
            for (i, p) in POPS.iter().enumerate() {
                let v = decide(&s, p);
                prop_assert!(v.epoch >= prev[i].epoch, "{p}: epoch {} -> {} after {op:?}", prev[i].epoch, v.epoch);
                if v.services != prev[i].services {
                    prop_assert_eq!(v.epoch, index, "{} changed at {} without its epoch: {:?}", p, index, op);
                }
                prev[i] = v;
            }
            index += 1;
        }
    }

    /// A view built from the previous one (reusing the services whose
    /// inputs did not move) equals one built from scratch, after every
    /// command; and its delta from the previous one is the wire diff.
    #[test]
    fn reused_views_equal_fresh_ones(ops in prop::collection::vec(op(), 1..60)) {
        let (mut s, mut index) = base();
        let mut prev: Vec<View> = POPS
            .iter()
            .map(|p| Prepared::new(&s).view_from(p, None))
            .collect();
        for op in &ops {
            let c = to_cmd(&s, op);
            s.apply(index, &c);
            let prepared = Prepared::new(&s);
            for (i, p) in POPS.iter().enumerate() {
                let v = prepared.view_from(p, Some(&prev[i]));
                prop_assert_eq!(&v.to_pb(), &decide(&s, p), "{} after {:?}", p, op);
                prop_assert_eq!(
                    v.delta_from(&prev[i]),
                    switchyard_proto::uplink::diff_views(&prev[i].to_pb(), &v.to_pb())
                );
                prev[i] = v;
            }
            index += 1;
        }
    }

    /// Same inputs, same bytes: commands on distinct records applied in any
    /// order (each at its own fixed index), and snapshots whose lists are
    /// shuffled, give identical states and byte-equal views.
    #[test]
    fn order_of_inputs_does_not_matter(
        (cmds, order) in independent_commands().prop_flat_map(|c| {
            let n = c.len();
            (Just(c), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        }),
        seed in any::<u64>(),
    ) {
        let (mut a, next) = seeded();
        let mut b = a.clone();
        for (i, c) in cmds.iter().enumerate() {
            a.apply(next + i as u64, c);
        }
        for &i in &order {
            b.apply(next + i as u64, &cmds[i]);
        }
        prop_assert_eq!(&a, &b);
        // Shuffle every list of the snapshot and load it back.
        let mut snap = a.to_snapshot();
        shuffle(&mut snap.pops, seed);
        shuffle(&mut snap.exports, seed);
        shuffle(&mut snap.services, seed);
        shuffle(&mut snap.pop_status, seed);
        shuffle(&mut snap.vips, seed);
        shuffle(&mut snap.rtts, seed);
        shuffle(&mut snap.policies, seed);
        let c = State::from_snapshot(snap).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&a, &c);
        for p in POPS {
            let va = decide(&a, p).encode_to_vec();
            prop_assert_eq!(&va, &decide(&b, p).encode_to_vec());
            prop_assert_eq!(&va, &decide(&c, p).encode_to_vec());
        }
    }
}

/// Five labelled POPs, p0 exporting every service (so services, and their
/// VIPs, exist before the shuffled part).
fn seeded() -> (State, u64) {
    let (mut s, i) = base();
    let mut cmds = Vec::new();
    for (n, p) in POPS.iter().enumerate() {
        cmds.push(pop(
            p,
            &format!("r{}", n % 2),
            &format!("z{}", n % 3),
            if n < 2 { "g0" } else { "" },
        ));
    }
    cmds.push(exports(
        "p0",
        1,
        SVCS.iter()
            .map(|sv| export("ns", sv, 80, &[true]))
            .collect(),
        vec![],
    ));
    let next = run(&mut s, i, &cmds);
    (s, next)
}

/// Commands that each touch their own record: one export batch per POP
/// p1..p4, one liveness per POP, one RTT per ordered pair, one policy per
/// service.
fn independent_commands() -> impl Strategy<Value = Vec<pb::Command>> {
    let exports_s = prop::collection::vec(
        prop::option::of((prop::collection::vec(
            (
                0..3usize,
                prop::collection::vec(any::<bool>(), 0..3),
                any::<bool>(),
            ),
            0..3,
        ),)),
        4,
    );
    let live_s = prop::collection::vec(prop::option::of(1..=3i32), 5);
    let rtt_s = prop::collection::vec(prop::option::of(1u64..100_000), 20);
    let pol_s = prop::collection::vec(
        prop::option::of((
            0..3i32,
            prop::collection::vec(sel(), 0..3),
            prop::collection::vec(sel(), 0..2),
            0..=1000u32,
        )),
        3,
    );
    (exports_s, live_s, rtt_s, pol_s).prop_map(|(ex, lv, rt, po)| {
        let mut out = Vec::new();
        for (n, e) in ex.into_iter().enumerate() {
            if let Some((list,)) = e {
                let mut seen = std::collections::BTreeSet::new();
                let ups = list
                    .into_iter()
                    .filter(|(sv, _, _)| seen.insert(*sv))
                    .map(|(sv, ready, alt)| {
                        export("ns", SVCS[sv], if alt { 81 } else { 80 }, &ready)
                    })
                    .collect();
                out.push(exports(POPS[n + 1], 1, ups, vec![]));
            }
        }
        for (n, l) in lv.into_iter().enumerate() {
            if let Some(l) = l {
                out.push(live(
                    POPS[n],
                    PopLiveness::try_from(l).unwrap_or(PopLiveness::Online),
                ));
            }
        }
        let pairs = (0..5).flat_map(|a| (0..5).filter(move |b| *b != a).map(move |b| (a, b)));
        for ((a, b), r) in pairs.zip(rt) {
            if let Some(us) = r {
                out.push(rtt(POPS[a], POPS[b], us));
            }
        }
        for (n, p) in po.into_iter().enumerate() {
            if let Some((mode, failover, export_to, min)) = p {
                out.push(policy(pb::TrafficPolicy {
                    service: Some(key("ns", SVCS[n])),
                    mode,
                    failover: failover.iter().map(Sel::pb).collect(),
                    export_to: export_to.iter().map(Sel::pb).collect(),
                    min_healthy_permille: min,
                    ..Default::default()
                }));
            }
        }
        out
    })
}

/// A deterministic Fisher-Yates shuffle driven by a seed (xorshift).
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[test]
fn a_view_keeps_the_best_targets_only() {
    let mut s = State::default();
    let mut i = run(&mut s, 1, &[init()]);
    // 100 POPs export one service: "p000" and "p001" share region r0, the
    // rest are in r1.
    for n in 0..100 {
        let name = format!("p{n:03}");
        let region = if n < 2 { "r0" } else { "r1" };
        i = run(
            &mut s,
            i,
            &[
                pop(&name, region, "", ""),
                live(&name, PopLiveness::Online),
                exports(&name, 1, vec![export("ns", "web", 80, &[true])], vec![]),
            ],
        );
    }
    let t = tiers(&s, "p000", "web");
    let count: usize = t.iter().map(Vec::len).sum();
    assert_eq!(count, super::MAX_TARGETS_PER_SERVICE);
    assert_eq!(t[0], vec!["p000:1".to_string()], "own endpoints first");
    assert_eq!(t[1], vec!["p001:1".to_string()], "then the same region");
    let why = super::explain::explain(&s, "p000", "ns", "web");
    let cut = why
        .pops
        .iter()
        .find(|e| e.pop == "p099")
        .expect("p099 explained");
    assert_eq!(cut.tier, -1);
    assert!(
        cut.reason.contains("past the view's first 64"),
        "{}",
        cut.reason
    );
}

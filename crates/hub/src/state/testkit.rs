//! Command builders shared by the state and decide tests.

use switchyard_proto::pb::{self, command::Kind, ErrorCode};

use super::State;

/// Wraps a command kind.
pub fn cmd(kind: Kind) -> pb::Command {
    pb::Command { kind: Some(kind) }
}

/// The result's error code.
pub fn code(r: &pb::CommandResult) -> ErrorCode {
    ErrorCode::try_from(r.error).unwrap_or(ErrorCode::Invalid)
}

/// `InitFederation` with dummy CA material.
pub fn init() -> pb::Command {
    cmd(Kind::InitFederation(pb::InitFederation {
        federation: Some(pb::Federation {
            domain: "example.org".into(),
            ca_cert_pem: "CERT".into(),
            ca_key_pem: "KEY".into(),
        }),
    }))
}

/// `UpsertPop` with topology labels (empty strings: unset).
pub fn pop(name: &str, region: &str, zone: &str, group: &str) -> pb::Command {
    pop_with_range(name, region, zone, group, "")
}

/// `UpsertPop` with labels and a VIP range.
pub fn pop_with_range(
    name: &str,
    region: &str,
    zone: &str,
    group: &str,
    cidr: &str,
) -> pb::Command {
    cmd(Kind::UpsertPop(pb::UpsertPop {
        pop: Some(pb::Pop {
            name: name.into(),
            labels: Some(pb::Labels {
                region: region.into(),
                zone: zone.into(),
                group: group.into(),
                extra: Default::default(),
            }),
            vip_cidr: cidr.into(),
            ..Default::default()
        }),
        create_only: false,
        now_ms: 1,
    }))
}

/// `RemovePop`.
pub fn remove_pop(name: &str) -> pb::Command {
    cmd(Kind::RemovePop(pb::RemovePop { name: name.into() }))
}

/// A service key.
pub fn key(ns: &str, name: &str) -> pb::ServiceKey {
    pb::ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

/// An export of `ns/name` on TCP `port` with endpoints `10.0.0.i` whose
/// readiness is given by `ready`.
pub fn export(ns: &str, name: &str, port: u32, ready: &[bool]) -> pb::ServiceExport {
    pb::ServiceExport {
        service: Some(key(ns, name)),
        ports: vec![pb::ServicePort {
            name: "main".into(),
            port,
            protocol: pb::Protocol::Tcp as i32,
        }],
        endpoints: ready
            .iter()
            .enumerate()
            .map(|(i, r)| pb::Endpoint {
                address: format!("10.0.0.{}", i + 1),
                port,
                ready: *r,
                hostname: String::new(),
            })
            .collect(),
        ..Default::default()
    }
}

/// `ApplyExports` (delta).
pub fn exports(
    pop: &str,
    seq: u64,
    upserts: Vec<pb::ServiceExport>,
    withdrawals: Vec<pb::ServiceKey>,
) -> pb::Command {
    cmd(Kind::ApplyExports(pb::ApplyExports {
        pop: pop.into(),
        seq,
        upserts,
        withdrawals,
        full: false,
    }))
}

/// `SetPopLiveness`.
pub fn live(pop: &str, state: pb::PopLiveness) -> pb::Command {
    cmd(Kind::SetPopLiveness(pb::SetPopLiveness {
        pop: pop.into(),
        state: state as i32,
        reason: "test".into(),
        now_ms: 1000,
        session: String::new(),
    }))
}

/// `SetPopLiveness` as reported by uplink session `session`.
pub fn live_from(pop: &str, state: pb::PopLiveness, session: &str) -> pb::Command {
    cmd(Kind::SetPopLiveness(pb::SetPopLiveness {
        pop: pop.into(),
        state: state as i32,
        reason: "test".into(),
        now_ms: 1000,
        session: session.into(),
    }))
}

/// `EndFailbackDamping` for the POP's current healthy period in `s`.
pub fn end_damping(s: &State, pop: &str) -> pb::Command {
    cmd(Kind::EndFailbackDamping(pb::EndFailbackDamping {
        pop: pop.into(),
        healthy_since_index: s.pop_status.get(pop).map_or(0, |st| st.healthy_since_index),
        now_ms: 0,
    }))
}

/// `ReportRtt`.
pub fn rtt(from: &str, to: &str, rtt_us: u64) -> pb::Command {
    cmd(Kind::ReportRtt(pb::ReportRtt {
        from_pop: from.into(),
        to_pop: to.into(),
        rtt_us,
    }))
}

/// `SetPolicy`.
pub fn policy(p: pb::TrafficPolicy) -> pb::Command {
    cmd(Kind::SetPolicy(pb::SetPolicy { policy: Some(p) }))
}

/// A selector by POP name.
pub fn by_name(pop: &str) -> pb::PopSelector {
    pb::PopSelector {
        pop: pop.into(),
        labels: Default::default(),
    }
}

/// A selector by one label.
pub fn by_label(k: &str, v: &str) -> pb::PopSelector {
    pb::PopSelector {
        pop: String::new(),
        labels: [(k.to_string(), v.to_string())].into(),
    }
}

/// Applies commands at consecutive indexes from `first`, asserting each
/// succeeds; returns the next index.
pub fn run(s: &mut State, first: u64, cmds: &[pb::Command]) -> u64 {
    let mut i = first;
    for c in cmds {
        let r = s.apply(i, c);
        assert_eq!(code(&r), ErrorCode::None, "command {i}: {}", r.message);
        i += 1;
    }
    i
}

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use prost::bytes::BytesMut;
use switchyard_proto::pb;
use switchyard_proto::pb::uplink_datagram::Kind as DKind;
use switchyard_proto::pb::uplink_frame::Kind;
use switchyard_proto::uplink::{self as wire, apply_delta, encode_datagram, encode_frame};

use super::*;
use crate::decide::View;

const POP: &str = "north-1";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> HubSessionConfig {
    HubSessionConfig {
        hub_node: "1".into(),
        ..Default::default()
    }
}

fn frame(kind: Kind) -> pb::UplinkFrame {
    pb::UplinkFrame { kind: Some(kind) }
}

fn hello(last_applied_epoch: u64) -> pb::UplinkFrame {
    frame(Kind::Hello(pb::Hello {
        pop: POP.into(),
        agent_version: "0.1.0".into(),
        last_applied_epoch,
        last_acked_export_seq: 0,
        protocol_version: wire::PROTOCOL_VERSION,
        gateway_addr: String::new(),
    }))
}

fn key(name: &str) -> pb::ServiceKey {
    pb::ServiceKey {
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn export(name: &str) -> pb::ServiceExport {
    pb::ServiceExport {
        service: Some(key(name)),
        // A lying agent: the hub must overwrite these.
        pop: "someone-else".into(),
        exported_index: 99,
        ..Default::default()
    }
}

fn delta(seq: u64, full: bool, names: &[&str]) -> pb::UplinkFrame {
    frame(Kind::ExportDelta(pb::ExportDelta {
        seq,
        upserts: names.iter().map(|n| export(n)).collect(),
        withdrawals: vec![],
        full,
    }))
}

fn view(epoch: u64, names: &[&str]) -> Arc<View> {
    Arc::new(View::from_pb(&wire_view(epoch, names)))
}

fn wire_view(epoch: u64, names: &[&str]) -> pb::PopView {
    pb::PopView {
        pop: POP.into(),
        epoch,
        services: names
            .iter()
            .map(|n| pb::ServiceView {
                service: Some(key(n)),
                vip: format!("127.77.0.{epoch}"),
                ..Default::default()
            })
            .collect(),
        peers: vec![],
    }
}

fn frames(s: &mut HubSession) -> Vec<Kind> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|f| f.kind.unwrap())
        .collect()
}

fn events(s: &mut HubSession) -> Vec<HubEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn heartbeat(seq: u64) -> Vec<u8> {
    encode_datagram(DKind::Heartbeat(pb::Heartbeat {
        seq,
        sent_at_us: seq * 250_000,
    }))
    .unwrap()
    .to_vec()
}

/// An established session (Welcome and events drained) at `t0`.
fn established(t0: Instant, committed: u64) -> HubSession {
    let mut s = HubSession::new(config(), POP.into(), 7, committed, t0);
    s.handle_frame(t0, hello(0));
    let f = frames(&mut s);
    assert!(matches!(f.as_slice(), [Kind::Welcome(_)]), "{f:?}");
    events(&mut s);
    s
}

fn error_code(f: &[Kind]) -> Option<pb::UplinkErrorCode> {
    f.iter().find_map(|k| match k {
        Kind::Error(e) => pb::UplinkErrorCode::try_from(e.code).ok(),
        _ => None,
    })
}

// ----- Hello ---------------------------------------------------------------

#[test]
fn hello_must_come_first() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    s.handle_frame(t0, delta(1, false, &["a"]));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
    assert!(matches!(
        events(&mut s).as_slice(),
        [HubEvent::Closed(CloseReason::Protocol(_))]
    ));
    assert!(s.is_finished());
    // Nothing is accepted afterwards, not even a Hello.
    s.handle_frame(t0, hello(0));
    assert!(frames(&mut s).is_empty());
    assert!(events(&mut s).is_empty());
}

#[test]
fn welcome_carries_settings_and_liveness_starts_online() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 7, 42, t0);
    s.handle_frame(t0, hello(3));
    let f = frames(&mut s);
    let [Kind::Welcome(w)] = f.as_slice() else {
        panic!("{f:?}")
    };
    assert_eq!(w.hub_node, "1");
    assert_eq!(w.heartbeat_interval_ms, 250);
    assert_eq!(w.export_seq, 42);
    assert_eq!(w.session_id, 7);
    assert_eq!(w.protocol_version, wire::PROTOCOL_VERSION);
    let e = events(&mut s);
    assert!(matches!(
        &e[0],
        HubEvent::Established { pop, session_id: 7, last_applied_epoch: 3, .. } if pop == POP
    ));
    assert_eq!(
        e[1],
        HubEvent::Liveness {
            pop: POP.into(),
            session_id: 7,
            state: Liveness::Online
        }
    );
    assert!(s.is_established());
}

#[test]
fn hello_for_another_pop_is_forbidden() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), "south-1".into(), 1, 0, t0);
    s.handle_frame(t0, hello(0));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Forbidden)
    );
    assert!(s.is_finished());
    assert!(!events(&mut s)
        .iter()
        .any(|e| matches!(e, HubEvent::Established { .. } | HubEvent::Liveness { .. })));
}

#[test]
fn unsupported_version_is_refused() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    let mut h = hello(0);
    if let Some(Kind::Hello(h)) = &mut h.kind {
        h.protocol_version = 2;
    }
    s.handle_frame(t0, h);
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::UnsupportedVersion)
    );
    assert!(s.is_finished());
}

#[test]
fn hello_twice_is_a_protocol_error() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, hello(0));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
    assert!(!s.is_established());
}

#[test]
fn no_hello_in_time_closes() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    let deadline = s.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(10));
    s.handle_timeout(deadline - ms(1));
    assert!(frames(&mut s).is_empty());
    s.handle_timeout(deadline);
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Timeout)
    );
    assert_eq!(
        events(&mut s),
        vec![HubEvent::Closed(CloseReason::HelloTimeout)]
    );
    assert!(s.is_finished());
    assert_eq!(s.poll_timeout(), None);
}

// ----- framing ---------------------------------------------------------------

#[test]
fn stream_bytes_are_decoded_in_pieces() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    let mut wire = BytesMut::new();
    encode_frame(&hello(0), &mut wire).unwrap();
    encode_frame(&delta(1, true, &["a"]), &mut wire).unwrap();
    for chunk in wire.chunks(3) {
        s.handle_stream_data(t0, chunk);
    }
    assert!(s.is_established());
    assert!(events(&mut s)
        .iter()
        .any(|e| matches!(e, HubEvent::ProposeExports(p) if p.seq == 1)));
}

#[test]
fn unknown_kind_closes_the_stream() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    // Field 30 of UplinkFrame, unknown to this version: decodes to no kind.
    s.handle_stream_data(t0, &[0, 0, 0, 3, 0xf2, 0x01, 0x00]);
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
    assert!(matches!(
        events(&mut s).as_slice(),
        [HubEvent::Closed(CloseReason::Protocol(
            wire::UplinkError::UnknownKind
        ))]
    ));
    assert!(!s.is_established());
}

#[test]
fn oversized_frame_is_refused_from_its_header() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    let len = (wire::MAX_AGENT_FRAME as u32 + 1).to_be_bytes();
    s.handle_stream_data(t0, &len);
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Limit)
    );
}

#[test]
fn hub_kinds_from_the_agent_are_refused() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, frame(Kind::ExportAck(pb::ExportAck { seq: 1 })));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
}

// ----- views ---------------------------------------------------------------

#[test]
fn snapshot_on_connect_then_deltas() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    // A view before Hello waits for it.
    assert!(s.view_changed(view(5, &["a", "b"])));
    assert!(frames(&mut s).is_empty());
    s.handle_frame(t0, hello(0));
    let f = frames(&mut s);
    let [Kind::Welcome(_), Kind::ViewSnapshot(snap)] = f.as_slice() else {
        panic!("{f:?}")
    };
    let mut agent = snap.view.clone().unwrap();
    assert_eq!(agent, wire_view(5, &["a", "b"]));

    // Older or equal epochs are not sent.
    assert!(!s.view_changed(view(5, &["x"])));
    assert!(!s.view_changed(view(4, &["x"])));
    assert!(frames(&mut s).is_empty());

    // Two changes between polls go out as one delta from the last sent.
    assert!(s.view_changed(view(6, &["a"])));
    assert!(s.view_changed(view(8, &["a", "c"])));
    let f = frames(&mut s);
    let [Kind::ViewDelta(d)] = f.as_slice() else {
        panic!("{f:?}")
    };
    assert_eq!((d.from_epoch, d.epoch), (5, 8));
    agent = apply_delta(&agent, d).unwrap();
    assert_eq!(agent, wire_view(8, &["a", "c"]));
    assert_eq!(s.stats().snapshots_sent, 1);
    assert_eq!(s.stats().deltas_sent, 1);

    // A view for another POP is not taken.
    let mut other = wire_view(9, &[]);
    other.pop = "south-1".into();
    assert!(!s.view_changed(Arc::new(View::from_pb(&other))));
}

#[test]
fn unsorted_views_are_sent_canonical() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.view_changed(view(5, &["b", "a", "b"]));
    let f = frames(&mut s);
    let [Kind::ViewSnapshot(snap)] = f.as_slice() else {
        panic!("{f:?}")
    };
    let names: Vec<_> = snap
        .view
        .as_ref()
        .unwrap()
        .services
        .iter()
        .map(|s| s.service.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
}

#[test]
fn nothing_older_than_the_agent_holds_is_sent() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    s.view_changed(view(8, &["a"]));
    // The agent applied epoch 10 from another hub node: this one is behind.
    s.handle_frame(t0, hello(10));
    let f = frames(&mut s);
    assert!(matches!(f.as_slice(), [Kind::Welcome(_)]), "{f:?}");
    s.view_changed(view(10, &["a", "b"]));
    let f = frames(&mut s);
    assert!(
        matches!(f.as_slice(), [Kind::ViewSnapshot(v)] if v.view.as_ref().unwrap().epoch == 10),
        "{f:?}"
    );
}

#[test]
fn refused_views_are_repaired_by_a_snapshot() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.view_changed(view(5, &["a"]));
    frames(&mut s);
    s.view_changed(view(6, &["b"]));
    frames(&mut s);
    // The agent says the delta's base is not what it holds (it has 5? no: 4).
    s.handle_frame(
        t0,
        frame(Kind::ViewRefused(pb::ViewRefused {
            epoch: 6,
            applied_epoch: 4,
            reason: pb::ViewRefusal::BaseMismatch as i32,
        })),
    );
    assert!(events(&mut s)
        .iter()
        .any(|e| matches!(e, HubEvent::ViewRefused { epoch: 6, .. })));
    let f = frames(&mut s);
    assert!(
        matches!(f.as_slice(), [Kind::ViewSnapshot(v)] if v.view.as_ref().unwrap().epoch == 6),
        "{f:?}"
    );

    // Stale: the agent holds 9; wait for a view at 9 or later.
    s.handle_frame(
        t0,
        frame(Kind::ViewRefused(pb::ViewRefused {
            epoch: 6,
            applied_epoch: 9,
            reason: pb::ViewRefusal::StaleEpoch as i32,
        })),
    );
    assert!(frames(&mut s).is_empty());
    s.view_changed(view(7, &["c"]));
    assert!(frames(&mut s).is_empty());
    s.view_changed(view(9, &["d"]));
    let f = frames(&mut s);
    assert!(
        matches!(f.as_slice(), [Kind::ViewSnapshot(v)] if v.view.as_ref().unwrap().epoch == 9),
        "{f:?}"
    );
}

#[test]
fn view_acks_are_reported_once_and_only_for_sent_epochs() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.view_changed(view(5, &["a"]));
    frames(&mut s);
    let ack = |e| frame(Kind::ViewAck(pb::ViewAck { epoch: e }));
    s.handle_frame(t0, ack(99));
    s.handle_frame(t0, ack(5));
    s.handle_frame(t0, ack(5));
    s.handle_frame(t0, ack(3));
    assert_eq!(events(&mut s), vec![HubEvent::ViewAcked { epoch: 5 }]);
    assert_eq!(s.acked_epoch(), 5);
}

// ----- exports ---------------------------------------------------------------

fn proposals(e: &[HubEvent]) -> Vec<&ExportProposal> {
    e.iter()
        .filter_map(|e| match e {
            HubEvent::ProposeExports(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn exports_are_acked_only_after_commit_one_batch_at_a_time() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, delta(1, true, &["a"]));
    s.handle_frame(t0, delta(2, false, &["b"]));
    s.handle_frame(t0, delta(3, false, &["c"]));
    let e = events(&mut s);
    let p = proposals(&e);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].seq, 1);
    assert!(p[0].full);
    // Identity from the certificate, indexes left to the state machine.
    assert_eq!(p[0].upserts[0].pop, POP);
    assert_eq!(p[0].upserts[0].exported_index, 0);
    let cmd = p[0].clone().into_command();
    assert!(matches!(
        cmd.kind,
        Some(pb::command::Kind::ApplyExports(ref a)) if a.pop == POP && a.seq == 1 && a.full
    ));
    assert!(frames(&mut s).is_empty(), "no ack before commit");

    // A commit for another seq changes nothing.
    s.export_committed(2);
    assert!(frames(&mut s).is_empty());

    s.export_committed(1);
    assert_eq!(
        frames(&mut s),
        vec![Kind::ExportAck(pb::ExportAck { seq: 1 })]
    );
    let e = events(&mut s);
    assert_eq!(proposals(&e)[0].seq, 2);
    s.export_committed(2);
    let e = events(&mut s);
    assert_eq!(proposals(&e)[0].seq, 3);
    s.export_committed(3);
    assert_eq!(
        frames(&mut s),
        vec![
            Kind::ExportAck(pb::ExportAck { seq: 2 }),
            Kind::ExportAck(pb::ExportAck { seq: 3 })
        ]
    );
}

#[test]
fn committed_resends_are_acked_at_once_and_in_flight_ones_ignored() {
    let t0 = Instant::now();
    let mut s = established(t0, 4);
    s.handle_frame(t0, delta(3, false, &["a"]));
    assert_eq!(
        frames(&mut s),
        vec![Kind::ExportAck(pb::ExportAck { seq: 4 })]
    );
    assert!(proposals(&events(&mut s)).is_empty());
    s.handle_frame(t0, delta(5, false, &["a"]));
    s.handle_frame(t0, delta(5, false, &["a"]));
    assert_eq!(proposals(&events(&mut s)).len(), 1);
    assert!(frames(&mut s).is_empty());
}

#[test]
fn a_gap_asks_for_the_whole_set() {
    let t0 = Instant::now();
    let mut s = established(t0, 4);
    s.handle_frame(t0, delta(7, false, &["a"]));
    assert_eq!(
        frames(&mut s),
        vec![Kind::ExportResync(pb::ExportResync {
            committed_seq: 4,
            error: String::new()
        })]
    );
    // Deltas sent before the agent read the resync are ignored, silently.
    s.handle_frame(t0, delta(8, false, &["a"]));
    assert!(frames(&mut s).is_empty());
    assert!(proposals(&events(&mut s)).is_empty());
    s.handle_frame(t0, delta(9, true, &["a", "b"]));
    let e = events(&mut s);
    let p = proposals(&e);
    assert_eq!((p[0].seq, p[0].full), (9, true));
    // And deltas continue from the full one.
    s.handle_frame(t0, delta(10, false, &["c"]));
    s.export_committed(9);
    assert_eq!(proposals(&events(&mut s))[0].seq, 10);
}

#[test]
fn a_full_set_must_be_numbered_above_earlier_ones() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, delta(1, false, &["a"]));
    s.handle_frame(t0, delta(2, false, &["a"]));
    s.handle_frame(t0, delta(2, true, &["a"]));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
}

#[test]
fn too_many_waiting_deltas_is_a_limit_error() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    for seq in 1..=18 {
        s.handle_frame(t0, delta(seq, false, &["a"]));
    }
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Limit)
    );
}

#[test]
fn invalid_export_is_a_limit_or_protocol_error() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, delta(1, false, &[""]));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
}

#[test]
fn refused_batch_is_reported_to_the_agent() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, delta(1, true, &["a"]));
    s.handle_frame(t0, delta(2, false, &["b"]));
    events(&mut s);
    s.export_refused(1, 0, "ports: duplicate port 80");
    assert_eq!(
        frames(&mut s),
        vec![Kind::ExportResync(pb::ExportResync {
            committed_seq: 0,
            error: "ports: duplicate port 80".into()
        })]
    );
    // The queued delta was dropped with it.
    assert!(proposals(&events(&mut s)).is_empty());
}

#[test]
fn out_of_sync_state_asks_for_the_whole_set_above_its_seq() {
    let t0 = Instant::now();
    let mut s = established(t0, 3);
    s.handle_frame(t0, delta(4, false, &["a"]));
    events(&mut s);
    s.export_out_of_sync(4, 10);
    assert_eq!(
        frames(&mut s),
        vec![Kind::ExportResync(pb::ExportResync {
            committed_seq: 10,
            error: String::new()
        })]
    );
}

#[test]
fn unacknowledged_writes_are_proposed_again_with_backoff() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(t0, delta(1, false, &["a"]));
    let first = proposals(&events(&mut s))[0].clone();
    s.export_failed(t0, 1);
    let retry = t0 + ms(200);
    assert!(s.poll_timeout().unwrap() <= retry);
    s.handle_timeout(retry - ms(1));
    assert!(proposals(&events(&mut s)).is_empty());
    s.handle_timeout(retry);
    let e = events(&mut s);
    assert_eq!(proposals(&e), vec![&first]);
    // Second failure: twice the wait.
    s.export_failed(retry, 1);
    s.handle_timeout(retry + ms(399));
    assert!(proposals(&events(&mut s)).is_empty());
    s.handle_timeout(retry + ms(400));
    assert_eq!(proposals(&events(&mut s)).len(), 1);
    s.export_committed(1);
    assert_eq!(
        frames(&mut s),
        vec![Kind::ExportAck(pb::ExportAck { seq: 1 })]
    );
}

// ----- liveness ----------------------------------------------------------------

fn liveness(e: &[HubEvent]) -> Vec<Liveness> {
    e.iter()
        .filter_map(|e| match e {
            HubEvent::Liveness { state, .. } => Some(*state),
            _ => None,
        })
        .collect()
}

/// Runs the session like the shell would: heartbeats at `beats` (ms),
/// timers honoured; returns liveness transitions with their times.
fn drive(s: &mut HubSession, t0: Instant, beats: &[u64], until: u64) -> Vec<(u64, Liveness)> {
    let mut out = Vec::new();
    let mut seq = 0;
    let mut beats = beats.iter().peekable();
    let mut t = 0;
    while t <= until {
        if let Some(&&b) = beats.peek() {
            if b <= t {
                seq += 1;
                s.handle_datagram(t0 + ms(b), &heartbeat(seq));
                beats.next();
            }
        }
        if s.poll_timeout().is_some_and(|d| d <= t0 + ms(t)) {
            s.handle_timeout(t0 + ms(t));
        }
        for l in liveness(&events(s)) {
            out.push((t, l));
        }
        t += 1;
    }
    out
}

#[test]
fn steady_heartbeats_keep_the_pop_online_and_silence_takes_it_offline() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    let beats: Vec<u64> = (1..=40).map(|i| i * 250).collect();
    let tr = drive(&mut s, t0, &beats, 12_000);
    assert_eq!(tr.len(), 2, "{tr:?}");
    assert_eq!(tr[0].1, Liveness::Suspect);
    assert_eq!(tr[1].1, Liveness::Offline);
    assert!(tr[0].0 - 10_000 <= 600, "{tr:?}");
    assert!(tr[1].0 - 10_000 <= 1_000, "{tr:?}");
    assert_eq!(s.stats().heartbeats, 40);

    // It comes back.
    s.handle_datagram(t0 + ms(12_001), &heartbeat(41));
    assert_eq!(liveness(&events(&mut s)), vec![Liveness::Online]);
}

#[test]
fn duplicate_and_reordered_heartbeats_do_not_count() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_datagram(t0 + ms(250), &heartbeat(2));
    s.handle_datagram(t0 + ms(260), &heartbeat(1));
    s.handle_datagram(t0 + ms(270), &heartbeat(2));
    assert_eq!(s.stats().heartbeats, 1);
    assert_eq!(s.stats().stale_heartbeats, 2);
    s.handle_datagram(t0 + ms(280), &[0xff; 3]);
    s.handle_datagram(t0 + ms(280), &vec![0; wire::MAX_DATAGRAM + 1]);
    assert_eq!(s.stats().dropped_datagrams, 2);
}

#[test]
fn datagrams_before_hello_are_dropped() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
    s.handle_datagram(t0, &heartbeat(1));
    assert_eq!(s.stats().dropped_datagrams, 1);
    assert!(events(&mut s).is_empty());
}

#[test]
fn rtt_reports_are_passed_on_with_the_certificate_pop() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    let sample = pb::RttSample {
        to_pop: "south-1".into(),
        rtt_us: 12_000,
        loss_permille: 5,
    };
    let d = encode_datagram(DKind::RttReport(pb::RttReport {
        samples: vec![sample.clone()],
    }))
    .unwrap();
    s.handle_datagram(t0, &d);
    assert_eq!(
        events(&mut s),
        vec![HubEvent::RttReport {
            pop: POP.into(),
            samples: vec![sample]
        }]
    );
}

#[test]
fn a_lost_connection_still_ends_offline_then_finishes() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_datagram(t0 + ms(250), &heartbeat(1));
    s.connection_lost(t0 + ms(300));
    assert_eq!(
        events(&mut s),
        vec![HubEvent::Closed(CloseReason::ConnectionLost)]
    );
    assert!(!s.is_finished());
    let tr = drive(&mut s, t0, &[], 2_000);
    assert_eq!(
        tr.iter().map(|t| t.1).collect::<Vec<_>>(),
        vec![Liveness::Suspect, Liveness::Offline]
    );
    assert!(s.is_finished());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn a_session_lost_after_the_pop_went_offline_finishes_at_once() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_timeout(t0 + ms(5_000));
    assert_eq!(
        liveness(&events(&mut s)),
        vec![Liveness::Suspect, Liveness::Offline]
    );
    s.connection_lost(t0 + ms(6_000));
    assert!(s.is_finished());
    assert_eq!(
        events(&mut s),
        vec![HubEvent::Closed(CloseReason::ConnectionLost)]
    );
}

#[test]
fn a_hub_side_close_reports_no_liveness() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.close(pb::UplinkErrorCode::ShuttingDown, "node stopping");
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::ShuttingDown)
    );
    assert!(s.is_finished());
    s.handle_timeout(t0 + ms(10_000));
    assert_eq!(
        events(&mut s),
        vec![HubEvent::Closed(CloseReason::Local(
            pb::UplinkErrorCode::ShuttingDown
        ))]
    );
}

// ----- certificates -----------------------------------------------------------

#[test]
fn csr_round_trip_one_at_a_time() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    let csr = |id| {
        frame(Kind::CsrRequest(pb::CsrRequest {
            request_id: id,
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            gateway_instance: String::new(),
        }))
    };
    s.handle_frame(t0, csr(1));
    assert!(matches!(
        events(&mut s).as_slice(),
        [HubEvent::CsrReceived { request_id: 1, .. }]
    ));
    s.certificate_issued(2, "wrong".into());
    assert!(frames(&mut s).is_empty());
    s.certificate_issued(1, "CERT".into());
    assert_eq!(
        frames(&mut s),
        vec![Kind::CertIssued(pb::CertIssued {
            request_id: 1,
            cert_pem: "CERT".into(),
            error: String::new()
        })]
    );
    s.handle_frame(t0, csr(2));
    events(&mut s);
    s.certificate_refused(2, "revoked".into());
    assert!(matches!(
        frames(&mut s).as_slice(),
        [Kind::CertIssued(c)] if c.cert_pem.is_empty() && c.error == "revoked"
    ));
    // Two outstanding at once is refused.
    s.handle_frame(t0, csr(3));
    s.handle_frame(t0, csr(4));
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
}

#[test]
fn session_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<HubSession>();
}

proptest! {
    /// Whatever the agent sends, the session does not panic, proposes
    /// strictly increasing sequence numbers, and keeps its queues bounded.
    #[test]
    fn arbitrary_stream_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..24),
        with_hello in any::<bool>(),
    ) {
        let t0 = Instant::now();
        let mut s = HubSession::new(config(), POP.into(), 1, 0, t0);
        if with_hello {
            s.handle_frame(t0, hello(0));
        }
        for (i, c) in chunks.iter().enumerate() {
            s.handle_stream_data(t0 + ms(i as u64), c);
            s.handle_datagram(t0 + ms(i as u64), c);
            s.handle_timeout(t0 + ms(i as u64 * 100));
        }
        let (f, e) = s.queued();
        prop_assert!(f < 64 && e < 64);
    }

    #[test]
    fn proposals_are_in_increasing_seq_order(
        ops in proptest::collection::vec((1u64..12, any::<bool>(), 0u8..4), 0..40),
    ) {
        let t0 = Instant::now();
        let mut s = established(t0, 0);
        let mut last = 0;
        for (seq, full, op) in ops {
            match op {
                0 | 1 => s.handle_frame(t0, delta(seq, full, &["a"])),
                2 => { let f = s.in_flight_export(); if let Some(f) = f { s.export_committed(f) } }
                _ => { let f = s.in_flight_export(); if let Some(f) = f { s.export_out_of_sync(f, seq) } }
            }
            for e in events(&mut s) {
                if let HubEvent::ProposeExports(p) = e {
                    prop_assert!(p.seq > last, "{} after {}", p.seq, last);
                    last = p.seq;
                }
            }
            frames(&mut s);
        }
    }
}

// ----- gateways ---------------------------------------------------------------

#[test]
fn gateway_address_from_hello_and_announce_names_the_certificate_pop() {
    let t0 = Instant::now();
    let mut s = HubSession::new(config(), POP.into(), 7, 0, t0);
    let mut h = hello(0);
    if let Some(Kind::Hello(h)) = &mut h.kind {
        h.gateway_addr = "10.0.0.1:7443".into();
    }
    s.handle_frame(t0, h);
    let ev = events(&mut s);
    assert!(ev.contains(&HubEvent::GatewayAddr {
        pop: POP.into(),
        gateway_addr: "10.0.0.1:7443".into()
    }));
    // Empty: nothing to record.
    s.handle_frame(
        t0,
        frame(Kind::GatewayAnnounce(pb::GatewayAnnounce {
            gateway_addr: String::new(),
        })),
    );
    assert!(events(&mut s).is_empty());
    s.handle_frame(
        t0,
        frame(Kind::GatewayAnnounce(pb::GatewayAnnounce {
            gateway_addr: "10.0.0.2:7443".into(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![HubEvent::GatewayAddr {
            pop: POP.into(),
            gateway_addr: "10.0.0.2:7443".into()
        }]
    );
    // Too long: a limit error closes the stream.
    s.handle_frame(
        t0,
        frame(Kind::GatewayAnnounce(pb::GatewayAnnounce {
            gateway_addr: format!("{}:1", "a".repeat(300)),
        })),
    );
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Limit)
    );
}

#[test]
fn gateway_csr_carries_a_checked_instance() {
    let t0 = Instant::now();
    let mut s = established(t0, 0);
    s.handle_frame(
        t0,
        frame(Kind::CsrRequest(pb::CsrRequest {
            request_id: 1,
            csr_pem: "CSR".into(),
            gateway_instance: "gw0".into(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![HubEvent::CsrReceived {
            request_id: 1,
            csr_pem: "CSR".into(),
            gateway_instance: "gw0".into()
        }]
    );
    s.certificate_issued(1, "CERT".into());
    frames(&mut s);
    // Not a DNS label: protocol error.
    s.handle_frame(
        t0,
        frame(Kind::CsrRequest(pb::CsrRequest {
            request_id: 2,
            csr_pem: "CSR".into(),
            gateway_instance: "GW/../x".into(),
        })),
    );
    assert_eq!(
        error_code(&frames(&mut s)),
        Some(pb::UplinkErrorCode::Protocol)
    );
}

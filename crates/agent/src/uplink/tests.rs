#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use prost::bytes::BytesMut;
use prost::Message;
use switchyard_proto::pb;
use switchyard_proto::pb::uplink_datagram::Kind as DKind;
use switchyard_proto::pb::uplink_frame::Kind;
use switchyard_proto::uplink::{self as wire, decode_datagram, diff_views, encode_frame};

use super::session::apply_export_delta;
use super::*;

const POP: &str = "north-1";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> AgentSessionConfig {
    AgentSessionConfig {
        pop: POP.into(),
        agent_version: "0.1.0".into(),
        ..Default::default()
    }
}

fn frame(kind: Kind) -> pb::UplinkFrame {
    pb::UplinkFrame { kind: Some(kind) }
}

fn welcome(export_seq: u64) -> pb::UplinkFrame {
    frame(Kind::Welcome(pb::Welcome {
        hub_node: "1".into(),
        heartbeat_interval_ms: 250,
        protocol_version: wire::PROTOCOL_VERSION,
        export_seq,
        session_id: 9,
    }))
}

fn key(name: &str) -> pb::ServiceKey {
    pb::ServiceKey {
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn export(name: &str, port: u32) -> pb::ServiceExport {
    pb::ServiceExport {
        service: Some(key(name)),
        ports: vec![pb::ServicePort {
            name: String::new(),
            port,
            protocol: 0,
        }],
        ..Default::default()
    }
}

fn view(epoch: u64, names: &[&str]) -> pb::PopView {
    pb::PopView {
        pop: POP.into(),
        epoch,
        services: names
            .iter()
            .map(|n| pb::ServiceView {
                service: Some(key(n)),
                vip: format!("127.77.0.{}", epoch % 250),
                ..Default::default()
            })
            .collect(),
        peers: vec![],
    }
}

fn snapshot(v: pb::PopView) -> pb::UplinkFrame {
    frame(Kind::ViewSnapshot(pb::ViewSnapshot { view: Some(v) }))
}

fn frames(s: &mut AgentSession) -> Vec<Kind> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|f| f.kind.unwrap())
        .collect()
}

fn events(s: &mut AgentSession) -> Vec<AgentEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn datagrams(s: &mut AgentSession) -> Vec<DKind> {
    std::iter::from_fn(|| s.poll_datagram())
        .map(|d| decode_datagram(&d).unwrap())
        .collect()
}

/// A session past Welcome, with Hello, heartbeat and events drained.
fn established(t0: Instant, resume: AgentResume, hub_seq: u64) -> AgentSession {
    let mut s = AgentSession::new(config(), resume, t0);
    assert!(matches!(frames(&mut s).as_slice(), [Kind::Hello(_)]));
    s.handle_frame(t0, welcome(hub_seq));
    events(&mut s);
    datagrams(&mut s);
    s
}

fn deltas(f: &[Kind]) -> Vec<&pb::ExportDelta> {
    f.iter()
        .filter_map(|k| match k {
            Kind::ExportDelta(d) => Some(d),
            _ => None,
        })
        .collect()
}

fn applied(e: &[AgentEvent]) -> Vec<u64> {
    e.iter()
        .filter_map(|e| match e {
            AgentEvent::ApplyView(v) => Some(v.epoch),
            _ => None,
        })
        .collect()
}

// ----- session -------------------------------------------------------------

#[test]
fn hello_first_with_what_the_agent_holds() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(
        config(),
        AgentResume::from_disk(Some(view(12, &["a"])), 5),
        t0,
    );
    let f = frames(&mut s);
    let [Kind::Hello(h)] = f.as_slice() else {
        panic!("{f:?}")
    };
    assert_eq!(h.pop, POP);
    assert_eq!(h.agent_version, "0.1.0");
    assert_eq!(h.last_applied_epoch, 12);
    assert_eq!(h.last_acked_export_seq, 5);
    assert_eq!(h.protocol_version, wire::PROTOCOL_VERSION);
    assert!(!s.is_established());
    // No heartbeats before Welcome.
    assert!(datagrams(&mut s).is_empty());
}

#[test]
fn frames_before_welcome_are_a_protocol_error() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    s.handle_frame(t0, snapshot(view(1, &[])));
    assert!(matches!(
        events(&mut s).as_slice(),
        [AgentEvent::Closed(AgentCloseReason::Protocol(
            wire::UplinkError::Unexpected { .. }
        ))]
    ));
    assert!(s.is_closed());
}

#[test]
fn welcome_timeout_closes() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    let d = s.poll_timeout().unwrap();
    s.handle_timeout(d);
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::Closed(AgentCloseReason::WelcomeTimeout)]
    );
}

#[test]
fn hub_error_closes_with_its_code() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.handle_frame(
        t0,
        frame(Kind::Error(pb::UplinkError {
            code: pb::UplinkErrorCode::Revoked as i32,
            message: "revoked".into(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::Closed(AgentCloseReason::Hub {
            code: pb::UplinkErrorCode::Revoked,
            message: "revoked".into()
        })]
    );
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn garbage_and_wrong_direction_close_the_session() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.handle_stream_data(t0, &[0, 0, 0, 2, 0xff, 0xff]);
    assert!(matches!(
        events(&mut s).as_slice(),
        [AgentEvent::Closed(AgentCloseReason::Protocol(
            wire::UplinkError::Malformed(_)
        ))]
    ));
    let mut s = established(t0, AgentResume::default(), 0);
    s.handle_frame(t0, frame(Kind::ViewAck(pb::ViewAck { epoch: 1 })));
    assert!(matches!(
        events(&mut s).as_slice(),
        [AgentEvent::Closed(AgentCloseReason::Protocol(
            wire::UplinkError::WrongDirection("ViewAck")
        ))]
    ));
}

#[test]
fn heartbeats_every_interval_without_bursts() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    frames(&mut s);
    s.handle_frame(t0 + ms(40), welcome(0));
    assert!(matches!(
        events(&mut s).as_slice(),
        [AgentEvent::Connected { heartbeat_interval, session_id: 9, .. }]
            if *heartbeat_interval == ms(250)
    ));
    // The first one at once.
    let d = datagrams(&mut s);
    assert!(matches!(d.as_slice(), [DKind::Heartbeat(h)] if h.seq == 1 && h.sent_at_us == 40_000));
    assert_eq!(s.poll_timeout(), Some(t0 + ms(290)));
    s.handle_timeout(t0 + ms(289));
    assert!(datagrams(&mut s).is_empty());
    s.handle_timeout(t0 + ms(290));
    assert!(matches!(datagrams(&mut s).as_slice(), [DKind::Heartbeat(h)] if h.seq == 2));
    // A timer that fires very late sends one heartbeat, not a burst.
    s.handle_timeout(t0 + ms(2_000));
    assert_eq!(datagrams(&mut s).len(), 1);
    assert_eq!(s.poll_timeout(), Some(t0 + ms(2_250)));
    // An undrained queue stays bounded.
    for i in 0..100 {
        s.handle_timeout(t0 + ms(3_000 + i * 250));
    }
    assert_eq!(datagrams(&mut s).len(), 16);
    // Heartbeats are small (idle budget): a few bytes each.
    s.handle_timeout(t0 + ms(100_000));
    let d = s.poll_datagram().unwrap();
    assert!(d.len() <= 12, "{} bytes", d.len());
}

#[test]
fn hub_heartbeat_interval_is_clamped() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    let mut w = welcome(0);
    if let Some(Kind::Welcome(w)) = &mut w.kind {
        w.heartbeat_interval_ms = 1;
    }
    s.handle_frame(t0, w);
    assert!(matches!(
        events(&mut s).as_slice(),
        [AgentEvent::Connected { heartbeat_interval, .. }] if *heartbeat_interval == ms(50)
    ));
}

#[test]
fn rtt_reports_are_split_into_datagrams() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    let samples: Vec<_> = (0..100)
        .map(|i| pb::RttSample {
            to_pop: format!("{}-{i}", "p".repeat(50)),
            rtt_us: 1_000 + i,
            loss_permille: 0,
        })
        .chain(std::iter::once(pb::RttSample {
            to_pop: String::new(),
            rtt_us: 1,
            loss_permille: 0,
        }))
        .collect();
    s.report_rtt(samples);
    let mut n = 0;
    while let Some(d) = s.poll_datagram() {
        assert!(d.len() <= wire::MAX_DATAGRAM);
        let DKind::RttReport(r) = decode_datagram(&d).unwrap() else {
            panic!()
        };
        n += r.samples.len();
    }
    assert_eq!(n, 100);
}

#[test]
fn certificate_renewal() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    assert_eq!(
        s.request_certificate("CSR".into()),
        Err(CsrError::NotConnected)
    );
    s.handle_frame(t0, welcome(0));
    frames(&mut s);
    events(&mut s);
    let id = s.request_certificate("CSR".into()).unwrap();
    assert_eq!(s.request_certificate("CSR".into()), Err(CsrError::Pending));
    assert!(matches!(
        frames(&mut s).as_slice(),
        [Kind::CsrRequest(c)] if c.request_id == id && c.csr_pem == "CSR"
    ));
    s.handle_frame(
        t0,
        frame(Kind::CertIssued(pb::CertIssued {
            request_id: id,
            cert_pem: "CERT".into(),
            error: String::new(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::CertificateIssued {
            request_id: id,
            cert_pem: "CERT".into()
        }]
    );
    let id = s.request_certificate("CSR".into()).unwrap();
    s.handle_frame(
        t0,
        frame(Kind::CertIssued(pb::CertIssued {
            request_id: id,
            cert_pem: String::new(),
            error: "revoked".into(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::CertificateRefused {
            request_id: id,
            reason: "revoked".into()
        }]
    );
}

#[test]
fn session_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<AgentSession>();
}

// ----- views ---------------------------------------------------------------

#[test]
fn a_view_is_acked_only_once_persisted() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.handle_frame(t0, snapshot(view(5, &["a", "b"])));
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::ApplyView(view(5, &["a", "b"]).into())]
    );
    assert!(frames(&mut s).is_empty(), "no ack before persisted");
    let d = diff_views(&view(5, &["a", "b"]), &view(7, &["a", "c"]));
    s.handle_frame(t0, frame(Kind::ViewDelta(d)));
    assert_eq!(applied(&events(&mut s)), vec![7]);
    // The older one lands on disk: still nothing (the agent holds 7).
    s.view_persisted(5);
    assert!(frames(&mut s).is_empty());
    // A persist for an epoch never applied is ignored.
    s.view_persisted(8);
    assert!(frames(&mut s).is_empty());
    s.view_persisted(7);
    assert_eq!(
        frames(&mut s),
        vec![Kind::ViewAck(pb::ViewAck { epoch: 7 })]
    );
    s.view_persisted(7);
    assert!(frames(&mut s).is_empty());
    assert_eq!(s.view(), Some(&view(7, &["a", "c"])));
}

#[test]
fn the_same_view_after_reconnect_is_acked_without_rewrite() {
    let t0 = Instant::now();
    let lkg = view(9, &["a"]);
    let mut s = established(t0, AgentResume::from_disk(Some(lkg.clone()), 0), 0);
    s.handle_frame(t0, snapshot(lkg));
    assert!(applied(&events(&mut s)).is_empty());
    assert_eq!(
        frames(&mut s),
        vec![Kind::ViewAck(pb::ViewAck { epoch: 9 })]
    );
}

fn refusal(f: &[Kind]) -> Option<(u64, u64, pb::ViewRefusal)> {
    f.iter().find_map(|k| match k {
        Kind::ViewRefused(r) => Some((
            r.epoch,
            r.applied_epoch,
            pb::ViewRefusal::try_from(r.reason).unwrap(),
        )),
        _ => None,
    })
}

#[test]
fn a_lower_epoch_is_refused_and_reported() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::from_disk(Some(view(10, &["a"])), 0), 0);
    // A lagging hub node offers epoch 8.
    s.handle_frame(t0, snapshot(view(8, &["old"])));
    assert_eq!(
        refusal(&frames(&mut s)),
        Some((8, 10, pb::ViewRefusal::StaleEpoch))
    );
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::ViewRefused {
            epoch: 8,
            applied_epoch: 10,
            reason: pb::ViewRefusal::StaleEpoch
        }]
    );
    assert_eq!(s.view(), Some(&view(10, &["a"])));
    // And its deltas.
    let d = diff_views(&view(8, &["old"]), &view(9, &["old", "b"]));
    s.handle_frame(t0, frame(Kind::ViewDelta(d)));
    assert_eq!(
        refusal(&frames(&mut s)),
        Some((9, 10, pb::ViewRefusal::StaleEpoch))
    );
    assert_eq!(s.applied_epoch(), 10);
    assert_eq!(s.stats().views_refused, 2);
}

#[test]
fn a_delta_on_another_base_is_refused() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    // No view held at all.
    let d = diff_views(&view(3, &[]), &view(4, &["a"]));
    s.handle_frame(t0, frame(Kind::ViewDelta(d)));
    assert_eq!(
        refusal(&frames(&mut s)),
        Some((4, 0, pb::ViewRefusal::BaseMismatch))
    );
    s.handle_frame(t0, snapshot(view(5, &["a"])));
    events(&mut s);
    let d = diff_views(&view(4, &[]), &view(6, &["a"]));
    s.handle_frame(t0, frame(Kind::ViewDelta(d)));
    assert_eq!(
        refusal(&frames(&mut s)),
        Some((6, 5, pb::ViewRefusal::BaseMismatch))
    );
    assert_eq!(s.applied_epoch(), 5);
}

#[test]
fn a_view_for_another_pop_is_refused() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    let mut v = view(5, &["a"]);
    v.pop = "south-1".into();
    s.handle_frame(t0, snapshot(v));
    assert_eq!(
        refusal(&frames(&mut s)),
        Some((5, 0, pb::ViewRefusal::WrongPop))
    );
    assert_eq!(s.view(), None);
}

// ----- exports ---------------------------------------------------------------

fn ack(seq: u64) -> pb::UplinkFrame {
    frame(Kind::ExportAck(pb::ExportAck { seq }))
}

#[test]
fn nothing_is_exported_before_the_source_speaks_or_before_welcome() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    frames(&mut s);
    s.export_changed(vec![export("a", 80)]).unwrap();
    assert!(frames(&mut s).is_empty());
    s.handle_frame(t0, welcome(0));
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!(d.len(), 1);
    assert!(d[0].full);
    assert_eq!(d[0].seq, 1);

    let mut s = established(t0, AgentResume::default(), 0);
    assert!(frames(&mut s).is_empty());
}

#[test]
fn deltas_against_the_acked_set_with_increasing_seqs() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.export_changed(vec![export("a", 80), export("b", 80)])
        .unwrap();
    let f = frames(&mut s);
    assert_eq!(deltas(&f)[0].seq, 1);
    // While seq 1 is in flight, changes coalesce.
    s.export_changed(vec![export("a", 81), export("b", 80)])
        .unwrap();
    s.export_changed(vec![export("a", 81), export("c", 80)])
        .unwrap();
    assert!(frames(&mut s).is_empty());
    assert_eq!(s.unacked_exports(), 1);
    s.handle_frame(t0, ack(1));
    assert_eq!(events(&mut s), vec![AgentEvent::ExportsAcked { seq: 1 }]);
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].seq, 2);
    assert!(!d[0].full);
    assert_eq!(d[0].upserts, vec![export("a", 81), export("c", 80)]);
    assert_eq!(d[0].withdrawals, vec![key("b")]);
    // An unchanged set sends nothing.
    s.handle_frame(t0, ack(2));
    s.export_changed(vec![export("c", 80), export("a", 81)])
        .unwrap();
    assert!(frames(&mut s).is_empty());
    assert_eq!(s.last_acked_export_seq(), 2);
    // Stale or unknown acks are ignored.
    s.handle_frame(t0, ack(1));
    s.handle_frame(t0, ack(99));
    assert!(events(&mut s)
        .iter()
        .all(|e| matches!(e, AgentEvent::ExportsAcked { seq: 2 })));
}

#[test]
fn a_wider_window_pipelines_deltas() {
    let t0 = Instant::now();
    let mut cfg = config();
    cfg.max_exports_in_flight = 3;
    let mut s = AgentSession::new(cfg, AgentResume::default(), t0);
    s.handle_frame(t0, welcome(0));
    frames(&mut s);
    for p in 1..=5 {
        s.export_changed(vec![export("a", p)]).unwrap();
    }
    let f = frames(&mut s);
    assert_eq!(
        deltas(&f).iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // A cumulative ack covers several.
    s.handle_frame(t0, ack(2));
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].seq, 4);
    assert_eq!(d[0].upserts, vec![export("a", 5)]);
}

#[test]
fn unacked_deltas_are_resent_after_reconnect() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.export_changed(vec![export("a", 80)]).unwrap();
    frames(&mut s);
    s.handle_frame(t0, ack(1));
    s.export_changed(vec![export("a", 80), export("b", 80)])
        .unwrap();
    let sent = deltas(&frames(&mut s))[0].clone();
    assert_eq!(sent.seq, 2);
    s.connection_lost(t0);
    let resume = s.into_resume();
    assert_eq!(resume.last_acked_export_seq, 1);
    assert_eq!(resume.unacked, vec![sent.clone()]);

    // The next hub node has committed 1: seq 2 goes again, unchanged.
    let mut s = established(t0, resume.clone(), 1);
    let f = frames(&mut s);
    assert_eq!(deltas(&f), vec![&sent]);

    // Another one had committed 2 already: nothing to resend, and the ack
    // is recorded.
    let mut s = AgentSession::new(config(), resume.clone(), t0);
    frames(&mut s);
    s.handle_frame(t0, welcome(2));
    assert!(deltas(&frames(&mut s)).is_empty());
    assert!(events(&mut s).contains(&AgentEvent::ExportsAcked { seq: 2 }));
    assert_eq!(s.last_acked_export_seq(), 2);
    // And deltas continue from there.
    s.export_changed(vec![export("b", 80)]).unwrap();
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!((d[0].seq, d[0].full), (3, false));
    assert_eq!(d[0].withdrawals, vec![key("a")]);

    // A hub whose state is ahead of what we sent, or behind what it acked:
    // the whole set, numbered above both.
    for hub_seq in [7, 0] {
        let mut s = established(t0, resume.clone(), hub_seq);
        let f = frames(&mut s);
        let d = deltas(&f);
        assert_eq!(d.len(), 1);
        assert!(d[0].full);
        assert_eq!(d[0].seq, hub_seq.max(2) + 1);
        assert_eq!(d[0].upserts, vec![export("a", 80), export("b", 80)]);
    }
}

#[test]
fn after_a_restart_the_first_export_is_the_whole_set() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::from_disk(None, 4), t0);
    frames(&mut s);
    s.export_changed(vec![export("a", 80)]).unwrap();
    s.handle_frame(t0, welcome(4));
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!((d[0].seq, d[0].full), (5, true));
    s.handle_frame(t0, ack(5));
    s.export_changed(vec![]).unwrap();
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!((d[0].seq, d[0].full), (6, false));
    assert_eq!(d[0].withdrawals, vec![key("a")]);
}

#[test]
fn resync_sends_the_whole_set_above_everything_used() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.export_changed(vec![export("a", 80)]).unwrap();
    frames(&mut s);
    s.handle_frame(
        t0,
        frame(Kind::ExportResync(pb::ExportResync {
            committed_seq: 0,
            error: String::new(),
        })),
    );
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!((d[0].seq, d[0].full), (2, true));
}

#[test]
fn a_refused_set_is_reported_and_not_retried_until_it_changes() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    s.export_changed(vec![export("a", 0)]).unwrap();
    frames(&mut s);
    s.handle_frame(
        t0,
        frame(Kind::ExportResync(pb::ExportResync {
            committed_seq: 0,
            error: "port 0".into(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::ExportRefused {
            reason: "port 0".into()
        }]
    );
    assert!(frames(&mut s).is_empty());
    s.export_changed(vec![export("a", 0)]).unwrap();
    assert!(frames(&mut s).is_empty());
    s.export_changed(vec![export("a", 80)]).unwrap();
    let f = frames(&mut s);
    let d = deltas(&f);
    assert_eq!((d[0].seq, d[0].full), (2, true));
}

#[test]
fn export_limits_are_checked_locally() {
    let t0 = Instant::now();
    let mut s = established(t0, AgentResume::default(), 0);
    assert!(matches!(
        s.export_changed(vec![export("a", 80), export("a", 81)]),
        Err(ExportError::Duplicate { .. })
    ));
    assert!(matches!(
        s.export_changed(vec![export("", 80)]),
        Err(ExportError::Invalid(_))
    ));
    let many: Vec<_> = (0..=wire::MAX_EXPORTS_PER_POP)
        .map(|i| export(&format!("s{i}"), 80))
        .collect();
    assert!(matches!(
        s.export_changed(many),
        Err(ExportError::TooMany { .. })
    ));
    let mut big = export("a", 80);
    big.endpoints = (0..1000)
        .map(|i| pb::Endpoint {
            address: format!("10.0.{}.{}", i / 250, i % 250),
            port: 80,
            ready: true,
            hostname: "h".repeat(600),
        })
        .collect();
    assert!(matches!(
        s.export_changed(vec![big]),
        Err(ExportError::TooLarge { .. })
    ));
    assert!(frames(&mut s).is_empty());
    // The index fields and POP are not the agent's to send.
    let mut e = export("a", 80);
    e.pop = "x".into();
    e.updated_index = 5;
    s.export_changed(vec![e]).unwrap();
    let f = frames(&mut s);
    assert_eq!(deltas(&f)[0].upserts, vec![export("a", 80)]);
    // And any delta fits in a frame.
    let mut buf = BytesMut::new();
    encode_frame(&frame(f[0].clone()), &mut buf).unwrap();
}

// ----- properties ---------------------------------------------------------------

/// A hub node as far as views go: its applied views only move forward,
/// but different nodes are at different epochs. It does not respect the
/// agent's floor on purpose: the agent must fence by itself.
#[derive(Clone)]
struct ModelHub {
    view: pb::PopView,
}

#[derive(Debug, Clone)]
enum Op {
    /// Node `n` applies a new view `by` epochs later, with these services.
    Advance { n: usize, by: u64, names: Vec<u8> },
    /// Deliver the connected node's pending view as a snapshot or delta.
    Push,
    /// Reconnect to node `n`.
    Reconnect { n: usize },
    /// The shell persists the last applied view.
    Persist,
    /// A forged or corrupted view frame with arbitrary epochs.
    Inject {
        epoch: u64,
        from: u64,
        snapshot: bool,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..3, 0u64..4, proptest::collection::vec(0u8..5, 0..4))
            .prop_map(|(n, by, names)| Op::Advance { n, by, names }),
        Just(Op::Push),
        Just(Op::Push),
        (0usize..3).prop_map(|n| Op::Reconnect { n }),
        Just(Op::Persist),
        (0u64..40, 0u64..40, any::<bool>()).prop_map(|(epoch, from, snapshot)| Op::Inject {
            epoch,
            from,
            snapshot
        }),
    ]
}

fn names_view(epoch: u64, names: &[u8]) -> pb::PopView {
    let names: Vec<String> = names.iter().map(|n| format!("s{n}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    wire::canonical_view(&view(epoch, &refs))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever order hub nodes' views reach the agent in (reconnects to
    /// lagging nodes, coalesced pushes, forged frames), the agent never
    /// applies an epoch lower than one it applied, nor below its LKG.
    #[test]
    fn the_agent_never_applies_a_lower_epoch(
        lkg_epoch in 0u64..10,
        starts in proptest::collection::vec(0u64..15, 3),
        ops in proptest::collection::vec(arb_op(), 0..60),
    ) {
        let t0 = Instant::now();
        let mut hubs: Vec<ModelHub> = starts
            .iter()
            .map(|&e| ModelHub { view: names_view(e, &[0]) })
            .collect();
        let lkg = names_view(lkg_epoch, &[1]);
        let mut s = established(t0, AgentResume::from_disk(Some(lkg), 0), 0);
        let mut node = 0usize;
        // What the connected node last sent on this connection.
        let mut sent: Option<pb::PopView> = None;
        let mut floor = lkg_epoch;
        let check = |s: &mut AgentSession, floor: &mut u64| -> Result<(), TestCaseError> {
            for e in events(s) {
                if let AgentEvent::ApplyView(v) = e {
                    prop_assert!(v.epoch >= *floor, "applied {} after {}", v.epoch, floor);
                    prop_assert_eq!(v.pop.as_str(), POP);
                    *floor = v.epoch;
                }
            }
            prop_assert_eq!(s.applied_epoch(), *floor);
            prop_assert!(s.view().is_none_or(|v| v.epoch == *floor));
            Ok(())
        };
        for op in ops {
            match op {
                Op::Advance { n, by, names } => {
                    let h = &mut hubs[n];
                    h.view = names_view(h.view.epoch + by, &names);
                }
                Op::Push => {
                    let cur = hubs[node].view.clone();
                    let f = match &sent {
                        None => snapshot(cur.clone()),
                        Some(old) if old.epoch < cur.epoch => frame(Kind::ViewDelta(diff_views(old, &cur))),
                        Some(_) => continue,
                    };
                    sent = Some(cur);
                    s.handle_frame(t0, f);
                    // A refusal makes the hub fall back to a snapshot.
                    if frames(&mut s).iter().any(|k| matches!(k, Kind::ViewRefused(_))) {
                        sent = None;
                    }
                }
                Op::Reconnect { n } => {
                    s.connection_lost(t0);
                    let resume = s.into_resume();
                    s = established(t0, resume, 0);
                    node = n;
                    sent = None;
                }
                Op::Persist => {
                    s.view_persisted(s.applied_epoch());
                    frames(&mut s);
                }
                Op::Inject { epoch, from, snapshot: snap } => {
                    let f = if snap {
                        snapshot(names_view(epoch, &[3]))
                    } else {
                        frame(Kind::ViewDelta(pb::ViewDelta {
                            from_epoch: from,
                            epoch,
                            upserts: names_view(epoch, &[4]).services,
                            removals: vec![key("s1")],
                            header: Some(pb::PopView { pop: POP.into(), epoch, services: vec![], peers: vec![] }),
                        }))
                    };
                    s.handle_frame(t0, f);
                    frames(&mut s);
                }
            }
            check(&mut s, &mut floor)?;
        }
    }

    /// Exports converge: after any mix of changes, lost acks, reconnects to
    /// nodes at different points, and restarts, the hub's committed set
    /// ends equal to the agent's desired set once the link is quiet.
    #[test]
    fn exports_converge_through_reconnects_and_restarts(
        ops in proptest::collection::vec((0u8..6, proptest::collection::vec((0u8..4, 80u32..82), 0..4)), 1..40),
    ) {
        let t0 = Instant::now();
        // The replicated state: last seq and the set (state-machine rules:
        // seq <= last is a no-op; a full set replaces).
        let mut hub_seq = 0u64;
        let mut hub_set = ExportSet::new();
        // Frames in flight from agent to hub, and acks back.
        let mut persisted_ack = 0u64;
        let mut s = established(t0, AgentResume::from_disk(None, 0), 0);
        let mut desired: Vec<pb::ServiceExport> = Vec::new();
        let deliver = |s: &mut AgentSession, hub_seq: &mut u64, hub_set: &mut ExportSet, drop_acks: bool| {
            let mut acks = Vec::new();
            for k in frames(s) {
                if let Kind::ExportDelta(d) = k {
                    if d.seq > *hub_seq {
                        if !d.full {
                            assert_eq!(d.seq, *hub_seq + 1, "gap");
                        }
                        apply_export_delta(hub_set, &d);
                        *hub_seq = d.seq;
                    }
                    acks.push(*hub_seq);
                }
            }
            if !drop_acks {
                for a in acks {
                    s.handle_frame(Instant::now(), ack(a));
                }
            }
        };
        for (op, names) in ops {
            match op {
                0 | 1 => {
                    let mut set = std::collections::BTreeMap::new();
                    for (n, p) in names {
                        set.insert(n, export(&format!("s{n}"), p));
                    }
                    desired = set.into_values().collect();
                    s.export_changed(desired.clone()).unwrap();
                }
                2 => deliver(&mut s, &mut hub_seq, &mut hub_set, false),
                3 => {
                    // Committed, but the connection drops before the ack.
                    deliver(&mut s, &mut hub_seq, &mut hub_set, true);
                    s.connection_lost(t0);
                    let r = s.into_resume();
                    s = established(t0, r, hub_seq);
                }
                4 => {
                    // Lost in flight: not committed.
                    frames(&mut s);
                    s.connection_lost(t0);
                    let r = s.into_resume();
                    s = established(t0, r, hub_seq);
                }
                _ => {
                    // Restart: only the persisted ack survives; the source
                    // gives the desired set again.
                    frames(&mut s);
                    s = AgentSession::new(config(), AgentResume::from_disk(None, persisted_ack), t0);
                    frames(&mut s);
                    s.export_changed(desired.clone()).unwrap();
                    s.handle_frame(t0, welcome(hub_seq));
                }
            }
            for e in events(&mut s) {
                if let AgentEvent::ExportsAcked { seq } = e {
                    prop_assert!(seq <= hub_seq);
                    persisted_ack = seq;
                }
            }
        }
        if desired.is_empty() && hub_seq == 0 {
            // Nothing was ever exported.
            return Ok(());
        }
        s.export_changed(desired.clone()).unwrap();
        for _ in 0..4 {
            deliver(&mut s, &mut hub_seq, &mut hub_set, false);
        }
        let want: ExportSet = desired
            .into_iter()
            .map(|e| (wire::service_key(e.service.as_ref()), e))
            .collect();
        prop_assert_eq!(hub_set, want);
        prop_assert_eq!(s.unacked_exports(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..24),
    ) {
        let t0 = Instant::now();
        let mut s = established(t0, AgentResume::default(), 0);
        for (i, c) in chunks.iter().enumerate() {
            s.handle_stream_data(t0 + ms(i as u64), c);
            s.handle_datagram(t0, c);
            s.handle_timeout(t0 + ms(i as u64 * 100));
        }
        let _ = pb::UplinkFrame::decode(&[][..]);
    }
}

// ----- gateways ---------------------------------------------------------------

#[test]
fn gateway_address_goes_in_hello_and_changes_are_announced_once() {
    let t0 = Instant::now();
    let cfg = AgentSessionConfig {
        gateway_addr: "10.0.0.1:7443".into(),
        ..config()
    };
    let mut s = AgentSession::new(cfg, AgentResume::default(), t0);
    match frames(&mut s).as_slice() {
        [Kind::Hello(h)] => assert_eq!(h.gateway_addr, "10.0.0.1:7443"),
        other => panic!("{other:?}"),
    }
    s.handle_frame(t0, welcome(0));
    frames(&mut s);
    assert!(!s.set_gateway_addr("10.0.0.1:7443".into()), "unchanged");
    assert!(frames(&mut s).is_empty());
    assert!(s.set_gateway_addr("10.0.0.2:7443".into()));
    match frames(&mut s).as_slice() {
        [Kind::GatewayAnnounce(g)] => assert_eq!(g.gateway_addr, "10.0.0.2:7443"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gateway_certificate_requests_share_the_one_csr_slot() {
    let t0 = Instant::now();
    let mut s = AgentSession::new(config(), AgentResume::default(), t0);
    assert_eq!(
        s.request_gateway_certificate("gw0", "CSR".into()),
        Err(CsrError::NotConnected)
    );
    frames(&mut s);
    s.handle_frame(t0, welcome(0));
    frames(&mut s);
    events(&mut s);
    assert_eq!(
        s.request_gateway_certificate("", "CSR".into()),
        Err(CsrError::NoInstance)
    );
    let id = s.request_gateway_certificate("gw0", "CSR".into()).unwrap();
    match frames(&mut s).as_slice() {
        [Kind::CsrRequest(c)] => {
            assert_eq!(c.request_id, id);
            assert_eq!(c.gateway_instance, "gw0");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.request_certificate("CSR".into()), Err(CsrError::Pending));
    s.handle_frame(
        t0,
        frame(Kind::CertIssued(pb::CertIssued {
            request_id: id,
            cert_pem: "CERT".into(),
            error: String::new(),
        })),
    );
    assert_eq!(
        events(&mut s),
        vec![AgentEvent::CertificateIssued {
            request_id: id,
            cert_pem: "CERT".into()
        }]
    );
}

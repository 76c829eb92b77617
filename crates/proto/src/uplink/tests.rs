#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;

fn key(ns: &str, name: &str) -> pb::ServiceKey {
    pb::ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn hello_frame() -> pb::UplinkFrame {
    pb::UplinkFrame {
        kind: Some(FrameKind::Hello(pb::Hello {
            pop: "north-1".into(),
            agent_version: "0.1.0".into(),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })),
    }
}

#[test]
fn reader_round_trip_in_pieces() {
    let mut wire = BytesMut::new();
    encode_frame(&hello_frame(), &mut wire).unwrap();
    encode_frame(&hello_frame(), &mut wire).unwrap();
    let mut reader = FrameReader::new(Direction::AgentToHub);
    let mut got = 0;
    for b in wire.iter() {
        reader.push(&[*b]).unwrap();
        while let Some(f) = reader.next_frame().unwrap() {
            assert_eq!(f, hello_frame());
            got += 1;
        }
    }
    assert_eq!(got, 2);
    assert_eq!(reader.buffered(), 0);
}

#[test]
fn reader_refuses_oversized_header_before_body() {
    let mut reader = FrameReader::new(Direction::AgentToHub);
    let len = (MAX_AGENT_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        reader.push(&len),
        Err(UplinkError::TooLarge { .. })
    ));
    assert_eq!(
        UplinkError::TooLarge { len: 1, max: 0 }.code(),
        pb::UplinkErrorCode::Limit
    );
}

#[test]
fn reader_refuses_unknown_kind_and_wrong_direction() {
    // An empty message: no kind (also what an unknown oneof field decodes to).
    let mut reader = FrameReader::new(Direction::AgentToHub);
    reader.push(&[0, 0, 0, 0]).unwrap();
    assert_eq!(reader.next_frame(), Err(UplinkError::UnknownKind));

    // Field 31 (unknown to this version), length-delimited, empty.
    let mut reader = FrameReader::new(Direction::AgentToHub);
    reader.push(&[0, 0, 0, 3, 0xfa, 0x01, 0x00]).unwrap();
    assert_eq!(reader.next_frame(), Err(UplinkError::UnknownKind));

    let mut reader = FrameReader::new(Direction::HubToAgent);
    let mut wire = BytesMut::new();
    encode_frame(&hello_frame(), &mut wire).unwrap();
    reader.push(&wire).unwrap();
    assert_eq!(
        reader.next_frame(),
        Err(UplinkError::WrongDirection("Hello"))
    );
}

#[test]
fn datagram_limits() {
    let hb = DatagramKind::Heartbeat(pb::Heartbeat {
        seq: 7,
        sent_at_us: 1_000_000,
    });
    let bytes = encode_datagram(hb.clone()).unwrap();
    assert!(bytes.len() < 16, "heartbeat is {} bytes", bytes.len());
    assert_eq!(decode_datagram(&bytes).unwrap(), hb);
    assert_eq!(
        decode_datagram(&[0u8; MAX_DATAGRAM + 1]),
        Err(DatagramError::TooLarge(MAX_DATAGRAM + 1))
    );
    assert_eq!(decode_datagram(&[]), Err(DatagramError::UnknownKind));
    assert!(matches!(
        decode_datagram(&[0xff, 0xff]),
        Err(DatagramError::Malformed(_))
    ));
    let big = DatagramKind::RttReport(pb::RttReport {
        samples: (0..40)
            .map(|i| pb::RttSample {
                to_pop: format!("p{i}"),
                rtt_us: 1,
                loss_permille: 0,
            })
            .collect(),
    });
    let bytes = encode_datagram(big).unwrap();
    assert!(matches!(
        decode_datagram(&bytes),
        Err(DatagramError::Limit(_))
    ));
}

#[test]
fn export_delta_checks() {
    let ok = pb::ExportDelta {
        seq: 1,
        upserts: vec![pb::ServiceExport {
            service: Some(key("shop", "orders")),
            ..Default::default()
        }],
        withdrawals: vec![key("shop", "old")],
        full: false,
    };
    check_export_delta(&ok).unwrap();
    let mut bad = ok.clone();
    bad.withdrawals.push(key("", "x"));
    assert!(matches!(
        check_export_delta(&bad),
        Err(UplinkError::Invalid(_))
    ));
    let mut bad = ok.clone();
    bad.upserts[0].service = Some(key("shop", &"x".repeat(64)));
    assert!(matches!(
        check_export_delta(&bad),
        Err(UplinkError::Limit(_))
    ));
    let mut bad = ok;
    bad.upserts[0].endpoints = vec![pb::Endpoint::default(); MAX_ENDPOINTS_PER_SERVICE + 1];
    assert!(matches!(
        check_export_delta(&bad),
        Err(UplinkError::Limit(_))
    ));
}

#[test]
fn delta_base_and_direction_checked() {
    let old = pb::PopView {
        pop: "a".into(),
        epoch: 5,
        services: vec![],
        peers: vec![],
    };
    let mut d = diff_views(
        &old,
        &pb::PopView {
            epoch: 7,
            ..old.clone()
        },
    );
    assert_eq!(apply_delta(&old, &d).unwrap().epoch, 7);
    d.from_epoch = 4;
    assert_eq!(
        apply_delta(&old, &d),
        Err(DeltaError::BaseMismatch { from: 4, held: 5 })
    );
    d.from_epoch = 5;
    d.epoch = 3;
    assert_eq!(
        apply_delta(&old, &d),
        Err(DeltaError::Backwards { from: 5, to: 3 })
    );
}

#[test]
fn unchanged_services_are_not_sent() {
    let svc = |name: &str, ttl| pb::ServiceView {
        service: Some(key("shop", name)),
        dns_ttl_s: ttl,
        ..Default::default()
    };
    let old = pb::PopView {
        pop: "a".into(),
        epoch: 1,
        services: vec![svc("a", 5), svc("b", 5), svc("c", 5)],
        peers: vec![],
    };
    let new = pb::PopView {
        pop: "a".into(),
        epoch: 2,
        services: vec![svc("a", 5), svc("b", 9), svc("d", 5)],
        peers: vec![],
    };
    let d = diff_views(&old, &new);
    let names: Vec<_> = d
        .upserts
        .iter()
        .map(|s| s.service.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, vec!["b", "d"]);
    assert_eq!(d.removals, vec![key("shop", "c")]);
    assert_eq!(apply_delta(&old, &d).unwrap(), new);
}

fn arb_service() -> impl Strategy<Value = pb::ServiceView> {
    (
        "[a-c]{1,2}",
        "[a-d]{1,2}",
        0u32..3,
        proptest::collection::vec(0u32..4, 0..3),
        proptest::collection::vec(proptest::collection::vec(("[pqr]", 0u32..3), 0..3), 0..3),
    )
        .prop_map(|(ns, name, ttl, ports, tiers)| pb::ServiceView {
            service: Some(key(&ns, &name)),
            vip: format!("127.77.0.{ttl}"),
            ports,
            tiers: tiers
                .into_iter()
                .map(|t| pb::Tier {
                    targets: t
                        .into_iter()
                        .map(|(pop, weight)| pb::Target {
                            pop,
                            weight,
                            endpoints: vec![],
                        })
                        .collect(),
                })
                .collect(),
            dns_ttl_s: ttl,
            ..Default::default()
        })
}

fn arb_view() -> impl Strategy<Value = pb::PopView> {
    (
        0u64..100,
        proptest::collection::vec(arb_service(), 0..8),
        "[xy]",
        proptest::collection::vec(("[a-c]", "[0-9]{1,2}"), 0..3),
    )
        .prop_map(|(epoch, services, pop, peers)| pb::PopView {
            pop,
            epoch,
            services,
            peers: peers
                .into_iter()
                .map(|(pop, port)| pb::PeerGateway {
                    pop,
                    gateway_addr: format!("127.0.0.1:{port}"),
                })
                .collect(),
        })
}

proptest! {
    #[test]
    fn apply_inverts_diff(old in arb_view(), new in arb_view()) {
        // Views as the hub holds them: canonical. Deltas go forward only.
        let old = canonical_view(&old);
        let mut new = canonical_view(&new);
        new.epoch += old.epoch;
        let delta = diff_views(&old, &new);
        prop_assert_eq!(apply_delta(&old, &delta).unwrap(), new.clone());
        // The delta survives the wire.
        let wire = pb::ViewDelta::decode(delta.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(apply_delta(&old, &wire).unwrap(), new);
    }

    #[test]
    fn apply_inverts_diff_for_any_order(old in arb_view(), new in arb_view()) {
        // Unsorted or duplicated input still converges to the canonical form.
        let mut new = new;
        new.epoch += old.epoch;
        let delta = diff_views(&old, &new);
        prop_assert_eq!(
            apply_delta(&canonical_view(&old), &delta).unwrap(),
            canonical_view(&new)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
        hub_side in any::<bool>(),
    ) {
        let dir = if hub_side { Direction::AgentToHub } else { Direction::HubToAgent };
        let mut reader = FrameReader::new(dir);
        'outer: for c in chunks {
            if reader.push(&c).is_err() {
                break;
            }
            loop {
                match reader.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn arbitrary_frame_bodies_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        hub_side in any::<bool>(),
    ) {
        // A well-framed but arbitrary body: exercises the message decoder.
        let dir = if hub_side { Direction::AgentToHub } else { Direction::HubToAgent };
        let mut reader = FrameReader::new(dir);
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        reader.push(&wire).unwrap();
        let _ = reader.next_frame();
    }

    #[test]
    fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let _ = decode_datagram(&bytes);
    }
}

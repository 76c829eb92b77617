use proptest::prelude::*;
use switchyard_proto::pb::{self, command::Kind, ErrorCode};

use crate::state::State;

fn cmd(kind: Kind) -> pb::Command {
    pb::Command { kind: Some(kind) }
}

fn init() -> pb::Command {
    cmd(Kind::InitFederation(pb::InitFederation {
        federation: Some(pb::Federation {
            domain: "example.org".into(),
            ca_cert_pem: "CERT".into(),
            ca_key_pem: "KEY".into(),
        }),
    }))
}

fn upsert(name: &str, create_only: bool) -> pb::Command {
    cmd(Kind::UpsertPop(pb::UpsertPop {
        pop: Some(pb::Pop {
            name: name.into(),
            ..Default::default()
        }),
        create_only,
        now_ms: 1,
    }))
}

fn token(id: &str, hash: &str, expires: i64) -> pb::Command {
    cmd(Kind::IssueToken(pb::IssueToken {
        token: Some(pb::JoinToken {
            id: id.into(),
            secret_sha256: hash.into(),
            kind: pb::TokenKind::Pop as i32,
            pop: "north-1".into(),
            expires_at_ms: expires,
            ..Default::default()
        }),
    }))
}

fn consume(id: &str, hash: &str, now: i64, who: &str) -> pb::Command {
    cmd(Kind::ConsumeToken(pb::ConsumeToken {
        id: id.into(),
        secret_sha256: hash.into(),
        kind: pb::TokenKind::Pop as i32,
        consumer: who.into(),
        now_ms: now,
    }))
}

fn code(r: &pb::CommandResult) -> ErrorCode {
    ErrorCode::try_from(r.error).unwrap_or(ErrorCode::Invalid)
}

const H: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const H2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[test]
fn nothing_before_init() {
    let mut s = State::default();
    assert_eq!(
        code(&s.apply(1, &upsert("a", false))),
        ErrorCode::NotInitialized
    );
    assert_eq!(code(&s.apply(2, &init())), ErrorCode::None);
    assert_eq!(code(&s.apply(3, &init())), ErrorCode::AlreadyExists);
}

#[test]
fn pop_create_update_remove() {
    let mut s = State::default();
    s.apply(1, &init());
    assert_eq!(code(&s.apply(2, &upsert("north-1", true))), ErrorCode::None);
    assert_eq!(
        code(&s.apply(3, &upsert("north-1", true))),
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        code(&s.apply(4, &upsert("north-1", false))),
        ErrorCode::None
    );
    let p = &s.pops["north-1"];
    assert_eq!((p.created_index, p.updated_index), (2, 4));
    assert_eq!(
        code(&s.apply(5, &upsert("Bad_Name", false))),
        ErrorCode::Invalid
    );
    let rm = cmd(Kind::RemovePop(pb::RemovePop {
        name: "north-1".into(),
    }));
    assert_eq!(code(&s.apply(6, &rm)), ErrorCode::None);
    assert_eq!(code(&s.apply(7, &rm)), ErrorCode::NotFound);
}

#[test]
fn token_consumed_exactly_once() {
    let mut s = State::default();
    s.apply(1, &init());
    s.apply(2, &token("abc123", H, 100));
    assert_eq!(
        code(&s.apply(3, &consume("abc123", H2, 10, "x"))),
        ErrorCode::TokenMismatch
    );
    assert_eq!(
        code(&s.apply(4, &consume("nope", H, 10, "x"))),
        ErrorCode::NotFound
    );
    let won = s.apply(5, &consume("abc123", H, 10, "first"));
    assert_eq!(code(&won), ErrorCode::None);
    assert_eq!(won.token.map(|t| t.consumed_by), Some("first".into()));
    assert!(
        s.pops.contains_key("north-1"),
        "consuming a POP token enrols the POP"
    );
    assert_eq!(
        code(&s.apply(6, &consume("abc123", H, 11, "second"))),
        ErrorCode::TokenConsumed
    );
}

#[test]
fn expired_token_refused() {
    let mut s = State::default();
    s.apply(1, &init());
    s.apply(2, &token("abc123", H, 100));
    assert_eq!(
        code(&s.apply(3, &consume("abc123", H, 100, "x"))),
        ErrorCode::TokenExpired
    );
}

#[test]
fn snapshot_round_trip() {
    let mut s = State::default();
    s.apply(1, &init());
    s.apply(2, &upsert("north-1", false));
    s.apply(3, &token("abc123", H, 100));
    let back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back, s);
}

fn arb_command() -> impl Strategy<Value = pb::Command> {
    let names = prop::sample::select(vec!["north-1", "north-2", "south-1", "X"]);
    let ids = prop::sample::select(vec!["t1", "t2"]);
    prop_oneof![
        (names.clone(), any::<bool>()).prop_map(|(n, c)| upsert(n, c)),
        names
            .clone()
            .prop_map(|n| cmd(Kind::RemovePop(pb::RemovePop { name: n.into() }))),
        (ids.clone(), 0i64..200).prop_map(|(i, e)| token(i, H, e)),
        (ids, prop::sample::select(vec![H, H2]), 0i64..200, names)
            .prop_map(|(i, h, now, who)| consume(i, h, now, who)),
    ]
}

proptest! {
    /// Same log, same state and results: every hub node agrees.
    #[test]
    fn apply_is_deterministic(cmds in prop::collection::vec(arb_command(), 0..40)) {
        let mut a = State::default();
        let mut b = State::default();
        a.apply(1, &init());
        b.apply(1, &init());
        for (i, c) in cmds.iter().enumerate() {
            let ra = a.apply(i as u64 + 2, c);
            let rb = b.apply(i as u64 + 2, c);
            prop_assert_eq!(ra, rb);
        }
        prop_assert_eq!(a.encode_snapshot(), b.encode_snapshot());
        prop_assert_eq!(a.encode_snapshot(), prost::Message::encode_to_vec(&a.to_snapshot()));
        prop_assert_eq!(State::decode_snapshot(&a.encode_snapshot()).unwrap(), a);
    }

    /// At most one consumer of a token ever succeeds.
    #[test]
    fn one_winner_per_token(cmds in prop::collection::vec(arb_command(), 0..60)) {
        let mut s = State::default();
        s.apply(1, &init());
        let mut wins = std::collections::BTreeMap::<String, u32>::new();
        for (i, c) in cmds.iter().enumerate() {
            let r = s.apply(i as u64 + 2, c);
            if let Some(Kind::ConsumeToken(ct)) = &c.kind {
                if r.error == 0 {
                    *wins.entry(ct.id.clone()).or_default() += 1;
                }
            }
        }
        prop_assert!(wins.values().all(|w| *w <= 1));
    }
}

fn set_gateway(pop: &str, addr: &str) -> pb::Command {
    cmd(Kind::SetPopGateway(pb::SetPopGateway {
        pop: pop.into(),
        gateway_addr: addr.into(),
    }))
}

#[test]
fn pop_gateway_is_recorded_kept_by_upserts_and_moves_the_index_only_on_change() {
    let mut s = State::default();
    s.apply(1, &init());
    assert_eq!(code(&s.apply(2, &upsert("fra", false))), ErrorCode::None);
    assert_eq!(
        code(&s.apply(3, &set_gateway("fra", "10.0.0.1:7443"))),
        ErrorCode::None
    );
    assert_eq!(s.pops["fra"].gateway_addr, "10.0.0.1:7443");
    assert_eq!(s.pops["fra"].updated_index, 3);
    // The same address again commits nothing a view would see.
    assert_eq!(
        code(&s.apply(4, &set_gateway("fra", "10.0.0.1:7443"))),
        ErrorCode::None
    );
    assert_eq!(s.pops["fra"].updated_index, 3);
    // An operator's upsert (labels) keeps the agent's address.
    assert_eq!(code(&s.apply(5, &upsert("fra", false))), ErrorCode::None);
    assert_eq!(s.pops["fra"].gateway_addr, "10.0.0.1:7443");
    assert_eq!(s.pops["fra"].updated_index, 5);
    // A move is recorded.
    s.apply(6, &set_gateway("fra", "[fd00::1]:7443"));
    assert_eq!(s.pops["fra"].gateway_addr, "[fd00::1]:7443");
    assert_eq!(s.pops["fra"].updated_index, 6);
    // Survives a snapshot.
    let back = State::decode_snapshot(&s.encode_snapshot()).unwrap();
    assert_eq!(back.pops["fra"].gateway_addr, "[fd00::1]:7443");
}

#[test]
fn pop_gateway_refusals() {
    let mut s = State::default();
    s.apply(1, &init());
    s.apply(2, &upsert("fra", false));
    assert_eq!(
        code(&s.apply(3, &set_gateway("nope", "10.0.0.1:7443"))),
        ErrorCode::NotFound
    );
    for bad in ["", "10.0.0.1", "10.0.0.1:0", ":7443", "a b:1", "h:99999"] {
        assert_eq!(
            code(&s.apply(4, &set_gateway("fra", bad))),
            ErrorCode::Invalid,
            "{bad:?}"
        );
    }
    let long = format!("{}:1", "a".repeat(300));
    assert_eq!(
        code(&s.apply(5, &set_gateway("fra", &long))),
        ErrorCode::Invalid
    );
    assert_eq!(s.pops["fra"].gateway_addr, "");
    assert_eq!(s.pops["fra"].updated_index, 2);
}

#[test]
fn a_hub_node_id_is_given_to_one_joining_node_only() {
    let hub = |t: pb::Command| match t.kind {
        Some(Kind::IssueToken(mut i)) => {
            if let Some(tok) = i.token.as_mut() {
                tok.kind = pb::TokenKind::Hub as i32;
                tok.pop.clear();
            }
            cmd(Kind::IssueToken(i))
        }
        Some(Kind::ConsumeToken(mut c)) => {
            c.kind = pb::TokenKind::Hub as i32;
            cmd(Kind::ConsumeToken(c))
        }
        other => pb::Command { kind: other },
    };
    let mut s = State::default();
    s.apply(1, &init());
    s.apply(2, &hub(token("t1", H, 100)));
    s.apply(3, &hub(token("t2", H2, 100)));
    assert_eq!(
        code(&s.apply(4, &hub(consume("t1", H, 1, "hub/2")))),
        ErrorCode::None
    );
    // A second node racing for id 2 with its own valid token loses, and
    // its token stays unspent.
    let r = s.apply(5, &hub(consume("t2", H2, 1, "hub/2")));
    assert_eq!(code(&r), ErrorCode::AlreadyExists, "{}", r.message);
    assert!(!s.tokens["t2"].consumed);
    assert_eq!(
        code(&s.apply(6, &hub(consume("t2", H2, 1, "hub/3")))),
        ErrorCode::None
    );
}

//! The precomputed answer table and the answer to one query (pure).
//!
//! A table maps a lowercased name to its answers, each the complete wire
//! message (header with ID 0, the question in lowercase, the answer
//! section) encoded once by hickory-proto when the table is built. A query
//! then costs a parse ([`crate::query::parse`]), one hash lookup, a copy,
//! and patches: the ID, the RD/CD bits, the client's own question bytes
//! (same length, so its letter case survives for 0x20-randomising
//! resolvers), and an OPT record when the client sent one. Negative
//! answers (NXDOMAIN, NODATA) are written directly: header, the client's
//! question, and the zone's SOA whose owner is a pointer into the question.
//!
//! Answers are per client class: the global zone orders gateways for the
//! client's POP, found from its address (or EDNS Client Subnet) against
//! subnets; class 0 is the default every table has.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::{Name, RData, Record};

use crate::query::{self, rtype, Malformed, Query, CLASS_IN, HEADER_LEN};

/// UDP payload size this server advertises and never exceeds (bytes; the
/// DNS flag day 2020 value, below common path MTUs).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Classic UDP limit without EDNS (bytes).
pub const MIN_UDP_PAYLOAD: usize = 512;
/// Largest UDP answer relative to its query (bytes out / bytes in); a
/// larger answer is sent truncated (TC=1) so the client retries over TCP.
pub const MAX_AMPLIFICATION: usize = 3;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_CD: u16 = 0x0010;

/// Response codes written by the server.
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// Format error.
    pub const FORMERR: u8 = 1;
    /// No such name.
    pub const NXDOMAIN: u8 = 3;
    /// Opcode not implemented.
    pub const NOTIMP: u8 = 4;
    /// Refused (outside our zones, zone transfers, other classes).
    pub const REFUSED: u8 = 5;
}

/// How the query arrived: UDP answers are bounded by the client's EDNS
/// size and the amplification limit, TCP answers only by the frame size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram.
    Udp,
    /// Stream (2-byte length framing).
    Tcp,
}

/// What was answered, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not answered (runt packet or a response).
    Dropped,
    /// Records answered.
    Answer,
    /// The name exists, the type does not.
    NoData,
    /// The name does not exist.
    NxDomain,
    /// Outside our zones, a zone transfer, or another class.
    Refused,
    /// Malformed query.
    FormErr,
    /// Opcode other than QUERY.
    NotImp,
    /// EDNS version other than 0.
    BadVers,
    /// The answer did not fit: sent with TC=1 and no records.
    Truncated,
}

impl Outcome {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Dropped => "dropped",
            Outcome::Answer => "answer",
            Outcome::NoData => "nodata",
            Outcome::NxDomain => "nxdomain",
            Outcome::Refused => "refused",
            Outcome::FormErr => "formerr",
            Outcome::NotImp => "notimp",
            Outcome::BadVers => "badvers",
            Outcome::Truncated => "truncated",
        }
    }
}

/// One zone served by a table, with the SOA of its negative answers.
#[derive(Debug, Clone)]
pub struct ZoneApex {
    /// The apex in lowercase wire format.
    apex: Vec<u8>,
    /// Number of labels in the apex.
    labels: usize,
    /// SOA serial.
    pub serial: u32,
    /// SOA minimum and TTL of the SOA record: how long negative answers
    /// are cached (s).
    pub negative_ttl: u32,
}

impl ZoneApex {
    /// A zone at `apex` (e.g. `clusterset.local.`).
    pub fn new(apex: &Name, serial: u32, negative_ttl: u32) -> Self {
        let lower = apex.to_lowercase();
        let mut wire = Vec::with_capacity(lower.len() + 2);
        for label in lower.iter() {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label);
        }
        wire.push(0);
        Self {
            apex: wire,
            labels: lower.num_labels() as usize,
            serial,
            negative_ttl,
        }
    }

    fn contains(&self, q: &Query) -> bool {
        q.labels >= self.labels && q.suffix(q.labels - self.labels) == self.apex.as_slice()
    }

    /// The SOA record of the zone (for answers to SOA queries).
    pub fn soa_record(&self, apex: &Name) -> Record {
        let mname = apex.prepend_label("ns").unwrap_or_else(|_| apex.clone());
        let rname = apex
            .prepend_label("hostmaster")
            .unwrap_or_else(|_| apex.clone());
        Record::from_rdata(
            apex.clone(),
            self.negative_ttl,
            RData::SOA(hickory_proto::rr::rdata::SOA::new(
                mname,
                rname,
                self.serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                self.negative_ttl,
            )),
        )
    }
}

const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86400;

/// FNV-1a: the keys are our own names (not attacker-chosen: queries only
/// look up), so a fast non-keyed hash is safe here.
#[derive(Default)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// One precomputed answer: `len` bytes at `at` in the table's arena.
#[derive(Debug, Clone, Copy)]
struct Answer {
    qtype: u16,
    class: u16,
    at: u32,
    len: u32,
}

#[derive(Debug, Default)]
struct NameEntry {
    answers: Vec<Answer>,
    /// TTL of the minimal ANY answer (RFC 8482), the lowest TTL of the
    /// name's records; `None`: the name has no records (ANY is NODATA).
    any_ttl: Option<u32>,
}

/// A client subnet mapped to a client class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length (bits).
    pub prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/n` or `x::/n`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.trim().split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    /// Whether `ip` is inside the subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The precomputed answers of one or more zones.
#[derive(Debug, Default)]
pub struct AnswerTable {
    zones: Vec<ZoneApex>,
    names: HashMap<Box<[u8]>, NameEntry, BuildHasherDefault<Fnv>>,
    /// Every answer's wire bytes, back to back (one allocation instead of
    /// one per answer: the table's size is mostly these).
    arena: Vec<u8>,
    subnets: Vec<(Subnet, u16)>,
    /// What the table was built from (view epoch or applied log index).
    pub built_from: u64,
}

impl AnswerTable {
    /// Number of names with answers or children.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// The client class of a client at `ip` (0: default): the longest
    /// matching subnet.
    pub fn class_of(&self, ip: IpAddr) -> (u16, u8) {
        let mut best: Option<(u16, u8)> = None;
        for (s, class) in &self.subnets {
            if s.contains(ip) && best.is_none_or(|(_, p)| s.prefix > p) {
                best = Some((*class, s.prefix));
            }
        }
        best.unwrap_or((0, 0))
    }
}

/// Builds an [`AnswerTable`].
#[derive(Debug, Default)]
pub struct TableBuilder {
    table: AnswerTable,
}

fn wire_name(name: &Name) -> Vec<u8> {
    let mut wire = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        wire.push(label.len() as u8);
        wire.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    wire.push(0);
    wire
}

/// Why a record set could not be added.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The answers exceed 4 GiB.
    #[error("the answer table is too large")]
    TooLarge,
    /// hickory-proto refused to encode the message.
    #[error("cannot encode the answer for {name}: {source}")]
    Encode {
        /// The owner name.
        name: String,
        /// The cause.
        source: hickory_proto::ProtoError,
    },
}

impl TableBuilder {
    /// A builder for `zones`; `built_from` is recorded in the table.
    pub fn new(zones: Vec<ZoneApex>, built_from: u64) -> Self {
        Self {
            table: AnswerTable {
                zones,
                built_from,
                ..AnswerTable::default()
            },
        }
    }

    /// Maps clients in `subnet` to `class` (not 0).
    pub fn add_subnet(&mut self, subnet: Subnet, class: u16) {
        self.table.subnets.push((subnet, class));
    }

    /// Marks `name` and its ancestors inside a zone as existing (NODATA
    /// rather than NXDOMAIN for other types, RFC 8020).
    fn touch(&mut self, name: &Name) {
        let mut n = name.to_lowercase();
        loop {
            let wire = wire_name(&n);
            let inside = self
                .table
                .zones
                .iter()
                .any(|z| wire.ends_with(&z.apex) && wire.len() >= z.apex.len());
            if !inside {
                return;
            }
            if self.table.names.contains_key(wire.as_slice()) {
                return;
            }
            self.table
                .names
                .insert(wire.into_boxed_slice(), NameEntry::default());
            if n.num_labels() == 0 {
                return;
            }
            n = n.base_name();
        }
    }

    /// Sets the answer to (`name`, `qtype`) for clients of `class` to
    /// `records` (all owned by `name`). An empty set adds nothing but the
    /// name. Replaces an earlier answer for the same key.
    pub fn set(
        &mut self,
        name: &Name,
        qtype: u16,
        class: u16,
        records: Vec<Record>,
    ) -> Result<(), BuildError> {
        self.touch(name);
        if records.is_empty() {
            return Ok(());
        }
        let min_ttl = records.iter().map(|r| r.ttl).min().unwrap_or(0);
        let lower = name.to_lowercase();
        let mut msg = Message::new(0, MessageType::Response, OpCode::Query);
        msg.metadata.authoritative = true;
        msg.add_query(hickory_proto::op::Query::query(lower.clone(), qtype.into()));
        msg.add_answers(records);
        let wire = msg.to_vec().map_err(|source| BuildError::Encode {
            name: name.to_string(),
            source,
        })?;
        let key = wire_name(&lower);
        let at = u32::try_from(self.table.arena.len()).map_err(|_| BuildError::TooLarge)?;
        let len = u32::try_from(wire.len()).map_err(|_| BuildError::TooLarge)?;
        self.table.arena.extend_from_slice(&wire);
        let entry = self.table.names.entry(key.into_boxed_slice()).or_default();
        entry.any_ttl = Some(entry.any_ttl.map_or(min_ttl, |t| t.min(min_ttl)));
        entry
            .answers
            .retain(|a| !(a.qtype == qtype && a.class == class));
        entry.answers.push(Answer {
            qtype,
            class,
            at,
            len,
        });
        Ok(())
    }

    /// The table.
    pub fn finish(mut self) -> Result<AnswerTable, BuildError> {
        self.table.arena.shrink_to_fit();
        self.table.names.shrink_to_fit();
        Ok(self.table)
    }
}

/// Writes the answer to `packet` (from `client`) into `out` (cleared
/// first). `out` is empty exactly when the outcome is
/// [`Outcome::Dropped`].
pub fn respond(
    table: &AnswerTable,
    packet: &[u8],
    client: IpAddr,
    transport: Transport,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    let q = match query::parse(packet) {
        Ok(q) => q,
        Err(Malformed::Drop) => return Outcome::Dropped,
        Err(Malformed::FormErr) => {
            header_only(packet, rcode::FORMERR, out);
            return Outcome::FormErr;
        }
    };
    if q.opcode() != 0 {
        header_only(packet, rcode::NOTIMP, out);
        return Outcome::NotImp;
    }
    if q.edns.is_some_and(|e| e.version != 0) {
        echo_question(packet, &q, rcode::NOERROR, out);
        push_opt(&q, 1, None, out);
        return Outcome::BadVers;
    }
    let refused = q.qclass != CLASS_IN
        || matches!(
            q.qtype,
            rtype::AXFR | rtype::IXFR | rtype::MAILA | rtype::MAILB | rtype::OPT
        );
    let Some(zone) = table
        .zones
        .iter()
        .find(|z| z.contains(&q))
        .filter(|_| !refused)
    else {
        echo_question(packet, &q, rcode::REFUSED, out);
        push_opt(&q, 0, None, out);
        return Outcome::Refused;
    };
    let (class, scope) = if table.subnets.is_empty() {
        (0, None)
    } else {
        let ecs = q.edns.and_then(|e| e.client_subnet);
        let ip = ecs.and_then(|e| e.ip()).unwrap_or(client);
        let (class, prefix) = table.class_of(ip);
        (
            class,
            Some(if class == 0 {
                ecs.map(|e| e.source_prefix).unwrap_or(0)
            } else {
                prefix
            }),
        )
    };
    let outcome = match table.names.get(q.name()) {
        None => {
            negative(packet, &q, zone, rcode::NXDOMAIN, out);
            Outcome::NxDomain
        }
        Some(entry) => {
            let pick = entry
                .answers
                .iter()
                .filter(|a| a.qtype == q.qtype)
                .find(|a| a.class == class)
                .or_else(|| {
                    entry
                        .answers
                        .iter()
                        .find(|a| a.qtype == q.qtype && a.class == 0)
                });
            match (pick, entry.any_ttl) {
                (None, Some(ttl)) if q.qtype == rtype::ANY => {
                    minimal_any(packet, &q, ttl, out);
                    Outcome::Answer
                }
                (Some(a), _) => {
                    let (at, len) = (a.at as usize, a.len as usize);
                    out.extend_from_slice(&table.arena[at..at + len]);
                    // Same length: the key is the lowercased question name.
                    out[HEADER_LEN..q.question_end]
                        .copy_from_slice(&packet[HEADER_LEN..q.question_end]);
                    out[0..2].copy_from_slice(&q.id.to_be_bytes());
                    let flags = FLAG_QR | FLAG_AA | (q.flags & (FLAG_RD | FLAG_CD));
                    out[2..4].copy_from_slice(&flags.to_be_bytes());
                    Outcome::Answer
                }
                (None, _) => {
                    negative(packet, &q, zone, rcode::NOERROR, out);
                    Outcome::NoData
                }
            }
        }
    };
    push_opt(&q, 0, scope, out);
    if transport == Transport::Udp {
        let client_max = q
            .edns
            .map(|e| usize::from(e.udp_size.clamp(512, MAX_UDP_PAYLOAD)))
            .unwrap_or(MIN_UDP_PAYLOAD);
        let limit = client_max.min(packet.len() * MAX_AMPLIFICATION);
        if out.len() > limit {
            out.clear();
            echo_question(packet, &q, rcode::NOERROR, out);
            let flags = u16::from_be_bytes([out[2], out[3]]) | FLAG_TC | FLAG_AA;
            out[2..4].copy_from_slice(&flags.to_be_bytes());
            push_opt(&q, 0, scope, out);
            return Outcome::Truncated;
        }
    }
    outcome
}

fn flags_for(query_flags: u16, rcode: u8) -> u16 {
    FLAG_QR | (query_flags & (0x7800 | FLAG_RD | FLAG_CD)) | u16::from(rcode)
}

/// Header only (question not echoed): FORMERR and NOTIMP.
fn header_only(packet: &[u8], rcode: u8, out: &mut Vec<u8>) {
    let flags = flags_for(u16::from_be_bytes([packet[2], packet[3]]), rcode);
    out.extend_from_slice(&packet[0..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
}

/// Header and the client's question, no records.
fn echo_question(packet: &[u8], q: &Query, rcode: u8, out: &mut Vec<u8>) {
    let flags = flags_for(q.flags, rcode);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&packet[HEADER_LEN..q.question_end]);
}

/// The RFC 8482 answer to ANY: one HINFO "RFC8482" "" owned by the
/// question's name.
fn minimal_any(packet: &[u8], q: &Query, ttl: u32, out: &mut Vec<u8>) {
    echo_question(packet, q, rcode::NOERROR, out);
    let flags = u16::from_be_bytes([out[2], out[3]]) | FLAG_AA;
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[7] = 1; // ANCOUNT
    out.extend_from_slice(&0xc00cu16.to_be_bytes());
    out.extend_from_slice(&rtype::HINFO.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&9u16.to_be_bytes());
    out.extend_from_slice(b"\x07RFC8482\x00");
}

/// NXDOMAIN or NODATA: the question and the zone's SOA in authority, its
/// names compressed against the question.
fn negative(packet: &[u8], q: &Query, zone: &ZoneApex, rcode: u8, out: &mut Vec<u8>) {
    echo_question(packet, q, rcode, out);
    let flags = u16::from_be_bytes([out[2], out[3]]) | FLAG_AA;
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[9] = 1; // NSCOUNT
    let apex_at = HEADER_LEN
        + if q.labels == zone.labels {
            0
        } else {
            q.label_starts[q.labels - zone.labels] as usize
        };
    let ptr = 0xc000 | apex_at as u16;
    out.extend_from_slice(&ptr.to_be_bytes());
    out.extend_from_slice(&rtype::SOA.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&zone.negative_ttl.to_be_bytes());
    // rdata: "ns" + ptr, "hostmaster" + ptr, five 32-bit fields.
    let rdlen: u16 = (1 + 2 + 2) + (1 + 10 + 2) + 20;
    out.extend_from_slice(&rdlen.to_be_bytes());
    out.extend_from_slice(b"\x02ns");
    out.extend_from_slice(&ptr.to_be_bytes());
    out.extend_from_slice(b"\x0ahostmaster");
    out.extend_from_slice(&ptr.to_be_bytes());
    out.extend_from_slice(&zone.serial.to_be_bytes());
    out.extend_from_slice(&SOA_REFRESH.to_be_bytes());
    out.extend_from_slice(&SOA_RETRY.to_be_bytes());
    out.extend_from_slice(&SOA_EXPIRE.to_be_bytes());
    out.extend_from_slice(&zone.negative_ttl.to_be_bytes());
}

/// Appends our OPT record if the client sent one (RFC 6891 7), with the
/// extended rcode and, for tables that vary by client, the Client Subnet
/// option echoed with `scope`.
fn push_opt(q: &Query, ext_rcode: u8, scope: Option<u8>, out: &mut Vec<u8>) {
    let Some(edns) = q.edns else {
        return;
    };
    let ecs = edns.client_subnet.zip(scope);
    let opt_len: u16 = match ecs {
        Some((e, _)) => 4 + 4 + e.source_prefix.div_ceil(8) as u16,
        None => 0,
    };
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, 0, 0]);
    out.extend_from_slice(&opt_len.to_be_bytes());
    if let Some((e, scope)) = ecs {
        let n = e.source_prefix.div_ceil(8) as usize;
        out.extend_from_slice(&query::EDNS_CLIENT_SUBNET.to_be_bytes());
        out.extend_from_slice(&(4 + n as u16).to_be_bytes());
        out.extend_from_slice(&e.family.to_be_bytes());
        out.push(e.source_prefix);
        out.push(scope);
        out.extend_from_slice(&e.addr[..n]);
    }
    let ar = u16::from_be_bytes([out[10], out[11]]) + 1;
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

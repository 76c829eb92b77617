//! Shared pieces of the agent <-> hub uplink (`uplink.proto`): the size
//! and count limits, the control-stream reader and writer, the datagram
//! codec, and the decision-table delta (`diff_views` / `apply_delta`).
//!
//! Both session state machines (`switchyard-agent` and `switchyard-hub`,
//! module `uplink`) build on this; they live in their own crates, but the
//! wire rules must be one implementation. Rules: `docs/protocol.md`,
//! "Agent <-> hub uplink".

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use prost::Message;

use crate::frame::{FrameCodec, FrameError, DEFAULT_MAX_FRAME, HEADER_LEN};
use crate::pb;
use crate::pb::uplink_datagram::Kind as DatagramKind;
use crate::pb::uplink_frame::Kind as FrameKind;

/// QUIC ALPN of the uplink, version 1.
pub const ALPN: &[u8] = b"switchyard/1";

/// Uplink protocol version spoken by this build (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame body the agent may send (bytes). Exports of one POP are
/// bounded well below it (see [`MAX_EXPORT_SET_BYTES`]); keeping it small
/// bounds what a thousand agents can make a hub node buffer.
pub const MAX_AGENT_FRAME: usize = 1024 * 1024;

/// Largest frame body the hub may send (bytes): a whole decision table.
pub const MAX_HUB_FRAME: usize = DEFAULT_MAX_FRAME;

/// Largest datagram payload (bytes). Below QUIC's 1200-byte minimum path
/// MTU minus packet overhead, so a datagram is never refused by the
/// transport for size.
pub const MAX_DATAGRAM: usize = 1024;

/// Longest POP name, namespace or service name (bytes): one DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// Longest `Hello.agent_version` (bytes).
pub const MAX_VERSION_LEN: usize = 64;

/// Most services one POP may export.
pub const MAX_EXPORTS_PER_POP: usize = 1024;

/// Largest encoded size of a POP's whole export set (bytes). With the
/// withdrawals of at most [`MAX_EXPORTS_PER_POP`] keys, any delta then fits
/// in [`MAX_AGENT_FRAME`].
pub const MAX_EXPORT_SET_BYTES: usize = 512 * 1024;

/// Most endpoints per exported service.
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 1024;

/// Most ports per exported service.
pub const MAX_PORTS_PER_SERVICE: usize = 64;

/// Largest CSR or certificate PEM (bytes).
pub const MAX_PEM_LEN: usize = 16 * 1024;

/// Longest gateway tunnel address (`host:port`, bytes).
pub const MAX_GATEWAY_ADDR_LEN: usize = 255;

/// Longest error or refusal text (bytes).
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Most samples in one RTT report datagram (also bounded by
/// [`MAX_DATAGRAM`]).
pub const MAX_RTT_SAMPLES: usize = 32;

/// Who sent a control-stream message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Agent to hub (field numbers 1..15 of `UplinkFrame`).
    AgentToHub,
    /// Hub to agent (field numbers 16..31).
    HubToAgent,
}

impl Direction {
    /// The frame size limit (bytes) for messages travelling this way.
    pub fn max_frame(self) -> usize {
        match self {
            Direction::AgentToHub => MAX_AGENT_FRAME,
            Direction::HubToAgent => MAX_HUB_FRAME,
        }
    }
}

/// The direction a frame kind travels in.
pub fn direction_of(kind: &FrameKind) -> Direction {
    match kind {
        FrameKind::Hello(_)
        | FrameKind::ExportDelta(_)
        | FrameKind::ViewAck(_)
        | FrameKind::CsrRequest(_)
        | FrameKind::ViewRefused(_)
        | FrameKind::GatewayAnnounce(_) => Direction::AgentToHub,
        FrameKind::Welcome(_)
        | FrameKind::ExportAck(_)
        | FrameKind::ViewSnapshot(_)
        | FrameKind::ViewDelta(_)
        | FrameKind::CertIssued(_)
        | FrameKind::Error(_)
        | FrameKind::ExportResync(_) => Direction::HubToAgent,
    }
}

/// A short name of a frame kind, for errors and logs.
pub fn kind_name(kind: &FrameKind) -> &'static str {
    match kind {
        FrameKind::Hello(_) => "Hello",
        FrameKind::ExportDelta(_) => "ExportDelta",
        FrameKind::ViewAck(_) => "ViewAck",
        FrameKind::CsrRequest(_) => "CsrRequest",
        FrameKind::ViewRefused(_) => "ViewRefused",
        FrameKind::GatewayAnnounce(_) => "GatewayAnnounce",
        FrameKind::Welcome(_) => "Welcome",
        FrameKind::ExportAck(_) => "ExportAck",
        FrameKind::ViewSnapshot(_) => "ViewSnapshot",
        FrameKind::ViewDelta(_) => "ViewDelta",
        FrameKind::CertIssued(_) => "CertIssued",
        FrameKind::Error(_) => "UplinkError",
        FrameKind::ExportResync(_) => "ExportResync",
    }
}

/// Why a control-stream message is refused. Every variant closes the
/// stream (the connection's other streams and the process go on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UplinkError {
    /// A frame announced or carried more bytes than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame has no kind this version knows.
    #[error("frame of unknown kind")]
    UnknownKind,
    /// A kind that travels the other way.
    #[error("{0} is not sent in this direction")]
    WrongDirection(&'static str),
    /// A message arrived in a state where it is not allowed.
    #[error("unexpected {kind}: {why}")]
    Unexpected {
        /// The frame kind.
        kind: &'static str,
        /// The rule it broke.
        why: &'static str,
    },
    /// A field is out of its limits.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// A field is invalid for another reason.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl UplinkError {
    /// The error code to send to the peer for this error.
    pub fn code(&self) -> pb::UplinkErrorCode {
        match self {
            UplinkError::TooLarge { .. } | UplinkError::Limit(_) => pb::UplinkErrorCode::Limit,
            _ => pb::UplinkErrorCode::Protocol,
        }
    }
}

impl From<FrameError> for UplinkError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, max } => UplinkError::TooLarge { len, max },
            FrameError::Malformed(m) => UplinkError::Malformed(m),
        }
    }
}

/// Decodes control-stream bytes into frames travelling one way, checking
/// the announced size before buffering a body and the kind and direction
/// of every message. Pure: the caller moves the bytes.
///
/// Memory: the buffer never holds more than one maximal frame plus the
/// last chunk passed to [`FrameReader::push`], so callers read the stream
/// in bounded chunks.
#[derive(Debug)]
pub struct FrameReader {
    codec: FrameCodec,
    expect: Direction,
    buf: BytesMut,
}

impl FrameReader {
    /// A reader for frames sent in direction `expect`, with that
    /// direction's size limit.
    pub fn new(expect: Direction) -> Self {
        Self {
            codec: FrameCodec::new(expect.max_frame()),
            expect,
            buf: BytesMut::new(),
        }
    }

    /// Appends received bytes. Refuses at once a header announcing a body
    /// above the limit, before the body is buffered.
    pub fn push(&mut self, data: &[u8]) -> Result<(), UplinkError> {
        self.buf.extend_from_slice(data);
        self.codec.peek_len(&self.buf)?;
        Ok(())
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<pb::UplinkFrame>, UplinkError> {
        let Some(frame) = self.codec.decode::<pb::UplinkFrame>(&mut self.buf)? else {
            return Ok(None);
        };
        // Check the header of the following frame too, so an oversized
        // announcement is refused without waiting for another push.
        self.codec.peek_len(&self.buf)?;
        check_frame(&frame, self.expect)?;
        Ok(Some(frame))
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Checks that a decoded frame has a known kind that travels in `expect`.
pub fn check_frame(frame: &pb::UplinkFrame, expect: Direction) -> Result<(), UplinkError> {
    let Some(kind) = &frame.kind else {
        return Err(UplinkError::UnknownKind);
    };
    if direction_of(kind) != expect {
        return Err(UplinkError::WrongDirection(kind_name(kind)));
    }
    Ok(())
}

/// Appends `frame` (length prefix and body) to `dst`, refusing a body above
/// the limit of its direction.
pub fn encode_frame(frame: &pb::UplinkFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
    let max = frame
        .kind
        .as_ref()
        .map_or(MAX_AGENT_FRAME, |k| direction_of(k).max_frame());
    FrameCodec::new(max).encode(frame, dst)
}

/// Bytes a frame takes on the wire, length prefix included.
pub fn framed_len(frame: &pb::UplinkFrame) -> usize {
    HEADER_LEN + frame.encoded_len()
}

/// Why a datagram was dropped (never fatal: datagrams are best effort).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Larger than [`MAX_DATAGRAM`]; not decoded.
    #[error("datagram of {0} bytes exceeds the limit of {MAX_DATAGRAM} bytes")]
    TooLarge(usize),
    /// Not a valid message.
    #[error("malformed datagram: {0}")]
    Malformed(String),
    /// No kind this version knows.
    #[error("datagram of unknown kind")]
    UnknownKind,
    /// A field is out of its limits.
    #[error("datagram limit exceeded: {0}")]
    Limit(String),
}

/// Decodes one datagram, checking its size before decoding.
pub fn decode_datagram(bytes: &[u8]) -> Result<DatagramKind, DatagramError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DatagramError::TooLarge(bytes.len()));
    }
    let msg =
        pb::UplinkDatagram::decode(bytes).map_err(|e| DatagramError::Malformed(e.to_string()))?;
    let kind = msg.kind.ok_or(DatagramError::UnknownKind)?;
    if let DatagramKind::RttReport(report) = &kind {
        if report.samples.len() > MAX_RTT_SAMPLES {
            return Err(DatagramError::Limit(format!(
                "{} RTT samples (max {MAX_RTT_SAMPLES})",
                report.samples.len()
            )));
        }
        for s in &report.samples {
            if s.to_pop.is_empty() || s.to_pop.len() > MAX_NAME_LEN {
                return Err(DatagramError::Limit("RTT sample POP name".into()));
            }
        }
    }
    Ok(kind)
}

/// Encodes one datagram, refusing one above [`MAX_DATAGRAM`].
pub fn encode_datagram(kind: DatagramKind) -> Result<Bytes, DatagramError> {
    let msg = pb::UplinkDatagram { kind: Some(kind) };
    let len = msg.encoded_len();
    if len > MAX_DATAGRAM {
        return Err(DatagramError::TooLarge(len));
    }
    Ok(Bytes::from(msg.encode_to_vec()))
}

/// Checks a name (POP, namespace, service) against the limits.
pub fn check_name(what: &str, name: &str) -> Result<(), UplinkError> {
    if name.is_empty() {
        return Err(UplinkError::Invalid(format!("empty {what}")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(UplinkError::Limit(format!(
            "{what} of {} bytes (max {MAX_NAME_LEN})",
            name.len()
        )));
    }
    Ok(())
}

/// Checks a service key: both parts present and within limits.
pub fn check_service_key(key: Option<&pb::ServiceKey>) -> Result<(), UplinkError> {
    let key = key.ok_or_else(|| UplinkError::Invalid("missing service key".into()))?;
    check_name("namespace", &key.namespace)?;
    check_name("service name", &key.name)
}

/// Checks one exported service against the per-service limits.
pub fn check_export(export: &pb::ServiceExport) -> Result<(), UplinkError> {
    check_service_key(export.service.as_ref())?;
    if export.ports.len() > MAX_PORTS_PER_SERVICE {
        return Err(UplinkError::Limit(format!(
            "{} ports (max {MAX_PORTS_PER_SERVICE})",
            export.ports.len()
        )));
    }
    if export.endpoints.len() > MAX_ENDPOINTS_PER_SERVICE {
        return Err(UplinkError::Limit(format!(
            "{} endpoints (max {MAX_ENDPOINTS_PER_SERVICE})",
            export.endpoints.len()
        )));
    }
    Ok(())
}

/// Checks an export delta as received by the hub: counts and every entry.
pub fn check_export_delta(delta: &pb::ExportDelta) -> Result<(), UplinkError> {
    if delta.upserts.len() > MAX_EXPORTS_PER_POP || delta.withdrawals.len() > MAX_EXPORTS_PER_POP {
        return Err(UplinkError::Limit(format!(
            "{} upserts and {} withdrawals (max {MAX_EXPORTS_PER_POP} each)",
            delta.upserts.len(),
            delta.withdrawals.len()
        )));
    }
    for e in &delta.upserts {
        check_export(e)?;
    }
    for k in &delta.withdrawals {
        check_service_key(Some(k))?;
    }
    Ok(())
}

/// The ordering key of a service: (namespace, name); a missing key sorts
/// first as ("", "").
pub fn service_key(key: Option<&pb::ServiceKey>) -> (String, String) {
    key.map_or_else(Default::default, |k| (k.namespace.clone(), k.name.clone()))
}

/// A view's services by key. A key present twice is a bug upstream; the
/// last occurrence wins so that the result is still a function of the input.
fn services_by_key(view: &pb::PopView) -> BTreeMap<(String, String), &pb::ServiceView> {
    view.services
        .iter()
        .map(|s| (service_key(s.service.as_ref()), s))
        .collect()
}

/// The view with its services sorted by key and one service per key (the
/// last occurrence wins). [`apply_delta`] always returns canonical views.
pub fn canonical_view(view: &pb::PopView) -> pb::PopView {
    let services = services_by_key(view).into_values().cloned().collect();
    pb::PopView {
        services,
        ..view.clone()
    }
}

/// A service's (namespace, name), borrowed; a missing key is ("", "").
fn key_ref(s: &pb::ServiceView) -> (&str, &str) {
    s.service
        .as_ref()
        .map_or(("", ""), |k| (k.namespace.as_str(), k.name.as_str()))
}

/// Whether the view's services are sorted by key with no key twice (what
/// [`canonical_view`] returns). Allocates nothing.
pub fn is_canonical(view: &pb::PopView) -> bool {
    view.services
        .windows(2)
        .all(|w| key_ref(&w[0]) < key_ref(&w[1]))
}

/// The delta that turns `old` into `new`: changed and added services whole,
/// removed ones by key, and `new`'s top-level fields in `header`. Pure.
pub fn diff_views(old: &pb::PopView, new: &pb::PopView) -> pb::ViewDelta {
    let (upserts, removals) = if is_canonical(old) && is_canonical(new) {
        diff_sorted_services::<pb::ServiceView, _>(&old.services, &new.services, |a, b| a == b)
    } else {
        let old_map = services_by_key(old);
        let new_map = services_by_key(new);
        let upserts = new_map
            .iter()
            .filter(|(k, s)| old_map.get(*k) != Some(*s))
            .map(|(_, s)| (*s).clone())
            .collect();
        let removals = old_map
            .iter()
            .filter(|(k, _)| !new_map.contains_key(*k))
            .map(|(_, s)| s.service.clone().unwrap_or_default())
            .collect();
        (upserts, removals)
    };
    view_delta(
        old.epoch, &new.pop, new.epoch, &new.peers, upserts, removals,
    )
}

/// A delta from the view at `from_epoch` to the view of `pop` at `epoch`
/// with `peers`: the service changes, and the new top-level fields in the
/// header (copied alone: a view's services can be large).
pub fn view_delta(
    from_epoch: u64,
    pop: &str,
    epoch: u64,
    peers: &[pb::PeerGateway],
    upserts: Vec<pb::ServiceView>,
    removals: Vec<pb::ServiceKey>,
) -> pb::ViewDelta {
    pb::ViewDelta {
        from_epoch,
        epoch,
        upserts,
        removals,
        header: Some(pb::PopView {
            pop: pop.to_string(),
            epoch,
            services: Vec::new(),
            peers: peers.to_vec(),
        }),
    }
}

/// A service of a view as its holder keeps it: the wire form itself, or
/// a form that shares parts between views (the hub's).
pub trait ServiceEntry {
    /// Its (namespace, name).
    fn key(&self) -> (&str, &str);
    /// Its wire form.
    fn to_service_view(&self) -> pb::ServiceView;
}

impl ServiceEntry for pb::ServiceView {
    fn key(&self) -> (&str, &str) {
        key_ref(self)
    }
    fn to_service_view(&self) -> pb::ServiceView {
        self.clone()
    }
}

/// [`diff_views`] of two canonical service lists (sorted by key, one
/// service per key), held as any `S` that borrows as an entry `E`: one
/// merge walk, no maps and no key copies (a hub node diffs every
/// session's view after every change). `same` says whether two entries
/// under the same key are equal (a holder that shares unchanged entries
/// can compare pointers before contents). Upserts and removals come out
/// by key, like the map version.
pub fn diff_sorted_services<E, S>(
    old: &[S],
    new: &[S],
    same: impl Fn(&S, &S) -> bool,
) -> (Vec<pb::ServiceView>, Vec<pb::ServiceKey>)
where
    E: ServiceEntry + ?Sized,
    S: std::borrow::Borrow<E>,
{
    let key = |s: &S| -> pb::ServiceKey {
        let (namespace, name) = s.borrow().key();
        pb::ServiceKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    };
    let (mut upserts, mut removals) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    loop {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) => match o.borrow().key().cmp(&n.borrow().key()) {
                std::cmp::Ordering::Less => {
                    removals.push(key(o));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    upserts.push(n.borrow().to_service_view());
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if !same(o, n) {
                        upserts.push(n.borrow().to_service_view());
                    }
                    i += 1;
                    j += 1;
                }
            },
            (Some(o), None) => {
                removals.push(key(o));
                i += 1;
            }
            (None, Some(n)) => {
                upserts.push(n.borrow().to_service_view());
                j += 1;
            }
            (None, None) => return (upserts, removals),
        }
    }
}

/// Why a view delta does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta was computed from another view than the one held.
    #[error("delta from epoch {from} does not apply to the view at epoch {held}")]
    BaseMismatch {
        /// The delta's `from_epoch`.
        from: u64,
        /// The epoch of the view held.
        held: u64,
    },
    /// The delta goes back in time.
    #[error("delta to epoch {to} is below its base epoch {from}")]
    Backwards {
        /// The delta's `from_epoch`.
        from: u64,
        /// The delta's `epoch`.
        to: u64,
    },
}

/// Applies `delta` to `old`: the inverse of [`diff_views`], so
/// `apply_delta(old, &diff_views(old, new)) == canonical_view(new)`. Pure.
pub fn apply_delta(old: &pb::PopView, delta: &pb::ViewDelta) -> Result<pb::PopView, DeltaError> {
    check_delta(old, delta)?;
    Ok(apply_checked_delta(old.clone(), delta))
}

/// Whether `delta` applies to `old` (see [`apply_checked_delta`]).
pub fn check_delta(old: &pb::PopView, delta: &pb::ViewDelta) -> Result<(), DeltaError> {
    if delta.from_epoch != old.epoch {
        return Err(DeltaError::BaseMismatch {
            from: delta.from_epoch,
            held: old.epoch,
        });
    }
    if delta.epoch < delta.from_epoch {
        return Err(DeltaError::Backwards {
            from: delta.from_epoch,
            to: delta.epoch,
        });
    }
    Ok(())
}

/// [`apply_delta`] on a view the caller owns and has checked with
/// [`check_delta`]: unchanged services move instead of being copied, which
/// matters when a view holds thousands of targets and deltas are small.
pub fn apply_checked_delta(old: pb::PopView, delta: &pb::ViewDelta) -> pb::PopView {
    let mut old = old;
    let services = std::mem::take(&mut old.services);
    let mut map: BTreeMap<(String, String), pb::ServiceView> = services
        .into_iter()
        .map(|s| (service_key(s.service.as_ref()), s))
        .collect();
    for k in &delta.removals {
        map.remove(&service_key(Some(k)));
    }
    for s in &delta.upserts {
        map.insert(service_key(s.service.as_ref()), s.clone());
    }
    // Without a header (an older sender), the top-level fields stay.
    let mut view = match &delta.header {
        Some(h) => h.clone(),
        None => old,
    };
    view.epoch = delta.epoch;
    view.services = map.into_values().collect();
    view
}

#[cfg(test)]
mod tests;

//! The hub's side of one agent connection, sans I/O.
//!
//! The I/O shell feeds it the control stream's bytes (or decoded frames),
//! datagrams, timer expiries and local events (the POP's view changed, an
//! export batch committed), and drains what it produces: frames to write,
//! datagrams (none yet), the next timer, and events for the rest of the
//! hub node (proposals to Raft, liveness transitions, CSRs, RTT reports).
//! Every rule of the protocol lives here; see `docs/protocol.md`,
//! "Agent <-> hub uplink".

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use switchyard_proto::pb;
use switchyard_proto::pb::uplink_datagram::Kind as DatagramKind;
use switchyard_proto::pb::uplink_frame::Kind as FrameKind;
use switchyard_proto::uplink::{
    self as wire, check_export_delta, decode_datagram, Direction, FrameReader, UplinkError,
};

use super::detector::{Detector, DetectorConfig, Liveness};
use crate::decide::View;

/// Settings of the hub's sessions.
#[derive(Debug, Clone)]
pub struct HubSessionConfig {
    /// This hub node's id, sent in Welcome.
    pub hub_node: String,
    /// Heartbeat interval the agent is told to use (sent in Welcome as ms;
    /// also the detector's expected interval).
    pub heartbeat_interval: Duration,
    /// How long a new connection may take to send Hello before it is
    /// closed with `UPLINK_ERROR_CODE_TIMEOUT`.
    pub hello_timeout: Duration,
    /// Liveness detector tuning (`expected_interval` is replaced by
    /// `heartbeat_interval`).
    pub detector: DetectorConfig,
    /// Export deltas accepted but not yet proposed (one is proposed at a
    /// time); one more is a protocol error. Bounds memory per POP.
    pub max_queued_exports: usize,
    /// First wait before re-proposing a batch whose write was not
    /// acknowledged; doubles per failure up to `max_export_retry`.
    pub min_export_retry: Duration,
    /// Longest wait between re-proposals of one batch.
    pub max_export_retry: Duration,
}

impl Default for HubSessionConfig {
    fn default() -> Self {
        Self {
            hub_node: String::new(),
            heartbeat_interval: Duration::from_millis(250),
            hello_timeout: Duration::from_secs(10),
            detector: DetectorConfig::default(),
            max_queued_exports: 16,
            min_export_retry: Duration::from_millis(200),
            max_export_retry: Duration::from_secs(5),
        }
    }
}

/// One batch of a POP's export changes to commit through Raft.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportProposal {
    /// The POP, from its certificate.
    pub pop: String,
    /// The batch's per-POP sequence number.
    pub seq: u64,
    /// `upserts` is the POP's whole export set.
    pub full: bool,
    /// Exports to create or replace; `pop` is the certificate's POP and the
    /// index fields are zero.
    pub upserts: Vec<pb::ServiceExport>,
    /// Services withdrawn.
    pub withdrawals: Vec<pb::ServiceKey>,
}

impl ExportProposal {
    /// The replicated command that commits this batch.
    pub fn into_command(self) -> pb::Command {
        pb::Command {
            kind: Some(pb::command::Kind::ApplyExports(pb::ApplyExports {
                pop: self.pop,
                seq: self.seq,
                upserts: self.upserts,
                withdrawals: self.withdrawals,
                full: self.full,
            })),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The agent broke the protocol; an `UplinkError` was queued for it.
    Protocol(UplinkError),
    /// No Hello within the timeout.
    HelloTimeout,
    /// The hub closed the session ([`HubSession::close`]).
    Local(pb::UplinkErrorCode),
    /// The stream or connection ended ([`HubSession::connection_lost`]).
    ConnectionLost,
}

/// What the session asks of the rest of the hub node.
#[derive(Debug, Clone, PartialEq)]
pub enum HubEvent {
    /// Hello accepted: the agent is connected to this node.
    Established {
        /// The POP, from its certificate.
        pop: String,
        /// This connection's id.
        session_id: u64,
        /// The agent's build version.
        agent_version: String,
        /// Epoch of the view the agent holds.
        last_applied_epoch: u64,
        /// Last export seq the agent knows acknowledged.
        last_acked_export_seq: u64,
    },
    /// Commit this batch through Raft (`into_command`), then report the
    /// outcome: [`HubSession::export_committed`],
    /// [`HubSession::export_refused`], [`HubSession::export_out_of_sync`]
    /// or [`HubSession::export_failed`]. At most one is outstanding per
    /// session; the same batch may be proposed again after a failure
    /// (idempotent by seq).
    ProposeExports(ExportProposal),
    /// A liveness transition to commit (`SetPopLiveness`). Carries the
    /// session id so the state can ignore a stale session's verdict after
    /// the POP reconnected elsewhere.
    Liveness {
        /// The POP.
        pop: String,
        /// This connection's id.
        session_id: u64,
        /// The new liveness.
        state: Liveness,
    },
    /// The agent persisted the view at this epoch (push lag metrics).
    ViewAcked {
        /// The acknowledged epoch.
        epoch: u64,
    },
    /// The agent refused a view (fencing or base mismatch); the session
    /// recovers by itself, this is for logs and metrics.
    ViewRefused {
        /// The refused epoch.
        epoch: u64,
        /// The epoch the agent holds.
        applied_epoch: u64,
        /// Why.
        reason: pb::ViewRefusal,
    },
    /// Sign this CSR for the session's POP (or, with `gateway_instance`,
    /// for that gateway of the session's POP), then call
    /// [`HubSession::certificate_issued`] or
    /// [`HubSession::certificate_refused`].
    CsrReceived {
        /// Echo in the answer.
        request_id: u64,
        /// PKCS#10, PEM (size-checked, not parsed).
        csr_pem: String,
        /// Empty: the POP's own certificate. Otherwise a gateway instance
        /// name (a DNS label, checked): sign
        /// `spiffe://D/pop/<session's POP>/gw/<instance>`.
        gateway_instance: String,
    },
    /// The agent announced where its POP's gateway takes QUIC tunnels (in
    /// Hello or later): record it (`SetPopGateway`) if the POP's record
    /// differs. Checked to be `host:port` within the size limit.
    GatewayAddr {
        /// The POP, from its certificate.
        pop: String,
        /// `host:port`.
        gateway_addr: String,
    },
    /// RTTs measured by the POP's gateways (`ReportRtt` commands, after
    /// the shell's own rate limiting).
    RttReport {
        /// The reporting POP, from its certificate.
        pop: String,
        /// The samples.
        samples: Vec<pb::RttSample>,
    },
    /// The stream is over: write the queued frames, then finish the stream
    /// and close the connection. Liveness events may still follow (see
    /// [`HubSession::is_finished`]).
    Closed(CloseReason),
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubSessionStats {
    /// Heartbeats taken into account.
    pub heartbeats: u64,
    /// Heartbeats ignored as duplicates or reordered.
    pub stale_heartbeats: u64,
    /// Datagrams dropped (too large, malformed, unknown or out of place).
    pub dropped_datagrams: u64,
    /// View snapshots sent.
    pub snapshots_sent: u64,
    /// View deltas sent.
    pub deltas_sent: u64,
    /// Export deltas received.
    pub export_deltas: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but Hello is accepted until the deadline.
    AwaitingHello {
        deadline: Instant,
    },
    Established,
    /// The stream is over but the detector runs on until the POP is
    /// offline, so a POP that vanishes is failed over.
    Draining,
    /// Nothing more will happen.
    Finished,
}

/// The hub's state machine for one agent connection. Plain data: `Send`,
/// no I/O, no clock (every input takes `now`).
#[derive(Debug)]
pub struct HubSession {
    config: HubSessionConfig,
    pop: String,
    session_id: u64,
    phase: Phase,
    reader: FrameReader,
    transmit: VecDeque<pb::UplinkFrame>,
    events: VecDeque<HubEvent>,
    stats: HubSessionStats,

    // Exports.
    /// Highest seq known committed (from the hub's state, then from
    /// commits on this session).
    committed_seq: u64,
    /// Highest seq accepted on this session (queued, in flight or done).
    accepted_seq: u64,
    /// The proposal being committed (kept to re-propose it).
    in_flight: Option<ExportProposal>,
    /// A failed proposal waits until then before it is proposed again.
    retry_at: Option<Instant>,
    /// Current wait before a re-proposal.
    retry_backoff: Duration,
    queue: VecDeque<ExportProposal>,
    /// An ExportResync was sent: ignore non-full deltas until a full one.
    awaiting_full: bool,

    // Views.
    /// The newest view of this POP from the applied state.
    latest: Option<Arc<View>>,
    /// The last view sent on this stream: the base of the next delta.
    /// `None`: the next view goes out as a snapshot.
    sent: Option<Arc<View>>,
    /// Epoch of the last snapshot sent (ignores refusals of older deltas).
    last_snapshot_epoch: u64,
    /// The agent holds this epoch or newer: nothing older is sent.
    floor: u64,
    acked_epoch: u64,

    // Liveness, certificates.
    detector: Option<Detector>,
    last_heartbeat_seq: u64,
    csr_pending: Option<u64>,
}

impl HubSession {
    /// A session for a connection from `pop` (taken from its verified
    /// certificate), accepted at `now`. `committed_export_seq` is the POP's
    /// `last_export_seq` in this node's applied state (0 if none).
    pub fn new(
        config: HubSessionConfig,
        pop: String,
        session_id: u64,
        committed_export_seq: u64,
        now: Instant,
    ) -> Self {
        let deadline = now + config.hello_timeout;
        Self {
            config,
            pop,
            session_id,
            phase: Phase::AwaitingHello { deadline },
            reader: FrameReader::new(Direction::AgentToHub),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: HubSessionStats::default(),
            committed_seq: committed_export_seq,
            accepted_seq: committed_export_seq,
            in_flight: None,
            retry_at: None,
            retry_backoff: Duration::ZERO,
            queue: VecDeque::new(),
            awaiting_full: false,
            latest: None,
            sent: None,
            last_snapshot_epoch: 0,
            floor: 0,
            acked_epoch: 0,
            detector: None,
            last_heartbeat_seq: 0,
            csr_pending: None,
        }
    }

    /// The POP this session serves.
    pub fn pop(&self) -> &str {
        &self.pop
    }

    /// This connection's id.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &HubSessionStats {
        &self.stats
    }

    /// Whether Hello was accepted and the stream is still open.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Whether nothing more will come out of this session: the stream is
    /// over and the POP either never said hello, was closed by the hub, or
    /// has been reported offline. The shell drops the session then.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// The liveness last reported for the POP, once established.
    pub fn liveness(&self) -> Option<Liveness> {
        self.detector.as_ref().map(Detector::reported)
    }

    /// The export seq being committed, if any.
    pub fn in_flight_export(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|p| p.seq)
    }

    /// Frames and events waiting to be polled (for memory metrics).
    pub fn queued(&self) -> (usize, usize) {
        (self.transmit.len(), self.events.len())
    }

    /// The last epoch the agent acknowledged on this session.
    pub fn acked_epoch(&self) -> u64 {
        self.acked_epoch
    }

    // ----- inputs -------------------------------------------------------

    /// Bytes read from the control stream. Decodes every whole frame in
    /// them; framing errors are protocol errors.
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        if !self.stream_open() {
            return;
        }
        if let Err(e) = self.reader.push(data) {
            self.fail(e);
            return;
        }
        while self.stream_open() {
            match self.reader.next_frame() {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => break,
                Err(e) => self.fail(e),
            }
        }
    }

    /// One decoded control-stream frame.
    pub fn handle_frame(&mut self, now: Instant, frame: pb::UplinkFrame) {
        if !self.stream_open() {
            return;
        }
        if let Err(e) = wire::check_frame(&frame, Direction::AgentToHub) {
            self.fail(e);
            return;
        }
        let Some(kind) = frame.kind else {
            return;
        };
        let result = match (self.phase, kind) {
            (Phase::AwaitingHello { .. }, FrameKind::Hello(h)) => self.on_hello(now, h),
            (Phase::AwaitingHello { .. }, other) => Err(UplinkError::Unexpected {
                kind: wire::kind_name(&other),
                why: "Hello must come first",
            }),
            (_, FrameKind::Hello(_)) => Err(UplinkError::Unexpected {
                kind: "Hello",
                why: "sent twice",
            }),
            (_, FrameKind::ExportDelta(d)) => self.on_export_delta(d),
            (_, FrameKind::ViewAck(a)) => {
                self.on_view_ack(a.epoch);
                Ok(())
            }
            (_, FrameKind::ViewRefused(r)) => {
                self.on_view_refused(r);
                Ok(())
            }
            (_, FrameKind::CsrRequest(c)) => self.on_csr(c),
            (_, FrameKind::GatewayAnnounce(g)) => self.on_gateway_addr(g.gateway_addr),
            // Hub-to-agent kinds were refused by check_frame.
            (_, other) => Err(UplinkError::WrongDirection(wire::kind_name(&other))),
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }

    /// One QUIC datagram. Bad datagrams are dropped and counted, never
    /// fatal: datagrams are best effort.
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) {
        if self.phase != Phase::Established {
            self.stats.dropped_datagrams += 1;
            return;
        }
        match decode_datagram(bytes) {
            Ok(DatagramKind::Heartbeat(hb)) => self.on_heartbeat(now, hb),
            Ok(DatagramKind::RttReport(r)) => self.events.push_back(HubEvent::RttReport {
                pop: self.pop.clone(),
                samples: r.samples,
            }),
            Err(_) => self.stats.dropped_datagrams += 1,
        }
    }

    /// The timer set from [`HubSession::poll_timeout`] fired (calling it
    /// early or late is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitingHello { deadline } if now >= deadline => {
                self.queue_error(pb::UplinkErrorCode::Timeout, "no Hello in time".into());
                self.phase = Phase::Finished;
                self.events
                    .push_back(HubEvent::Closed(CloseReason::HelloTimeout));
            }
            Phase::Established | Phase::Draining => {
                if self.retry_at.is_some_and(|t| now >= t) {
                    self.retry_at = None;
                    if self.phase == Phase::Established {
                        if let Some(p) = &self.in_flight {
                            self.events.push_back(HubEvent::ProposeExports(p.clone()));
                        }
                    } else {
                        // Nobody to acknowledge to: the agent resends on
                        // its next connection.
                        self.in_flight = None;
                    }
                }
                self.poll_detector(now);
            }
            _ => {}
        }
    }

    /// The POP's view in this node's applied state changed (call it once
    /// with the current view right after [`HubSession::new`]). Views for
    /// another POP, or not newer than the last one given, are ignored;
    /// returns whether the view was taken.
    pub fn view_changed(&mut self, view: Arc<View>) -> bool {
        if view.pop != self.pop {
            return false;
        }
        if self.latest.as_ref().is_some_and(|l| view.epoch <= l.epoch) {
            return false;
        }
        // Canonical by construction: services in key order, one per key.
        self.latest = Some(view);
        true
    }

    /// The export batch `seq` committed (or was already applied): the
    /// POP's exports are at `seq` in the replicated state. Acknowledges it.
    pub fn export_committed(&mut self, seq: u64) {
        if self.take_in_flight(seq).is_none() {
            return;
        }
        self.committed_seq = self.committed_seq.max(seq);
        if self.stream_open() {
            self.push_frame(FrameKind::ExportAck(pb::ExportAck {
                seq: self.committed_seq,
            }));
        }
        self.propose_next();
    }

    /// The state refused batch `seq` as invalid (`reason`). The agent is
    /// told, and sends its whole set again only once it changed.
    /// `committed_seq`: the POP's last applied seq, as the result said.
    pub fn export_refused(&mut self, seq: u64, committed_seq: u64, reason: &str) {
        if self.take_in_flight(seq).is_none() {
            return;
        }
        self.committed_seq = self.committed_seq.max(committed_seq);
        let mut error = if reason.is_empty() {
            "export batch refused".to_string()
        } else {
            reason.to_string()
        };
        truncate(&mut error, wire::MAX_MESSAGE_LEN);
        self.request_full_resync(error);
    }

    /// The state's sequence number for the POP does not fit batch `seq`
    /// (e.g. the POP was removed and added again): ask the agent for its
    /// whole set, numbered above `committed_seq`.
    pub fn export_out_of_sync(&mut self, seq: u64, committed_seq: u64) {
        if self.take_in_flight(seq).is_none() {
            return;
        }
        self.committed_seq = self.committed_seq.max(committed_seq);
        self.request_full_resync(String::new());
    }

    /// The write of batch `seq` was not acknowledged (no quorum, timeout):
    /// it may or may not have committed. The same batch is proposed again
    /// after a backoff, which is idempotent by seq; see
    /// [`HubSession::poll_timeout`].
    pub fn export_failed(&mut self, now: Instant, seq: u64) {
        if self.in_flight.as_ref().map(|p| p.seq) != Some(seq) {
            return;
        }
        self.retry_backoff = (self.retry_backoff * 2)
            .max(self.config.min_export_retry)
            .min(self.config.max_export_retry);
        self.retry_at = Some(now + self.retry_backoff);
    }

    fn take_in_flight(&mut self, seq: u64) -> Option<ExportProposal> {
        if self.in_flight.as_ref().map(|p| p.seq) != Some(seq) {
            return None;
        }
        self.retry_at = None;
        self.retry_backoff = Duration::ZERO;
        self.in_flight.take()
    }

    /// The CSR `request_id` was signed.
    pub fn certificate_issued(&mut self, request_id: u64, cert_pem: String) {
        if self.csr_pending == Some(request_id) {
            self.csr_pending = None;
            self.push_frame(FrameKind::CertIssued(pb::CertIssued {
                request_id,
                cert_pem,
                error: String::new(),
            }));
        }
    }

    /// The CSR `request_id` was refused.
    pub fn certificate_refused(&mut self, request_id: u64, reason: String) {
        if self.csr_pending == Some(request_id) {
            self.csr_pending = None;
            let mut error = reason;
            truncate(&mut error, wire::MAX_MESSAGE_LEN);
            self.push_frame(FrameKind::CertIssued(pb::CertIssued {
                request_id,
                cert_pem: String::new(),
                error,
            }));
        }
    }

    /// The hub ends the session (revocation, shutdown): queue an
    /// `UplinkError` with `code`, then nothing more, not even liveness
    /// events (the POP is not failed over because this node stopped).
    pub fn close(&mut self, code: pb::UplinkErrorCode, message: &str) {
        if self.phase == Phase::Finished {
            return;
        }
        if self.stream_open() {
            self.queue_error(code, message.to_string());
            self.events
                .push_back(HubEvent::Closed(CloseReason::Local(code)));
        }
        self.phase = Phase::Finished;
    }

    /// The stream or the connection ended (peer closed, idle timeout,
    /// reset). An established POP's detector keeps running until it reports
    /// the POP offline, unless the POP comes back on another session.
    pub fn connection_lost(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitingHello { .. } => {
                self.phase = Phase::Finished;
                self.events
                    .push_back(HubEvent::Closed(CloseReason::ConnectionLost));
            }
            Phase::Established => {
                self.phase = Phase::Draining;
                self.transmit.clear();
                self.events
                    .push_back(HubEvent::Closed(CloseReason::ConnectionLost));
                self.poll_detector(now);
            }
            Phase::Draining | Phase::Finished => {}
        }
    }

    // ----- outputs ------------------------------------------------------

    /// The next frame to write on the control stream (encode it with
    /// `switchyard_proto::uplink::encode_frame`). Views are produced here,
    /// lazily: several view changes between two polls go out as one delta.
    pub fn poll_transmit(&mut self) -> Option<pb::UplinkFrame> {
        if let Some(f) = self.transmit.pop_front() {
            return Some(f);
        }
        if self.phase != Phase::Established {
            return None;
        }
        self.next_view_frame()
    }

    /// The next datagram to send. The hub sends none in this version; the
    /// method exists so the shell's loop is symmetric with the agent's.
    pub fn poll_datagram(&mut self) -> Option<Bytes> {
        None
    }

    /// When to call [`HubSession::handle_timeout`] next: the Hello
    /// deadline, the detector's next possible transition, or an export
    /// retry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingHello { deadline } => Some(deadline),
            Phase::Established | Phase::Draining => {
                let detector = self.detector.as_ref().and_then(Detector::next_change);
                match (detector, self.retry_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Phase::Finished => None,
        }
    }

    /// The next event for the hub node.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    // ----- rules --------------------------------------------------------

    fn stream_open(&self) -> bool {
        matches!(self.phase, Phase::AwaitingHello { .. } | Phase::Established)
    }

    fn on_hello(&mut self, now: Instant, h: pb::Hello) -> Result<(), UplinkError> {
        if h.protocol_version != wire::PROTOCOL_VERSION {
            self.queue_error(
                pb::UplinkErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} not supported (this hub speaks {})",
                    h.protocol_version,
                    wire::PROTOCOL_VERSION
                ),
            );
            return self.end_without_error_frame(UplinkError::Invalid(
                "unsupported protocol version".into(),
            ));
        }
        if h.pop != self.pop {
            // Identity comes from the certificate; a mismatch is a
            // misconfigured or malicious agent.
            self.queue_error(
                pb::UplinkErrorCode::Forbidden,
                "Hello names another POP than the certificate".into(),
            );
            return self.end_without_error_frame(UplinkError::Invalid(
                "Hello names another POP than the certificate".into(),
            ));
        }
        if h.agent_version.len() > wire::MAX_VERSION_LEN {
            return Err(UplinkError::Limit("agent_version too long".into()));
        }
        check_gateway_addr(&h.gateway_addr)?;
        self.phase = Phase::Established;
        self.floor = h.last_applied_epoch;
        let mut detector_config = self.config.detector.clone();
        detector_config.expected_interval = self.config.heartbeat_interval;
        let mut detector = Detector::new(detector_config, now);
        // Consume the initial Online: it is announced below.
        detector.poll_transition(now);
        self.detector = Some(detector);
        let interval_ms =
            u32::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
        self.push_frame(FrameKind::Welcome(pb::Welcome {
            hub_node: self.config.hub_node.clone(),
            heartbeat_interval_ms: interval_ms,
            protocol_version: wire::PROTOCOL_VERSION,
            export_seq: self.committed_seq,
            session_id: self.session_id,
        }));
        self.events.push_back(HubEvent::Established {
            pop: self.pop.clone(),
            session_id: self.session_id,
            agent_version: h.agent_version,
            last_applied_epoch: h.last_applied_epoch,
            last_acked_export_seq: h.last_acked_export_seq,
        });
        self.events.push_back(HubEvent::Liveness {
            pop: self.pop.clone(),
            session_id: self.session_id,
            state: Liveness::Online,
        });
        self.on_gateway_addr(h.gateway_addr)
    }

    fn on_gateway_addr(&mut self, gateway_addr: String) -> Result<(), UplinkError> {
        check_gateway_addr(&gateway_addr)?;
        // Empty: no gateway (yet); the record keeps what it has, so an agent
        // restarting before its separate gateway registers changes nothing.
        if !gateway_addr.is_empty() {
            self.events.push_back(HubEvent::GatewayAddr {
                pop: self.pop.clone(),
                gateway_addr,
            });
        }
        Ok(())
    }

    /// Closes after an error frame was already queued with a specific code.
    fn end_without_error_frame(&mut self, e: UplinkError) -> Result<(), UplinkError> {
        self.end(e);
        Ok(())
    }

    fn on_export_delta(&mut self, d: pb::ExportDelta) -> Result<(), UplinkError> {
        self.stats.export_deltas += 1;
        if d.seq == 0 {
            return Err(UplinkError::Invalid("export seq 0".into()));
        }
        check_export_delta(&d)?;
        if d.seq <= self.committed_seq {
            // Already committed (a resend after reconnect): ack again.
            self.push_frame(FrameKind::ExportAck(pb::ExportAck {
                seq: self.committed_seq,
            }));
            return Ok(());
        }
        if !d.full && d.seq <= self.accepted_seq {
            // Queued or in flight already: its ack will come.
            return Ok(());
        }
        if self.awaiting_full && !d.full {
            // Sent before the agent read our ExportResync.
            return Ok(());
        }
        if !d.full && d.seq != self.accepted_seq + 1 {
            self.request_full_resync(String::new());
            return Ok(());
        }
        if d.full {
            // A whole set supersedes deltas not yet proposed.
            self.queue.clear();
            self.awaiting_full = false;
        }
        if d.full && d.seq <= self.accepted_seq {
            return Err(UplinkError::Invalid(
                "a full export must be numbered above every earlier one".into(),
            ));
        }
        if self.queue.len() >= self.config.max_queued_exports {
            return Err(UplinkError::Limit(format!(
                "more than {} export deltas waiting for commit",
                self.config.max_queued_exports
            )));
        }
        self.accepted_seq = self.accepted_seq.max(d.seq);
        let upserts = d
            .upserts
            .into_iter()
            .map(|mut e| {
                // The POP's identity is its certificate's; indexes are the
                // state machine's to set.
                e.pop = self.pop.clone();
                e.exported_index = 0;
                e.updated_index = 0;
                e
            })
            .collect();
        self.queue.push_back(ExportProposal {
            pop: self.pop.clone(),
            seq: d.seq,
            full: d.full,
            upserts,
            withdrawals: d.withdrawals,
        });
        self.propose_next();
        Ok(())
    }

    fn request_full_resync(&mut self, error: String) {
        self.queue.clear();
        self.awaiting_full = true;
        if self.stream_open() {
            self.push_frame(FrameKind::ExportResync(pb::ExportResync {
                committed_seq: self.committed_seq,
                error,
            }));
        }
    }

    fn propose_next(&mut self) {
        // After the stream is gone nothing new is proposed: the agent
        // resends what was not acknowledged on its next connection.
        if self.in_flight.is_some() || self.phase != Phase::Established {
            return;
        }
        if let Some(p) = self.queue.pop_front() {
            self.in_flight = Some(p.clone());
            self.events.push_back(HubEvent::ProposeExports(p));
        }
    }

    fn highest_sent_epoch(&self) -> u64 {
        self.sent
            .as_ref()
            .map_or(self.last_snapshot_epoch, |s| s.epoch)
            .max(self.last_snapshot_epoch)
    }

    fn on_view_ack(&mut self, epoch: u64) {
        // An ack for something never sent is ignored rather than trusted.
        if epoch > self.acked_epoch && epoch <= self.highest_sent_epoch() {
            self.acked_epoch = epoch;
            self.events.push_back(HubEvent::ViewAcked { epoch });
        }
    }

    fn on_view_refused(&mut self, r: pb::ViewRefused) {
        let reason = pb::ViewRefusal::try_from(r.reason).unwrap_or(pb::ViewRefusal::Unspecified);
        self.events.push_back(HubEvent::ViewRefused {
            epoch: r.epoch,
            applied_epoch: r.applied_epoch,
            reason,
        });
        if reason == pb::ViewRefusal::BaseMismatch && r.epoch < self.last_snapshot_epoch {
            // Refusal of a delta sent before our last snapshot: that
            // snapshot already repairs it.
            return;
        }
        self.floor = self.floor.max(r.applied_epoch);
        if reason != pb::ViewRefusal::BaseMismatch {
            // Never offer the same refused epoch again.
            self.floor = self.floor.max(r.epoch.saturating_add(1));
        }
        self.sent = None;
    }

    fn on_csr(&mut self, c: pb::CsrRequest) -> Result<(), UplinkError> {
        if c.csr_pem.len() > wire::MAX_PEM_LEN {
            return Err(UplinkError::Limit("CSR too large".into()));
        }
        if self.csr_pending.is_some() {
            return Err(UplinkError::Unexpected {
                kind: "CsrRequest",
                why: "one CSR at a time",
            });
        }
        if !c.gateway_instance.is_empty() && !crate::state::valid_name(&c.gateway_instance) {
            return Err(UplinkError::Invalid(
                "gateway instance is not a DNS label".into(),
            ));
        }
        self.csr_pending = Some(c.request_id);
        self.events.push_back(HubEvent::CsrReceived {
            request_id: c.request_id,
            csr_pem: c.csr_pem,
            gateway_instance: c.gateway_instance,
        });
        Ok(())
    }

    fn on_heartbeat(&mut self, now: Instant, hb: pb::Heartbeat) {
        if hb.seq <= self.last_heartbeat_seq {
            self.stats.stale_heartbeats += 1;
            return;
        }
        self.last_heartbeat_seq = hb.seq;
        self.stats.heartbeats += 1;
        if let Some(d) = &mut self.detector {
            d.heartbeat(now);
        }
        self.poll_detector(now);
    }

    fn poll_detector(&mut self, now: Instant) {
        let Some(d) = &mut self.detector else {
            return;
        };
        while let Some(state) = d.poll_transition(now) {
            self.events.push_back(HubEvent::Liveness {
                pop: self.pop.clone(),
                session_id: self.session_id,
                state,
            });
        }
        // A lost session is done once the POP is reported offline (also
        // when that happened before the connection went).
        if self.phase == Phase::Draining && d.reported() == Liveness::Offline {
            self.phase = Phase::Finished;
        }
    }

    fn next_view_frame(&mut self) -> Option<pb::UplinkFrame> {
        let latest = self.latest.clone()?;
        if latest.epoch < self.floor {
            // This node is behind the agent: wait until it catches up
            // rather than offer a view the agent must refuse.
            return None;
        }
        let kind = match &self.sent {
            None => {
                self.stats.snapshots_sent += 1;
                self.last_snapshot_epoch = latest.epoch;
                FrameKind::ViewSnapshot(pb::ViewSnapshot {
                    view: Some(latest.to_pb()),
                })
            }
            Some(sent) if latest.epoch > sent.epoch => {
                self.stats.deltas_sent += 1;
                FrameKind::ViewDelta(latest.delta_from(sent))
            }
            Some(_) => return None,
        };
        self.sent = Some(latest);
        Some(pb::UplinkFrame { kind: Some(kind) })
    }

    fn push_frame(&mut self, kind: FrameKind) {
        self.transmit
            .push_back(pb::UplinkFrame { kind: Some(kind) });
    }

    fn queue_error(&mut self, code: pb::UplinkErrorCode, mut message: String) {
        truncate(&mut message, wire::MAX_MESSAGE_LEN);
        self.push_frame(FrameKind::Error(pb::UplinkError {
            code: code as i32,
            message,
        }));
    }

    /// A protocol error: tell the agent, close the stream.
    fn fail(&mut self, e: UplinkError) {
        self.queue_error(e.code(), e.to_string());
        self.end(e);
    }

    fn end(&mut self, e: UplinkError) {
        self.phase = match self.phase {
            Phase::Established => Phase::Draining,
            _ => Phase::Finished,
        };
        self.events
            .push_back(HubEvent::Closed(CloseReason::Protocol(e)));
    }
}

/// An announced gateway address: empty, or `host:port` within the limit.
fn check_gateway_addr(addr: &str) -> Result<(), UplinkError> {
    if addr.len() > wire::MAX_GATEWAY_ADDR_LEN {
        return Err(UplinkError::Limit("gateway address too long".into()));
    }
    if !addr.is_empty() && !crate::state::valid_gateway_addr(addr) {
        return Err(UplinkError::Invalid(
            "gateway address is not host:port".into(),
        ));
    }
    Ok(())
}

/// Shortens `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

//! The agent's side of the uplink to one hub node, sans I/O.
//!
//! The I/O shell feeds it the control stream's bytes (or decoded frames),
//! datagrams, timer expiries and local events (the desired export set
//! changed, a view was persisted), and drains frames to write, datagrams
//! (heartbeats, RTT reports), the next timer, and events (apply this view,
//! persist this export ack, ...). Rules: `docs/protocol.md`,
//! "Agent <-> hub uplink".
//!
//! One session serves one connection. State that must survive a reconnect
//! (the view held, export sequence numbers, unacknowledged deltas) moves to
//! the next session through [`AgentSession::into_resume`]; after a restart,
//! [`AgentResume::from_disk`] rebuilds what is needed from the
//! last-known-good view and the persisted export seq.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use prost::Message;
use switchyard_proto::pb;
use switchyard_proto::pb::uplink_datagram::Kind as DatagramKind;
use switchyard_proto::pb::uplink_frame::Kind as FrameKind;
use switchyard_proto::uplink::{
    self as wire, apply_checked_delta, canonical_view, check_delta, check_export, encode_datagram,
    Direction, FrameReader, UplinkError,
};

/// Settings of the agent's sessions.
#[derive(Debug, Clone)]
pub struct AgentSessionConfig {
    /// This POP's name (must match its certificate).
    pub pop: String,
    /// This build's version, reported in Hello.
    pub agent_version: String,
    /// How long the hub may take to answer Hello before the session gives
    /// up (the shell then reconnects, possibly to another hub node).
    pub welcome_timeout: Duration,
    /// Heartbeat interval used if Welcome says 0.
    pub default_heartbeat_interval: Duration,
    /// Shortest heartbeat interval accepted from Welcome (a misconfigured
    /// hub must not make agents flood it).
    pub min_heartbeat_interval: Duration,
    /// Longest heartbeat interval accepted from Welcome.
    pub max_heartbeat_interval: Duration,
    /// Export deltas sent and not yet acknowledged, at most. With 1 (the
    /// default) changes made while a delta is being committed coalesce into
    /// the next one; the hub commits one batch at a time anyway.
    pub max_exports_in_flight: usize,
    /// Where this POP's gateway takes QUIC tunnels (`host:port`), sent in
    /// Hello; empty when no gateway is known yet (see
    /// [`AgentSession::set_gateway_addr`]).
    pub gateway_addr: String,
}

impl Default for AgentSessionConfig {
    fn default() -> Self {
        Self {
            pop: String::new(),
            agent_version: String::new(),
            welcome_timeout: Duration::from_secs(10),
            default_heartbeat_interval: Duration::from_millis(250),
            min_heartbeat_interval: Duration::from_millis(50),
            max_heartbeat_interval: Duration::from_secs(10),
            max_exports_in_flight: 1,
            gateway_addr: String::new(),
        }
    }
}

/// A POP's export set, by (namespace, name).
pub type ExportSet = BTreeMap<(String, String), pb::ServiceExport>;

/// What one session hands to the next (see [`AgentSession::into_resume`])
/// or what a restarted agent rebuilds ([`AgentResume::from_disk`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentResume {
    /// The view the agent holds (its last-known-good after a restart).
    pub view: Option<pb::PopView>,
    /// The highest epoch applied: no view below it is accepted.
    pub applied_epoch: u64,
    /// The highest epoch persisted as last-known-good.
    pub persisted_epoch: u64,
    /// Highest export seq the hub acknowledged.
    pub last_acked_export_seq: u64,
    /// Highest export seq sent (>= `last_acked_export_seq`).
    pub last_sent_export_seq: u64,
    /// The export set as of `last_acked_export_seq`, when known. Unknown
    /// after a restart: the first export of the next session is then the
    /// whole set.
    pub acked_exports: Option<ExportSet>,
    /// Deltas sent and not acknowledged, in order: resent after reconnect.
    pub unacked: Vec<pb::ExportDelta>,
    /// The desired export set, once the source gave one.
    pub desired: Option<ExportSet>,
    /// A set the hub refused as invalid: not sent again until it changes.
    pub refused: Option<ExportSet>,
}

impl AgentResume {
    /// The state of a freshly started agent: its last-known-good view (if
    /// the file loaded) and the export seq it persisted from
    /// [`AgentEvent::ExportsAcked`] (0 if none).
    pub fn from_disk(lkg: Option<pb::PopView>, last_acked_export_seq: u64) -> Self {
        let epoch = lkg.as_ref().map_or(0, |v| v.epoch);
        Self {
            view: lkg.map(|v| canonical_view(&v)),
            applied_epoch: epoch,
            persisted_epoch: epoch,
            last_acked_export_seq,
            last_sent_export_seq: last_acked_export_seq,
            ..Default::default()
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCloseReason {
    /// The hub broke the protocol (the agent closes the connection).
    Protocol(UplinkError),
    /// The hub sent `UplinkError` and closed.
    Hub {
        /// The hub's code.
        code: pb::UplinkErrorCode,
        /// The hub's explanation.
        message: String,
    },
    /// No Welcome within the timeout.
    WelcomeTimeout,
    /// The stream or connection ended ([`AgentSession::connection_lost`]).
    ConnectionLost,
}

/// What the session asks of the rest of the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Welcome received: connected to `hub_node`.
    Connected {
        /// The hub node's id.
        hub_node: String,
        /// The connection's id (for logs).
        session_id: u64,
        /// The heartbeat interval in use.
        heartbeat_interval: Duration,
    },
    /// Persist this view as last-known-good (then call
    /// [`AgentSession::view_persisted`]) and serve it. Its epoch is never
    /// below one applied before (fencing). Shared with the session, which
    /// keeps it as the base of the next delta.
    ApplyView(Arc<pb::PopView>),
    /// A view from the hub was refused and the hub told so.
    ViewRefused {
        /// The refused epoch.
        epoch: u64,
        /// The epoch the agent holds.
        applied_epoch: u64,
        /// Why.
        reason: pb::ViewRefusal,
    },
    /// The hub committed exports up to `seq`: persist it (it goes into the
    /// next start's [`AgentResume::from_disk`]).
    ExportsAcked {
        /// The acknowledged seq.
        seq: u64,
    },
    /// The hub refused the export set as invalid; it is sent again once it
    /// changes.
    ExportRefused {
        /// The hub's reason.
        reason: String,
    },
    /// The CSR was signed.
    CertificateIssued {
        /// From [`AgentSession::request_certificate`].
        request_id: u64,
        /// The certificate, PEM.
        cert_pem: String,
    },
    /// The CSR was refused.
    CertificateRefused {
        /// From [`AgentSession::request_certificate`].
        request_id: u64,
        /// The hub's reason.
        reason: String,
    },
    /// The session is over: write queued frames, close the connection, and
    /// reconnect with [`AgentSession::into_resume`].
    Closed(AgentCloseReason),
}

/// Why the desired export set was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// More services than a POP may export.
    #[error("{count} services exported, at most {max} allowed")]
    TooMany {
        /// Services in the set.
        count: usize,
        /// [`wire::MAX_EXPORTS_PER_POP`].
        max: usize,
    },
    /// The set's encoding is too large.
    #[error("export set of {bytes} bytes, at most {max} allowed")]
    TooLarge {
        /// Encoded size (bytes).
        bytes: usize,
        /// [`wire::MAX_EXPORT_SET_BYTES`].
        max: usize,
    },
    /// A service named twice.
    #[error("service {namespace}/{name} exported twice")]
    Duplicate {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A service breaks a per-service limit.
    #[error(transparent)]
    Invalid(#[from] UplinkError),
}

/// Why a CSR was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not connected to a hub (wait for [`AgentEvent::Connected`]).
    #[error("not connected to a hub")]
    NotConnected,
    /// One CSR at a time.
    #[error("a CSR is already waiting for an answer")]
    Pending,
    /// Larger than [`wire::MAX_PEM_LEN`].
    #[error("CSR of {0} bytes is too large")]
    TooLarge(usize),
    /// A gateway CSR needs an instance name.
    #[error("gateway instance name missing")]
    NoInstance,
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentSessionStats {
    /// Heartbeats queued.
    pub heartbeats_sent: u64,
    /// Views accepted.
    pub views_applied: u64,
    /// Views refused (fencing, base mismatch, wrong POP).
    pub views_refused: u64,
    /// Export deltas sent (resends included).
    pub export_deltas_sent: u64,
    /// Datagrams received and dropped (the hub sends none in this version).
    pub dropped_datagrams: u64,
    /// Datagrams dropped because the shell did not drain them in time.
    pub datagrams_overflowed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingWelcome { deadline: Instant },
    Established,
    Closed,
}

/// Datagrams kept for the shell at most; older heartbeats are worthless.
const MAX_QUEUED_DATAGRAMS: usize = 16;

/// The agent's state machine for one hub connection. Plain data: `Send`,
/// no I/O, no clock (every input takes `now`).
#[derive(Debug)]
pub struct AgentSession {
    config: AgentSessionConfig,
    phase: Phase,
    started: Instant,
    reader: FrameReader,
    transmit: VecDeque<pb::UplinkFrame>,
    datagrams: VecDeque<Bytes>,
    events: VecDeque<AgentEvent>,
    stats: AgentSessionStats,

    // Views.
    /// Shared with the last `ApplyView` event: when the runtime has let go
    /// of it by the next delta, the delta is applied without a copy.
    view: Option<Arc<pb::PopView>>,
    applied_epoch: u64,
    persisted_epoch: u64,
    /// Last ViewAck sent on this session.
    acked_epoch: u64,

    // Exports.
    acked_seq: u64,
    last_sent_seq: u64,
    acked_set: Option<ExportSet>,
    /// Sent, unacknowledged, in order.
    unacked: VecDeque<pb::ExportDelta>,
    /// The set as of the last delta sent: the base of the next one.
    sent_set: Option<ExportSet>,
    desired: Option<ExportSet>,
    refused: Option<ExportSet>,
    /// The next export must be a full set numbered above this.
    full_above: Option<u64>,

    // Heartbeats, certificates.
    heartbeat_interval: Duration,
    next_heartbeat: Option<Instant>,
    heartbeat_seq: u64,
    next_request_id: u64,
    csr_pending: Option<u64>,
}

impl AgentSession {
    /// A session on a new connection at `now`; Hello is queued at once.
    pub fn new(config: AgentSessionConfig, resume: AgentResume, now: Instant) -> Self {
        let applied_epoch = resume
            .applied_epoch
            .max(resume.view.as_ref().map_or(0, |v| v.epoch));
        let hello = pb::Hello {
            pop: config.pop.clone(),
            agent_version: config.agent_version.clone(),
            last_applied_epoch: applied_epoch,
            last_acked_export_seq: resume.last_acked_export_seq,
            protocol_version: wire::PROTOCOL_VERSION,
            gateway_addr: config.gateway_addr.clone(),
        };
        let deadline = now + config.welcome_timeout;
        let heartbeat_interval = config.default_heartbeat_interval;
        let mut s = Self {
            config,
            phase: Phase::AwaitingWelcome { deadline },
            started: now,
            reader: FrameReader::new(Direction::HubToAgent),
            transmit: VecDeque::new(),
            datagrams: VecDeque::new(),
            events: VecDeque::new(),
            stats: AgentSessionStats::default(),
            view: resume.view.map(Arc::new),
            applied_epoch,
            persisted_epoch: resume.persisted_epoch,
            acked_epoch: 0,
            acked_seq: resume.last_acked_export_seq,
            last_sent_seq: resume
                .last_sent_export_seq
                .max(resume.last_acked_export_seq),
            acked_set: resume.acked_exports,
            unacked: resume.unacked.into(),
            sent_set: None,
            desired: resume.desired,
            refused: resume.refused,
            full_above: None,
            heartbeat_interval,
            next_heartbeat: None,
            heartbeat_seq: 0,
            next_request_id: 1,
            csr_pending: None,
        };
        s.push_frame(FrameKind::Hello(hello));
        s
    }

    /// What the next session needs (call after [`AgentEvent::Closed`] or
    /// when the connection is gone).
    pub fn into_resume(self) -> AgentResume {
        AgentResume {
            view: self.view.map(Arc::unwrap_or_clone),
            applied_epoch: self.applied_epoch,
            persisted_epoch: self.persisted_epoch,
            last_acked_export_seq: self.acked_seq,
            last_sent_export_seq: self.last_sent_seq,
            acked_exports: self.acked_set,
            unacked: self.unacked.into(),
            desired: self.desired,
            refused: self.refused,
        }
    }

    /// Whether Welcome was received and the session is open.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The highest view epoch applied (the fencing floor).
    pub fn applied_epoch(&self) -> u64 {
        self.applied_epoch
    }

    /// The view held, if any.
    pub fn view(&self) -> Option<&pb::PopView> {
        self.view.as_deref()
    }

    /// Highest export seq the hub acknowledged.
    pub fn last_acked_export_seq(&self) -> u64 {
        self.acked_seq
    }

    /// Export deltas sent and not acknowledged.
    pub fn unacked_exports(&self) -> usize {
        self.unacked.len()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &AgentSessionStats {
        &self.stats
    }

    // ----- inputs -------------------------------------------------------

    /// Bytes read from the control stream.
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Err(e) = self.reader.push(data) {
            self.fail(e);
            return;
        }
        while self.phase != Phase::Closed {
            match self.reader.next_frame() {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => break,
                Err(e) => self.fail(e),
            }
        }
    }

    /// One decoded control-stream frame.
    pub fn handle_frame(&mut self, now: Instant, frame: pb::UplinkFrame) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Err(e) = wire::check_frame(&frame, Direction::HubToAgent) {
            self.fail(e);
            return;
        }
        let Some(kind) = frame.kind else {
            return;
        };
        let result = match (self.phase, kind) {
            (_, FrameKind::Error(e)) => {
                let code = pb::UplinkErrorCode::try_from(e.code)
                    .unwrap_or(pb::UplinkErrorCode::Unspecified);
                self.close(AgentCloseReason::Hub {
                    code,
                    message: e.message,
                });
                Ok(())
            }
            (Phase::AwaitingWelcome { .. }, FrameKind::Welcome(w)) => self.on_welcome(now, w),
            (Phase::AwaitingWelcome { .. }, other) => Err(UplinkError::Unexpected {
                kind: wire::kind_name(&other),
                why: "Welcome must come first",
            }),
            (_, FrameKind::Welcome(_)) => Err(UplinkError::Unexpected {
                kind: "Welcome",
                why: "sent twice",
            }),
            (_, FrameKind::ViewSnapshot(s)) => self.on_snapshot(s),
            (_, FrameKind::ViewDelta(d)) => {
                self.on_view_delta(d);
                Ok(())
            }
            (_, FrameKind::ExportAck(a)) => {
                self.on_export_ack(a.seq);
                Ok(())
            }
            (_, FrameKind::ExportResync(r)) => {
                self.on_export_resync(r);
                Ok(())
            }
            (_, FrameKind::CertIssued(c)) => {
                self.on_cert(c);
                Ok(())
            }
            // Agent-to-hub kinds were refused by check_frame.
            (_, other) => Err(UplinkError::WrongDirection(wire::kind_name(&other))),
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }

    /// One QUIC datagram. The hub sends none in this version: dropped and
    /// counted.
    pub fn handle_datagram(&mut self, _now: Instant, _bytes: &[u8]) {
        self.stats.dropped_datagrams += 1;
    }

    /// The timer set from [`AgentSession::poll_timeout`] fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitingWelcome { deadline } if now >= deadline => {
                self.close(AgentCloseReason::WelcomeTimeout);
            }
            Phase::Established if self.next_heartbeat.is_some_and(|t| now >= t) => {
                self.send_heartbeat(now);
            }
            _ => {}
        }
    }

    /// The stream or connection ended.
    pub fn connection_lost(&mut self, _now: Instant) {
        if self.phase != Phase::Closed {
            self.close(AgentCloseReason::ConnectionLost);
        }
        self.transmit.clear();
        self.datagrams.clear();
    }

    /// The source's whole desired export set (not a change: the session
    /// computes deltas itself). Until the first call nothing is exported, so
    /// a source that is not ready yet never withdraws everything.
    pub fn export_changed(&mut self, exports: Vec<pb::ServiceExport>) -> Result<(), ExportError> {
        if exports.len() > wire::MAX_EXPORTS_PER_POP {
            return Err(ExportError::TooMany {
                count: exports.len(),
                max: wire::MAX_EXPORTS_PER_POP,
            });
        }
        let mut set = ExportSet::new();
        let mut bytes = 0;
        for mut e in exports {
            check_export(&e)?;
            // The hub fills these; sending them would only cost bytes and
            // make equal sets compare different.
            e.pop.clear();
            e.exported_index = 0;
            e.updated_index = 0;
            bytes += e.encoded_len();
            let key = wire::service_key(e.service.as_ref());
            if set.contains_key(&key) {
                return Err(ExportError::Duplicate {
                    namespace: key.0,
                    name: key.1,
                });
            }
            set.insert(key, e);
        }
        if bytes > wire::MAX_EXPORT_SET_BYTES {
            return Err(ExportError::TooLarge {
                bytes,
                max: wire::MAX_EXPORT_SET_BYTES,
            });
        }
        self.desired = Some(set);
        self.send_exports();
        Ok(())
    }

    /// The view at `epoch` (from [`AgentEvent::ApplyView`]) is on disk: the
    /// hub may now be told.
    pub fn view_persisted(&mut self, epoch: u64) {
        if epoch > self.applied_epoch {
            // Not a view this session handed out.
            return;
        }
        self.persisted_epoch = self.persisted_epoch.max(epoch);
        self.maybe_ack_view();
    }

    /// The POP's gateway tunnel address changed: announced to the hub now
    /// if the session is up (and in every later Hello). Returns whether a
    /// frame was queued.
    pub fn set_gateway_addr(&mut self, gateway_addr: String) -> bool {
        if gateway_addr == self.config.gateway_addr {
            return false;
        }
        self.config.gateway_addr = gateway_addr.clone();
        if self.phase == Phase::Closed || gateway_addr.is_empty() {
            return false;
        }
        // Before Welcome the Hello already went with the old value: the
        // hub reads frames in order, so announcing now is still right.
        self.push_frame(FrameKind::GatewayAnnounce(pb::GatewayAnnounce {
            gateway_addr,
        }));
        true
    }

    /// Sends a CSR for renewal; returns its request id.
    pub fn request_certificate(&mut self, csr_pem: String) -> Result<u64, CsrError> {
        self.request_certificate_for(csr_pem, String::new())
    }

    /// Sends a CSR for gateway `instance` of this POP
    /// (`spiffe://D/pop/<pop>/gw/<instance>`); returns its request id. The
    /// answer comes as [`AgentEvent::CertificateIssued`] or
    /// [`AgentEvent::CertificateRefused`], like a renewal (one CSR of
    /// either kind at a time).
    pub fn request_gateway_certificate(
        &mut self,
        instance: &str,
        csr_pem: String,
    ) -> Result<u64, CsrError> {
        if instance.is_empty() {
            return Err(CsrError::NoInstance);
        }
        self.request_certificate_for(csr_pem, instance.to_string())
    }

    fn request_certificate_for(
        &mut self,
        csr_pem: String,
        gateway_instance: String,
    ) -> Result<u64, CsrError> {
        if self.phase != Phase::Established {
            return Err(CsrError::NotConnected);
        }
        if self.csr_pending.is_some() {
            return Err(CsrError::Pending);
        }
        if csr_pem.len() > wire::MAX_PEM_LEN {
            return Err(CsrError::TooLarge(csr_pem.len()));
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.csr_pending = Some(request_id);
        self.push_frame(FrameKind::CsrRequest(pb::CsrRequest {
            request_id,
            csr_pem,
            gateway_instance,
        }));
        Ok(request_id)
    }

    /// RTTs measured by this POP's gateways: sent as datagrams (as many as
    /// needed; samples with invalid names are skipped). Best effort.
    pub fn report_rtt(&mut self, samples: Vec<pb::RttSample>) {
        if self.phase != Phase::Established {
            return;
        }
        let mut batch: Vec<pb::RttSample> = Vec::new();
        for s in samples {
            if s.to_pop.is_empty() || s.to_pop.len() > wire::MAX_NAME_LEN {
                continue;
            }
            batch.push(s);
            let report = pb::RttReport {
                samples: batch.clone(),
            };
            let len = pb::UplinkDatagram {
                kind: Some(DatagramKind::RttReport(report)),
            }
            .encoded_len();
            if len > wire::MAX_DATAGRAM || batch.len() > wire::MAX_RTT_SAMPLES {
                let last = batch.pop();
                self.queue_rtt(std::mem::take(&mut batch));
                batch.extend(last);
            }
        }
        if !batch.is_empty() {
            self.queue_rtt(batch);
        }
    }

    // ----- outputs ------------------------------------------------------

    /// The next frame to write (encode it with
    /// `switchyard_proto::uplink::encode_frame`).
    pub fn poll_transmit(&mut self) -> Option<pb::UplinkFrame> {
        self.transmit.pop_front()
    }

    /// The next datagram to send (heartbeats, RTT reports).
    pub fn poll_datagram(&mut self) -> Option<Bytes> {
        self.datagrams.pop_front()
    }

    /// When to call [`AgentSession::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingWelcome { deadline } => Some(deadline),
            Phase::Established => self.next_heartbeat,
            Phase::Closed => None,
        }
    }

    /// The next event for the agent.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    // ----- rules: session ---------------------------------------------------

    fn on_welcome(&mut self, now: Instant, w: pb::Welcome) -> Result<(), UplinkError> {
        if w.protocol_version != wire::PROTOCOL_VERSION {
            return Err(UplinkError::Invalid(format!(
                "hub chose protocol version {}",
                w.protocol_version
            )));
        }
        self.phase = Phase::Established;
        self.heartbeat_interval = if w.heartbeat_interval_ms == 0 {
            self.config.default_heartbeat_interval
        } else {
            Duration::from_millis(u64::from(w.heartbeat_interval_ms)).clamp(
                self.config.min_heartbeat_interval,
                self.config.max_heartbeat_interval,
            )
        };
        self.events.push_back(AgentEvent::Connected {
            hub_node: w.hub_node,
            session_id: w.session_id,
            heartbeat_interval: self.heartbeat_interval,
        });
        // The first heartbeat at once: the hub's detector started at Hello.
        self.send_heartbeat(now);
        self.resume_exports(w.export_seq);
        Ok(())
    }

    fn send_heartbeat(&mut self, now: Instant) {
        self.heartbeat_seq += 1;
        let sent_at_us =
            u64::try_from(now.saturating_duration_since(self.started).as_micros()).unwrap_or(0);
        let hb = DatagramKind::Heartbeat(pb::Heartbeat {
            seq: self.heartbeat_seq,
            sent_at_us,
        });
        if let Ok(bytes) = encode_datagram(hb) {
            self.queue_datagram(bytes);
            self.stats.heartbeats_sent += 1;
        }
        // Late timers do not cause a burst: the next one is an interval
        // after this one.
        let next = self
            .next_heartbeat
            .map_or(now, |t| t + self.heartbeat_interval);
        self.next_heartbeat = Some(if next <= now {
            now + self.heartbeat_interval
        } else {
            next
        });
    }

    fn queue_rtt(&mut self, samples: Vec<pb::RttSample>) {
        if let Ok(bytes) = encode_datagram(DatagramKind::RttReport(pb::RttReport { samples })) {
            self.queue_datagram(bytes);
        }
    }

    fn queue_datagram(&mut self, bytes: Bytes) {
        if self.datagrams.len() >= MAX_QUEUED_DATAGRAMS {
            self.datagrams.pop_front();
            self.stats.datagrams_overflowed += 1;
        }
        self.datagrams.push_back(bytes);
    }

    fn on_cert(&mut self, c: pb::CertIssued) {
        if self.csr_pending != Some(c.request_id) {
            return;
        }
        self.csr_pending = None;
        self.events
            .push_back(if c.error.is_empty() && !c.cert_pem.is_empty() {
                AgentEvent::CertificateIssued {
                    request_id: c.request_id,
                    cert_pem: c.cert_pem,
                }
            } else {
                AgentEvent::CertificateRefused {
                    request_id: c.request_id,
                    reason: c.error,
                }
            });
    }

    fn push_frame(&mut self, kind: FrameKind) {
        self.transmit
            .push_back(pb::UplinkFrame { kind: Some(kind) });
    }

    /// The hub broke the protocol: the agent cannot send an error frame
    /// (that kind travels hub to agent), so it just closes.
    fn fail(&mut self, e: UplinkError) {
        self.close(AgentCloseReason::Protocol(e));
    }

    fn close(&mut self, reason: AgentCloseReason) {
        self.phase = Phase::Closed;
        self.next_heartbeat = None;
        self.csr_pending = None;
        self.events.push_back(AgentEvent::Closed(reason));
    }

    // ----- rules: views -------------------------------------------------------

    fn on_snapshot(&mut self, s: pb::ViewSnapshot) -> Result<(), UplinkError> {
        let Some(view) = s.view else {
            return Err(UplinkError::Invalid("ViewSnapshot without a view".into()));
        };
        if view.pop != self.config.pop {
            self.refuse_view(view.epoch, pb::ViewRefusal::WrongPop);
        } else if view.epoch < self.applied_epoch {
            self.refuse_view(view.epoch, pb::ViewRefusal::StaleEpoch);
        } else {
            self.accept_view(canonical_view(&view));
        }
        Ok(())
    }

    fn on_view_delta(&mut self, d: pb::ViewDelta) {
        if d.epoch < self.applied_epoch {
            self.refuse_view(d.epoch, pb::ViewRefusal::StaleEpoch);
            return;
        }
        let Some(held) = &self.view else {
            self.refuse_view(d.epoch, pb::ViewRefusal::BaseMismatch);
            return;
        };
        if check_delta(held, &d).is_err() {
            self.refuse_view(d.epoch, pb::ViewRefusal::BaseMismatch);
            return;
        }
        let pop = d.header.as_ref().map_or(&held.pop, |h| &h.pop);
        if *pop != self.config.pop {
            self.refuse_view(d.epoch, pb::ViewRefusal::WrongPop);
            return;
        }
        if d.epoch == held.epoch {
            // Possibly the view already held: keep it to compare with.
            let view = apply_checked_delta(pb::PopView::clone(held), &d);
            self.accept_view(view);
            return;
        }
        let Some(held) = self.view.take() else {
            return;
        };
        let view = apply_checked_delta(Arc::unwrap_or_clone(held), &d);
        self.accept_view(view);
    }

    /// Takes a view whose epoch is not below the applied one (checked by
    /// the callers: this is the only place `applied_epoch` moves).
    fn accept_view(&mut self, view: pb::PopView) {
        if view.epoch < self.applied_epoch {
            // Unreachable by construction; refuse rather than regress.
            self.refuse_view(view.epoch, pb::ViewRefusal::StaleEpoch);
            return;
        }
        if self.view.as_deref() == Some(&view) {
            // Already held (a reconnect to a node at the same epoch): no
            // re-apply, no rewrite; ack if it is on disk.
            self.maybe_ack_view();
            return;
        }
        self.applied_epoch = view.epoch;
        let view = Arc::new(view);
        self.view = Some(view.clone());
        self.stats.views_applied += 1;
        self.events.push_back(AgentEvent::ApplyView(view));
        self.maybe_ack_view();
    }

    fn refuse_view(&mut self, epoch: u64, reason: pb::ViewRefusal) {
        self.stats.views_refused += 1;
        self.push_frame(FrameKind::ViewRefused(pb::ViewRefused {
            epoch,
            applied_epoch: self.applied_epoch,
            reason: reason as i32,
        }));
        self.events.push_back(AgentEvent::ViewRefused {
            epoch,
            applied_epoch: self.applied_epoch,
            reason,
        });
    }

    fn maybe_ack_view(&mut self) {
        if self.phase != Phase::Established {
            return;
        }
        // Only what is both on disk and held: the ack means "persisted".
        let epoch = self.persisted_epoch.min(self.applied_epoch);
        if epoch > self.acked_epoch && self.view.as_ref().is_some_and(|v| v.epoch == epoch) {
            self.acked_epoch = epoch;
            self.push_frame(FrameKind::ViewAck(pb::ViewAck { epoch }));
        }
    }

    // ----- rules: exports -----------------------------------------------------

    /// After Welcome: reconcile what the hub has committed (`hub_seq`) with
    /// what this agent sent, then resend or start over with the whole set.
    fn resume_exports(&mut self, hub_seq: u64) {
        let in_range = hub_seq >= self.acked_seq && hub_seq <= self.last_sent_seq;
        match self.acked_set.take() {
            Some(mut acked) if in_range => {
                // Deltas up to hub_seq are committed: fold them in.
                let before = self.acked_seq;
                while let Some(d) = self.unacked.pop_front() {
                    if d.seq > hub_seq {
                        self.unacked.push_front(d);
                        break;
                    }
                    apply_export_delta(&mut acked, &d);
                }
                self.acked_seq = hub_seq;
                if self.acked_seq > before {
                    self.events.push_back(AgentEvent::ExportsAcked {
                        seq: self.acked_seq,
                    });
                }
                // Resend the rest, same numbers: the hub applies each once.
                let mut sent = acked.clone();
                let resend: Vec<_> = self.unacked.iter().cloned().collect();
                for d in resend {
                    apply_export_delta(&mut sent, &d);
                    self.stats.export_deltas_sent += 1;
                    self.push_frame(FrameKind::ExportDelta(d));
                }
                self.acked_set = Some(acked);
                self.sent_set = Some(sent);
            }
            _ => {
                // Unknown base (restart), or the hub's number is outside
                // what we sent (its state was reset, or we lost ours): the
                // whole set, numbered above everything either side used.
                self.start_over(hub_seq);
            }
        }
        self.send_exports();
    }

    fn start_over(&mut self, hub_seq: u64) {
        self.acked_set = None;
        self.unacked.clear();
        self.sent_set = None;
        self.full_above = Some(hub_seq.max(self.last_sent_seq));
    }

    fn on_export_ack(&mut self, seq: u64) {
        if seq <= self.acked_seq || seq > self.last_sent_seq {
            // Stale, or for nothing we sent: ignore.
            return;
        }
        while self.unacked.front().is_some_and(|d| d.seq <= seq) {
            if let Some(d) = self.unacked.pop_front() {
                let set = self.acked_set.get_or_insert_with(ExportSet::new);
                apply_export_delta(set, &d);
            }
        }
        self.acked_seq = seq;
        self.events.push_back(AgentEvent::ExportsAcked { seq });
        self.send_exports();
    }

    fn on_export_resync(&mut self, r: pb::ExportResync) {
        self.start_over(r.committed_seq);
        if !r.error.is_empty() {
            // Do not send the same set again: it would be refused again.
            self.refused = self.desired.clone();
            self.events
                .push_back(AgentEvent::ExportRefused { reason: r.error });
        }
        self.send_exports();
    }

    /// Sends what the hub lacks, within the in-flight window.
    fn send_exports(&mut self) {
        if self.phase != Phase::Established {
            return;
        }
        let Some(desired) = &self.desired else {
            return;
        };
        if self.refused.as_ref() == Some(desired) {
            return;
        }
        self.refused = None;
        if let Some(above) = self.full_above {
            let seq = above.max(self.last_sent_seq) + 1;
            let delta = pb::ExportDelta {
                seq,
                upserts: desired.values().cloned().collect(),
                withdrawals: Vec::new(),
                full: true,
            };
            self.full_above = None;
            self.sent_set = Some(desired.clone());
            self.send_delta(delta);
            return;
        }
        if self.unacked.len() >= self.config.max_exports_in_flight.max(1) {
            return;
        }
        let base = match (&self.sent_set, &self.acked_set) {
            (Some(s), _) => s,
            (None, Some(a)) => a,
            // No known base and no full pending cannot happen; be safe.
            (None, None) => {
                self.full_above = Some(self.last_sent_seq);
                return self.send_exports();
            }
        };
        if base == desired {
            return;
        }
        let (upserts, withdrawals) = diff_exports(base, desired);
        let delta = pb::ExportDelta {
            seq: self.last_sent_seq + 1,
            upserts,
            withdrawals,
            full: false,
        };
        self.sent_set = Some(desired.clone());
        self.send_delta(delta);
    }

    fn send_delta(&mut self, delta: pb::ExportDelta) {
        self.last_sent_seq = delta.seq;
        self.unacked.push_back(delta.clone());
        self.stats.export_deltas_sent += 1;
        self.push_frame(FrameKind::ExportDelta(delta));
    }
}

/// Applies an export delta to a set (withdrawals, then upserts; a full
/// delta replaces the set).
pub(crate) fn apply_export_delta(set: &mut ExportSet, d: &pb::ExportDelta) {
    if d.full {
        set.clear();
    }
    for k in &d.withdrawals {
        set.remove(&wire::service_key(Some(k)));
    }
    for e in &d.upserts {
        set.insert(wire::service_key(e.service.as_ref()), e.clone());
    }
}

/// What turns `old` into `new`: changed or added exports whole, and the
/// keys of removed ones.
fn diff_exports(old: &ExportSet, new: &ExportSet) -> (Vec<pb::ServiceExport>, Vec<pb::ServiceKey>) {
    let upserts = new
        .iter()
        .filter(|(k, e)| old.get(*k) != Some(*e))
        .map(|(_, e)| e.clone())
        .collect();
    let withdrawals = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|(namespace, name)| pb::ServiceKey {
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .collect();
    (upserts, withdrawals)
}

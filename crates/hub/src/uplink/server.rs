//! The QUIC I/O shell of the uplink: accepts agent connections, moves bytes
//! between quinn and one [`HubSession`] per connection, and turns the
//! session's events into Raft proposals. Decisions stay in the session, the
//! state machine and `decide`; this file only moves bytes, runs timers and
//! carries events.
//!
//! Per connection:
//! - the POP comes from the verified client certificate (`spiffe://D/pop/P`);
//!   a revoked POP is closed with [`pb::UplinkErrorCode::Revoked`];
//! - one bidirectional control stream (the transport allows one, and no
//!   unidirectional streams, so a peer opening a thousand streams gets
//!   flow-control blocked, not buffered);
//! - reads in bounded chunks, writes what the session produces, feeds
//!   datagrams and timers;
//! - on every applied Raft index: revocation check (close within one
//!   applied change); the POP's view is computed with every other
//!   session's on this node by one task (`super::views`) and given to the
//!   session when its epoch moved.
//!
//! QUIC application close codes are the numeric values of
//! [`pb::UplinkErrorCode`] (0 = normal close).
//!
//! ## Liveness across hub nodes, and its known gap
//!
//! Only the node holding a POP's connection judges it. When a hub node
//! dies its sessions die with it and report nothing; the POP reconnects to
//! another node, whose new session commits `Online` (a no-op when already
//! Online), so the POP is never marked offline by a hub failure.
//!
//! When a connection is lost while its node lives, the session's detector
//! keeps running and commits `Offline` unless the POP reconnects: to this
//! node (the newer session supersedes the old one at once, which then
//! commits nothing), or to another node. In the latter case the old node
//! would like to commit `Offline`, but `SetPopLiveness` carries the
//! session, and the state refuses a Suspect/Offline verdict from any
//! session other than the one that last reported the POP Online.
//!
//! If the hub node holding a POP dies *and* the POP dies with it (or never
//! reconnects), no session anywhere runs a detector for it: the leader's
//! orphan sweep (see [`ORPHAN_GRACE`]) marks it offline instead.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::{Buf, BytesMut};
use openraft::async_runtime::watch::WatchReceiver;
use quinn::{crypto::rustls::QuicServerConfig, VarInt};
use switchyard_pki::SpiffeId;
use switchyard_proto::{
    pb::{self, command::Kind, uplink_frame::Kind as FrameKind, ErrorCode},
    uplink as wire,
};
use tokio::{
    sync::{mpsc, watch, Notify, Semaphore},
    task::JoinHandle,
};

use super::{
    enrol::{federation_ca, sign_gateway_csr, sign_pop_csr},
    views::{self, ViewBoard},
    CloseReason, HubEvent, HubSession, HubSessionConfig, Liveness,
};
use crate::{decide::View, metrics, node::Hub, server::admin::now_ms};

/// POPs with an established session on this node (gauge).
pub const CONNECTED_POPS: &str = "switchyard_hub_uplink_connected_pops";
/// Sessions opened (Hello accepted).
pub const SESSIONS_OPENED: &str = "switchyard_hub_uplink_sessions_opened_total";
/// Control streams ended, by `reason`.
pub const SESSIONS_CLOSED: &str = "switchyard_hub_uplink_sessions_closed_total";
/// Control streams closed for a protocol error, by `reason` (error code).
pub const FRAMES_REJECTED: &str = "switchyard_hub_uplink_frames_rejected_total";
/// Views written to agents, by `kind` (snapshot, delta).
pub const VIEW_PUSHES: &str = "switchyard_hub_uplink_view_pushes_total";
/// Seconds from noticing an applied change of a POP's view to writing it.
pub const PUSH_LAG: &str = "switchyard_hub_uplink_push_lag_seconds";
/// Liveness transitions committed through this node, by `state`.
pub const LIVENESS_TRANSITIONS: &str = "switchyard_hub_uplink_liveness_transitions_total";
/// Datagrams dropped by the sessions (malformed, too large, early).
pub const DATAGRAMS_DROPPED: &str = "switchyard_hub_uplink_datagrams_dropped_total";
/// Failback damping periods ended by this node's timer.
pub const DAMPING_ENDED: &str = "switchyard_hub_uplink_damping_ended_total";

/// Largest chunk read from a control stream at once (bytes): with the
/// frame reader's own limit, bounds what one agent makes us buffer.
const MAX_READ_CHUNK: usize = 64 * 1024;
/// Stop pulling frames from the session while this much is unwritten
/// (bytes): views then coalesce in the session instead of piling up here.
const MAX_PENDING_WRITE: usize = 64 * 1024;

/// Bytes quinn may hold written but not yet acknowledged per connection.
/// A view is state, not a stream of events: an agent that reads slowly
/// should get the newest view when it catches up, not every intermediate
/// one, so little is buffered (256 KiB still moves 2.5 MB/s at 100 ms RTT;
/// a larger frame just takes several round trips).
const SEND_WINDOW: u64 = 256 * 1024;
/// How long a closing connection waits for the agent to read our last
/// frames and close first, before we close it (well under the 1 s
/// revocation budget).
const CLOSE_GRACE: Duration = Duration::from_millis(300);
/// Longest TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before re-proposing a liveness transition that was not
/// acknowledged; doubles up to [`MAX_LIVENESS_RETRY`].
const MIN_LIVENESS_RETRY: Duration = Duration::from_millis(100);
const MAX_LIVENESS_RETRY: Duration = Duration::from_secs(2);
/// Proposals of one liveness transition before it is given up (each is
/// bounded by the write timeout).
const MAX_LIVENESS_ATTEMPTS: u32 = 10;

/// Settings of the uplink listener.
#[derive(Debug, Clone)]
pub struct UplinkOptions {
    /// Session settings (`hub_node` is filled in from the node id).
    pub session: HubSessionConfig,
    /// Most concurrent agent connections on this node (each holds a
    /// session and its buffers); more are refused at the handshake.
    pub max_connections: usize,
    /// Lifetime of certificates issued to POPs (enrolment and renewal).
    pub pop_cert_validity: Duration,
    /// QUIC idle timeout; agents send keep-alives well within it.
    pub idle_timeout: Duration,
    /// Shortest interval between two RTT reports committed for one POP.
    pub rtt_report_interval: Duration,
    /// How often the leader checks damped POPs for the end of their
    /// failback period.
    pub damping_check_interval: Duration,
}

impl Default for UplinkOptions {
    fn default() -> Self {
        Self {
            session: HubSessionConfig::default(),
            max_connections: 10_000,
            pop_cert_validity: super::enrol::DEFAULT_POP_CERT_VALIDITY,
            idle_timeout: Duration::from_secs(10),
            rtt_report_interval: Duration::from_secs(10),
            damping_check_interval: Duration::from_millis(500),
        }
    }
}

/// Why the uplink listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkStartError {
    /// The UDP socket could not bind.
    #[error("cannot listen (QUIC) on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration is unusable for QUIC.
    #[error("QUIC TLS configuration: {0}")]
    Tls(String),
}

/// Sessions on this node, by POP: the newest one wins.
#[derive(Default)]
struct Registry {
    /// POP -> (session id, asks the session to close).
    newest: HashMap<String, (u64, Arc<Notify>)>,
}

struct Shared {
    hub: Hub,
    applied: watch::Receiver<u64>,
    options: UplinkOptions,
    next_session: AtomicU64,
    registry: Mutex<Registry>,
    shutdown: watch::Receiver<bool>,
    /// Computes the views of every session on this node.
    views: Arc<ViewBoard>,
}

impl Shared {
    fn is_newest(&self, pop: &str, session_id: u64) -> bool {
        self.registry
            .lock()
            .map(|r| r.newest.get(pop).is_some_and(|(id, _)| *id == session_id))
            .unwrap_or(false)
    }
}

/// The running uplink listener of one hub node.
pub struct UplinkServer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for UplinkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl UplinkServer {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// POPs with a session on this node (newest session each).
    pub fn connected_pops(&self) -> BTreeMap<String, u64> {
        self.shared
            .registry
            .lock()
            .map(|r| {
                r.newest
                    .iter()
                    .map(|(p, (id, _))| (p.clone(), *id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Closes every session as a hub-side close (no liveness is reported:
    /// a node stopping does not fail its POPs over), then the endpoint.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // Give the sessions a moment to write their UplinkError.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.endpoint.close(
            VarInt::from_u32(pb::UplinkErrorCode::ShuttingDown as u32),
            b"hub node stopping",
        );
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The quinn server configuration: TLS 1.3 with mandatory client
/// certificates (from `tls`), ALPN `switchyard/1`, no 0-RTT, datagrams,
/// one bidirectional stream per connection.
pub fn quic_server_config(
    mut tls: rustls::ServerConfig,
    options: &UplinkOptions,
) -> Result<quinn::ServerConfig, UplinkStartError> {
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    // 0-RTT data could be replayed; the uplink never accepts it.
    tls.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| UplinkStartError::Tls(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(
            options
                .idle_timeout
                .try_into()
                .map_err(|e| UplinkStartError::Tls(format!("idle timeout: {e}")))?,
        ))
        // An agent frame is at most 1 MiB: a little more flow-control
        // credit than that keeps one frame in flight, no more.
        .stream_receive_window(VarInt::from_u32(
            (wire::MAX_AGENT_FRAME + MAX_READ_CHUNK) as u32,
        ))
        .receive_window(VarInt::from_u32(2 * wire::MAX_AGENT_FRAME as u32))
        // quinn buffers up to this much written-but-unacknowledged data per
        // connection (default 10 MiB): a thousand slow agents could hold
        // gigabytes of stale views. Views coalesce in the session instead.
        .send_window(SEND_WINDOW)
        .datagram_receive_buffer_size(Some(64 * 1024));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config.max_incoming(options.max_connections.max(1));
    // Connection migration (a POP's address changes) is allowed: the
    // session is bound to the connection, not the address.
    config.migration(true);
    Ok(config)
}

/// Binds the uplink on `listen` and serves agents of `hub`.
/// `applied` is the state machine's applied-index watch.
pub fn start(
    hub: Hub,
    applied: watch::Receiver<u64>,
    tls: rustls::ServerConfig,
    listen: SocketAddr,
    mut options: UplinkOptions,
) -> Result<UplinkServer, UplinkStartError> {
    options.session.hub_node = hub.id().to_string();
    let config = quic_server_config(tls, &options)?;
    let endpoint = super::udp::endpoint(listen, super::udp::UPLINK_SOCKET_BUFFER, Some(config))
        .map_err(|source| UplinkStartError::Bind {
            addr: listen,
            source,
        })?;
    let addr = endpoint
        .local_addr()
        .map_err(|source| UplinkStartError::Bind {
            addr: listen,
            source,
        })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Session ids: node id in the top 16 bits, then a counter seeded from
    // the wall clock so a restarted node does not reuse its old ids.
    let seed = (now_ms().max(0) as u64) << 8;
    let shared = Arc::new(Shared {
        hub: hub.clone(),
        applied,
        next_session: AtomicU64::new((hub.id() << 48) | (seed & 0xFFFF_FFFF_FFFF)),
        registry: Mutex::new(Registry::default()),
        shutdown: shutdown_rx,
        options,
        views: Arc::new(ViewBoard::default()),
    });
    let limit = Arc::new(Semaphore::new(shared.options.max_connections.max(1)));
    let accept = {
        let endpoint = endpoint.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    metrics::rejected("uplink_too_many_connections");
                    incoming.refuse();
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_connection(shared, incoming).await;
                    drop(permit);
                });
            }
        })
    };
    let damping = tokio::spawn(damping_timer(shared.clone()));
    let views = tokio::spawn(views::run(
        hub.clone(),
        shared.views.clone(),
        shared.applied.clone(),
    ));
    tracing::info!(%addr, "uplink (QUIC) listening");
    Ok(UplinkServer {
        endpoint,
        addr,
        shared,
        shutdown: shutdown_tx,
        tasks: vec![accept, damping, views],
    })
}

fn close_code(code: pb::UplinkErrorCode) -> VarInt {
    VarInt::from_u32(code as u32)
}

/// The POP of a verified client certificate chain, if it is a POP agent's.
fn pop_of(conn: &quinn::Connection) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    match switchyard_pki::peer_identity_from_chain(&chain).ok()? {
        SpiffeId::Pop { pop, .. } => Some(pop),
        _ => None,
    }
}

fn classify_handshake(e: &quinn::ConnectionError) -> &'static str {
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "tls_unknown_ca"
    } else if text.contains("certificate") || text.contains("Certificate") {
        "tls_bad_certificate"
    } else {
        "tls_handshake_failed"
    }
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            metrics::rejected("tls_handshake_failed");
            tracing::debug!(%peer, error = %e, "uplink handshake refused");
            return;
        }
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let reason = classify_handshake(&e);
            metrics::rejected(reason);
            tracing::info!(%peer, reason, error = %e, "uplink handshake refused");
            return;
        }
        Err(_) => {
            metrics::rejected("tls_handshake_timeout");
            return;
        }
    };
    let Some(pop) = pop_of(&conn) else {
        metrics::rejected("wrong_role");
        tracing::info!(%peer, "uplink refused: the client certificate is not a POP's");
        conn.close(
            close_code(pb::UplinkErrorCode::Forbidden),
            b"only POP agents may connect",
        );
        return;
    };
    let hub = &shared.hub;
    if hub.local(|s| s.is_revoked(pb::RevocationKind::Pop, &pop)) {
        metrics::rejected("pop_revoked");
        tracing::info!(%peer, pop, "uplink refused: POP is revoked");
        conn.close(close_code(pb::UplinkErrorCode::Revoked), b"POP is revoked");
        return;
    }
    let hello_timeout = shared.options.session.hello_timeout;
    let (send, recv) = match tokio::time::timeout(hello_timeout, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return,
        Err(_) => {
            conn.close(
                close_code(pb::UplinkErrorCode::Timeout),
                b"no control stream in time",
            );
            return;
        }
    };
    let session_id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let committed = hub.local(|s| s.pop_status.get(&pop).map_or(0, |st| st.last_export_seq));
    let session = HubSession::new(
        shared.options.session.clone(),
        pop.clone(),
        session_id,
        committed,
        Instant::now(),
    );
    tracing::debug!(%peer, pop, session_id, "uplink connection");
    Driver::new(shared.clone(), conn, send, recv, session)
        .run()
        .await;
}

/// What a spawned proposal reports back to its connection.
enum Outcome {
    Export {
        seq: u64,
        result: Result<pb::CommandResult, String>,
    },
}

struct Driver {
    shared: Arc<Shared>,
    conn: quinn::Connection,
    send: Option<quinn::SendStream>,
    recv: Option<quinn::RecvStream>,
    conn_open: bool,
    session: HubSession,
    pop: String,
    session_id: u64,
    out: BytesMut,
    applied: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    outcomes_rx: mpsc::UnboundedReceiver<Outcome>,
    liveness: watch::Sender<Option<Liveness>>,
    superseded: Arc<Notify>,
    /// Epoch of the last view given to the session.
    view_epoch: u64,
    /// When the view not yet written was noticed (push lag).
    view_pending_since: Option<Instant>,
    /// The session ended its stream: flush, then close with this code.
    closing: Option<(pb::UplinkErrorCode, &'static str)>,
    established: bool,
    rtt_next: Instant,
    rtt_busy: Arc<std::sync::atomic::AtomicBool>,
    dropped_datagrams: u64,
    /// The agent's address as last seen (connection migration changes it).
    last_remote: SocketAddr,
    /// The POP's newest view, from the node's [`ViewBoard`].
    views: watch::Receiver<Option<Arc<View>>>,
}

impl Driver {
    fn new(
        shared: Arc<Shared>,
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        session: HubSession,
    ) -> Self {
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let (liveness, liveness_rx) = watch::channel(None);
        let pop = session.pop().to_string();
        let session_id = session.session_id();
        let last_remote = conn.remote_address();
        let views = shared.views.join(session_id, &pop);
        tokio::spawn(commit_liveness(
            shared.hub.clone(),
            pop.clone(),
            session_id,
            liveness_rx,
        ));
        Self {
            applied: shared.applied.clone(),
            shutdown: shared.shutdown.clone(),
            shared,
            conn,
            send: Some(send),
            recv: Some(recv),
            conn_open: true,
            session,
            pop,
            session_id,
            out: BytesMut::new(),
            outcomes_tx,
            outcomes_rx,
            liveness,
            superseded: Arc::new(Notify::new()),
            view_epoch: 0,
            view_pending_since: None,
            closing: None,
            established: false,
            rtt_next: Instant::now(),
            rtt_busy: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            dropped_datagrams: 0,
            last_remote,
            views,
        }
    }

    async fn run(mut self) {
        self.on_applied();
        loop {
            if !self.pump() {
                break;
            }
            let deadline = self.session.poll_timeout();
            let sleep_until = deadline.map(tokio::time::Instant::from_std);
            let reading = self.recv.is_some() && self.closing.is_none();
            let writing = self.send.is_some() && !self.out.is_empty();
            tokio::select! {
                r = async {
                    match self.recv.as_mut() {
                        Some(r) => r.read_chunk(MAX_READ_CHUNK, true).await,
                        None => std::future::pending().await,
                    }
                }, if reading => {
                    let now = Instant::now();
                    match r {
                        Ok(Some(chunk)) => self.session.handle_stream_data(now, &chunk.bytes),
                        Ok(None) | Err(_) => {
                            self.recv = None;
                            self.session.connection_lost(now);
                        }
                    }
                }
                n = async {
                    match self.send.as_mut() {
                        Some(s) => s.write(&self.out).await,
                        None => std::future::pending().await,
                    }
                }, if writing => {
                    match n {
                        Ok(n) => self.out.advance(n),
                        Err(_) => {
                            self.send = None;
                            self.out.clear();
                            self.session.connection_lost(Instant::now());
                        }
                    }
                }
                d = self.conn.read_datagram(), if self.conn_open => {
                    match d {
                        Ok(bytes) => {
                            self.session.handle_datagram(Instant::now(), &bytes);
                            self.note_alive();
                        }
                        Err(_) => {
                            self.conn_open = false;
                            self.recv = None;
                            self.send = None;
                            self.out.clear();
                            self.session.connection_lost(Instant::now());
                        }
                    }
                }
                _ = async {
                    match sleep_until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => self.session.handle_timeout(Instant::now()),
                r = self.applied.changed() => {
                    if r.is_err() {
                        // The state machine is gone: the node is stopping.
                        self.session.close(pb::UplinkErrorCode::ShuttingDown, "hub node stopping");
                        self.applied = watch::channel(0).1;
                    } else {
                        self.on_applied();
                    }
                }
                r = self.views.changed() => {
                    if r.is_ok() {
                        self.on_view();
                    } else {
                        self.views = watch::channel(None).1;
                    }
                }
                Some(o) = self.outcomes_rx.recv() => self.on_outcome(o),
                _ = self.superseded.notified() => {
                    self.session.close(
                        pb::UplinkErrorCode::Unspecified,
                        "a newer connection of this POP replaced this one",
                    );
                }
                r = self.shutdown.changed() => {
                    if r.is_err() || *self.shutdown.borrow() {
                        self.session.close(pb::UplinkErrorCode::ShuttingDown, "hub node stopping");
                    }
                    // Either way, this branch has done its job.
                    self.shutdown = watch::channel(false).1;
                }
            }
        }
        self.finish_connection();
        if self.established {
            self.release();
        }
    }

    /// Drains the session's outputs. Returns false once the driver is done.
    fn pump(&mut self) -> bool {
        while let Some(ev) = self.session.poll_event() {
            self.on_event(ev);
        }
        if self.session.stats().dropped_datagrams > self.dropped_datagrams {
            let d = self.session.stats().dropped_datagrams - self.dropped_datagrams;
            self.dropped_datagrams = self.session.stats().dropped_datagrams;
            ::metrics::counter!(DATAGRAMS_DROPPED).increment(d);
        }
        if self.send.is_some() {
            while self.out.len() < MAX_PENDING_WRITE {
                let Some(frame) = self.session.poll_transmit() else {
                    break;
                };
                self.count_view(&frame);
                if let Err(e) = wire::encode_frame(&frame, &mut self.out) {
                    // A view above 4 MiB: nothing the agent could read.
                    tracing::error!(pop = self.pop, error = %e, "uplink frame not encodable");
                    self.session
                        .close(pb::UplinkErrorCode::Limit, "view too large");
                }
            }
            // Events produced while polling (Closed after close()).
            while let Some(ev) = self.session.poll_event() {
                self.on_event(ev);
            }
        } else {
            while self.session.poll_transmit().is_some() {}
        }
        if self.closing.is_some() && self.out.is_empty() && self.send.is_some() {
            // Everything the session had to say is written: end the stream,
            // then the connection once the agent read it (or after a grace).
            self.finish_connection();
        }
        if self.session.is_finished() && self.send.is_none() {
            return false;
        }
        if self.send.is_none() && self.recv.is_none() && !self.established {
            // Never said hello and the stream is gone.
            return !self.session.is_finished();
        }
        true
    }

    fn finish_connection(&mut self) {
        let (code, reason) = self
            .closing
            .unwrap_or((pb::UplinkErrorCode::Unspecified, "session ended"));
        if let Some(mut s) = self.send.take() {
            let _ = s.finish();
        }
        self.recv = None;
        self.out.clear();
        if self.conn_open {
            self.conn_open = false;
            let conn = self.conn.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLOSE_GRACE, conn.closed()).await;
                conn.close(close_code(code), reason.as_bytes());
            });
        }
    }

    fn count_view(&mut self, frame: &pb::UplinkFrame) {
        let kind = match &frame.kind {
            Some(FrameKind::ViewSnapshot(_)) => "snapshot",
            Some(FrameKind::ViewDelta(_)) => "delta",
            _ => return,
        };
        ::metrics::counter!(VIEW_PUSHES, "kind" => kind).increment(1);
        if let Some(t) = self.view_pending_since.take() {
            ::metrics::histogram!(PUSH_LAG).record(t.elapsed().as_secs_f64());
        }
    }

    fn on_applied(&mut self) {
        self.applied.borrow_and_update();
        let pop = self.pop.clone();
        let (revoked, liveness) = self.shared.hub.local(|s| {
            (
                s.is_revoked(pb::RevocationKind::Pop, &pop),
                s.liveness(&pop),
            )
        });
        if revoked {
            tracing::info!(pop, session_id = self.session_id, "closing revoked POP");
            metrics::rejected("pop_revoked");
            self.session
                .close(pb::UplinkErrorCode::Revoked, "POP was revoked");
            self.closing = Some((pb::UplinkErrorCode::Revoked, "POP was revoked"));
            return;
        }
        // Another node's stale session marked this POP offline while it is
        // connected here and healthy: assert the truth again.
        if self.session.is_established()
            && liveness == pb::PopLiveness::Offline
            && self.session.liveness() == Some(Liveness::Online)
            && self.shared.is_newest(&self.pop, self.session_id)
            && self.liveness.borrow().is_some()
        {
            self.liveness.send_replace(Some(Liveness::Online));
        }
    }

    /// A newer view of the POP was computed: hand it to the session.
    fn on_view(&mut self) {
        let open = self.send.is_some() && self.closing.is_none();
        let Some(view) = self.views.borrow_and_update().clone() else {
            return;
        };
        if open && view.epoch > self.view_epoch {
            self.view_epoch = view.epoch;
            if self.session.view_changed(view) {
                self.view_pending_since.get_or_insert_with(Instant::now);
            }
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Export { seq, result } => {
                let committed = self.shared.hub.local(|s| {
                    s.pop_status
                        .get(&self.pop)
                        .map_or(0, |st| st.last_export_seq)
                });
                match result {
                    Ok(r) => match ErrorCode::try_from(r.error).unwrap_or(ErrorCode::Invalid) {
                        ErrorCode::None => self.session.export_committed(seq),
                        ErrorCode::Stale => self
                            .session
                            .export_out_of_sync(seq, committed.max(r.export_seq)),
                        _ => self.session.export_refused(
                            seq,
                            committed.max(r.export_seq),
                            &r.message,
                        ),
                    },
                    Err(e) => {
                        tracing::debug!(pop = self.pop, seq, error = e, "export not acknowledged");
                        self.session.export_failed(Instant::now(), seq);
                    }
                }
            }
        }
    }

    fn on_event(&mut self, ev: HubEvent) {
        match ev {
            HubEvent::Established {
                agent_version,
                last_applied_epoch,
                ..
            } => {
                self.established = true;
                ::metrics::counter!(SESSIONS_OPENED).increment(1);
                let old = self.shared.registry.lock().ok().and_then(|mut r| {
                    r.newest
                        .insert(self.pop.clone(), (self.session_id, self.superseded.clone()))
                });
                match old {
                    // The POP reconnected: its older session commits nothing
                    // more and closes.
                    Some((_, notify)) => notify.notify_one(),
                    None => ::metrics::gauge!(CONNECTED_POPS).increment(1.0),
                }
                self.last_remote = self.conn.remote_address();
                self.shared.hub.sessions().open(pb::SessionInfo {
                    pop: self.pop.clone(),
                    hub_node: self.shared.hub.id(),
                    session: self.session_label(),
                    agent_version: agent_version.clone(),
                    remote_addr: self.last_remote.to_string(),
                    connected_at_ms: now_ms(),
                    last_heartbeat_ms: 0,
                });
                tracing::info!(
                    pop = self.pop,
                    session_id = self.session_id,
                    agent_version,
                    last_applied_epoch,
                    "POP session established"
                );
            }
            HubEvent::ProposeExports(p) => {
                let seq = p.seq;
                let hub = self.shared.hub.clone();
                let tx = self.outcomes_tx.clone();
                tokio::spawn(async move {
                    let result = hub
                        .propose(p.into_command())
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Outcome::Export { seq, result });
                });
            }
            HubEvent::Liveness { state, .. } => {
                // A session replaced by a newer one of the same POP (on this
                // node) must not judge the POP any more.
                if self.shared.is_newest(&self.pop, self.session_id) {
                    ::metrics::counter!(LIVENESS_TRANSITIONS, "state" => state.to_pb().as_str_name())
                        .increment(1);
                    self.liveness.send_replace(Some(state));
                }
            }
            HubEvent::ViewAcked { .. } => {}
            HubEvent::ViewRefused {
                epoch,
                applied_epoch,
                reason,
            } => {
                tracing::debug!(
                    pop = self.pop,
                    epoch,
                    applied_epoch,
                    reason = reason.as_str_name(),
                    "agent refused a view"
                );
            }
            HubEvent::CsrReceived {
                request_id,
                csr_pem,
                gateway_instance,
            } => self.renew(request_id, &csr_pem, &gateway_instance),
            HubEvent::GatewayAddr { pop, gateway_addr } => self.record_gateway(pop, gateway_addr),
            HubEvent::RttReport { pop, samples } => self.report_rtt(pop, samples),
            HubEvent::Closed(reason) => {
                let (label, code, text): (&'static str, _, &'static str) = match &reason {
                    CloseReason::Protocol(e) => {
                        let code = e.code();
                        ::metrics::counter!(FRAMES_REJECTED, "reason" => code.as_str_name())
                            .increment(1);
                        tracing::info!(pop = self.pop, error = %e, "uplink protocol error");
                        ("protocol", code, "protocol error")
                    }
                    CloseReason::HelloTimeout => {
                        ("hello_timeout", pb::UplinkErrorCode::Timeout, "no Hello")
                    }
                    CloseReason::Local(c) => ("local", *c, "closed by the hub"),
                    CloseReason::ConnectionLost => (
                        "connection_lost",
                        pb::UplinkErrorCode::Unspecified,
                        "connection lost",
                    ),
                };
                ::metrics::counter!(SESSIONS_CLOSED, "reason" => label).increment(1);
                if self.closing.is_none() {
                    self.closing = Some((code, text));
                }
            }
        }
    }

    /// `<hub node>/<session id>`, as in liveness commands.
    fn session_label(&self) -> String {
        format!("{}/{:x}", self.shared.hub.id(), self.session_id)
    }

    /// A datagram arrived: the POP is alive now (for `pop list` and the
    /// status page), and its address may have moved.
    fn note_alive(&mut self) {
        if !self.established {
            return;
        }
        let book = self.shared.hub.sessions();
        let label = self.session_label();
        book.heartbeat(&self.pop, &label, now_ms());
        let remote = self.conn.remote_address();
        if remote != self.last_remote {
            tracing::info!(pop = self.pop, from = %self.last_remote, to = %remote, "POP address changed (connection migrated)");
            self.last_remote = remote;
            book.migrated(&self.pop, &label, remote.to_string());
        }
    }

    /// Removes this session from the registry if it is still the newest.
    fn release(&mut self) {
        self.shared
            .hub
            .sessions()
            .close(&self.pop, &self.session_label());
        if let Ok(mut r) = self.shared.registry.lock() {
            if r.newest
                .get(&self.pop)
                .is_some_and(|(id, _)| *id == self.session_id)
            {
                r.newest.remove(&self.pop);
                ::metrics::gauge!(CONNECTED_POPS).decrement(1.0);
            }
        }
    }

    /// Commits the POP's gateway address when its record differs (the POP
    /// comes from the certificate, through the session). Retried a few
    /// times while no quorum answers; the agent announces it again on its
    /// next connection anyway.
    fn record_gateway(&mut self, pop: String, gateway_addr: String) {
        let current = self
            .shared
            .hub
            .local(|s| s.pops.get(&pop).map(|p| p.gateway_addr.clone()));
        if current.as_deref() == Some(gateway_addr.as_str()) {
            return;
        }
        let hub = self.shared.hub.clone();
        tokio::spawn(async move {
            let mut backoff = MIN_LIVENESS_RETRY;
            for _ in 0..MAX_LIVENESS_ATTEMPTS {
                let r = hub
                    .propose(pb::Command {
                        kind: Some(Kind::SetPopGateway(pb::SetPopGateway {
                            pop: pop.clone(),
                            gateway_addr: gateway_addr.clone(),
                        })),
                    })
                    .await;
                match r {
                    Ok(r) if r.error == ErrorCode::None as i32 => {
                        tracing::info!(pop, gateway_addr, "POP gateway address recorded");
                        return;
                    }
                    Ok(r) => {
                        tracing::warn!(
                            pop,
                            gateway_addr,
                            message = r.message,
                            "POP gateway address refused"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(pop, error = %e, "gateway address not acknowledged; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_LIVENESS_RETRY);
                    }
                }
            }
        });
    }

    fn renew(&mut self, request_id: u64, csr_pem: &str, gateway_instance: &str) {
        let hub = &self.shared.hub;
        if hub.local(|s| s.is_revoked(pb::RevocationKind::Pop, &self.pop)) {
            metrics::rejected("pop_revoked");
            self.session
                .certificate_refused(request_id, "POP is revoked".into());
            return;
        }
        let validity = self.shared.options.pop_cert_validity;
        let signed = federation_ca(hub).and_then(|ca| {
            if gateway_instance.is_empty() {
                sign_pop_csr(&ca, &self.pop, csr_pem, validity)
            } else {
                // Only a gateway of the caller's own POP: the POP comes from
                // the connection's certificate, never from the request.
                sign_gateway_csr(&ca, &self.pop, gateway_instance, csr_pem, validity)
            }
        });
        match signed {
            Ok(cert) => {
                if gateway_instance.is_empty() {
                    tracing::info!(pop = self.pop, "POP certificate renewed");
                } else {
                    tracing::info!(
                        pop = self.pop,
                        gateway_instance,
                        "gateway certificate issued"
                    );
                }
                self.session.certificate_issued(request_id, cert);
            }
            Err(e) => {
                metrics::rejected("bad_csr");
                tracing::info!(pop = self.pop, error = %e, "renewal refused");
                self.session.certificate_refused(request_id, e.to_string());
            }
        }
    }

    /// Commits an RTT report, at most one per `rtt_report_interval` per
    /// session; reports in between are dropped (the state keeps buckets
    /// with hysteresis anyway, so frequent commits would change nothing).
    fn report_rtt(&mut self, pop: String, samples: Vec<pb::RttSample>) {
        let now = Instant::now();
        if now < self.rtt_next || self.rtt_busy.load(Ordering::Relaxed) {
            return;
        }
        self.rtt_next = now + self.shared.options.rtt_report_interval;
        self.rtt_busy.store(true, Ordering::Relaxed);
        let busy = self.rtt_busy.clone();
        let hub = self.shared.hub.clone();
        tokio::spawn(async move {
            for s in samples.into_iter().take(wire::MAX_RTT_SAMPLES) {
                if s.to_pop == pop || s.rtt_us == 0 {
                    continue;
                }
                let _ = hub
                    .propose(pb::Command {
                        kind: Some(Kind::ReportRtt(pb::ReportRtt {
                            from_pop: pop.clone(),
                            to_pop: s.to_pop,
                            rtt_us: s.rtt_us,
                        })),
                    })
                    .await;
            }
            busy.store(false, Ordering::Relaxed);
        });
    }
}

/// Commits one session's liveness transitions in order. A newer transition
/// replaces one not committed yet (Online -> Suspect -> Offline collapses to
/// Offline), so a slow Raft never queues stale verdicts. Runs until the
/// session is gone and its last verdict is committed.
async fn commit_liveness(
    hub: Hub,
    pop: String,
    session_id: u64,
    mut rx: watch::Receiver<Option<Liveness>>,
) {
    while rx.changed().await.is_ok() {
        let mut backoff = MIN_LIVENESS_RETRY;
        let mut attempts = 0;
        loop {
            let Some(state) = *rx.borrow_and_update() else {
                break;
            };
            let r = hub
                .propose(pb::Command {
                    kind: Some(Kind::SetPopLiveness(pb::SetPopLiveness {
                        pop: pop.clone(),
                        state: state.to_pb() as i32,
                        reason: format!("hub node {} session {session_id:x}", hub.id()),
                        now_ms: now_ms(),
                        session: format!("{}/{session_id:x}", hub.id()),
                    })),
                })
                .await;
            match r {
                Ok(r) => {
                    if r.error != ErrorCode::None as i32 {
                        tracing::info!(pop, message = r.message, "liveness refused");
                    }
                    break;
                }
                Err(e) => {
                    attempts += 1;
                    if attempts >= MAX_LIVENESS_ATTEMPTS {
                        // Quorum lost for long: the next transition (or the
                        // agent's next session) says it again.
                        tracing::warn!(pop, error = %e, "liveness transition dropped");
                        break;
                    }
                    tracing::debug!(pop, error = %e, "liveness not acknowledged; retrying");
                    if rx.has_changed().is_ok() {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            // A newer verdict replaces this one at once.
                            _ = rx.changed() => {}
                        }
                    } else {
                        // The session is gone: retry its last verdict.
                        tokio::time::sleep(backoff).await;
                    }
                    backoff = (backoff * 2).min(MAX_LIVENESS_RETRY);
                }
            }
        }
    }
}

/// Ends failback damping: on the leader, for each damped POP whose healthy
/// period has lasted `failback_after_ms`, proposes `EndFailbackDamping`
/// naming that period (a stale proposal is refused by the state).
///
/// Time: the wall clock is read once when a period is first seen (to credit
/// what elapsed before, e.g. under a previous leader); after that only
/// tokio's clock counts.
async fn damping_timer(shared: Arc<Shared>) {
    let hub = &shared.hub;
    // (pop, healthy_since_index) -> when to end it.
    let mut deadlines: HashMap<(String, u64), tokio::time::Instant> = HashMap::new();
    let mut tick = tokio::time::interval(shared.options.damping_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut orphans = OrphanSweeper::default();
    loop {
        tick.tick().await;
        let leader = hub.raft().metrics().borrow_watched().current_leader;
        if leader != Some(hub.id()) {
            deadlines.clear();
            orphans = OrphanSweeper::default();
            continue;
        }
        orphans.sweep(hub).await;
        let damped: Vec<(String, u64, i64, u64)> = hub.local(|s| {
            s.pop_status
                .values()
                .filter(|st| st.damped)
                .map(|st| {
                    (
                        st.pop.clone(),
                        st.healthy_since_index,
                        st.healthy_since_ms,
                        s.failback_after_ms(&st.pop),
                    )
                })
                .collect()
        });
        let now = tokio::time::Instant::now();
        let wall = now_ms();
        deadlines.retain(|k, _| damped.iter().any(|(p, i, _, _)| (p, *i) == (&k.0, k.1)));
        for (pop, index, since_ms, after_ms) in damped {
            let deadline = *deadlines.entry((pop.clone(), index)).or_insert_with(|| {
                let elapsed = u64::try_from(wall.saturating_sub(since_ms)).unwrap_or(0);
                now + Duration::from_millis(after_ms.saturating_sub(elapsed))
            });
            if now < deadline {
                continue;
            }
            let r = hub
                .propose(pb::Command {
                    kind: Some(Kind::EndFailbackDamping(pb::EndFailbackDamping {
                        pop: pop.clone(),
                        healthy_since_index: index,
                        now_ms: now_ms(),
                    })),
                })
                .await;
            match r {
                Ok(r) if r.error == ErrorCode::None as i32 => {
                    ::metrics::counter!(DAMPING_ENDED).increment(1);
                    tracing::info!(pop, "failback damping ended");
                }
                Ok(r) => tracing::debug!(pop, message = r.message, "damping end refused"),
                Err(e) => tracing::debug!(pop, error = %e, "damping end not acknowledged"),
            }
        }
    }
}

/// How long a POP may stay held by a hub node the leader cannot reach
/// before the leader declares it offline: the agent's QUIC idle timeout
/// (3 s) plus a reconnect, with margin. Only a POP whose agent did not
/// reconnect anywhere (it died with its hub node) stays held that long.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(6);

/// The leader's sweep for POPs orphaned by a dead hub node: the node held
/// the POP's session and ran its detector, so with both gone nobody would
/// ever mark the POP offline. The verdict carries the dead holder's session,
/// so the state refuses it if the POP reconnected elsewhere meanwhile.
#[derive(Default)]
struct OrphanSweeper {
    /// When this node became leader (heartbeat ages mean nothing before).
    since: Option<tokio::time::Instant>,
    /// (pop, holder) verdicts already proposed.
    proposed: std::collections::HashSet<(String, String)>,
}

impl OrphanSweeper {
    async fn sweep(&mut self, hub: &Hub) {
        let now = tokio::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < ORPHAN_GRACE {
            return;
        }
        let m = hub.raft().metrics().borrow_watched().clone();
        let Some(beats) = m.heartbeat.as_ref() else {
            return;
        };
        let me = hub.id();
        let silent = |node: u64| match beats.get(&node) {
            // Not a member any more.
            None => true,
            Some(None) => true,
            Some(Some(t)) => openraft::Instant::elapsed(&**t) > ORPHAN_GRACE,
        };
        let held: Vec<(String, String)> = hub.local(|s| {
            s.pop_status
                .values()
                .filter(|st| {
                    matches!(
                        pb::PopLiveness::try_from(st.liveness),
                        Ok(pb::PopLiveness::Online | pb::PopLiveness::Suspect)
                    )
                })
                .map(|st| (st.pop.clone(), st.holder.clone()))
                .collect()
        });
        self.proposed.retain(|k| held.contains(k));
        for (pop, holder) in held {
            let Some(node) = holder
                .split_once('/')
                .and_then(|(n, _)| n.parse::<u64>().ok())
            else {
                continue;
            };
            if node == me || !silent(node) || self.proposed.contains(&(pop.clone(), holder.clone()))
            {
                continue;
            }
            let r = hub
                .propose(pb::Command {
                    kind: Some(Kind::SetPopLiveness(pb::SetPopLiveness {
                        pop: pop.clone(),
                        state: pb::PopLiveness::Offline as i32,
                        reason: format!(
                            "hub node {node} holding it is unreachable and the POP did not reconnect"
                        ),
                        now_ms: now_ms(),
                        session: holder.clone(),
                    })),
                })
                .await;
            match r {
                Ok(r) => {
                    if r.error == ErrorCode::None as i32 {
                        tracing::warn!(pop, node, "orphaned POP marked offline");
                        ::metrics::counter!(LIVENESS_TRANSITIONS, "state" => "POP_LIVENESS_OFFLINE")
                            .increment(1);
                    }
                    self.proposed.insert((pop, holder));
                }
                Err(e) => tracing::debug!(pop, error = %e, "orphan verdict not acknowledged"),
            }
        }
    }
}

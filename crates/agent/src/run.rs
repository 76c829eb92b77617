//! The agent process: enrolment or identity from the data dir, the service
//! source and probes, the HTTP listener, and the QUIC uplink shell that
//! drives [`AgentSession`].
//!
//! The shell only moves bytes: every protocol rule lives in the session.
//! What it adds is I/O and timing:
//! - connect to a hub node (rotating through the known QUIC addresses, with
//!   exponential backoff and jitter), open the control stream, and drive
//!   the session: frames out, bounded reads in, datagrams both ways, its
//!   timer;
//! - on `ApplyView`: write the view as last-known-good, then serve it and
//!   report it persisted (only then does the session ack it to the hub);
//! - on `ExportsAcked`: persist the seq for the next start;
//! - at half the certificate's life: renew over the session, store the new
//!   key and certificate, and use them for the next connection.
//!
//! Before any hub is reachable, and across restarts, the agent serves the
//! last-known-good view from disk; a corrupt file is refused (logged) and
//! the agent starts with no view rather than a partly read one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use rand::Rng as _;
use switchyard_pki::{ExpectedPeer, SpiffeId};
use switchyard_proto::pb;
use switchyard_proto::uplink::{self as wire};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{AgentRecord, ConfigError, DataDir, Identity};
use crate::enrol::{self, EnrolError};
use crate::exports::{all_probed, to_exports};
use crate::gateway::{GatewayLink, GatewaySupport};
use crate::http::{self, Status, ViewSource};
use crate::lkg::Lkg;
use crate::probe;
use crate::source::{FileSource, ServiceSource, SourceError};
use crate::uplink::{
    AgentCloseReason, AgentEvent, AgentResume, AgentSession, AgentSessionConfig, AgentSessionStats,
};

/// Settings of one agent process.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Data directory (see [`crate::config`]).
    pub data_dir: PathBuf,
    /// Hub gRPC addresses (`host:port`) used to enrol. Ignored once
    /// enrolled, except to re-enrol with a new token.
    pub hub_grpc: Vec<String>,
    /// QUIC uplink addresses (`host:port`) to use instead of those the hub
    /// announced at enrolment (stored, so later starts use them too).
    pub uplink_override: Vec<String>,
    /// POP join token; needed only when the data dir is not enrolled (or its
    /// certificate has expired).
    pub token: Option<String>,
    /// Services file; `None`: this agent manages no exports (it sends
    /// none, and the hub keeps whatever this POP exported before).
    pub services: Option<PathBuf>,
    /// How often the services file is polled for changes.
    pub services_poll: Duration,
    /// HTTP listen address (`/healthz`, `/readyz`, `/metrics`,
    /// `/debug/view`); port 0 picks a free port.
    pub http: SocketAddr,
    /// Version reported at enrolment and in Hello.
    pub agent_version: String,
    /// Session settings (`pop` and `agent_version` are filled in).
    pub session: AgentSessionConfig,
    /// After a start, the first export waits at most this long for every
    /// endpoint's first probe result, so a restarting POP does not briefly
    /// report its endpoints as not ready.
    pub first_export_grace: Duration,
    /// First wait before reconnecting; doubles per failed attempt.
    pub backoff_min: Duration,
    /// Longest wait between attempts (also used after a revocation).
    pub backoff_max: Duration,
    /// Longest QUIC handshake.
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval: keeps NAT bindings and lets a dead path
    /// show well within the idle timeout.
    pub keep_alive: Duration,
    /// QUIC idle timeout: a hub silent this long is considered gone.
    pub idle_timeout: Duration,
    /// Wait before retrying a refused certificate renewal.
    pub renewal_retry: Duration,
    /// Local API for a gateway in its own process (`switchyard gateway`):
    /// view stream, gateway certificates, RTT reports. `None`: not served.
    /// Meant for loopback: see [`crate::local_api`].
    pub gateway_api: Option<SocketAddr>,
    /// DNS listen address (UDP and TCP) for the POP zone
    /// `clusterset.local.` built from the served view; port 0 picks a free
    /// port; `None`: no DNS.
    pub dns: Option<SocketAddr>,
    /// Per-source limit on DNS answers over UDP (answers per second, burst
    /// twice that); `None`: unlimited.
    pub dns_rate_limit: Option<u32>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/switchyard/agent"),
            hub_grpc: Vec::new(),
            uplink_override: Vec::new(),
            token: None,
            services: None,
            services_poll: crate::source::DEFAULT_POLL_INTERVAL,
            http: SocketAddr::from(([127, 0, 0, 1], 7480)),
            agent_version: String::new(),
            session: AgentSessionConfig::default(),
            first_export_grace: Duration::from_secs(3),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            // A hub node that dies sends no CLOSE: this is how long until
            // the agent moves to another node (three missed keep-alives).
            idle_timeout: Duration::from_secs(3),
            renewal_retry: Duration::from_secs(60),
            gateway_api: None,
            dns: None,
            dns_rate_limit: None,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Not enrolled and no token given.
    #[error("data dir {0} is not enrolled: start once with --token T (from `switchyard token create --pop NAME`) and --hub ADDR")]
    NotEnrolled(PathBuf),
    /// Enrolment failed.
    #[error("enrolment failed: {0}")]
    Enrol(#[from] EnrolError),
    /// The data dir is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The stored identity is unusable.
    #[error("the stored certificate or key is unusable: {0}")]
    Identity(String),
    /// The services file is invalid.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The local gateway API could not start.
    #[error("cannot serve the local gateway API on {addr}: {reason}")]
    GatewayApi {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        reason: String,
    },
    /// The DNS listener could not bind.
    #[error("cannot serve DNS on {addr}: {source}")]
    Dns {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP listener could not bind.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running agent. Dropping it does not stop it: call
/// [`RunningAgent::shutdown`].
#[derive(Debug)]
pub struct RunningAgent {
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// What the agent reports (view, counters).
    pub status: Arc<Status>,
    /// The enrolment record in use.
    pub record: AgentRecord,
    /// Identities, view and reports for this POP's gateways (an embedded
    /// gateway uses it directly; the local API serves it).
    pub gateway: GatewaySupport,
    /// The bound address of the local gateway API, if served.
    pub gateway_api_addr: Option<SocketAddr>,
    /// The bound DNS address (UDP and TCP), if served.
    pub dns_addr: Option<SocketAddr>,
    dns: Option<switchyard_dns::DnsServer>,
    shutdown: watch::Sender<bool>,
    uplink: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    _source: Option<FileSource>,
}

impl RunningAgent {
    /// Closes the uplink (telling the hub) and stops every task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.uplink).await;
        for t in self.tasks {
            t.abort();
        }
        if let Some(dns) = self.dns {
            // Joins the UDP worker threads (each wakes within its receive
            // timeout): blocking, so off the async workers.
            let _ = tokio::task::spawn_blocking(move || dns.shutdown()).await;
        }
    }
}

/// Starts the agent: identity (enrolling if needed), last-known-good view,
/// services and probes, HTTP, uplink.
pub async fn start(mut cfg: AgentConfig) -> Result<RunningAgent, AgentError> {
    let data = DataDir::new(&cfg.data_dir);
    let (mut record, identity) = load_or_enrol(&cfg, &data).await?;
    if !cfg.uplink_override.is_empty() && record.hub_quic != cfg.uplink_override {
        record.hub_quic = cfg.uplink_override.clone();
        data.store_record(&record)?;
    }
    cfg.session.pop = record.pop.clone();
    cfg.session.agent_version = cfg.agent_version.clone();

    let status = Arc::new(Status::new(record.pop.clone(), record.domain.clone()));
    if let Some((_, not_after)) = enrol::cert_validity(&identity.cert_pem) {
        status
            .counters
            .cert_not_after_s
            .store(unix_s(not_after), Ordering::Relaxed);
    }

    // Last-known-good: served before any hub answers.
    let lkg_view = match Lkg::load_async(cfg.data_dir.clone()).await {
        Ok(Some(v)) if v.pop == record.pop => Some(v),
        Ok(Some(v)) => {
            tracing::error!(file_pop = %v.pop, pop = %record.pop, "last-known-good view is for another POP; refused");
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "last-known-good view refused; starting with no view");
            None
        }
    };
    if let Some(v) = &lkg_view {
        tracing::info!(
            epoch = v.epoch,
            services = v.services.len(),
            "serving last-known-good view"
        );
        status.publish(v.clone(), ViewSource::Lkg);
    }
    let export_seq = data.load_export_seq();
    status
        .counters
        .exports_acked_seq
        .store(export_seq, Ordering::Relaxed);

    let mut tasks = Vec::new();
    // Services and probes -> the desired export set.
    let (source, exports_rx) = match &cfg.services {
        Some(path) => {
            let source = FileSource::start(path.clone(), cfg.services_poll).await?;
            let services = source.subscribe();
            let (readiness, probes) = probe::follow(services.clone());
            tasks.push(probes);
            let (rx, task) = follow_exports(services, readiness, cfg.first_export_grace);
            tasks.push(task);
            (Some(source), rx)
        }
        None => (None, watch::channel(None).1),
    };

    let (http_addr, http_task) = http::serve(cfg.http, status.clone())
        .await
        .map_err(|source| AgentError::Http {
            addr: cfg.http,
            source,
        })?;
    tasks.push(http_task);

    let (gateway, link) = GatewaySupport::new(
        status.clone(),
        data.clone(),
        identity.ca_pem.clone(),
        cfg.session.gateway_addr.clone(),
        record.hub_quic.clone(),
    );
    let gateway_api_addr = match cfg.gateway_api {
        Some(addr) => {
            let (bound, task) = crate::local_api::serve(addr, gateway.clone(), &data)
                .await
                .map_err(|e| AgentError::GatewayApi {
                    addr,
                    reason: e.to_string(),
                })?;
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };

    let dns = match cfg.dns {
        Some(addr) => {
            let (tables, task) = switchyard_dns::server::follow(status.subscribe_view(), |held| {
                let view = held.as_ref().map(|h| &h.view);
                match switchyard_dns::zone::build(view) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build the DNS zone; serving the previous one");
                        None
                    }
                }
            });
            tasks.push(task);
            let dns_cfg = switchyard_dns::DnsConfig {
                listen: addr,
                rate_limit: cfg
                    .dns_rate_limit
                    .map(|qps| switchyard_dns::limits::RateLimitConfig {
                        per_second: qps,
                        burst: qps.saturating_mul(2),
                        ..Default::default()
                    }),
                ..Default::default()
            };
            let server = switchyard_dns::DnsServer::bind(dns_cfg, tables)
                .await
                .map_err(|source| AgentError::Dns { addr, source })?;
            status.set_dns_stats(server.stats());
            Some(server)
        }
        None => None,
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let shell = Shell {
        cfg: cfg.clone(),
        data,
        lkg: Lkg::new(&cfg.data_dir),
        record: record.clone(),
        identity: Arc::new(Mutex::new(identity)),
        status: status.clone(),
        exports: exports_rx,
        shutdown: shutdown_rx,
        link: Some(link),
    };
    let resume = AgentResume::from_disk(lkg_view, export_seq);
    let uplink = tokio::spawn(shell.run(resume));
    Ok(RunningAgent {
        http_addr,
        status,
        record,
        gateway,
        gateway_api_addr,
        dns_addr: dns.as_ref().map(|d| d.local_addr()),
        dns,
        shutdown,
        uplink,
        tasks,
        _source: source,
    })
}

async fn load_or_enrol(
    cfg: &AgentConfig,
    data: &DataDir,
) -> Result<(AgentRecord, Identity), AgentError> {
    if data.is_enrolled() {
        let record = data.load_record()?;
        let identity = data.load_identity()?;
        let expired = enrol::cert_validity(&identity.cert_pem)
            .is_some_and(|(_, not_after)| not_after <= SystemTime::now());
        match (&cfg.token, expired) {
            (Some(token), true) => {
                tracing::warn!(pop = %record.pop, "certificate expired; enrolling again with the token given");
                let grpc = if cfg.hub_grpc.is_empty() {
                    record.hub_grpc.clone()
                } else {
                    cfg.hub_grpc.clone()
                };
                let e = enrol::enrol(data, token, &grpc, &cfg.uplink_override, &cfg.agent_version)
                    .await?;
                return Ok((e.record, e.identity));
            }
            (None, true) => {
                tracing::error!(pop = %record.pop, "certificate expired: hubs will refuse it; start with --token and a new token to enrol again");
            }
            (Some(_), false) => {
                tracing::info!(pop = %record.pop, "already enrolled; --token ignored");
            }
            (None, false) => {}
        }
        check_identity(&record, &identity)?;
        return Ok((record, identity));
    }
    let Some(token) = &cfg.token else {
        return Err(AgentError::NotEnrolled(cfg.data_dir.clone()));
    };
    let e = enrol::enrol(
        data,
        token,
        &cfg.hub_grpc,
        &cfg.uplink_override,
        &cfg.agent_version,
    )
    .await?;
    Ok((e.record, e.identity))
}

fn check_identity(record: &AgentRecord, id: &Identity) -> Result<(), AgentError> {
    let chain = switchyard_pki::load_certs_pem(&id.cert_pem)
        .map_err(|e| AgentError::Identity(e.to_string()))?;
    let got = switchyard_pki::peer_identity_from_chain(&chain)
        .map_err(|e| AgentError::Identity(e.to_string()))?;
    let want = SpiffeId::pop(&record.domain, &record.pop)
        .map_err(|e| AgentError::Identity(e.to_string()))?;
    if got != want {
        return Err(AgentError::Identity(format!(
            "certificate is for {got}, agent.toml says {want}"
        )));
    }
    client_tls(record, id).map(|_| ())
}

fn client_tls(record: &AgentRecord, id: &Identity) -> Result<rustls::ClientConfig, AgentError> {
    // The hub verifies our chain up to its CA: send leaf then CA.
    let chain = format!("{}\n{}", id.cert_pem.trim_end(), id.ca_pem);
    switchyard_pki::client_config(
        Some((&chain, &id.key_pem)),
        &id.ca_pem,
        ExpectedPeer::AnyHub {
            domain: record.domain.clone(),
        },
        vec![wire::ALPN.to_vec()],
    )
    .map_err(|e| AgentError::Identity(e.to_string()))
}

/// Combines the services and their readiness into the export set. The
/// first set is published once every endpoint has a probe result or
/// `grace` has passed; after that, on every change.
fn follow_exports(
    mut services: watch::Receiver<crate::source::LocalServices>,
    mut readiness: watch::Receiver<probe::Readiness>,
    grace: Duration,
) -> (
    watch::Receiver<Option<Vec<pb::ServiceExport>>>,
    JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let deadline = Instant::now() + grace;
        let mut published = false;
        loop {
            {
                let s = services.borrow_and_update().clone();
                let r = readiness.borrow_and_update().clone();
                if published || all_probed(&s, &r) || Instant::now() >= deadline {
                    published = true;
                    let set = Some(to_exports(&s, &r));
                    tx.send_if_modified(|cur| {
                        if *cur == set {
                            false
                        } else {
                            *cur = set;
                            true
                        }
                    });
                }
            }
            tokio::select! {
                r = services.changed() => if r.is_err() { break },
                r = readiness.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline), if !published => {}
            }
        }
    });
    (rx, task)
}

/// The uplink shell's fixed context.
struct Shell {
    cfg: AgentConfig,
    data: DataDir,
    lkg: Lkg,
    record: AgentRecord,
    /// The identity used for the next connection (renewal replaces it).
    identity: Arc<Mutex<Identity>>,
    status: Arc<Status>,
    exports: watch::Receiver<Option<Vec<pb::ServiceExport>>>,
    shutdown: watch::Receiver<bool>,
    /// Requests from the POP's gateways; taken by the session being driven.
    link: Option<GatewayLink>,
}

/// How one connection ended.
enum Ended {
    /// Reconnect after the usual backoff.
    Retry { established: bool },
    /// The hub revoked this POP or refused it: wait the longest backoff.
    Refused,
    /// The agent is stopping.
    Shutdown,
}

/// Largest chunk read from the control stream at once (bytes).
const MAX_READ_CHUNK: usize = 64 * 1024;

impl Shell {
    fn identity(&self) -> Identity {
        self.identity
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    async fn run(mut self, mut resume: AgentResume) {
        let addrs = self.record.hub_quic.clone();
        if addrs.is_empty() {
            tracing::error!("no QUIC uplink address known: pass --uplink-addr; serving the last-known-good view only");
            let _ = self.shutdown.wait_for(|s| *s).await;
            return;
        }
        // Start at a random node so a fleet restarting at once spreads out.
        let mut next = rand::rng().random_range(0..addrs.len());
        let mut failures: u32 = 0;
        let mut first = true;
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            if !first {
                self.status
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let addr = addrs[next % addrs.len()].clone();
            next = next.wrapping_add(1);
            let (ended, r) = match self.connect(&addr).await {
                Ok((endpoint, conn)) => {
                    let (ended, r) = self.drive(&addr, &conn, resume).await;
                    // Let the close reach the hub (draining takes a few
                    // round trips): before exiting when stopping, else in
                    // the background so the next attempt is not delayed.
                    let drain = async move {
                        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
                            .await;
                    };
                    if matches!(ended, Ended::Shutdown) {
                        drain.await;
                    } else {
                        tokio::spawn(drain);
                    }
                    (ended, r)
                }
                Err(e) => {
                    tracing::warn!(hub = %addr, error = %e, "cannot connect to hub node");
                    (Ended::Retry { established: false }, resume)
                }
            };
            resume = r;
            self.status.set_connected(None);
            let wait = match ended {
                Ended::Shutdown => return,
                Ended::Refused => self.cfg.backoff_max,
                Ended::Retry { established: true } => {
                    failures = 0;
                    self.cfg.backoff_min
                }
                Ended::Retry { established: false } => {
                    failures = failures.saturating_add(1);
                    backoff(self.cfg.backoff_min, self.cfg.backoff_max, failures)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    async fn connect(&self, addr: &str) -> Result<(quinn::Endpoint, quinn::Connection), String> {
        let target = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to nothing"))?;
        let tls = client_tls(&self.record, &self.identity()).map_err(|e| e.to_string())?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(self.cfg.keep_alive));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.cfg.idle_timeout).map_err(|e| e.to_string())?,
        ));
        transport.datagram_receive_buffer_size(Some(64 * 1024));
        client.transport_config(Arc::new(transport));
        let bind: SocketAddr = if target.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(client);
        let connecting = endpoint
            .connect(target, switchyard_pki::SNI_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(self.cfg.connect_timeout, connecting)
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok((endpoint, conn))
    }

    /// Drives one session over `conn` until it ends; returns how, and what
    /// the next session resumes from.
    async fn drive(
        &mut self,
        addr: &str,
        conn: &quinn::Connection,
        resume: AgentResume,
    ) -> (Ended, AgentResume) {
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(hub = %addr, error = %e, "cannot open the control stream");
                return (Ended::Retry { established: false }, resume);
            }
        };
        let Some(mut link) = self.link.take() else {
            return (Ended::Shutdown, resume);
        };
        let mut session_cfg = self.cfg.session.clone();
        session_cfg.gateway_addr = link.addr.borrow_and_update().clone();
        let mut session = AgentSession::new(session_cfg, resume, std::time::Instant::now());
        // A gateway certificate being issued: its request id and requester.
        let mut pending_gw: Option<(u64, tokio::sync::oneshot::Sender<Result<String, String>>)> =
            None;
        // Receivers of our own: the select below borrows them mutably while
        // its branches use `self`.
        let mut exports = self.exports.clone();
        let mut shutdown = self.shutdown.clone();
        let mut exports_open = true;
        let initial = exports.borrow_and_update().clone();
        if let Some(set) = initial {
            self.give_exports(&mut session, set);
        }
        let mut seen = AgentSessionStats::default();
        let mut seen_udp = UdpSeen::default();
        let mut established = false;
        let mut renew_at = self.renewal_deadline();
        let mut pending_key: Option<(u64, String)> = None;
        let mut buf = BytesMut::new();
        let ended = 'session: loop {
            // Events first (persisting a view makes the session queue its
            // ack), then everything the session wants sent.
            while let Some(ev) = session.poll_event() {
                match ev {
                    AgentEvent::Connected {
                        hub_node,
                        session_id,
                        heartbeat_interval,
                    } => {
                        established = true;
                        tracing::info!(hub = %addr, hub_node, session_id, ?heartbeat_interval, "connected to hub");
                        self.status.set_connected(Some(&hub_node));
                        self.status
                            .counters
                            .sessions_established
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    AgentEvent::ApplyView(view) => self.apply_view(&mut session, view).await,
                    AgentEvent::ViewRefused {
                        epoch,
                        applied_epoch,
                        reason,
                    } => {
                        tracing::warn!(epoch, applied_epoch, ?reason, "view from hub refused");
                    }
                    AgentEvent::ExportsAcked { seq } => self.exports_acked(seq).await,
                    AgentEvent::ExportRefused { reason } => {
                        self.status
                            .counters
                            .exports_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            reason,
                            "hub refused this POP's export set; fix the services file"
                        );
                    }
                    AgentEvent::CertificateIssued {
                        request_id,
                        cert_pem,
                    } if pending_gw.as_ref().is_some_and(|(id, _)| *id == request_id) => {
                        if let Some((_, reply)) = pending_gw.take() {
                            let _ = reply.send(Ok(cert_pem));
                        }
                    }
                    AgentEvent::CertificateRefused { request_id, reason }
                        if pending_gw.as_ref().is_some_and(|(id, _)| *id == request_id) =>
                    {
                        tracing::warn!(reason, "gateway certificate refused by the hub");
                        if let Some((_, reply)) = pending_gw.take() {
                            let _ = reply.send(Err(format!("refused by the hub: {reason}")));
                        }
                    }
                    AgentEvent::CertificateIssued {
                        request_id,
                        cert_pem,
                    } => match pending_key.take() {
                        Some((id, key_pem)) if id == request_id => {
                            renew_at = self.install_certificate(cert_pem, key_pem).await;
                        }
                        other => pending_key = other,
                    },
                    AgentEvent::CertificateRefused { request_id, reason } => {
                        if pending_key
                            .as_ref()
                            .is_some_and(|(id, _)| *id == request_id)
                        {
                            pending_key = None;
                            self.status
                                .counters
                                .cert_renewals_refused
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(reason, "certificate renewal refused; retrying later");
                            renew_at = Some(Instant::now() + self.cfg.renewal_retry);
                        }
                    }
                    AgentEvent::Closed(reason) => {
                        let (code, ended) = match &reason {
                            AgentCloseReason::Protocol(e) => {
                                tracing::warn!(hub = %addr, error = %e, "hub broke the uplink protocol");
                                (e.code() as u32, Ended::Retry { established })
                            }
                            AgentCloseReason::Hub { code, message } => {
                                let refused = matches!(
                                    code,
                                    pb::UplinkErrorCode::Revoked
                                        | pb::UplinkErrorCode::Forbidden
                                        | pb::UplinkErrorCode::UnsupportedVersion
                                );
                                if refused {
                                    tracing::error!(hub = %addr, ?code, message, "hub refused this POP");
                                } else {
                                    tracing::warn!(hub = %addr, ?code, message, "hub closed the session");
                                }
                                (
                                    0,
                                    if refused {
                                        Ended::Refused
                                    } else {
                                        Ended::Retry { established }
                                    },
                                )
                            }
                            AgentCloseReason::WelcomeTimeout => {
                                tracing::warn!(hub = %addr, "no Welcome from hub in time");
                                (0, Ended::Retry { established })
                            }
                            AgentCloseReason::ConnectionLost => {
                                tracing::warn!(hub = %addr, "connection to hub lost");
                                (0, Ended::Retry { established })
                            }
                        };
                        // Queued frames first, then close.
                        self.flush(&mut session, &mut send, conn, &mut buf).await;
                        let _ = send.finish();
                        conn.close(quinn::VarInt::from_u32(code), b"agent closing");
                        break 'session ended;
                    }
                }
            }
            if !self.flush(&mut session, &mut send, conn, &mut buf).await {
                session.connection_lost(std::time::Instant::now());
                continue;
            }
            self.sync_stats(&mut seen, session.stats());
            self.sync_udp(&mut seen_udp, conn);
            let timer = session.poll_timeout().map(Instant::from_std);
            let csr_free =
                pending_key.is_none() && pending_gw.is_none() && session.is_established();
            let renew = if csr_free { renew_at } else { None };
            tokio::select! {
                chunk = recv.read_chunk(MAX_READ_CHUNK, true) => {
                    let now = std::time::Instant::now();
                    match chunk {
                        Ok(Some(c)) => session.handle_stream_data(now, &c.bytes),
                        Ok(None) | Err(_) => session.connection_lost(now),
                    }
                }
                d = conn.read_datagram() => {
                    let now = std::time::Instant::now();
                    match d {
                        Ok(d) => session.handle_datagram(now, &d),
                        Err(_) => session.connection_lost(now),
                    }
                }
                _ = sleep_until_opt(timer) => {
                    session.handle_timeout(std::time::Instant::now());
                }
                r = exports.changed(), if exports_open => {
                    match r {
                        Ok(()) => {
                            let set = exports.borrow_and_update().clone();
                            if let Some(set) = set {
                                self.give_exports(&mut session, set);
                            }
                        }
                        // The source is gone (shutting down): stop watching.
                        Err(_) => exports_open = false,
                    }
                }
                Some(job) = link.csrs.recv(), if csr_free => {
                    if job.reply.is_closed() {
                        // The requester gave up (timed out while the uplink
                        // was down): nobody would receive the certificate.
                        continue;
                    }
                    match session.request_gateway_certificate(&job.instance, job.csr_pem) {
                        Ok(id) => {
                            tracing::info!(request_id = id, instance = job.instance, "requesting a gateway certificate");
                            pending_gw = Some((id, job.reply));
                        }
                        Err(e) => {
                            let _ = job.reply.send(Err(e.to_string()));
                        }
                    }
                }
                Some(samples) = link.rtts.recv() => session.report_rtt(samples),
                Ok(()) = link.addr.changed() => {
                    let addr = link.addr.borrow_and_update().clone();
                    if session.set_gateway_addr(addr.clone()) {
                        tracing::info!(gateway_addr = addr, "gateway address announced to the hub");
                    }
                }
                _ = sleep_until_opt(renew) => {
                    pending_key = self.request_renewal(&mut session);
                    if pending_key.is_none() {
                        renew_at = Some(Instant::now() + self.cfg.renewal_retry);
                    }
                }
                _ = shutdown.wait_for(|s| *s) => {
                    let _ = send.finish();
                    conn.close(quinn::VarInt::from_u32(0), b"agent stopping");
                    break 'session Ended::Shutdown;
                }
            }
        };
        self.sync_stats(&mut seen, session.stats());
        self.sync_udp(&mut seen_udp, conn);
        self.exports = exports;
        self.link = Some(link);
        (ended, session.into_resume())
    }

    /// Writes every queued frame and sends every queued datagram; false if
    /// the stream is gone.
    async fn flush(
        &self,
        session: &mut AgentSession,
        send: &mut quinn::SendStream,
        conn: &quinn::Connection,
        buf: &mut BytesMut,
    ) -> bool {
        while let Some(d) = session.poll_datagram() {
            // Best effort, like the protocol says: a datagram that cannot
            // go now (congestion, closed) is simply lost.
            if let Err(e) = conn.send_datagram(d) {
                tracing::debug!(error = %e, "datagram not sent");
            }
        }
        buf.clear();
        while let Some(frame) = session.poll_transmit() {
            if let Err(e) = wire::encode_frame(&frame, buf) {
                // The session checks sizes before queuing; this would be a bug.
                tracing::error!(error = %e, "cannot encode an uplink frame; dropped");
            }
        }
        if buf.is_empty() {
            return true;
        }
        match send.write_all(buf).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "control stream write failed");
                false
            }
        }
    }

    fn give_exports(&self, session: &mut AgentSession, set: Vec<pb::ServiceExport>) {
        if let Err(e) = session.export_changed(set) {
            tracing::error!(error = %e, "export set not sent");
        }
    }

    async fn apply_view(&self, session: &mut AgentSession, view: Arc<pb::PopView>) {
        let epoch = view.epoch;
        match self.lkg.store_async(view.clone()).await {
            Ok(()) => session.view_persisted(epoch),
            Err(e) => {
                // Still served (it is newer and the session accepted it),
                // but not acked: the hub then knows the POP's disk lags.
                self.status
                    .counters
                    .lkg_write_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(epoch, error = %e, "cannot persist view as last-known-good");
            }
        }
        tracing::debug!(epoch, services = view.services.len(), "view applied");
        // The session keeps its own reference (the base of the next
        // delta), so this is the one copy the runtime makes.
        self.status
            .publish(pb::PopView::clone(&view), ViewSource::Hub);
    }

    async fn exports_acked(&self, seq: u64) {
        self.status
            .counters
            .exports_acked_seq
            .fetch_max(seq, Ordering::Relaxed);
        let data = self.data.clone();
        let r = tokio::task::spawn_blocking(move || data.store_export_seq(seq)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(seq, error = %e, "cannot persist the export seq"),
            Err(e) => tracing::warn!(seq, error = %e, "cannot persist the export seq"),
        }
    }

    /// When to renew the certificate in use (half its life), if known.
    fn renewal_deadline(&self) -> Option<Instant> {
        let validity = enrol::cert_validity(&self.identity().cert_pem)?;
        let at = enrol::renewal_time(validity);
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        Some(Instant::now() + wait)
    }

    fn request_renewal(&self, session: &mut AgentSession) -> Option<(u64, String)> {
        let id = match SpiffeId::pop(&self.record.domain, &self.record.pop) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "cannot build this POP's identity");
                return None;
            }
        };
        let (csr, key) = match switchyard_pki::generate_csr(&id) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "cannot generate a renewal CSR");
                return None;
            }
        };
        match session.request_certificate(csr) {
            Ok(request_id) => {
                tracing::info!(request_id, "renewing the POP certificate");
                Some((request_id, key))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot request a certificate now");
                None
            }
        }
    }

    /// Checks and stores a renewed certificate; returns the next renewal.
    async fn install_certificate(&self, cert_pem: String, key_pem: String) -> Option<Instant> {
        let mut new = self.identity();
        new.cert_pem = cert_pem;
        new.key_pem = key_pem;
        if let Err(e) = check_identity(&self.record, &new) {
            tracing::error!(error = %e, "renewed certificate unusable; keeping the current one");
            self.status
                .counters
                .cert_renewals_refused
                .fetch_add(1, Ordering::Relaxed);
            return Some(Instant::now() + self.cfg.renewal_retry);
        }
        let data = self.data.clone();
        let stored = new.clone();
        match tokio::task::spawn_blocking(move || data.store_identity(&stored)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot store the renewed certificate; keeping the current one");
                return Some(Instant::now() + self.cfg.renewal_retry);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store the renewed certificate");
                return Some(Instant::now() + self.cfg.renewal_retry);
            }
        }
        let not_after = enrol::cert_validity(&new.cert_pem).map(|(_, t)| t);
        if let Ok(mut cur) = self.identity.lock() {
            *cur = new;
        }
        self.status
            .counters
            .cert_renewals
            .fetch_add(1, Ordering::Relaxed);
        if let Some(t) = not_after {
            self.status
                .counters
                .cert_not_after_s
                .store(unix_s(t), Ordering::Relaxed);
        }
        tracing::info!(not_after = ?not_after, "POP certificate renewed; used from the next connection");
        self.renewal_deadline()
    }

    fn sync_stats(&self, seen: &mut AgentSessionStats, now: &AgentSessionStats) {
        let c = &self.status.counters;
        let add = |a: &std::sync::atomic::AtomicU64, new: u64, old: u64| {
            a.fetch_add(new.saturating_sub(old), Ordering::Relaxed);
        };
        add(
            &c.heartbeats_sent,
            now.heartbeats_sent,
            seen.heartbeats_sent,
        );
        add(&c.views_applied, now.views_applied, seen.views_applied);
        add(&c.views_refused, now.views_refused, seen.views_refused);
        add(
            &c.export_deltas_sent,
            now.export_deltas_sent,
            seen.export_deltas_sent,
        );
        *seen = now.clone();
    }

    /// Adds what `conn` sent and received since the last call to the
    /// process-wide uplink byte counters.
    fn sync_udp(&self, seen: &mut UdpSeen, conn: &quinn::Connection) {
        let c = &self.status.counters;
        let s = conn.stats();
        c.uplink_udp_tx_bytes
            .fetch_add(s.udp_tx.bytes.saturating_sub(seen.tx), Ordering::Relaxed);
        c.uplink_udp_rx_bytes
            .fetch_add(s.udp_rx.bytes.saturating_sub(seen.rx), Ordering::Relaxed);
        *seen = UdpSeen {
            tx: s.udp_tx.bytes,
            rx: s.udp_rx.bytes,
        };
    }
}

/// UDP byte counts of one connection already added to the counters.
#[derive(Debug, Default)]
struct UdpSeen {
    tx: u64,
    rx: u64,
}

/// Sleeps until `t`, or forever when `None`.
async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff from `min`, doubling per failure up to `max`, with
/// jitter (50 % to 100 % of the value) so a fleet that lost its hub does not
/// reconnect in lockstep.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.min(16));
    let capped = exp.min(max);
    let jitter: f64 = rand::rng().random_range(0.5..=1.0);
    capped.mul_f64(jitter)
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let min = Duration::from_millis(200);
        let max = Duration::from_secs(5);
        for f in 0..40 {
            let b = backoff(min, max, f);
            let full = min.saturating_mul(1u32 << f.min(16)).min(max);
            assert!(b >= full / 2 && b <= full, "{f}: {b:?} vs {full:?}");
        }
    }
}

//! QUIC tunnels between POP gateways: dialling and probing peers, opening
//! a stream per proxied connection, and serving streams from peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::VarInt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::copy::{Copy, End};
use crate::gateway::Shared;
use crate::header::{Status, StreamHeader};
use crate::health::{self, ProbeParams, ProbeState};
use crate::tls::StreamCredit;
use crate::ServiceKey;

/// How long a peer has to send its stream header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between reconnection attempts to a peer.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Handshake timeout when dialling a peer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// A peer down this long gets a fresh connection (the old one may be to a
/// process that restarted).
const REDIAL_AFTER_DOWN: Duration = Duration::from_millis(1000);
/// QUIC close code: the peer's certificate is not a gateway's.
const CLOSE_NOT_GATEWAY: u32 = 1;
/// QUIC close code: shutdown or peer removed from the view.
const CLOSE_BYE: u32 = 0;

/// One peer POP gateway as seen from here.
pub struct Peer {
    /// Peer POP.
    pub pop: String,
    /// `host:port` dialled.
    pub addr: String,
    conn: Mutex<Option<quinn::Connection>>,
    health: Mutex<ProbeState>,
    up: watch::Sender<bool>,
}

impl Peer {
    /// A peer not connected yet.
    pub fn new(pop: String, addr: String, params: ProbeParams) -> Self {
        Self {
            pop,
            addr,
            conn: Mutex::new(None),
            health: Mutex::new(ProbeState::new(params)),
            up: watch::channel(false).0,
        }
    }

    /// Whether new connections may use the peer.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Whether a tunnel connection exists now (up or not).
    pub fn is_connected(&self) -> bool {
        lock(&self.conn).is_some()
    }

    /// `(srtt, loss per mille)` now.
    pub fn rtt(&self) -> (Option<Duration>, u32) {
        let h = lock(&self.health);
        (h.srtt(), h.loss_permille())
    }

    fn with_health<T>(&self, f: impl FnOnce(&mut ProbeState) -> T) -> T {
        let mut h = lock(&self.health);
        let out = f(&mut h);
        let up = h.is_up();
        drop(h);
        self.up.send_if_modified(|u| {
            let changed = *u != up;
            *u = up;
            changed
        });
        out
    }

    /// A stream failed for a tunnel reason: down at once.
    pub fn mark_down(&self) {
        self.with_health(ProbeState::mark_down);
    }

    /// Closes the current connection (peer removed from the view).
    pub fn close(&self) {
        if let Some(c) = lock(&self.conn).take() {
            c.close(VarInt::from_u32(CLOSE_BYE), b"bye");
        }
        self.mark_down();
    }

    /// Opens a stream for `service:port`, waits for the peer's answer.
    pub async fn open(
        &self,
        service: &ServiceKey,
        port: u16,
        timeout: Duration,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
        let header = StreamHeader {
            service: service.clone(),
            port,
        }
        .encode()
        .map_err(|_| OpenError::Refused(Status::BadHeader))?;
        let conn = lock(&self.conn).clone().ok_or(OpenError::NoTunnel)?;
        let mut up = self.up.subscribe();
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|_| OpenError::Tunnel)?;
            send.write_all(&header)
                .await
                .map_err(|_| OpenError::Tunnel)?;
            let mut b = [0u8; 1];
            recv.read_exact(&mut b)
                .await
                .map_err(|_| OpenError::Tunnel)?;
            match Status::from_byte(b[0]) {
                Some(Status::Ok) => Ok((send, recv)),
                Some(s) => Err(OpenError::Refused(s)),
                None => Err(OpenError::Tunnel),
            }
        };
        // A peer going down while we wait ends the wait; a peer already
        // down (tried as a last resort) only has the timeout.
        let was_up = *up.borrow_and_update();
        let went_down = async {
            if was_up {
                let _ = up.wait_for(|u| !*u).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let res = tokio::select! {
            r = tokio::time::timeout(timeout, attempt) => r.unwrap_or(Err(OpenError::Tunnel)),
            _ = went_down => Err(OpenError::PeerDown),
        };
        if matches!(res, Err(OpenError::Tunnel)) {
            self.mark_down();
        }
        res
    }
}

/// Why a tunnel stream could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// No connection to the peer now.
    NoTunnel,
    /// The stream or connection failed, or the answer timed out.
    Tunnel,
    /// The prober marked the peer down while waiting.
    PeerDown,
    /// The peer answered with a refusal.
    Refused(Status),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind, still
    // consistent: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Dials `peer` and probes it until aborted, reconnecting as needed.
pub async fn run_peer(shared: Arc<Shared>, peer: Arc<Peer>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match dial(&shared, &peer).await {
            Ok(conn) => {
                *lock(&peer.conn) = Some(conn.clone());
                peer.with_health(ProbeState::on_connected);
                tracing::info!(peer = %peer.pop, addr = %peer.addr, "tunnel connected");
                let was_up = probe(&peer, &conn).await;
                lock(&peer.conn).take();
                peer.mark_down();
                conn.close(VarInt::from_u32(CLOSE_BYE), b"redial");
                tracing::info!(peer = %peer.pop, "tunnel down");
                if was_up {
                    backoff = Duration::from_millis(50);
                } else {
                    // Connected but never answered (e.g. it refused our
                    // certificate): back off like a failed dial.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            Err(e) => {
                peer.mark_down();
                tracing::debug!(peer = %peer.pop, addr = %peer.addr, error = %e, "dial failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn dial(shared: &Shared, peer: &Peer) -> Result<quinn::Connection, String> {
    // An address literal needs no resolver (which would start a blocking
    // thread).
    let target: SocketAddr = match peer.addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(&peer.addr)
            .await
            .map_err(|e| format!("resolve {}: {e}", peer.addr))?
            .next()
            .ok_or_else(|| format!("{} resolves to nothing", peer.addr))?,
    };
    let cfg = shared.client_config(&peer.pop).map_err(|e| e.to_string())?;
    let connecting = shared
        .endpoint
        .connect_with(cfg, target, switchyard_pki::SNI_NAME)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    // The verifier accepted any identity of that POP; a tunnel needs its
    // gateway, not its agent.
    if crate::tls::gateway_pop(&conn, shared.domain()).as_deref() != Some(peer.pop.as_str()) {
        conn.close(VarInt::from_u32(CLOSE_NOT_GATEWAY), b"not a gateway");
        return Err("peer certificate is not a gateway of that POP".into());
    }
    Ok(conn)
}

/// Probes over `conn` until it dies or the peer stays down too long;
/// returns whether the peer was ever up on it.
async fn probe(peer: &Peer, conn: &quinn::Connection) -> bool {
    let mut next_probe = Instant::now();
    let mut down_since: Option<Instant> = None;
    let mut was_up = false;
    loop {
        let deadline = peer.with_health(|h| h.next_deadline());
        let wake = deadline.map_or(next_probe, |d| d.min(next_probe));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let went_down = peer.with_health(|h| h.expire(now));
                if went_down {
                    tracing::warn!(peer = %peer.pop, "peer missed probes: down");
                }
                if now >= next_probe {
                    let (seq, interval) = peer.with_health(|h| (h.send_probe(now), h.interval()));
                    // A full send buffer is like a lost probe.
                    let _ = conn.send_datagram(health::encode(health::PING, seq).to_vec().into());
                    next_probe = now + interval;
                }
            }
            d = conn.read_datagram() => match d {
                Ok(b) => match health::decode(&b) {
                    Some((health::PONG, seq)) => {
                        let now = Instant::now();
                        peer.with_health(|h| h.on_pong(seq, now));
                        if let (Some(s), _) = peer.rtt() {
                            metrics::gauge!(crate::stats::TUNNEL_RTT, "peer" => peer.pop.clone())
                                .set(s.as_secs_f64());
                        }
                    }
                    Some((health::PING, seq)) => {
                        let _ = conn.send_datagram(health::encode(health::PONG, seq).to_vec().into());
                    }
                    _ => {}
                },
                Err(_) => return was_up,
            },
        }
        if peer.is_up() {
            was_up = true;
            down_since = None;
        } else {
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= REDIAL_AFTER_DOWN {
                return was_up;
            }
        }
    }
}

/// Accepts tunnel connections until the endpoint closes.
pub async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "tunnel handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let Some(caller) = crate::tls::gateway_pop(&conn, shared.domain()) else {
                tracing::warn!(%remote, "tunnel from a non-gateway certificate refused");
                conn.close(VarInt::from_u32(CLOSE_NOT_GATEWAY), b"not a gateway");
                return;
            };
            serve_conn(shared, conn, caller).await;
        });
    }
}

/// Counts a stream as open while alive.
struct OpenStream(Arc<AtomicU64>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn serve_conn(shared: Arc<Shared>, conn: quinn::Connection, caller: String) {
    let mut credit = StreamCredit::new(shared.cfg.limits.max_tunnel_streams);
    let open = Arc::new(AtomicU64::new(0));
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let guard = OpenStream(open.clone());
                    let now = open.fetch_add(1, Relaxed) + 1;
                    if let Some(limit) = credit.on_open(now) {
                        conn.set_max_concurrent_bi_streams(
                            VarInt::from_u64(limit).unwrap_or(VarInt::MAX),
                        );
                    }
                    let shared = shared.clone();
                    let caller = caller.clone();
                    tokio::spawn(async move {
                        serve_stream(shared, send, recv, caller).await;
                        drop(guard);
                    });
                }
                Err(_) => return,
            },
            d = conn.read_datagram() => match d {
                Ok(b) => {
                    if let Some((health::PING, seq)) = health::decode(&b) {
                        let _ = conn.send_datagram(health::encode(health::PONG, seq).to_vec().into());
                    }
                }
                Err(_) => return,
            },
        }
    }
}

async fn refuse(shared: &Shared, mut send: quinn::SendStream, status: Status, why: &'static str) {
    shared.counters.tunnel_stream(why);
    let _ = send.write_all(&[status as u8]).await;
    let _ = send.finish();
    // Let the answer reach the caller before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
}

async fn serve_stream(
    shared: Arc<Shared>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    caller: String,
) {
    let Ok(_permit) = shared.stream_limit.clone().try_acquire_owned() else {
        refuse(&shared, send, Status::Busy, "busy").await;
        return;
    };
    let header = tokio::time::timeout(HEADER_TIMEOUT, async {
        let mut len = [0u8; 2];
        recv.read_exact(&mut len).await.ok()?;
        let len = StreamHeader::check_len(u16::from_be_bytes(len)).ok()?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.ok()?;
        StreamHeader::decode(&body).ok()
    })
    .await
    .ok()
    .flatten();
    let Some(header) = header else {
        refuse(&shared, send, Status::BadHeader, "bad_header").await;
        return;
    };
    let table = shared.table();
    let Some(route) = table
        .services
        .get(&header.service)
        .filter(|r| r.ports.contains(&header.port))
    else {
        tracing::debug!(%caller, service = %header.service, "tunnel stream for unknown service");
        refuse(&shared, send, Status::UnknownService, "unknown_service").await;
        return;
    };
    if !route.serves(&caller) {
        tracing::info!(%caller, service = %header.service, "tunnel stream for a service this POP does not export to the caller: refused");
        refuse(&shared, send, Status::NotExported, "not_exported").await;
        return;
    }
    let limits = &shared.cfg.limits;
    let seed = shared.next_seed();
    let mut upstream = None;
    for addr in route
        .local_addrs(header.port, seed)
        .into_iter()
        .take(limits.max_attempts.max(1))
    {
        if let Ok(Ok(s)) =
            tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await
        {
            upstream = Some(s);
            break;
        }
    }
    let Some(upstream) = upstream else {
        refuse(&shared, send, Status::ConnectFailed, "connect_failed").await;
        return;
    };
    let _ = upstream.set_nodelay(true);
    let mut send = send;
    if send.write_all(&[Status::Ok as u8]).await.is_err() {
        return;
    }
    shared.counters.tunnel_stream("served");
    let copy = Copy {
        buffer: limits.buffer_size,
        idle: limits.idle_timeout,
        cut: shared.shutdown_rx(),
        // Here the TCP side is the service: its bytes go down to the
        // caller.
        up: &shared.counters.bytes.down,
        down: &shared.counters.bytes.up,
    };
    let (end, _, _) = copy.tcp_quic(upstream, send, recv).await;
    if let End::Io(e) = end {
        tracing::debug!(%caller, error = %e, "tunnel stream ended with an error");
    }
}

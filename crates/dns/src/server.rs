//! The DNS shell: UDP and TCP on one port, answering from the current
//! [`AnswerTable`]. Only bytes move here; every decision is
//! [`crate::answers::respond`].
//!
//! UDP: one socket per worker, all bound to the same address with
//! SO_REUSEPORT (the kernel spreads clients over them), each served by its
//! own thread with blocking receive and send: a query costs two system
//! calls and no wakeup of an async runtime. Workers pick up a new table
//! when the watch's version moves (one atomic load per query).
//!
//! TCP: tokio, 2-byte length framing, several queries per connection, a
//! bounded number of connections and an idle timeout.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::answers::{respond, AnswerTable, Outcome, Transport};
use crate::limits::{RateLimitConfig, RateLimiter};
use crate::query::MAX_QUERY_LEN;

/// Settings of a DNS listener.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP listen address; port 0 picks a free port (the same for
    /// both).
    pub listen: SocketAddr,
    /// UDP sockets (one thread each); 0: one per available core.
    pub udp_workers: usize,
    /// Per-source rate limit on UDP answers; `None`: unlimited.
    pub rate_limit: Option<RateLimitConfig>,
    /// Most TCP connections open at once; more are closed on accept.
    pub max_tcp_connections: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5353)),
            udp_workers: 0,
            rate_limit: None,
            max_tcp_connections: 256,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// How long a blocked UDP receive waits before checking for shutdown.
const UDP_POLL: Duration = Duration::from_millis(200);
/// Outcome counters are flushed to `metrics` at most this often (per
/// worker), so the per-query path touches only local memory.
const FLUSH_EVERY: u64 = 1024;

/// Queries answered by a server, by outcome, for embedders that render
/// their own metrics (the agent). Updated in batches (every
/// [`FLUSH_EVERY`] queries of a worker, and when it is idle).
#[derive(Debug, Default)]
pub struct DnsStats {
    by_outcome: [AtomicU64; 9],
    rate_limited: AtomicU64,
}

impl DnsStats {
    /// (outcome label, queries) for every outcome.
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        OUTCOMES
            .iter()
            .zip(self.by_outcome.iter())
            .map(|(o, n)| (o.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// UDP queries dropped by the rate limit.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }
}

/// A running DNS listener. Dropping it stops it (UDP workers exit within
/// [`UDP_POLL`]).
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<DnsStats>,
    udp: Vec<JoinHandle<()>>,
    tcp: tokio::task::JoinHandle<()>,
}

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(UDP_POLL))?;
    Ok(s)
}

fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Binds the first UDP socket and a TCP listener on the same port (with
/// port 0, retries until a port is free for both).
fn bind_pair(addr: SocketAddr) -> io::Result<(Socket, std::net::TcpListener, SocketAddr)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = udp_socket(addr)?;
        let bound = udp
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("UDP socket has no IP address"))?;
        match tcp_listener(bound) {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port for UDP and TCP")))
}

impl DnsServer {
    /// Starts serving `tables` (the newest table is always used) on
    /// `cfg.listen`, UDP and TCP. Must be called inside a tokio runtime.
    pub async fn bind(
        cfg: DnsConfig,
        tables: watch::Receiver<Arc<AnswerTable>>,
    ) -> io::Result<DnsServer> {
        let (first, tcp, addr) = bind_pair(cfg.listen)?;
        let workers = if cfg.udp_workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.udp_workers
        };
        let mut sockets = vec![first];
        for _ in 1..workers {
            sockets.push(udp_socket(addr)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(DnsStats::default());
        let mut udp = Vec::new();
        for (i, s) in sockets.into_iter().enumerate() {
            let socket: UdpSocket = s.into();
            let stop = stop.clone();
            let tables = tables.clone();
            let limit = cfg.rate_limit;
            let stats = stats.clone();
            udp.push(
                std::thread::Builder::new()
                    .name(format!("dns-udp-{i}"))
                    .spawn(move || udp_worker(socket, tables, limit, stop, stats))?,
            );
        }
        let tcp = TcpListener::from_std(tcp)?;
        let tcp = tokio::spawn(tcp_accept(tcp, tables, cfg, stats.clone()));
        tracing::info!(%addr, udp_workers = workers, "DNS listening (UDP and TCP)");
        Ok(DnsServer {
            addr,
            stop,
            stats,
            udp,
            tcp,
        })
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries answered so far, by outcome.
    pub fn stats(&self) -> Arc<DnsStats> {
        self.stats.clone()
    }

    /// Stops serving and waits for the UDP workers.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tcp.abort();
        for t in self.udp.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tcp.abort();
    }
}

/// Per-worker outcome counts, flushed to `metrics` and [`DnsStats`] in
/// batches.
struct Counts {
    by_outcome: [u64; 9],
    rate_limited: u64,
    total: u64,
    stats: Arc<DnsStats>,
}

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Dropped => 0,
        Outcome::Answer => 1,
        Outcome::NoData => 2,
        Outcome::NxDomain => 3,
        Outcome::Refused => 4,
        Outcome::FormErr => 5,
        Outcome::NotImp => 6,
        Outcome::BadVers => 7,
        Outcome::Truncated => 8,
    }
}

const OUTCOMES: [Outcome; 9] = [
    Outcome::Dropped,
    Outcome::Answer,
    Outcome::NoData,
    Outcome::NxDomain,
    Outcome::Refused,
    Outcome::FormErr,
    Outcome::NotImp,
    Outcome::BadVers,
    Outcome::Truncated,
];

impl Counts {
    fn new(stats: Arc<DnsStats>) -> Self {
        Self {
            by_outcome: [0; 9],
            rate_limited: 0,
            total: 0,
            stats,
        }
    }

    fn add(&mut self, o: Outcome, transport: &'static str) {
        self.by_outcome[outcome_index(o)] += 1;
        self.total += 1;
        if self.total.is_multiple_of(FLUSH_EVERY) {
            self.flush(transport);
        }
    }

    fn flush(&mut self, transport: &'static str) {
        for ((o, n), shared) in OUTCOMES
            .iter()
            .zip(self.by_outcome.iter_mut())
            .zip(self.stats.by_outcome.iter())
        {
            if *n > 0 {
                shared.fetch_add(*n, Ordering::Relaxed);
                metrics::counter!("switchyard_dns_queries_total", "outcome" => o.as_str(), "transport" => transport)
                    .increment(*n);
                *n = 0;
            }
        }
        if self.rate_limited > 0 {
            self.stats
                .rate_limited
                .fetch_add(self.rate_limited, Ordering::Relaxed);
            metrics::counter!("switchyard_dns_rate_limited_total").increment(self.rate_limited);
            self.rate_limited = 0;
        }
    }
}

fn udp_worker(
    socket: UdpSocket,
    mut tables: watch::Receiver<Arc<AnswerTable>>,
    limit: Option<RateLimitConfig>,
    stop: Arc<AtomicBool>,
    stats: Arc<DnsStats>,
) {
    let mut limiter = limit.map(RateLimiter::new);
    let mut table = tables.borrow_and_update().clone();
    // One byte more than accepted, so an oversized datagram is seen as
    // such instead of silently cut.
    let mut buf = vec![0u8; MAX_QUERY_LEN + 1];
    let mut out = Vec::with_capacity(MAX_QUERY_LEN);
    let mut counts = Counts::new(stats);
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                counts.flush("udp");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "DNS UDP receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if n > MAX_QUERY_LEN {
            counts.add(Outcome::Dropped, "udp");
            continue;
        }
        if tables.has_changed().unwrap_or(false) {
            table = tables.borrow_and_update().clone();
        }
        if let Some(l) = limiter.as_mut() {
            if !l.allow(peer.ip(), tokio::time::Instant::now()) {
                counts.rate_limited += 1;
                continue;
            }
        }
        let outcome = respond(&table, &buf[..n], peer.ip(), Transport::Udp, &mut out);
        counts.add(outcome, "udp");
        if !out.is_empty() {
            if let Err(e) = socket.send_to(&out, peer) {
                tracing::debug!(error = %e, %peer, "DNS UDP send failed");
            }
        }
    }
    counts.flush("udp");
}

async fn tcp_accept(
    listener: TcpListener,
    tables: watch::Receiver<Arc<AnswerTable>>,
    cfg: DnsConfig,
    stats: Arc<DnsStats>,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_tcp_connections.max(1)));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: close at once rather than queue.
            drop(stream);
            continue;
        };
        let tables = tables.clone();
        let idle = cfg.tcp_idle;
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = tcp_conn(stream, peer.ip(), tables, idle, stats).await {
                tracing::debug!(error = %e, %peer, "DNS TCP connection closed");
            }
            drop(permit);
        });
    }
}

async fn tcp_conn(
    mut stream: TcpStream,
    peer: IpAddr,
    tables: watch::Receiver<Arc<AnswerTable>>,
    idle: Duration,
    stats: Arc<DnsStats>,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_QUERY_LEN];
    let mut out = Vec::new();
    let mut counts = Counts::new(stats);
    let result = loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Err(_) => break Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(_)) => {}
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n > MAX_QUERY_LEN {
            counts.add(Outcome::Dropped, "tcp");
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "query over the size limit",
            ));
        }
        match tokio::time::timeout(idle, stream.read_exact(&mut buf[..n])).await {
            Err(_) => break Ok(()),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(_)) => {}
        }
        let table = tables.borrow().clone();
        let outcome = respond(&table, &buf[..n], peer, Transport::Tcp, &mut out);
        counts.add(outcome, "tcp");
        if out.is_empty() {
            // Not answerable (a response, a runt): close this stream only.
            break Ok(());
        }
        let Ok(olen) = u16::try_from(out.len()) else {
            break Err(io::Error::other("answer over 65535 bytes"));
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&olen.to_be_bytes());
        framed.extend_from_slice(&out);
        // A client that does not read its answers holds a connection
        // slot: bounded like an idle one.
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Err(_) => break Ok(()),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(())) => {}
        }
    };
    counts.flush("tcp");
    result
}

/// Rebuilds a table whenever `source` changes, with `build`, and publishes
/// it; returns the table watch (starting with the first build) and the
/// task. `build` returning `None` keeps the current table (for example a
/// transient error, logged by the caller). The task ends when `source`'s
/// sender is gone.
pub fn follow<T, F>(
    mut source: watch::Receiver<T>,
    build: F,
) -> (
    watch::Receiver<Arc<AnswerTable>>,
    tokio::task::JoinHandle<()>,
)
where
    T: Clone + Send + Sync + 'static,
    F: Fn(&T) -> Option<AnswerTable> + Send + 'static,
{
    // Build from a copy: holding the watch's lock while building would
    // stall its sender.
    let current = source.borrow_and_update().clone();
    let first = build(&current).unwrap_or_default();
    let (tx, rx) = watch::channel(Arc::new(first));
    let task = tokio::spawn(async move {
        while source.changed().await.is_ok() {
            let started = tokio::time::Instant::now();
            let current = source.borrow_and_update().clone();
            let table = build(&current);
            if let Some(t) = table {
                metrics::gauge!("switchyard_dns_zone_names").set(t.names() as f64);
                metrics::histogram!("switchyard_dns_zone_build_seconds")
                    .record(started.elapsed().as_secs_f64());
                if tx.send(Arc::new(t)).is_err() {
                    return;
                }
            }
        }
    });
    (rx, task)
}

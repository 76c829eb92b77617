//! Moving bytes between a client and its upstream, both directions at
//! once, with half-close, an idle timeout and a cut signal (drain end,
//! shutdown).
//!
//! Buffers are taken only while a socket is readable (10k idle
//! connections hold no copy buffers); tunnel reads take quinn's own
//! chunks without copying.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a proxied connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions finished (EOF each way).
    Done,
    /// An I/O error in one direction (the other is dropped).
    Io(io::Error),
    /// No byte in either direction for the idle timeout.
    Idle,
    /// Cut by drain end or shutdown.
    Cut,
}

/// Last activity of one connection (ms since its start).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Per-connection settings.
pub struct Copy<'a> {
    /// Read size per direction (bytes).
    pub buffer: usize,
    /// Idle timeout.
    pub idle: Duration,
    /// Fires `true` to cut the connection.
    pub cut: watch::Receiver<bool>,
    /// Client-to-upstream byte counter.
    pub up: &'a AtomicU64,
    /// Upstream-to-client byte counter.
    pub down: &'a AtomicU64,
}

impl Copy<'_> {
    async fn run<U, D>(mut self, act: &Activity, up: U, down: D) -> (End, u64, u64)
    where
        U: std::future::Future<Output = io::Result<u64>>,
        D: std::future::Future<Output = io::Result<u64>>,
    {
        let both = async { tokio::try_join!(up, down) };
        let end = tokio::select! {
            r = both => match r {
                Ok(_) => End::Done,
                Err(e) => End::Io(e),
            },
            _ = act.idle(self.idle) => End::Idle,
            _ = self.cut.wait_for(|c| *c) => End::Cut,
        };
        (end, 0, 0)
    }

    /// Proxies between two TCP connections. Returns how it ended and the
    /// bytes moved up and down.
    pub async fn tcp_tcp(self, client: TcpStream, upstream: TcpStream) -> (End, u64, u64) {
        let act = Activity::new();
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let (up_n, down_n) = (AtomicU64::new(0), AtomicU64::new(0));
        let up = pump_tcp(cr, uw, self.buffer, &act, self.up, &up_n);
        let down = pump_tcp(ur, cw, self.buffer, &act, self.down, &down_n);
        let (end, _, _) = self.run(&act, up, down).await;
        (end, up_n.load(Relaxed), down_n.load(Relaxed))
    }

    /// Proxies between a TCP connection and a tunnel stream.
    pub async fn tcp_quic(
        self,
        tcp: TcpStream,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> (End, u64, u64) {
        let act = Activity::new();
        let (tr, tw) = tcp.into_split();
        let (up_n, down_n) = (AtomicU64::new(0), AtomicU64::new(0));
        let up = pump_tcp_to_quic(tr, send, self.buffer, &act, self.up, &up_n);
        let down = pump_quic_to_tcp(recv, tw, self.buffer, &act, self.down, &down_n);
        let (end, _, _) = self.run(&act, up, down).await;
        (end, up_n.load(Relaxed), down_n.load(Relaxed))
    }
}

fn count(act: &Activity, total: &AtomicU64, conn: &AtomicU64, n: usize) {
    act.touch();
    total.fetch_add(n as u64, Relaxed);
    conn.fetch_add(n as u64, Relaxed);
}

async fn pump_tcp(
    r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    size: usize,
    act: &Activity,
    total: &AtomicU64,
    conn: &AtomicU64,
) -> io::Result<u64> {
    loop {
        r.readable().await?;
        let mut buf = Vec::with_capacity(size);
        loop {
            match r.try_read_buf(&mut buf) {
                Ok(0) => {
                    // Half-close: pass the EOF on, keep the other way open.
                    w.shutdown().await?;
                    return Ok(conn.load(Relaxed));
                }
                Ok(n) => {
                    w.write_all(&buf).await?;
                    buf.clear();
                    count(act, total, conn, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

async fn pump_tcp_to_quic(
    r: OwnedReadHalf,
    mut send: quinn::SendStream,
    size: usize,
    act: &Activity,
    total: &AtomicU64,
    conn: &AtomicU64,
) -> io::Result<u64> {
    let res = async {
        loop {
            r.readable().await?;
            let mut buf = BytesMut::with_capacity(size);
            loop {
                match r.try_read_buf(&mut buf) {
                    Ok(0) => {
                        send.finish().map_err(io::Error::other)?;
                        return Ok(conn.load(Relaxed));
                    }
                    Ok(n) => {
                        send.write_chunk(buf.split().freeze())
                            .await
                            .map_err(io::Error::from)?;
                        count(act, total, conn, n);
                        if buf.capacity() < size / 4 {
                            buf = BytesMut::with_capacity(size);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    .await;
    if res.is_err() {
        // Dropping a send stream would finish it: the peer must see an
        // abort, not a clean end.
        let _ = send.reset(quinn::VarInt::from_u32(1));
    }
    res
}

async fn pump_quic_to_tcp(
    mut recv: quinn::RecvStream,
    mut w: OwnedWriteHalf,
    size: usize,
    act: &Activity,
    total: &AtomicU64,
    conn: &AtomicU64,
) -> io::Result<u64> {
    loop {
        match recv.read_chunk(size, true).await {
            Ok(Some(chunk)) => {
                w.write_all(&chunk.bytes).await?;
                count(act, total, conn, chunk.bytes.len());
            }
            Ok(None) => {
                w.shutdown().await?;
                return Ok(conn.load(Relaxed));
            }
            Err(e) => {
                let _ = recv.stop(quinn::VarInt::from_u32(1));
                return Err(io::Error::from(e));
            }
        }
    }
}

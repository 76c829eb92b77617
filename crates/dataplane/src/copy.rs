//! Moving bytes between a client and its upstream, both directions at
//! once, with half-close, an idle timeout and a cut signal (drain end,
//! shutdown).
//!
//! TCP-to-TCP pairs move on a relay thread ([`crate::relay`]); the task
//! here only watches the idle timeout and the cut signal. TCP-to-tunnel
//! pairs are copied by the task itself: buffers are taken only while the
//! socket is readable (10k idle connections hold no copy buffers), and
//! tunnel reads take quinn's own chunks without copying.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::relay::Relays;

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

/// Activity of one connection: the bytes moved each way (no clock read on
/// the data path).
pub struct Activity {
    /// Client to upstream (bytes).
    pub up: AtomicU64,
    /// Upstream to client (bytes).
    pub down: AtomicU64,
}

impl Activity {
    /// Nothing moved yet.
    pub fn new() -> Self {
        Self {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    fn moved(&self) -> u64 {
        self.up.load(Relaxed).wrapping_add(self.down.load(Relaxed))
    }
}

/// The idle rule, without I/O: checked every `idle / 4`, a connection is
/// idle once nothing moved for a whole `idle`, so a quiet connection ends
/// between `idle` and `1.25 x idle` after its last byte.
struct IdleCheck {
    idle: Duration,
    step: Duration,
    last: u64,
    quiet: Duration,
}

impl IdleCheck {
    /// `moved`: bytes moved so far.
    fn new(idle: Duration, moved: u64) -> Self {
        Self {
            idle,
            step: (idle / 4).max(Duration::from_millis(1)),
            last: moved,
            quiet: Duration::ZERO,
        }
    }

    /// Time between checks.
    fn step(&self) -> Duration {
        self.step
    }

    /// A check period ended with `moved` bytes moved so far: whether the
    /// connection is idle now.
    fn tick(&mut self, moved: u64) -> bool {
        if moved == self.last {
            self.quiet += self.step;
            self.quiet >= self.idle
        } else {
            self.last = moved;
            self.quiet = Duration::ZERO;
            false
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
    /// Client-to-upstream byte counter (of a tunnel copy; relay threads
    /// add to the gateway's totals themselves).
    pub up: &'a AtomicU64,
    /// Upstream-to-client byte counter (of a tunnel copy).
    pub down: &'a AtomicU64,
}

impl Copy<'_> {
    /// Waits for `both` (the two directions) while watching the idle
    /// timeout and the cut signal. `both` is pinned by the caller: moving
    /// it in would keep a second copy of it in this future (per idle
    /// connection: ~650 B more at 10k tunnel connections).
    async fn run<F>(self, act: &Activity, mut both: Pin<&mut F>) -> End
    where
        F: Future<Output = io::Result<()>> + ?Sized,
    {
        let mut check = IdleCheck::new(self.idle, act.moved());
        let timer = tokio::time::sleep(check.step());
        // A second receiver tells whether the cut signal changed without
        // touching the waiting future (which borrows the first).
        let mut cut_seen = self.cut.clone();
        let mut cut = self.cut;
        let cut_wait = cut.wait_for(|c| *c);
        tokio::pin!(timer, cut_wait);
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = both.as_mut().poll(cx) {
                return Poll::Ready(match r {
                    Ok(()) => End::Done,
                    Err(e) => End::Io(e),
                });
            }
            // The timer and the cut signal are polled only when they may
            // be ready or when the task's waker is new to them, not on
            // every wake-up of the data path: polling them each time cost
            // ~0.1 us per small request. Skipping a poll is safe because
            // each still holds the task's current waker and wakes it.
            let fresh = !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            if fresh {
                registered = Some(cx.waker().clone());
            }
            // is_elapsed is false only while the timer is in the wheel.
            if fresh || timer.is_elapsed() {
                while timer.as_mut().poll(cx).is_ready() {
                    if check.tick(act.moved()) {
                        return Poll::Ready(End::Idle);
                    }
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + check.step());
                }
            }
            // A closed channel (Err) ends the wait too: poll to see it.
            if fresh || !matches!(cut_seen.has_changed(), Ok(false)) {
                cut_seen.borrow_and_update();
                if cut_wait.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Cut);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Proxies between two TCP connections on a relay thread. Returns how
    /// it ended and the bytes moved up and down.
    pub async fn tcp_tcp(
        self,
        relays: &Relays,
        client: std::net::TcpStream,
        upstream: TcpStream,
    ) -> (End, u64, u64) {
        let act = Arc::new(Activity::new());
        let submitted = upstream
            .into_std()
            .and_then(|upstream| relays.submit(client, upstream, self.buffer, act.clone()));
        let end = match submitted {
            // Idle or cut: dropping the lease closes the pair.
            Ok(mut lease) => self.run(&act, Pin::new(&mut lease)).await,
            Err(e) => End::Io(e),
        };
        (end, act.up.load(Relaxed), act.down.load(Relaxed))
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
        let (size, total_up, total_down) = (self.buffer, self.up, self.down);
        // The pumps are made inside the block so that only their sockets
        // and streams are captured, not a second copy of each pump.
        let both = async {
            tokio::try_join!(
                pump_tcp_to_quic(tr, send, size, total_up, &act.up),
                pump_quic_to_tcp(recv, tw, size, total_down, &act.down),
            )
            .map(|_| ())
        };
        tokio::pin!(both);
        let end = self.run(&act, both).await;
        (end, act.up.load(Relaxed), act.down.load(Relaxed))
    }
}

fn count(total: &AtomicU64, conn: &AtomicU64, n: usize) {
    total.fetch_add(n as u64, Relaxed);
    // One writer (this direction's pump) and readers in the same task: a
    // plain load and store, no locked read-modify-write per chunk.
    conn.store(conn.load(Relaxed).wrapping_add(n as u64), Relaxed);
}

async fn pump_tcp_to_quic(
    r: OwnedReadHalf,
    mut send: quinn::SendStream,
    size: usize,
    total: &AtomicU64,
    conn: &AtomicU64,
) -> io::Result<u64> {
    let mut r = r;
    let res = async {
        loop {
            std::future::poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await?;
            let mut buf = BytesMut::with_capacity(size);
            let n = r.read_buf(&mut buf).await?;
            if n == 0 {
                send.finish().map_err(io::Error::other)?;
                return Ok(conn.load(Relaxed));
            }
            send.write_chunk(buf.freeze())
                .await
                .map_err(io::Error::from)?;
            count(total, conn, n);
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
    total: &AtomicU64,
    conn: &AtomicU64,
) -> io::Result<u64> {
    loop {
        match recv.read_chunk(size, true).await {
            Ok(Some(chunk)) => {
                w.write_all(&chunk.bytes).await?;
                count(total, conn, chunk.bytes.len());
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    use super::{Copy, End, IdleCheck};
    use crate::relay::Relays;
    use crate::stats::Totals;
    use crate::test_sockets::{pair, read_one};

    #[tokio::test]
    async fn connection_quiet_after_some_bytes_ends_idle() {
        let (mut client, client_gw) = pair().await;
        let (upstream_gw, mut upstream) = pair().await;
        let (_cut_tx, cut) = watch::channel(false);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let totals = Arc::new(Totals::default());
        let relays = Relays::start(1, totals.clone()).unwrap();
        let copy = Copy {
            buffer: 1024,
            idle: Duration::from_millis(100),
            cut,
            up: &up,
            down: &down,
        };
        client.write_all(b"hello").await.unwrap();
        let peer = async {
            let mut b = [0u8; 5];
            upstream.read_exact(&mut b).await.unwrap();
            upstream.write_all(b"ok").await.unwrap();
            b
        };
        let ((end, n_up, n_down), got) = tokio::join!(
            copy.tcp_tcp(&relays, client_gw.into_std().unwrap(), upstream_gw),
            peer
        );
        assert!(matches!(end, End::Idle), "{end:?}");
        assert_eq!(&got, b"hello");
        assert_eq!((n_up, n_down), (5, 2));
        // The relay thread adds to the gateway's totals, not the copy's.
        assert_eq!((up.load(Relaxed), down.load(Relaxed)), (0, 0));
        assert_eq!((totals.up.load(Relaxed), totals.down.load(Relaxed)), (5, 2));
        let mut b = [0u8; 2];
        client.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ok");
        // The idle end closed the pair: the client sees it.
        assert_eq!(read_one(&mut client).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn cut_ends_a_connection() {
        let (mut client, client_gw) = pair().await;
        let (upstream_gw, mut upstream) = pair().await;
        let (cut_tx, cut) = watch::channel(false);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let relays = Relays::start(1, Arc::default()).unwrap();
        let copy = Copy {
            buffer: 1024,
            idle: Duration::from_secs(300),
            cut,
            up: &up,
            down: &down,
        };
        let cutter = async {
            tokio::task::yield_now().await;
            cut_tx.send(true).unwrap();
        };
        let ((end, _, _), ()) = tokio::join!(
            copy.tcp_tcp(&relays, client_gw.into_std().unwrap(), upstream_gw),
            cutter
        );
        assert!(matches!(end, End::Cut), "{end:?}");
        // Both sides see the pair closed.
        assert_eq!(read_one(&mut client).await.unwrap(), 0);
        assert_eq!(read_one(&mut upstream).await.unwrap(), 0);
    }

    #[test]
    fn idle_after_a_whole_timeout_without_bytes() {
        let mut c = IdleCheck::new(Duration::from_secs(4), 10);
        assert_eq!(c.step(), Duration::from_secs(1));
        assert!(!c.tick(10));
        assert!(!c.tick(10));
        assert!(!c.tick(10));
        assert!(c.tick(10));
    }

    #[test]
    fn bytes_restart_the_quiet_time() {
        let mut c = IdleCheck::new(Duration::from_secs(4), 0);
        assert!(!c.tick(0));
        assert!(!c.tick(0));
        assert!(!c.tick(0));
        assert!(!c.tick(5));
        assert!(!c.tick(5));
        assert!(!c.tick(5));
        assert!(!c.tick(5));
        assert!(c.tick(5));
    }

    #[test]
    fn step_has_a_floor() {
        let c = IdleCheck::new(Duration::from_millis(2), 0);
        assert_eq!(c.step(), Duration::from_millis(1));
    }
}

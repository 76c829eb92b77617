//! Moving bytes between a client and its upstream, both directions at
//! once, with half-close, an idle timeout and a cut signal (drain end,
//! shutdown).
//!
//! Buffers are taken only while a socket is readable (10k idle
//! connections hold no copy buffers); tunnel reads take quinn's own
//! chunks without copying.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

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
struct Activity {
    up: AtomicU64,
    down: AtomicU64,
}

impl Activity {
    fn new() -> Self {
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
    /// Client-to-upstream byte counter.
    pub up: &'a AtomicU64,
    /// Upstream-to-client byte counter.
    pub down: &'a AtomicU64,
}

impl Copy<'_> {
    async fn run<U, D>(self, act: &Activity, up: U, down: D) -> (End, u64, u64)
    where
        U: Future<Output = io::Result<u64>>,
        D: Future<Output = io::Result<u64>>,
    {
        let both = async { tokio::try_join!(up, down) };
        let mut check = IdleCheck::new(self.idle, act.moved());
        let timer = tokio::time::sleep(check.step());
        // A second receiver tells whether the cut signal changed without
        // touching the waiting future (which borrows the first).
        let mut cut_seen = self.cut.clone();
        let mut cut = self.cut;
        let cut_wait = cut.wait_for(|c| *c);
        tokio::pin!(both, timer, cut_wait);
        let mut registered: Option<Waker> = None;
        let end = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = both.as_mut().poll(cx) {
                return Poll::Ready(match r {
                    Ok(_) => End::Done,
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
        .await;
        (end, 0, 0)
    }

    /// Proxies between two TCP connections. Returns how it ended and the
    /// bytes moved up and down.
    pub async fn tcp_tcp(self, client: TcpStream, upstream: TcpStream) -> (End, u64, u64) {
        let act = Activity::new();
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let up = pump_tcp(cr, uw, self.buffer, self.up, &act.up);
        let down = pump_tcp(ur, cw, self.buffer, self.down, &act.down);
        let (end, _, _) = self.run(&act, up, down).await;
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
        let up = pump_tcp_to_quic(tr, send, self.buffer, self.up, &act.up);
        let down = pump_quic_to_tcp(recv, tw, self.buffer, self.down, &act.down);
        let (end, _, _) = self.run(&act, up, down).await;
        (end, act.up.load(Relaxed), act.down.load(Relaxed))
    }
}

fn count(total: &AtomicU64, conn: &AtomicU64, n: usize) {
    total.fetch_add(n as u64, Relaxed);
    // One writer (this direction's pump) and readers in the same task: a
    // plain load and store, no locked read-modify-write per chunk.
    conn.store(conn.load(Relaxed).wrapping_add(n as u64), Relaxed);
}

async fn pump_tcp(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    size: usize,
    total: &AtomicU64,
    conn: &AtomicU64,
) -> io::Result<u64> {
    // Bulk mode: once a read fills the whole buffer, the direction moves
    // to splice(2) through a pipe (no copy through user space).
    let mut pipe: Option<splice::Pipe> = None;
    loop {
        if let Some(p) = &pipe {
            let n = p.fill_from(r.as_ref()).await?;
            if n == 0 {
                w.shutdown().await?;
                return Ok(conn.load(Relaxed));
            }
            p.drain_to(w.as_ref(), n).await?;
            count(total, conn, n);
            continue;
        }
        // No buffer is held while the socket is quiet. poll_read_ready
        // (not `readable()`) parks on the stream's own reader slot, the
        // one `read_buf` uses next: no waiter list to join and leave per
        // read, which showed in the profile of small requests.
        std::future::poll_fn(|cx| r.as_ref().poll_read_ready(cx)).await?;
        let mut buf = pool::take(size);
        // `read_buf` (not `try_read`) clears readiness after a short read:
        // no extra read just to learn the socket is empty.
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            pool::give(buf);
            // Half-close: pass the EOF on, keep the other way open.
            w.shutdown().await?;
            return Ok(conn.load(Relaxed));
        }
        w.write_all(&buf).await?;
        pool::give(buf);
        count(total, conn, n);
        if n == size {
            pipe = splice::Pipe::new().ok();
        }
    }
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

/// splice(2) between sockets through a pipe.
#[allow(unsafe_code)]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Most bytes moved per splice call; also the pipe size asked for.
    const CHUNK: usize = 256 * 1024;

    /// A non-blocking pipe.
    pub struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        // SAFETY: splice(2) only reads its integer and flag arguments; the
        // offsets are null, which is what the kernel requires for pipes
        // and sockets. `from` and `to` are descriptors borrowed from
        // objects the caller keeps alive for the call, so they cannot be
        // closed or reused meanwhile. No memory of ours is accessed.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    impl Pipe {
        /// A new pipe (two descriptors, closed on drop).
        pub fn new() -> io::Result<Self> {
            let mut fds = [0i32; 2];
            // SAFETY: pipe2 writes exactly two descriptors into the
            // two-element array we pass; nothing else is touched.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created by pipe2 and are
            // owned by nobody else; OwnedFd becomes their only owner.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // A bigger pipe moves more per call; failure only costs speed.
            // SAFETY: fcntl on a descriptor we own, integer argument only.
            unsafe {
                libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
            }
            Ok(Self { r, w })
        }

        /// Moves what `from` has (up to CHUNK) into the pipe; 0 at EOF.
        pub async fn fill_from(&self, from: &TcpStream) -> io::Result<usize> {
            loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), self.w.as_raw_fd(), CHUNK)
                }) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }

        /// Moves exactly `n` bytes from the pipe into `to`.
        pub async fn drain_to(&self, to: &TcpStream, mut n: usize) -> io::Result<()> {
            while n > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(self.r.as_raw_fd(), to.as_raw_fd(), n)
                }) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(k) => n -= k.min(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }
}

/// Copy buffers reused across connections (per thread): no allocation per
/// read, and none held by quiet connections.
mod pool {
    use std::cell::RefCell;

    /// Buffers kept per thread.
    const KEEP: usize = 64;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer with at least `size` bytes of capacity.
    pub fn take(size: usize) -> Vec<u8> {
        FREE.with(|f| f.borrow_mut().pop())
            .filter(|b| b.capacity() >= size)
            .unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// Returns a buffer (on an error path it is simply dropped).
    pub fn give(mut b: Vec<u8>) {
        b.clear();
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::{Copy, End, IdleCheck};

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn connection_quiet_after_some_bytes_ends_idle() {
        let (mut client, client_gw) = pair().await;
        let (upstream_gw, mut upstream) = pair().await;
        let (_cut_tx, cut) = watch::channel(false);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
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
        let ((end, n_up, n_down), got) = tokio::join!(copy.tcp_tcp(client_gw, upstream_gw), peer);
        assert!(matches!(end, End::Idle), "{end:?}");
        assert_eq!(&got, b"hello");
        assert_eq!((n_up, n_down), (5, 2));
        assert_eq!((up.load(Relaxed), down.load(Relaxed)), (5, 2));
        let mut b = [0u8; 2];
        client.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ok");
    }

    #[tokio::test]
    async fn cut_ends_a_connection() {
        let (_client, client_gw) = pair().await;
        let (upstream_gw, _upstream) = pair().await;
        let (cut_tx, cut) = watch::channel(false);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
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
        let ((end, _, _), ()) = tokio::join!(copy.tcp_tcp(client_gw, upstream_gw), cutter);
        assert!(matches!(end, End::Cut), "{end:?}");
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

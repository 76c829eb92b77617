//! Relay threads: the bytes of TCP-to-TCP connections move on threads of
//! their own, each an edge-triggered epoll loop (mio) over its pairs.
//!
//! Why not the async runtime: a small request through a runtime task costs
//! a readiness wake-up, a task schedule and a poll of the connection's
//! futures per event, about 0.4 us of CPU more than nginx's event loop per
//! request. Here an event is a slab lookup and the read and write it
//! allows. The runtime keeps everything else: accepting, routing,
//! connecting, the idle timeout and the cut signal (a connection's task
//! watches those and tells its relay thread to close the pair).

mod pair;
mod sys;

use std::collections::HashMap;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};

use mio::{Events, Interest, Token};
use tokio::sync::oneshot;

use crate::copy::Activity;
use crate::stats::Totals;
use pair::{Pair, Step};

/// Token of the waker (pairs use `slot << 1 | side`).
const WAKER: Token = Token(usize::MAX);

/// Events taken per epoll_wait.
const EVENTS: usize = 256;

/// Threads that move bytes between connected TCP pairs.
pub struct Relays {
    threads: Vec<Handle>,
    next: AtomicUsize,
}

/// What a connection's task holds of its thread.
#[derive(Clone)]
struct Handle {
    tx: mpsc::Sender<Msg>,
    waker: Arc<mio::Waker>,
}

impl Handle {
    fn send(&self, msg: Msg) -> io::Result<()> {
        self.tx
            .send(msg)
            .map_err(|_| io::Error::other("relay thread stopped"))?;
        self.waker.wake()
    }
}

enum Msg {
    Add(Box<Job>),
    Close(u64),
}

struct Job {
    id: u64,
    socks: [StdTcpStream; 2],
    size: usize,
    act: Arc<Activity>,
    done: oneshot::Sender<io::Result<()>>,
}

impl Relays {
    /// Starts `threads` relay threads (at least one) adding to `totals`.
    pub fn start(threads: usize, totals: Arc<Totals>) -> io::Result<Self> {
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let poll = mio::Poll::new()?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = mpsc::channel();
            let totals = totals.clone();
            std::thread::Builder::new()
                .name(format!("relay-{i}"))
                .spawn(move || run(poll, rx, &totals))?;
            handles.push(Handle { tx, waker });
        }
        Ok(Self {
            threads: handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Hands a connected pair of non-blocking sockets to a relay thread.
    /// `size` is the read size (bytes); `act` receives the bytes moved
    /// each way.
    pub fn submit(
        &self,
        client: StdTcpStream,
        upstream: StdTcpStream,
        size: usize,
        act: Arc<Activity>,
    ) -> io::Result<Lease> {
        let i = self.next.fetch_add(1, Relaxed);
        let handle = self.threads[i % self.threads.len()].clone();
        let id = i as u64;
        let (done, rx) = oneshot::channel();
        let job = Job {
            id,
            socks: [client, upstream],
            size,
            act,
            done,
        };
        handle.send(Msg::Add(Box::new(job)))?;
        Ok(Lease {
            handle,
            id,
            done: rx,
            over: false,
        })
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        // The threads end once their channel is closed and they wake; their
        // pairs (sockets) are closed with them.
        for h in self.threads.drain(..) {
            let waker = h.waker.clone();
            drop(h);
            let _ = waker.wake();
        }
    }
}

/// A pair being relayed: a future of how it ended (both directions
/// finished, or an I/O error). Dropping it before then closes the pair.
pub struct Lease {
    handle: Handle,
    id: u64,
    done: oneshot::Receiver<io::Result<()>>,
    over: bool,
}

impl std::future::Future for Lease {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = std::task::ready!(Pin::new(&mut self.done).poll(cx));
        self.over = true;
        Poll::Ready(r.unwrap_or_else(|_| Err(io::Error::other("relay thread stopped"))))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.over {
            // Idle, cut, or the task was dropped: the pair goes now.
            let _ = self.handle.send(Msg::Close(self.id));
        }
    }
}

/// A pair in a thread's slab.
struct Slot {
    id: u64,
    pair: Pair,
    done: oneshot::Sender<io::Result<()>>,
}

/// One thread's pairs.
struct Slab {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Lease id to slot.
    ids: HashMap<u64, usize>,
    /// Pairs out of budget with work left.
    again: Vec<usize>,
    /// The read buffer all pairs share (a write that does not take all of
    /// it copies the rest out).
    buf: Vec<u8>,
}

/// One relay thread's loop: until its channel closes.
fn run(mut poll: mio::Poll, rx: mpsc::Receiver<Msg>, totals: &Totals) {
    let mut events = Events::with_capacity(EVENTS);
    let mut slab = Slab {
        slots: Vec::new(),
        free: Vec::new(),
        ids: HashMap::new(),
        again: Vec::new(),
        buf: Vec::new(),
    };
    let mut later = Vec::new();
    loop {
        let timeout = if slab.again.is_empty() {
            None
        } else {
            Some(std::time::Duration::ZERO)
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "relay thread cannot poll; its connections are closed");
            return;
        }
        std::mem::swap(&mut later, &mut slab.again);
        for ev in &events {
            if ev.token() == WAKER {
                loop {
                    match rx.try_recv() {
                        // Its first events come with the next poll.
                        Ok(Msg::Add(job)) => slab.add(&poll, *job),
                        Ok(Msg::Close(id)) => {
                            if let Some(slot) = slab.ids.get(&id).copied() {
                                slab.remove(slot);
                            }
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                }
                continue;
            }
            let (slot, side) = (ev.token().0 >> 1, ev.token().0 & 1);
            if let Some(Some(s)) = slab.slots.get_mut(slot) {
                s.pair.event(side, ev);
                slab.drive(slot, totals);
            }
        }
        for slot in later.drain(..) {
            slab.drive(slot, totals);
        }
    }
}

impl Slab {
    /// Registers a new pair (or tells its task why it could not).
    fn add(&mut self, poll: &mio::Poll, job: Job) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let [c, u] = job.socks;
        let mut socks = [
            mio::net::TcpStream::from_std(c),
            mio::net::TcpStream::from_std(u),
        ];
        let both = Interest::READABLE | Interest::WRITABLE;
        let reg = poll.registry();
        let res = reg
            .register(&mut socks[0], Token(slot << 1), both)
            .and_then(|()| reg.register(&mut socks[1], Token(slot << 1 | 1), both));
        if let Err(e) = res {
            let _ = job.done.send(Err(e));
            self.free.push(slot);
            return;
        }
        if self.buf.len() < job.size {
            self.buf.resize(job.size, 0);
        }
        self.ids.insert(job.id, slot);
        self.slots[slot] = Some(Slot {
            id: job.id,
            pair: Pair::new(socks, job.size, job.act),
            done: job.done,
        });
    }

    /// Moves what can move in one pair; ends it when it is over.
    fn drive(&mut self, slot: usize, totals: &Totals) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        let end = match s.pair.drive(&mut self.buf, totals) {
            Ok(Step::Wait) => return,
            Ok(Step::Again) => {
                if !self.again.contains(&slot) {
                    self.again.push(slot);
                }
                return;
            }
            Ok(Step::Done) => Ok(()),
            Err(e) => Err(e),
        };
        if let Some(done) = self.remove(slot) {
            let _ = done.send(end);
        }
    }

    /// Closes a pair (its sockets); returns how to tell its task.
    fn remove(&mut self, slot: usize) -> Option<oneshot::Sender<io::Result<()>>> {
        // Closing a socket takes it out of the epoll set (nothing else
        // holds its descriptor): no deregistration calls.
        let Slot { id, pair, done } = self.slots.get_mut(slot)?.take()?;
        drop(pair);
        self.ids.remove(&id);
        self.free.push(slot);
        Some(done)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::{Lease, Relays};
    use crate::copy::Activity;
    use crate::stats::Totals;
    use crate::test_sockets::{pair, read_one};

    /// Relays the gateway-side sockets of a client and an upstream.
    fn submit(
        relays: &Relays,
        client_gw: TcpStream,
        upstream_gw: TcpStream,
        size: usize,
    ) -> (Lease, Arc<Activity>) {
        let act = Arc::new(Activity::new());
        let lease = relays
            .submit(
                client_gw.into_std().unwrap(),
                upstream_gw.into_std().unwrap(),
                size,
                act.clone(),
            )
            .unwrap();
        (lease, act)
    }

    /// A client end and an upstream end whose gateway-side sockets are
    /// relayed.
    async fn relayed(relays: &Relays, size: usize) -> (TcpStream, TcpStream, Lease, Arc<Activity>) {
        let (client, client_gw) = pair().await;
        let (upstream_gw, upstream) = pair().await;
        let (lease, act) = submit(relays, client_gw, upstream_gw, size);
        (client, upstream, lease, act)
    }

    /// Deterministic bytes that differ at every offset of a chunk.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_each_half_close_is_passed_on() {
        let totals = Arc::new(Totals::default());
        let relays = Relays::start(1, totals.clone()).unwrap();
        let (mut client, client_gw) = pair().await;
        let (upstream_gw, mut upstream) = pair().await;
        // Bytes and FIN wait together before the pair is relayed: its
        // first event reports both, and the EOF is behind a short read.
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let (lease, act) = submit(&relays, client_gw, upstream_gw, 1024);
        let mut got = Vec::new();
        // A lost EOF would hang here: fail instead.
        tokio::time::timeout(Duration::from_secs(20), upstream.read_to_end(&mut got))
            .await
            .expect("the client's EOF never reached the upstream")
            .unwrap();
        assert_eq!(got, b"request");
        // The client's half-close did not close the way back.
        upstream.write_all(b"response").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response");
        lease.await.unwrap();
        assert_eq!((act.up.load(Relaxed), act.down.load(Relaxed)), (7, 8));
        assert_eq!((totals.up.load(Relaxed), totals.down.load(Relaxed)), (7, 8));
    }

    #[tokio::test]
    async fn bulk_both_ways_at_once_arrives_intact_past_slow_readers() {
        let relays = Relays::start(1, Arc::default()).unwrap();
        // Reads fill this small buffer at once: the bulk (splice) path.
        let (client, upstream, lease, act) = relayed(&relays, 4096).await;
        const LEN: usize = 6 << 20;
        let (up_data, down_data) = (pattern(LEN, 1), pattern(LEN, 2));
        /// Writes `data` and half-closes; reads the other way slowly (so
        /// the relay's writes block and leave bytes pending).
        async fn side(s: TcpStream, data: Vec<u8>) -> Vec<u8> {
            let (mut r, mut w) = s.into_split();
            let writer = async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let reader = async move {
                let mut got = Vec::new();
                let mut b = vec![0u8; 3000];
                loop {
                    let n = r.read(&mut b).await.unwrap();
                    if n == 0 {
                        return got;
                    }
                    got.extend_from_slice(&b[..n]);
                    if got.len() % 7 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            };
            tokio::join!(writer, reader).1
        }
        let (at_client, at_upstream) = tokio::join!(
            side(client, up_data.clone()),
            side(upstream, down_data.clone())
        );
        assert!(at_upstream == up_data, "client-to-upstream bytes differ");
        assert!(at_client == down_data, "upstream-to-client bytes differ");
        lease.await.unwrap();
        assert_eq!(
            (act.up.load(Relaxed), act.down.load(Relaxed)),
            (LEN as u64, LEN as u64)
        );
    }

    #[tokio::test]
    async fn many_pairs_on_one_thread_keep_their_own_bytes() {
        let relays = Relays::start(1, Arc::default()).unwrap();
        let mut conns = Vec::new();
        for i in 0..64u8 {
            let (client, upstream, lease, _) = relayed(&relays, 64 * 1024).await;
            conns.push(async move {
                let (mut client, mut upstream) = (client, upstream);
                for round in 0..20u8 {
                    let ask = [i, round, 1];
                    client.write_all(&ask).await.unwrap();
                    let mut b = [0u8; 3];
                    upstream.read_exact(&mut b).await.unwrap();
                    assert_eq!(b, ask);
                    let answer = [round, i, 2, 2];
                    upstream.write_all(&answer).await.unwrap();
                    let mut b = [0u8; 4];
                    client.read_exact(&mut b).await.unwrap();
                    assert_eq!(b, answer);
                }
                drop(client);
                drop(upstream);
                lease.await.unwrap();
            });
        }
        join_all(conns).await;
    }

    /// Runs futures concurrently on this task.
    async fn join_all<F: std::future::Future<Output = ()>>(fs: Vec<F>) {
        let mut fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
        std::future::poll_fn(|cx| {
            fs.retain_mut(|f| f.as_mut().poll(cx).is_pending());
            if fs.is_empty() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_reset_ends_the_lease_with_an_error_and_closes_the_other_side() {
        let relays = Relays::start(1, Arc::default()).unwrap();
        let (mut client, upstream, lease, _) = relayed(&relays, 1024).await;
        upstream.set_zero_linger().unwrap();
        drop(upstream);
        let err = lease.await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert!(matches!(read_one(&mut client).await, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn dropping_the_lease_closes_both_sockets() {
        let relays = Relays::start(2, Arc::default()).unwrap();
        let (mut client, mut upstream, lease, _) = relayed(&relays, 1024).await;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        upstream.read_exact(&mut b).await.unwrap();
        drop(lease);
        assert_eq!(read_one(&mut client).await.unwrap(), 0);
        assert_eq!(read_one(&mut upstream).await.unwrap(), 0);
    }
}

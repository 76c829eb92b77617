//! One proxied TCP-to-TCP connection inside a relay thread: the two
//! sockets, what each is ready for, and the bytes of each direction.
//!
//! Readiness is edge-triggered, so the flags here are the only record of
//! it: a flag is cleared only when the kernel said so (`WouldBlock`, a
//! short read, a short write), and then the next event sets it again.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use mio::net::TcpStream;

use super::sys;
use crate::copy::Activity;
use crate::splice::Pipe;
use crate::stats::Totals;

/// Client side.
pub const CLIENT: usize = 0;
/// Upstream side.
pub const UPSTREAM: usize = 1;

/// Reads and writes of one direction before the pair yields to others (a
/// bulk transfer must not hold the thread while other pairs wait).
const BUDGET: usize = 16;

/// Bytes read from one side and not yet written to the other.
enum Pending {
    None,
    /// A copy of what the write side did not take, from `at` on.
    Buf {
        buf: Vec<u8>,
        at: usize,
    },
    /// Bytes in the direction's pipe.
    Pipe(usize),
}

/// One direction: from side `d` to side `1 - d`.
struct Dir {
    pending: Pending,
    /// In bulk mode (a read filled the whole buffer) bytes go through a
    /// pipe with splice(2).
    pipe: Option<Pipe>,
    /// EOF read and passed on (the write side was shut down).
    done: bool,
}

/// What a pass over a pair left to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Waiting for readiness events.
    Wait,
    /// Out of budget with work left: run again before sleeping.
    Again,
    /// Both directions finished: EOF each way, everything written.
    Done,
}

/// A connection pair and its state.
pub struct Pair {
    socks: [TcpStream; 2],
    readable: [bool; 2],
    writable: [bool; 2],
    /// The peer of this side closed its writing (or the socket broke):
    /// readable for good, even after a short read.
    hung_up: [bool; 2],
    dirs: [Dir; 2],
    /// Read size (bytes).
    size: usize,
    act: Arc<Activity>,
}

impl Pair {
    /// A pair that waits for its first events: registering a socket
    /// reports what it is ready for already (bytes that came before).
    pub fn new(socks: [TcpStream; 2], size: usize, act: Arc<Activity>) -> Self {
        let dir = || Dir {
            pending: Pending::None,
            pipe: None,
            done: false,
        };
        Self {
            socks,
            readable: [false; 2],
            writable: [false; 2],
            hung_up: [false; 2],
            dirs: [dir(), dir()],
            size: size.max(1),
            act,
        }
    }

    /// Records a readiness event of `side`.
    pub fn event(&mut self, side: usize, ev: &mio::event::Event) {
        // Errors and hang-ups show on the next read or write: mark both.
        let broken = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        if broken {
            self.hung_up[side] = true;
        }
        if ev.is_readable() || broken {
            self.readable[side] = true;
        }
        if ev.is_writable() || broken {
            self.writable[side] = true;
        }
    }

    /// Moves what can move now in both directions. `buf` is the thread's
    /// read buffer (at least `size` bytes).
    pub fn drive(&mut self, buf: &mut [u8], totals: &Totals) -> io::Result<Step> {
        let mut step = Step::Wait;
        for d in [CLIENT, UPSTREAM] {
            if self.pump(d, buf, totals)? {
                step = Step::Again;
            }
        }
        if self.dirs.iter().all(|d| d.done) {
            return Ok(Step::Done);
        }
        Ok(step)
    }

    /// Pumps direction `d`; true when its budget ran out with work left.
    fn pump(&mut self, d: usize, buf: &mut [u8], totals: &Totals) -> io::Result<bool> {
        let to = 1 - d;
        for _ in 0..BUDGET {
            if !self.flush(d)? {
                return Ok(false);
            }
            if self.dirs[d].done || !self.readable[d] {
                return Ok(false);
            }
            let n = match self.read(d, buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable[d] = false;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                // Half-close: pass the EOF on, keep the other way open.
                self.socks[to].shutdown(Shutdown::Write)?;
                self.dirs[d].done = true;
                return Ok(false);
            }
            self.count(d, n, totals);
        }
        Ok(true)
    }

    /// Reads from side `d` and writes what it can to the other side; the
    /// rest becomes pending. Returns the bytes read (0 at EOF).
    fn read(&mut self, d: usize, buf: &mut [u8]) -> io::Result<usize> {
        let to = 1 - d;
        if let Some(pipe) = &self.dirs[d].pipe {
            let n = retry(|| pipe.fill_from(&self.socks[d]))?;
            if n > 0 {
                self.dirs[d].pending = Pending::Pipe(n);
            }
            return Ok(n);
        }
        let size = self.size.min(buf.len());
        let n = retry(|| sys::recv(&self.socks[d], &mut buf[..size]))?;
        if n == 0 {
            return Ok(0);
        }
        if n < size {
            // A short read emptied the socket: no extra read just to
            // learn that (the next arrival raises a new edge). Not so
            // after a hang-up: its EOF may already wait behind these
            // bytes, and no edge would come for it.
            if !self.hung_up[d] {
                self.readable[d] = false;
            }
        } else if let Ok(p) = Pipe::new() {
            // Bulk: splice from now on.
            self.dirs[d].pipe = Some(p);
        }
        let mut at = 0;
        if self.writable[to] {
            at = match retry(|| sys::send(&self.socks[to], &buf[..n])) {
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
        }
        if at < n {
            self.writable[to] = false;
            self.dirs[d].pending = Pending::Buf {
                buf: buf[at..n].to_vec(),
                at: 0,
            };
        }
        Ok(n)
    }

    /// Writes direction `d`'s pending bytes; true once none are left.
    fn flush(&mut self, d: usize) -> io::Result<bool> {
        let to = 1 - d;
        let dir = &mut self.dirs[d];
        let left = match &dir.pending {
            Pending::None => return Ok(true),
            Pending::Buf { buf, at } => buf.len() - at,
            Pending::Pipe(n) => *n,
        };
        if !self.writable[to] {
            return Ok(false);
        }
        let res = retry(|| match &dir.pending {
            Pending::Buf { buf, at } => sys::send(&self.socks[to], &buf[*at..]),
            Pending::Pipe(n) => match &dir.pipe {
                Some(p) => p.drain_to(&self.socks[to], *n),
                None => Err(io::Error::other("bulk pipe missing")),
            },
            Pending::None => Ok(0),
        });
        let k = match res {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if k < left {
            // The send buffer is full: its next edge resumes this.
            self.writable[to] = false;
            match &mut dir.pending {
                Pending::Buf { at, .. } => *at += k,
                Pending::Pipe(n) => *n -= k,
                Pending::None => {}
            }
            return Ok(false);
        }
        dir.pending = Pending::None;
        Ok(true)
    }

    fn count(&self, d: usize, n: usize, totals: &Totals) {
        let (total, conn) = if d == CLIENT {
            (&totals.up, &self.act.up)
        } else {
            (&totals.down, &self.act.down)
        };
        total.fetch_add(n as u64, Relaxed);
        // One writer (this thread) and readers elsewhere: a plain load and
        // store, no locked read-modify-write per chunk.
        conn.store(conn.load(Relaxed).wrapping_add(n as u64), Relaxed);
    }
}

/// Runs a syscall again while a signal interrupts it.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

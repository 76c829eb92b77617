//! splice(2) between sockets through a pipe: bulk transfers move from one
//! socket to the other without passing through user space.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Most bytes moved per splice call; also the pipe size asked for.
pub const CHUNK: usize = 256 * 1024;

/// A non-blocking pipe.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice(2) only reads its integer and flag arguments; the
    // offsets are null, which is what the kernel requires for pipes and
    // sockets. `from` and `to` are descriptors borrowed from objects the
    // caller keeps alive for the call, so they cannot be closed or reused
    // meanwhile. No memory of ours is accessed.
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
        // SAFETY: pipe2 writes exactly two descriptors into the two-element
        // array we pass; nothing else is touched.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created by pipe2 and are owned
        // by nobody else; OwnedFd becomes their only owner.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per call; failure only costs speed.
        // SAFETY: fcntl on a descriptor we own, integer argument only.
        unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
        }
        Ok(Self { r, w })
    }

    /// Moves what `from` has (up to [`CHUNK`]) into the pipe; 0 at EOF,
    /// `WouldBlock` when `from` has nothing.
    pub fn fill_from(&self, from: &impl AsRawFd) -> io::Result<usize> {
        splice(from.as_raw_fd(), self.w.as_raw_fd(), CHUNK)
    }

    /// Moves up to `n` bytes from the pipe into `to`; `WouldBlock` when
    /// `to` is full.
    pub fn drain_to(&self, to: &impl AsRawFd, n: usize) -> io::Result<usize> {
        splice(self.r.as_raw_fd(), to.as_raw_fd(), n)
    }
}

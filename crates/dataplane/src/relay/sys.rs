//! `recv` and `send` on the relay's sockets, straight to the kernel.
//!
//! glibc's `recv` and `send` are thread-cancellation points: in a
//! multi-threaded process each call switches the thread's cancellation
//! state on and off around the system call, which was 1.5 % of a relay
//! thread's CPU with small requests. Nothing here uses thread
//! cancellation, so `syscall(2)` (not a cancellation point) does the same
//! work without it.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// Reads into `buf`: the bytes read, 0 at EOF.
pub fn recv(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes at `buf`'s
    // pointer, which is valid and exclusively borrowed for the call; the
    // address arguments are null (no peer address wanted); the descriptor
    // belongs to a socket the caller keeps alive for the call.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            sock.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
            0,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    result(n)
}

/// Writes from `buf`: the bytes the kernel took. A closed peer is an
/// error (`EPIPE`), not a signal.
pub fn send(sock: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`'s
    // pointer, valid and borrowed for the call; no destination address
    // (the socket is connected); the descriptor belongs to a socket the
    // caller keeps alive for the call.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            sock.as_raw_fd(),
            buf.as_ptr(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    result(n)
}

fn result(n: libc::c_long) -> io::Result<usize> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

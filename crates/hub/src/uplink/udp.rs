//! The UDP socket under a QUIC endpoint that carries many connections.
//!
//! One hub node's uplink socket carries every agent of the node. Linux
//! gives a new UDP socket about 208 KiB of receive buffer; a burst from a
//! few hundred agents (reconnects, export storms) overflows it, and every
//! datagram dropped there is a QUIC loss: retransmissions, congestion
//! collapse, and at worst a connection that sees nothing for the idle
//! timeout. A larger buffer absorbs the bursts. The kernel caps the size at
//! `net.core.rmem_max` / `wmem_max` (docs/operations.md says how to raise
//! them).

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel receive and send buffer asked for on uplink sockets (bytes).
pub const UPLINK_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds a UDP socket on `addr` with `buffer` bytes of kernel receive and
/// send buffer (or as much as the kernel allows: a smaller grant is not an
/// error, the buffer is an optimisation).
pub fn bind_with_buffers(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::debug!(error = %e, "UDP receive buffer size not set");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::debug!(error = %e, "UDP send buffer size not set");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A quinn endpoint on a socket from [`bind_with_buffers`].
pub fn endpoint(
    addr: SocketAddr,
    buffer: usize,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_with_buffers(addr, buffer)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_port_zero_with_a_larger_receive_buffer() {
        let s =
            bind_with_buffers(SocketAddr::from(([127, 0, 0, 1], 0)), UPLINK_SOCKET_BUFFER).unwrap();
        assert_ne!(s.local_addr().unwrap().port(), 0);
        let got = Socket::from(s).recv_buffer_size().unwrap();
        // The kernel doubles the request for bookkeeping, capped at
        // rmem_max; either way more than the ~208 KiB default.
        assert!(got > 256 * 1024, "receive buffer {got}");
    }
}

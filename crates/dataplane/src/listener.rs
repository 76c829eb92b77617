//! VIP listeners and the routing of each accepted client connection.

use std::io;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::copy::{Copy, End};
use crate::gateway::Shared;
use crate::stats::Outcome;
use crate::table::{plan, Attempt};
use crate::tunnel::OpenError;
use crate::ServiceKey;

/// A bound VIP listener. The sockets it accepts are not registered with
/// the runtime: a connection to a local endpoint goes to a relay thread,
/// which registers it there, and a runtime registration would cost two
/// more `epoll_ctl` calls per connection (add, then remove).
pub type Listener = AsyncFd<std::net::TcpListener>;

/// Accepts one client, as a non-blocking socket. An error is the
/// listener's (descriptors exhausted and the like); a client that cannot
/// be made non-blocking is dropped here, without a back-off.
async fn accept(listener: &Listener) -> io::Result<StdTcpStream> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            let (client, _) = accepted?;
            match client.set_nonblocking(true) {
                Ok(()) => return Ok(client),
                Err(e) => tracing::debug!(error = %e, "accepted client dropped"),
            }
        }
    }
}

/// Accepts clients of `service:port` on `listener` until aborted.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: Listener,
    service: ServiceKey,
    port: u16,
    cut: watch::Receiver<bool>,
) {
    loop {
        let client = match accept(&listener).await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or similar: back off a little rather
                // than spin; the listener stays.
                tracing::warn!(service = %service, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        shared
            .counters
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
            shared
                .counters
                .connection(&service, None, Outcome::Overload);
            continue;
        };
        let shared = shared.clone();
        let service = service.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            serve_client(&shared, client, &service, port, cut).await;
            drop(permit);
        });
    }
}

enum Upstream {
    Tcp(TcpStream),
    Tunnel(quinn::SendStream, quinn::RecvStream),
}

async fn serve_client(
    shared: &Shared,
    client: StdTcpStream,
    service: &ServiceKey,
    port: u16,
    cut: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let table = shared.table();
    let Some(route) = table.services.get(service) else {
        shared.counters.connection(service, None, Outcome::Failed);
        return;
    };
    let limits = &shared.cfg.limits;
    let seed = shared.next_seed();
    let mut attempts = plan(route, port, seed, limits.max_attempts.max(1), |pop| {
        shared.peer_usable(pop)
    });
    if attempts.is_empty() {
        // Every target is down: trying a peer the prober doubts (over a
        // live tunnel) beats refusing the client outright.
        attempts = plan(route, port, seed, limits.max_attempts.max(1), |pop| {
            shared.peer_connected(pop)
        });
    }
    // A down peer skipped up front is a local failover too.
    let ideal = plan(route, port, seed, 1, |_| true);
    if ideal.first().map(Attempt::tier) != attempts.first().map(Attempt::tier) {
        shared.counters.failover(service);
    }
    let mut served = None;
    for (i, attempt) in attempts.iter().enumerate() {
        if i > 0 {
            shared.counters.failover(service);
        }
        match attempt {
            Attempt::Local { addr, .. } => {
                match tokio::time::timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        served = Some((attempt.tier(), Upstream::Tcp(s)));
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(service = %service, %addr, error = %e, "local endpoint refused")
                    }
                    Err(_) => {
                        tracing::debug!(service = %service, %addr, "local endpoint timed out")
                    }
                }
            }
            Attempt::Remote { pop, .. } => {
                let Some(peer) = shared.peer(pop) else {
                    continue;
                };
                match peer.open(service, port, limits.tunnel_open_timeout).await {
                    Ok((send, recv)) => {
                        served = Some((attempt.tier(), Upstream::Tunnel(send, recv)));
                        break;
                    }
                    Err(e) => {
                        if let OpenError::Refused(s) = e {
                            tracing::debug!(service = %service, peer = %pop, status = ?s, "peer refused stream");
                        } else {
                            tracing::debug!(service = %service, peer = %pop, error = ?e, "tunnel attempt failed");
                        }
                    }
                }
            }
        }
    }
    let Some((tier, upstream)) = served else {
        shared.counters.connection(service, None, Outcome::Failed);
        return;
    };
    let copy = Copy {
        buffer: limits.buffer_size,
        idle: limits.idle_timeout,
        cut,
        up: &shared.counters.bytes.up,
        down: &shared.counters.bytes.down,
    };
    let outcome = match upstream {
        Upstream::Tcp(_) => Outcome::Local,
        Upstream::Tunnel(..) => Outcome::Remote,
    };
    shared.counters.connection(service, Some(tier), outcome);
    let (end, up, down) = match upstream {
        Upstream::Tcp(s) => copy.tcp_tcp(&shared.relays, client, s).await,
        Upstream::Tunnel(send, recv) => match TcpStream::from_std(client) {
            Ok(client) => copy.tcp_quic(client, send, recv).await,
            Err(e) => (End::Io(e), 0, 0),
        },
    };
    shared.counters.bytes(service, up, down);
    if let End::Io(e) = end {
        tracing::debug!(service = %service, error = %e, "connection ended with an error");
    }
}

/// Binds one VIP listener.
#[allow(unsafe_code)]
pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    // into_std leaves it non-blocking.
    let listener = sock.listen(4096)?.into_std()?;
    // SAFETY: the AsyncFd takes ownership of the std listener, which owns
    // its descriptor: it stays open and is the same descriptor until the
    // AsyncFd drops it, and nothing here swaps the listener through
    // get_mut.
    unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

//! The TLS accept loop in front of tonic.
//!
//! We terminate TLS ourselves (tokio-rustls) rather than through tonic's
//! built-in TLS so that failed handshakes (a certificate from another CA,
//! garbage) are counted and logged, and so that one slow or hostile
//! handshake never stalls the listener: each runs in its own task with a
//! deadline.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, net::TcpStream, sync::mpsc};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener`, completes TLS on each, and yields
/// the established streams for `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(tls) = handshake(acceptor, tcp, peer).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible()).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err((e, tcp))) => {
            let reason = classify(&e);
            metrics::rejected(reason);
            tracing::info!(%peer, reason, error = %e, "TLS handshake refused");
            linger(tcp).await;
            None
        }
        Err(_) => {
            metrics::rejected("tls_handshake_timeout");
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// How long a refused connection is drained before it is closed.
const LINGER: Duration = Duration::from_secs(2);

/// Closes a refused connection so that the client reads our TLS alert (e.g.
/// "unknown CA"): send FIN, then read and discard what the client already
/// sent. Closing a socket with unread input sends a reset instead, and the
/// client then sees only "connection reset" or "broken pipe".
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn classify(e: &std::io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "tls_unknown_ca"
    } else if text.contains("certificate") {
        "tls_bad_certificate"
    } else {
        "tls_handshake_failed"
    }
}

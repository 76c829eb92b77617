//! Outgoing gRPC channels over our own mutual-TLS connector.
//!
//! tonic's TLS would check the server's DNS name; our certificates carry
//! SPIFFE IDs instead, so the connector does TCP + rustls itself with a
//! verifier that checks the chain against the federation CA and the peer's
//! SPIFFE ID (`switchyard_pki::client_config`).

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::conn_abort::ConnAbort;

/// Name sent in SNI. The server does not route on it; identity is checked
/// through the SPIFFE ID, not this name.
pub const SNI_NAME: &str = "switchyard.invalid";

/// Timeout for establishing TCP + TLS to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazy channel to `addr` (`host:port`) that dials with `tls`. Connecting
/// happens on first use and again after failures, so a node that is down
/// now costs nothing until it is needed.
pub fn tls_channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    abortable_tls_channel(addr, tls, ConnAbort::default())
}

/// [`tls_channel`] whose connections `abort` can end (see
/// [`super::conn_abort`]).
pub fn abortable_tls_channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    abort: ConnAbort,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let connector = TlsConnector::from(tls);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
            let (connector, abort) = (connector.clone(), abort.clone());
            async move {
                let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
                let port = uri.port_u16().unwrap_or(443);
                let tcp = dial((host, port), CONNECT_TIMEOUT).await?;
                let name = ServerName::try_from(SNI_NAME)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                // Wrapped before the handshake: an abort also ends a
                // handshake the peer never answers.
                let tls = connector.connect(name, abort.wrap(tcp)).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        })),
    )
}

/// TCP to `addr` within `timeout`, with Nagle off (gRPC frames are small
/// and latency-bound).
pub async fn dial(
    addr: impl tokio::net::ToSocketAddrs,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

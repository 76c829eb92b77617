//! The agent's local gRPC API for a gateway running as its own process
//! (`switchyard gateway --agent ADDR`): `switchyard.v1.LocalGateway` in
//! `local.proto` (view stream, gateway certificates, tunnel address and
//! RTT reports), over [`GatewaySupport`].
//!
//! Local only. It is plain-text gRPC (the gateway has no identity before
//! it asks for one), so it is meant for loopback: the CLI binds
//! `127.0.0.1` by default and the agent logs a warning for any other
//! address. Every call must present the shared secret from the data dir
//! (`gateway-api.secret`, 32 random bytes as hex, mode 0600, created at the
//! first start) in the `x-switchyard-secret` metadata entry: only a process
//! that can read the agent's data dir gets the gateway's key.
//!
//! Limits: requests are decoded up to [`MAX_REQUEST`] bytes (tonic checks
//! the length prefix before allocating); views are sent up to
//! [`MAX_RESPONSE`] bytes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::UNIX_EPOCH;

use futures::Stream;
use rand::RngCore as _;
use switchyard_proto::pb::{
    self,
    local_gateway_client::LocalGatewayClient,
    local_gateway_server::{LocalGateway, LocalGatewayServer},
};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::{write_atomic, ConfigError, DataDir};
use crate::gateway::{GatewayIdentityError, GatewaySupport};

/// The secret file, in the data dir.
pub const SECRET_FILE: &str = "gateway-api.secret";
/// The metadata entry carrying the secret.
pub const SECRET_HEADER: &str = "x-switchyard-secret";
/// Largest request decoded (bytes).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest response sent (bytes): a whole decision table.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Why the local API could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// The secret file could not be read or created.
    #[error(transparent)]
    Secret(#[from] ConfigError),
    /// The TCP listener could not bind.
    #[error("cannot listen: {0}")]
    Bind(std::io::Error),
}

/// The shared secret of `data`, created (0600) if missing or empty.
pub fn load_or_create_secret(data: &DataDir) -> Result<String, ConfigError> {
    let path = data.root().join(SECRET_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_atomic(&path, format!("{secret}\n").as_bytes(), 0o600)?;
    Ok(secret)
}

/// Binds `addr` (port 0 picks a free port) and serves the local API for
/// `support` until the task is aborted; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    support: GatewaySupport,
    data: &DataDir,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), LocalApiError> {
    let secret = load_or_create_secret(data)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(LocalApiError::Bind)?;
    let bound = listener.local_addr().map_err(LocalApiError::Bind)?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the local gateway API listens beyond loopback: it is plain text, protected by the shared secret only");
    }
    let svc = LocalGatewayServer::new(Api { support })
        .max_decoding_message_size(MAX_REQUEST)
        .max_encoding_message_size(MAX_RESPONSE);
    let svc = InterceptedService::new(svc, move |req: Request<()>| check_secret(&secret, req));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "local gateway API failed");
        }
    });
    tracing::info!(%bound, "local gateway API serving");
    Ok((bound, task))
}

fn check_secret(secret: &str, req: Request<()>) -> Result<Request<()>, Status> {
    let given = req
        .metadata()
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if constant_time_eq(given.as_bytes(), secret.as_bytes()) {
        Ok(req)
    } else {
        Err(Status::unauthenticated(format!(
            "missing or wrong {SECRET_HEADER} (the agent's data dir has it in {SECRET_FILE})"
        )))
    }
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A client of the local API presenting `secret` on every call.
pub type Client = LocalGatewayClient<InterceptedService<Channel, SecretInjector>>;

/// Adds the secret to every outgoing call.
#[derive(Clone)]
pub struct SecretInjector(MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for SecretInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretInjector")
    }
}

impl tonic::service::Interceptor for SecretInjector {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(SECRET_HEADER, self.0.clone());
        Ok(req)
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address does not form a URI.
    #[error("bad agent address {0:?}")]
    Address(String),
    /// The secret is not printable ASCII.
    #[error("the secret is not printable ASCII")]
    Secret,
    /// Could not connect.
    #[error("cannot connect to the agent at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        reason: String,
    },
}

/// Connects to the local API at `addr` (`host:port`).
pub async fn connect(addr: &str, secret: &str) -> Result<Client, ClientError> {
    let value: MetadataValue<tonic::metadata::Ascii> =
        secret.trim().parse().map_err(|_| ClientError::Secret)?;
    let endpoint = Channel::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(
        LocalGatewayClient::with_interceptor(channel, SecretInjector(value))
            .max_decoding_message_size(MAX_RESPONSE)
            .max_encoding_message_size(MAX_REQUEST),
    )
}

struct Api {
    support: GatewaySupport,
}

type ViewStream = Pin<Box<dyn Stream<Item = Result<pb::PopView, Status>> + Send>>;

#[tonic::async_trait]
impl LocalGateway for Api {
    type WatchViewStream = ViewStream;

    async fn watch_view(
        &self,
        _req: Request<pb::WatchViewRequest>,
    ) -> Result<Response<Self::WatchViewStream>, Status> {
        let rx = self.support.watch_view();
        // The current view first, then each change; a receiver that is
        // behind sees only the newest (views replace each other whole).
        let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            let mut first = first;
            loop {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                first = false;
                let v = rx.borrow_and_update().clone();
                if let Some(v) = v {
                    return Some((Ok(v), (rx, false)));
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn gateway_identity(
        &self,
        req: Request<pb::GatewayIdentityRequest>,
    ) -> Result<Response<pb::GatewayIdentityReply>, Status> {
        let instance = req.into_inner().instance;
        match self.support.identity(&instance).await {
            Ok(id) => Ok(Response::new(pb::GatewayIdentityReply {
                pop: id.pop,
                domain: id.domain,
                cert_pem: id.cert_pem,
                key_pem: id.key_pem,
                ca_pem: id.ca_pem,
                not_after_ms: id
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .unwrap_or(0),
            })),
            Err(e @ GatewayIdentityError::BadInstance(_)) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ GatewayIdentityError::Unavailable { .. }) => {
                Err(Status::unavailable(e.to_string()))
            }
        }
    }

    async fn gateway_report(
        &self,
        req: Request<pb::GatewayReportRequest>,
    ) -> Result<Response<pb::GatewayReportReply>, Status> {
        let r = req.into_inner();
        self.support
            .report(&r.tunnel_addr, r.samples)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::GatewayReportReply {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn secret_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let a = load_or_create_secret(&data).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(load_or_create_secret(&data).unwrap(), a);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

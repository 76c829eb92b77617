//! Starting a hub node: files in its data dir, listeners, Raft, and the
//! bootstrap and join procedures.

pub mod admin;
pub mod authz;
pub mod channel;
pub mod conn_abort;
pub mod http;
pub mod overview;
pub mod sessions;
pub mod tls_accept;

mod files;

pub use files::{AdminConfig, NodeFiles, NodeRecord};

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use switchyard_pki::{CertificateAuthority, ClientAuth, ExpectedPeer, SpiffeId};
use switchyard_proto::pb::{
    self, admin_client::AdminClient, admin_server::AdminServer, command::Kind,
    enrolment_server::EnrolmentServer,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    metrics,
    node::{Hub, Timeouts},
    raft::{
        network::{ChannelError, ChannelFactory},
        service::RaftService,
        types::{Config, HubNode},
    },
    store::backend::RedbBackend,
};

/// ALPN of the hub's gRPC listener.
pub const ALPN_H2: &[u8] = b"h2";
/// Largest admin request we decode (bytes): admin calls are small.
pub const MAX_ADMIN_MESSAGE: usize = 1024 * 1024;
/// Largest Raft message we decode (bytes): batches of entries, snapshots.
pub const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;
/// Lifetime of the operator credential written at bootstrap.
pub const OPERATOR_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How the node comes up.
#[derive(Debug, Clone)]
pub enum StartMode {
    /// Create the federation: CA, this node as node 1, operator credential.
    Bootstrap {
        /// Trust domain, e.g. `example.org`.
        domain: String,
        /// Where to write the operator credential file.
        admin_config: PathBuf,
    },
    /// Join an existing hub cluster with a hub join token.
    Join {
        /// gRPC address of any member.
        addr: String,
        /// Token from `switchyard token create --hub`.
        token: String,
        /// This node's id (>= 1, unique in the cluster); 0: the lowest id
        /// the cluster never used (`FederationInfo.next_node_id`).
        node_id: u64,
    },
    /// Start from the data dir of a node that bootstrapped or joined before.
    Restart,
}

/// Raft timings (ms). Defaults suit a LAN between hub nodes.
#[derive(Debug, Clone, Copy)]
pub struct RaftTimings {
    /// Leader heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// Election timeout lower bound (ms).
    pub election_min_ms: u64,
    /// Election timeout upper bound (ms).
    pub election_max_ms: u64,
}

impl Default for RaftTimings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 500,
            election_max_ms: 1000,
        }
    }
}

/// Everything needed to start one hub node.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Data directory (Raft store, certificates, node record).
    pub data_dir: PathBuf,
    /// gRPC listen address (Raft + admin); port 0 picks one. `None` on
    /// restart reuses the address recorded in the data dir.
    pub listen: Option<SocketAddr>,
    /// HTTP listen address (`/healthz`, `/readyz`, `/metrics`).
    pub http: Option<SocketAddr>,
    /// Address other nodes dial; defaults to the bound gRPC address.
    pub advertise: Option<String>,
    /// Bootstrap, join or restart.
    pub mode: StartMode,
    /// Client-facing timeouts.
    pub timeouts: Timeouts,
    /// Raft timings.
    pub raft: RaftTimings,
    /// QUIC uplink listen address (UDP) for POP agents; port 0 picks one.
    /// `None` on restart reuses the recorded address, else 127.0.0.1:0.
    pub uplink: Option<SocketAddr>,
    /// Uplink and POP certificate settings.
    pub uplink_options: crate::uplink::server::UplinkOptions,
}

impl RaftTimings {
    /// Short timings for a cluster on one machine (tests): 50 ms heartbeats,
    /// elections after 150-300 ms.
    pub fn local() -> Self {
        Self {
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
        }
    }
}

impl HubConfig {
    /// A node that bootstraps federation `domain` with every listener on
    /// 127.0.0.1 port 0 and local Raft timings: data in `dir/hub`, the
    /// operator credentials in `dir/admin.toml`. For tests and embedding;
    /// change fields with struct update syntax.
    pub fn loopback_bootstrap(dir: &std::path::Path, domain: &str) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        HubConfig {
            data_dir: dir.join("hub"),
            listen: Some(loopback),
            http: Some(loopback),
            advertise: None,
            mode: StartMode::Bootstrap {
                domain: domain.to_string(),
                admin_config: dir.join("admin.toml"),
            },
            timeouts: Timeouts::default(),
            raft: RaftTimings::local(),
            uplink: Some(loopback),
            uplink_options: Default::default(),
        }
    }
}

/// Why a node could not start. Each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Files in the data dir.
    #[error("data dir {dir}: {message}")]
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Certificates or keys.
    #[error("certificates: {0}")]
    Pki(#[from] switchyard_pki::PkiError),
    /// The Raft store.
    #[error("raft store: {0}")]
    Store(String),
    /// Raft itself.
    #[error("raft: {0}")]
    Raft(String),
    /// The QUIC uplink listener.
    #[error("uplink: {0}")]
    Uplink(#[from] crate::uplink::server::UplinkStartError),
    /// Joining an existing cluster failed.
    #[error("joining via {addr}: {message}")]
    Join {
        /// The member we asked.
        addr: String,
        /// What it said.
        message: String,
    },
}

/// A running hub node.
#[derive(Debug)]
pub struct RunningHub {
    /// The Raft API.
    pub hub: Hub,
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Bound QUIC uplink address (UDP).
    pub uplink_addr: SocketAddr,
    uplink: crate::uplink::server::UplinkServer,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningHub {
    /// Stops the listeners and Raft.
    pub async fn shutdown(self) {
        self.uplink.shutdown().await;
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.hub.raft().shutdown().await;
    }
}

struct TlsChannels(Arc<rustls::ClientConfig>);

impl ChannelFactory for TlsChannels {
    fn channel(
        &self,
        addr: &str,
        abort: conn_abort::ConnAbort,
    ) -> Result<tonic::transport::Channel, ChannelError> {
        channel::abortable_tls_channel(addr, self.0.clone(), abort).map_err(|e| {
            ChannelError::Setup {
                addr: addr.to_string(),
                reason: e.to_string(),
            }
        })
    }
}

fn raft_config(t: RaftTimings) -> Result<Config, StartError> {
    let mut c = crate::raft::default_config().map_err(|e| StartError::Raft(e.to_string()))?;
    c.heartbeat_interval = t.heartbeat_ms;
    c.election_timeout_min = t.election_min_ms;
    c.election_timeout_max = t.election_max_ms;
    c.validate().map_err(|e| StartError::Raft(e.to_string()))
}

/// Starts a hub node: bootstraps or joins first when asked.
pub async fn start(cfg: HubConfig) -> Result<RunningHub, StartError> {
    let files = NodeFiles::new(&cfg.data_dir);
    let prom = metrics::install();
    let existing = files.load_record()?;
    let mode =
        match (&cfg.mode, &existing) {
            (StartMode::Restart, None) => return Err(StartError::DataDir {
                dir: cfg.data_dir.clone(),
                message:
                    "holds no hub node; start with --bootstrap --domain D, or --join ADDR --token T"
                        .into(),
            }),
            // Already set up: a restart, whatever the flags say (so a unit file
            // with --bootstrap can restart safely).
            (_, Some(_)) => StartMode::Restart,
            (m, None) => m.clone(),
        };

    let listen = cfg
        .listen
        .or(existing.as_ref().and_then(|r| r.listen.parse().ok()))
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
    let http = cfg
        .http
        .or(existing.as_ref().and_then(|r| r.http.parse().ok()))
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
    let grpc_listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let http_listener = TcpListener::bind(http)
        .await
        .map_err(|source| StartError::Bind { addr: http, source })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr: http, source })?;
    let uplink_listen = cfg
        .uplink
        .or(existing
            .as_ref()
            .and_then(|r| r.uplink.as_deref())
            .and_then(|u| u.parse().ok()))
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
    let advertise = cfg
        .advertise
        .clone()
        .or(existing.as_ref().map(|r| r.advertise.clone()))
        .unwrap_or_else(|| grpc_addr.to_string());

    // Identity and record.
    let (record, ca_for_bootstrap) = match &mode {
        StartMode::Restart => (
            existing.clone().ok_or_else(|| StartError::DataDir {
                dir: cfg.data_dir.clone(),
                message: "node record vanished".into(),
            })?,
            None,
        ),
        StartMode::Bootstrap { domain, .. } => {
            let ca = CertificateAuthority::generate(domain)?;
            let id = SpiffeId::hub(domain, 1)?;
            let issued = ca.issue(&id, admin::HUB_CERT_VALIDITY)?;
            files.write_tls(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)?;
            let rec = NodeRecord {
                node_id: 1,
                domain: domain.clone(),
                listen: grpc_addr.to_string(),
                http: http_addr.to_string(),
                advertise: advertise.clone(),
                uplink: None,
            };
            (rec, Some(ca))
        }
        StartMode::Join {
            addr,
            token,
            node_id,
        } => {
            let rec = join_cluster(
                &files, addr, token, *node_id, grpc_addr, http_addr, &advertise,
            )
            .await?;
            (rec, None)
        }
    };
    let mut record = record;
    record.listen = grpc_addr.to_string();
    record.http = http_addr.to_string();
    let (ca_pem, cert_pem, key_pem) = files.read_tls()?;
    let chain = format!("{cert_pem}\n{ca_pem}");
    // Agents must present a POP certificate on the uplink.
    let uplink_tls = switchyard_pki::server_config(
        &chain,
        &key_pem,
        &ca_pem,
        ClientAuth::Required,
        vec![switchyard_proto::uplink::ALPN.to_vec()],
    )?;
    let server_tls = switchyard_pki::server_config(
        &chain,
        &key_pem,
        &ca_pem,
        ClientAuth::Optional,
        vec![ALPN_H2.to_vec()],
    )?;
    let peer_tls = switchyard_pki::client_config(
        Some((&chain, &key_pem)),
        &ca_pem,
        ExpectedPeer::AnyHub {
            domain: record.domain.clone(),
        },
        vec![ALPN_H2.to_vec()],
    )?;
    let peer_tls = Arc::new(peer_tls);

    // Raft.
    let backend =
        RedbBackend::open(files.raft_db()).map_err(|e| StartError::Store(e.to_string()))?;
    let node = crate::raft::start(
        record.node_id,
        raft_config(cfg.raft)?,
        Arc::new(backend),
        Arc::new(TlsChannels(peer_tls.clone())),
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let raft = node.raft.clone();
    let state = node.state_machine.state();
    let applied = node.state_machine.applied_index();
    let hub = Hub::new(
        record.node_id,
        raft.clone(),
        state,
        applied,
        peer_tls.clone(),
        cfg.timeouts,
    );

    // Listeners.
    let authz = authz::Authz::new(record.domain.clone());
    let raft_authz = authz.clone();
    let raft_svc = RaftService::new(raft.clone())
        .with_sessions(hub.sessions().clone())
        .into_server()
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let revocations = hub.clone();
    let raft_svc = tonic::service::interceptor::InterceptedService::new(
        raft_svc,
        move |req: tonic::Request<()>| {
            let caller = raft_authz.require_hub(&req)?;
            // A removed node keeps a valid certificate; the replicated
            // deny-list is what keeps it out.
            if revocations.local(|s| s.is_revoked(pb::RevocationKind::Hub, &caller.to_string())) {
                metrics::rejected("revoked");
                return Err(tonic::Status::permission_denied(format!(
                    "hub/{caller} was removed from the cluster and is revoked"
                )));
            }
            Ok(req)
        },
    );
    let admin_svc = AdminServer::new(admin::AdminService::new(hub.clone(), authz))
        .max_decoding_message_size(MAX_ADMIN_MESSAGE);
    let uplink = crate::uplink::server::start(
        hub.clone(),
        hub.applied_watch(),
        uplink_tls,
        uplink_listen,
        cfg.uplink_options.clone(),
    )?;
    let uplink_addr = uplink.local_addr();
    record.uplink = Some(uplink_addr.to_string());
    let enrol_svc = EnrolmentServer::new(crate::uplink::enrol::EnrolmentService::new(
        hub.clone(),
        cfg.uplink_options.pop_cert_validity,
        vec![uplink_addr.to_string()],
    ))
    .max_decoding_message_size(crate::uplink::enrol::MAX_ENROL_MESSAGE);
    let incoming = tls_accept::incoming(grpc_listener, Arc::new(server_tls));
    let grpc_task = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(count_status))
            .add_service(raft_svc)
            .add_service(admin_svc)
            .add_service(enrol_svc)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });
    let http_router = http::router(hub.clone(), prom);
    let http_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, http_router).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    let mut tasks = vec![grpc_task, http_task];

    // First start of a bootstrap node: form the single-node cluster and
    // write the federation into it.
    if let (
        StartMode::Bootstrap {
            domain,
            admin_config,
        },
        Some(ca),
    ) = (&mode, ca_for_bootstrap)
    {
        let mut members = std::collections::BTreeMap::new();
        members.insert(record.node_id, HubNode::new(advertise.clone()));
        raft.initialize(members)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        hub.propose(pb::Command {
            kind: Some(Kind::InitFederation(pb::InitFederation {
                federation: Some(pb::Federation {
                    domain: domain.clone(),
                    ca_cert_pem: ca.cert_pem().to_string(),
                    ca_key_pem: ca.key_pem(),
                }),
            })),
        })
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let op = ca.issue(
            &SpiffeId::operator(domain, "admin")?,
            OPERATOR_CERT_VALIDITY,
        )?;
        AdminConfig {
            hubs: vec![advertise.clone()],
            domain: domain.clone(),
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: op.cert_pem,
            key_pem: op.key_pem,
        }
        .write(admin_config)
        .map_err(|e| StartError::DataDir {
            dir: admin_config.clone(),
            message: e,
        })?;
    }
    if let StartMode::Join { addr, .. } = &mode {
        // Now that we serve with our certificate, ask to become a voter.
        let mut client =
            AdminClient::new(hub.peer_channel(addr).map_err(|e| StartError::Join {
                addr: addr.clone(),
                message: e.to_string(),
            })?);
        client
            .add_hub(pb::AddHubRequest {
                id: record.node_id,
                addr: advertise.clone(),
            })
            .await
            .map_err(|s| StartError::Join {
                addr: addr.clone(),
                message: s.message().to_string(),
            })?;
    }
    files.save_record(&record)?;
    tasks.push(tokio::spawn(announce_uplink(
        hub.clone(),
        uplink_addr.to_string(),
    )));
    tracing::info!(node = record.node_id, grpc = %grpc_addr, http = %http_addr, uplink = %uplink_addr, "hub node serving");
    Ok(RunningHub {
        hub,
        grpc_addr,
        http_addr,
        uplink_addr,
        uplink,
        tasks,
    })
}

/// Counts gRPC error responses by code (refusals in the codec, such as an
/// oversized or malformed message, never reach a handler).
fn count_status<B>(resp: ::http::Response<B>) -> ::http::Response<B> {
    if let Some(code) = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
    {
        if code != "0" {
            let message = resp
                .headers()
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("");
            let reason = code
                .parse()
                .ok()
                .and_then(|c| metrics::rejection_reason(c, message));
            if let Some(r) = reason {
                metrics::rejected(r);
            }
            ::metrics::counter!(metrics::GRPC_RESPONSES, "code" => code.to_string()).increment(1);
        }
    }
    resp
}

async fn join_cluster(
    files: &NodeFiles,
    addr: &str,
    token: &str,
    node_id: u64,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    advertise: &str,
) -> Result<NodeRecord, StartError> {
    let jerr = |message: String| StartError::Join {
        addr: addr.to_string(),
        message,
    };
    let parsed =
        switchyard_pki::JoinToken::parse(token).map_err(|e| jerr(format!("bad token: {e}")))?;
    // Pin the CA from the token before sending its secret anywhere.
    let tls =
        switchyard_pki::ca_pinned_client_config(&parsed.ca_fingerprint(), vec![ALPN_H2.to_vec()])?;
    let channel = channel::tls_channel(addr, Arc::new(tls)).map_err(|e| jerr(e.to_string()))?;
    let mut client = AdminClient::new(channel);
    let fed = client
        .federation(pb::Empty {})
        .await
        .map_err(|s| jerr(s.message().to_string()))?
        .into_inner();
    let domain = fed.domain;
    let node_id = match node_id {
        0 if fed.next_node_id == 0 => {
            return Err(jerr(
                "this hub does not assign node ids (an older version): give --node-id N".into(),
            ))
        }
        0 => fed.next_node_id,
        n => n,
    };
    let (csr_pem, key_pem) = switchyard_pki::generate_csr(&SpiffeId::hub(&domain, node_id)?)?;
    let resp = client
        .join(pb::JoinRequest {
            token: token.to_string(),
            node_id,
            addr: advertise.to_string(),
            csr_pem,
        })
        .await
        .map_err(|s| jerr(s.message().to_string()))?
        .into_inner();
    files.write_tls(&resp.ca_cert_pem, &resp.cert_pem, &key_pem)?;
    Ok(NodeRecord {
        node_id,
        domain: resp.domain,
        listen: grpc_addr.to_string(),
        http: http_addr.to_string(),
        advertise: advertise.to_string(),
        uplink: None,
    })
}

/// Records this node's uplink address in the replicated state (retrying
/// while there is no leader), so enrolment can list every node.
async fn announce_uplink(hub: Hub, addr: String) {
    let id = hub.id();
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        if hub.local(|s| s.hub_uplinks.get(&id) == Some(&addr)) {
            return;
        }
        let cmd = pb::Command {
            kind: Some(Kind::SetHubUplink(pb::SetHubUplink {
                uplink: Some(pb::HubUplink {
                    node: id,
                    addr: addr.clone(),
                }),
            })),
        };
        match hub.propose(cmd).await {
            Ok(r) if r.error == 0 => return,
            Ok(r) => tracing::warn!(message = r.message, "uplink address refused"),
            Err(e) => tracing::debug!(error = %e, "uplink address not recorded yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

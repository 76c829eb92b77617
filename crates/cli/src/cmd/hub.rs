//! `switchyard hub`: run a hub node; `hub members`: manage the cluster.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use switchyard_hub::{
    node::Timeouts,
    server::{self, HubConfig, RaftTimings, StartMode},
};
use switchyard_proto::pb;

use super::Global;
use crate::{client, output};

/// Run a hub node. First node: `--bootstrap --domain D`. More nodes:
/// `--join ADDR --token T --node-id N` with a token from
/// `switchyard token create --hub`. Later starts need only `--data-dir`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubArgs {
    #[command(subcommand)]
    pub members: Option<HubSub>,
    /// Create a new federation with this node as its first member.
    #[arg(long, requires = "domain")]
    pub bootstrap: bool,
    /// Trust domain of a new federation (e.g. `example.org`); with --bootstrap.
    #[arg(long)]
    pub domain: Option<String>,
    /// gRPC address of a member to join through.
    #[arg(long, requires = "token", conflicts_with = "bootstrap")]
    pub join: Option<String>,
    /// Hub join token (`switchyard token create --hub`).
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// This node's id: a number >= 1, unique in the hub cluster (bootstrap
    /// is 1). With --join it may be left out: the cluster then gives the
    /// lowest id it never used.
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Data directory: Raft store, certificates, node record.
    #[arg(long, default_value = "/var/lib/switchyard/hub")]
    pub data_dir: PathBuf,
    /// gRPC listen address (Raft and admin API); port 0 picks a free port.
    /// Default: the recorded one on restart, else 127.0.0.1:7400.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// HTTP listen address: the status page (/), /api/status, /healthz, /readyz, /metrics.
    /// Default: the recorded one on restart, else 127.0.0.1:7401.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// QUIC uplink listen address (UDP) for POP agents.
    /// Default: the recorded one on restart, else 127.0.0.1:7402.
    #[arg(long)]
    pub uplink: Option<SocketAddr>,
    /// Address other nodes and operators dial (default: the bound gRPC address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where --bootstrap writes the operator credential file.
    #[arg(long)]
    pub admin_config: Option<PathBuf>,
    /// Longest a write waits for commit before failing unacknowledged.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Raft election timeout lower bound in milliseconds (upper = 2x).
    #[arg(long, default_value_t = 500)]
    pub election_ms: u64,
    /// Write the bound addresses as JSON to this file once serving (for scripts).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Serve the global DNS zone (UDP and TCP) on this address: gateway
    /// addresses of healthy POPs, ordered for the client's POP (see
    /// docs/dns.md). Port 0 picks a free port (written to --ready-file as
    /// "dns"). Needs --global-zone.
    #[arg(long, requires = "global_zone")]
    pub dns: Option<SocketAddr>,
    /// The global zone, e.g. `global.example.com.`: `<svc>.<ns>.<zone>`
    /// answers with POP gateway addresses.
    #[arg(long, requires = "dns")]
    pub global_zone: Option<String>,
    /// Per-source limit on global zone answers over UDP (answers per
    /// second, burst twice that). Default: unlimited.
    #[arg(long, requires = "dns")]
    pub dns_rate_limit: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum HubSub {
    /// Hub cluster membership.
    #[command(subcommand)]
    Members(MembersCmd),
}

#[derive(Debug, Subcommand)]
pub enum MembersCmd {
    /// List hub nodes, their role and replication progress.
    List,
    /// Remove a hub node (it is also revoked and cannot rejoin with its certificate).
    Remove {
        /// Node id.
        id: u64,
    },
}

pub async fn run(g: &Global, a: HubArgs) -> Result<()> {
    if let Some(HubSub::Members(m)) = a.members {
        return members(g, m).await;
    }
    let mode = if a.bootstrap {
        let domain = a.domain.clone().context("--bootstrap needs --domain")?;
        switchyard_pki::SpiffeId::hub(&domain, 1)
            .context("--domain must be a DNS name such as example.org")?;
        StartMode::Bootstrap {
            domain,
            admin_config: a
                .admin_config
                .clone()
                .unwrap_or_else(|| a.data_dir.join("admin.toml")),
        }
    } else if let Some(addr) = &a.join {
        let Some(token) = a.token.clone() else {
            bail!("--join needs --token T (from `switchyard token create --hub`)");
        };
        let node_id = a.node_id.unwrap_or(0);
        StartMode::Join {
            addr: addr.clone(),
            token,
            node_id,
        }
    } else {
        StartMode::Restart
    };
    let fresh = !a.data_dir.join("node.toml").exists();
    let default_listen = |port| fresh.then(|| SocketAddr::from(([127, 0, 0, 1], port)));
    let cfg = HubConfig {
        data_dir: a.data_dir.clone(),
        listen: a.listen.or(default_listen(7400)),
        http: a.http.or(default_listen(7401)),
        advertise: a.advertise.clone(),
        mode: mode.clone(),
        timeouts: Timeouts {
            write: a.write_timeout,
            ..Timeouts::default()
        },
        raft: RaftTimings {
            heartbeat_ms: a.heartbeat_ms,
            election_min_ms: a.election_ms,
            election_max_ms: a.election_ms * 2,
        },
        uplink: a.uplink.or(default_listen(7402)),
        uplink_options: Default::default(),
    };
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create data dir {}", a.data_dir.display()))?;
    let running = server::start(cfg)
        .await
        .context("hub node failed to start")?;
    let global_dns = match (a.dns, &a.global_zone) {
        (Some(listen), Some(zone)) => Some(
            switchyard_hub::global_dns::start(
                running.hub.clone(),
                switchyard_hub::global_dns::GlobalDnsConfig {
                    zone: zone.clone(),
                    listen,
                    rate_limit: a.dns_rate_limit,
                },
            )
            .await
            .context("global DNS zone failed to start")?,
        ),
        _ => None,
    };
    let mut info = serde_json::json!({
        "node_id": running.hub.id(),
        "grpc": running.grpc_addr.to_string(),
        "http": running.http_addr.to_string(),
        "uplink": running.uplink_addr.to_string(),
        "pid": std::process::id(),
    });
    if let (Some(d), Some(m)) = (&global_dns, info.as_object_mut()) {
        m.insert("dns".into(), serde_json::json!(d.local_addr().to_string()));
    }
    if let Some(p) = &a.ready_file {
        std::fs::write(p, info.to_string())
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    eprintln!(
        "hub node {} serving: gRPC {}  HTTP {}",
        running.hub.id(),
        running.grpc_addr,
        running.http_addr
    );
    if let StartMode::Bootstrap { admin_config, .. } = &mode {
        eprintln!(
            "operator credentials: {}\n  export SWITCHYARD_CONFIG={}\n  switchyard status",
            admin_config.display(),
            admin_config.display()
        );
    }
    wait_for_signal().await;
    eprintln!("stopping hub node {}", running.hub.id());
    if let Some(d) = global_dns {
        d.shutdown();
    }
    running.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn members(g: &Global, m: MembersCmd) -> Result<()> {
    let mut admin = client::connect(g.config.as_ref()).await?;
    let addr = admin.addr.clone();
    match m {
        MembersCmd::List => {
            let r = admin
                .client
                .list_members(pb::Empty {})
                .await
                .map_err(|s| client::status_err(&addr, s))?
                .into_inner();
            match g.output {
                output::Format::Json => output::json(&serde_json::json!({
                    "leader_id": r.leader_id,
                    "members": r.members.iter().map(member_json).collect::<Vec<_>>(),
                })),
                output::Format::Table => member_table(&r.members),
            }
        }
        MembersCmd::Remove { id } => {
            let r = admin
                .client
                .remove_member(pb::RemoveMemberRequest { id })
                .await
                .map_err(|s| client::status_err(&addr, s))?
                .into_inner();
            println!("removed hub node {id} (log index {})", r.index);
        }
    }
    Ok(())
}

/// One hub member as JSON.
pub fn member_json(m: &pb::Member) -> serde_json::Value {
    serde_json::json!({
        "id": m.id, "addr": m.addr, "voter": m.voter,
        "leader": m.leader, "matched_index": m.matched_index,
    })
}

/// Hub members as a table.
pub fn member_table(members: &[pb::Member]) {
    let role = |m: &pb::Member| {
        if m.leader {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        }
    };
    output::table(
        &["HUB", "ADDRESS", "ROLE", "MATCHED"],
        &members
            .iter()
            .map(|m| {
                vec![
                    m.id.to_string(),
                    m.addr.clone(),
                    role(m).into(),
                    m.matched_index.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

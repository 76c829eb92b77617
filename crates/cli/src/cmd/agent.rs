//! `switchyard agent`: run a POP agent.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use switchyard_agent::run::{self as agent, AgentConfig};

use super::Global;

/// Run a POP agent: enrol with a join token on first start, export this
/// POP's services to the hub over QUIC, and keep the POP's decision table
/// (served from disk when no hub is reachable).
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  first start (enrols; the token is spent):
    switchyard agent --hub HUB:7400 --token K10... --data-dir /var/lib/switchyard/agent \\
      --services /etc/switchyard/services.toml
  later starts (certificate, key and hub addresses are in the data dir):
    switchyard agent --data-dir /var/lib/switchyard/agent --services /etc/switchyard/services.toml")]
pub struct AgentArgs {
    /// Hub gRPC address(es) to enrol through (`host:port`, comma-separated);
    /// the QUIC uplink addresses come from the hub's answer.
    #[arg(long, value_delimiter = ',')]
    pub hub: Vec<String>,
    /// POP join token (`switchyard token create --pop NAME`); needed only
    /// on the first start (or to re-enrol after the certificate expired).
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory: agent.toml, tls/ (certificate, key 0600, CA),
    /// view.lkg (last-known-good view), export_seq.
    #[arg(long, default_value = "/var/lib/switchyard/agent")]
    pub data_dir: PathBuf,
    /// Services file (TOML, see docs/services-file.md), reloaded on change.
    /// Without it the agent exports nothing and changes no exports.
    #[arg(long)]
    pub services: Option<PathBuf>,
    /// HTTP listen address (/healthz, /readyz, /metrics, /debug/view); port
    /// 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http: SocketAddr,
    /// QUIC uplink address(es) of hub nodes (`host:port`, comma-separated),
    /// instead of those the hub announced at enrolment; stored for later
    /// starts.
    #[arg(long, value_delimiter = ',')]
    pub uplink_addr: Vec<String>,
    /// How long the first export waits for every endpoint's first probe.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub first_export_grace: Duration,
    /// Write the bound HTTP address, POP and pid as JSON to this file once
    /// serving (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Serve DNS (UDP and TCP) for `clusterset.local.` on this address,
    /// e.g. 127.0.0.1:53: MCS names built from this POP's view (see
    /// docs/dns.md). Port 0 picks a free port (written to --ready-file as
    /// "dns"). Off by default.
    #[arg(long)]
    pub dns: Option<SocketAddr>,
}

pub async fn run(_g: &Global, a: AgentArgs) -> Result<()> {
    let cfg = AgentConfig {
        data_dir: a.data_dir.clone(),
        hub_grpc: a
            .hub
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        uplink_override: a
            .uplink_addr
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        token: a.token.clone().filter(|t| !t.trim().is_empty()),
        services: a.services.clone(),
        http: a.http,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        first_export_grace: a.first_export_grace,
        dns: a.dns,
        ..AgentConfig::default()
    };
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create data dir {}", a.data_dir.display()))?;
    let running = agent::start(cfg).await.context("agent failed to start")?;
    let mut info = serde_json::json!({
        "pop": running.record.pop,
        "domain": running.record.domain,
        "http": running.http_addr.to_string(),
        "uplink": running.record.hub_quic,
        "pid": std::process::id(),
    });
    if let (Some(addr), Some(m)) = (running.dns_addr, info.as_object_mut()) {
        m.insert("dns".into(), serde_json::json!(addr.to_string()));
    }
    if let Some(p) = &a.ready_file {
        std::fs::write(p, info.to_string())
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    eprintln!(
        "agent for POP {} ({}) serving: HTTP {}",
        running.record.pop, running.record.domain, running.http_addr
    );
    super::hub::wait_for_signal().await;
    eprintln!("stopping agent for POP {}", running.record.pop);
    running.shutdown().await;
    Ok(())
}

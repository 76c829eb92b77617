//! `switchyard agent`: run a POP agent.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Args;
use switchyard_agent::run::{self as agent, AgentConfig};

use super::gateway::{self, AgentLink, GatewayOpts};
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
    switchyard agent --data-dir /var/lib/switchyard/agent --services /etc/switchyard/services.toml
  with this POP's gateway in the same process (VIP listeners, QUIC tunnels):
    switchyard agent --data-dir /var/lib/switchyard/agent --gateway --tunnel 0.0.0.0:7403
  serving the local API for a separate `switchyard gateway` process:
    switchyard agent --data-dir /var/lib/switchyard/agent --gateway-api 127.0.0.1:7481")]
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
    /// serving (for scripts and tests); with --gateway, rewritten with the
    /// gateway's tunnel address and VIP listeners once it runs.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Serve the local gateway API (view stream, gateway certificates, RTT
    /// reports) for `switchyard gateway` on this address, e.g.
    /// 127.0.0.1:7481. Plain text: keep it on loopback. Callers present
    /// the secret in DATA_DIR/gateway-api.secret (0600). Off by default.
    #[arg(long)]
    pub gateway_api: Option<SocketAddr>,
    /// Serve DNS (UDP and TCP) for `clusterset.local.` on this address,
    /// e.g. 127.0.0.1:53: MCS names built from this POP's view (see
    /// docs/dns.md). Port 0 picks a free port (written to --ready-file as
    /// "dns"). Off by default.
    #[arg(long)]
    pub dns: Option<SocketAddr>,
    /// Per-source limit on DNS answers over UDP (answers per second, burst
    /// twice that; queries over it are dropped). Default: unlimited.
    #[arg(long, requires = "dns")]
    pub dns_rate_limit: Option<u32>,
    /// Run this POP's gateway inside the agent process (same code as
    /// `switchyard gateway`; the gateway options below apply).
    #[arg(long)]
    pub gateway: bool,
    #[command(flatten)]
    pub gateway_opts: GatewayOpts,
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
        gateway_api: a.gateway_api,
        dns: a.dns,
        dns_rate_limit: a.dns_rate_limit,
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
    if let (Some(addr), Some(m)) = (running.gateway_api_addr, info.as_object_mut()) {
        m.insert("gateway_api".into(), serde_json::json!(addr.to_string()));
    }
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
    // The embedded gateway waits for its certificate (a hub must answer
    // once), so it starts beside the agent, not before it is ready.
    let mut embedded = a.gateway.then(|| {
        let link = AgentLink::Embedded(running.gateway.clone());
        let view = running.gateway.watch_view();
        let opts = a.gateway_opts.clone();
        let ready = a.ready_file.clone().zip(info.as_object().cloned());
        tokio::spawn(async move { gateway::start(link, &opts, view, ready).await })
    });
    let mut gateway = None;
    let failed = loop {
        tokio::select! {
            _ = super::hub::wait_for_signal() => break None,
            r = async {
                match embedded.as_mut() {
                    Some(t) => t.await,
                    None => std::future::pending().await,
                }
            }, if embedded.is_some() => {
                embedded = None;
                match r {
                    Ok(Ok(g)) => {
                        eprintln!("gateway {} serving: tunnel {} (announced as {})",
                            a.gateway_opts.instance, g.running.tunnel_addr, g.advertise);
                        gateway = Some(g);
                    }
                    Ok(Err(e)) => break Some(e),
                    Err(e) => break Some(anyhow::anyhow!("gateway task failed: {e}")),
                }
            }
        }
    };
    eprintln!("stopping agent for POP {}", running.record.pop);
    if let Some(t) = embedded {
        t.abort();
    }
    if let Some(g) = gateway {
        g.shutdown().await;
    }
    running.shutdown().await;
    match failed {
        Some(e) => Err(e.context("the embedded gateway stopped")),
        None => Ok(()),
    }
}

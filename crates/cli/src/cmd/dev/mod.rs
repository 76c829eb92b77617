//! `switchyard dev`: a federation on loopback, for trying Switchyard out.
//!
//! Today it runs the hub cluster (1, 3 or 5 nodes in this process); POP
//! agents, DNS and gateways join it as their parts land.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use switchyard_hub::{
    node::Timeouts,
    server::{self, HubConfig, RaftTimings, RunningHub, StartMode},
};
use switchyard_proto::pb;

use super::{hub::wait_for_signal, Global};
use crate::client;

/// Run a whole federation on loopback.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// State directory (kept between runs; delete it to start afresh).
    #[arg(long, default_value = ".switchyard-dev")]
    pub dir: PathBuf,
    /// Hub nodes (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    pub hubs: u32,
}

pub async fn run(_g: &Global, a: DevArgs) -> Result<()> {
    if ![1, 3, 5].contains(&a.hubs) {
        bail!("--hubs must be 1, 3 or 5 (a Raft cluster needs an odd size)");
    }
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let admin_config = dir.join("admin.toml");
    let mut nodes: Vec<RunningHub> = Vec::new();
    for i in 1..=a.hubs as u64 {
        let data_dir = dir.join(format!("hub-{i}"));
        std::fs::create_dir_all(&data_dir)?;
        let fresh = !data_dir.join("node.toml").exists();
        let mode = if !fresh {
            StartMode::Restart
        } else if i == 1 {
            StartMode::Bootstrap {
                domain: "dev.switchyard.local".into(),
                admin_config: admin_config.clone(),
            }
        } else {
            let mut admin = client::connect(Some(&admin_config)).await?;
            let token = admin
                .client
                .create_token(pb::CreateTokenRequest {
                    kind: pb::TokenKind::Hub as i32,
                    ..Default::default()
                })
                .await
                .map_err(|s| client::status_err(&admin.addr, s))?
                .into_inner()
                .token;
            StartMode::Join {
                addr: nodes[0].grpc_addr.to_string(),
                token,
                node_id: i,
            }
        };
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let running = server::start(HubConfig {
            data_dir,
            listen: fresh.then_some(loopback),
            http: fresh.then_some(loopback),
            advertise: None,
            mode,
            timeouts: Timeouts::default(),
            raft: RaftTimings::default(),
            uplink: fresh.then_some(loopback),
            uplink_options: Default::default(),
        })
        .await
        .with_context(|| format!("hub node {i} failed to start"))?;
        nodes.push(running);
    }
    // The bootstrap wrote one address; list every node for failover.
    if let Ok(mut cfg) = server::AdminConfig::read(&admin_config) {
        cfg.hubs = nodes.iter().map(|n| n.grpc_addr.to_string()).collect();
        cfg.write(&admin_config).map_err(anyhow::Error::msg)?;
    }
    let hubs: Vec<_> = nodes
        .iter()
        .map(|n| {
            json!({"id": n.hub.id().to_string(), "admin": n.grpc_addr.to_string(),
                   "http": n.http_addr.to_string(), "pid": std::process::id()})
        })
        .collect();
    let info = json!({"config": admin_config.display().to_string(), "hubs": hubs, "pops": []});
    std::fs::write(dir.join("dev.json"), serde_json::to_string_pretty(&info)?)?;
    println!(
        "Switchyard dev federation: {} hub node(s), state in {}",
        nodes.len(),
        dir.display()
    );
    for n in &nodes {
        println!(
            "  hub {}  gRPC {}  http://{}/metrics",
            n.hub.id(),
            n.grpc_addr,
            n.http_addr
        );
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "switchyard".into());
    println!("\nTry, in another shell:");
    println!("  export SWITCHYARD_CONFIG={}", admin_config.display());
    println!("  {exe} status");
    println!("  {exe} token create --pop north-1 --region north --zone n1");
    println!("  {exe} pop add north-1 --region north && {exe} pop list -o json");
    println!("  {exe} hub members list");
    println!(
        "\nCtrl-C stops everything. Details for scripts: {}",
        dir.join("dev.json").display()
    );
    wait_for_signal().await;
    println!("stopping");
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

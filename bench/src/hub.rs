//! A self-contained launcher for an N-node Switchyard hub on loopback, and
//! operator clients to it (mutual TLS, as every admin call).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use switchyard_hub::server::{channel::tls_channel, AdminConfig, ALPN_H2};
use switchyard_pki::ExpectedPeer;
use switchyard_proto::pb::{self, admin_client::AdminClient};
use tonic::transport::Channel;

use crate::proc::{ProcSample, ServerProc};

/// Trust domain of the bench federation.
pub const DOMAIN: &str = "bench.example";

/// How long a node may take to write its ready file or join.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running hub cluster; dropping it kills every node.
pub struct HubCluster {
    /// The node processes, node id = index + 1.
    pub nodes: Vec<ServerProc>,
    /// gRPC addresses, same order as `nodes`.
    pub grpc: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
}

#[derive(serde::Deserialize)]
struct Ready {
    grpc: String,
}

impl HubCluster {
    /// Starts node 1 with `--bootstrap`, then joins nodes 2..=n one by one
    /// with hub join tokens, and waits until all n are voters with a leader.
    pub async fn start(bin: &Path, root: &Path, n: usize) -> Result<Self> {
        let mut nodes = Vec::new();
        let mut grpc = Vec::new();
        let dir1 = root.join("hub-1");
        let mut cmd = node_cmd(bin, &dir1)?;
        cmd.args(["--bootstrap", "--domain", DOMAIN]);
        nodes.push(ServerProc::spawn(
            "switchyard-1",
            cmd,
            &root.join("hub-1.log"),
        )?);
        let Some(first) = nodes.last_mut() else {
            bail!("no hub node started");
        };
        grpc.push(wait_ready(first, &dir1.join("ready.json")).await?);

        let admin = AdminConfig::read(&dir1.join("admin.toml"))
            .map_err(|e| anyhow!("cannot read the operator credentials: {e}"))?;
        let tls = switchyard_pki::client_config(
            Some((&admin.cert_pem, &admin.key_pem)),
            &admin.ca_pem,
            ExpectedPeer::AnyHub {
                domain: admin.domain.clone(),
            },
            vec![ALPN_H2.to_vec()],
        )
        .context("operator credentials in admin.toml are unusable")?;
        let mut cluster = Self {
            nodes,
            grpc,
            tls: Arc::new(tls),
        };

        for id in 2..=n {
            let token = cluster
                .client(&cluster.grpc[0])?
                .create_token(pb::CreateTokenRequest {
                    kind: pb::TokenKind::Hub as i32,
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow!("creating a hub join token failed: {}", s.message()))?
                .into_inner()
                .token;
            let dir = root.join(format!("hub-{id}"));
            let mut cmd = node_cmd(bin, &dir)?;
            cmd.args(["--join", &cluster.grpc[0], "--node-id", &id.to_string()])
                .env("SWITCHYARD_TOKEN", token);
            let mut p = ServerProc::spawn(
                &format!("switchyard-{id}"),
                cmd,
                &root.join(format!("hub-{id}.log")),
            )?;
            let addr = wait_ready(&mut p, &dir.join("ready.json")).await;
            cluster.nodes.push(p);
            cluster.grpc.push(addr?);
            cluster.wait_voters(id).await?;
        }
        Ok(cluster)
    }

    /// An operator client to `addr` on its own HTTP/2 connection (dialled
    /// on first use).
    pub fn client(&self, addr: &str) -> Result<AdminClient<Channel>> {
        let ch = tls_channel(addr, self.tls.clone())
            .with_context(|| format!("bad hub address {addr}"))?;
        Ok(AdminClient::new(ch))
    }

    /// The leader's gRPC address, from `ListMembers`.
    pub async fn leader_addr(&self) -> Result<String> {
        let members = self
            .client(&self.grpc[0])?
            .list_members(pb::Empty {})
            .await
            .map_err(|s| anyhow!("list members failed: {}", s.message()))?
            .into_inner();
        members
            .members
            .iter()
            .find(|m| m.leader || m.id == members.leader_id)
            .map(|m| m.addr.clone())
            .ok_or_else(|| anyhow!("the hub has no leader"))
    }

    /// RSS and CPU of every node.
    pub fn sample(&mut self) -> Result<Vec<ProcSample>> {
        self.nodes
            .iter_mut()
            .map(|p| {
                p.check_alive()?;
                p.sample()
            })
            .collect()
    }

    async fn wait_voters(&mut self, n: usize) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            for p in &mut self.nodes {
                p.check_alive()?;
            }
            match self.client(&self.grpc[0])?.list_members(pb::Empty {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let voters = r.members.iter().filter(|m| m.voter).count();
                    if voters >= n && r.leader_id != 0 {
                        return Ok(());
                    }
                    last = format!("{voters} voters, leader {}", r.leader_id);
                }
                Err(s) => last = s.message().to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the hub did not reach {n} voters in {START_TIMEOUT:?} (last: {last})")
    }
}

fn node_cmd(bin: &Path, dir: &Path) -> Result<Command> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("hub")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--uplink",
            "127.0.0.1:0",
        ])
        .arg("--ready-file")
        .arg(dir.join("ready.json"))
        // The default (info) log level; no per-write lines are expected.
        .env_remove("RUST_LOG");
    Ok(cmd)
}

async fn wait_ready(p: &mut ServerProc, file: &PathBuf) -> Result<String> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        p.check_alive()?;
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Ok(r) = serde_json::from_str::<Ready>(&text) {
                return Ok(r.grpc);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} wrote no ready file in {START_TIMEOUT:?}; log: {}",
        p.name,
        p.log.display()
    )
}

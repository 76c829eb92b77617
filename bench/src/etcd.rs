//! A launcher for an N-member etcd cluster on loopback (plain HTTP, default
//! durability: etcd fsyncs its WAL before acknowledging), and clients.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use tonic::transport::{Channel, Endpoint};

use crate::{
    etcdpb::{kv_client::KvClient, maintenance_client::MaintenanceClient, StatusRequest},
    free_ports,
    proc::{ProcSample, ServerProc},
};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds `etcd` on PATH.
pub fn find_etcd() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "etcd is not on PATH: install the Debian package etcd-server \
                 (apt-get install -y etcd-server) and run again"
            )
        })
}

/// `etcd --version`, first line.
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A running etcd cluster; dropping it kills every member.
pub struct EtcdCluster {
    /// Member processes.
    pub members: Vec<ServerProc>,
    /// Client URLs (`127.0.0.1:port`), same order.
    pub client_addrs: Vec<String>,
}

impl EtcdCluster {
    /// Starts `n` members with a static initial cluster and waits until
    /// every member reports the same leader.
    pub async fn start(bin: &Path, root: &Path, n: usize) -> Result<Self> {
        let ports = free_ports(2 * n)?;
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i]);
        let client = |i: usize| format!("127.0.0.1:{}", ports[2 * i + 1]);
        let initial = (0..n)
            .map(|i| format!("etcd-{}={}", i + 1, peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("etcd-{}", i + 1);
            let dir = root.join(&name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let mut cmd = Command::new(bin);
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&dir)
                .arg("--listen-peer-urls")
                .arg(peer(i))
                .arg("--initial-advertise-peer-urls")
                .arg(peer(i))
                .arg("--listen-client-urls")
                .arg(format!("http://{}", client(i)))
                .arg("--advertise-client-urls")
                .arg(format!("http://{}", client(i)))
                .arg("--initial-cluster")
                .arg(&initial)
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "hub-vs-etcd",
                    "--logger",
                    "zap",
                ])
                // Debian's etcd reads ETCD_* settings from the environment.
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default());
            members.push(ServerProc::spawn(
                &name,
                cmd,
                &root.join(format!("{name}.log")),
            )?);
        }
        let mut cluster = Self {
            members,
            client_addrs: (0..n).map(client).collect(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            for m in &mut cluster.members {
                m.check_alive()?;
            }
            match cluster.statuses().await {
                Ok(s)
                    if s.iter()
                        .all(|(_, leader)| *leader != 0 && *leader == s[0].1) =>
                {
                    return Ok(cluster)
                }
                Ok(s) => last = format!("{s:?}"),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("etcd did not elect a leader in {START_TIMEOUT:?} (last: {last})")
    }

    /// (member id, leader id) as each member reports it.
    async fn statuses(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for addr in &self.client_addrs {
            let ch = channel(addr).await?;
            let s = MaintenanceClient::new(ch)
                .status(StatusRequest {})
                .await
                .map_err(|s| anyhow!("etcd {addr} status: {}", s.message()))?
                .into_inner();
            let id = s.header.map(|h| h.member_id).unwrap_or_default();
            out.push((id, s.leader));
        }
        Ok(out)
    }

    /// The leader's client address.
    pub async fn leader_addr(&self) -> Result<String> {
        let s = self.statuses().await?;
        s.iter()
            .position(|(id, leader)| id == leader)
            .map(|i| self.client_addrs[i].clone())
            .ok_or_else(|| anyhow!("etcd has no leader: {s:?}"))
    }

    /// A KV client to `addr` on its own HTTP/2 connection.
    pub async fn client(&self, addr: &str) -> Result<KvClient<Channel>> {
        Ok(KvClient::new(channel(addr).await?))
    }

    /// RSS and CPU of every member.
    pub fn sample(&mut self) -> Result<Vec<ProcSample>> {
        self.members
            .iter_mut()
            .map(|p| {
                p.check_alive()?;
                p.sample()
            })
            .collect()
    }
}

async fn channel(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {addr}"))
}

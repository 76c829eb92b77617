//! Harness for process tests and benchmarks: real `switchyard hub` processes
//! on loopback.
//!
//! [`Cluster::start`] bootstraps node 1 in a temporary directory, joins
//! nodes 2..=n with hub join tokens, lists every node in the operator
//! credential file (`admin.toml`) and waits until all are voters and ready.
//! Nodes are addressed by their Raft node id (1-based). Every child process
//! is killed when the [`Cluster`] is dropped, also when a test panics; on a
//! panic the tail of each node's log is printed to stderr.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use switchyard_tests::Cluster;
//! let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/switchyard");
//! let mut c = Cluster::start(&bin, 3).await?;
//! let leader = c.leader().await?;
//! c.kill(leader)?;
//! c.restart(leader).await?;
//! let text = c.metrics(1).await?;
//! # let _ = text; Ok(()) }
//! ```

pub mod agent;
pub mod gateway;

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message as _;
use switchyard_hub::{
    server::{channel::tls_channel, AdminConfig, ALPN_H2},
    store::{Backend, RedbBackend, StateMachineStore},
};
use switchyard_pki::{CertificateAuthority, ExpectedPeer};
use switchyard_proto::pb::{self, admin_client::AdminClient};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;

/// Longest a node may take to come up (write its ready file), or a cluster
/// to form, or a leader to be elected. Generous: CI machines are slow.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Longest one admin call made by the harness may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a cluster is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// Trust domain of the federation.
    pub domain: String,
    /// Extra arguments for every `switchyard hub` start (bootstrap, join and
    /// restart), e.g. `["--write-timeout", "2s"]`.
    pub hub_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            domain: "test.switchyard.local".into(),
            hub_args: Vec::new(),
        }
    }
}

/// One hub node process.
#[derive(Debug)]
pub struct Node {
    /// Raft node id (1 is the bootstrap node).
    pub id: u64,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its gRPC address (Raft and admin API); kept across restarts.
    pub grpc: SocketAddr,
    /// Its HTTP address (`/healthz`, `/readyz`, `/metrics`).
    pub http: SocketAddr,
    /// Its QUIC uplink address for POP agents; kept across restarts.
    pub uplink: SocketAddr,
    /// Its stdout and stderr (appended across restarts).
    pub log: PathBuf,
    ready_file: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// The node's ready file as JSON (`dns` is there with `--dns`).
    pub fn ready_json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&fs::read_to_string(
            &self.ready_file,
        )?)?)
    }

    /// True while the process runs (it was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, if started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A hub cluster of real `switchyard` processes on loopback.
pub struct Cluster {
    // Declared before `dir`: nodes are killed before their files go.
    nodes: Vec<Node>,
    bin: PathBuf,
    opts: Options,
    admin_config: PathBuf,
    dir: TempDir,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir.path())
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_now();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!(
                    "---- hub node {} log (last lines) ----\n{}",
                    n.id,
                    log_tail(&n.log, 40)
                );
            }
        }
    }
}

/// The JSON a node writes to its `--ready-file` once serving.
#[derive(Debug, Clone)]
struct ReadyInfo {
    node_id: u64,
    grpc: SocketAddr,
    http: SocketAddr,
    uplink: SocketAddr,
}

fn parse_ready(text: &str) -> Option<ReadyInfo> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(ReadyInfo {
        node_id: v.get("node_id")?.as_u64()?,
        grpc: v.get("grpc")?.as_str()?.parse().ok()?,
        http: v.get("http")?.as_str()?.parse().ok()?,
        uplink: v.get("uplink")?.as_str()?.parse().ok()?,
    })
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

const LOOPBACK_ANY: &str = "127.0.0.1:0";

impl Cluster {
    /// Starts a cluster of `nodes` hub nodes (1, 3 or 5) from the binary
    /// `bin` with default [`Options`].
    pub async fn start(bin: &Path, nodes: usize) -> Result<Cluster> {
        Self::start_with(bin, nodes, Options::default()).await
    }

    /// Starts a cluster of `nodes` hub nodes with `opts`: bootstrap node 1,
    /// join the others one by one, list all in `admin.toml`, then wait until
    /// every node is a voter and answers `/readyz` with 200.
    pub async fn start_with(bin: &Path, nodes: usize, opts: Options) -> Result<Cluster> {
        if nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        let dir = tempfile::Builder::new()
            .prefix("switchyard-test-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let admin_config = dir.path().join("admin.toml");
        let mut c = Cluster {
            nodes: Vec::new(),
            bin: bin.to_path_buf(),
            opts,
            admin_config,
            dir,
        };
        let boot = vec![
            "--bootstrap".to_string(),
            "--domain".into(),
            c.opts.domain.clone(),
            "--admin-config".into(),
            c.admin_config.display().to_string(),
        ];
        c.add_node(1, boot).await?;
        for id in 2..=nodes as u64 {
            let token = c
                .admin_client(1)?
                .create_token(pb::CreateTokenRequest {
                    kind: pb::TokenKind::Hub as i32,
                    ttl_ms: 600_000,
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow!("creating a hub join token: {s}"))?
                .into_inner()
                .token;
            // No --node-id: the cluster gives the lowest unused id, which
            // add_node checks is `id`.
            let args = vec![
                "--join".to_string(),
                c.nodes[0].grpc.to_string(),
                "--token".into(),
                token,
            ];
            c.add_node(id, args).await?;
        }
        // The bootstrap wrote only node 1; list every node so the CLI
        // fails over when one is down.
        let mut cfg = c.admin_cfg()?;
        cfg.hubs = c.nodes.iter().map(|n| n.grpc.to_string()).collect();
        cfg.write(&c.admin_config).map_err(anyhow::Error::msg)?;
        c.wait_voters(nodes).await?;
        c.wait_all_ready().await?;
        Ok(c)
    }

    async fn add_node(&mut self, id: u64, mode_args: Vec<String>) -> Result<()> {
        let data_dir = self.dir.path().join(format!("hub-{id}"));
        fs::create_dir_all(&data_dir)?;
        let mut node = Node {
            id,
            log: self.dir.path().join(format!("hub-{id}.log")),
            ready_file: self.dir.path().join(format!("hub-{id}.ready.json")),
            data_dir,
            grpc: ([127, 0, 0, 1], 0).into(),
            http: ([127, 0, 0, 1], 0).into(),
            uplink: ([127, 0, 0, 1], 0).into(),
            child: None,
        };
        let mut args = mode_args;
        // Every address on port 0 so tests run in parallel; restarts reuse
        // the recorded ones.
        args.extend(
            [
                "--listen",
                LOOPBACK_ANY,
                "--http",
                LOOPBACK_ANY,
                "--uplink",
                LOOPBACK_ANY,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        self.spawn(&mut node, args)?;
        // Pushed before waiting: a failed start is still cleaned up.
        self.nodes.push(node);
        let idx = self.nodes.len() - 1;
        let info = wait_ready_file(&mut self.nodes[idx]).await?;
        if info.node_id != id {
            bail!("node started as {} but {id} was asked", info.node_id);
        }
        self.nodes[idx].grpc = info.grpc;
        self.nodes[idx].http = info.http;
        self.nodes[idx].uplink = info.uplink;
        Ok(())
    }

    fn spawn(&self, node: &mut Node, args: Vec<String>) -> Result<()> {
        let _ = fs::remove_file(&node.ready_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.bin)
            .arg("hub")
            .args(&args)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--ready-file")
            .arg(&node.ready_file)
            .args(&self.opts.hub_args)
            .env("RUST_LOG", "info,openraft=warn,h2=warn,tower=warn")
            .env("NO_COLOR", "1")
            .env_remove("SWITCHYARD_CONFIG")
            .env_remove("SWITCHYARD_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    fn idx(&self, id: u64) -> Result<usize> {
        let i = (id as usize).wrapping_sub(1);
        if i >= self.nodes.len() {
            bail!("no hub node {id} (the cluster has {})", self.nodes.len());
        }
        Ok(i)
    }

    /// Every node's gRPC address, comma-separated (for `agent --hub`).
    pub fn grpc_addrs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.grpc.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's QUIC uplink address, comma-separated (for
    /// `agent --uplink-addr`).
    pub fn uplink_addrs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.uplink.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id` (1-based).
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node(&self, id: u64) -> &Node {
        match self.idx(id) {
            Ok(i) => &self.nodes[i],
            Err(e) => panic!("{e}"),
        }
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if the cluster has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node ids, 1..=len.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Ids of the nodes whose process runs.
    pub fn running(&mut self) -> Vec<u64> {
        self.nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then_some(n.id))
            .collect()
    }

    /// The operator credential file, listing every node.
    pub fn admin_config(&self) -> &Path {
        &self.admin_config
    }

    /// The cluster's temporary directory (data dirs, logs, admin.toml).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The federation's trust domain.
    pub fn domain(&self) -> &str {
        &self.opts.domain
    }

    /// The `switchyard` binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The parsed operator credentials.
    pub fn admin_cfg(&self) -> Result<AdminConfig> {
        AdminConfig::read(&self.admin_config).map_err(anyhow::Error::msg)
    }

    /// The federation CA certificate (PEM).
    pub fn ca_pem(&self) -> Result<String> {
        Ok(self.admin_cfg()?.ca_pem)
    }

    /// A client TLS configuration that trusts the federation CA and expects
    /// a hub, presenting `identity` (`(cert_pem, key_pem)`) if given.
    pub fn client_tls(&self, identity: Option<(&str, &str)>) -> Result<rustls::ClientConfig> {
        Ok(switchyard_pki::client_config(
            identity,
            &self.ca_pem()?,
            ExpectedPeer::AnyHub {
                domain: self.opts.domain.clone(),
            },
            vec![ALPN_H2.to_vec()],
        )?)
    }

    /// A (lazy) gRPC channel to node `id` over `tls`.
    pub fn channel(&self, id: u64, tls: rustls::ClientConfig) -> Result<Channel> {
        let addr = self.nodes[self.idx(id)?].grpc.to_string();
        Ok(tls_channel(&addr, Arc::new(tls))?)
    }

    /// An admin client to node `id` with the operator credentials.
    pub fn admin_client(&self, id: u64) -> Result<AdminClient<Channel>> {
        let cfg = self.admin_cfg()?;
        let tls = self.client_tls(Some((&cfg.cert_pem, &cfg.key_pem)))?;
        Ok(AdminClient::new(self.channel(id, tls)?))
    }

    /// `Status` of node `id` (bounded by [`CALL_TIMEOUT`]).
    pub async fn status(&self, id: u64) -> Result<pb::StatusResponse> {
        let mut c = self.admin_client(id)?;
        match tokio::time::timeout(CALL_TIMEOUT, c.status(pb::Empty {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(anyhow!("status of hub node {id}: {s}")),
            Err(_) => Err(anyhow!("status of hub node {id}: no answer")),
        }
    }

    /// The id of the current leader: a running node that reports itself
    /// leader. Waits up to [`DEADLINE`] for an election.
    pub async fn leader(&mut self) -> Result<u64> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < DEADLINE {
            for id in self.running() {
                match self.status(id).await {
                    Ok(s) if s.leader_id == id && s.state == "Leader" => return Ok(id),
                    Ok(s) => last = format!("node {id}: {} leader {}", s.state, s.leader_id),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no leader within {DEADLINE:?} ({last})")
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let i = self.idx(id)?;
        self.nodes[i].kill_now();
        Ok(())
    }

    /// The replicated state as stopped node `id` left it on disk: its
    /// last snapshot with every logged command after it applied (right for
    /// a one-node cluster, whose logged entries are all committed).
    pub async fn stopped_state(&self, id: u64) -> Result<switchyard_hub::state::State> {
        let n = &self.nodes[self.idx(id)?];
        if n.child.is_some() {
            bail!("hub node {id} is running: stop it first");
        }
        let path = n.data_dir.join("raft.redb");
        let backend = Arc::new(
            RedbBackend::open(&path).map_err(|e| anyhow!("opening {}: {e}", path.display()))?,
        );
        let sm = StateMachineStore::open(backend.clone())
            .await
            .map_err(|e| anyhow!("opening the state machine: {e}"))?;
        let from = sm.applied().last_applied.map_or(0, |l| l.index);
        let mut state = sm.read(|s| s.clone());
        let entries = backend
            .scan(switchyard_hub::store::backend::Table::Log, &[], None)
            .map_err(|e| anyhow!("scanning the log: {e}"))?;
        for (_, v) in entries {
            let e = pb::Entry::decode(v.as_slice())?;
            let index = e.log_id.as_ref().map_or(0, |l| l.index);
            if index <= from {
                continue;
            }
            if let Some(pb::entry::Payload::Command(c)) = e.payload {
                state.apply(index, &c);
            }
        }
        Ok(state)
    }

    /// Stops node `id` with SIGTERM and waits for it to exit.
    pub async fn stop(&mut self, id: u64) -> Result<()> {
        let i = self.idx(id)?;
        let Some(pid) = self.nodes[i].pid() else {
            return Ok(());
        };
        send_sigterm(pid)?;
        let start = Instant::now();
        loop {
            let Some(child) = self.nodes[i].child.as_mut() else {
                return Ok(());
            };
            if child.try_wait()?.is_some() {
                self.nodes[i].child = None;
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                self.nodes[i].kill_now();
                bail!("hub node {id} did not exit within {DEADLINE:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts node `id` again from its data dir (same addresses) and waits
    /// until it serves (not until it is ready: with a majority down it
    /// never is; see [`Cluster::wait_ready`]).
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        let i = self.idx(id)?;
        if self.nodes[i].is_running() {
            bail!("hub node {id} is still running");
        }
        let mut node = std::mem::replace(
            &mut self.nodes[i],
            Node {
                id,
                data_dir: PathBuf::new(),
                grpc: ([127, 0, 0, 1], 0).into(),
                http: ([127, 0, 0, 1], 0).into(),
                uplink: ([127, 0, 0, 1], 0).into(),
                log: PathBuf::new(),
                ready_file: PathBuf::new(),
                child: None,
            },
        );
        let spawned = self.spawn(&mut node, Vec::new());
        self.nodes[i] = node;
        spawned?;
        let info = wait_ready_file(&mut self.nodes[i]).await?;
        let n = &self.nodes[i];
        if info.grpc != n.grpc || info.http != n.http || info.uplink != n.uplink {
            bail!(
                "hub node {id} came back on {} / {} instead of {} / {}",
                info.grpc,
                info.http,
                n.grpc,
                n.http
            );
        }
        Ok(())
    }

    /// Waits until node `id` answers `/readyz` with 200.
    pub async fn wait_ready(&self, id: u64) -> Result<()> {
        let http = self.nodes[self.idx(id)?].http;
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < DEADLINE {
            match http_get(http, "/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {}", body.trim()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("hub node {id} not ready within {DEADLINE:?}: {last}")
    }

    /// Waits until every running node is ready.
    pub async fn wait_all_ready(&mut self) -> Result<()> {
        for id in self.running() {
            self.wait_ready(id).await?;
        }
        Ok(())
    }

    /// Waits until node 1's membership holds `n` voters.
    async fn wait_voters(&self, n: usize) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < DEADLINE {
            match self.status(1).await {
                Ok(s) if s.members.len() == n && s.members.iter().all(|m| m.voter) => return Ok(()),
                Ok(s) => last = format!("{:?}", s.members),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("cluster did not reach {n} voters within {DEADLINE:?}: {last}")
    }

    /// `GET /metrics` of node `id` (Prometheus text).
    pub async fn metrics(&self, id: u64) -> Result<String> {
        let http = self.nodes[self.idx(id)?].http;
        match http_get(http, "/metrics").await? {
            (200, body) => Ok(body),
            (code, body) => bail!("/metrics of hub node {id}: {code} {body}"),
        }
    }

    /// Runs the `switchyard` CLI with `--config admin.toml` and `args`.
    pub async fn run_cli<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.admin_config)
            .args(args)
            .env_remove("SWITCHYARD_CONFIG")
            .kill_on_drop(true);
        match tokio::time::timeout(DEADLINE, cmd.output()).await {
            Ok(r) => Ok(r?),
            Err(_) => bail!("switchyard CLI did not finish within {DEADLINE:?}"),
        }
    }

    /// Runs the CLI and fails unless it exits 0; returns its standard
    /// output.
    pub async fn run_cli_ok<I, S>(&self, args: I) -> Result<Vec<u8>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.run_cli(&args).await?;
        if !out.status.success() {
            bail!(
                "switchyard {:?} failed: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// The federation CA with its private key, as someone holding node
    /// `id`'s disk would get it: stops the node, reads the CA from its Raft
    /// store (snapshot, else the log), and starts it again (waiting until
    /// it serves). For tests that need certificates of other roles.
    pub async fn federation_ca(&mut self, id: u64) -> Result<CertificateAuthority> {
        self.stop(id).await?;
        let path = self.nodes[self.idx(id)?].data_dir.join("raft.redb");
        let read = read_federation(&path).await;
        self.restart(id).await?;
        let fed = read?;
        Ok(CertificateAuthority::from_pem_with_domain(
            &fed.ca_cert_pem,
            &fed.ca_key_pem,
            &fed.domain,
        )?)
    }
}

async fn read_federation(path: &Path) -> Result<pb::Federation> {
    let backend =
        Arc::new(RedbBackend::open(path).map_err(|e| anyhow!("opening {}: {e}", path.display()))?);
    let sm = StateMachineStore::open(backend.clone())
        .await
        .map_err(|e| anyhow!("opening the state machine: {e}"))?;
    if let Some(f) = sm.read(|s| s.federation.clone()) {
        return Ok(f);
    }
    let entries = backend
        .scan(switchyard_hub::store::backend::Table::Log, &[], None)
        .map_err(|e| anyhow!("scanning the log: {e}"))?;
    for (_, v) in entries {
        let e = pb::Entry::decode(v.as_slice())?;
        if let Some(pb::entry::Payload::Command(pb::Command {
            kind: Some(pb::command::Kind::InitFederation(init)),
        })) = e.payload
        {
            if let Some(f) = init.federation {
                return Ok(f);
            }
        }
    }
    bail!("no federation in {}", path.display())
}

async fn wait_ready_file(node: &mut Node) -> Result<ReadyInfo> {
    let start = Instant::now();
    loop {
        if let Ok(text) = fs::read_to_string(&node.ready_file) {
            if let Some(info) = parse_ready(&text) {
                return Ok(info);
            }
        }
        let exited = match node.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => bail!("hub node {} was not started", node.id),
        };
        if let Some(status) = exited {
            node.child = None;
            bail!(
                "hub node {} exited ({status}) before serving:\n{}",
                node.id,
                log_tail(&node.log, 20)
            );
        }
        if start.elapsed() > DEADLINE {
            bail!(
                "hub node {} did not serve within {DEADLINE:?}:\n{}",
                node.id,
                log_tail(&node.log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[allow(unsafe_code)]
fn send_sigterm(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own
    // child, not yet reaped (we hold its `Child`), so it is not reused.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    if r != 0 {
        bail!("kill({pid}, SIGTERM): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `dig @ADDR -p PORT <args>` (Debian `bind9-dnsutils`, installed by
/// scripts/test) and returns its standard output; a failed `dig` is an
/// error with its output.
pub async fn dig(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new("dig");
    cmd.arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+time=2", "+tries=2"])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("running dig (Debian bind9-dnsutils; scripts/test installs it)")?;
    if !out.status.success() {
        bail!(
            "dig {args:?} at {addr}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A minimal HTTP/1.1 GET over a TCP stream: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, anyhow::Error>(buf)
    };
    let buf = tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path}: no answer within {CALL_TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET http://{addr}{path}: malformed response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("GET http://{addr}{path}: no status line"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The sum of the samples of metric `name` whose labels include every
/// `(key, value)` in `labels` (0 if there is none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| lbls.split(',').any(|p| p == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `switchyard_hub_rejected_requests_total{reason}` in a metrics page.
pub fn rejected(text: &str, reason: &str) -> f64 {
    metric(
        text,
        switchyard_hub::metrics::REJECTED,
        &[("reason", reason)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_matching_series() {
        let t = "# HELP x\nswitchyard_hub_rejected_requests_total{reason=\"oversized\"} 2\n\
                 switchyard_hub_rejected_requests_total{reason=\"malformed\"} 1\nother 5\n";
        assert_eq!(rejected(t, "oversized"), 2.0);
        assert_eq!(rejected(t, "no_client_cert"), 0.0);
        assert_eq!(metric(t, "other", &[]), 5.0);
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}

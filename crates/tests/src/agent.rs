//! POP agent processes (`switchyard agent`) for process tests, with a tiny
//! TCP backend per POP so the agent's probes find its endpoint alive.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{http_get, log_tail, DEADLINE};

/// One `switchyard agent` process and its files.
#[derive(Debug)]
pub struct Agent {
    /// POP name.
    pub pop: String,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its HTTP address (changes on restart: `--http 127.0.0.1:0`).
    pub http: SocketAddr,
    /// Its log (appended across restarts).
    pub log: PathBuf,
    bin: PathBuf,
    services: PathBuf,
    hub_grpc: String,
    ready_file: PathBuf,
    child: Option<Child>,
    backend: Option<tokio::task::JoinHandle<()>>,
    /// More `switchyard agent` arguments (e.g. `--gateway`), on every start.
    extra_args: Vec<String>,
}

/// A TCP listener on 127.0.0.1:0 that accepts and closes connections: a
/// live endpoint for TCP probes. Aborting the task kills the endpoint.
pub async fn tcp_backend() -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let h = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    Ok((addr, h))
}

impl Agent {
    /// Enrols POP `pop` with `token` and starts its agent in `dir`,
    /// exporting each ClusterSetIP service `namespace/name` with a fresh
    /// [`tcp_backend`] as endpoint. Waits until the agent serves HTTP. The
    /// agent learns every hub node's uplink address from enrolment.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        pop: &str,
        token: &str,
        hub_grpc: &str,
        services: &[(&str, &str)],
    ) -> Result<Agent> {
        let (backend, handle) = tcp_backend().await?;
        let mut toml = String::new();
        for (ns, name) in services {
            toml.push_str(&format!(
                "[[services]]\nnamespace = \"{ns}\"\nname = \"{name}\"\n\
                 ports = [{{ port = {port} }}]\n\
                 endpoints = [{{ address = \"127.0.0.1\", port = {port} }}]\n\
                 [services.probe]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 200\n\n",
                port = backend.port()
            ));
        }
        let mut a = Self::start_with(bin, dir, pop, token, hub_grpc, &toml, &[]).await?;
        a.backend = Some(handle);
        Ok(a)
    }

    fn spawn(&mut self, token: Option<&str>) -> Result<()> {
        let _ = fs::remove_file(&self.ready_file);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("agent")
            .arg("--hub")
            .arg(&self.hub_grpc)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--services")
            .arg(&self.services)
            .arg("--http")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&self.ready_file)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("SWITCHYARD_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        cmd.args(&self.extra_args);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot run {}", self.bin.display()))?,
        );
        Ok(())
    }

    async fn wait_ready_file(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(text) = fs::read_to_string(&self.ready_file) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(h) = v
                        .get("http")
                        .and_then(|h| h.as_str())
                        .and_then(|h| h.parse().ok())
                    {
                        self.http = h;
                        return Ok(());
                    }
                }
            }
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "agent {} exited ({status}):\n{}",
                        self.pop,
                        log_tail(&self.log, 30)
                    );
                }
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "agent {} did not serve within {DEADLINE:?}:\n{}",
                    self.pop,
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like [`Agent::start`], with the services file's contents given
    /// (`services_toml`, see docs/services-file.md; no backend is started)
    /// and more `switchyard agent` arguments (`extra_args`, e.g.
    /// `--gateway --tunnel 127.0.0.1:0`), used on every start.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_with(
        bin: &Path,
        dir: &Path,
        pop: &str,
        token: &str,
        hub_grpc: &str,
        services_toml: &str,
        extra_args: &[String],
    ) -> Result<Agent> {
        let data_dir = dir.join(format!("agent-{pop}"));
        fs::create_dir_all(&data_dir)?;
        let services_file = dir.join(format!("services-{pop}.toml"));
        fs::write(&services_file, services_toml)?;
        let mut a = Agent {
            pop: pop.to_string(),
            http: ([127, 0, 0, 1], 0).into(),
            log: dir.join(format!("agent-{pop}.log")),
            ready_file: dir.join(format!("agent-{pop}.ready.json")),
            bin: bin.to_path_buf(),
            services: services_file,
            hub_grpc: hub_grpc.to_string(),
            data_dir,
            child: None,
            backend: None,
            extra_args: extra_args.to_vec(),
        };
        a.spawn(Some(token))?;
        a.wait_ready_file().await?;
        Ok(a)
    }

    /// The agent's ready file as JSON (with `--gateway`: also
    /// `gateway_tunnel` and `listeners` once the gateway runs).
    pub fn ready_json(&self) -> Result<serde_json::Value> {
        let text = fs::read_to_string(&self.ready_file)?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The agent's DNS address (`--dns`), from its ready file.
    pub fn dns_addr(&self) -> Result<SocketAddr> {
        let v = self.ready_json()?;
        v.get("dns")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
            .with_context(|| format!("agent {}: no \"dns\" in its ready file: {v}", self.pop))
    }

    /// Waits until the ready file satisfies `ok`; returns it.
    pub async fn wait_ready_json(
        &self,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Ok(v) = self.ready_json() {
                if ok(&v) {
                    return Ok(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "agent {}: {what} not in its ready file within {DEADLINE:?}\n{}",
            self.pop,
            log_tail(&self.log, 30)
        )
    }

    /// SIGKILL, as a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the agent.
    pub fn signal(&self, sig: i32) -> Result<()> {
        let Some(c) = &self.child else {
            bail!("agent {} is not running", self.pop);
        };
        let pid = i32::try_from(c.id())?;
        let r = unsafe_free_kill(pid, sig);
        if r != 0 {
            bail!("kill({pid}, {sig}) failed");
        }
        Ok(())
    }

    /// Starts the agent again from its data dir (no token).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("agent {} is still running", self.pop);
        }
        self.spawn(None)?;
        self.wait_ready_file().await
    }

    /// The agent's `/debug/view` as JSON (`Null` when it holds no view).
    pub async fn view(&self) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.http, "/debug/view").await?;
        if code != 200 {
            return Ok(serde_json::Value::Null);
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The POPs in each tier of service `ns/name` in this agent's view.
    pub async fn tiers(&self, ns: &str, name: &str) -> Result<Vec<Vec<String>>> {
        let v = self.view().await?;
        Ok(tiers_of(&v, ns, name))
    }

    /// Waits until the tiers of `ns/name` satisfy `ok`; returns them.
    pub async fn wait_tiers(
        &self,
        ns: &str,
        name: &str,
        what: &str,
        ok: impl Fn(&[Vec<String>]) -> bool,
    ) -> Result<Vec<Vec<String>>> {
        let start = Instant::now();
        let mut last = Vec::new();
        while start.elapsed() < DEADLINE {
            if let Ok(t) = self.tiers(ns, name).await {
                if ok(&t) {
                    return Ok(t);
                }
                last = t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "agent {}: {what} not seen within {DEADLINE:?}; last tiers {last:?}\n{}",
            self.pop,
            log_tail(&self.log, 20)
        )
    }
}

/// Creates a join token for `pop` in `region` with the CLI and starts its
/// agent in `dir`, exporting `services`.
pub async fn enrol(
    c: &crate::Cluster,
    dir: &Path,
    pop: &str,
    region: &str,
    services: &[(&str, &str)],
) -> Result<Agent> {
    let out = c
        .run_cli_ok(["token", "create", "--pop", pop, "--region", region])
        .await?;
    let token = String::from_utf8(out)?.trim().to_string();
    Agent::start(c.bin(), dir, pop, &token, &c.grpc_addrs(), services)
        .await
        .with_context(|| format!("cannot start the agent of {pop}"))
}

/// Creates POP `pop` in `region` with VIP range `vip_cidr` and a join token
/// for it with the CLI, and starts its agent with [`Agent::start_with`].
pub async fn enrol_with(
    c: &crate::Cluster,
    dir: &Path,
    pop: &str,
    region: &str,
    vip_cidr: &str,
    services_toml: &str,
    extra_args: &[String],
) -> Result<Agent> {
    c.run_cli_ok([
        "pop",
        "add",
        pop,
        "--region",
        region,
        "--vip-cidr",
        vip_cidr,
    ])
    .await?;
    let out = c
        .run_cli_ok(["token", "create", "--pop", pop, "--region", region])
        .await?;
    let token = String::from_utf8(out)?.trim().to_string();
    Agent::start_with(
        c.bin(),
        dir,
        pop,
        &token,
        &c.grpc_addrs(),
        services_toml,
        extra_args,
    )
    .await
    .with_context(|| format!("cannot start the agent of {pop}"))
}

/// A /24 VIP range picked at random in 127.78.0.0 - 127.120.255.0, so that
/// POPs of test clusters running at the same time (whose gateways bind
/// their VIPs on this machine's loopback) do not share addresses.
pub fn random_vip_cidr() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Mix time, pid and a counter (no RNG dependency); 43 * 256 blocks.
    let x = nanos
        .wrapping_mul(2_654_435_761)
        .wrapping_add(std::process::id().wrapping_mul(40_503))
        .wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(97));
    let block = x % (43 * 256);
    format!("127.{}.{}.0/24", 78 + block / 256, block % 256)
}

/// The POP names per tier of `ns/name` in a `/debug/view` document.
pub fn tiers_of(view: &serde_json::Value, ns: &str, name: &str) -> Vec<Vec<String>> {
    let Some(services) = view.get("services").and_then(|s| s.as_array()) else {
        return Vec::new();
    };
    services
        .iter()
        .filter(|s| s["namespace"] == ns && s["name"] == name)
        .flat_map(|s| s["tiers"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["pop"].as_str().map(str::to_string))
                .collect()
        })
        .collect()
}

fn unsafe_free_kill(pid: i32, sig: i32) -> i32 {
    // `kill(1)` keeps this crate free of `unsafe`.
    match Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
    {
        Ok(s) if s.success() => 0,
        _ => -1,
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if let Some(b) = self.backend.take() {
            b.abort();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent {} log (last lines) ----\n{}",
                self.pop,
                log_tail(&self.log, 30)
            );
        }
    }
}

//! The POPs of `switchyard dev`: which ones, what they export, and their
//! processes (an agent with DNS and gateway embedded, and a demo backend).
//! Each POP is real processes so `dev kill` is a real power cut.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// The demo service every POP exports.
pub const ECHO: (&str, &str) = ("echo", "demo");
/// The demo service only `north-1` and `south-1` export.
pub const LEDGER: (&str, &str) = ("ledger", "demo");
/// The port both demo services are offered on (at every POP's VIP).
pub const SERVICE_PORT: u16 = 8080;

/// How long a starting process may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One POP of the dev federation, before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopPlan {
    /// Name (also the DNS label in per-POP names).
    pub name: String,
    /// `region` label.
    pub region: String,
    /// `zone` label.
    pub zone: String,
    /// Services it exports, as (name, namespace).
    pub exports: Vec<(String, String)>,
}

/// The POPs of a federation of `n`: `north-1`, `north-2`, `south-1`, then
/// `south-2`, `east-1`, `east-2`, ... Every POP exports `echo.demo`;
/// `north-1` and `south-1` also export `ledger.demo`, so `north-2` reaches
/// it across POPs (north-1 first, same region) and fails over to south-1.
pub fn plan(n: usize) -> Vec<PopPlan> {
    const REGIONS: [&str; 4] = ["north", "south", "east", "west"];
    let mut names: Vec<(String, String, usize)> = Vec::new();
    // Two per region first (north-1, north-2, south-1, south-2, ...), then
    // round robin.
    for r in REGIONS {
        for k in 1..=2 {
            names.push((format!("{r}-{k}"), r.to_string(), k));
        }
    }
    let mut k = 3;
    while names.len() < n {
        for r in REGIONS {
            names.push((format!("{r}-{k}"), r.to_string(), k));
        }
        k += 1;
    }
    names
        .into_iter()
        .take(n)
        .map(|(name, region, k)| {
            let mut exports = vec![(ECHO.0.to_string(), ECHO.1.to_string())];
            if name == "north-1" || name == "south-1" {
                exports.push((LEDGER.0.to_string(), LEDGER.1.to_string()));
            }
            PopPlan {
                zone: format!("{}{k}", &region[..1]),
                name,
                region,
                exports,
            }
        })
        .collect()
}

/// One service as a POP offers it (in `dev.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceAt {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The service's VIP at this POP.
    pub vip: String,
    /// The service port on the VIP.
    pub port: u16,
}

/// A running (or killed) POP, as `dev.json` records it. The addresses are
/// kept so `dev revive` brings the POP back where it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PopRecord {
    /// Name.
    pub name: String,
    /// `region` and `zone`.
    pub labels: BTreeMap<String, String>,
    /// Agent HTTP (`/healthz`, `/metrics`, `/debug/view`).
    pub agent_http: String,
    /// The POP's DNS server (`clusterset.local`), UDP and TCP.
    pub dns: String,
    /// The gateway's QUIC tunnel address (UDP).
    pub gateway: String,
    /// Process ids: agent, demo backend (empty while killed).
    pub pids: Vec<u32>,
    /// Whether `dev kill` stopped it.
    pub killed: bool,
    /// Services offered at this POP's VIPs.
    pub services: Vec<ServiceAt>,
    /// Demo backend address per exported service (`name.namespace`).
    pub backends: BTreeMap<String, String>,
    /// The agent's data dir.
    pub data_dir: PathBuf,
    /// Logs of the agent and the backend.
    pub logs: Vec<PathBuf>,
}

/// The processes of one POP.
#[derive(Debug)]
pub struct PopProcs {
    /// The agent (DNS and gateway embedded).
    pub agent: Child,
    /// The demo backend.
    pub backend: Child,
}

impl PopProcs {
    /// SIGKILL both, as a power cut would, and reap them.
    pub async fn kill(mut self) {
        for c in [&mut self.agent, &mut self.backend] {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Which of them exited on their own, with their status.
    pub fn exited(&mut self) -> Vec<(&'static str, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (what, c) in [
            ("agent", &mut self.agent),
            ("demo backend", &mut self.backend),
        ] {
            if let Ok(Some(st)) = c.try_wait() {
                out.push((what, st));
            }
        }
        out
    }
}

// The one unsafe block of the CLI, proved sound where it stands.
#[allow(unsafe_code)]
fn command(exe: &Path, log: &Path) -> Result<Command> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let mut c = Command::new(exe);
    c.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed; prctl(2) is a plain system
    // call that allocates nothing and takes no locks. It makes the kernel
    // SIGKILL the child if `dev` dies without cleaning up (e.g. SIGKILL),
    // so no POP outlives the federation it belongs to.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(c)
}

/// Polls `path` until it holds JSON with every key in `keys`.
async fn wait_ready_file(
    path: &Path,
    keys: &[&str],
    child: &mut Child,
    log: &Path,
) -> Result<serde_json::Value> {
    let start = tokio::time::Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                if keys.iter().all(|k| !v[*k].is_null()) {
                    return Ok(v);
                }
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "{} exited ({st}) before it was ready; its log ends:\n{}",
                path.display(),
                tail(log, 15)
            );
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!(
                "not ready within {READY_TIMEOUT:?} ({} lacks {keys:?}); log {} ends:\n{}",
                path.display(),
                log.display(),
                tail(log, 15)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where one POP's files live under the dev dir.
pub fn pop_dir(dev_dir: &Path, pop: &str) -> PathBuf {
    dev_dir.join("pops").join(pop)
}

fn services_toml(exports: &[(String, String)], backends: &BTreeMap<String, String>) -> String {
    let mut s = String::from(
        "# Written by `switchyard dev`: this POP's demo services and their backends.\n",
    );
    for (name, ns) in exports {
        let key = format!("{name}.{ns}");
        let Some(addr) = backends.get(&key) else {
            continue;
        };
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "0"));
        s.push_str(&format!(
            "\n[[services]]\nnamespace = \"{ns}\"\nname = \"{name}\"\nports = [{{ port = {SERVICE_PORT} }}]\n\
             endpoints = [{{ address = \"{host}\", port = {port} }}]\n\
             probe = {{ kind = \"http\", path = \"/\", interval_ms = 500, timeout_ms = 300 }}\n"
        ));
    }
    s
}

/// What starting a POP needs besides its record.
#[derive(Debug, Clone)]
pub struct StartCtx {
    /// The `switchyard` binary.
    pub exe: PathBuf,
    /// Hub gRPC addresses (enrolment).
    pub hubs: Vec<String>,
}

/// Starts a POP's processes. `record` carries the addresses to reuse
/// (revive) or "127.0.0.1:0" (first start); `token` is needed only when the
/// data dir is not enrolled yet. Returns the record filled in.
pub async fn start(
    ctx: &StartCtx,
    dev_dir: &Path,
    plan: &PopPlan,
    mut record: PopRecord,
    token: Option<String>,
) -> Result<(PopRecord, PopProcs)> {
    let dir = pop_dir(dev_dir, &plan.name);
    std::fs::create_dir_all(&dir)?;

    // The demo backend first: the services file names its ports.
    let backend_log = dir.join("backend.log");
    let backend_ready = dir.join("backend.ready.json");
    let _ = std::fs::remove_file(&backend_ready);
    let mut b = command(&ctx.exe, &backend_log)?;
    b.args(["dev", "backend", "--pop", &plan.name, "--ready-file"])
        .arg(&backend_ready);
    let mut ports = Vec::new();
    for (name, ns) in &plan.exports {
        let key = format!("{name}.{ns}");
        b.args(["--serve", &key]);
        let port = record
            .backends
            .get(&key)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map_or(0, |a| a.port());
        ports.push(port.to_string());
    }
    b.args(["--port", &ports.join(",")]);
    let mut backend = b.spawn().context("cannot start the demo backend")?;
    let keys: Vec<String> = plan
        .exports
        .iter()
        .map(|(n, ns)| format!("{n}.{ns}"))
        .collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let bound = wait_ready_file(&backend_ready, &key_refs, &mut backend, &backend_log)
        .await
        .with_context(|| format!("demo backend of {}", plan.name))?;
    record.backends = keys
        .iter()
        .filter_map(|k| Some((k.clone(), bound[k].as_str()?.to_string())))
        .collect();
    let services = dir.join("services.toml");
    std::fs::write(&services, services_toml(&plan.exports, &record.backends))?;

    let agent_log = dir.join("agent.log");
    let agent_ready = dir.join("agent.ready.json");
    let _ = std::fs::remove_file(&agent_ready);
    let data_dir = dir.join("agent");
    let mut a = command(&ctx.exe, &agent_log)?;
    a.arg("agent")
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--services")
        .arg(&services)
        .args(["--hub", &ctx.hubs.join(",")])
        .args(["--http", &record.agent_http])
        .args(["--dns", &record.dns])
        .args(["--gateway", "--tunnel", &record.gateway])
        .arg("--ready-file")
        .arg(&agent_ready)
        .env_remove("SWITCHYARD_TOKEN");
    if let Some(t) = token {
        a.env("SWITCHYARD_TOKEN", t);
    }
    let mut agent = a.spawn().context("cannot start the agent")?;
    let ready = match wait_ready_file(
        &agent_ready,
        &["http", "dns", "gateway_tunnel"],
        &mut agent,
        &agent_log,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = backend.start_kill();
            let _ = agent.start_kill();
            return Err(e.context(format!("agent of {}", plan.name)));
        }
    };
    let field = |k: &str| ready[k].as_str().unwrap_or_default().to_string();
    record.agent_http = field("http");
    record.dns = field("dns");
    record.gateway = field("gateway_tunnel");
    record.pids = [agent.id(), backend.id()].into_iter().flatten().collect();
    record.killed = false;
    record.data_dir = data_dir;
    record.logs = vec![agent_log, backend_log];
    Ok((record, PopProcs { agent, backend }))
}

/// A record for a POP that never ran: every address picks a free port.
pub fn fresh_record(plan: &PopPlan) -> PopRecord {
    let any = "127.0.0.1:0".to_string();
    PopRecord {
        name: plan.name.clone(),
        labels: [
            ("region".to_string(), plan.region.clone()),
            ("zone".to_string(), plan.zone.clone()),
        ]
        .into(),
        agent_http: any.clone(),
        dns: any.clone(),
        gateway: any,
        pids: Vec::new(),
        killed: false,
        services: Vec::new(),
        backends: BTreeMap::new(),
        data_dir: PathBuf::new(),
        logs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_three_pops_are_the_documented_ones() {
        let p = plan(3);
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["north-1", "north-2", "south-1"]);
        assert_eq!((p[0].region.as_str(), p[0].zone.as_str()), ("north", "n1"));
        assert_eq!((p[2].region.as_str(), p[2].zone.as_str()), ("south", "s1"));
        let ledger = |p: &PopPlan| p.exports.iter().any(|(n, _)| n == "ledger");
        assert_eq!(
            p.iter().map(ledger).collect::<Vec<_>>(),
            [true, false, true]
        );
        let many = plan(12);
        let mut names: Vec<_> = many.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12, "names are unique");
    }

    #[test]
    fn services_file_points_at_the_backends() {
        let backends = [("echo.demo".to_string(), "127.0.0.1:4000".to_string())].into();
        let s = services_toml(&plan(1)[0].exports, &backends);
        assert!(
            s.contains("name = \"echo\"") && s.contains("port = 4000"),
            "{s}"
        );
        assert!(!s.contains("ledger"), "no backend, no export: {s}");
    }
}

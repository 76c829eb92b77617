//! `switchyard dev`: a whole federation on loopback, for trying Switchyard
//! out: a 3-node hub (in this process), three POPs (each an agent process
//! with DNS and gateway embedded, and a demo backend process) and two demo
//! services. `dev kill POP` / `dev revive POP` cut and restore a POP's
//! power through the running `dev` (see [`control`]).

mod backend;
mod control;
mod pops;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use switchyard_hub::{
    node::Timeouts,
    server::{self, HubConfig, RaftTimings, RunningHub, StartMode},
};
use switchyard_proto::pb;
use tokio::io::AsyncWriteExt;

use super::{hub::wait_for_signal, Global};
use crate::client;
use pops::{PopPlan, PopProcs, PopRecord};

/// The global DNS zone every dev hub node serves.
const GLOBAL_ZONE: &str = "global.dev.switchyard.local.";

/// Run a whole federation on loopback: hub nodes, POPs with agent, DNS,
/// gateway and demo backends. Ctrl-C stops everything it started.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  switchyard dev                          # 3 hub nodes, POPs north-1, north-2, south-1
  switchyard dev kill north-1             # power cut at north-1 (in another shell)
  switchyard dev revive north-1           # and back
  switchyard dev --dir /tmp/sy --pops 5   # elsewhere, bigger")]
pub struct DevArgs {
    /// State directory (kept between runs; delete it to start afresh).
    #[arg(long, default_value = ".switchyard-dev", global = true)]
    pub dir: PathBuf,
    /// Hub nodes (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    pub hubs: u32,
    /// POPs (1 to 32): north-1, north-2, south-1, south-2, east-1, ...
    #[arg(long, default_value_t = 3)]
    pub pops: usize,
    /// How long a POP that comes back stays out of other POPs' tiers
    /// (failback damping of the demo services).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub failback_after: Duration,
    #[command(subcommand)]
    pub cmd: Option<DevCmd>,
}

/// Acting on a running `switchyard dev`.
#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Cut a POP's power: SIGKILL its agent (with DNS and gateway) and its
    /// demo backend.
    Kill {
        /// The POP, e.g. north-1.
        pop: String,
    },
    /// Start a killed POP's processes again, on the same addresses.
    Revive {
        /// The POP, e.g. north-1.
        pop: String,
    },
    /// The demo backend process of one POP (started by `dev` itself).
    #[command(hide = true)]
    Backend(backend::BackendArgs),
}

pub async fn run(g: &Global, a: DevArgs) -> Result<()> {
    match a.cmd {
        None => run_federation(g, a).await,
        Some(DevCmd::Backend(b)) => backend::run(b).await,
        Some(DevCmd::Kill { ref pop }) => {
            let dir = std::fs::canonicalize(&a.dir)
                .with_context(|| format!("no dev dir {}", a.dir.display()))?;
            let msg = control::send(&dir, &control::Request::Kill(pop.clone())).await?;
            println!("{msg}");
            Ok(())
        }
        Some(DevCmd::Revive { ref pop }) => {
            let dir = std::fs::canonicalize(&a.dir)
                .with_context(|| format!("no dev dir {}", a.dir.display()))?;
            let msg = control::send(&dir, &control::Request::Revive(pop.clone())).await?;
            println!("{msg}");
            Ok(())
        }
    }
}

async fn run_federation(_g: &Global, a: DevArgs) -> Result<()> {
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
    // The global zone on every hub node: external clients' view.
    let mut global = Vec::new();
    for n in &nodes {
        let g = switchyard_hub::global_dns::start(
            n.hub.clone(),
            switchyard_hub::global_dns::GlobalDnsConfig {
                zone: GLOBAL_ZONE.into(),
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                rate_limit: None,
            },
        )
        .await
        .with_context(|| format!("global DNS zone of hub node {}", n.hub.id()))?;
        global.push(g);
    }
    let global_addrs: Vec<_> = global.iter().map(|g| g.local_addr()).collect();
    let result = run_pops(&a, &dir, &admin_config, &nodes, &global_addrs).await;
    println!("stopping");
    for g in global {
        g.shutdown();
    }
    for n in nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_file(control::socket_path(&dir));
    result
}

/// Everything `dev` runs besides the hub nodes, and what it reports.
struct Federation {
    dir: PathBuf,
    admin_config: PathBuf,
    hubs: Vec<serde_json::Value>,
    plans: Vec<PopPlan>,
    records: BTreeMap<String, PopRecord>,
    procs: BTreeMap<String, PopProcs>,
    ctx: pops::StartCtx,
}

impl Federation {
    /// Writes `DIR/dev.json` (atomically: scripts may read it any time).
    fn write_info(&self) -> Result<()> {
        let pops: Vec<_> = self
            .plans
            .iter()
            .filter_map(|p| self.records.get(&p.name))
            .collect();
        let info = json!({
            "config": self.admin_config.display().to_string(),
            "pid": std::process::id(),
            "hubs": self.hubs,
            "pops": pops,
        });
        let path = self.dir.join("dev.json");
        let tmp = self.dir.join("dev.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&info)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn plan(&self, pop: &str) -> Result<PopPlan, String> {
        self.plans
            .iter()
            .find(|p| p.name == pop)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<_> = self.plans.iter().map(|p| p.name.as_str()).collect();
                format!("no POP named {pop} (POPs: {})", names.join(", "))
            })
    }

    async fn kill(&mut self, pop: &str) -> Result<String, String> {
        self.plan(pop)?;
        let Some(procs) = self.procs.remove(pop) else {
            return Err(format!(
                "{pop} is not running (revive it with `dev revive {pop}`)"
            ));
        };
        procs.kill().await;
        if let Some(r) = self.records.get_mut(pop) {
            r.pids.clear();
            r.killed = true;
        }
        self.write_info().map_err(|e| e.to_string())?;
        Ok(format!(
            "{pop}: agent, DNS, gateway and demo backend killed (SIGKILL)"
        ))
    }

    async fn revive(&mut self, pop: &str) -> Result<String, String> {
        let plan = self.plan(pop)?;
        if self.procs.contains_key(pop) {
            return Err(format!("{pop} is already running"));
        }
        let record = self
            .records
            .get(pop)
            .cloned()
            .unwrap_or_else(|| pops::fresh_record(&plan));
        let (record, procs) = pops::start(&self.ctx, &self.dir, &plan, record, None)
            .await
            .map_err(|e| format!("{e:#}"))?;
        self.records.insert(pop.to_string(), record);
        self.procs.insert(pop.to_string(), procs);
        self.write_info().map_err(|e| e.to_string())?;
        Ok(format!(
            "{pop}: started again; it rejoins other POPs' tiers after failback damping"
        ))
    }
}

async fn run_pops(
    a: &DevArgs,
    dir: &std::path::Path,
    admin_config: &std::path::Path,
    nodes: &[RunningHub],
    global_dns: &[std::net::SocketAddr],
) -> Result<()> {
    if !(1..=32).contains(&a.pops) {
        bail!("--pops must be between 1 and 32");
    }
    let mut admin = client::connect(Some(&admin_config.to_path_buf())).await?;
    let addr = admin.addr.clone();
    // Short failback damping, so reviving a POP shows traffic returning
    // within seconds; per-POP DNS names.
    for (name, ns) in [pops::ECHO, pops::LEDGER] {
        admin
            .client
            .set_policy(pb::SetPolicyRequest {
                policy: Some(pb::TrafficPolicy {
                    service: Some(pb::ServiceKey {
                        namespace: ns.into(),
                        name: name.into(),
                    }),
                    failback_after_ms: u64::try_from(a.failback_after.as_millis())
                        .unwrap_or(u64::MAX),
                    // SRV answers name each tier's POPs, so `dig` shows
                    // failover as it happens.
                    per_pop_names: true,
                    ..Default::default()
                }),
            })
            .await
            .map_err(|s| client::status_err(&addr, s))?;
    }

    let exe = std::env::current_exe().context("cannot find the switchyard binary")?;
    let mut fed = Federation {
        dir: dir.to_path_buf(),
        admin_config: admin_config.to_path_buf(),
        hubs: nodes
            .iter()
            .zip(global_dns)
            .map(|(n, dns)| {
                json!({"id": n.hub.id().to_string(), "admin": n.grpc_addr.to_string(),
                       "http": n.http_addr.to_string(), "uplink": n.uplink_addr.to_string(),
                       "dns": dns.to_string(), "global_zone": GLOBAL_ZONE,
                       "pid": std::process::id()})
            })
            .collect(),
        plans: pops::plan(a.pops),
        records: BTreeMap::new(),
        procs: BTreeMap::new(),
        ctx: pops::StartCtx {
            exe: exe.clone(),
            hubs: nodes.iter().map(|n| n.grpc_addr.to_string()).collect(),
        },
    };
    for plan in fed.plans.clone() {
        let data_dir = pops::pop_dir(dir, &plan.name).join("agent");
        let token = if data_dir.join("agent.toml").exists() {
            None
        } else {
            let t = admin
                .client
                .create_token(pb::CreateTokenRequest {
                    kind: pb::TokenKind::Pop as i32,
                    pop: plan.name.clone(),
                    labels: Some(pb::Labels {
                        region: plan.region.clone(),
                        zone: plan.zone.clone(),
                        ..Default::default()
                    }),
                    ttl_ms: 0,
                })
                .await
                .map_err(|s| client::status_err(&addr, s))?
                .into_inner();
            Some(t.token)
        };
        print!("starting POP {} ... ", plan.name);
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let (record, procs) =
            pops::start(&fed.ctx, dir, &plan, pops::fresh_record(&plan), token).await?;
        println!("agent pid {}", record.pids.first().copied().unwrap_or(0));
        fed.records.insert(plan.name.clone(), record);
        fed.procs.insert(plan.name.clone(), procs);
    }
    wait_vips(&mut fed, &nodes[0]).await?;
    fed.write_info()?;
    print_intro(&fed, nodes, &exe);

    let sock = control::socket_path(dir);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            c = listener.accept() => {
                let Ok((mut stream, _)) = c else { continue };
                let answer = match control::read_request(&mut stream).await {
                    Ok(control::Request::Kill(p)) => fed.kill(&p).await,
                    Ok(control::Request::Revive(p)) => fed.revive(&p).await,
                    Err(e) => Err(e),
                };
                let line = match &answer {
                    Ok(m) => { println!("{m}"); format!("ok {m}\n") }
                    Err(e) => format!("error {e}\n"),
                };
                let _ = stream.write_all(line.as_bytes()).await;
            }
            _ = tick.tick() => {
                let mut died = Vec::new();
                for (pop, procs) in fed.procs.iter_mut() {
                    for (what, st) in procs.exited() {
                        eprintln!("{pop}: {what} exited on its own ({st}); see {}",
                            pops::pop_dir(dir, pop).display());
                        died.push(pop.clone());
                    }
                }
                for pop in died {
                    if let Some(p) = fed.procs.remove(&pop) {
                        p.kill().await;
                    }
                    if let Some(r) = fed.records.get_mut(&pop) {
                        r.pids.clear();
                        r.killed = true;
                    }
                    let _ = fed.write_info();
                }
            }
        }
    }
    for (_, p) in std::mem::take(&mut fed.procs) {
        p.kill().await;
    }
    for r in fed.records.values_mut() {
        r.pids.clear();
    }
    let _ = fed.write_info();
    Ok(())
}

/// Waits until the hub allocated every POP's VIP for every demo service
/// (exports commit, then VIPs exist everywhere) and fills the records.
async fn wait_vips(fed: &mut Federation, hub: &RunningHub) -> Result<()> {
    let wanted: Vec<(&str, &str)> = if fed.plans.iter().any(|p| p.exports.len() > 1) {
        vec![pops::ECHO, pops::LEDGER]
    } else {
        vec![pops::ECHO]
    };
    let start = tokio::time::Instant::now();
    loop {
        let found: BTreeMap<String, Vec<pops::ServiceAt>> = hub.hub.local(|s| {
            fed.plans
                .iter()
                .map(|p| {
                    let at = wanted
                        .iter()
                        .filter_map(|(name, ns)| {
                            let v =
                                s.vips
                                    .get(&(p.name.clone(), ns.to_string(), name.to_string()))?;
                            Some(pops::ServiceAt {
                                name: name.to_string(),
                                namespace: ns.to_string(),
                                vip: v.address.clone(),
                                port: pops::SERVICE_PORT,
                            })
                        })
                        .collect();
                    (p.name.clone(), at)
                })
                .collect()
        });
        if found.values().all(|v| v.len() == wanted.len()) {
            for (pop, services) in found {
                if let Some(r) = fed.records.get_mut(&pop) {
                    r.services = services;
                }
            }
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the POPs' exports did not reach the hub within 30 s (logs under {}/pops)",
                fed.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_intro(fed: &Federation, nodes: &[RunningHub], exe: &std::path::Path) {
    let exe = exe.display();
    println!(
        "\nSwitchyard dev federation: {} hub node(s), {} POP(s); state in {}\n",
        nodes.len(),
        fed.plans.len(),
        fed.dir.display()
    );
    for (n, h) in nodes.iter().zip(&fed.hubs) {
        println!(
            "  hub {}   gRPC {}   status page http://{}/   global DNS {}",
            n.hub.id(),
            n.grpc_addr,
            n.http_addr,
            h["dns"].as_str().unwrap_or("-")
        );
    }
    println!();
    for p in &fed.plans {
        let Some(r) = fed.records.get(&p.name) else {
            continue;
        };
        let services: Vec<String> = r
            .services
            .iter()
            .map(|s| format!("{}.{} {}:{}", s.name, s.namespace, s.vip, s.port))
            .collect();
        println!(
            "  POP {:<8} region {:<6} DNS {}   {}",
            p.name,
            p.region,
            r.dns,
            services.join("   ")
        );
    }
    let viewer = fed
        .records
        .get("north-2")
        .or_else(|| fed.records.values().next());
    println!("\nTry, in another shell:");
    println!("  export SWITCHYARD_CONFIG={}", fed.admin_config.display());
    if let Some(r) = viewer {
        let (host, port) = r.dns.rsplit_once(':').unwrap_or((&r.dns, "53"));
        println!(
            "  dig @{host} -p {port} +short SRV _8080._tcp.ledger.demo.svc.clusterset.local   # tiers at {}",
            r.name
        );
        println!(
            "  dig @{host} -p {port} +short ledger.demo.svc.clusterset.local                # its VIP there"
        );
        if let Some(s) = r.services.iter().find(|s| s.name == "ledger") {
            println!(
                "  curl -s http://{}:{}/                                  # ledger through {}'s gateway",
                s.vip, s.port, r.name
            );
        }
    }
    if let Some((host, port)) = fed
        .hubs
        .first()
        .and_then(|h| h["dns"].as_str()?.rsplit_once(':'))
    {
        println!(
            "  dig @{host} -p {port} +short ledger.demo.{GLOBAL_ZONE}   # global zone: healthy POPs' gateways"
        );
    }
    println!("  {exe} pop list");
    println!("  {exe} status");
    println!("  {exe} dev kill north-1      # then curl and dig again: traffic moves to south-1");
    println!("  {exe} dev revive north-1    # back after the failback delay (--failback-after)");
    if let Some(n) = nodes.first() {
        println!(
            "  open http://{}/            # the status page",
            n.http_addr
        );
    }
    println!(
        "\nCtrl-C stops everything. Details for scripts: {}",
        fed.dir.join("dev.json").display()
    );
}

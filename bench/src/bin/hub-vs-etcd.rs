//! `hub-vs-etcd`: hub write throughput and commit latency at 1, 16 and 256
//! concurrent clients on a 3-node Switchyard hub, next to a 3-member etcd
//! cluster driven by the same load, in the same invocation, with the RSS of
//! every server process. See `bench/README.md`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use switchyard_bench::{
    etcd::{self, EtcdCluster},
    hub::HubCluster,
    load::{run_level, LevelResult, Writer},
    proc::{cpu_seconds, ProcSample},
};

/// Hub writes vs etcd: throughput, p50/p99 commit latency and RSS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The `switchyard` binary to run the hub with.
    #[arg(long, default_value = "target/release/switchyard")]
    switchyard: PathBuf,
    /// Measured seconds per level and system.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent client counts (one level each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    clients: Vec<usize>,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Cluster size of both systems.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Parent of the temporary data directories (default: the system temp
    /// dir). It must be a real disk, not tmpfs, or fsync means nothing.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// One system at one level.
#[derive(Debug, Serialize)]
struct SystemLevel {
    #[serde(flatten)]
    load: LevelResult,
    /// RSS and CPU of each server process right after the level.
    procs: Vec<ProcSample>,
    /// Sum of RSS over the server processes, MiB.
    rss_sum_mib: f64,
    /// Server CPU time (all processes) per acknowledged write, ms.
    server_cpu_ms_per_write: f64,
    /// Bench client CPU time per acknowledged write, ms.
    client_cpu_ms_per_write: f64,
}

/// switchyard / etcd.
#[derive(Debug, Serialize)]
struct Ratios {
    writes_per_s: f64,
    p50: f64,
    p99: f64,
    rss_sum: f64,
    rss_max_process: f64,
    server_cpu_per_write: f64,
}

#[derive(Debug, Serialize)]
struct Level {
    clients: usize,
    switchyard: SystemLevel,
    etcd: SystemLevel,
    ratios: Ratios,
}

#[derive(Debug, Serialize)]
struct Report {
    cpus: usize,
    etcd_version: String,
    switchyard_bin: String,
    work_dir: String,
    seconds_per_level: u64,
    value_size: usize,
    nodes: usize,
    notes: Vec<String>,
    idle: Idle,
    levels: Vec<Level>,
    budget: Budget,
}

#[derive(Debug, Serialize)]
struct Idle {
    switchyard: Vec<ProcSample>,
    etcd: Vec<ProcSample>,
}

#[derive(Debug, Serialize)]
struct Budget {
    /// Required: switchyard writes/s >= this x etcd at every level.
    writes_ratio_min: f64,
    /// Required: switchyard RSS sum <= this x etcd after every level.
    rss_ratio_max: f64,
    /// Lowest writes/s ratio over the levels.
    worst_writes_ratio: f64,
    /// Highest RSS ratio over the levels.
    worst_rss_ratio: f64,
    writes_met: bool,
    rss_met: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.seconds == 0 || args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--seconds and every --clients value must be at least 1");
    }
    let etcd_bin = etcd::find_etcd()?;
    let sy_bin = std::fs::canonicalize(&args.switchyard).with_context(|| {
        format!(
            "switchyard binary {} not found: build it with `cargo build --release -p switchyard` or pass --switchyard PATH",
            args.switchyard.display()
        )
    })?;
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("hub-vs-etcd-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a temp dir in {}", parent.display()))?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install a SIGTERM handler")?;
    // On ctrl-c / SIGTERM the `run` future is dropped, which kills and
    // reaps every server process (ServerProc's Drop).
    let res = tokio::select! {
        r = run(&args, &etcd_bin, &sy_bin, tmp.path()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) => {
            let kept = tmp.keep();
            eprintln!("server logs and data kept in {}", kept.display());
            Err(e)
        }
    }
}

async fn run(args: &Args, etcd_bin: &Path, sy_bin: &Path, dir: &Path) -> Result<()> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let etcd_version = etcd::version(etcd_bin);
    eprintln!(
        "starting a {}-node switchyard hub ({}) and a {}-member etcd cluster ({etcd_version}) in {}",
        args.nodes,
        sy_bin.display(),
        args.nodes,
        dir.display()
    );
    let mut hub = HubCluster::start(sy_bin, &dir.join("switchyard"), args.nodes)
        .await
        .context("starting the switchyard hub")?;
    let mut etcd = EtcdCluster::start(etcd_bin, &dir.join("etcd"), args.nodes)
        .await
        .context("starting etcd")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Idle {
        switchyard: hub.sample()?,
        etcd: etcd.sample()?,
    };

    let value = Arc::new("v".repeat(args.value_size));
    let dur = Duration::from_secs(args.seconds);
    let mut levels = Vec::new();
    for &n in &args.clients {
        // Both systems at this level back to back, so slow drift in the
        // load of this shared machine hits both about equally.
        eprintln!("level {n}: switchyard ...");
        let leader = hub.leader_addr().await?;
        let writers = (0..n)
            .map(|_| hub.client(&leader).map(Writer::Hub))
            .collect::<Result<Vec<_>>>()?;
        let before = hub.sample()?;
        let c0 = cpu_seconds(std::process::id())?;
        let load = run_level(writers, &format!("l{n}"), value.clone(), dur).await?;
        let c1 = cpu_seconds(std::process::id())?;
        let sy = system_level(load, &before, hub.sample()?, c1 - c0);
        eprintln!(
            "  {:.0} writes/s, p99 {:.2} ms",
            sy.load.writes_per_s, sy.load.p99_ms
        );
        tokio::time::sleep(Duration::from_secs(1)).await;

        eprintln!("level {n}: etcd ...");
        let leader = etcd.leader_addr().await?;
        let mut writers = Vec::with_capacity(n);
        for _ in 0..n {
            writers.push(Writer::Etcd(etcd.client(&leader).await?));
        }
        let before = etcd.sample()?;
        let c0 = cpu_seconds(std::process::id())?;
        let load = run_level(writers, &format!("l{n}"), value.clone(), dur).await?;
        let c1 = cpu_seconds(std::process::id())?;
        let et = system_level(load, &before, etcd.sample()?, c1 - c0);
        eprintln!(
            "  {:.0} writes/s, p99 {:.2} ms",
            et.load.writes_per_s, et.load.p99_ms
        );
        tokio::time::sleep(Duration::from_secs(1)).await;

        let max_rss = |p: &[ProcSample]| p.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64;
        let ratios = Ratios {
            writes_per_s: sy.load.writes_per_s / et.load.writes_per_s,
            p50: sy.load.p50_ms / et.load.p50_ms,
            p99: sy.load.p99_ms / et.load.p99_ms,
            rss_sum: sy.rss_sum_mib / et.rss_sum_mib,
            rss_max_process: max_rss(&sy.procs) / max_rss(&et.procs),
            server_cpu_per_write: sy.server_cpu_ms_per_write / et.server_cpu_ms_per_write,
        };
        levels.push(Level {
            clients: n,
            switchyard: sy,
            etcd: et,
            ratios,
        });
    }

    let worst_writes = levels
        .iter()
        .map(|l| l.ratios.writes_per_s)
        .fold(f64::INFINITY, f64::min);
    let worst_rss = levels.iter().map(|l| l.ratios.rss_sum).fold(0.0, f64::max);
    let report = Report {
        cpus,
        etcd_version,
        switchyard_bin: sy_bin.display().to_string(),
        work_dir: dir.display().to_string(),
        seconds_per_level: args.seconds,
        value_size: args.value_size,
        nodes: args.nodes,
        notes: vec![
            format!("{cpus} CPUs, shared by the bench client and all 2x{} server processes; nothing pinned", args.nodes),
            "one HTTP/2 connection per client; writes go to the leader of each system".into(),
            "switchyard: gRPC over mutual TLS, PutPop upsert of a new POP (value in a label); redb Durability::Immediate on a majority".into(),
            "etcd: gRPC over plain HTTP on loopback (no TLS), KV/Put of a new key; default durability (WAL fsync on a majority)".into(),
        ],
        idle,
        budget: Budget {
            writes_ratio_min: 1.0,
            rss_ratio_max: 0.25,
            worst_writes_ratio: worst_writes,
            worst_rss_ratio: worst_rss,
            writes_met: worst_writes >= 1.0,
            rss_met: worst_rss <= 0.25,
        },
        levels,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        switchyard_bench::write_json(path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn system_level(
    load: LevelResult,
    before: &[ProcSample],
    after: Vec<ProcSample>,
    client_cpu_s: f64,
) -> SystemLevel {
    let server_cpu: f64 = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.cpu_s - b.cpu_s)
        .sum();
    let per_write = |s: f64| s * 1000.0 / load.writes.max(1) as f64;
    SystemLevel {
        rss_sum_mib: mib(after.iter().map(|s| s.rss_kib).sum()),
        server_cpu_ms_per_write: per_write(server_cpu),
        client_cpu_ms_per_write: per_write(client_cpu_s),
        procs: after,
        load,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn rss_list(p: &[ProcSample]) -> String {
    p.iter()
        .map(|s| format!("{:.1}", mib(s.rss_kib)))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn print_report(r: &Report) {
    println!(
        "hub-vs-etcd: {n}-node switchyard hub vs {n}-member etcd ({}), {} s per level, {}-byte values",
        r.etcd_version, r.seconds_per_level, r.value_size, n = r.nodes
    );
    for n in &r.notes {
        println!("  - {n}");
    }
    println!(
        "idle RSS MiB: switchyard {} | etcd {}",
        rss_list(&r.idle.switchyard),
        rss_list(&r.idle.etcd)
    );
    println!();
    println!(
        "{:>7}  {:<10}  {:>9}  {:>7}  {:>7}  {:>8}  {:>6}  {:>8}  {:>8}  RSS MiB per process",
        "clients",
        "system",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "cpu ms/w",
        "RSS MiB"
    );
    for l in &r.levels {
        for (name, s) in [("switchyard", &l.switchyard), ("etcd", &l.etcd)] {
            println!(
                "{:>7}  {:<10}  {:>9.0}  {:>7.2}  {:>7.2}  {:>8.2}  {:>6}  {:>8.3}  {:>8.1}  {}",
                l.clients,
                name,
                s.load.writes_per_s,
                s.load.p50_ms,
                s.load.p99_ms,
                s.load.p999_ms,
                s.load.errors,
                s.server_cpu_ms_per_write,
                s.rss_sum_mib,
                rss_list(&s.procs)
            );
        }
        println!(
            "{:>7}  {:<10}  {:>8.2}x  {:>6.2}x  {:>6.2}x  {:>8}  {:>6}  {:>7.2}x  {:>7.2}x  max process {:.2}x",
            l.clients,
            "sy/etcd",
            l.ratios.writes_per_s,
            l.ratios.p50,
            l.ratios.p99,
            "",
            "",
            l.ratios.server_cpu_per_write,
            l.ratios.rss_sum,
            l.ratios.rss_max_process
        );
        if let Some(e) = l
            .switchyard
            .load
            .first_error
            .as_ref()
            .or(l.etcd.load.first_error.as_ref())
        {
            println!("         first error: {e}");
        }
    }
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "budget: writes/s >= {:.2}x etcd at every level: worst {:.2}x -> {}",
        r.budget.writes_ratio_min,
        r.budget.worst_writes_ratio,
        verdict(r.budget.writes_met)
    );
    println!(
        "budget: RSS <= {:.2}x etcd after every level: worst {:.2}x -> {}",
        r.budget.rss_ratio_max,
        r.budget.worst_rss_ratio,
        verdict(r.budget.rss_met)
    );
    println!(
        "(cpu ms/w = server CPU time, all {} processes, per acknowledged write)",
        r.nodes
    );
}

//! `uplink-idle`: the idle cost of the uplink, in UDP bytes per second per
//! POP each way, from the agent's QUIC connection statistics
//! (`switchyard_agent_uplink_udp_{tx,rx}_bytes_total` on its `/metrics`).
//! A 3-node hub; 1, 2, ... N POPs connected in turn, each step measured
//! over an idle window at default settings. See `bench/README.md`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use switchyard_bench::pops::{check_bin, pop_names, start_agent, wait_full_mesh};
use switchyard_tests::{agent::Agent, http_get, metric, Cluster};

/// Idle uplink bytes per second per POP, each direction.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The `switchyard` binary to run hub and agents with.
    #[arg(long, default_value = "target/release/switchyard")]
    switchyard: PathBuf,
    /// Largest number of POPs (steps 1..=N).
    #[arg(long, default_value_t = 3)]
    pops: usize,
    /// Idle window measured per step, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Quiet time after the views converge before measuring, in seconds.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const TX: &str = "switchyard_agent_uplink_udp_tx_bytes_total";
const RX: &str = "switchyard_agent_uplink_udp_rx_bytes_total";
const BUDGET: f64 = 300.0;

#[derive(Debug, Serialize)]
struct PopRate {
    pop: String,
    tx_bytes_per_s: f64,
    rx_bytes_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Step {
    pops: usize,
    seconds: f64,
    per_pop: Vec<PopRate>,
    max_tx_bytes_per_s: f64,
    max_rx_bytes_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    hub_nodes: usize,
    budget_bytes_per_s: f64,
    within_budget: bool,
    steps: Vec<Step>,
}

/// `(tx, rx)` bytes so far of `a`'s uplink.
async fn counters(a: &Agent) -> Result<(f64, f64)> {
    let (code, body) = http_get(a.http, "/metrics")
        .await
        .with_context(|| format!("cannot read {}'s /metrics", a.pop))?;
    if code != 200 {
        bail!("{}'s /metrics answered {code}", a.pop);
    }
    if !body.contains(TX) {
        bail!(
            "{}'s /metrics has no {TX}: is {} an older build?",
            a.pop,
            a.pop
        );
    }
    Ok((metric(&body, TX, &[]), metric(&body, RX, &[])))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.pops == 0 {
        bail!("--pops must be at least 1");
    }
    check_bin(&args.switchyard)?;
    let bin = args.switchyard.as_path();
    eprintln!("starting a 3-node hub");
    let c = Cluster::start(bin, 3)
        .await
        .context("cannot start the hub")?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut agents = Vec::new();
    let mut steps = Vec::new();
    for (pop, region) in pop_names(args.pops) {
        agents.push(start_agent(&c, dir.path(), &pop, &region).await?);
        wait_full_mesh(&agents, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        let mut before = Vec::new();
        for a in &agents {
            before.push(counters(a).await?);
        }
        let t0 = Instant::now();
        eprintln!(
            "{} POP(s) connected and idle; measuring {} s",
            agents.len(),
            args.seconds
        );
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let mut after = Vec::new();
        for a in &agents {
            after.push(counters(a).await?);
        }
        let secs = t0.elapsed().as_secs_f64();
        let per_pop: Vec<PopRate> = agents
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(a, (b, e))| PopRate {
                pop: a.pop.clone(),
                tx_bytes_per_s: (e.0 - b.0) / secs,
                rx_bytes_per_s: (e.1 - b.1) / secs,
            })
            .collect();
        let step = Step {
            pops: agents.len(),
            seconds: secs,
            max_tx_bytes_per_s: per_pop.iter().map(|p| p.tx_bytes_per_s).fold(0.0, f64::max),
            max_rx_bytes_per_s: per_pop.iter().map(|p| p.rx_bytes_per_s).fold(0.0, f64::max),
            per_pop,
        };
        for p in &step.per_pop {
            eprintln!(
                "  {}: tx {:.1} B/s, rx {:.1} B/s",
                p.pop, p.tx_bytes_per_s, p.rx_bytes_per_s
            );
        }
        steps.push(step);
    }

    let within = steps
        .iter()
        .all(|s| s.max_tx_bytes_per_s <= BUDGET && s.max_rx_bytes_per_s <= BUDGET);
    println!(
        "idle uplink: 3 hub nodes, UDP bytes per POP from the agent's QUIC statistics \
         (agent -> hub = tx, hub -> agent = rx), default settings"
    );
    println!("POPs  window   per POP (tx / rx B/s)");
    for s in &steps {
        let list = s
            .per_pop
            .iter()
            .map(|p| format!("{} {:.0}/{:.0}", p.pop, p.tx_bytes_per_s, p.rx_bytes_per_s))
            .collect::<Vec<_>>()
            .join(", ");
        println!("{:>4}  {:5.1} s  {list}", s.pops, s.seconds);
    }
    let max_tx = steps
        .iter()
        .map(|s| s.max_tx_bytes_per_s)
        .fold(0.0, f64::max);
    let max_rx = steps
        .iter()
        .map(|s| s.max_rx_bytes_per_s)
        .fold(0.0, f64::max);
    println!(
        "budget: <= 300 B/s per POP each way: {} (worst tx {max_tx:.0} B/s, worst rx {max_rx:.0} B/s)",
        if within { "MET" } else { "MISSED" }
    );
    if let Some(path) = &args.json {
        let report = Report {
            hub_nodes: 3,
            budget_bytes_per_s: BUDGET,
            within_budget: within,
            steps,
        };
        switchyard_bench::write_json(path, &report)?;
    }
    Ok(())
}

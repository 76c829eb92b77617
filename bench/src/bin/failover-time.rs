//! `failover-time`: how long after a POP's agent is SIGKILLed every other
//! POP's agent has dropped it from every tier of the service it exports. A
//! 3-node hub and N POP agents, real processes on loopback; the victim
//! rotates round robin, and is restarted and back in every view (after a
//! 1 s failback damping) before the next trial. See `bench/README.md`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::future::join_all;
use serde::Serialize;
use switchyard_bench::pops::{
    check_bin, contains, pop_names, quantile, start_agent, wait_full_mesh, NS, SVC,
};
use switchyard_tests::Cluster;

/// POP failover time: SIGKILL of an agent until every other view excludes it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The `switchyard` binary to run hub and agents with.
    #[arg(long, default_value = "target/release/switchyard")]
    switchyard: PathBuf,
    /// Number of trials (one SIGKILL each).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Number of POPs (regions alternate east/west).
    #[arg(long, default_value_t = 5)]
    pops: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// How often every surviving agent's view is polled during a trial.
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for any one step.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
struct Trial {
    victim: String,
    /// SIGKILL until the last other agent excluded the victim (ms).
    last_ms: f64,
    /// SIGKILL until the first other agent excluded it (ms).
    first_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    hub_nodes: usize,
    pops: usize,
    trials: usize,
    poll_ms: f64,
    failback_after: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    budget_p99_ms: f64,
    within_budget: bool,
    samples: Vec<Trial>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.pops < 2 {
        bail!("--pops must be at least 2");
    }
    check_bin(&args.switchyard)?;
    let bin = args.switchyard.as_path();
    eprintln!("starting a 3-node hub and {} POP agents", args.pops);
    let c = Cluster::start(bin, 3)
        .await
        .context("cannot start the hub")?;
    c.run_cli_ok(["policy", "set", "demo/echo", "--failback-after", "1s"])
        .await
        .context("cannot set the failback damping")?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut agents = Vec::new();
    for (pop, region) in pop_names(args.pops) {
        agents.push(start_agent(&c, dir.path(), &pop, &region).await?);
    }
    wait_full_mesh(&agents, DEADLINE).await?;
    eprintln!("all {} POPs in every view", args.pops);

    let mut samples = Vec::new();
    for trial in 0..args.trials {
        let v = trial % agents.len();
        let victim = agents[v].pop.clone();
        let t0 = Instant::now();
        agents[v].kill();
        // Per other agent: when it first showed a view without the victim.
        let mut gone: Vec<Option<Duration>> = vec![None; agents.len()];
        gone[v] = Some(Duration::ZERO);
        while gone.iter().any(Option::is_none) {
            if t0.elapsed() > DEADLINE {
                bail!("trial {trial}: {victim} still in some view after {DEADLINE:?}");
            }
            let polls = agents
                .iter()
                .enumerate()
                .filter(|(i, _)| gone[*i].is_none())
                .map(|(i, a)| async move { (i, a.tiers(NS, SVC).await) });
            for (i, r) in join_all(polls).await {
                // An empty list means no view yet (or a failed read): not
                // evidence of exclusion.
                if let Ok(t) = r {
                    if !t.is_empty() && !contains(&t, &victim) {
                        gone[i] = Some(t0.elapsed());
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let others = gone
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != v)
            .filter_map(|(_, d)| *d);
        let (first, last) = others.fold((Duration::MAX, Duration::ZERO), |(f, l), d| {
            (f.min(d), l.max(d))
        });
        let s = Trial {
            victim: victim.clone(),
            last_ms: last.as_secs_f64() * 1e3,
            first_ms: first.as_secs_f64() * 1e3,
        };
        eprintln!(
            "trial {:>2}: {victim} excluded everywhere after {:7.1} ms (first agent {:7.1} ms)",
            trial + 1,
            s.last_ms,
            s.first_ms
        );
        samples.push(s);

        agents[v]
            .restart()
            .await
            .with_context(|| format!("cannot restart {victim}"))?;
        wait_full_mesh(&agents, DEADLINE)
            .await
            .with_context(|| format!("{victim} did not come back"))?;
    }

    let mut sorted: Vec<f64> = samples.iter().map(|s| s.last_ms).collect();
    sorted.sort_by(f64::total_cmp);
    let p99 = quantile(&sorted, 0.99);
    let report = Report {
        hub_nodes: 3,
        pops: args.pops,
        trials: args.trials,
        poll_ms: POLL.as_secs_f64() * 1e3,
        failback_after: "1s",
        p50_ms: quantile(&sorted, 0.50),
        p99_ms: p99,
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        budget_p99_ms: 1000.0,
        within_budget: p99 <= 1000.0,
        samples,
    };
    println!(
        "failover time: 3 hub nodes, {} POPs, {} trials (SIGKILL of one agent until the \
         last other agent's view excludes it)",
        report.pops, report.trials
    );
    println!(
        "views polled every {} ms (plus one HTTP round trip): figures are upper bounds \
         by up to ~{} ms",
        report.poll_ms, report.poll_ms
    );
    println!(
        "samples (ms): {}",
        sorted
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        report.p50_ms, report.p99_ms, report.max_ms
    );
    println!(
        "budget: p99 <= 1 s with default settings: {} (p99 {:.1} ms)",
        switchyard_bench::verdict(report.within_budget),
        report.p99_ms
    );
    if let Some(path) = &args.json {
        switchyard_bench::write_json(path, &report)?;
    }
    Ok(())
}

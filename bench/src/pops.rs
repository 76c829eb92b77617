//! A 3-node hub with POP agents (real `switchyard` processes, via the
//! `switchyard-tests` harness), each exporting `demo/echo`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use switchyard_tests::{agent::Agent, Cluster};

/// Namespace of the exported service.
pub const NS: &str = "demo";
/// Name of the exported service.
pub const SVC: &str = "echo";

/// The POP names `pop-0`, `pop-1`, ... with their regions (alternating
/// `east` and `west`).
pub fn pop_names(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let region = if i % 2 == 0 { "east" } else { "west" };
            (format!("pop-{i}"), region.to_string())
        })
        .collect()
}

/// Enrols `pop` and starts its agent, exporting `demo/echo`.
pub async fn start_agent(c: &Cluster, dir: &Path, pop: &str, region: &str) -> Result<Agent> {
    switchyard_tests::agent::enrol(c, dir, pop, region, &[(NS, SVC)]).await
}

/// Whether `pop` is in any tier of `tiers`.
pub fn contains(tiers: &[Vec<String>], pop: &str) -> bool {
    tiers.iter().any(|t| t.iter().any(|p| p == pop))
}

/// Waits until every agent's view of `demo/echo` holds every POP.
pub async fn wait_full_mesh(agents: &[Agent], deadline: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let mut missing = Vec::new();
        for a in agents {
            let t = a.tiers(NS, SVC).await.unwrap_or_default();
            for b in agents {
                if !contains(&t, &b.pop) {
                    missing.push(format!("{} not in {}'s view", b.pop, a.pop));
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!(
                "views incomplete after {deadline:?}: {}",
                missing.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that `bin` exists, with a hint to build it.
pub fn check_bin(bin: &Path) -> Result<()> {
    if !bin.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p switchyard` or pass --switchyard",
            bin.display()
        );
    }
    Ok(())
}

/// The `q` quantile (0..=1) of sorted `v`, nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

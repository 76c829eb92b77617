//! Benchmarks for Switchyard. The `hub-vs-etcd` binary measures hub write
//! throughput and commit latency next to a 3-member etcd cluster;
//! `failover-time` and `uplink-idle` measure POP failover and the idle
//! uplink cost with real hub and agent processes; `fanout` the spread of a
//! new export to 1000 simulated POPs. This library holds their
//! pieces (process launchers, clients, statistics).

pub mod etcd;
pub mod exports;
pub mod hub;
pub mod load;
pub mod pops;
pub mod proc;

/// The vendored minimal etcd v3 API (`bench/proto/etcd/rpc.proto`).
#[allow(missing_docs, clippy::all)]
pub mod etcdpb {
    tonic::include_proto!("etcdserverpb");
}

/// Reserves `n` distinct free loopback TCP ports by binding port 0 and
/// releasing them. A process started right after can take them (there is a
/// small race with other programs on the machine, acceptable for a bench).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("cannot bind a loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| anyhow::anyhow!("cannot read a bound port: {e}"))
}

/// Writes `report` as pretty JSON to `path` (for `--json FILE`).
pub fn write_json(path: &std::path::Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// "MET" or "MISSED", for the budget line every benchmark prints.
pub fn verdict(within_budget: bool) -> &'static str {
    if within_budget {
        "MET"
    } else {
        "MISSED"
    }
}

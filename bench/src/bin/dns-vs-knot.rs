//! DNS benchmark: the POP zone server (`dns-serve`, the agent's `--dns`
//! code path) next to Knot DNS and NSD, in the same invocation, serving the
//! same content: `--services` names under `bench.svc.clusterset.local`,
//! two A records each. Each server is pinned to core 0 (`taskset`), dnsperf
//! to core 1. Queries: 90 % existing names, 10 % NXDOMAIN.
//!
//! Per server: queries answered per server CPU-second at full load (and
//! the ratio to Knot), p99 latency at a fixed `--fixed-qps` (dnsperf -v
//! per-query latencies), RSS after loading. Then the RSS of `dns-serve`
//! with `--rss-names` names. Budget: at least 0.5x Knot's queries per
//! CPU-second; RSS at most 10 MB with 10k names.
//!
//! Run: `bench/run-dns-vs-knot.sh [--duration 10] [--json out.json]`.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use prost::Message;
use serde::Serialize;
use switchyard_bench::proc::{cpu_seconds, rss_kib, ServerProc};
use switchyard_bench::{free_ports, verdict, write_json};
use switchyard_proto::pb;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds of each dnsperf run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Services (names) in the zone, two A records each.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Names in the zone for the RSS measurement of dns-serve (services of
    /// two endpoints make four names each: the service, the POP level and
    /// two endpoint host names).
    #[arg(long, default_value_t = 10_000)]
    rss_names: usize,
    /// Rate of the latency run (queries per second).
    #[arg(long, default_value_t = 15_000)]
    fixed_qps: u32,
    /// Core the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    server_core: u32,
    /// Core dnsperf is pinned to.
    #[arg(long, default_value_t = 1)]
    client_core: u32,
    /// Directory of the release binaries (dns-serve).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct ServerResult {
    server: String,
    /// Queries completed in the full-load run.
    completed: u64,
    /// Queries lost in the full-load run.
    lost: u64,
    /// dnsperf's queries per second at full load.
    qps: f64,
    /// Server CPU seconds used during the full-load run.
    cpu_s: f64,
    /// Queries answered per server CPU-second.
    queries_per_cpu_s: f64,
    /// p50 / p99 latency at the fixed rate, microseconds.
    p50_us: f64,
    p99_us: f64,
    /// Queries lost in the fixed-rate run.
    fixed_lost: u64,
    /// RSS after loading the zone, KiB.
    rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    services: usize,
    records: usize,
    duration_s: u64,
    fixed_qps: u32,
    results: Vec<ServerResult>,
    ratio_to_knot: f64,
    rss_names: usize,
    rss_kib_at_rss_names: u64,
    throughput_budget: &'static str,
    rss_budget: &'static str,
    /// From a new view sent on the watch (as the agent publishes it) to
    /// the first UDP answer built from it, over `view_trials` trials with
    /// `services` services, microseconds.
    view_to_answer_p50_us: f64,
    view_to_answer_p99_us: f64,
    view_to_answer_max_us: f64,
    view_budget: &'static str,
}

/// Measures how long a new view takes to reach answers: the same path as
/// the agent (a view watch, `server::follow`, `DnsServer`), in-process.
fn view_to_answer(services: usize, trials: usize) -> Result<Vec<f64>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut v = view(services);
        let (tx, rx) = tokio::sync::watch::channel(Some(v.clone()));
        let (tables, _task) = switchyard_dns::server::follow(rx, |v: &Option<pb::PopView>| {
            switchyard_dns::zone::build(v.as_ref()).ok()
        });
        let server = switchyard_dns::DnsServer::bind(
            switchyard_dns::DnsConfig {
                listen: "127.0.0.1:0".parse()?,
                udp_workers: 1,
                ..Default::default()
            },
            tables,
        )
        .await?;
        let addr = server.local_addr();
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        // The epoch TXT: its answer changes with every view.
        let mut q = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x05epoch\x0aswitchyard\x0aclusterset\x05local\x00\x00\x10\x00\x01");
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        for i in 0..trials {
            v.epoch += 1;
            let want = v.epoch.to_string();
            let start = Instant::now();
            tx.send_replace(Some(v.clone()));
            loop {
                q[0..2].copy_from_slice(&(i as u16).to_be_bytes());
                sock.send_to(&q, addr).await?;
                let n = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await??;
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.ends_with(&want) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(5) {
                    bail!("view epoch {want} never answered");
                }
            }
            out.push(start.elapsed().as_secs_f64() * 1e6);
        }
        server.shutdown();
        Ok(out)
    })
}

fn addr_of(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn view(services: usize) -> pb::PopView {
    let svcs = (0..services)
        .map(|i| pb::ServiceView {
            service: Some(pb::ServiceKey {
                namespace: "bench".into(),
                name: format!("svc-{i}"),
            }),
            r#type: pb::ServiceType::Headless as i32,
            tiers: vec![pb::Tier {
                targets: vec![pb::Target {
                    pop: "pop-a".into(),
                    weight: 2,
                    endpoints: (0..2)
                        .map(|k| pb::Endpoint {
                            address: addr_of(2 * i + k + 1),
                            port: 80,
                            ready: true,
                            hostname: String::new(),
                        })
                        .collect(),
                }],
            }],
            ..Default::default()
        })
        .collect();
    pb::PopView {
        pop: "pop-a".into(),
        epoch: 1,
        services: svcs,
        peers: vec![],
    }
}

fn zone_file(services: usize) -> String {
    let mut z = String::from(
        "$ORIGIN clusterset.local.\n$TTL 5\n\
         @ IN SOA ns hostmaster 1 3600 600 86400 5\n@ IN NS ns\nns IN A 127.0.0.1\n",
    );
    for i in 0..services {
        for k in 0..2 {
            let _ = writeln!(z, "svc-{i}.bench.svc IN A {}", addr_of(2 * i + k + 1));
        }
    }
    z
}

/// 90 % hits, 10 % NXDOMAIN, a fixed pseudo-random order.
fn queries(services: usize, n: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut q = String::new();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x >> 8) as usize % services;
        if x.is_multiple_of(10) {
            let _ = writeln!(q, "nx-{i}.bench.svc.clusterset.local A");
        } else {
            let _ = writeln!(q, "svc-{i}.bench.svc.clusterset.local A");
        }
    }
    q
}

/// Sum of utime+stime over `pid` and its descendants (NSD forks).
fn tree_cpu(pid: u32) -> Result<f64> {
    let mut total = cpu_seconds(pid)?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if child == pid {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            total += tree_cpu(child).unwrap_or(0.0);
        }
    }
    Ok(total)
}

fn tree_rss(pid: u32) -> u64 {
    let mut total = rss_kib(pid).unwrap_or(0);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) && child != pid {
                total += tree_rss(child);
            }
        }
    }
    total
}

/// Waits until `addr` answers a SOA query for the zone.
fn wait_answering(addr: SocketAddr, proc: &mut ServerProc) -> Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut q = vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x0aclusterset\x05local\x00\x00\x06\x00\x01");
    let start = Instant::now();
    let mut buf = [0u8; 512];
    while start.elapsed() < Duration::from_secs(30) {
        proc.check_alive()?;
        sock.send_to(&q, addr)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 12 && buf[3] & 0x0f == 0 {
                return Ok(());
            }
        }
    }
    bail!("{} does not answer on {addr}", proc.name)
}

fn pinned(core: u32, program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(core.to_string()).arg(program);
    c
}

fn dnsperf(args: &Args, addr: SocketAddr, queries: &Path, extra: &[&str]) -> Result<String> {
    let out = pinned(args.client_core, "dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args(["-l", &args.duration.to_string()])
        .args(extra)
        .output()
        .context("cannot run dnsperf (apt-get install dnsperf)")?;
    if !out.status.success() {
        bail!("dnsperf failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(out: &str, key: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn measure(
    args: &Args,
    name: &str,
    mut proc: ServerProc,
    addr: SocketAddr,
    queries: &Path,
) -> Result<ServerResult> {
    wait_answering(addr, &mut proc)?;
    let rss = tree_rss(proc.pid());
    // Warm-up, then full load.
    let cpu0 = tree_cpu(proc.pid())?;
    let out = dnsperf(args, addr, queries, &["-c", "4", "-q", "400"])?;
    let cpu = tree_cpu(proc.pid())? - cpu0;
    proc.check_alive()?;
    let completed = field(&out, "Queries completed:") as u64;
    let lost = field(&out, "Queries lost:") as u64;
    let qps = field(&out, "Queries per second:");
    // Fixed rate, per-query latencies.
    let v = dnsperf(
        args,
        addr,
        queries,
        &["-c", "4", "-Q", &args.fixed_qps.to_string(), "-v"],
    )?;
    let mut lat: Vec<f64> = v
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    lat.sort_by(f64::total_cmp);
    let fixed_lost = field(&v, "Queries lost:") as u64;
    proc.check_alive()?;
    let r = ServerResult {
        server: name.to_string(),
        completed,
        lost,
        qps,
        cpu_s: cpu,
        queries_per_cpu_s: if cpu > 0.0 {
            completed as f64 / cpu
        } else {
            0.0
        },
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        fixed_lost,
        rss_kib: rss,
    };
    println!(
        "{:<11} {:>9.0} q/CPU-s  ({:>8.0} qps, {:>5.2} CPU-s, lost {:>5})  p50 {:>6.0} us  p99 {:>6.0} us at {} qps (lost {})  RSS {:>6} KiB",
        r.server, r.queries_per_cpu_s, r.qps, r.cpu_s, r.lost, r.p50_us, r.p99_us, args.fixed_qps, r.fixed_lost, r.rss_kib
    );
    Ok(r)
}

fn main() -> Result<()> {
    let args = Args::parse();
    for tool in ["taskset", "dnsperf", "knotd", "nsd"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing: run bench/run-dns-vs-knot.sh (installs knot, nsd, dnsperf)");
        }
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let view_file = d.join("view.pb");
    std::fs::write(&view_file, view(args.services).encode_to_vec())?;
    std::fs::write(d.join("clusterset.local.zone"), zone_file(args.services))?;
    let qfile = d.join("queries.txt");
    std::fs::write(&qfile, queries(args.services, 100_000))?;
    let ports = free_ports(3)?;
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let mut results = Vec::new();

    // Switchyard.
    let serve = args.bin_dir.join("dns-serve");
    let mut c = pinned(args.server_core, &serve.to_string_lossy());
    c.arg("--view")
        .arg(&view_file)
        .arg("--listen")
        .arg(at(ports[0]).to_string());
    let p = ServerProc::spawn("switchyard", c, &d.join("switchyard.log"))?;
    results.push(measure(&args, "switchyard", p, at(ports[0]), &qfile)?);

    // Knot DNS.
    let knot_dir = d.join("knot");
    std::fs::create_dir_all(&knot_dir)?;
    let knot_conf = knot_dir.join("knot.conf");
    std::fs::write(
        &knot_conf,
        format!(
            "server:\n    rundir: \"{k}\"\n    listen: 127.0.0.1@{port}\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n\
             database:\n    storage: \"{k}\"\n\
             log:\n  - target: stderr\n    any: warning\n\
             zone:\n  - domain: clusterset.local\n    file: \"{d}/clusterset.local.zone\"\n    journal-content: none\n    zonefile-sync: -1\n",
            k = knot_dir.display(),
            d = d.display(),
            port = ports[1]
        ),
    )?;
    let mut c = pinned(args.server_core, "knotd");
    c.arg("-c").arg(&knot_conf);
    let p = ServerProc::spawn("knot", c, &d.join("knot.log"))?;
    results.push(measure(&args, "knot", p, at(ports[1]), &qfile)?);

    // NSD (its response rate limiting is on by default in Debian's build,
    // at 200 qps per /24: off, as for the others).
    let nsd_dir = d.join("nsd");
    std::fs::create_dir_all(&nsd_dir)?;
    let nsd_conf = nsd_dir.join("nsd.conf");
    std::fs::write(
        &nsd_conf,
        format!(
            "server:\n    ip-address: 127.0.0.1@{port}\n    port: {port}\n    server-count: 1\n    username: \"\"\n    zonesdir: \"{d}\"\n    database: \"\"\n    pidfile: \"{n}/nsd.pid\"\n    xfrdfile: \"{n}/xfrd.state\"\n    zonelistfile: \"{n}/zone.list\"\n    verbosity: 0\n    hide-version: yes\n    rrl-ratelimit: 0\n    rrl-whitelist-ratelimit: 0\n\
             remote-control:\n    control-enable: no\n\
             zone:\n    name: clusterset.local\n    zonefile: clusterset.local.zone\n",
            d = d.display(),
            n = nsd_dir.display(),
            port = ports[2]
        ),
    )?;
    let mut c = pinned(args.server_core, "nsd");
    c.arg("-d").arg("-c").arg(&nsd_conf);
    let p = ServerProc::spawn("nsd", c, &d.join("nsd.log"))?;
    results.push(measure(&args, "nsd", p, at(ports[2]), &qfile)?);

    // RSS of dns-serve with more names.
    let big_view = d.join("view-big.pb");
    std::fs::write(&big_view, view(args.rss_names / 4).encode_to_vec())?;
    let port = free_ports(1)?[0];
    let mut c = pinned(args.server_core, &serve.to_string_lossy());
    c.arg("--view")
        .arg(&big_view)
        .arg("--listen")
        .arg(at(port).to_string());
    let mut p = ServerProc::spawn("switchyard-rss", c, &d.join("switchyard-rss.log"))?;
    wait_answering(at(port), &mut p)?;
    let rss_big = tree_rss(p.pid());
    drop(p);
    let names = std::fs::read_to_string(d.join("switchyard-rss.log"))
        .ok()
        .and_then(|l| {
            l.split("dns-serve: ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);

    let mut lat = view_to_answer(args.services, 50)?;
    lat.sort_by(f64::total_cmp);
    let (v50, v99, vmax) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );

    let ours = results[0].queries_per_cpu_s;
    let knot = results[1].queries_per_cpu_s;
    let ratio = if knot > 0.0 { ours / knot } else { 0.0 };
    let report = Report {
        services: args.services,
        records: args.services * 2,
        duration_s: args.duration,
        fixed_qps: args.fixed_qps,
        ratio_to_knot: ratio,
        rss_names: names,
        rss_kib_at_rss_names: rss_big,
        throughput_budget: verdict(ratio >= 0.5),
        rss_budget: verdict(rss_big <= 10 * 1024),
        results,
        view_to_answer_p50_us: v50,
        view_to_answer_p99_us: v99,
        view_to_answer_max_us: vmax,
        view_budget: verdict(vmax <= 100_000.0),
    };
    println!(
        "new view to answers ({} services, 50 trials): p50 {v50:.0} us, p99 {v99:.0} us, max {vmax:.0} us (budget <= 100 ms: {})",
        args.services, report.view_budget
    );
    println!(
        "switchyard / knot queries per CPU-second: {ratio:.2}x (budget >= 0.5x: {})",
        report.throughput_budget
    );
    println!(
        "switchyard RSS with {} names: {} KiB (budget <= 10 MiB: {})",
        names, rss_big, report.rss_budget
    );
    if let Some(p) = &args.json {
        write_json(p, &report)?;
    }
    Ok(())
}

//! `gateway-vs-nginx`: the Switchyard gateway (`switchyard-dataplane`, run
//! by `gateway-node gw`) next to Debian's nginx (`stream`) and HAProxy
//! (`mode tcp`), in one invocation, pinned: every system under test on
//! core `--sut-core`, load generators and backends on `--load-core`.
//!
//! 1. L4, one proxy hop: small HTTP requests (wrk, keep-alive, to an nginx
//!    http backend) per proxy CPU-second with wrk's p99 latency; the same
//!    with `Connection: close` (a new connection per request); and
//!    one-stream iperf3 Gbit per proxy CPU-second.
//! 2. Cross-POP path (client, gateway A, QUIC, gateway B, backend):
//!    iperf3 throughput and added round-trip latency p50/p99.
//! 3. Local failover: SIGKILL of the serving POP's gateway until the first
//!    new connection succeeds through the next tier, next to HAProxy with
//!    `check inter 100ms fall 3` failing over from a SIGKILLed server.
//! 4. RSS of a gateway idle and with N idle connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use prost::Message;
use serde::Serialize;
use switchyard_bench::pops::quantile;
use switchyard_bench::proc::{cpu_seconds, rss_kib, ServerProc};
use switchyard_bench::{free_ports, verdict, write_json};
use switchyard_pki::{CertificateAuthority, SpiffeId};
use switchyard_proto::pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const DOMAIN: &str = "bench.switchyard";

/// Gateway vs nginx stream vs HAProxy tcp.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The `gateway-node` binary.
    #[arg(long, default_value = "target/release/gateway-node")]
    node: PathBuf,
    /// Seconds per load run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    wrk_connections: usize,
    /// Failover trials per system.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Idle connections held for the RSS figure (through a tunnel).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Core of the systems under test.
    #[arg(long, default_value_t = 0)]
    sut_core: usize,
    /// Core of load generators and backends.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// Run only these parts (l4, cross, failover, rss); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Env {
    dir: tempfile::TempDir,
    node: PathBuf,
    sut: usize,
    load: usize,
    ca: CertificateAuthority,
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pinned(&self, core: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(core.to_string()).arg(program);
        c
    }

    /// Writes certificate files for a gateway of `pop`; returns their paths.
    fn certs(&self, pop: &str) -> Result<[PathBuf; 3]> {
        let id = SpiffeId::gateway(DOMAIN, pop, "gw0")?;
        let kp = self.ca.issue(&id, Duration::from_secs(86_400))?;
        let cert = self.path(&format!("{pop}.crt"));
        let key = self.path(&format!("{pop}.key"));
        let ca = self.path("ca.crt");
        std::fs::write(&cert, kp.cert_pem)?;
        std::fs::write(&key, kp.key_pem)?;
        std::fs::write(&ca, self.ca.cert_pem())?;
        Ok([cert, key, ca])
    }

    /// Starts a gateway process; returns it and its bound addresses.
    async fn gateway(
        &self,
        name: &str,
        view: &pb::PopView,
        tunnel: SocketAddr,
    ) -> Result<(ServerProc, GwReady)> {
        let [cert, key, ca] = self.certs(&view.pop)?;
        let view_file = self.path(&format!("{name}.view"));
        std::fs::write(&view_file, view.encode_to_vec())?;
        let ready = self.path(&format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = self.pinned(self.sut, &self.node);
        cmd.arg("gw")
            .args(["--pop", &view.pop, "--domain", DOMAIN])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--ca")
            .arg(ca)
            .arg("--view")
            .arg(&view_file)
            .args(["--tunnel", &tunnel.to_string(), "--listen-ip", "127.0.0.1"])
            .arg("--ready")
            .arg(&ready);
        let mut proc = ServerProc::spawn(name, cmd, &self.path(&format!("{name}.log")))?;
        let text = wait_file(&ready, &mut proc).await?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let tunnel = v["tunnel"]
            .as_str()
            .ok_or_else(|| anyhow!("no tunnel in ready file"))?
            .parse()?;
        let mut listeners = BTreeMap::new();
        if let Some(m) = v["listeners"].as_object() {
            for (k, a) in m {
                listeners.insert(k.clone(), a.as_str().unwrap_or_default().parse()?);
            }
        }
        Ok((proc, GwReady { tunnel, listeners }))
    }

    /// Starts a greeting echo backend on the load core.
    async fn echo(&self, name: &str, listen: SocketAddr) -> Result<(ServerProc, SocketAddr)> {
        let ready = self.path(&format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = self.pinned(self.load, &self.node);
        cmd.args(["echo", "--name", name, "--listen", &listen.to_string()])
            .arg("--ready")
            .arg(&ready);
        let mut proc = ServerProc::spawn(name, cmd, &self.path(&format!("{name}.log")))?;
        let text = wait_file(&ready, &mut proc).await?;
        Ok((proc, serde_json::from_str(&text)?))
    }
}

struct GwReady {
    tunnel: SocketAddr,
    listeners: BTreeMap<String, SocketAddr>,
}

impl GwReady {
    fn vip(&self, svc: &str, port: u16) -> Result<SocketAddr> {
        self.listeners
            .get(&format!("ns/{svc}:{port}"))
            .copied()
            .ok_or_else(|| anyhow!("no listener for {svc}:{port}: {:?}", self.listeners))
    }
}

async fn wait_file(path: &Path, proc: &mut ServerProc) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            return Ok(t);
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("{} never became ready", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn svc_view(name: &str, port: u16, tiers: Vec<Vec<(&str, Vec<SocketAddr>)>>) -> pb::ServiceView {
    pb::ServiceView {
        service: Some(pb::ServiceKey {
            namespace: "ns".into(),
            name: name.into(),
        }),
        vip: "127.77.0.1".into(),
        ports: vec![u32::from(port)],
        tiers: tiers
            .into_iter()
            .map(|t| pb::Tier {
                targets: t
                    .into_iter()
                    .map(|(pop, eps)| pb::Target {
                        pop: pop.into(),
                        weight: eps.len().max(1) as u32,
                        endpoints: eps
                            .into_iter()
                            .map(|a| pb::Endpoint {
                                address: a.ip().to_string(),
                                port: u32::from(a.port()),
                                ready: true,
                                hostname: String::new(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        ..Default::default()
    }
}

fn pop_view(
    pop: &str,
    services: Vec<pb::ServiceView>,
    peers: &[(&str, SocketAddr)],
) -> pb::PopView {
    pb::PopView {
        pop: pop.into(),
        epoch: 1,
        services,
        peers: peers
            .iter()
            .map(|(p, a)| pb::PeerGateway {
                pop: (*p).into(),
                gateway_addr: a.to_string(),
            })
            .collect(),
    }
}

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn free_udp_port() -> Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?)
}

fn port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

// ---------------------------------------------------------------- peers --

fn nginx_stream(env: &Env, routes: &[(u16, SocketAddr)]) -> Result<ServerProc> {
    let dir = env.path("nginx-stream");
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 30000; }}\n\
         stream {{ {servers} }}\n",
        d = dir.display(),
        servers = routes
            .iter()
            .map(|(listen, upstream)| format!(
                "server {{ listen 127.0.0.1:{listen}; proxy_pass {upstream}; proxy_buffer_size 64k; }} "
            ))
            .collect::<String>()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = env.pinned(env.sut, "nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    ServerProc::spawn("nginx-stream", cmd, &env.path("nginx-stream.log"))
}

/// An iperf3 server on the load core, on a free port, once it listens.
async fn iperf_server(env: &Env, name: &str) -> Result<(ServerProc, SocketAddr)> {
    let port = port()?;
    let server = ServerProc::spawn(
        name,
        {
            let mut c = env.pinned(env.load, "iperf3");
            c.args(["-s", "-p", &port.to_string()]);
            c
        },
        &env.path(&format!("{name}.log")),
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(addr).await?;
    Ok((server, addr))
}

fn nginx_http(env: &Env, listen: u16) -> Result<ServerProc> {
    let dir = env.path("nginx-http");
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 100000000;\n\
           client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
           server {{ listen 127.0.0.1:{listen}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = env.pinned(env.load, "nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    ServerProc::spawn("nginx-http", cmd, &env.path("nginx-http.log"))
}

fn haproxy(env: &Env, name: &str, body: &str) -> Result<ServerProc> {
    let conf = format!(
        "global\n  nbthread 1\n  maxconn 9000\n\
         defaults\n  mode tcp\n  timeout connect 100ms\n  timeout client 300s\n  timeout server 300s\n  retries 3\n  option redispatch 1\n\
         {body}"
    );
    let path = env.path(&format!("{name}.cfg"));
    std::fs::write(&path, conf)?;
    let mut cmd = env.pinned(env.sut, "haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    ServerProc::spawn(name, cmd, &env.path(&format!("{name}.log")))
}

// ----------------------------------------------------------------- load --

/// wrk against `addr`: total requests and the p99 latency (µs). With
/// `close`, every request asks for `Connection: close`, so each one is a
/// new connection through the proxy.
fn wrk(env: &Env, addr: SocketAddr, secs: u64, conns: usize, close: bool) -> Result<(u64, f64)> {
    let mut cmd = env.pinned(env.load, "wrk");
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .args([
            "--latency",
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
        ])
        .arg(format!("http://{addr}/"))
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "  123456 requests in 10.00s, ..."
    let n = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.split_once(" requests in ")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .ok_or_else(|| anyhow!("unexpected wrk output: {text}"))?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("wrk reported errors against {addr}:\n{text}");
    }
    // "     99%    1.23ms" in the latency distribution.
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%").map(str::trim))
        .and_then(wrk_duration_us)
        .ok_or_else(|| anyhow!("no p99 latency in wrk output: {text}"))?;
    Ok((n, p99))
}

/// A wrk duration (`250.00us`, `1.23ms`, `2.00s`) in µs.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e6)
    } else {
        (s.strip_suffix('s')?, 1e6)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// iperf3 one stream against `addr`: Gbit/s received.
fn iperf(env: &Env, addr: SocketAddr, secs: u64) -> Result<f64> {
    let out = env
        .pinned(env.load, "iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &secs.to_string(), "-J"])
        .output()
        .context("run iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow!("iperf3 failed: {}", v["error"]))
}

#[derive(Debug, Serialize)]
struct L4Result {
    system: String,
    requests: u64,
    requests_per_s: f64,
    proxy_cpu_s: f64,
    requests_per_cpu_s: f64,
    /// wrk's p99 request latency (µs).
    p99_latency_us: f64,
    /// Requests per proxy CPU-second with a new connection each.
    connections_per_cpu_s: f64,
    gbit_per_s: f64,
    iperf_proxy_cpu_s: f64,
    gbit_per_cpu_s: f64,
}

fn measure_l4(
    env: &Env,
    system: &str,
    pid: u32,
    http: SocketAddr,
    tcp: SocketAddr,
    secs: u64,
    conns: usize,
) -> Result<L4Result> {
    // Warm-up, then measure.
    wrk(env, http, 1, conns, false)?;
    let c0 = cpu_seconds(pid)?;
    let (requests, p99_latency_us) = wrk(env, http, secs, conns, false)?;
    let c1 = cpu_seconds(pid)?;
    let k0 = cpu_seconds(pid)?;
    let (connections, _) = wrk(env, http, secs, conns, true)?;
    let k1 = cpu_seconds(pid)?;
    let g0 = cpu_seconds(pid)?;
    let gbit = iperf(env, tcp, secs)?;
    let g1 = cpu_seconds(pid)?;
    let r = L4Result {
        system: system.into(),
        requests,
        requests_per_s: requests as f64 / secs as f64,
        proxy_cpu_s: c1 - c0,
        requests_per_cpu_s: requests as f64 / (c1 - c0).max(0.01),
        p99_latency_us,
        connections_per_cpu_s: connections as f64 / (k1 - k0).max(0.01),
        gbit_per_s: gbit,
        iperf_proxy_cpu_s: g1 - g0,
        gbit_per_cpu_s: gbit * secs as f64 / (g1 - g0).max(0.01),
    };
    println!(
        "  {:<14} {:>9.0} req/s  {:>9.0} req/CPU-s  p99 {:>7.0} us  {:>7.0} conn/CPU-s  | {:>6.2} Gbit/s  {:>6.2} Gbit/CPU-s",
        r.system,
        r.requests_per_s,
        r.requests_per_cpu_s,
        r.p99_latency_us,
        r.connections_per_cpu_s,
        r.gbit_per_s,
        r.gbit_per_cpu_s
    );
    Ok(r)
}

// ------------------------------------------------------------- latency --

/// Connects, reads the greeting line; returns it.
async fn greet(addr: SocketAddr, timeout: Duration) -> Result<(String, BufReader<TcpStream>)> {
    tokio::time::timeout(timeout, async {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await?;
        if !line.ends_with('\n') {
            bail!("closed before the greeting");
        }
        Ok((line.trim().to_owned(), r))
    })
    .await
    .map_err(|_| anyhow!("greeting timed out"))?
}

/// Round trips of one byte over one connection (µs each).
async fn ping_pong(addr: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let (_, mut r) = greet(addr, Duration::from_secs(5)).await?;
    let mut out = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n + 100 {
        let t = Instant::now();
        r.get_mut().write_all(b"x").await?;
        r.read_exact(&mut b).await?;
        if i >= 100 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

// ---------------------------------------------------------------- parts --

#[derive(Debug, Serialize, Default)]
struct Report {
    l4: Vec<L4Result>,
    l4_ratio_requests_vs_nginx: Option<f64>,
    l4_ratio_gbit_vs_nginx: Option<f64>,
    cross_pop: Option<CrossPop>,
    failover: Vec<Failover>,
    rss: Option<Rss>,
}

async fn part_l4(env: &Env, args: &Args, report: &mut Report) -> Result<()> {
    println!(
        "L4, one hop (SUT on core {}, wrk/iperf3/backends on core {}):",
        env.sut, env.load
    );
    let http_port = port()?;
    let _http = nginx_http(env, http_port)?;
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    wait_port(http).await?;
    let (_iperf, tcp) = iperf_server(env, "iperf3-server").await?;

    // Switchyard gateway: two services with local endpoints.
    let view = pop_view(
        "a",
        vec![
            svc_view("http", 80, vec![vec![("a", vec![http])]]),
            svc_view("iperf", 5201, vec![vec![("a", vec![tcp])]]),
        ],
        &[],
    );
    let (gw, ready) = env.gateway("gw-l4", &view, local()).await?;
    let sy = measure_l4(
        env,
        "switchyard",
        gw.pid(),
        ready.vip("http", 80)?,
        ready.vip("iperf", 5201)?,
        args.seconds,
        args.wrk_connections,
    )?;
    drop(gw);

    let (p1, p2) = (port()?, port()?);
    let n = nginx_stream(env, &[(p1, http), (p2, tcp)])?;
    let a1 = SocketAddr::from(([127, 0, 0, 1], p1));
    let a2 = SocketAddr::from(([127, 0, 0, 1], p2));
    // Only the http port is probed: a probe through the iperf3 port would
    // look like a broken test to the iperf3 server.
    wait_port(a1).await?;
    let ng = measure_l4(
        env,
        "nginx-stream",
        n.pid(),
        a1,
        a2,
        args.seconds,
        args.wrk_connections,
    )?;
    drop(n);

    let hp = port()?;
    let hp2 = port()?;
    let h = haproxy(
        env,
        "haproxy-l4",
        &format!(
            "frontend http\n  bind 127.0.0.1:{hp}\n  default_backend http\n\
             backend http\n  server s {http}\n\
             frontend iperf\n  bind 127.0.0.1:{hp2}\n  default_backend iperf\n\
             backend iperf\n  server s {tcp}\n"
        ),
    )?;
    let ha1 = SocketAddr::from(([127, 0, 0, 1], hp));
    let ha2 = SocketAddr::from(([127, 0, 0, 1], hp2));
    wait_port(ha1).await?;
    let hr = measure_l4(
        env,
        "haproxy",
        h.pid(),
        ha1,
        ha2,
        args.seconds,
        args.wrk_connections,
    )?;
    drop(h);

    let rq = sy.requests_per_cpu_s / ng.requests_per_cpu_s;
    let rg = sy.gbit_per_cpu_s / ng.gbit_per_cpu_s;
    println!(
        "  switchyard/nginx: requests per CPU-s {rq:.2}x (budget >= 1.0x: {}), Gbit per CPU-s {rg:.2}x (budget >= 0.9x: {})",
        verdict(rq >= 1.0),
        verdict(rg >= 0.9)
    );
    report.l4 = vec![sy, ng, hr];
    report.l4_ratio_requests_vs_nginx = Some(rq);
    report.l4_ratio_gbit_vs_nginx = Some(rg);
    Ok(())
}

#[derive(Debug, Serialize)]
struct CrossPop {
    gbit_per_s: f64,
    gateways_cpu_s: f64,
    direct_rtt_p50_us: f64,
    direct_rtt_p99_us: f64,
    path_rtt_p50_us: f64,
    path_rtt_p99_us: f64,
    added_p50_us: f64,
    added_p99_us: f64,
}

async fn part_cross(env: &Env, args: &Args, report: &mut Report) -> Result<()> {
    println!("Cross-POP path (client -> gateway A -> QUIC -> gateway B -> backend; both gateways on core {}):", env.sut);
    let (_iperf, tcp) = iperf_server(env, "iperf3-server-x").await?;
    let (_echo, echo) = env.echo("echo-x", local()).await?;
    let b_view = pop_view(
        "b",
        vec![
            svc_view("iperf", 5201, vec![vec![("b", vec![tcp])]]),
            svc_view("echo", 7, vec![vec![("b", vec![echo])]]),
        ],
        &[],
    );
    let (gb, rb) = env.gateway("gw-xb", &b_view, local()).await?;
    let a_view = pop_view(
        "a",
        vec![
            svc_view("iperf", 5201, vec![vec![("b", vec![tcp])]]),
            svc_view("echo", 7, vec![vec![("b", vec![echo])]]),
        ],
        &[("b", rb.tunnel)],
    );
    let (ga, ra) = env.gateway("gw-xa", &a_view, local()).await?;
    let a_echo = ra.vip("echo", 7)?;
    // Wait for the tunnel.
    let deadline = Instant::now() + Duration::from_secs(20);
    while greet(a_echo, Duration::from_secs(2)).await.is_err() {
        if Instant::now() > deadline {
            bail!("cross-POP path never came up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu0 = cpu_seconds(ga.pid())? + cpu_seconds(gb.pid())?;
    let gbit = iperf(env, ra.vip("iperf", 5201)?, args.seconds)?;
    let cpu1 = cpu_seconds(ga.pid())? + cpu_seconds(gb.pid())?;
    let direct = ping_pong(echo, 5000).await?;
    let path = ping_pong(a_echo, 5000).await?;
    let r = CrossPop {
        gbit_per_s: gbit,
        gateways_cpu_s: cpu1 - cpu0,
        direct_rtt_p50_us: quantile(&direct, 0.5),
        direct_rtt_p99_us: quantile(&direct, 0.99),
        path_rtt_p50_us: quantile(&path, 0.5),
        path_rtt_p99_us: quantile(&path, 0.99),
        added_p50_us: quantile(&path, 0.5) - quantile(&direct, 0.5),
        added_p99_us: quantile(&path, 0.99) - quantile(&direct, 0.99),
    };
    println!(
        "  iperf3 one stream: {:.2} Gbit/s ({:.2} CPU-s of both gateways); round trip direct p50 {:.0} us p99 {:.0} us, through A+B p50 {:.0} us p99 {:.0} us: added p50 {:.0} us, p99 {:.0} us",
        r.gbit_per_s, r.gateways_cpu_s, r.direct_rtt_p50_us, r.direct_rtt_p99_us, r.path_rtt_p50_us, r.path_rtt_p99_us, r.added_p50_us, r.added_p99_us
    );
    report.cross_pop = Some(r);
    Ok(())
}

#[derive(Debug, Serialize)]
struct Failover {
    system: String,
    trials: usize,
    failed_trials: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Polls new connections to `vip` until one is greeted by `want`.
async fn until_served_by(vip: SocketAddr, want: &str, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if let Ok((name, _)) = greet(vip, Duration::from_secs(3)).await {
            if name == want {
                return Ok(t0.elapsed());
            }
        }
        if t0.elapsed() > limit {
            bail!("not served by {want} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn failover_result(system: &str, trials: usize, mut ms: Vec<f64>) -> Failover {
    ms.sort_by(f64::total_cmp);
    let r = Failover {
        system: system.into(),
        trials,
        failed_trials: trials - ms.len(),
        p50_ms: quantile(&ms, 0.5),
        p99_ms: quantile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
    };
    println!(
        "  {:<11} {} trials ({} failed): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        r.system, r.trials, r.failed_trials, r.p50_ms, r.p99_ms, r.max_ms
    );
    r
}

async fn part_failover(env: &Env, args: &Args, report: &mut Report) -> Result<()> {
    println!("Local failover: SIGKILL of the serving POP until the first new connection succeeds through the next tier:");
    let (_eb, echo_b) = env.echo("b", local()).await?;
    let (_ec, echo_c) = env.echo("c", local()).await?;
    let b_view = pop_view(
        "b",
        vec![svc_view("web", 80, vec![vec![("b", vec![echo_b])]])],
        &[],
    );
    let c_view = pop_view(
        "c",
        vec![svc_view("web", 80, vec![vec![("c", vec![echo_c])]])],
        &[],
    );
    let b_tunnel = free_udp_port()?;
    let (mut gb, _) = env.gateway("gw-fb", &b_view, b_tunnel).await?;
    let (_gc, rc) = env.gateway("gw-fc", &c_view, local()).await?;
    let a_view = pop_view(
        "a",
        vec![svc_view(
            "web",
            80,
            vec![vec![("b", vec![echo_b])], vec![("c", vec![echo_c])]],
        )],
        &[("b", b_tunnel), ("c", rc.tunnel)],
    );
    let (_ga, ra) = env.gateway("gw-fa", &a_view, local()).await?;
    let vip = ra.vip("web", 80)?;
    let mut ms = Vec::new();
    for _ in 0..args.trials {
        until_served_by(vip, "b", Duration::from_secs(20)).await?;
        let t0 = Instant::now();
        drop(gb); // SIGKILL and reap
        match until_served_by(vip, "c", Duration::from_secs(10)).await {
            Ok(_) => ms.push(t0.elapsed().as_secs_f64() * 1e3),
            Err(e) => eprintln!("  switchyard trial failed: {e}"),
        }
        gb = env.gateway("gw-fb", &b_view, b_tunnel).await?.0;
    }
    let sy = failover_result("switchyard", args.trials, ms);

    let pb_ = port()?;
    let (mut hb, hb_addr) = env
        .echo("b", SocketAddr::from(([127, 0, 0, 1], pb_)))
        .await?;
    let hp = port()?;
    let _h = haproxy(
        env,
        "haproxy-failover",
        &format!(
            "frontend web\n  bind 127.0.0.1:{hp}\n  default_backend web\n\
             backend web\n  server b {hb_addr} check inter 100ms fall 3 rise 2\n  server c {echo_c} check inter 100ms fall 3 rise 2 backup\n"
        ),
    )?;
    let hvip = SocketAddr::from(([127, 0, 0, 1], hp));
    wait_port(hvip).await?;
    let mut ms = Vec::new();
    for _ in 0..args.trials {
        until_served_by(hvip, "b", Duration::from_secs(20)).await?;
        let t0 = Instant::now();
        drop(hb);
        match until_served_by(hvip, "c", Duration::from_secs(10)).await {
            Ok(_) => ms.push(t0.elapsed().as_secs_f64() * 1e3),
            Err(e) => eprintln!("  haproxy trial failed: {e}"),
        }
        hb = env.echo("b", hb_addr).await?.0;
    }
    let ha = failover_result("haproxy", args.trials, ms);
    println!(
        "  budget switchyard p99 <= 500 ms: {}",
        verdict(sy.p99_ms <= 500.0 && sy.failed_trials == 0)
    );
    report.failover = vec![sy, ha];
    Ok(())
}

#[derive(Debug, Serialize)]
struct Rss {
    idle_kib: u64,
    idle_anon_kib: u64,
    idle_file_kib: u64,
    connections: usize,
    with_connections_kib: u64,
    per_connection_bytes: f64,
    peer_gateway_with_connections_kib: u64,
}

/// (RssAnon, RssFile) of `pid` in KiB.
fn rss_split(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((field("RssAnon:"), field("RssFile:")))
}

async fn part_rss(env: &Env, args: &Args, report: &mut Report) -> Result<()> {
    println!("RSS of gateway A (client -> A -> QUIC -> B -> backend):");
    let (_echo, echo) = env.echo("b", local()).await?;
    let b_view = pop_view(
        "b",
        vec![svc_view("web", 80, vec![vec![("b", vec![echo])]])],
        &[],
    );
    let (gb, rb) = env.gateway("gw-rb", &b_view, local()).await?;
    let a_view = pop_view(
        "a",
        vec![svc_view("web", 80, vec![vec![("b", vec![echo])]])],
        &[("b", rb.tunnel)],
    );
    let (ga, ra) = env.gateway("gw-ra", &a_view, local()).await?;
    let vip = ra.vip("web", 80)?;
    until_served_by(vip, "b", Duration::from_secs(20)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(ga.pid())?;
    let (idle_anon, idle_file) = rss_split(ga.pid())?;
    let n = args.idle_connections;
    let mut conns = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(tokio::spawn(greet(vip, Duration::from_secs(30))));
        if batch.len() == 200 || i + 1 == n {
            for t in batch.drain(..) {
                conns.push(t.await??.1);
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = rss_kib(ga.pid())?;
    let peer = rss_kib(gb.pid())?;
    let per = (with.saturating_sub(idle) as f64 * 1024.0) / n as f64;
    println!(
        "  idle {:.1} MiB = {:.1} MiB anonymous + {:.1} MiB file-backed (binary, libc)",
        idle as f64 / 1024.0,
        idle_anon as f64 / 1024.0,
        idle_file as f64 / 1024.0
    );
    println!(
        "  idle {:.1} MiB (budget <= 10 MB: {}); with {n} idle connections {:.1} MiB: {:.0} bytes per connection (budget <= 10 KB: {}); peer gateway B {:.1} MiB",
        idle as f64 / 1024.0,
        verdict(idle as f64 * 1024.0 <= 10e6),
        with as f64 / 1024.0,
        per,
        verdict(per <= 10e3),
        peer as f64 / 1024.0
    );
    report.rss = Some(Rss {
        idle_kib: idle,
        idle_anon_kib: idle_anon,
        idle_file_kib: idle_file,
        connections: n,
        with_connections_kib: with,
        per_connection_bytes: per,
        peer_gateway_with_connections_kib: peer,
    });
    drop(conns);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.node.exists() {
        bail!(
            "{} not found: build with `cargo build --release -p switchyard-bench`",
            args.node.display()
        );
    }
    let env = Env {
        dir: tempfile::tempdir()?,
        node: args.node.clone(),
        sut: args.sut_core,
        load: args.load_core,
        ca: CertificateAuthority::generate(DOMAIN)?,
    };
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let mut report = Report::default();
    if want("l4") {
        part_l4(&env, &args, &mut report).await?;
    }
    if want("cross") {
        part_cross(&env, &args, &mut report).await?;
    }
    if want("failover") {
        part_failover(&env, &args, &mut report).await?;
    }
    if want("rss") {
        part_rss(&env, &args, &mut report).await?;
    }
    if let Some(p) = &args.json {
        write_json(p, &report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::wrk_duration_us;

    #[test]
    fn wrk_durations_in_microseconds() {
        assert_eq!(wrk_duration_us("250.00us"), Some(250.0));
        assert_eq!(wrk_duration_us("1.50ms"), Some(1500.0));
        assert_eq!(wrk_duration_us("2.00s"), Some(2e6));
        assert_eq!(wrk_duration_us("1.00m"), Some(60e6));
        assert_eq!(wrk_duration_us("fast"), None);
    }
}

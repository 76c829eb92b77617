//! `fanout`: how long after one POP's export of a new service is committed
//! every other POP has a view containing it. A 3-node hub (real processes on
//! loopback) and N simulated POPs in this one process: each is enrolled
//! through the admin API and `Enrolment.Enrol`, then holds a real QUIC
//! uplink driven by the agent's `AgentSession` (heartbeats included). Also
//! samples each hub node's RSS with N POPs connected. See `bench/README.md`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use clap::Parser;
use futures::{stream, StreamExt};
use quinn::crypto::rustls::QuicClientConfig;
use serde::Serialize;
use switchyard_agent::uplink::{AgentEvent, AgentResume, AgentSession, AgentSessionConfig};
use switchyard_bench::{
    exports::sim_export,
    pops::{check_bin, quantile},
    proc::rss_kib,
};
use switchyard_pki::{ExpectedPeer, JoinToken, SpiffeId};
use switchyard_proto::{
    pb::{self, enrolment_client::EnrolmentClient},
    uplink as wire,
};
use switchyard_tests::Cluster;
use tokio::sync::watch;

/// Fan-out of a new export to N POPs, and hub RSS with N POPs connected.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The `switchyard` binary to run the hub with.
    #[arg(long, default_value = "target/release/switchyard")]
    switchyard: PathBuf,
    /// Number of simulated POPs.
    #[arg(long, default_value_t = 1000)]
    pops: usize,
    /// Concurrent enrolments.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Also measure hub RSS with every POP exporting this many services
    /// (`sim/svc-0` .. `sim/svc-<K-1>`, the same set on every POP); 0 skips.
    #[arg(long, default_value_t = 0)]
    services: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// QUIC connections per client endpoint (UDP socket).
const CONNS_PER_ENDPOINT: usize = 100;
/// Longest wait for any one phase.
const DEADLINE: Duration = Duration::from_secs(180);
/// The measured service.
const FAN_NS: &str = "demo";
const FAN_NAME: &str = "fan";

/// What the POP tasks share with `main`.
struct Shared {
    /// POPs whose session holds a view.
    with_view: AtomicUsize,
    /// POPs whose export set (with `--services`) was acknowledged.
    acked: AtomicUsize,
    /// Sessions that ended (any reason).
    ended: AtomicUsize,
    /// Per POP: when its view first contained `demo/fan`.
    seen: Vec<OnceLock<Instant>>,
    /// When POP 0 handed `demo/fan` to its session.
    fan_sent: OnceLock<Instant>,
    /// When the hub acknowledged POP 0's export of `demo/fan` (t0).
    fan_acked: OnceLock<Instant>,
    /// The first session error, for the report.
    first_error: OnceLock<String>,
}

struct Pop {
    name: String,
    cert_pem: String,
    key_pem: String,
}

#[derive(Debug, Serialize)]
struct Rss {
    node: u64,
    rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    hub_nodes: usize,
    pops: usize,
    enrol_s: f64,
    connect_s: f64,
    rss_connected: Vec<Rss>,
    services_per_pop: usize,
    rss_with_services: Vec<Rss>,
    /// Ack at POP 0 to each POP's first view with the service (ms).
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    min_ms: f64,
    /// The same measured from when POP 0 handed the export to its session.
    from_send_p50_ms: f64,
    from_send_p99_ms: f64,
    from_send_max_ms: f64,
    ack_after_send_ms: f64,
    budget_p99_ms: f64,
    within_budget: bool,
    /// Simulated POPs the hub lists as online after the fan-out.
    online_at_end: usize,
}

fn has_fan(view: &pb::PopView) -> bool {
    view.services.iter().any(|s| {
        s.service
            .as_ref()
            .is_some_and(|k| k.namespace == FAN_NS && k.name == FAN_NAME)
    })
}

/// Creates a POP token for `name` and enrols it with a fresh key.
async fn enrol_one(
    c: &Cluster,
    node: u64,
    enrol: EnrolmentClient<tonic::transport::Channel>,
    name: String,
) -> Result<Pop> {
    let mut admin = c.admin_client(node)?;
    let token = admin
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Pop as i32,
            pop: name.clone(),
            labels: Some(pb::Labels {
                region: "sim".into(),
                ..Default::default()
            }),
            ttl_ms: 600_000,
        })
        .await
        .with_context(|| format!("cannot create a token for {name}"))?
        .into_inner()
        .token;
    let (csr, key_pem) = switchyard_pki::generate_csr(&SpiffeId::pop(c.domain(), &name)?)?;
    let mut enrol = enrol;
    let r = enrol
        .enrol(pb::EnrolRequest {
            token,
            csr_pem: csr,
            agent_version: "fanout-bench".into(),
        })
        .await
        .with_context(|| format!("cannot enrol {name}"))?
        .into_inner();
    Ok(Pop {
        name,
        cert_pem: r.cert_pem,
        key_pem,
    })
}

fn quic_config(c: &Cluster, ca_pem: &str, pop: &Pop) -> Result<quinn::ClientConfig> {
    let chain = format!("{}\n{ca_pem}", pop.cert_pem.trim_end());
    let tls = switchyard_pki::client_config(
        Some((&chain, &pop.key_pem)),
        ca_pem,
        ExpectedPeer::AnyHub {
            domain: c.domain().to_string(),
        },
        vec![wire::ALPN.to_vec()],
    )?;
    let crypto = QuicClientConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).context("idle timeout")?,
    ));
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Drives one simulated POP's session until `stop` or the session ends.
async fn run_pop(
    i: usize,
    name: String,
    conn: quinn::Connection,
    shared: Arc<Shared>,
    mut exports: watch::Receiver<Option<Vec<pb::ServiceExport>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .with_context(|| format!("{name}: cannot open the control stream"))?;
    let mut session = AgentSession::new(
        AgentSessionConfig {
            pop: name.clone(),
            agent_version: "fanout-bench".into(),
            ..Default::default()
        },
        AgentResume::default(),
        std::time::Instant::now(),
    );
    let mut buf = BytesMut::new();
    let mut viewed = false;
    let mut acked = false;
    let mut fan_given = false;
    let result = 'session: loop {
        while let Some(ev) = session.poll_event() {
            let now = Instant::now();
            match ev {
                AgentEvent::ApplyView(v) => {
                    session.view_persisted(v.epoch);
                    if !viewed {
                        viewed = true;
                        shared.with_view.fetch_add(1, Ordering::Relaxed);
                    }
                    if has_fan(&v) {
                        let _ = shared.seen[i].set(now);
                    }
                }
                AgentEvent::ExportsAcked { .. } => {
                    if !acked {
                        acked = true;
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    if fan_given && session.unacked_exports() == 0 {
                        let _ = shared.fan_acked.set(now);
                    }
                }
                AgentEvent::ExportRefused { reason } => {
                    break 'session Err(anyhow!("{name}: export refused: {reason}"));
                }
                AgentEvent::Closed(reason) => {
                    break 'session Err(anyhow!(
                        "{name}: session closed: {reason:?} (connection: {:?})",
                        conn.close_reason()
                    ));
                }
                _ => {}
            }
        }
        while let Some(d) = session.poll_datagram() {
            // Best effort, like the agent.
            let _ = conn.send_datagram(d);
        }
        buf.clear();
        while let Some(frame) = session.poll_transmit() {
            wire::encode_frame(&frame, &mut buf)
                .with_context(|| format!("{name}: cannot encode a frame"))?;
        }
        if !buf.is_empty() {
            if let Err(e) = send.write_all(&buf).await {
                break Err(anyhow!("{name}: control stream write failed: {e}"));
            }
        }
        let timer = session.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => {
                let now = std::time::Instant::now();
                match chunk {
                    Ok(Some(c)) => session.handle_stream_data(now, &c.bytes),
                    Ok(None) | Err(_) => session.connection_lost(now),
                }
            }
            d = conn.read_datagram() => {
                let now = std::time::Instant::now();
                match d {
                    Ok(d) => session.handle_datagram(now, &d),
                    Err(_) => session.connection_lost(now),
                }
            }
            _ = async {
                match timer {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => session.handle_timeout(std::time::Instant::now()),
            r = exports.changed() => {
                if r.is_err() {
                    break Ok(());
                }
                let set = exports.borrow_and_update().clone();
                if let Some(set) = set {
                    let fan = set.iter().any(|e| {
                        e.service.as_ref().is_some_and(|k| k.namespace == FAN_NS && k.name == FAN_NAME)
                    });
                    if let Err(e) = session.export_changed(set) {
                        break Err(anyhow!("{name}: export set not taken: {e}"));
                    }
                    if fan && !fan_given {
                        fan_given = true;
                        let _ = shared.fan_sent.set(Instant::now());
                    }
                }
            }
            _ = stop.wait_for(|s| *s) => break Ok(()),
        }
    };
    let _ = send.finish();
    conn.close(quinn::VarInt::from_u32(0), b"bench done");
    shared.ended.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = &result {
        let _ = shared.first_error.set(format!("{e:#}"));
    }
    result
}

/// Waits until `f` holds, printing progress; fails after [`DEADLINE`] or
/// when a session ended.
async fn wait_until(
    what: &str,
    shared: &Shared,
    mut f: impl FnMut() -> (usize, usize),
) -> Result<()> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let (have, want) = f();
        if have >= want {
            eprintln!(
                "{what}: {have}/{want} after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if shared.ended.load(Ordering::Relaxed) > 0 {
            bail!(
                "{what}: a session ended ({})",
                shared.first_error.get().map_or("no error", String::as_str)
            );
        }
        if start.elapsed() > DEADLINE {
            bail!("{what}: only {have}/{want} after {DEADLINE:?}");
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("{what}: {have}/{want}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Per hub node: (id, seconds spent in view passes, passes), from
/// `switchyard_hub_view_pass_seconds`.
async fn view_passes(c: &Cluster) -> Result<Vec<(u64, f64, f64)>> {
    let mut out = Vec::new();
    for id in c.ids() {
        let text = c.metrics(id).await?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        out.push((
            id,
            value("switchyard_hub_view_pass_seconds_sum "),
            value("switchyard_hub_view_pass_seconds_count "),
        ));
    }
    Ok(out)
}

fn sample_rss(c: &Cluster) -> Result<Vec<Rss>> {
    c.ids()
        .into_iter()
        .map(|id| {
            let pid = c
                .node(id)
                .pid()
                .ok_or_else(|| anyhow!("hub node {id} is not running"))?;
            Ok(Rss {
                node: id,
                rss_kib: rss_kib(pid)?,
            })
        })
        .collect()
}

fn fmt_rss(r: &[Rss]) -> String {
    r.iter()
        .map(|r| format!("node {}: {:.1} MiB", r.node, r.rss_kib as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.pops < 2 {
        bail!("--pops must be at least 2");
    }
    check_bin(&args.switchyard)?;
    eprintln!("starting a 3-node hub");
    let mut c = Cluster::start(&args.switchyard, 3)
        .await
        .context("cannot start the hub")?;
    let leader = c.leader().await.context("no hub leader")?;
    let ca_pem = c.ca_pem()?;
    let rss_idle = sample_rss(&c)?;
    eprintln!("hub RSS with no POP: {}", fmt_rss(&rss_idle));

    // Enrolment: token through the admin API, then Enrolment.Enrol with the
    // CA pinned from the token, as the agent does. One channel per node.
    let names: Vec<String> = (0..args.pops).map(|i| format!("sim-{i:04}")).collect();
    let first = JoinToken::parse(
        &c.admin_client(leader)?
            .create_token(pb::CreateTokenRequest {
                kind: pb::TokenKind::Pop as i32,
                pop: "sim-probe".into(),
                ttl_ms: 60_000,
                ..Default::default()
            })
            .await
            .context("cannot create a probe token")?
            .into_inner()
            .token,
    )?;
    let pinned = switchyard_pki::ca_pinned_client_config(
        &first.ca_fingerprint(),
        vec![switchyard_hub::server::ALPN_H2.to_vec()],
    )?;
    let pinned = Arc::new(pinned);
    let mut enrol_clients = Vec::new();
    for id in c.ids() {
        let addr = c.node(id).grpc.to_string();
        let ch = switchyard_hub::server::channel::tls_channel(&addr, pinned.clone())
            .with_context(|| format!("cannot make a channel to {addr}"))?;
        enrol_clients.push(EnrolmentClient::new(ch));
    }
    let t_enrol = Instant::now();
    let done = AtomicUsize::new(0);
    let cref = &c;
    let mut pops: Vec<Pop> = stream::iter(names.into_iter().enumerate())
        .map(|(i, name)| {
            let enrol = enrol_clients[i % enrol_clients.len()].clone();
            let done = &done;
            async move {
                let p = enrol_one(cref, leader, enrol, name).await;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(100) {
                    eprintln!("enrolled {n}/{}", args.pops);
                }
                p
            }
        })
        .buffered(args.concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let enrol_s = t_enrol.elapsed().as_secs_f64();
    eprintln!("{} POPs enrolled in {enrol_s:.1} s", pops.len());

    // Connections, spread over the nodes' uplinks.
    let uplinks: Vec<SocketAddr> = c.ids().into_iter().map(|id| c.node(id).uplink).collect();
    let shared = Arc::new(Shared {
        with_view: AtomicUsize::new(0),
        acked: AtomicUsize::new(0),
        ended: AtomicUsize::new(0),
        seen: (0..args.pops).map(|_| OnceLock::new()).collect(),
        fan_sent: OnceLock::new(),
        fan_acked: OnceLock::new(),
        first_error: OnceLock::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (all_exports_tx, all_exports_rx) = watch::channel(None::<Vec<pb::ServiceExport>>);
    let (pop0_tx, pop0_rx) = watch::channel(None::<Vec<pb::ServiceExport>>);
    let mut endpoints = Vec::new();
    let mut tasks = Vec::new();
    let t_connect = Instant::now();
    let conns: Vec<Result<quinn::Connection>> = stream::iter(pops.iter().enumerate())
        .map(|(i, pop)| {
            if i % CONNS_PER_ENDPOINT == 0 {
                match switchyard_hub::uplink::udp::endpoint(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    switchyard_hub::uplink::udp::UPLINK_SOCKET_BUFFER,
                    None,
                ) {
                    Ok(ep) => endpoints.push(ep),
                    Err(e) => {
                        return futures::future::Either::Left(async move {
                            Err(anyhow!("cannot bind a QUIC endpoint: {e}"))
                        })
                    }
                }
            }
            let ep = endpoints[endpoints.len() - 1].clone();
            let addr = uplinks[i % uplinks.len()];
            let cfg = quic_config(cref, &ca_pem, pop);
            futures::future::Either::Right(async move {
                let connecting = ep
                    .connect_with(cfg?, addr, switchyard_pki::SNI_NAME)
                    .with_context(|| format!("cannot connect to {addr}"))?;
                tokio::time::timeout(Duration::from_secs(30), connecting)
                    .await
                    .map_err(|_| anyhow!("QUIC handshake with {addr} timed out"))?
                    .with_context(|| format!("QUIC handshake with {addr}"))
            })
        })
        .buffered(args.concurrency.max(1))
        .collect()
        .await;
    for (i, (conn, pop)) in conns.into_iter().zip(pops.iter_mut()).enumerate() {
        let conn = conn.with_context(|| format!("{}: no connection", pop.name))?;
        let exports = if i == 0 {
            pop0_rx.clone()
        } else {
            all_exports_rx.clone()
        };
        tasks.push(tokio::spawn(run_pop(
            i,
            pop.name.clone(),
            conn,
            shared.clone(),
            exports,
            stop_rx.clone(),
        )));
    }
    let n = args.pops;
    let outcome = async {
        wait_until("sessions holding a view", &shared, || {
            (shared.with_view.load(Ordering::Relaxed), n)
        })
        .await?;
        let connect_s = t_connect.elapsed().as_secs_f64();
        // Let the hub settle (online transitions, view deltas) before RSS.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_connected = sample_rss(&c)?;
        eprintln!(
            "hub RSS with {n} POPs connected: {}",
            fmt_rss(&rss_connected)
        );

        let mut base: Vec<pb::ServiceExport> = Vec::new();
        let mut rss_with_services = Vec::new();
        if args.services > 0 {
            base = (0..args.services)
                .map(|j| sim_export("sim", &format!("svc-{j}")))
                .collect();
            let _ = all_exports_tx.send(Some(base.clone()));
            let _ = pop0_tx.send(Some(base.clone()));
            wait_until("export sets acknowledged", &shared, || {
                (shared.acked.load(Ordering::Relaxed), n)
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            rss_with_services = sample_rss(&c)?;
            eprintln!(
                "hub RSS with {n} POPs x {} services: {}",
                args.services,
                fmt_rss(&rss_with_services)
            );
        }

        let passes_before = view_passes(&c).await?;
        let mut set = base;
        set.push(sim_export(FAN_NS, FAN_NAME));
        let _ = pop0_tx.send(Some(set));
        wait_until("POPs with demo/fan in view", &shared, || {
            (shared.seen.iter().filter(|s| s.get().is_some()).count(), n)
        })
        .await?;
        // What the hub nodes spent computing views meanwhile (the export,
        // its liveness noise, nothing else is changing).
        let passes_after = view_passes(&c).await?;
        for ((id, s0, n0), (_, s1, n1)) in passes_before.iter().zip(&passes_after) {
            eprintln!(
                "node {id}: {} view passes, {:.1} ms computing views while demo/fan spread",
                n1 - n0,
                (s1 - s0) * 1e3
            );
        }
        wait_until("export of demo/fan acknowledged", &shared, || {
            (usize::from(shared.fan_acked.get().is_some()), 1)
        })
        .await?;
        // Heartbeats kept flowing: every simulated POP is still online.
        let listed = c
            .admin_client(leader)?
            .list_pops(pb::ListPopsRequest::default())
            .await
            .context("cannot list POPs")?
            .into_inner();
        let online = listed
            .statuses
            .iter()
            .filter(|s| s.pop.starts_with("sim-") && s.liveness == pb::PopLiveness::Online as i32)
            .count();
        eprintln!("POPs online at the end: {online}/{n}");
        Ok::<_, anyhow::Error>((connect_s, rss_connected, rss_with_services, online))
    }
    .await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    for ep in &endpoints {
        ep.close(quinn::VarInt::from_u32(0), b"bench done");
    }
    let (connect_s, rss_connected, rss_with_services, online) = outcome?;

    let t0 = *shared.fan_acked.get().context("no ack")?;
    let sent = *shared.fan_sent.get().context("never sent")?;
    let signed_ms = |t: Instant, from: Instant| {
        if t >= from {
            (t - from).as_secs_f64() * 1e3
        } else {
            -((from - t).as_secs_f64() * 1e3)
        }
    };
    let mut lat: Vec<f64> = shared
        .seen
        .iter()
        .filter_map(|s| s.get().map(|t| signed_ms(*t, t0)))
        .collect();
    lat.sort_by(f64::total_cmp);
    let mut from_send: Vec<f64> = shared
        .seen
        .iter()
        .filter_map(|s| s.get().map(|t| signed_ms(*t, sent)))
        .collect();
    from_send.sort_by(f64::total_cmp);
    let p99 = quantile(&lat, 0.99);
    let report = Report {
        hub_nodes: 3,
        pops: n,
        enrol_s,
        connect_s,
        rss_connected,
        services_per_pop: args.services,
        rss_with_services,
        p50_ms: quantile(&lat, 0.50),
        p99_ms: p99,
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        min_ms: lat.first().copied().unwrap_or(f64::NAN),
        from_send_p50_ms: quantile(&from_send, 0.50),
        from_send_p99_ms: quantile(&from_send, 0.99),
        from_send_max_ms: from_send.last().copied().unwrap_or(f64::NAN),
        ack_after_send_ms: signed_ms(t0, sent),
        budget_p99_ms: 500.0,
        within_budget: p99 <= 500.0,
        online_at_end: online,
    };
    println!(
        "fan-out: 3 hub nodes, {n} simulated POPs in one process ({} CPUs), \
         enrolled in {:.1} s, all holding a view {:.1} s after connecting",
        std::thread::available_parallelism().map_or(0, usize::from),
        report.enrol_s,
        report.connect_s
    );
    println!("POPs the hub lists online at the end: {online}/{n}");
    println!("hub RSS with no POP:        {}", fmt_rss(&rss_idle));
    println!(
        "hub RSS with {n} POPs:    {}",
        fmt_rss(&report.rss_connected)
    );
    if args.services > 0 {
        println!(
            "hub RSS with {n} POPs x {} services: {}",
            args.services,
            fmt_rss(&report.rss_with_services)
        );
    }
    println!(
        "demo/fan export acknowledged to POP 0 {:.1} ms after it was sent (t0 = the ack)",
        report.ack_after_send_ms
    );
    println!(
        "t0 to first view with demo/fan, over {n} POPs: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  \
         (min {:.1} ms; negative = view before the ack)",
        report.p50_ms, report.p99_ms, report.max_ms, report.min_ms
    );
    println!(
        "from the export being sent instead: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        report.from_send_p50_ms, report.from_send_p99_ms, report.from_send_max_ms
    );
    println!(
        "budget: p99 <= 500 ms: {} (p99 {:.1} ms)",
        switchyard_bench::verdict(report.within_budget),
        report.p99_ms
    );
    if let Some(path) = &args.json {
        switchyard_bench::write_json(path, &report)?;
    }
    Ok(())
}

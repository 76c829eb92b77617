//! Gateways end to end, with real processes: a hub, three POP agents (A
//! imports demo/echo, B and C export it with real TCP echo backends), and
//! their gateways, embedded (`switchyard agent --gateway`) or separate
//! (`switchyard gateway` over the agent's local API). A client at A dials
//! the service's VIP at A and is served in tier order (Failover B then C),
//! keeps being served through C when B dies with every hub node down, and
//! B's gateway refuses peers without a gateway certificate and services
//! not exported to the caller.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use switchyard_tests::{
    agent::{self, Agent},
    gateway::GatewayProcess,
    log_tail, Cluster, DEADLINE,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

const NS: &str = "demo";
const SVC: &str = "echo";
/// The service port (the VIP listeners bind it on each POP's VIP).
const PORT: u16 = 7000;
const PRIVATE: &str = "private";
const PRIVATE_PORT: u16 = 7001;

/// A TCP backend that reads until the client half-closes, then answers
/// `tag` followed by every byte it read, and closes.
async fn echo_backend(tag: &'static str) -> Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let h = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_err() {
                    return;
                }
                let _ = s.write_all(tag.as_bytes()).await;
                let _ = s.write_all(&buf).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((addr, h))
}

/// A services file exporting `services` (namespace, name, port), each
/// with `backend` as its one endpoint, probed by TCP connect.
fn services_toml(services: &[(&str, &str, u16)], backend: SocketAddr) -> String {
    let mut t = String::new();
    for (ns, name, port) in services {
        t.push_str(&format!(
            "[[services]]\nnamespace = \"{ns}\"\nname = \"{name}\"\n\
             ports = [{{ port = {port} }}]\n\
             endpoints = [{{ address = \"127.0.0.1\", port = {bport} }}]\n\
             [services.probe]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 200\n\n",
            bport = backend.port()
        ));
    }
    t
}

fn embedded() -> Vec<String> {
    [
        "--gateway",
        "--tunnel",
        "127.0.0.1:0",
        "--probe-interval",
        "50ms",
    ]
    .map(String::from)
    .to_vec()
}

/// Sends `payload`, half-closes, reads the answer to its end.
async fn call(addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(payload).await?;
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    })
    .await
    .context("no answer within 10 s")?
}

/// Bytes that are not all alike, so a reordering or a lost chunk shows.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

fn served_by(answer: &[u8], payload: &[u8]) -> Option<&'static str> {
    for tag in ["b:", "c:"] {
        if answer.len() == tag.len() + payload.len()
            && answer.starts_with(tag.as_bytes())
            && &answer[tag.len()..] == payload
        {
            return Some(if tag == "b:" { "b" } else { "c" });
        }
    }
    None
}

/// The listener address of `ns/name` in a gateway ready file.
fn listener(ready: &Value, ns: &str, name: &str) -> Option<SocketAddr> {
    ready["listeners"]
        .as_array()?
        .iter()
        .find(|l| l["namespace"] == ns && l["name"] == name)
        .and_then(|l| l["addr"].as_str())
        .and_then(|a| a.parse().ok())
}

/// Waits until `a` routes demo/echo to B then C and knows both gateways.
async fn wait_routes(a: &Agent) -> Result<()> {
    a.wait_tiers(NS, SVC, "tiers [b], [c] at a", |t| {
        t == [vec!["pop-b".to_string()], vec!["pop-c".to_string()]]
    })
    .await?;
    let start = std::time::Instant::now();
    loop {
        let v = a.view().await?;
        let peers: Vec<&str> = v["peers"]
            .as_array()
            .map(|p| p.iter().filter_map(|p| p["pop"].as_str()).collect())
            .unwrap_or_default();
        if peers.contains(&"pop-b") && peers.contains(&"pop-c") {
            return Ok(());
        }
        if start.elapsed() > DEADLINE {
            bail!("a's view has no gateways of b and c: {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct World {
    c: Cluster,
    dir: tempfile::TempDir,
    a: Agent,
    b: Agent,
    _cc: Agent,
    _backends: Vec<JoinHandle<()>>,
}

/// A hub, a Failover policy B then C for demo/echo, B and C exporting it
/// (B also demo/private, exported to B only) with embedded gateways, and
/// A with `a_args`.
async fn world(a_args: Vec<String>) -> Result<World> {
    let c = Cluster::start(bin(), 1).await?;
    c.run_cli_ok([
        "policy",
        "set",
        "demo/echo",
        "--mode",
        "failover",
        "--failover",
        "pop-b,pop-c",
    ])
    .await?;
    c.run_cli_ok(["policy", "set", "demo/private", "--export-to", "pop-b"])
        .await?;
    let dir = tempfile::tempdir()?;
    let (b_addr, bh) = echo_backend("b:").await?;
    let (c_addr, ch) = echo_backend("c:").await?;
    let b = agent::enrol_with(
        &c,
        dir.path(),
        "pop-b",
        "east",
        &agent::random_vip_cidr(),
        &services_toml(&[(NS, SVC, PORT), (NS, PRIVATE, PRIVATE_PORT)], b_addr),
        &embedded(),
    )
    .await?;
    let cc = agent::enrol_with(
        &c,
        dir.path(),
        "pop-c",
        "west",
        &agent::random_vip_cidr(),
        &services_toml(&[(NS, SVC, PORT)], c_addr),
        &embedded(),
    )
    .await?;
    let a = agent::enrol_with(
        &c,
        dir.path(),
        "pop-a",
        "north",
        &agent::random_vip_cidr(),
        "",
        &a_args,
    )
    .await?;
    Ok(World {
        c,
        dir,
        a,
        b,
        _cc: cc,
        _backends: vec![bh, ch],
    })
}

/// Calls `addr` until an answer comes from `want`; returns how many calls
/// failed or were served by someone else before.
async fn until_served_by(addr: SocketAddr, want: &str, what: &str) -> Result<u32> {
    let start = std::time::Instant::now();
    let mut misses = 0;
    let mut last = String::new();
    while start.elapsed() < DEADLINE {
        let p = payload(1000, misses as u8);
        match call(addr, &p).await {
            Ok(answer) if served_by(&answer, &p) == Some(want) => return Ok(misses),
            Ok(answer) => {
                last = format!(
                    "answer of {} bytes from {:?}",
                    answer.len(),
                    served_by(&answer, &p)
                )
            }
            Err(e) => last = e.to_string(),
        }
        misses += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not served by {want} within {DEADLINE:?}; last: {last}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_in_order_then_failover_with_every_hub_down() -> Result<()> {
    let mut w = world(embedded()).await?;
    wait_routes(&w.a).await?;
    let ready =
        w.a.wait_ready_json("the VIP listener of demo/echo", |v| {
            listener(v, NS, SVC).is_some()
        })
        .await?;
    let vip = listener(&ready, NS, SVC).context("listener")?;
    let view = w.a.view().await?;
    let want_vip = view["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == SVC))
        .and_then(|s| s["vip"].as_str())
        .context("no VIP in a's view")?
        .to_string();
    // Bound on the service's VIP and port at A (the default binding).
    assert_eq!(vip, format!("{want_vip}:{PORT}").parse()?);

    // Tier 0 (B) serves, bytes intact both ways, through the half-close.
    until_served_by(vip, "b", "first connection").await?;
    for (i, len) in [1usize, 64 * 1024, 1024 * 1024].into_iter().enumerate() {
        let p = payload(len, i as u8);
        let answer = call(vip, &p).await?;
        assert_eq!(served_by(&answer, &p), Some("b"), "{len} bytes");
    }

    // The hub recorded B's tunnel address as its gateway announced it.
    let shown: Value = serde_json::from_slice(
        &w.c.run_cli_ok(["pop", "show", "pop-b", "-o", "json"])
            .await?,
    )?;
    let b_ready = w.b.ready_json()?;
    assert_eq!(shown["gateway_addr"], b_ready["gateway_advertise"]);
    assert_eq!(b_ready["gateway_advertise"], b_ready["gateway_tunnel"]);

    // RTTs measured by A's gateway reach the hub's state (read from the
    // stopped node's disk; restarted to try again until they are there).
    // Then every hub node is down.
    let start = std::time::Instant::now();
    loop {
        w.c.stop(1).await?;
        let state = w.c.stopped_state(1).await?;
        let rtt = state
            .rtts
            .get(&("pop-a".to_string(), "pop-b".to_string()))
            .cloned();
        if let Some(r) = rtt {
            println!("RTT pop-a -> pop-b stored: {r:?}");
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!("no RTT from pop-a to pop-b in the hub's state within {DEADLINE:?}");
        }
        w.c.restart(1).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Every hub node down: A keeps its view and B still serves.
    let p = payload(4096, 9);
    assert_eq!(served_by(&call(vip, &p).await?, &p), Some("b"));

    // B dies (power cut: agent and its gateway). New connections from A
    // go to C, decided by A's gateway alone.
    w.b.kill();
    let misses = until_served_by(vip, "c", "after B died").await?;
    println!("connections not served by C after B died: {misses}");
    for i in 0..5u8 {
        let p = payload(32 * 1024, i);
        let answer = call(vip, &p).await?;
        assert_eq!(served_by(&answer, &p), Some("c"), "call {i} after failover");
    }
    drop(w.dir);
    Ok(())
}

/// A QUIC client of a gateway tunnel with the given TLS identity.
fn tunnel_client(
    cert_chain: &str,
    key: &str,
    ca: &str,
    domain: &str,
    pop: &str,
) -> Result<quinn::Endpoint> {
    let tls = switchyard_pki::client_config(
        Some((cert_chain, key)),
        ca,
        switchyard_pki::ExpectedPeer::AnyOfPop {
            domain: domain.into(),
            pop: pop.into(),
        },
        vec![b"switchyard-gw/1".to_vec()],
    )?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(ep)
}

/// The tunnel stream header (dataplane `header.rs`, version 1).
fn header(ns: &str, name: &str, port: u16) -> Vec<u8> {
    let len = 1 + 2 + 1 + ns.len() + 1 + name.len();
    let mut h = (len as u16).to_be_bytes().to_vec();
    h.push(1);
    h.extend_from_slice(&port.to_be_bytes());
    h.push(ns.len() as u8);
    h.extend_from_slice(ns.as_bytes());
    h.push(name.len() as u8);
    h.extend_from_slice(name.as_bytes());
    h
}

/// Opens one stream for `ns/name:port` on `conn`; returns the status byte
/// (None if the stream ended without one) and, when 0, the answer to `x`.
async fn ask(
    conn: &quinn::Connection,
    ns: &str,
    name: &str,
    port: u16,
) -> Result<(Option<u8>, Vec<u8>)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&header(ns, name, port)).await?;
    let mut status = [0u8; 1];
    let status = match tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut status))
        .await
        .context("no status within 10 s")?
    {
        Ok(()) => status[0],
        Err(_) => return Ok((None, Vec::new())),
    };
    if status != 0 {
        return Ok((Some(status), Vec::new()));
    }
    send.write_all(b"x").await?;
    send.finish()?;
    let body = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .context("no answer within 10 s")??;
    Ok((Some(0), body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_gateway_process_and_refusals() -> Result<()> {
    let mut w = world(vec!["--gateway-api".into(), "127.0.0.1:0".into()]).await?;
    let mut gw = GatewayProcess::start(
        bin(),
        w.dir.path(),
        &w.a,
        "gw0",
        &["--probe-interval".into(), "50ms".into()],
    )
    .await?;
    wait_routes(&w.a).await?;
    let ready = gw
        .wait_ready("the VIP listener of demo/echo", |v| {
            listener(v, NS, SVC).is_some()
        })
        .await?;
    let vip = listener(&ready, NS, SVC).context("listener")?;
    // The separate gateway, fed over the local API, serves in tier order.
    until_served_by(vip, "b", "through the separate gateway").await?;
    let p = payload(256 * 1024, 3);
    assert_eq!(served_by(&call(vip, &p).await?, &p), Some("b"));
    // demo/private is exported to B only: A has no listener for it.
    assert!(listener(&gw.ready_json()?, NS, PRIVATE).is_none());
    assert!(!w.a.view().await?["services"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["name"] == PRIVATE)));
    // A's gateway certificate was issued by the hub through A's agent and
    // stored in its data dir (key 0600).
    let tls = w.a.data_dir.join("tls");
    let gw_cert = std::fs::read_to_string(tls.join("gw-gw0.crt"))?;
    let gw_key = std::fs::read_to_string(tls.join("gw-gw0.key"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tls.join("gw-gw0.key"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let ca = std::fs::read_to_string(tls.join("ca.crt"))?;
    let domain = w.a.ready_json()?["domain"]
        .as_str()
        .context("domain")?
        .to_string();
    let b_tunnel: SocketAddr =
        w.b.wait_ready_json("B's tunnel", |v| v.get("gateway_tunnel").is_some())
            .await?["gateway_tunnel"]
            .as_str()
            .context("tunnel")?
            .parse()?;

    // With A's gateway identity: demo/echo is served (the control), and
    // demo/private, not exported to A, is refused by B's gateway.
    let chain = format!("{}\n{ca}", gw_cert.trim_end());
    let ep = tunnel_client(&chain, &gw_key, &ca, &domain, "pop-b")?;
    let conn = ep.connect(b_tunnel, switchyard_pki::SNI_NAME)?.await?;
    let (status, body) = ask(&conn, NS, SVC, PORT).await?;
    assert_eq!(status, Some(0));
    assert_eq!(body, b"b:x");
    let (status, _) = ask(&conn, NS, PRIVATE, PRIVATE_PORT).await?;
    assert!(
        status.is_some_and(|s| s != 0),
        "B's gateway served demo/private to pop-a (status {status:?})"
    );

    // A's POP certificate (valid, but not a gateway's) gets nothing.
    let pop_chain = format!(
        "{}\n{ca}",
        std::fs::read_to_string(tls.join("pop.crt"))?.trim_end()
    );
    let pop_key = std::fs::read_to_string(tls.join("pop.key"))?;
    let ep2 = tunnel_client(&pop_chain, &pop_key, &ca, &domain, "pop-b")?;
    let refused = async {
        let conn = ep2.connect(b_tunnel, switchyard_pki::SNI_NAME)?.await?;
        let (status, _) = ask(&conn, NS, SVC, PORT).await?;
        anyhow::Ok(status)
    }
    .await;
    assert!(
        !matches!(refused, Ok(Some(0))),
        "a POP certificate was served: {refused:?}"
    );

    // A gateway certificate of another CA fails the handshake.
    let other = switchyard_pki::CertificateAuthority::generate(&domain)?;
    let fake = other.issue(
        &switchyard_pki::SpiffeId::gateway(&domain, "pop-a", "gw0")?,
        Duration::from_secs(3600),
    )?;
    let fake_chain = format!("{}\n{}", fake.cert_pem.trim_end(), other.cert_pem());
    let ep3 = tunnel_client(&fake_chain, &fake.key_pem, &ca, &domain, "pop-b")?;
    let refused = async {
        let conn = ep3.connect(b_tunnel, switchyard_pki::SNI_NAME)?.await?;
        let (status, _) = ask(&conn, NS, SVC, PORT).await?;
        anyhow::Ok(status)
    }
    .await;
    assert!(
        !matches!(refused, Ok(Some(0))),
        "a certificate of another CA was served: {refused:?}"
    );

    // A's agent dies: its separate gateway keeps the last view and serves.
    w.a.kill();
    for i in 0..3u8 {
        let p = payload(8192, i);
        let answer = call(vip, &p).await?;
        assert_eq!(
            served_by(&answer, &p),
            Some("b"),
            "call {i} with A's agent gone\n{}",
            log_tail(&gw.log, 20)
        );
    }
    gw.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_command_refuses_bad_input_clearly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .arg("gateway")
            .args(args)
            .env("NO_COLOR", "1")
            .output()
    };
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "abc\n")?;
    let s = secret.to_str().context("path")?;
    let out = run(&["--instance", "Bad_Name", "--secret-file", s])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--instance"), "{err}");

    let missing = dir.path().join("missing");
    let out = run(&["--secret-file", missing.to_str().context("path")?])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret"), "{err}");

    // Nothing listens there: a clear error, not a hang.
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let free = l.local_addr()?.to_string();
    drop(l);
    let out = run(&["--agent", &free, "--secret-file", s])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("local API"), "{err}");

    let out = run(&["--vip-bind", "somewhere", "--secret-file", s])?;
    assert!(!out.status.success());
    Ok(())
}

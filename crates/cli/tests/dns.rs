//! DNS with real processes: three POP agents with `--dns` export a
//! headless service; each agent's `clusterset.local` answers follow its
//! view's tiers (SRV priority = tier), and when a POP is SIGKILLed the
//! answers at every other POP drop it. The hub nodes serve the global zone
//! (`--dns --global-zone`), ordering POP gateways for the client's POP.
//! Queries are made with `dig`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use switchyard_tests::agent::{self, Agent};
use switchyard_tests::{Cluster, Options, DEADLINE};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

const NS: &str = "demo";
const SVC: &str = "db";

async fn dig(addr: SocketAddr, args: &[&str]) -> String {
    switchyard_tests::dig(addr, args).await.unwrap()
}

/// SRV answers as (priority, POP) pairs, from the targets
/// `db-<pop>.<pop>.db.demo.svc.clusterset.local.`.
async fn srv(addr: SocketAddr) -> BTreeSet<(u32, String)> {
    let out = dig(
        addr,
        &["+short", "_db._tcp.db.demo.svc.clusterset.local.", "SRV"],
    )
    .await;
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let prio = f.first()?.parse().ok()?;
            let pop = f.get(3)?.split('.').nth(1)?.to_string();
            Some((prio, pop))
        })
        .collect()
}

/// What the SRV answers must be for these tiers.
fn expected(tiers: &[Vec<String>]) -> BTreeSet<(u32, String)> {
    tiers
        .iter()
        .enumerate()
        .flat_map(|(i, t)| t.iter().map(move |p| (i as u32, p.clone())))
        .collect()
}

/// Waits until `a`'s SRV answers agree with its view's tiers and `ok`
/// holds for those tiers; returns them.
async fn wait_dns_agrees(
    a: &Agent,
    what: &str,
    ok: impl Fn(&[Vec<String>]) -> bool,
) -> Result<Vec<Vec<String>>> {
    let dns = a.dns_addr()?;
    let start = Instant::now();
    let mut last = (Vec::new(), BTreeSet::new());
    while start.elapsed() < DEADLINE {
        let tiers = a.tiers(NS, SVC).await?;
        let answers = srv(dns).await;
        if ok(&tiers) && answers == expected(&tiers) && a.tiers(NS, SVC).await? == tiers {
            return Ok(tiers);
        }
        last = (tiers, answers);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{}: {what} not seen within {DEADLINE:?}; last tiers {:?}, SRV {:?}",
        a.pop,
        last.0,
        last.1
    )
}

fn services_toml(pop: &str, backend: SocketAddr) -> String {
    format!(
        "[[services]]\nnamespace = \"{NS}\"\nname = \"{SVC}\"\ntype = \"Headless\"\n\
         ports = [{{ name = \"db\", port = 5432 }}]\n\
         endpoints = [{{ address = \"127.0.0.1\", port = {port}, hostname = \"db-{pop}\" }}]\n\
         [services.probe]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 200\n",
        port = backend.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_dns_follows_the_view_when_a_pop_dies() -> Result<()> {
    let c = Cluster::start(bin(), 3).await?;
    let dir = tempfile::tempdir()?;
    let mut agents = Vec::new();
    let mut backends = Vec::new();
    for (pop, region) in [
        ("north-1", "north"),
        ("north-2", "north"),
        ("south-1", "south"),
    ] {
        let (addr, h) = agent::tcp_backend().await?;
        backends.push(h);
        agents.push(
            agent::enrol_with(
                &c,
                dir.path(),
                pop,
                region,
                &agent::random_vip_cidr(),
                &services_toml(pop, addr),
                &["--dns".to_string(), "127.0.0.1:0".to_string()],
            )
            .await?,
        );
    }
    let [n1, n2, s1] = &mut agents[..] else {
        unreachable!()
    };
    // Locality tiers, and DNS agrees with them at every POP.
    let t = wait_dns_agrees(n2, "three tiers", |t| t.len() == 3).await?;
    assert_eq!(t, [vec!["north-2"], vec!["north-1"], vec!["south-1"]]);
    let t = wait_dns_agrees(s1, "two tiers", |t| t.len() == 2 && t[1].len() == 2).await?;
    assert_eq!(t, [vec!["south-1"], vec!["north-1", "north-2"]]);
    wait_dns_agrees(n1, "three tiers", |t| t.len() == 3).await?;
    // Headless A answers: every POP's endpoint (all on 127.0.0.1 here),
    // and the endpoint names resolve.
    let n2dns = n2.dns_addr()?;
    let out = dig(n2dns, &["+short", "db.demo.svc.clusterset.local.", "A"]).await;
    assert_eq!(out.trim(), "127.0.0.1", "{out}");
    let out = dig(
        n2dns,
        &[
            "+short",
            "db-south-1.south-1.db.demo.svc.clusterset.local.",
            "A",
        ],
    )
    .await;
    assert_eq!(out.trim(), "127.0.0.1", "{out}");
    // The epoch TXT is the view's.
    let epoch = n2.view().await?["epoch"].clone();
    let out = dig(
        n2dns,
        &["+short", "epoch.switchyard.clusterset.local.", "TXT"],
    )
    .await;
    assert_eq!(out.trim().trim_matches('"'), epoch.to_string(), "{out}");

    // The agent counts its DNS answers in /metrics (flushed when the
    // server is idle).
    let start = Instant::now();
    loop {
        let (_, text) = switchyard_tests::http_get(n2.http, "/metrics").await?;
        let answers = switchyard_tests::metric(
            &text,
            "switchyard_agent_dns_queries_total",
            &[("outcome", "answer")],
        );
        if answers >= 3.0 {
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!("DNS answers not counted in /metrics: {answers}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // north-1 dies: both other POPs stop answering it, in line with their
    // views.
    n1.kill();
    let t = wait_dns_agrees(n2, "north-1 gone", |t| {
        t.len() == 2 && !t.iter().flatten().any(|p| p == "north-1")
    })
    .await?;
    assert_eq!(t, [vec!["north-2"], vec!["south-1"]]);
    let t = wait_dns_agrees(s1, "north-1 gone", |t| {
        t.len() == 2 && !t.iter().flatten().any(|p| p == "north-1")
    })
    .await?;
    assert_eq!(t, [vec!["south-1"], vec!["north-2"]]);
    let out = dig(
        n2dns,
        &["db-north-1.north-1.db.demo.svc.clusterset.local.", "A"],
    )
    .await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    drop(backends);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_global_zone_orders_gateways_for_the_client() -> Result<()> {
    let opts = Options {
        hub_args: ["--dns", "127.0.0.1:0", "--global-zone", "global.test."]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    };
    let c = Cluster::start_with(bin(), 2, opts).await?;
    let dir = tempfile::tempdir()?;
    let mut agents = Vec::new();
    let mut backends = Vec::new();
    // Each POP's gateway tunnel on its own loopback address, so the
    // global zone's answers tell the POPs apart.
    for (i, (pop, region, subnet)) in [
        ("east-1", "east", "10.1.0.0/16"),
        ("west-1", "west", "10.2.0.0/16"),
    ]
    .into_iter()
    .enumerate()
    {
        let (addr, h) = agent::tcp_backend().await?;
        backends.push(h);
        let tunnel = format!("127.0.1.{}:0", i + 1);
        let a = agent::enrol_with(
            &c,
            dir.path(),
            pop,
            region,
            &agent::random_vip_cidr(),
            &services_toml(pop, addr),
            &["--gateway", "--tunnel", &tunnel].map(String::from),
        )
        .await?;
        c.run_cli_ok([
            "pop",
            "add",
            pop,
            "--region",
            region,
            "--label",
            &format!("subnets={subnet}"),
        ])
        .await?;
        agents.push(a);
    }
    let dns: Vec<SocketAddr> = c
        .ids()
        .iter()
        .map(|id| {
            c.node(*id).ready_json().unwrap()["dns"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let name = "db.demo.global.test.";
    let start = Instant::now();
    let order = |addr: SocketAddr, subnet: &'static str| async move {
        let s = format!("+subnet={subnet}");
        dig(addr, &["+short", &s, name, "A"]).await
    };
    // Every hub node answers, for each client subnet its own POP first.
    loop {
        let mut ok = true;
        for d in &dns {
            ok &= order(*d, "10.1.2.0/24").await.lines().collect::<Vec<_>>()
                == ["127.0.1.1", "127.0.1.2"];
            ok &= order(*d, "10.2.2.0/24").await.lines().collect::<Vec<_>>()
                == ["127.0.1.2", "127.0.1.1"];
        }
        if ok {
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!(
                "global zone answers never ordered per client: {:?} / {:?}",
                order(dns[0], "10.1.2.0/24").await,
                order(dns[0], "10.2.2.0/24").await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // west-1 dies: once the hub marks it offline, no node answers it.
    agents[1].kill();
    let start = Instant::now();
    loop {
        let mut ok = true;
        for d in &dns {
            ok &= order(*d, "10.2.2.0/24").await.trim() == "127.0.1.1";
        }
        if ok {
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!(
                "west-1 still answered: {:?}",
                order(dns[0], "10.2.2.0/24").await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = c.metrics(c.ids()[0]).await?;
    assert!(
        metrics.contains("switchyard_dns_global_zone_rebuild_seconds"),
        "staleness metrics exported"
    );
    drop(backends);
    Ok(())
}

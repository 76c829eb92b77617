//! Three POPs enrol into a 3-node hub and export one service; a POP that
//! goes dark (SIGKILL, SIGSTOP) leaves every other POP's tiers and comes
//! back only after failback damping; a hub leader SIGKILL marks no POP
//! offline. Real `switchyard hub` and `switchyard agent` processes.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;
use switchyard_tests::{
    agent::{self, Agent},
    Cluster, DEADLINE,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

async fn pops(c: &Cluster) -> Result<Value> {
    Ok(serde_json::from_slice(
        &c.run_cli_ok(["pop", "list", "-o", "json"]).await?,
    )?)
}

fn pop_field<'a>(pops: &'a Value, name: &str, field: &str) -> &'a Value {
    pops.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .map_or(&Value::Null, |p| &p[field])
}

/// Waits until `pop list` satisfies `ok`.
async fn wait_pops(c: &Cluster, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let start = std::time::Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < DEADLINE {
        if let Ok(p) = pops(c).await {
            if ok(&p) {
                return Ok(p);
            }
            last = p;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("{what} not seen within {DEADLINE:?}; last: {last}")
}

/// Enrols and starts one agent per (POP, region), each exporting demo/echo.
async fn start_agents(c: &Cluster, dir: &Path, pops: &[(&str, &str)]) -> Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for (pop, region) in pops {
        agents.push(agent::enrol(c, dir, pop, region, &[(NS, SVC)]).await?);
    }
    Ok(agents)
}

const NS: &str = "demo";
const SVC: &str = "echo";

fn without(tiers: &[Vec<String>], pop: &str) -> bool {
    !tiers.is_empty() && tiers.iter().all(|t| !t.iter().any(|p| p == pop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pops_fail_over_and_fail_back() -> Result<()> {
    let c = Cluster::start(bin(), 3).await?;
    // Damping long enough to observe, short enough for a test.
    c.run_cli_ok(["policy", "set", "demo/echo", "--failback-after", "4s"])
        .await?;
    let dir = tempfile::tempdir()?;
    let mut agents = start_agents(
        &c,
        dir.path(),
        &[
            ("north-1", "north"),
            ("north-2", "north"),
            ("south-1", "south"),
        ],
    )
    .await?;
    let [n1, n2, s1] = &mut agents[..] else {
        unreachable!()
    };

    // Locality: own POP, then same region, then the other region.
    let t = n2
        .wait_tiers(NS, SVC, "locality tiers at north-2", |t| t.len() == 3)
        .await?;
    assert_eq!(t, vec![vec!["north-2"], vec!["north-1"], vec!["south-1"]]);
    // Both northern POPs are "another region" to south-1: one tier.
    let t = s1
        .wait_tiers(NS, SVC, "locality tiers at south-1", |t| {
            t.len() == 2 && t[1].len() == 2
        })
        .await?;
    assert_eq!(t, vec![vec!["south-1"], vec!["north-1", "north-2"]]);
    println!("tiers before: north-2 {:?}", n2.tiers(NS, SVC).await?);

    // north-1 goes dark (power cut): every other POP drops it.
    n1.kill();
    for a in [&*n2, &*s1] {
        let t = a
            .wait_tiers(NS, SVC, "north-1 dropped", |t| without(t, "north-1"))
            .await?;
        println!("{} after north-1 died: {t:?}", a.pop);
    }
    wait_pops(&c, "north-1 offline", |p| {
        pop_field(p, "north-1", "liveness") == "offline"
    })
    .await?;

    // It comes back: online but damped, so still in no other POP's tier...
    n1.restart().await?;
    let p = wait_pops(&c, "north-1 online and damped", |p| {
        pop_field(p, "north-1", "liveness") == "online" && pop_field(p, "north-1", "damped") == true
    })
    .await?;
    assert_eq!(pop_field(&p, "north-1", "damped"), &Value::Bool(true));
    let t = n2.tiers(NS, SVC).await?;
    assert!(
        without(&t, "north-1"),
        "damped north-1 is in north-2's tiers: {t:?}"
    );
    // ...until failback_after has passed; then it re-enters its old tier.
    let t = n2
        .wait_tiers(NS, SVC, "north-1 back after damping", |t| t.len() == 3)
        .await?;
    assert_eq!(t, vec![vec!["north-2"], vec!["north-1"], vec!["south-1"]]);

    // SIGSTOP: a POP that hangs is dropped too, and returns after SIGCONT.
    s1.signal(libc::SIGSTOP)?;
    n2.wait_tiers(NS, SVC, "south-1 dropped", |t| without(t, "south-1"))
        .await?;
    s1.signal(libc::SIGCONT)?;
    n2.wait_tiers(NS, SVC, "south-1 back", |t| t.len() == 3)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_leader_death_marks_no_pop_offline_and_views_survive_the_hub() -> Result<()> {
    let mut c = Cluster::start(bin(), 3).await?;
    c.run_cli_ok(["policy", "set", "demo/echo", "--failback-after", "30s"])
        .await?;
    let dir = tempfile::tempdir()?;
    let agents = start_agents(
        &c,
        dir.path(),
        &[("north-1", "north"), ("south-1", "south")],
    )
    .await?;
    let before = agents[0]
        .wait_tiers(NS, SVC, "both POPs in tiers", |t| t.len() == 2)
        .await?;
    let p = wait_pops(&c, "both online", |p| {
        pop_field(p, "north-1", "liveness") == "online"
            && pop_field(p, "south-1", "liveness") == "online"
    })
    .await?;
    let index_before: Vec<Value> = ["north-1", "south-1"]
        .iter()
        .map(|n| pop_field(&p, n, "liveness_index").clone())
        .collect();

    let leader = c.leader().await?;
    // (POP, uplink session) for the POPs the leader holds.
    let held_by_leader: Vec<(String, Value)> = ["north-1", "south-1"]
        .iter()
        .filter(|n| pop_field(&p, n, "hub_node").as_str() == Some(leader.to_string().as_str()))
        .map(|n| (n.to_string(), pop_field(&p, n, "session").clone()))
        .collect();
    c.kill(leader)?;
    // Agents on the dead node reconnect elsewhere; give detectors on the
    // surviving nodes more than their offline budget to (wrongly) fire.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    c.restart(leader).await?;
    c.wait_all_ready().await?;
    let p = pops(&c).await?;
    for (i, n) in ["north-1", "south-1"].iter().enumerate() {
        assert_eq!(pop_field(&p, n, "liveness"), "online", "{n}: {p}");
        assert_eq!(
            pop_field(&p, n, "liveness_index"),
            &index_before[i],
            "{n} had a liveness transition while the hub leader died: {p}"
        );
    }
    for a in &agents {
        let t = a.tiers(NS, SVC).await?;
        assert_eq!(t.len(), 2, "{}: view lost content: {t:?}", a.pop);
    }
    assert_eq!(agents[0].tiers(NS, SVC).await?, before);
    // POPs whose hub node died are taken over by a new session (on another
    // node, or on the restarted one) once the agent notices: QUIC idle
    // timeout, as a dead node sends no close.
    let p = wait_pops(
        &c,
        "POPs of the dead hub node taken over by a new session",
        |p| {
            held_by_leader.iter().all(|(n, session)| {
                let now = pop_field(p, n, "session");
                now != session && now != ""
            })
        },
    )
    .await?;
    for n in ["north-1", "south-1"] {
        assert_eq!(pop_field(&p, n, "liveness"), "online", "{n}: {p}");
    }
    for a in &agents {
        let (_, m) = switchyard_tests::http_get(a.http, "/metrics").await?;
        assert!(
            m.contains("switchyard_agent_connected 1\n"),
            "{} is not connected:\n{m}",
            a.pop
        );
    }

    // Every hub node down: agents keep serving their last view.
    for id in c.ids() {
        c.kill(id)?;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for a in &agents {
        assert_eq!(
            a.tiers(NS, SVC).await?.len(),
            2,
            "{} lost its view with the hub down",
            a.pop
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_dying_with_its_hub_node_is_marked_offline() -> Result<()> {
    let mut c = Cluster::start(bin(), 3).await?;
    let dir = tempfile::tempdir()?;
    let mut agents = start_agents(
        &c,
        dir.path(),
        &[("north-1", "north"), ("south-1", "south")],
    )
    .await?;
    agents[1]
        .wait_tiers(NS, SVC, "both POPs in tiers", |t| t.len() == 2)
        .await?;
    let p = wait_pops(&c, "north-1 held by a hub node", |p| {
        pop_field(p, "north-1", "hub_node")
            .as_str()
            .is_some_and(|h| h != "-")
    })
    .await?;
    let holder: u64 = pop_field(&p, "north-1", "hub_node")
        .as_str()
        .and_then(|h| h.parse().ok())
        .expect("hub node id");
    // The POP and the hub node holding its session die together: no
    // detector anywhere watches it any more; the leader's sweep must.
    agents[0].kill();
    c.kill(holder)?;
    agents[1]
        .wait_tiers(NS, SVC, "north-1 dropped at south-1", |t| {
            without(t, "north-1")
        })
        .await?;
    let p = wait_pops(&c, "north-1 offline", |p| {
        pop_field(p, "north-1", "liveness") == "offline"
    })
    .await?;
    println!("north-1: {}", pop_field(&p, "north-1", "liveness_reason"));
    assert_eq!(pop_field(&p, "south-1", "liveness"), "online", "{p}");
    Ok(())
}

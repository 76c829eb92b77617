//! The status page, `pop list` and `switchyard status` as an operator sees
//! them: two POPs on a 3-node hub, one killed. The page is rendered by
//! headless Chromium (Debian `chromium`, installed by scripts/test), so its
//! JavaScript really runs against `/api/status`.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use switchyard_tests::{agent, http_get, Cluster, DEADLINE};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn chromium() -> Result<&'static str> {
    for c in ["chromium", "chromium-browser"] {
        if Command::new(c).arg("--version").output().is_ok() {
            return Ok(c);
        }
    }
    bail!("chromium is not installed: run scripts/test (it installs the Debian package `chromium`)")
}

/// The page's DOM after its scripts ran (a few refreshes of virtual time).
fn render(url: &str) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let out = Command::new(chromium()?)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .context("running chromium")?;
    if !out.status.success() {
        bail!(
            "chromium failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Renders until the DOM contains every needle.
async fn wait_page(url: &str, needles: &[&str]) -> Result<String> {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < DEADLINE {
        let u = url.to_string();
        last = tokio::task::spawn_blocking(move || render(&u)).await??;
        if needles.iter().all(|n| last.contains(n)) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("page never showed {needles:?}; last DOM:\n{last}")
}

fn pop<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_pop_list_and_status_follow_a_pop_going_offline() -> Result<()> {
    chromium()?;
    let c = Cluster::start(bin(), 3).await?;
    let dir = tempfile::tempdir()?;
    let north = agent::enrol(&c, dir.path(), "north-1", "north", &[("demo", "echo")]).await?;
    let mut south = agent::enrol(&c, dir.path(), "south-1", "south", &[("demo", "echo")]).await?;
    north
        .wait_tiers("demo", "echo", "both POPs in tiers", |t| t.len() == 2)
        .await?;

    // pop list: every connected POP has an agent version and a recent
    // heartbeat, gathered from whichever hub node holds it.
    let start = std::time::Instant::now();
    let list = loop {
        let l: Value = serde_json::from_slice(&c.run_cli_ok(["pop", "list", "-o", "json"]).await?)?;
        let fresh = ["north-1", "south-1"]
            .iter()
            .all(|p| pop(&l, p)["last_heartbeat_ms"].is_i64());
        if fresh || start.elapsed() > DEADLINE {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for p in ["north-1", "south-1"] {
        let row = pop(&list, p);
        assert_eq!(row["connected"], true, "{p}: {row}");
        assert_eq!(
            row["agent_version"],
            env!("CARGO_PKG_VERSION"),
            "{p}: {row}"
        );
        assert!(row["last_heartbeat_ms"].is_i64(), "{p}: {row}");
    }
    let table = String::from_utf8(c.run_cli_ok(["pop", "list"]).await?)?;
    assert!(
        table.contains("HEARTBEAT") && table.contains("s ago"),
        "{table}"
    );

    // Every node serves the page; node 2 need not hold any POP.
    let node = c.node(2);
    let (code, html) = http_get(node.http, "/").await?;
    assert_eq!(code, 200);
    assert!(html.contains("<script>"), "{html}");
    let url = format!("http://{}/", node.http);
    let dom = wait_page(
        &url,
        &[
            r#"data-pop="north-1" data-state="online""#,
            r#"data-pop="south-1" data-state="online""#,
            r#"data-service="demo/echo""#,
        ],
    )
    .await?;
    assert!(dom.contains("s ago"), "no heartbeat age shown:\n{dom}");

    // A power cut at south-1: the page shows it offline, with the event.
    south.kill();
    let dom = wait_page(
        &url,
        &[
            r#"data-pop="south-1" data-state="offline""#,
            r#"data-event-pop="south-1""#,
        ],
    )
    .await?;
    assert!(dom.contains(r#"data-pop="north-1" data-state="online""#));

    // switchyard status: the same story on one screen.
    let s: Value = serde_json::from_slice(&c.run_cli_ok(["status", "-o", "json"]).await?)?;
    let rows = &s["pop_list"];
    assert_eq!(pop(rows, "south-1")["liveness"], "offline", "{s}");
    assert_eq!(pop(rows, "north-1")["liveness"], "online", "{s}");
    assert!(
        s["events"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["pop"] == "south-1" && e["liveness"] == "offline")),
        "{s}"
    );
    let text = String::from_utf8(c.run_cli_ok(["status"]).await?)?;
    assert!(
        text.contains("recent events") && text.contains("south-1"),
        "{text}"
    );
    drop(north);
    Ok(())
}

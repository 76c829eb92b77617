//! A POP agent against a real hub process: enrolment with a token from
//! `switchyard token create --pop`, exports over QUIC, the POP's own view
//! (its service in tier 0), the files left in the data dir, and a restart
//! with no hub reachable that serves the same view from disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use switchyard_tests::{http_get, log_tail, Cluster};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// An agent process, killed on drop (its log printed if the test panics).
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(args: &[&str], log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin())
            .arg("agent")
            .args(args)
            .env_remove("SWITCHYARD_TOKEN")
            .env("RUST_LOG", "info,switchyard_agent=debug")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()?;
        Ok(Self {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", log_tail(&self.log, 60));
        }
    }
}

async fn wait_ready_file(path: &Path) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return Ok(v);
            }
        }
        if Instant::now() > deadline {
            bail!("no ready file {}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/debug/view` until `ok` holds for it.
async fn wait_view(http: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let addr = http.parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    loop {
        if let Ok((200, body)) = http_get(addr, "/debug/view").await {
            let v: Value = serde_json::from_str(&body)?;
            if ok(&v) {
                return Ok(v);
            }
            last = body;
        }
        if Instant::now() > deadline {
            bail!("{what}: not seen within 30 s; last /debug/view: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tier0_has(v: &Value, pop: &str, ns: &str, name: &str, endpoint: &str) -> bool {
    v["services"].as_array().into_iter().flatten().any(|s| {
        s["namespace"] == ns
            && s["name"] == name
            && s["tiers"][0]["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| {
                    t["pop"] == pop
                        && t["endpoints"].as_array().into_iter().flatten().any(|e| {
                            format!("{}:{}", e["address"].as_str().unwrap_or(""), e["port"])
                                == endpoint
                        })
                })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrols_exports_and_serves_its_view_then_lkg_without_hub() -> Result<()> {
    let mut c = Cluster::start(bin(), 1).await?;
    let token = String::from_utf8(
        c.run_cli_ok(["token", "create", "--pop", "north-1", "--region", "eu"])
            .await?,
    )?
    .trim()
    .to_string();

    // A live backend, so the agent's TCP probe finds the endpoint ready.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = backend.local_addr()?.to_string();
    let accept = tokio::spawn(async move {
        loop {
            if backend.accept().await.is_err() {
                break;
            }
        }
    });

    let work = tempfile::tempdir()?;
    let data = work.path().join("agent");
    let services = work.path().join("services.toml");
    std::fs::write(
        &services,
        format!(
            r#"
[[services]]
namespace = "shop"
name = "cart"
ports = [{{ name = "http", port = 80 }}]
endpoints = [{{ address = "127.0.0.1", port = {port} }}]
[services.probe]
kind = "tcp"
interval_ms = 200
"#,
            port = backend_port(&endpoint)
        ),
    )?;
    let ready = work.path().join("ready.json");
    let log = work.path().join("agent.log");
    let grpc = c.node(1).grpc.to_string();
    let data_s = data.display().to_string();
    let services_s = services.display().to_string();
    let ready_s = ready.display().to_string();
    let mut agent = Agent::start(
        &[
            "--hub",
            &grpc,
            "--token",
            &token,
            "--data-dir",
            &data_s,
            "--services",
            &services_s,
            "--http",
            "127.0.0.1:0",
            "--ready-file",
            &ready_s,
        ],
        &log,
    )?;
    let info = wait_ready_file(&ready).await?;
    assert_eq!(info["pop"], "north-1");
    let http = info["http"]
        .as_str()
        .context("http in ready file")?
        .to_string();

    let view = wait_view(&http, "own service in tier 0 from the hub", |v| {
        v["source"] == "hub" && tier0_has(v, "north-1", "shop", "cart", &endpoint)
    })
    .await?;
    assert_eq!(view["pop"], "north-1");
    let epoch = view["epoch"].as_u64().unwrap();
    assert!(epoch > 0);
    let cart = view["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "cart")
        .unwrap();
    assert!(!cart["vip"].as_str().unwrap().is_empty(), "{cart}");
    assert_eq!(cart["ports"][0]["port"], 80);

    // Metrics and readiness.
    let (code, metrics) = http_get(http.parse()?, "/metrics").await?;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("switchyard_agent_connected 1\n"),
        "{metrics}"
    );
    let (code, readyz) = http_get(http.parse()?, "/readyz").await?;
    assert_eq!(code, 200, "{readyz}");

    // The hub sees the export under the certificate's POP.
    let out = String::from_utf8(c.run_cli_ok(["-o", "json", "service", "list"]).await?)?;
    assert!(out.contains("cart"), "{out}");

    // The data dir.
    let record = std::fs::read_to_string(data.join("agent.toml"))?;
    assert!(record.contains("north-1"), "{record}");
    assert!(!record.contains(&token));
    for f in ["tls/pop.crt", "tls/pop.key", "tls/ca.crt", "view.lkg"] {
        assert!(data.join(f).exists(), "{f} missing");
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.join("tls/pop.key"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seq: u64 = std::fs::read_to_string(data.join("export_seq"))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        if seq >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "export seq never persisted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The token is spent and never written anywhere in the data dir.
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry)?;
        let secret = token.rsplit('.').next().unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "{} holds the token secret",
            entry.display()
        );
    }

    // No hub at all, agent restarted without a token: the same view from disk.
    agent.kill();
    c.kill(1)?;
    let latest = {
        let lkg = switchyard_agent::lkg::Lkg::load(&data)?.context("view.lkg")?;
        lkg.epoch
    };
    assert!(latest >= epoch);
    std::fs::remove_file(&ready)?;
    let _agent2 = Agent::start(
        &[
            "--data-dir",
            &data_s,
            "--services",
            &services_s,
            "--http",
            "127.0.0.1:0",
            "--ready-file",
            &ready_s,
        ],
        &log,
    )?;
    let info = wait_ready_file(&ready).await?;
    let http = info["http"].as_str().unwrap().to_string();
    let view = wait_view(&http, "last-known-good view after restart", |v| {
        v["source"] == "lkg"
    })
    .await?;
    assert_eq!(view["epoch"].as_u64(), Some(latest));
    assert!(tier0_has(&view, "north-1", "shop", "cart", &endpoint));
    let (code, readyz) = http_get(http.parse()?, "/readyz").await?;
    assert_eq!(code, 200, "{readyz}");
    assert!(readyz.contains("\"lkg\""), "{readyz}");
    accept.abort();
    Ok(())
}

fn backend_port(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

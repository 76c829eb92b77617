//! `switchyard dev` used the way a newcomer uses it, through the built
//! binary only: start it, resolve the demo services with `dig` at every
//! POP, fetch `ledger.demo` through north-2's gateway, cut north-1's power
//! and watch DNS (SRV tiers) and traffic move to south-1, revive it and
//! watch traffic return after the failback delay, then Ctrl-C (SIGINT)
//! and find no process left behind.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use switchyard_tests::{http_get, log_tail, DEADLINE};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// `switchyard dev` as a child, with its output in a log file.
struct Dev {
    child: std::process::Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    fn start(dir: &Path) -> Result<Dev> {
        let log = dir.join("dev.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin())
            .args(["dev", "--failback-after", "3s", "--dir"])
            .arg(dir.join("fed"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting switchyard dev")?;
        Ok(Dev {
            child,
            dir: dir.join("fed"),
            log,
        })
    }

    /// dev.json once every POP has its services' VIPs.
    async fn info(&mut self) -> Result<Value> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE * 2 {
            if let Some(st) = self.child.try_wait()? {
                bail!("dev exited ({st}):\n{}", log_tail(&self.log, 40));
            }
            if let Ok(b) = std::fs::read(self.dir.join("dev.json")) {
                if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                    let pops = v["pops"].as_array().map_or(0, |p| {
                        p.iter()
                            .filter(|p| p["services"].as_array().is_some_and(|s| s.len() == 2))
                            .count()
                    });
                    if pops == 3 {
                        return Ok(v);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "dev.json never listed 3 POPs with their services:\n{}",
            log_tail(&self.log, 40)
        )
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bin())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "switchyard {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn pop<'a>(info: &'a Value, name: &str) -> &'a Value {
    info["pops"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn vip_of(info: &Value, at: &str, service: &str) -> String {
    pop(info, at)["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .map(|s| format!("{}:{}", s["vip"].as_str().unwrap_or(""), s["port"]))
        .unwrap_or_default()
}

/// `dig +short` at a POP's DNS server.
async fn dig(dns: &str, name: &str, rtype: &str) -> Result<Vec<String>> {
    let out = switchyard_tests::dig(dns.parse()?, &["+short", name, rtype]).await?;
    Ok(out.lines().map(str::to_string).collect())
}

/// SRV tiers as (priority, POP) sorted, from `<pop>.<svc>...` targets.
fn srv_tiers(lines: &[String]) -> Vec<(u32, String)> {
    let mut t: Vec<(u32, String)> = lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let prio = f.first()?.parse().ok()?;
            let pop = f.get(3)?.split('.').next()?.to_string();
            Some((prio, pop))
        })
        .collect();
    t.sort();
    t
}

async fn get(vip: &str) -> Result<String> {
    let addr: SocketAddr = vip.parse()?;
    let (code, body) = http_get(addr, "/").await?;
    if code != 200 {
        bail!("GET http://{vip}/ answered {code}: {body}");
    }
    Ok(body.trim().to_string())
}

/// Retries `f` until it returns `Some`, for at most DEADLINE.
async fn until<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < DEADLINE {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    bail!("{what} not seen within {DEADLINE:?} (last error: {last})")
}

fn alive(pid: u64) -> bool {
    // A zombie is dead for our purpose (its parent has not reaped it yet).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_federation_fails_over_and_back_and_stops_clean() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut dev = Dev::start(tmp.path())?;
    let info = dev.info().await?;
    assert!(info["config"]
        .as_str()
        .is_some_and(|c| c.ends_with("admin.toml")));
    assert_eq!(info["hubs"].as_array().map(Vec::len), Some(3));
    let dns = |p: &str| pop(&info, p)["dns"].as_str().unwrap_or("").to_string();

    // Both demo services resolve at every POP, to that POP's own VIP.
    for p in ["north-1", "north-2", "south-1"] {
        for svc in ["echo", "ledger"] {
            let vip = vip_of(&info, p, svc);
            let ip = vip
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default();
            let name = format!("{svc}.demo.svc.clusterset.local");
            until(&format!("{name} at {p}"), || {
                let (dns, name, ip) = (dns(p), name.clone(), ip.clone());
                async move { Ok(dig(&dns, &name, "A").await?.contains(&ip).then_some(())) }
            })
            .await?;
        }
    }

    // The hub's global zone answers external clients with gateways of
    // healthy POPs exporting the service (all on loopback here).
    let hub_dns = info["hubs"][0]["dns"].as_str().unwrap_or("").to_string();
    let zone = info["hubs"][0]["global_zone"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let global = format!("ledger.demo.{zone}");
    until("ledger in the global zone", || {
        let (d, n) = (hub_dns.clone(), global.clone());
        async move {
            Ok(dig(&d, &n, "A")
                .await?
                .contains(&"127.0.0.1".to_string())
                .then_some(()))
        }
    })
    .await?;

    // north-2 reaches ledger across POPs: north-1 (same region) first.
    let ledger_srv = "_8080._tcp.ledger.demo.svc.clusterset.local";
    let n2_dns = dns("north-2");
    let n2_ledger = vip_of(&info, "north-2", "ledger");
    let tiers = until("ledger SRV tiers at north-2", || {
        let d = n2_dns.clone();
        async move {
            let t = srv_tiers(&dig(&d, ledger_srv, "SRV").await?);
            Ok((t == vec![(0, "north-1".to_string()), (1, "south-1".to_string())]).then_some(t))
        }
    })
    .await?;
    println!("ledger SRV at north-2: {tiers:?}");
    let body = until("ledger via north-2's gateway", || {
        let v = n2_ledger.clone();
        async move { Ok(get(&v).await.ok()) }
    })
    .await?;
    assert_eq!(body, "ledger.demo served by north-1");
    // echo is local everywhere.
    assert_eq!(
        get(&vip_of(&info, "south-1", "echo")).await?,
        "echo.demo served by south-1"
    );

    // Power cut at north-1: DNS and traffic at north-2 move to south-1.
    let n1_pids: Vec<u64> = pop(&info, "north-1")["pids"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    assert_eq!(n1_pids.len(), 2, "agent and backend pids: {info}");
    dev.cli(&["dev", "kill", "north-1"])?;
    for pid in &n1_pids {
        assert!(!alive(*pid), "north-1 process {pid} survived dev kill");
    }
    until("ledger at north-2 served by south-1", || {
        let v = n2_ledger.clone();
        async move {
            Ok(get(&v)
                .await
                .ok()
                .filter(|b| b == "ledger.demo served by south-1"))
        }
    })
    .await?;
    let tiers = until("ledger SRV at north-2 without north-1", || {
        let d = n2_dns.clone();
        async move {
            let t = srv_tiers(&dig(&d, ledger_srv, "SRV").await?);
            Ok((t == vec![(0, "south-1".to_string())]).then_some(t))
        }
    })
    .await?;
    println!("after north-1 died: {tiers:?}");

    // Revived: after the failback delay, traffic returns to north-1.
    dev.cli(&["dev", "revive", "north-1"])?;
    let revived_at = Instant::now();
    until("ledger at north-2 served by north-1 again", || {
        let v = n2_ledger.clone();
        async move {
            Ok(get(&v)
                .await
                .ok()
                .filter(|b| b == "ledger.demo served by north-1"))
        }
    })
    .await?;
    println!(
        "traffic back at north-1 {:?} after revive",
        revived_at.elapsed()
    );
    until("ledger SRV at north-2 back to north-1 first", || {
        let d = n2_dns.clone();
        async move {
            let t = srv_tiers(&dig(&d, ledger_srv, "SRV").await?);
            Ok(t.first()
                .is_some_and(|(p, n)| *p == 0 && n == "north-1")
                .then_some(()))
        }
    })
    .await?;

    // Ctrl-C: everything it started stops.
    let info: Value = serde_json::from_slice(&std::fs::read(dev.dir.join("dev.json"))?)?;
    let pids: Vec<u64> = info["pops"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_u64())
        .collect();
    assert_eq!(pids.len(), 6, "{info}");
    let pid = dev.child.id();
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(st) = dev.child.try_wait()? {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("dev did not stop on SIGINT:\n{}", log_tail(&dev.log, 30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        code.success(),
        "dev exited with {code}:\n{}",
        log_tail(&dev.log, 30)
    );
    let left: Vec<u64> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    // Nothing else runs from this dev dir either.
    let needle = dev.dir.display().to_string();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) && alive(pid) {
            bail!("process {pid} still runs from {needle}");
        }
    }
    Ok(())
}

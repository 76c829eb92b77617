//! `switchyard gateway` processes for process tests: a gateway fed by its
//! POP agent's local API (`switchyard agent --gateway-api 127.0.0.1:0`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{agent::Agent, log_tail, DEADLINE};

/// One `switchyard gateway` process.
#[derive(Debug)]
pub struct GatewayProcess {
    /// The POP.
    pub pop: String,
    /// Its log.
    pub log: PathBuf,
    ready_file: PathBuf,
    child: Option<Child>,
}

impl GatewayProcess {
    /// Starts gateway `instance` of `agent`'s POP, talking to the agent's
    /// local API (the agent must run with `--gateway-api`; its address is
    /// in the agent's ready file), tunnel on 127.0.0.1 port 0, plus
    /// `extra_args`. Waits until its ready file names the tunnel address.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        agent: &Agent,
        instance: &str,
        extra_args: &[String],
    ) -> Result<GatewayProcess> {
        let api = agent
            .ready_json()?
            .get("gateway_api")
            .and_then(Value::as_str)
            .map(str::to_string)
            .context("the agent serves no local gateway API (start it with --gateway-api)")?;
        let log = dir.join(format!("gateway-{}-{instance}.log", agent.pop));
        let ready_file = dir.join(format!("gateway-{}-{instance}.ready.json", agent.pop));
        let _ = fs::remove_file(&ready_file);
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(bin)
            .arg("gateway")
            .arg("--agent")
            .arg(&api)
            .arg("--secret-file")
            .arg(agent.data_dir.join("gateway-api.secret"))
            .arg("--instance")
            .arg(instance)
            .arg("--tunnel")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let mut g = GatewayProcess {
            pop: agent.pop.clone(),
            log,
            ready_file,
            child: Some(child),
        };
        g.wait_ready("the tunnel address", |v| v.get("gateway_tunnel").is_some())
            .await?;
        Ok(g)
    }

    /// The ready file as JSON.
    pub fn ready_json(&self) -> Result<Value> {
        Ok(serde_json::from_str(&fs::read_to_string(
            &self.ready_file,
        )?)?)
    }

    /// Waits until the ready file satisfies `ok`; returns it.
    pub async fn wait_ready(&mut self, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Ok(v) = self.ready_json() {
                if ok(&v) {
                    return Ok(v);
                }
            }
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "gateway of {} exited ({status}):\n{}",
                        self.pop,
                        log_tail(&self.log, 30)
                    );
                }
            }
            if start.elapsed() > DEADLINE {
                bail!(
                    "gateway of {}: {what} not in its ready file within {DEADLINE:?}:\n{}",
                    self.pop,
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- gateway {} log (last lines) ----\n{}",
                self.pop,
                log_tail(&self.log, 30)
            );
        }
    }
}

//! `switchyard gateway`: a POP gateway in its own process, fed by the
//! agent's local API; and the same runner for the agent's embedded gateway
//! (`switchyard agent --gateway`). One code path: identity, view, tunnel
//! address and RTT reports go through [`AgentLink`], whichever side of a
//! process boundary the agent is on.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use switchyard_agent::{gateway::GatewaySupport, local_api};
use switchyard_dataplane::{self as dataplane, GatewayConfig, RunningGateway, VipBind};
use switchyard_proto::pb;
use tokio::sync::watch;

use super::Global;

/// How often the gateway's tunnel address and RTTs go to the agent.
const REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// First wait before asking the agent again (identity, view stream).
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest wait between attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Wait before asking again for a certificate that was not renewed.
const RENEW_RETRY: Duration = Duration::from_secs(5);

/// Gateway settings shared by `switchyard gateway` and `switchyard agent
/// --gateway`.
#[derive(Debug, Clone, Args)]
pub struct GatewayOpts {
    /// Gateway instance name (a DNS label); the certificate is for
    /// spiffe://DOMAIN/pop/POP/gw/INSTANCE.
    #[arg(long, default_value = "gw0")]
    pub instance: String,
    /// UDP address of the QUIC tunnel listener peer gateways dial; port 0
    /// picks a free port.
    #[arg(long, default_value = "0.0.0.0:7403")]
    pub tunnel: SocketAddr,
    /// Tunnel address announced to the hub for other POPs (`host:port`);
    /// default: the bound tunnel address, where a wildcard IP (0.0.0.0)
    /// becomes the IP this host uses toward the hub nodes. Set it when
    /// peers reach this POP through NAT or another interface.
    #[arg(long)]
    pub advertise: Option<String>,
    /// How VIP listeners are bound: `vip` (each service's VIP and port from
    /// the view; the dev pool 127.77.0.0/16 is on loopback), `vip-any-port`
    /// (the VIP with a free port, for tests) or an IP address (that
    /// address with a free port per service port, for tests).
    #[arg(long, default_value = "vip", value_parser = parse_vip_bind)]
    pub vip_bind: VipBind,
    /// Base interval between health probes of peer gateways.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// Threads that move the bytes of connections to local endpoints
    /// (default: one per core this process may use, at most 4).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub relay_threads: Option<u16>,
}

fn parse_vip_bind(s: &str) -> Result<VipBind, String> {
    match s {
        "vip" => Ok(VipBind::Vip),
        "vip-any-port" => Ok(VipBind::VipEphemeralPort),
        other => other
            .parse::<IpAddr>()
            .map(VipBind::Ephemeral)
            .map_err(|_| format!("{other:?} is not vip, vip-any-port or an IP address")),
    }
}

/// Run a POP gateway as its own process: it takes the POP's decision table,
/// its certificate and key from the POP's agent (`switchyard agent
/// --gateway-api ADDR`), listens on each service's VIP, and carries
/// connections to the best healthy tier, over QUIC tunnels to peer POPs'
/// gateways.
#[derive(Debug, Args)]
#[command(after_help = "\
The agent must serve its local API (loopback only, by default
127.0.0.1:7481); the gateway proves it may use it with the shared secret
the agent keeps in its data dir (gateway-api.secret, mode 0600).

Examples:
  the agent, then its gateway on the same host:
    switchyard agent --data-dir /var/lib/switchyard/agent --gateway-api 127.0.0.1:7481
    switchyard gateway --agent 127.0.0.1:7481 \\
      --secret-file /var/lib/switchyard/agent/gateway-api.secret \\
      --instance gw0 --tunnel 0.0.0.0:7403 --advertise 203.0.113.7:7403
  or the gateway inside the agent process:
    switchyard agent --data-dir /var/lib/switchyard/agent --gateway --tunnel 0.0.0.0:7403")]
pub struct GatewayArgs {
    /// The agent's local API (`switchyard agent --gateway-api ADDR`).
    #[arg(long, default_value = "127.0.0.1:7481")]
    pub agent: String,
    /// File holding the agent's shared secret (in the agent's data dir).
    #[arg(long, default_value = "/var/lib/switchyard/agent/gateway-api.secret")]
    pub secret_file: PathBuf,
    #[command(flatten)]
    pub opts: GatewayOpts,
    /// Write the POP, instance, bound tunnel address (`gateway_tunnel`),
    /// VIP listeners (`listeners`) and pid as JSON to this file; rewritten
    /// whenever the listeners change.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Where identity and reports go: the agent in this process, or the agent
/// behind its local API.
#[derive(Clone)]
pub enum AgentLink {
    /// `switchyard agent --gateway`.
    Embedded(GatewaySupport),
    /// `switchyard gateway --agent ADDR`.
    Remote(local_api::Client),
}

/// A gateway certificate as the agent gives it.
struct Identity {
    pop: String,
    domain: String,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    renew_at: SystemTime,
}

impl Identity {
    fn for_dataplane(&self) -> dataplane::GatewayIdentity {
        dataplane::GatewayIdentity {
            cert_chain_pem: format!("{}\n{}", self.cert_pem.trim_end(), self.ca_pem),
            key_pem: self.key_pem.clone(),
            ca_pem: self.ca_pem.clone(),
            domain: self.domain.clone(),
        }
    }
}

impl AgentLink {
    async fn identity(&self, instance: &str) -> Result<Identity> {
        match self {
            AgentLink::Embedded(s) => {
                let id = s.identity(instance).await?;
                Ok(Identity {
                    pop: id.pop,
                    domain: id.domain,
                    cert_pem: id.cert_pem,
                    key_pem: id.key_pem,
                    ca_pem: id.ca_pem,
                    renew_at: id.renew_at,
                })
            }
            AgentLink::Remote(c) => {
                let r = c
                    .clone()
                    .gateway_identity(pb::GatewayIdentityRequest {
                        instance: instance.to_string(),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("agent: {}", s.message()))?
                    .into_inner();
                let not_after =
                    UNIX_EPOCH + Duration::from_millis(u64::try_from(r.not_after_ms).unwrap_or(0));
                let validity = switchyard_agent::enrol::cert_validity(&r.cert_pem)
                    .unwrap_or((SystemTime::now(), not_after));
                Ok(Identity {
                    pop: r.pop,
                    domain: r.domain,
                    cert_pem: r.cert_pem,
                    key_pem: r.key_pem,
                    ca_pem: r.ca_pem,
                    renew_at: switchyard_agent::enrol::renewal_time(validity),
                })
            }
        }
    }

    async fn report(&self, instance: &str, tunnel_addr: &str, samples: Vec<pb::RttSample>) {
        match self {
            AgentLink::Embedded(s) => {
                if let Err(e) = s.report(tunnel_addr, samples).await {
                    tracing::warn!(error = %e, "gateway report refused");
                }
            }
            AgentLink::Remote(c) => {
                let r = c
                    .clone()
                    .gateway_report(pb::GatewayReportRequest {
                        instance: instance.to_string(),
                        tunnel_addr: tunnel_addr.to_string(),
                        samples,
                    })
                    .await;
                if let Err(s) = r {
                    tracing::debug!(error = s.message(), "gateway report not delivered");
                }
            }
        }
    }
}

/// A gateway started by [`start`], with its background tasks.
pub struct Gateway {
    /// The dataplane (shared with the renewal and ready-file tasks).
    pub running: Arc<RunningGateway>,
    /// The tunnel address announced to the hub.
    pub advertise: String,
    /// Certificates renewed and swapped in since the start.
    renewals: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Certificates renewed and swapped in since the start.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the reporting tasks, then the dataplane.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        match Arc::try_unwrap(self.running) {
            Ok(r) => r.shutdown().await,
            Err(_) => tracing::warn!("gateway still referenced at shutdown; not stopped cleanly"),
        }
    }
}

/// Gets the gateway's identity from the agent (retrying until it has one),
/// starts the dataplane on `view`, announces the tunnel address, and keeps
/// reporting RTTs, renewing the certificate at half life, and rewriting
/// `ready` (file, base fields) with the bound addresses.
pub async fn start(
    link: AgentLink,
    opts: &GatewayOpts,
    view: watch::Receiver<Option<pb::PopView>>,
    ready: Option<(PathBuf, Map<String, Value>)>,
) -> Result<Gateway> {
    if let Err(e) = switchyard_pki::identity::validate_label("gateway instance", &opts.instance) {
        bail!("--instance: {e}");
    }
    let identity = identity_with_retry(&link, &opts.instance).await;
    let mut cfg = GatewayConfig::new(
        identity.pop.clone(),
        opts.instance.clone(),
        opts.tunnel,
        identity.for_dataplane(),
    );
    cfg.vip_bind = opts.vip_bind.clone();
    cfg.probe_interval = opts.probe_interval;
    if let Some(n) = opts.relay_threads {
        cfg.relay_threads = usize::from(n);
    }
    let running = Arc::new(
        dataplane::start(cfg, view)
            .await
            .context("the gateway dataplane did not start")?,
    );
    let advertise = opts
        .advertise
        .clone()
        .unwrap_or_else(|| running.tunnel_addr.to_string());
    link.report(&opts.instance, &advertise, Vec::new()).await;
    tracing::info!(
        pop = identity.pop,
        instance = opts.instance,
        tunnel = %running.tunnel_addr,
        advertise,
        "gateway running"
    );

    let mut tasks = Vec::new();
    // RTTs and the tunnel address, periodically (the address again too, so
    // an agent that restarted learns it).
    {
        let link = link.clone();
        let instance = opts.instance.clone();
        let advertise = advertise.clone();
        let rtts = running.rtt_samples();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(REPORT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let samples = rtts.borrow().clone();
                link.report(&instance, &advertise, samples).await;
            }
        }));
    }
    // Renewal at half life: new handshakes use the new certificate.
    let renewals = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let link = link.clone();
        let instance = opts.instance.clone();
        let running = running.clone();
        let renewals = renewals.clone();
        let mut renew_at = identity.renew_at;
        tasks.push(tokio::spawn(async move {
            let mut next = renew_at;
            loop {
                let wait = next
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
                tokio::time::sleep(wait).await;
                match link.identity(&instance).await {
                    Ok(id) if id.renew_at > renew_at => {
                        match running.reload_identity(id.for_dataplane()) {
                            Ok(()) => {
                                tracing::info!(instance, "gateway certificate renewed");
                                renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                renew_at = id.renew_at;
                                next = renew_at;
                                continue;
                            }
                            Err(e) => {
                                tracing::error!(instance, error = %e, "renewed certificate refused")
                            }
                        }
                    }
                    Ok(_) => tracing::debug!(instance, "no newer gateway certificate yet"),
                    Err(e) => {
                        tracing::warn!(instance, error = %e, "gateway certificate not renewed")
                    }
                }
                // Not renewed: again in a while, not in a loop.
                next = SystemTime::now() + RENEW_RETRY;
            }
        }));
    }
    if let Some((path, base)) = ready {
        let mut epochs = running.applied_epoch();
        let tunnel = running.tunnel_addr;
        let instance = opts.instance.clone();
        let advertise = advertise.clone();
        let write = move |l: &[dataplane::ListenerInfo], epoch: u64| {
            let mut doc = base.clone();
            doc.insert("instance".into(), json!(instance));
            doc.insert("gateway_tunnel".into(), json!(tunnel.to_string()));
            doc.insert("gateway_advertise".into(), json!(advertise));
            doc.insert(
                "listeners".into(),
                Value::Array(
                    l.iter()
                        .map(|x| {
                            json!({
                                "namespace": x.service.namespace,
                                "name": x.service.name,
                                "port": x.port,
                                "addr": x.addr.to_string(),
                            })
                        })
                        .collect(),
                ),
            );
            doc.insert("epoch".into(), json!(epoch));
            if let Err(e) = write_json_atomic(&path, &Value::Object(doc)) {
                tracing::warn!(error = %e, file = %path.display(), "cannot write the ready file");
            }
        };
        let running = running.clone();
        tasks.push(tokio::spawn(async move {
            // Rewritten when the applied epoch or the bound listeners
            // change (listeners follow a view with a short delay).
            let mut last: Option<(u64, Vec<String>)> = None;
            loop {
                let epoch = *epochs.borrow_and_update();
                let l = running.listeners();
                let key = (epoch, l.iter().map(|x| format!("{x:?}")).collect());
                if last.as_ref() != Some(&key) {
                    write(&l, epoch);
                    last = Some(key);
                }
                tokio::select! {
                    r = epochs.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }));
    }
    Ok(Gateway {
        running,
        advertise,
        renewals,
        tasks,
    })
}

async fn identity_with_retry(link: &AgentLink, instance: &str) -> Identity {
    let mut wait = RETRY_MIN;
    loop {
        match link.identity(instance).await {
            Ok(id) => return id,
            Err(e) => {
                tracing::warn!(instance, error = %e, "no gateway certificate yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Writes `doc` to `path` atomically (readers never see half a file).
pub fn write_json_atomic(path: &Path, doc: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, doc.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Follows the agent's `WatchView` stream into a watch channel, and
/// reconnects when the stream ends: the last view stays in place meanwhile
/// (the gateway keeps serving it while the agent restarts).
fn follow_views(client: local_api::Client) -> watch::Receiver<Option<pb::PopView>> {
    let (tx, rx) = watch::channel::<Option<pb::PopView>>(None);
    tokio::spawn(async move {
        let mut wait = RETRY_MIN;
        loop {
            match client.clone().watch_view(pb::WatchViewRequest {}).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(view)) => {
                                wait = RETRY_MIN;
                                // Epochs only go up, also across agent restarts.
                                tx.send_if_modified(|cur| {
                                    if cur.as_ref().is_some_and(|c| c.epoch >= view.epoch) {
                                        return false;
                                    }
                                    *cur = Some(view);
                                    true
                                });
                            }
                            Ok(None) => break,
                            Err(s) => {
                                tracing::warn!(
                                    error = s.message(),
                                    "view stream from the agent failed"
                                );
                                break;
                            }
                        }
                    }
                }
                Err(s) => tracing::warn!(error = s.message(), "cannot watch the agent's view"),
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    });
    rx
}

pub async fn run(_g: &Global, a: GatewayArgs) -> Result<()> {
    // Bad input is refused before anything is dialled or read.
    if let Err(e) = switchyard_pki::identity::validate_label("gateway instance", &a.opts.instance) {
        bail!("--instance: {e}");
    }
    let secret = std::fs::read_to_string(&a.secret_file).with_context(|| {
        format!(
            "cannot read the agent's secret {} (in the agent's data dir; the agent creates it when started with --gateway-api)",
            a.secret_file.display()
        )
    })?;
    let client = local_api::connect(&a.agent, secret.trim())
        .await
        .context("cannot reach the agent's local API")?;
    let view = follow_views(client.clone());
    let base = Map::from_iter([("pid".to_string(), json!(std::process::id()))]);
    let gw = start(
        AgentLink::Remote(client),
        &a.opts,
        view,
        a.ready_file.clone().map(|p| (p, base)),
    )
    .await?;
    eprintln!(
        "gateway {} serving: tunnel {} (announced as {})",
        a.opts.instance, gw.running.tunnel_addr, gw.advertise
    );
    super::hub::wait_for_signal().await;
    eprintln!(
        "stopping gateway {} (certificate renewed {} times)",
        a.opts.instance,
        gw.renewals()
    );
    gw.shutdown().await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::SocketAddr;

    use switchyard_agent::run::{self as agent, AgentConfig};
    use switchyard_hub::{
        server::{self, HubConfig},
        uplink::server::UplinkOptions,
    };
    use switchyard_pki::JoinToken;

    use super::*;

    /// The embedded runner against an in-process hub issuing 4 s
    /// certificates: it starts once the agent got its gateway certificate,
    /// announces the tunnel address, and swaps in a renewed certificate at
    /// half life, again and again, without a renewal storm.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_gateway_starts_announces_and_renews() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("hub")).unwrap();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let hub = server::start(HubConfig {
            uplink_options: UplinkOptions {
                pop_cert_validity: Duration::from_secs(4),
                ..UplinkOptions::default()
            },
            ..HubConfig::loopback_bootstrap(dir.path(), "runner.test")
        })
        .await
        .unwrap();
        let ca_pem = hub
            .hub
            .local(|s| s.federation.as_ref().unwrap().ca_cert_pem.clone());
        let ca_der = switchyard_pki::load_certs_pem(&ca_pem).unwrap();
        let token = JoinToken::generate(&switchyard_pki::cert_fingerprint(&ca_der[0])).unwrap();
        hub.hub
            .propose(pb::Command {
                kind: Some(pb::command::Kind::IssueToken(pb::IssueToken {
                    token: Some(pb::JoinToken {
                        id: token.id().to_string(),
                        secret_sha256: token.secret_sha256(),
                        kind: pb::TokenKind::Pop as i32,
                        pop: "north-1".into(),
                        expires_at_ms: switchyard_hub::server::admin::now_ms() + 60_000,
                        ..Default::default()
                    }),
                })),
            })
            .await
            .unwrap();
        let a = agent::start(AgentConfig {
            data_dir: dir.path().join("agent"),
            hub_grpc: vec![hub.grpc_addr.to_string()],
            token: Some(token.to_string()),
            http: loopback,
            backoff_min: Duration::from_millis(50),
            ..AgentConfig::default()
        })
        .await
        .unwrap();
        let opts = GatewayOpts {
            instance: "gw0".into(),
            tunnel: loopback,
            advertise: None,
            vip_bind: VipBind::Ephemeral(loopback.ip()),
            probe_interval: Duration::from_millis(100),
            relay_threads: Some(1),
        };
        let ready = dir.path().join("ready.json");
        let gw = start(
            AgentLink::Embedded(a.gateway.clone()),
            &opts,
            a.gateway.watch_view(),
            Some((ready.clone(), Map::new())),
        )
        .await
        .unwrap();
        assert_eq!(gw.advertise, gw.running.tunnel_addr.to_string());
        let recorded = || {
            hub.hub
                .local(|s| s.pops.get("north-1").map(|p| p.gateway_addr.clone()))
                .unwrap_or_default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while recorded() != gw.advertise || gw.renewals() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "address {:?}, renewals {}",
                recorded(),
                gw.renewals()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // 4 s certificates renewed at half life: no storm.
        assert!(gw.renewals() <= 4, "{} renewals", gw.renewals());
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
        assert_eq!(
            doc["gateway_tunnel"],
            json!(gw.running.tunnel_addr.to_string())
        );
        gw.shutdown().await;
        a.shutdown().await;
        hub.shutdown().await;
    }
}

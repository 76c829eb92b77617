//! The global DNS zone served by every hub node (`switchyard hub --dns
//! ADDR --global-zone ZONE`): [`global_input`] reads the applied state into
//! `switchyard_dns::global` input (pure); [`start`] rebuilds the answers
//! whenever the applied index moves and serves them.
//!
//! - A POP's gateway address is the host of `Pop.gateway_addr` (an IP
//!   address; POPs without one, or with a host name, are not answered).
//! - Healthy: liveness Online or Suspect, and not damped.
//! - A service's POPs are the healthy POPs exporting it with at least one
//!   ready endpoint.
//! - Clients are placed in POPs by the `subnets` label (comma-separated
//!   CIDRs in `Labels.extra`); a client of POP P gets P's own tier order
//!   (from `decide`).
//!
//! Staleness: `switchyard_dns_global_zone_lag_entries` (applied index minus
//! the index the served answers were built from, sampled each second) and
//! `switchyard_dns_global_zone_rebuild_seconds` (from an applied change to
//! its answers being served).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use switchyard_dns::answers::AnswerTable;
use switchyard_dns::global::{self, GlobalInput, GlobalPop, GlobalService, SUBNETS_LABEL};
use switchyard_dns::limits::RateLimitConfig;
use switchyard_dns::{DnsConfig, DnsServer};
use switchyard_proto::pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::decide::{Prepared, DEFAULT_DNS_TTL_S};
use crate::node::Hub;
use crate::state::State;

/// How long the rebuilder waits after an applied change before reading the
/// state, so a burst of entries costs one rebuild.
const COALESCE: Duration = Duration::from_millis(10);

fn healthy(state: &State, pop: &str) -> bool {
    state.pop_status.get(pop).is_some_and(|s| {
        !s.damped
            && matches!(
                pb::PopLiveness::try_from(s.liveness),
                Ok(pb::PopLiveness::Online | pb::PopLiveness::Suspect)
            )
    })
}

fn gateway_ip(pop: &pb::Pop) -> Option<IpAddr> {
    let a = pop.gateway_addr.trim();
    if a.is_empty() {
        return None;
    }
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
    host.trim_matches(['[', ']']).parse().ok()
}

/// The global zone's input from the applied `state`.
pub fn global_input(state: &State, zone: &str, applied_index: u64) -> GlobalInput {
    let pops: Vec<GlobalPop> = state
        .pops
        .values()
        .map(|p| {
            let subnets = p
                .labels
                .as_ref()
                .and_then(|l| l.extra.get(SUBNETS_LABEL))
                .map(|v| global::parse_subnets(v).0)
                .unwrap_or_default();
            GlobalPop {
                name: p.name.clone(),
                gateway: gateway_ip(p),
                healthy: healthy(state, &p.name),
                subnets,
            }
        })
        .collect();
    let mut services: BTreeMap<(String, String), GlobalService> = BTreeMap::new();
    for ((ns, name), _) in state.services.iter() {
        let ready_pops: Vec<String> = state
            .exports
            .range((ns.clone(), name.clone(), String::new())..)
            .take_while(|((n, s, _), _)| n == ns && s == name)
            .filter(|((_, _, pop), e)| healthy(state, pop) && e.endpoints.iter().any(|ep| ep.ready))
            .map(|((_, _, pop), _)| pop.clone())
            .collect();
        let ttl = state
            .policies
            .get(&(ns.clone(), name.clone()))
            .map(|p| p.dns_ttl_s)
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_DNS_TTL_S);
        services.insert(
            (ns.clone(), name.clone()),
            GlobalService {
                namespace: ns.clone(),
                name: name.clone(),
                ttl,
                pops: ready_pops,
                by_client: BTreeMap::new(),
            },
        );
    }
    // What every POP's view shares, gathered once for all of them.
    let prepared = Prepared::new(state);
    for p in pops.iter().filter(|p| !p.subnets.is_empty()) {
        let view = prepared.view(&p.name);
        for sv in &view.services {
            let Some(key) = &sv.service else { continue };
            let Some(svc) = services.get_mut(&(key.namespace.clone(), key.name.clone())) else {
                continue;
            };
            let order: Vec<String> = sv
                .tiers
                .iter()
                .flat_map(|t| t.targets.iter().map(|t| t.pop.clone()))
                .collect();
            svc.by_client.insert(p.name.clone(), order);
        }
    }
    GlobalInput {
        zone: zone.to_string(),
        applied_index,
        pops,
        services: services.into_values().collect(),
    }
}

/// Settings of the global zone listener.
#[derive(Debug, Clone)]
pub struct GlobalDnsConfig {
    /// The zone (e.g. `global.example.`).
    pub zone: String,
    /// UDP and TCP listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Per-source limit on UDP answers (answers per second, burst twice
    /// that); `None`: unlimited.
    pub rate_limit: Option<u32>,
}

/// Why the global zone could not start.
#[derive(Debug, thiserror::Error)]
pub enum GlobalDnsError {
    /// The zone name is invalid.
    #[error(transparent)]
    Zone(#[from] global::GlobalError),
    /// The listener could not bind.
    #[error("cannot serve DNS on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running global zone.
#[derive(Debug)]
pub struct GlobalDns {
    /// The server (UDP and TCP).
    pub server: DnsServer,
    tasks: Vec<JoinHandle<()>>,
}

impl GlobalDns {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops serving.
    pub fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.server.shutdown();
    }
}

fn build(hub: &Hub, zone: &str, applied: u64) -> Option<AnswerTable> {
    let input = hub.local(|s| global_input(s, zone, applied));
    match global::build(&input, DEFAULT_DNS_TTL_S) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the global DNS zone; serving the previous one");
            None
        }
    }
}

/// Serves the global zone from `hub`'s applied state.
pub async fn start(hub: Hub, cfg: GlobalDnsConfig) -> Result<GlobalDns, GlobalDnsError> {
    global::zone_name(&cfg.zone)?;
    let mut applied = hub.applied_watch();
    let first_index = *applied.borrow_and_update();
    let first = build(&hub, &cfg.zone, first_index).unwrap_or_default();
    let (tx, tables) = watch::channel(Arc::new(first));
    let addr = cfg.listen;
    let dns = DnsConfig {
        listen: addr,
        rate_limit: cfg.rate_limit.map(|qps| RateLimitConfig {
            per_second: qps,
            burst: qps.saturating_mul(2),
            ..RateLimitConfig::default()
        }),
        ..DnsConfig::default()
    };
    let server = DnsServer::bind(dns, tables.clone())
        .await
        .map_err(|source| GlobalDnsError::Bind { addr, source })?;
    let zone = cfg.zone.clone();
    let rebuild_hub = hub.clone();
    let rebuild = tokio::spawn(async move {
        while applied.changed().await.is_ok() {
            let changed_at = tokio::time::Instant::now();
            tokio::time::sleep(COALESCE).await;
            let index = *applied.borrow_and_update();
            let (hub, zone) = (rebuild_hub.clone(), zone.clone());
            let table = tokio::task::spawn_blocking(move || build(&hub, &zone, index))
                .await
                .ok()
                .flatten();
            if let Some(t) = table {
                if tx.send(Arc::new(t)).is_err() {
                    return;
                }
                metrics::histogram!("switchyard_dns_global_zone_rebuild_seconds")
                    .record(changed_at.elapsed().as_secs_f64());
            }
        }
    });
    let lag_applied = hub.applied_watch();
    let lag = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let applied = *lag_applied.borrow();
            let built = tables.borrow().built_from;
            metrics::gauge!("switchyard_dns_global_zone_lag_entries")
                .set(applied.saturating_sub(built) as f64);
        }
    });
    Ok(GlobalDns {
        server,
        tasks: vec![rebuild, lag],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_hosts() {
        let p = |a: &str| pb::Pop {
            gateway_addr: a.into(),
            ..Default::default()
        };
        assert_eq!(
            gateway_ip(&p("10.0.0.1:7443")),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            gateway_ip(&p("[fd00::1]:7443")),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(gateway_ip(&p("gw.example:7443")), None);
        assert_eq!(gateway_ip(&p("")), None);
    }
}

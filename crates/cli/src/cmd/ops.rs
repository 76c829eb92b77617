//! Operator commands: tokens, POPs, policies, status.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use switchyard_proto::pb;

use super::Global;
use crate::{client, output};

/// Topology labels of a POP.
#[derive(Debug, Args, Default)]
pub struct LabelArgs {
    /// Region (orders failover tiers: same region first).
    #[arg(long)]
    pub region: Option<String>,
    /// Zone within the region.
    #[arg(long)]
    pub zone: Option<String>,
    /// Group (closest topology level).
    #[arg(long)]
    pub group: Option<String>,
    /// Free label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl LabelArgs {
    fn to_pb(&self) -> pb::Labels {
        pb::Labels {
            region: self.region.clone().unwrap_or_default(),
            zone: self.zone.clone().unwrap_or_default(),
            group: self.group.clone().unwrap_or_default(),
            extra: self.labels.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Print a one-time join token for a new POP (`--pop NAME`) or hub node (`--hub`).
    Create {
        /// The POP this token enrols (its name in DNS and certificates).
        #[arg(long, conflicts_with = "hub", required_unless_present = "hub")]
        pop: Option<String>,
        /// A token for a new hub node instead.
        #[arg(long)]
        hub: bool,
        #[command(flatten)]
        labels: LabelArgs,
        /// Lifetime (e.g. 30m, 1h; at most 7 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// List tokens (secrets are never stored or shown).
    List,
}

#[derive(Debug, Subcommand)]
pub enum PopCmd {
    /// Add or update a POP record by hand (enrolment creates it otherwise).
    Add {
        /// POP name.
        name: String,
        #[command(flatten)]
        labels: LabelArgs,
        /// Fail if it exists.
        #[arg(long)]
        create_only: bool,
        /// VIP range of the POP (CIDR, e.g. 10.77.0.0/22): each global
        /// service gets one address of it at this POP, which its gateway
        /// binds. Default: kept, or the next free /22 of 127.77.0.0/16.
        #[arg(long)]
        vip_cidr: Option<String>,
    },
    /// List POPs.
    List {
        /// Read this node's applied state instead of a linearizable read.
        #[arg(long)]
        local: bool,
    },
    /// Show one POP.
    Show {
        /// POP name.
        name: String,
    },
    /// Remove a POP record.
    Remove {
        /// POP name.
        name: String,
    },
    /// Revoke a POP: its certificate is refused from now on.
    Revoke {
        /// POP name.
        name: String,
        /// Why (recorded).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
    },
}

/// Traffic policy mode.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Local endpoints first, then other POPs by topology distance and RTT.
    Locality,
    /// An explicit ordered list of POPs (--failover).
    Failover,
    /// One tier, weights per POP (--weight).
    ActiveActive,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Set the traffic policy of a service NAMESPACE/NAME.
    Set {
        /// NAMESPACE/NAME.
        service: String,
        /// Mode.
        #[arg(long, value_enum, default_value_t = Mode::Locality)]
        mode: Mode,
        /// Failover order: POP names or KEY=VALUE selectors, comma-separated.
        #[arg(long, value_delimiter = ',')]
        failover: Vec<String>,
        /// ActiveActive weight POP=N (repeatable).
        #[arg(long = "weight", value_parser = parse_kv)]
        weights: Vec<(String, String)>,
        /// Spill to the next tier below this fraction of healthy targets (0..1).
        #[arg(long, default_value_t = 0.0)]
        min_healthy: f64,
        /// A recovered POP re-enters after being healthy this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        failback_after: Duration,
        /// When the hub is lost: `serve`, `local-only`, or `drop-remote-after=10m`.
        #[arg(long, default_value = "serve")]
        stale: String,
        /// Export only to these POPs (comma-separated; default all).
        #[arg(long, value_delimiter = ',')]
        export_to: Vec<String>,
        /// DNS TTL of answers.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        dns_ttl: Duration,
        /// Serve per-POP names `<pop>.<svc>.<ns>.svc.clusterset.local`.
        #[arg(long)]
        per_pop_names: bool,
    },
    /// Show a service's policy.
    Get {
        /// NAMESPACE/NAME.
        service: String,
    },
    /// List policies.
    List,
    /// Delete a service's policy (it falls back to the default, Locality).
    Delete {
        /// NAMESPACE/NAME.
        service: String,
    },
}

pub fn service_key(s: &str) -> Result<pb::ServiceKey> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(pb::ServiceKey {
                namespace: ns.into(),
                name: name.into(),
            })
        }
        _ => bail!("{s:?} is not NAMESPACE/NAME"),
    }
}

fn selector(s: &str) -> pb::PopSelector {
    match s.split_once('=') {
        Some((k, v)) => pb::PopSelector {
            pop: String::new(),
            labels: [(k.to_string(), v.to_string())].into(),
        },
        None => pb::PopSelector {
            pop: s.to_string(),
            labels: Default::default(),
        },
    }
}

fn labels_json(l: Option<&pb::Labels>) -> Value {
    let l = l.cloned().unwrap_or_default();
    json!({"region": l.region, "zone": l.zone, "group": l.group, "extra": l.extra})
}

fn pop_json(p: &pb::Pop) -> Value {
    json!({
        "name": p.name,
        "labels": labels_json(p.labels.as_ref()),
        "created_index": p.created_index,
        "updated_index": p.updated_index,
        "created_at_ms": p.created_at_ms,
        "vip_cidr": p.vip_cidr,
        "gateway_addr": p.gateway_addr,
    })
}

fn selector_str(s: &pb::PopSelector) -> String {
    if !s.pop.is_empty() {
        return s.pop.clone();
    }
    s.labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("+")
}

fn policy_json(p: &pb::TrafficPolicy) -> Value {
    let k = p.service.clone().unwrap_or_default();
    json!({
        "service": format!("{}/{}", k.namespace, k.name),
        "mode": pb::PolicyMode::try_from(p.mode).map(|m| m.as_str_name()).unwrap_or("UNKNOWN"),
        "failover": p.failover.iter().map(selector_str).collect::<Vec<_>>(),
        "weights": p.weights,
        "min_healthy": p.min_healthy_permille as f64 / 1000.0,
        "failback_after_ms": p.failback_after_ms,
        "stale": pb::StaleMode::try_from(p.stale).map(|m| m.as_str_name()).unwrap_or("UNKNOWN"),
        "stale_drop_after_ms": p.stale_drop_after_ms,
        "export_to": p.export_to.iter().map(selector_str).collect::<Vec<_>>(),
        "dns_ttl_s": p.dns_ttl_s,
        "per_pop_names": p.per_pop_names,
        "updated_index": p.updated_index,
    })
}

/// The live uplink session of `pop`, if a reachable hub node holds one.
fn session_of<'a>(r: &'a pb::ListPopsResponse, pop: &str) -> Option<&'a pb::SessionInfo> {
    r.sessions.iter().find(|s| s.pop == pop)
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A recent time as "0.3s ago" (heartbeats are a fraction of a second
/// apart, so whole seconds would say nothing).
fn ms_ago_precise(at_ms: i64) -> String {
    let d = (now_ms() - at_ms).max(0);
    format!("{:.1}s ago", d as f64 / 1000.0)
}

fn ms_ago(at_ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let d = Duration::from_secs(((now - at_ms).max(0) / 1000) as u64);
    format!("{} ago", humantime::format_duration(d))
}

pub async fn token(g: &Global, c: TokenCmd) -> Result<()> {
    let mut a = client::connect(g.config.as_ref()).await?;
    let addr = a.addr.clone();
    let err = |s| client::status_err(&addr, s);
    match c {
        TokenCmd::Create {
            pop,
            hub,
            labels,
            ttl,
        } => {
            let r = a
                .client
                .create_token(pb::CreateTokenRequest {
                    kind: if hub {
                        pb::TokenKind::Hub
                    } else {
                        pb::TokenKind::Pop
                    } as i32,
                    pop: pop.clone().unwrap_or_default(),
                    labels: Some(labels.to_pb()),
                    ttl_ms: ttl.as_millis() as u64,
                })
                .await
                .map_err(err)?
                .into_inner();
            match g.output {
                output::Format::Json => output::json(&json!({
                    "token": r.token, "id": r.id, "expires_at_ms": r.expires_at_ms,
                })),
                output::Format::Table => {
                    println!("{}", r.token);
                    let what = if hub {
                        "a hub node".to_string()
                    } else {
                        format!("POP {}", pop.unwrap_or_default())
                    };
                    eprintln!(
                        "single use, for {what}, expires in {}",
                        humantime::format_duration(ttl)
                    );
                }
            }
        }
        TokenCmd::List => {
            let r = a
                .client
                .list_tokens(pb::ListTokensRequest::default())
                .await
                .map_err(err)?
                .into_inner();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let state = |t: &pb::JoinToken| {
                if t.consumed {
                    format!("used by {}", t.consumed_by)
                } else if t.expires_at_ms <= now {
                    "expired".into()
                } else {
                    "open".into()
                }
            };
            let kind = |t: &pb::JoinToken| {
                if t.kind == pb::TokenKind::Hub as i32 {
                    "hub"
                } else {
                    "pop"
                }
            };
            match g.output {
                output::Format::Json => output::json(&Value::Array(
                    r.tokens
                        .iter()
                        .map(|t| json!({"id": t.id, "kind": kind(t), "pop": t.pop, "expires_at_ms": t.expires_at_ms, "consumed": t.consumed, "consumed_by": t.consumed_by, "state": state(t)}))
                        .collect(),
                )),
                output::Format::Table => output::table(
                    &["ID", "KIND", "POP", "STATE"],
                    &r.tokens.iter().map(|t| vec![t.id.clone(), kind(t).into(), t.pop.clone(), state(t)]).collect::<Vec<_>>(),
                ),
            }
        }
    }
    Ok(())
}

pub async fn pop(g: &Global, c: PopCmd) -> Result<()> {
    let mut a = client::connect(g.config.as_ref()).await?;
    let addr = a.addr.clone();
    let err = |s| client::status_err(&addr, s);
    match c {
        PopCmd::Add {
            name,
            labels,
            create_only,
            vip_cidr,
        } => {
            let r = a
                .client
                .put_pop(pb::PutPopRequest {
                    pop: Some(pb::Pop {
                        name: name.clone(),
                        labels: Some(labels.to_pb()),
                        vip_cidr: vip_cidr.unwrap_or_default(),
                        ..Default::default()
                    }),
                    create_only,
                })
                .await
                .map_err(err)?
                .into_inner();
            match g.output {
                output::Format::Json => {
                    output::json(&json!({"index": r.index, "pop": r.pop.as_ref().map(pop_json)}))
                }
                output::Format::Table => println!("POP {name} saved (log index {})", r.index),
            }
        }
        PopCmd::List { local } => {
            let consistency = if local {
                pb::ReadConsistency::Local
            } else {
                pb::ReadConsistency::Linearizable
            } as i32;
            let r = a
                .client
                .list_pops(pb::ListPopsRequest { consistency })
                .await
                .map_err(err)?
                .into_inner();
            if !r.unreachable_nodes.is_empty() {
                eprintln!(
                    "note: hub nodes {:?} did not answer; the POPs they hold show no heartbeat",
                    r.unreachable_nodes
                );
            }
            match g.output {
                output::Format::Json => output::json(&Value::Array(
                    r.pops
                        .iter()
                        .zip(statuses(&r))
                        .map(|(p, st)| {
                            let mut v = pop_json(p);
                            v["liveness"] = json!(liveness_name(st.liveness));
                            v["damped"] = json!(st.damped);
                            v["liveness_reason"] = json!(st.reason);
                            v["liveness_index"] = json!(st.liveness_index);
                            v["hub_node"] = json!(holder_node(&st.holder));
                            v["session"] = json!(st.holder);
                            let sess = session_of(&r, &p.name);
                            v["connected"] = json!(sess.is_some());
                            v["agent_version"] = json!(sess.map(|s| s.agent_version.clone()));
                            v["remote_addr"] = json!(sess.map(|s| s.remote_addr.clone()));
                            v["last_heartbeat_ms"] = json!(sess
                                .filter(|s| s.last_heartbeat_ms > 0)
                                .map(|s| s.last_heartbeat_ms));
                            v
                        })
                        .collect(),
                )),
                output::Format::Table => output::table(
                    &[
                        "NAME",
                        "STATE",
                        "HUB",
                        "HEARTBEAT",
                        "AGENT",
                        "REGION",
                        "ZONE",
                        "GROUP",
                        "CREATED",
                    ],
                    &r.pops
                        .iter()
                        .zip(statuses(&r))
                        .map(|(p, st)| {
                            let l = p.labels.clone().unwrap_or_default();
                            let mut state = liveness_name(st.liveness).to_string();
                            if st.damped {
                                state.push_str(" (damped)");
                            }
                            let sess = session_of(&r, &p.name);
                            vec![
                                p.name.clone(),
                                state,
                                holder_node(&st.holder),
                                sess.filter(|s| s.last_heartbeat_ms > 0)
                                    .map_or("-".into(), |s| ms_ago_precise(s.last_heartbeat_ms)),
                                sess.map_or("-".into(), |s| s.agent_version.clone()),
                                l.region,
                                l.zone,
                                l.group,
                                ms_ago(p.created_at_ms),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        PopCmd::Show { name } => {
            let p = a
                .client
                .get_pop(pb::GetPopRequest {
                    name,
                    consistency: 0,
                })
                .await
                .map_err(err)?
                .into_inner();
            match g.output {
                output::Format::Json => output::json(&pop_json(&p)),
                output::Format::Table => {
                    let l = p.labels.clone().unwrap_or_default();
                    println!("name:     {}", p.name);
                    println!("region:   {}", l.region);
                    println!("zone:     {}", l.zone);
                    println!("group:    {}", l.group);
                    for (k, v) in &l.extra {
                        println!("label:    {k}={v}");
                    }
                    println!(
                        "created:  {} (log index {})",
                        ms_ago(p.created_at_ms),
                        p.created_index
                    );
                    println!("updated:  log index {}", p.updated_index);
                    println!("vips:     {}", p.vip_cidr);
                    if p.gateway_addr.is_empty() {
                        println!("gateway:  (none announced)");
                    } else {
                        println!("gateway:  {}", p.gateway_addr);
                    }
                }
            }
        }
        PopCmd::Remove { name } => {
            let r = a
                .client
                .remove_pop(pb::RemovePopRequest { name: name.clone() })
                .await
                .map_err(err)?
                .into_inner();
            println!("POP {name} removed (log index {})", r.index);
        }
        PopCmd::Revoke { name, reason } => {
            let r = a
                .client
                .revoke(pb::RevokeRequest {
                    revocation: Some(pb::Revocation {
                        kind: pb::RevocationKind::Pop as i32,
                        subject: name.clone(),
                        at_ms: 0,
                        reason,
                    }),
                })
                .await
                .map_err(err)?
                .into_inner();
            println!("POP {name} revoked (log index {})", r.index);
        }
    }
    Ok(())
}

fn stale_mode(s: &str) -> Result<(pb::StaleMode, u64)> {
    match s {
        "serve" => Ok((pb::StaleMode::Serve, 0)),
        "local-only" | "local_only" => Ok((pb::StaleMode::LocalOnly, 0)),
        _ => match s.split_once('=') {
            Some(("drop-remote-after" | "drop_remote_after", d)) => {
                let d = humantime::parse_duration(d).map_err(|e| anyhow!("--stale {s}: {e}"))?;
                Ok((pb::StaleMode::DropRemoteAfter, d.as_millis() as u64))
            }
            _ => bail!("--stale takes serve, local-only or drop-remote-after=DURATION, not {s:?}"),
        },
    }
}

pub async fn policy(g: &Global, c: PolicyCmd) -> Result<()> {
    // Validate before connecting: bad input never needs the network.
    let set = match &c {
        PolicyCmd::Set {
            service,
            mode,
            failover,
            weights,
            min_healthy,
            failback_after,
            stale,
            export_to,
            dns_ttl,
            per_pop_names,
        } => {
            if !(0.0..=1.0).contains(min_healthy) {
                bail!("--min-healthy must be between 0 and 1");
            }
            if matches!(mode, Mode::Failover) && failover.is_empty() {
                bail!("--mode failover needs --failover POP[,POP...]");
            }
            let (stale, drop_after) = stale_mode(stale)?;
            let mut w = std::collections::HashMap::new();
            for (pop, n) in weights {
                w.insert(
                    pop.clone(),
                    n.parse::<u32>().map_err(|_| {
                        anyhow!("--weight {pop}={n}: weight must be a whole number")
                    })?,
                );
            }
            Some(pb::TrafficPolicy {
                service: Some(service_key(service)?),
                mode: match mode {
                    Mode::Locality => pb::PolicyMode::Locality,
                    Mode::Failover => pb::PolicyMode::Failover,
                    Mode::ActiveActive => pb::PolicyMode::ActiveActive,
                } as i32,
                failover: failover.iter().map(|s| selector(s)).collect(),
                weights: w,
                min_healthy_permille: (min_healthy * 1000.0).round() as u32,
                failback_after_ms: failback_after.as_millis() as u64,
                stale: stale as i32,
                stale_drop_after_ms: drop_after,
                export_to: export_to.iter().map(|s| selector(s)).collect(),
                dns_ttl_s: dns_ttl.as_secs() as u32,
                per_pop_names: *per_pop_names,
                updated_index: 0,
            })
        }
        _ => None,
    };
    let mut a = client::connect(g.config.as_ref()).await?;
    let addr = a.addr.clone();
    let err = |s| client::status_err(&addr, s);
    match c {
        PolicyCmd::Set { service, .. } => {
            let r = a
                .client
                .set_policy(pb::SetPolicyRequest { policy: set })
                .await
                .map_err(err)?
                .into_inner();
            println!("policy for {service} set (log index {})", r.index);
        }
        PolicyCmd::Get { service } => {
            let p = a
                .client
                .get_policy(pb::GetPolicyRequest {
                    service: Some(service_key(&service)?),
                    consistency: 0,
                })
                .await
                .map_err(err)?
                .into_inner();
            let v = policy_json(&p);
            match g.output {
                output::Format::Json => output::json(&v),
                output::Format::Table => {
                    if let Value::Object(m) = v {
                        for (k, v) in m {
                            println!("{k:<20} {v}");
                        }
                    }
                }
            }
        }
        PolicyCmd::List => {
            let r = a
                .client
                .list_policies(pb::ListPoliciesRequest::default())
                .await
                .map_err(err)?
                .into_inner();
            match g.output {
                output::Format::Json => {
                    output::json(&Value::Array(r.policies.iter().map(policy_json).collect()))
                }
                output::Format::Table => output::table(
                    &["SERVICE", "MODE", "FAILBACK", "STALE"],
                    &r.policies
                        .iter()
                        .map(|p| {
                            let v = policy_json(p);
                            vec![
                                v["service"].as_str().unwrap_or_default().to_string(),
                                v["mode"].as_str().unwrap_or_default().to_string(),
                                humantime::format_duration(Duration::from_millis(
                                    p.failback_after_ms,
                                ))
                                .to_string(),
                                v["stale"].as_str().unwrap_or_default().to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        PolicyCmd::Delete { service } => {
            let r = a
                .client
                .delete_policy(pb::DeletePolicyRequest {
                    service: Some(service_key(&service)?),
                })
                .await
                .map_err(err)?
                .into_inner();
            println!("policy for {service} deleted (log index {})", r.index);
        }
    }
    Ok(())
}

pub async fn status(g: &Global) -> Result<()> {
    let mut a = client::connect(g.config.as_ref()).await?;
    let addr = a.addr.clone();
    let err = |s| client::status_err(&addr, s);
    let s = a
        .client
        .status(pb::Empty {})
        .await
        .map_err(err)?
        .into_inner();
    // Local reads: the answering node's applied state, like the header.
    let local = pb::ReadConsistency::Local as i32;
    let pops = a
        .client
        .list_pops(pb::ListPopsRequest { consistency: local })
        .await
        .map_err(err)?
        .into_inner();
    let services = a
        .client
        .list_services(pb::ListServicesRequest { consistency: local })
        .await
        .map_err(err)?
        .into_inner()
        .services;
    let members: Vec<Value> = s.members.iter().map(super::hub::member_json).collect();
    let pop_rows: Vec<Value> = pops
        .pops
        .iter()
        .zip(statuses(&pops))
        .map(|(p, st)| {
            let sess = session_of(&pops, &p.name);
            json!({
                "name": p.name,
                "labels": labels_json(p.labels.as_ref()),
                "liveness": liveness_name(st.liveness),
                "damped": st.damped,
                "reason": st.reason,
                "hub_node": holder_node(&st.holder),
                "agent_version": sess.map(|s| s.agent_version.clone()),
                "last_heartbeat_ms": sess.filter(|s| s.last_heartbeat_ms > 0).map(|s| s.last_heartbeat_ms),
            })
        })
        .collect();
    let service_rows: Vec<Value> = services
        .iter()
        .map(|g| {
            let k = g.service.clone().unwrap_or_default();
            json!({"namespace": k.namespace, "name": k.name, "exported_by": g.pops,
                   "conflicts": g.conflicts.len()})
        })
        .collect();
    let events: Vec<Value> = s
        .events
        .iter()
        .rev()
        .map(|e| {
            json!({"index": e.index, "at_ms": e.at_ms, "pop": e.pop,
                   "liveness": liveness_name(e.liveness), "damped": e.damped, "reason": e.reason})
        })
        .collect();
    match g.output {
        output::Format::Json => output::json(&json!({
            "node_id": s.node_id, "domain": s.domain, "term": s.term, "leader_id": s.leader_id,
            "commit_index": s.commit_index, "applied_index": s.applied_index, "members": members,
            "pops": s.pops, "policies": s.policies, "tokens_open": s.tokens_open,
            "version": s.version, "state": s.state, "answered_by": addr,
            "pop_list": pop_rows, "services": service_rows, "events": events,
            "unreachable_nodes": pops.unreachable_nodes,
        })),
        output::Format::Table => {
            println!("federation  {}", s.domain);
            println!(
                "answered by hub node {} at {} ({}, v{})",
                s.node_id, addr, s.state, s.version
            );
            println!(
                "raft        term {}, leader {}, commit {}, applied {}",
                s.term,
                if s.leader_id == 0 {
                    "none".into()
                } else {
                    s.leader_id.to_string()
                },
                s.commit_index,
                s.applied_index
            );
            let online = pop_rows
                .iter()
                .filter(|p| p["liveness"] == "online")
                .count();
            println!(
                "POPs        {} ({} online)    services {}    policies {}    open tokens {}",
                s.pops,
                online,
                services.len(),
                s.policies,
                s.tokens_open
            );
            println!();
            super::hub::member_table(&s.members);
            if !pops.pops.is_empty() {
                println!();
                output::table(
                    &["POP", "STATE", "HUB", "HEARTBEAT", "REGION", "ZONE"],
                    &pops
                        .pops
                        .iter()
                        .zip(statuses(&pops))
                        .map(|(p, st)| {
                            let l = p.labels.clone().unwrap_or_default();
                            let mut state = liveness_name(st.liveness).to_string();
                            if st.damped {
                                state.push_str(" (damped)");
                            }
                            vec![
                                p.name.clone(),
                                state,
                                holder_node(&st.holder),
                                session_of(&pops, &p.name)
                                    .filter(|s| s.last_heartbeat_ms > 0)
                                    .map_or("-".into(), |s| ms_ago_precise(s.last_heartbeat_ms)),
                                l.region,
                                l.zone,
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
            }
            if !services.is_empty() {
                println!();
                output::table(
                    &["SERVICE", "EXPORTED BY", "CONFLICTS"],
                    &services
                        .iter()
                        .map(|g| {
                            let k = g.service.clone().unwrap_or_default();
                            vec![
                                format!("{}/{}", k.namespace, k.name),
                                g.pops.join(","),
                                g.conflicts.len().to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
            }
            if !s.events.is_empty() {
                println!();
                println!("recent events (newest first):");
                for e in s.events.iter().rev().take(10) {
                    let when = if e.at_ms > 0 {
                        ms_ago(e.at_ms)
                    } else {
                        format!("index {}", e.index)
                    };
                    let damped = if e.damped { " (damped)" } else { "" };
                    println!(
                        "  {when:>12}  {:<12} {}{damped}: {}",
                        e.pop,
                        liveness_name(e.liveness),
                        e.reason
                    );
                }
            }
            if !pops.unreachable_nodes.is_empty() {
                println!(
                    "\nnote: hub nodes {:?} did not answer; the POPs they hold show no heartbeat",
                    pops.unreachable_nodes
                );
            }
        }
    }
    Ok(())
}

/// Statuses aligned with `r.pops` (older hubs send none: "never seen").
fn statuses(r: &pb::ListPopsResponse) -> impl Iterator<Item = pb::PopStatus> + '_ {
    (0..r.pops.len()).map(|i| r.statuses.get(i).cloned().unwrap_or_default())
}

/// A POP liveness value as a word.
pub fn liveness_name(v: i32) -> &'static str {
    match pb::PopLiveness::try_from(v) {
        Ok(pb::PopLiveness::Online) => "online",
        Ok(pb::PopLiveness::Suspect) => "suspect",
        Ok(pb::PopLiveness::Offline) => "offline",
        _ => "never-seen",
    }
}

/// The hub node of an uplink session holder (`<node>/<session>`), or "-".
fn holder_node(holder: &str) -> String {
    match holder.split_once('/') {
        Some((node, _)) => node.to_string(),
        None => "-".into(),
    }
}

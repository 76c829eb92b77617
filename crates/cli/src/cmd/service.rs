//! `service list|show` and `explain`: global services and why traffic goes
//! where it goes.

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};
use switchyard_proto::pb;

use super::{ops::liveness_name, ops::service_key, Global};
use crate::{client, output};

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// List global services (the merge of every POP's exports).
    List,
    /// Show one service: exports, conflicts, policy, and with `--from POP`
    /// its tiers as that POP sees them.
    Show {
        /// NAMESPACE/NAME.
        service: String,
        /// Show the decision table entry of this POP.
        #[arg(long)]
        from: Option<String>,
    },
}

fn type_name(t: i32) -> &'static str {
    if t == pb::ServiceType::Headless as i32 {
        "Headless"
    } else {
        "ClusterSetIP"
    }
}

fn ports_str(ports: &[pb::ServicePort]) -> String {
    ports
        .iter()
        .map(|p| {
            let proto = if p.protocol == pb::Protocol::Udp as i32 {
                "udp"
            } else {
                "tcp"
            };
            if p.name.is_empty() {
                format!("{}/{proto}", p.port)
            } else {
                format!("{}:{}/{proto}", p.name, p.port)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn key_str(k: Option<&pb::ServiceKey>) -> String {
    k.map(|k| format!("{}/{}", k.namespace, k.name))
        .unwrap_or_default()
}

fn service_json(s: &pb::GlobalService) -> Value {
    json!({
        "service": key_str(s.service.as_ref()),
        "type": type_name(s.r#type),
        "ports": ports_str(&s.ports),
        "pops": s.pops,
        "defined_by": s.defined_by,
        "conflicts": s.conflicts.iter().map(|c| json!({"pop": c.pop, "reason": c.reason})).collect::<Vec<_>>(),
        "updated_index": s.updated_index,
    })
}

fn view_json(v: &pb::ServiceView) -> Value {
    json!({
        "vip": v.vip,
        "ports": v.ports,
        "dns_ttl_s": v.dns_ttl_s,
        "tiers": v.tiers.iter().map(|t| t.targets.iter().map(|tg| json!({
            "pop": tg.pop,
            "weight": tg.weight,
            "endpoints": tg.endpoints.iter().map(|e| format!("{}:{}", e.address, e.port)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}

fn detail_json(d: &pb::ServiceDetail) -> Value {
    let mut v = d.service.as_ref().map(service_json).unwrap_or(Value::Null);
    v["exports"] = Value::Array(
        d.exports
            .iter()
            .map(|e| {
                json!({
                    "pop": e.pop,
                    "endpoints": e.endpoints.iter().map(|x| json!({"address": x.address, "port": x.port, "ready": x.ready})).collect::<Vec<_>>(),
                    "exported_index": e.exported_index,
                })
            })
            .collect(),
    );
    v["policy"] = match (&d.policy, d.has_policy) {
        (Some(p), true) => json!(pb::PolicyMode::try_from(p.mode)
            .map(|m| m.as_str_name())
            .unwrap_or("UNKNOWN")),
        _ => json!("POLICY_MODE_LOCALITY (default)"),
    };
    if !d.from_pop.is_empty() {
        v["from"] = json!({
            "pop": d.from_pop,
            "epoch": d.epoch,
            "visible": d.visible,
            "invisible_reason": d.invisible_reason,
            "view": d.view.as_ref().map(view_json),
            "why": d.pops.iter().map(|p| json!({
                "pop": p.pop,
                "tier": if p.tier < 0 { Value::Null } else { json!(p.tier) },
                "reason": p.reason,
                "liveness": liveness_name(p.liveness),
                "damped": p.damped,
                "ready": p.ready,
                "total": p.total,
            })).collect::<Vec<_>>(),
        });
    }
    v
}

async fn get(g: &Global, service: &str, from: Option<String>) -> Result<pb::ServiceDetail> {
    let key = service_key(service)?;
    let mut a = client::connect(g.config.as_ref()).await?;
    let addr = a.addr.clone();
    Ok(a.client
        .get_service(pb::GetServiceRequest {
            service: Some(key),
            from_pop: from.unwrap_or_default(),
            consistency: 0,
        })
        .await
        .map_err(|s| client::status_err(&addr, s))?
        .into_inner())
}

fn print_why(d: &pb::ServiceDetail) {
    if !d.visible {
        println!("{} does not import it: {}", d.from_pop, d.invisible_reason);
        return;
    }
    if let Some(v) = &d.view {
        println!(
            "seen from {} (view epoch {}): VIP {}  ports {:?}  DNS TTL {}s",
            d.from_pop,
            d.epoch,
            if v.vip.is_empty() { "-" } else { &v.vip },
            v.ports,
            v.dns_ttl_s
        );
        for (i, t) in v.tiers.iter().enumerate() {
            let targets: Vec<String> = t
                .targets
                .iter()
                .map(|tg| format!("{} (weight {})", tg.pop, tg.weight))
                .collect();
            println!("  tier {i}: {}", targets.join(", "));
        }
        if v.tiers.is_empty() {
            println!("  no tiers: nothing ready anywhere (DNS answers NXDOMAIN)");
        }
    }
    println!();
    output::table(
        &["POP", "TIER", "READY", "STATE", "WHY"],
        &d.pops
            .iter()
            .map(|p| {
                let mut state = liveness_name(p.liveness).to_string();
                if p.damped {
                    state.push_str(" (damped)");
                }
                vec![
                    p.pop.clone(),
                    if p.tier < 0 {
                        "-".into()
                    } else {
                        p.tier.to_string()
                    },
                    format!("{}/{}", p.ready, p.total),
                    state,
                    p.reason.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

pub async fn service(g: &Global, c: ServiceCmd) -> Result<()> {
    match c {
        ServiceCmd::List => {
            let mut a = client::connect(g.config.as_ref()).await?;
            let addr = a.addr.clone();
            let r = a
                .client
                .list_services(pb::ListServicesRequest::default())
                .await
                .map_err(|s| client::status_err(&addr, s))?
                .into_inner();
            match g.output {
                output::Format::Json => {
                    output::json(&Value::Array(r.services.iter().map(service_json).collect()))
                }
                output::Format::Table => output::table(
                    &["SERVICE", "TYPE", "PORTS", "POPS", "CONFLICTS"],
                    &r.services
                        .iter()
                        .map(|s| {
                            vec![
                                key_str(s.service.as_ref()),
                                type_name(s.r#type).into(),
                                ports_str(&s.ports),
                                s.pops.join(","),
                                s.conflicts.len().to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        ServiceCmd::Show { service, from } => {
            let d = get(g, &service, from).await?;
            match g.output {
                output::Format::Json => output::json(&detail_json(&d)),
                output::Format::Table => {
                    let Some(s) = &d.service else { return Ok(()) };
                    println!("service     {}", key_str(s.service.as_ref()));
                    println!(
                        "type        {}  ports {}  (defined by {}, oldest export)",
                        type_name(s.r#type),
                        ports_str(&s.ports),
                        s.defined_by
                    );
                    println!(
                        "policy      {}",
                        detail_json(&d)["policy"].as_str().unwrap_or_default()
                    );
                    for c in &s.conflicts {
                        println!(
                            "conflict    {} disagrees on {} (MCS: the oldest export wins)",
                            c.pop, c.reason
                        );
                    }
                    println!();
                    output::table(
                        &["POP", "ENDPOINTS", "READY"],
                        &d.exports
                            .iter()
                            .map(|e| {
                                vec![
                                    e.pop.clone(),
                                    e.endpoints
                                        .iter()
                                        .map(|x| format!("{}:{}", x.address, x.port))
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    format!(
                                        "{}/{}",
                                        e.endpoints.iter().filter(|x| x.ready).count(),
                                        e.endpoints.len()
                                    ),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    );
                    if !d.from_pop.is_empty() {
                        println!();
                        print_why(&d);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `switchyard explain NS/NAME --from POP`.
pub async fn explain(g: &Global, service: String, from: String) -> Result<()> {
    let d = get(g, &service, Some(from)).await?;
    match g.output {
        output::Format::Json => output::json(&detail_json(&d)["from"]),
        output::Format::Table => print_why(&d),
    }
    Ok(())
}

//! The POP zone `clusterset.local.` built from one POP's view (pure).
//!
//! Names (Kubernetes MCS DNS, KEP-1645), for each service in the view that
//! has at least one ready endpoint in some tier:
//! - `<svc>.<ns>.svc.clusterset.local` A/AAAA: the VIP (ClusterSetIP), or
//!   every ready endpoint address, best tier first (Headless);
//! - `_<port>._<proto>.<svc>.<ns>.svc.clusterset.local` SRV (named ports;
//!   unnamed ports use the number as name): Headless: one record per
//!   endpoint, priority = tier, weight = the target's weight in the view,
//!   target `<hostname>.<pop>.<svc>.<ns>.svc.clusterset.local` (the
//!   endpoint's hostname, or its address with dashes when it has none),
//!   which answers A/AAAA with that endpoint. ClusterSetIP: with per-POP
//!   names one record per target POP (priority = tier, weight from the
//!   view, target `<pop>.<svc>...`); without, one record (0 1) to the
//!   service name (the VIP: the gateway does the tiering);
//! - opt-in per policy (`per_pop_names`): `<pop>.<svc>.<ns>.svc.clusterset.local`
//!   A/AAAA with that POP's ready endpoints;
//! - `dns-version.clusterset.local` TXT "1.0.0" and
//!   [`EPOCH_NAME`] TXT "<epoch>" (the view's epoch, for debugging);
//! - the apex SOA (serial: the epoch, truncated to 32 bits).
//!
//! A service with no ready endpoint has no names: NXDOMAIN. TTLs come from
//! the policy (`dns_ttl_s`, default [`DEFAULT_TTL_S`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record};
use switchyard_proto::pb;

use crate::answers::{AnswerTable, BuildError, TableBuilder, ZoneApex};
use crate::query::rtype;

/// The MCS zone.
pub const ZONE: &str = "clusterset.local.";
/// TXT name answering the view's epoch.
pub const EPOCH_NAME: &str = "epoch.switchyard.clusterset.local.";
/// TTL when the policy sets none (s).
pub const DEFAULT_TTL_S: u32 = 5;
/// The MCS DNS specification version answered at `dns-version`.
pub const DNS_VERSION: &str = "1.0.0";

fn name(s: &str) -> Option<Name> {
    Name::from_ascii(s).ok()
}

fn addr_record(owner: &Name, ttl: u32, ip: IpAddr) -> (u16, Record) {
    match ip {
        IpAddr::V4(v4) => (
            rtype::A,
            Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))),
        ),
        IpAddr::V6(v6) => (
            rtype::AAAA,
            Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(v6))),
        ),
    }
}

/// Collects records per (name, type) before they are encoded.
#[derive(Default)]
struct Sets {
    sets: BTreeMap<(Name, u16), Vec<Record>>,
}

impl Sets {
    fn add(&mut self, owner: &Name, qtype: u16, record: Record) {
        let set = self.sets.entry((owner.clone(), qtype)).or_default();
        if !set.iter().any(|r| r.data == record.data) {
            set.push(record);
        }
    }

    fn encode(self, b: &mut TableBuilder) -> Result<(), BuildError> {
        for ((owner, qtype), records) in self.sets {
            b.set(&owner, qtype, 0, records)?;
        }
        Ok(())
    }

    fn addr(&mut self, owner: &Name, ttl: u32, ip: IpAddr) {
        let (t, r) = addr_record(owner, ttl, ip);
        self.add(owner, t, r);
    }
}

/// A DNS label for an endpoint: its hostname if it is a valid label,
/// else its address with dashes (`10-0-0-1`, `fd00--1`).
fn endpoint_label(ep: &pb::Endpoint, ip: IpAddr) -> String {
    let h = ep.hostname.to_ascii_lowercase();
    let valid = !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-');
    if valid {
        h
    } else {
        ip.to_string().replace(['.', ':'], "-")
    }
}

fn port_label(p: &pb::ServicePort) -> (String, &'static str) {
    let name = if p.name.is_empty() {
        p.port.to_string()
    } else {
        p.name.to_ascii_lowercase()
    };
    let proto = if p.protocol == pb::Protocol::Udp as i32 {
        "_udp"
    } else {
        "_tcp"
    };
    (format!("_{name}"), proto)
}

/// The answer table of `view` (`None`: no view yet, only the zone's fixed
/// names).
pub fn build(view: Option<&pb::PopView>) -> Result<AnswerTable, BuildError> {
    let apex = Name::from_ascii(ZONE).unwrap_or_else(|_| Name::root());
    let epoch = view.map(|v| v.epoch).unwrap_or(0);
    let zone = ZoneApex::new(&apex, epoch as u32, DEFAULT_TTL_S);
    let mut sets = Sets::default();
    sets.add(&apex, rtype::SOA, zone.soa_record(&apex));
    if let Some(v) = name("dns-version.clusterset.local.") {
        let txt = TXT::new(vec![DNS_VERSION.to_string()]);
        sets.add(
            &v,
            rtype::TXT,
            Record::from_rdata(v.clone(), DEFAULT_TTL_S, RData::TXT(txt)),
        );
    }
    if let Some(e) = name(EPOCH_NAME) {
        let txt = TXT::new(vec![epoch.to_string()]);
        sets.add(
            &e,
            rtype::TXT,
            Record::from_rdata(e.clone(), 0, RData::TXT(txt)),
        );
    }
    let mut b = TableBuilder::new(vec![zone], epoch);
    sets.encode(&mut b)?;
    // One service at a time: the intermediate records (hickory names and
    // record data, far larger than the wire bytes) of only one service
    // exist at once, which keeps the peak (and so the RSS) low.
    for sv in view.map(|v| v.services.as_slice()).unwrap_or_default() {
        let mut sets = Sets::default();
        service(sv, &mut sets);
        sets.encode(&mut b)?;
    }
    b.finish()
}

fn service(sv: &pb::ServiceView, sets: &mut Sets) {
    let Some(key) = &sv.service else {
        return;
    };
    let ready = sv
        .tiers
        .iter()
        .any(|t| t.targets.iter().any(|t| !t.endpoints.is_empty()));
    if !ready {
        return;
    }
    let Some(svc) = name(&format!("{}.{}.svc.{ZONE}", key.name, key.namespace)) else {
        tracing::warn!(ns = %key.namespace, svc = %key.name, "service name is not a DNS name; not served");
        return;
    };
    let ttl = if sv.dns_ttl_s == 0 {
        DEFAULT_TTL_S
    } else {
        sv.dns_ttl_s
    };
    let headless = sv.r#type == pb::ServiceType::Headless as i32;
    if headless {
        for tier in &sv.tiers {
            for t in &tier.targets {
                for ep in &t.endpoints {
                    if let Ok(ip) = ep.address.parse::<IpAddr>() {
                        sets.addr(&svc, ttl, ip);
                    }
                }
            }
        }
    } else if let Ok(vip) = sv.vip.parse::<IpAddr>() {
        sets.addr(&svc, ttl, vip);
    } else {
        return;
    }
    // Per-POP names, and for headless the endpoint names.
    for tier in &sv.tiers {
        for t in &tier.targets {
            let Ok(pop) = svc.prepend_label(t.pop.to_ascii_lowercase()) else {
                continue;
            };
            for ep in &t.endpoints {
                let Ok(ip) = ep.address.parse::<IpAddr>() else {
                    continue;
                };
                if sv.per_pop_names {
                    sets.addr(&pop, ttl, ip);
                }
                if headless {
                    if let Ok(host) = pop.prepend_label(endpoint_label(ep, ip)) {
                        sets.addr(&host, ttl, ip);
                    }
                }
            }
        }
    }
    for p in &sv.service_ports {
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let (pname, proto) = port_label(p);
        let Some(owner) = svc
            .prepend_label(proto)
            .and_then(|n| n.prepend_label(pname.as_str()))
            .ok()
        else {
            continue;
        };
        let srv = |prio: usize, weight: u32, target: Name| {
            Record::from_rdata(
                owner.clone(),
                ttl,
                RData::SRV(SRV::new(
                    u16::try_from(prio).unwrap_or(u16::MAX),
                    u16::try_from(weight).unwrap_or(u16::MAX),
                    port,
                    target,
                )),
            )
        };
        if !headless && !sv.per_pop_names {
            sets.add(&owner, rtype::SRV, srv(0, 1, svc.clone()));
            continue;
        }
        for (prio, tier) in sv.tiers.iter().enumerate() {
            for t in &tier.targets {
                if t.endpoints.is_empty() {
                    continue;
                }
                let Ok(pop) = svc.prepend_label(t.pop.to_ascii_lowercase()) else {
                    continue;
                };
                if !headless {
                    sets.add(&owner, rtype::SRV, srv(prio, t.weight, pop));
                    continue;
                }
                for ep in &t.endpoints {
                    let Ok(ip) = ep.address.parse::<IpAddr>() else {
                        continue;
                    };
                    if let Ok(host) = pop.prepend_label(endpoint_label(ep, ip)) {
                        // One port per endpoint in the view: it is the
                        // target port only for single-port services.
                        let port = if sv.service_ports.len() == 1 {
                            u16::try_from(ep.port)
                                .ok()
                                .filter(|p| *p != 0)
                                .unwrap_or(port)
                        } else {
                            port
                        };
                        let mut r = srv(prio, t.weight, host);
                        if let RData::SRV(s) = &mut r.data {
                            *s = SRV::new(s.priority, s.weight, port, s.target.clone());
                        }
                        sets.add(&owner, rtype::SRV, r);
                    }
                }
            }
        }
    }
}

//! The hub's global zone (pure): `<svc>.<ns>.<zone>` answers external
//! clients with the gateway addresses of healthy POPs serving the service,
//! ordered for the client's POP.
//!
//! The client's POP is the POP whose `subnets` label (a comma-separated
//! CIDR list in `Labels.extra`) holds the client's address, or the EDNS
//! Client Subnet it sent (longest prefix wins). A client of POP P gets the
//! gateways in the order of P's own decision table (tier by tier); any
//! other client gets every healthy POP's gateway, sorted by POP name. The
//! hub fills [`GlobalInput`] from its applied state; this module only
//! turns it into answers.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record};

use crate::answers::{AnswerTable, BuildError, Subnet, TableBuilder, ZoneApex};
use crate::query::rtype;

/// Label key (in `Labels.extra`) holding a POP's client subnets.
pub const SUBNETS_LABEL: &str = "subnets";

/// A POP that can receive external clients.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalPop {
    /// POP name.
    pub name: String,
    /// Its gateway's address (the host of `Pop.gateway_addr`); `None`: no
    /// usable gateway, so never answered (its subnets still classify
    /// clients).
    pub gateway: Option<IpAddr>,
    /// Whether it is healthy (Online or Suspect, not damped).
    pub healthy: bool,
    /// Client subnets (from the `subnets` label).
    pub subnets: Vec<Subnet>,
}

/// One global service.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GlobalService {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// TTL of its answers (s).
    pub ttl: u32,
    /// POPs with ready endpoints for it, in the default order.
    pub pops: Vec<String>,
    /// For clients of a POP (key), the POPs in that POP's tier order.
    pub by_client: BTreeMap<String, Vec<String>>,
}

/// Everything the global zone is built from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GlobalInput {
    /// The zone (e.g. `global.example.`).
    pub zone: String,
    /// Applied log index the input was read at.
    pub applied_index: u64,
    /// POPs.
    pub pops: Vec<GlobalPop>,
    /// Services.
    pub services: Vec<GlobalService>,
}

/// Parses a `subnets` label value; invalid entries are returned apart.
pub fn parse_subnets(value: &str) -> (Vec<Subnet>, Vec<String>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match Subnet::parse(part) {
            Some(s) => ok.push(s),
            None => bad.push(part.to_string()),
        }
    }
    (ok, bad)
}

/// Why the global zone could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GlobalError {
    /// The zone is not a DNS name.
    #[error("global zone {0:?} is not a valid DNS name")]
    Zone(String),
    /// Encoding failed.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Checks and normalises a zone name (adds the final dot).
pub fn zone_name(zone: &str) -> Result<Name, GlobalError> {
    let mut n = Name::from_ascii(zone).map_err(|_| GlobalError::Zone(zone.to_string()))?;
    if n.num_labels() == 0 {
        return Err(GlobalError::Zone(zone.to_string()));
    }
    n.set_fqdn(true);
    Ok(n)
}

/// The answer table of the global zone.
pub fn build(input: &GlobalInput, default_ttl: u32) -> Result<AnswerTable, GlobalError> {
    let apex = zone_name(&input.zone)?;
    let zone = ZoneApex::new(&apex, input.applied_index as u32, default_ttl);
    let mut b = TableBuilder::new(vec![zone.clone()], input.applied_index);
    b.set(&apex, rtype::SOA, 0, vec![zone.soa_record(&apex)])?;
    if let Ok(e) = apex.prepend_label("_applied-index") {
        let txt = TXT::new(vec![input.applied_index.to_string()]);
        b.set(
            &e,
            rtype::TXT,
            0,
            vec![Record::from_rdata(e.clone(), 0, RData::TXT(txt))],
        )?;
    }
    let mut class_of: BTreeMap<&str, u16> = BTreeMap::new();
    for p in &input.pops {
        if p.subnets.is_empty() {
            continue;
        }
        let class = u16::try_from(class_of.len() + 1).unwrap_or(u16::MAX);
        class_of.insert(p.name.as_str(), class);
        for s in &p.subnets {
            b.add_subnet(*s, class);
        }
    }
    let gateway: BTreeMap<&str, IpAddr> = input
        .pops
        .iter()
        .filter(|p| p.healthy)
        .filter_map(|p| Some((p.name.as_str(), p.gateway?)))
        .collect();
    for svc in &input.services {
        let Ok(owner) = Name::from_ascii(format!("{}.{}", svc.name, svc.namespace))
            .and_then(|n| n.append_domain(&apex))
        else {
            continue;
        };
        let ttl = if svc.ttl == 0 { default_ttl } else { svc.ttl };
        let answer = |order: &[String]| -> (Vec<Record>, Vec<Record>) {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            let mut seen = Vec::new();
            for pop in order {
                let Some(ip) = gateway.get(pop.as_str()) else {
                    continue;
                };
                if seen.contains(ip) {
                    continue;
                }
                seen.push(*ip);
                match ip {
                    IpAddr::V4(a) => v4.push(Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::A((*a).into()),
                    )),
                    IpAddr::V6(a) => v6.push(Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::AAAA((*a).into()),
                    )),
                }
            }
            (v4, v6)
        };
        let (v4, v6) = answer(&svc.pops);
        if v4.is_empty() && v6.is_empty() {
            // Nothing healthy: NXDOMAIN, like the POP zone.
            continue;
        }
        b.set(&owner, rtype::A, 0, v4)?;
        b.set(&owner, rtype::AAAA, 0, v6)?;
        for (client, order) in &svc.by_client {
            let Some(class) = class_of.get(client.as_str()) else {
                continue;
            };
            // The client's tier order first, then every other healthy POP.
            let mut full = order.clone();
            full.extend(svc.pops.iter().filter(|p| !order.contains(p)).cloned());
            let (v4, v6) = answer(&full);
            b.set(&owner, rtype::A, *class, v4)?;
            b.set(&owner, rtype::AAAA, *class, v6)?;
        }
    }
    Ok(b.finish()?)
}

//! `decide(state, pop) -> PopView`: the decision table of one POP.
//!
//! A pure function of the replicated state (no clock, no I/O, no
//! randomness): every hub node computes byte-equal views for the same
//! applied index, and DNS, gateway routing and EndpointSlices are all
//! derived from this one table.
//!
//! # Rules
//!
//! - **Visibility**: a POP imports every global service whose policy has an
//!   empty `export_to` or one with a selector matching the POP (by name
//!   and/or labels), its own services included.
//! - **Eligibility**: another POP's endpoints are used only while it is
//!   Online or Suspect, not in failback damping, and not revoked. Suspect
//!   stays in (early warning; gateways probe peers themselves). A POP's own
//!   endpoints are always eligible in its own view: liveness is the other
//!   POPs' reachability of it, and a POP always reaches itself.
//! - **Tiers before spill**, by mode:
//!   - `Locality`: tier 0 is the POP itself; then one tier per topology
//!     distance: same `group`, same `zone` (and region), same `region`,
//!     anything else. Empty labels never match.
//!   - `Failover`: one tier per selector, in order; a POP goes in the first
//!     tier whose selector matches it; POPs matching none are left out.
//!   - `ActiveActive`: one tier of every exporting POP, weight from the
//!     policy (default 1; weight 0 drains a POP).
//! - **min_healthy spill** (Envoy-style): a tier's health is the ready
//!   endpoints of its eligible members over all endpoints of all its
//!   members (an offline member's endpoints count as not ready: its
//!   capacity is gone). A tier with no ready endpoint, or below
//!   `min_healthy`, is *merged* into the next tier (its surviving targets
//!   keep serving, alongside the next tier's) and the merged tier is judged
//!   again; the last tier is never merged. Default `min_healthy` is 0: spill
//!   only when a tier has nothing ready.
//! - **Targets**: eligible members with at least one ready endpoint, ready
//!   endpoints only. Weight = number of ready endpoints (Locality,
//!   Failover: even load per endpoint when tiers merge) or the policy
//!   weight (ActiveActive). Order within a tier: measured RTT bucket from
//!   this POP (unmeasured last), then name.
//! - **VIP**: this POP's allocation for the service, for ClusterSetIP
//!   services only (headless services answer with endpoint addresses).
//! - **Epoch**: the largest log index among the inputs read: this POP's
//!   record, every policy, the tombstone index (removals), and for each
//!   visible service its record, this POP's VIP, and each exporting POP's
//!   record, liveness and RTT from this POP. It may move without a visible
//!   change (conservative), never stays still across one, never goes down.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use switchyard_proto::pb;

use crate::state::State;

mod explain;
pub use explain::{explain, Explanation};

/// DNS TTL (s) when the policy leaves it at 0 or there is no policy: short,
/// so resolvers follow failovers quickly.
pub const DEFAULT_DNS_TTL_S: u32 = 5;

/// At most this many targets (POPs) per service in a view, best first: a
/// service exported by a thousand POPs would otherwise put a thousand
/// targets (with their endpoints) in every POP's view and move them all on
/// every export change, while nobody fails over past the first few tiers.
pub const MAX_TARGETS_PER_SERVICE: usize = 64;

/// `min_healthy` (per mille) when the policy leaves it at 0 or there is no
/// policy: spill only when a tier has no ready endpoint.
pub const DEFAULT_MIN_HEALTHY_PERMILLE: u32 = 0;

/// The decision table of POP `pop` from `state`. An unknown POP gets an
/// empty view (with an epoch that still never goes down).
pub fn decide(state: &State, pop: &str) -> pb::PopView {
    let mut epoch = state.tombstone_index;
    for p in state.policies.values() {
        epoch = epoch.max(p.updated_index);
    }
    let Some(me) = state.pops.get(pop) else {
        return pb::PopView {
            pop: pop.to_string(),
            epoch,
            services: Vec::new(),
            peers: Vec::new(),
        };
    };
    epoch = epoch.max(me.updated_index);
    let mut services = Vec::new();
    for (key, svc) in &state.services {
        let policy = state.policies.get(key);
        let export_to = policy.map_or(&[][..], |p| &p.export_to[..]);
        if !export_to.is_empty() && !export_to.iter().any(|s| selector_matches(s, me)) {
            continue;
        }
        epoch = epoch.max(svc.updated_index);
        let vip = state
            .vips
            .get(&(pop.to_string(), key.0.clone(), key.1.clone()));
        if let Some(v) = vip {
            epoch = epoch.max(v.allocated_index);
        }
        let members = members(state, me, key, &mut epoch);
        let mut view = service_view(svc, policy, vip, &members, me);
        if !export_to.is_empty()
            && state
                .exports
                .contains_key(&(key.0.clone(), key.1.clone(), pop.to_string()))
        {
            // This POP's gateway must refuse tunnel streams from POPs the
            // policy does not export to: it gets the resolved list. Any
            // POP's record may enter or leave it, so all count.
            view.import_restricted = true;
            for p in state.pops.values() {
                epoch = epoch.max(p.updated_index);
                if export_to.iter().any(|s| selector_matches(s, p)) {
                    view.importers.push(p.name.clone());
                }
            }
        }
        services.push(view);
    }
    let peers = peers(state, pop, &services, &mut epoch);
    pb::PopView {
        pop: pop.to_string(),
        epoch,
        services,
        peers,
    }
}

/// The gateways of the other POPs in any tier of `services`, sorted by POP
/// name. Their records' indexes count toward the epoch, so a moved gateway
/// reaches every view that routes to it.
fn peers(
    state: &State,
    me: &str,
    services: &[pb::ServiceView],
    epoch: &mut u64,
) -> Vec<pb::PeerGateway> {
    let names: std::collections::BTreeSet<&str> = services
        .iter()
        .flat_map(|s| &s.tiers)
        .flat_map(|t| &t.targets)
        .map(|t| t.pop.as_str())
        .filter(|p| *p != me)
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let rec = state.pops.get(name)?;
            if rec.gateway_addr.is_empty() {
                return None;
            }
            *epoch = (*epoch).max(rec.updated_index);
            Some(pb::PeerGateway {
                pop: name.to_string(),
                gateway_addr: rec.gateway_addr.clone(),
            })
        })
        .collect()
}

/// One exporting POP of a service, as decide sees it.
struct Member<'a> {
    /// The POP's record (name, labels).
    pop: &'a pb::Pop,
    /// May traffic go there (see the module rules).
    eligible: bool,
    /// Its ready endpoints, canonical order.
    ready: Vec<pb::Endpoint>,
    /// All its endpoints, ready or not.
    total: u64,
    /// RTT bucket from the deciding POP; `u32::MAX` when unmeasured.
    rtt: u32,
}

impl Member<'_> {
    /// Preference order within a tier: nearer first, then by name.
    fn order(&self, other: &Self) -> Ordering {
        (self.rtt, &self.pop.name).cmp(&(other.rtt, &other.pop.name))
    }
}

/// Every POP exporting service `key`, in POP-name order, with the indexes
/// of what was read folded into `epoch`.
fn members<'a>(
    state: &'a State,
    me: &pb::Pop,
    key: &(String, String),
    epoch: &mut u64,
) -> Vec<Member<'a>> {
    let mut out = Vec::new();
    let from = (key.0.clone(), key.1.clone(), String::new());
    for ((ns, name, q), export) in state.exports.range(from..) {
        if ns != &key.0 || name != &key.1 {
            break;
        }
        let Some(qp) = state.pops.get(q) else {
            continue;
        };
        *epoch = (*epoch).max(qp.updated_index);
        if let Some(st) = state.pop_status.get(q) {
            *epoch = (*epoch).max(st.liveness_index);
        }
        let rtt = match state.rtts.get(&(me.name.clone(), q.clone())) {
            Some(r) => {
                *epoch = (*epoch).max(r.updated_index);
                r.bucket
            }
            None => u32::MAX,
        };
        out.push(Member {
            pop: qp,
            eligible: q == &me.name || state.is_eligible(q),
            ready: export
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .cloned()
                .collect(),
            total: export.endpoints.len() as u64,
            rtt,
        });
    }
    out
}

/// Builds one service's view for POP `me`.
fn service_view(
    svc: &pb::GlobalService,
    policy: Option<&pb::TrafficPolicy>,
    vip: Option<&pb::VipAllocation>,
    members: &[Member<'_>],
    me: &pb::Pop,
) -> pb::ServiceView {
    let mode = policy
        .and_then(|p| pb::PolicyMode::try_from(p.mode).ok())
        .unwrap_or(pb::PolicyMode::Locality);
    let mut weight_of: BTreeMap<&str, u32> = BTreeMap::new();
    let raw: Vec<Vec<&Member<'_>>> = match mode {
        pb::PolicyMode::Locality => {
            let mut by_distance: BTreeMap<u8, Vec<&Member<'_>>> = BTreeMap::new();
            for m in members {
                by_distance.entry(distance(me, m.pop)).or_default().push(m);
            }
            by_distance.into_values().collect()
        }
        pb::PolicyMode::Failover => {
            let selectors = policy.map_or(&[][..], |p| &p.failover[..]);
            let mut placed = vec![false; members.len()];
            let mut tiers = Vec::new();
            for sel in selectors {
                let mut tier = Vec::new();
                for (i, m) in members.iter().enumerate() {
                    if !placed[i] && selector_matches(sel, m.pop) {
                        placed[i] = true;
                        tier.push(m);
                    }
                }
                tiers.push(tier);
            }
            tiers
        }
        pb::PolicyMode::ActiveActive => {
            let weights = policy.map(|p| &p.weights);
            let mut tier = Vec::new();
            for m in members {
                let w = weights
                    .and_then(|w| w.get(&m.pop.name))
                    .copied()
                    .unwrap_or(1);
                if w > 0 {
                    weight_of.insert(&m.pop.name, w);
                    tier.push(m);
                }
            }
            vec![tier]
        }
    };
    let min_healthy = match policy.map_or(0, |p| p.min_healthy_permille) {
        0 => DEFAULT_MIN_HEALTHY_PERMILLE,
        v => v,
    };
    let tiers = spill(raw, min_healthy, |m| {
        match weight_of.get(m.pop.name.as_str()) {
            Some(w) => *w,
            None => u32::try_from(m.ready.len()).unwrap_or(u32::MAX),
        }
    });

    let mut ports: Vec<u32> = svc.ports.iter().map(|p| p.port).collect();
    ports.sort_unstable();
    ports.dedup();
    let headless = svc.r#type == pb::ServiceType::Headless as i32;
    pb::ServiceView {
        service: svc.service.clone(),
        vip: match vip {
            Some(v) if !headless => v.address.clone(),
            _ => String::new(),
        },
        ports,
        tiers,
        dns_ttl_s: match policy.map_or(0, |p| p.dns_ttl_s) {
            0 => DEFAULT_DNS_TTL_S,
            v => v,
        },
        r#type: svc.r#type,
        service_ports: svc.ports.clone(),
        stale: policy.map_or(0, |p| p.stale),
        stale_drop_after_ms: policy.map_or(0, |p| p.stale_drop_after_ms),
        mode: mode as i32,
        per_pop_names: policy.is_some_and(|p| p.per_pop_names),
        // Filled by `decide` for exporters of restricted services.
        import_restricted: false,
        importers: Vec::new(),
    }
}

/// Applies the min_healthy rule to raw tiers (see the module rules) and
/// emits the targets. `min_healthy` is per mille.
fn spill(
    raw: Vec<Vec<&Member<'_>>>,
    min_healthy: u32,
    weight: impl Fn(&Member<'_>) -> u32,
) -> Vec<pb::Tier> {
    let mut out = Vec::new();
    let mut acc: Vec<&Member<'_>> = Vec::new();
    let last = raw.len().saturating_sub(1);
    let mut room = MAX_TARGETS_PER_SERVICE;
    for (i, tier) in raw.into_iter().enumerate() {
        if room == 0 {
            break;
        }
        acc.extend(tier);
        let ready: u64 = acc
            .iter()
            .filter(|m| m.eligible)
            .map(|m| m.ready.len() as u64)
            .sum();
        let total: u64 = acc.iter().map(|m| m.total).sum();
        let healthy = ready > 0 && ready * 1000 >= u64::from(min_healthy) * total;
        if !healthy && i < last {
            continue;
        }
        let mut members: Vec<&Member<'_>> = std::mem::take(&mut acc)
            .into_iter()
            .filter(|m| m.eligible && !m.ready.is_empty())
            .collect();
        members.sort_by(|a, b| a.order(b));
        members.truncate(room);
        room -= members.len();
        let targets: Vec<pb::Target> = members
            .into_iter()
            .map(|m| pb::Target {
                pop: m.pop.name.clone(),
                weight: weight(m),
                endpoints: m.ready.clone(),
            })
            .collect();
        if !targets.is_empty() {
            out.push(pb::Tier { targets });
        }
    }
    out
}

/// Topology distance from `me` to `other`: 0 itself, 1 same group, 2 same
/// zone (in the same region), 3 same region, 4 anything else. Empty labels
/// never match, so unlabelled POPs are all "anything else" to each other.
pub(crate) fn distance(me: &pb::Pop, other: &pb::Pop) -> u8 {
    if me.name == other.name {
        return 0;
    }
    let d = pb::Labels::default();
    let a = me.labels.as_ref().unwrap_or(&d);
    let b = other.labels.as_ref().unwrap_or(&d);
    if !a.group.is_empty() && a.group == b.group {
        1
    } else if !a.zone.is_empty() && a.zone == b.zone && a.region == b.region {
        2
    } else if !a.region.is_empty() && a.region == b.region {
        3
    } else {
        4
    }
}

/// Whether `sel` selects `pop`: every condition given must hold, the name
/// (if set) and each label pair (`region`, `zone`, `group` name the
/// topology labels, any other key the free labels). An empty selector
/// selects every POP.
pub fn selector_matches(sel: &pb::PopSelector, pop: &pb::Pop) -> bool {
    if !sel.pop.is_empty() && sel.pop != pop.name {
        return false;
    }
    let d = pb::Labels::default();
    let l = pop.labels.as_ref().unwrap_or(&d);
    sel.labels.iter().all(|(k, v)| {
        let have = match k.as_str() {
            "region" => Some(&l.region),
            "zone" => Some(&l.zone),
            "group" => Some(&l.group),
            other => l.extra.get(other),
        };
        have == Some(v)
    })
}

#[cfg(test)]
mod tests;

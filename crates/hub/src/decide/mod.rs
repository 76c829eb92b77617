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

use std::cell::OnceCell;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use switchyard_proto::{pb, uplink::ServiceEntry};

use crate::state::State;

mod explain;
mod view;
pub use explain::{explain, Explanation};
pub use view::{ServicePart, View};

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
    Prepared::new(state).view(pop)
}

/// The part of `decide` that is the same for every POP: each POP's
/// eligibility and each service's exporters with their ready-endpoint
/// counts, gathered once from one state so that computing many POPs'
/// views from it costs a pass over compact arrays per POP instead of a
/// walk through the state's maps (with a thousand POPs exporting the same
/// services, the maps' scattered keys and endpoint lists were most of the
/// cost).
pub struct Prepared<'a> {
    state: &'a State,
    /// Tombstone and policy indexes: in every view's epoch.
    base_epoch: u64,
    /// Largest index of any POP record: moves when a POP joins, changes
    /// labels or gateway (a removal moves the tombstone index).
    max_pop_index: u64,
    /// Every POP, in name order.
    book: Vec<BookEntry<'a>>,
    /// Every global service, in key order.
    services: Vec<ServiceBase<'a>>,
}

/// One POP as every other POP sees it.
struct BookEntry<'a> {
    pop: &'a pb::Pop,
    /// Online or Suspect, not damped, not revoked (see the module rules).
    eligible: bool,
    /// Largest of its record's and liveness's indexes.
    index: u64,
}

/// One global service and its exporters.
struct ServiceBase<'a> {
    key: &'a (String, String),
    svc: &'a pb::GlobalService,
    policy: Option<&'a pb::TrafficPolicy>,
    /// Exporters in POP-name order.
    exporters: Vec<Exporter<'a>>,
    /// Largest of the service record's index and its exporters' book
    /// indexes.
    index: u64,
}

/// One POP's export of a service.
struct Exporter<'a> {
    /// Position of the POP in the book (so: in name order).
    rank: usize,
    /// How many of its endpoints are ready.
    ready: u32,
    /// All its endpoints, ready or not.
    total: u64,
    /// The export: ready endpoints are copied only for chosen targets.
    export: &'a pb::ServiceExport,
    /// Its target weighted by ready endpoints, made the first time a view
    /// chooses it and shared by every later one.
    target: OnceCell<Arc<pb::Target>>,
}

impl<'a> Prepared<'a> {
    /// Gathers what every view of `state` shares: one pass over the POPs,
    /// their status and revocations, and the exports.
    pub fn new(state: &'a State) -> Self {
        let mut base_epoch = state.tombstone_index;
        for p in state.policies.values() {
            base_epoch = base_epoch.max(p.updated_index);
        }
        let mut status = state.pop_status.iter().peekable();
        let revoked_kind = pb::RevocationKind::Pop as i32;
        let mut revoked = state
            .revocations
            .range((revoked_kind, String::new())..)
            .take_while(|((k, _), _)| *k == revoked_kind)
            .map(|((_, subject), _)| subject.as_str())
            .peekable();
        let mut max_pop_index = 0;
        let book: Vec<BookEntry<'a>> = state
            .pops
            .iter()
            .map(|(name, pop)| {
                let st = next_for(&mut status, name, |(k, _)| k.as_str()).map(|(_, st)| st);
                let is_revoked = next_for(&mut revoked, name, |s| s).is_some();
                let live = st.is_some_and(|st| {
                    matches!(
                        pb::PopLiveness::try_from(st.liveness),
                        Ok(pb::PopLiveness::Online | pb::PopLiveness::Suspect)
                    ) && !st.damped
                });
                max_pop_index = max_pop_index.max(pop.updated_index);
                BookEntry {
                    pop,
                    eligible: live && !is_revoked,
                    index: pop.updated_index.max(st.map_or(0, |st| st.liveness_index)),
                }
            })
            .collect();
        // Exports are keyed (namespace, name, POP): one walk meets each
        // service's exporters together, in POP-name order like the book.
        let mut services: Vec<ServiceBase<'a>> = Vec::with_capacity(state.services.len());
        let mut exports = state.exports.iter().peekable();
        for (key, svc) in &state.services {
            let mut base = ServiceBase {
                key,
                svc,
                policy: state.policies.get(key),
                exporters: Vec::new(),
                index: svc.updated_index,
            };
            while let Some(((ns, name, _), _)) = exports.peek() {
                if (ns.as_str(), name.as_str()) >= (key.0.as_str(), key.1.as_str()) {
                    break;
                }
                exports.next();
            }
            let mut at = 0;
            while let Some(((_, _, q), export)) =
                exports.next_if(|((ns, name, _), _)| ns == &key.0 && name == &key.1)
            {
                // Look forward from the last hit: one comparison when most
                // POPs export the service, a binary search when few do.
                let rest = &book[at.min(book.len())..];
                let skip = match rest.first() {
                    Some(e) if e.pop.name.as_str() >= q.as_str() => 0,
                    _ => rest.partition_point(|e| e.pop.name.as_str() < q.as_str()),
                };
                at += skip;
                let rank = at;
                let Some(entry) = book.get(rank).filter(|e| &e.pop.name == q) else {
                    continue;
                };
                at += 1;
                base.index = base.index.max(entry.index);
                base.exporters.push(Exporter {
                    rank,
                    ready: u32::try_from(export.endpoints.iter().filter(|e| e.ready).count())
                        .unwrap_or(u32::MAX),
                    total: export.endpoints.len() as u64,
                    export,
                    target: OnceCell::new(),
                });
            }
            services.push(base);
        }
        Self {
            state,
            base_epoch,
            max_pop_index,
            book,
            services,
        }
    }

    /// The decision table of POP `pop` (see [`decide`]).
    pub fn view(&self, pop: &str) -> pb::PopView {
        self.view_from(pop, None).to_pb()
    }

    /// The decision table of POP `pop`, reusing the services of `prev` (an
    /// earlier view of the same POP from this function) whose inputs did
    /// not move: after one export change, one service is rebuilt instead
    /// of every one. Equal to [`Prepared::view`] whatever `prev` is.
    pub fn view_from(&self, pop: &str, prev: Option<&View>) -> View {
        let state = self.state;
        let mut epoch = self.base_epoch;
        let Some(me) = state.pops.get(pop) else {
            return View {
                pop: pop.to_string(),
                epoch,
                services: Vec::new(),
                peers: Vec::new(),
                stamp: 0,
            };
        };
        epoch = epoch.max(me.updated_index);
        // Every index a service part reads besides its own inputs; each
        // moves to the newest log index when its input changes, so an
        // equal maximum means none changed.
        let stamp = epoch.max(self.max_pop_index);
        let reusable = prev
            .filter(|p| p.stamp != 0 && p.stamp == stamp && p.pop == pop)
            .map_or(&[][..], |p| &p.services[..]);
        let mut reusable = reusable.iter().peekable();
        let sight = self.sight(me);
        // Ranks stand in for names below: comparing names per exporter
        // and collecting peers by name were a fifth of a view's cost.
        let my_rank = self
            .book
            .binary_search_by(|e| e.pop.name.as_str().cmp(pop))
            .ok();
        // This POP's VIPs, keyed (POP, namespace, name): met in service
        // order, without building a key per lookup.
        let mut vips = state
            .vips
            .range((pop.to_string(), String::new(), String::new())..)
            .take_while(|((p, _, _), _)| p == pop)
            .map(|((_, ns, name), v)| ((ns.as_str(), name.as_str()), v))
            .peekable();
        let mut chosen = vec![false; self.book.len()];
        let mut services = Vec::new();
        for base in &self.services {
            let (key, policy) = (base.key, base.policy);
            let export_to = policy.map_or(&[][..], |p| &p.export_to[..]);
            if !export_to.is_empty() && !export_to.iter().any(|s| selector_matches(s, me)) {
                continue;
            }
            let k = (key.0.as_str(), key.1.as_str());
            while vips.peek().is_some_and(|(vk, _)| *vk < k) {
                vips.next();
            }
            let vip = vips.next_if(|(vk, _)| *vk == k).map(|(_, v)| v);
            let mut inputs = base.index.max(vip.map_or(0, |v| v.allocated_index));
            for x in &base.exporters {
                inputs = inputs.max(sight[x.rank].rtt_index);
            }
            epoch = epoch.max(inputs);
            while reusable.peek().is_some_and(|p| p.key() < k) {
                reusable.next();
            }
            let part = match reusable.next_if(|p| p.key() == k) {
                Some(p) if p.inputs == inputs => Arc::clone(p),
                _ => Arc::new(self.service_part(base, vip, inputs, &sight, my_rank)),
            };
            for &r in &part.chosen {
                if let Some(c) = chosen.get_mut(r as usize) {
                    *c = true;
                }
            }
            if part.import_restricted() {
                // Its importers list reads every POP's record.
                epoch = epoch.max(self.max_pop_index);
            }
            services.push(part);
        }
        // The gateways of the other POPs in any tier, in name order. Their
        // records' indexes count toward the epoch, so a moved gateway
        // reaches every view that routes to it.
        let mut peers = Vec::new();
        for (rank, e) in self.book.iter().enumerate() {
            if chosen[rank] && Some(rank) != my_rank && !e.pop.gateway_addr.is_empty() {
                epoch = epoch.max(e.pop.updated_index);
                peers.push(pb::PeerGateway {
                    pop: e.pop.name.clone(),
                    gateway_addr: e.pop.gateway_addr.clone(),
                });
            }
        }
        View {
            pop: pop.to_string(),
            epoch,
            services,
            peers,
            stamp,
        }
    }

    /// One service of the view of the POP at `my_rank` (seen as `sight`).
    fn service_part(
        &self,
        base: &ServiceBase<'_>,
        vip: Option<&pb::VipAllocation>,
        inputs: u64,
        sight: &[Sight],
        my_rank: Option<usize>,
    ) -> ServicePart {
        let policy = base.policy;
        let mut mine = false;
        let members: Vec<Member<'_>> = base
            .exporters
            .iter()
            .map(|x| {
                let entry = &self.book[x.rank];
                let seen = &sight[x.rank];
                let is_me = Some(x.rank) == my_rank;
                mine |= is_me;
                Member {
                    pop: entry.pop,
                    rank: x.rank,
                    eligible: is_me || entry.eligible,
                    distance: seen.distance,
                    rtt: seen.rtt,
                    ready: x.ready,
                    total: x.total,
                    export: x.export,
                    target: &x.target,
                }
            })
            .collect();
        let mut chosen = Vec::new();
        let (mut head, tiers) = service_view(base.svc, policy, vip, &members, &mut chosen);
        let export_to = policy.map_or(&[][..], |p| &p.export_to[..]);
        if !export_to.is_empty() && mine {
            // This POP's gateway must refuse tunnel streams from POPs the
            // policy does not export to: it gets the resolved list.
            head.import_restricted = true;
            for e in &self.book {
                if export_to.iter().any(|s| selector_matches(s, e.pop)) {
                    head.importers.push(e.pop.name.clone());
                }
            }
        }
        ServicePart {
            head,
            tiers,
            inputs,
            chosen,
        }
    }

    /// Every POP of the book as seen from `me`: topology distance and
    /// measured RTT (with its index), by rank.
    fn sight(&self, me: &pb::Pop) -> Vec<Sight> {
        let mut rtts = self
            .state
            .rtts
            .range((me.name.clone(), String::new())..)
            .take_while(|((from, _), _)| *from == me.name)
            .map(|((_, to), r)| (to.as_str(), r))
            .peekable();
        self.book
            .iter()
            .map(|e| {
                let rtt = next_for(&mut rtts, &e.pop.name, |(to, _)| to).map(|(_, r)| r);
                Sight {
                    distance: distance(me, e.pop),
                    rtt: rtt.map_or(u32::MAX, |r| r.bucket),
                    rtt_index: rtt.map_or(0, |r| r.updated_index),
                }
            })
            .collect()
    }
}

/// Another POP as seen from the deciding one.
struct Sight {
    /// Topology distance (see [`distance`]).
    distance: u8,
    /// RTT bucket; `u32::MAX` when unmeasured.
    rtt: u32,
    /// Index of the RTT entry (0 when unmeasured): part of the epoch.
    rtt_index: u64,
}

/// Advances a name-ordered iterator past names before `name` and takes
/// the item named `name`, if any.
fn next_for<I: Iterator>(
    it: &mut std::iter::Peekable<I>,
    name: &str,
    key: impl Fn(&I::Item) -> &str,
) -> Option<I::Item> {
    while it.peek().is_some_and(|i| key(i) < name) {
        it.next();
    }
    it.next_if(|i| key(i) == name)
}

/// One exporting POP of a service, as the deciding POP sees it.
struct Member<'a> {
    /// The POP's record (name, labels).
    pop: &'a pb::Pop,
    /// Its position in POP-name order: ties are broken by comparing this
    /// rather than the names.
    rank: usize,
    /// May traffic go there (see the module rules).
    eligible: bool,
    /// Topology distance from the deciding POP.
    distance: u8,
    /// RTT bucket from the deciding POP; `u32::MAX` when unmeasured.
    rtt: u32,
    /// How many of its endpoints are ready.
    ready: u32,
    /// All its endpoints, ready or not.
    total: u64,
    /// Its export: ready endpoints are copied only for chosen targets.
    export: &'a pb::ServiceExport,
    /// Its shared target weighted by ready endpoints.
    target: &'a OnceCell<Arc<pb::Target>>,
}

impl Member<'_> {
    /// Preference order within a tier: nearer first, then by name.
    fn order(&self, other: &Self) -> Ordering {
        (self.rtt, self.rank).cmp(&(other.rtt, other.rank))
    }
}

/// Builds one service's view from its members (as seen from the deciding
/// POP): the view without tiers, and the tiers.
fn service_view(
    svc: &pb::GlobalService,
    policy: Option<&pb::TrafficPolicy>,
    vip: Option<&pb::VipAllocation>,
    members: &[Member<'_>],
    chosen: &mut Vec<u32>,
) -> (pb::ServiceView, Vec<Vec<Arc<pb::Target>>>) {
    let mode = policy
        .and_then(|p| pb::PolicyMode::try_from(p.mode).ok())
        .unwrap_or(pb::PolicyMode::Locality);
    let mut weight_of: BTreeMap<&str, u32> = BTreeMap::new();
    let raw: Vec<Vec<&Member<'_>>> = match mode {
        pb::PolicyMode::Locality => {
            let mut by_distance: BTreeMap<u8, Vec<&Member<'_>>> = BTreeMap::new();
            for m in members {
                by_distance.entry(m.distance).or_default().push(m);
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
    let tiers = spill(raw, min_healthy, chosen, |m| {
        match weight_of.get(m.pop.name.as_str()) {
            Some(w) => *w,
            None => m.ready,
        }
    });

    let mut ports: Vec<u32> = svc.ports.iter().map(|p| p.port).collect();
    ports.sort_unstable();
    ports.dedup();
    let headless = svc.r#type == pb::ServiceType::Headless as i32;
    let head = pb::ServiceView {
        service: svc.service.clone(),
        vip: match vip {
            Some(v) if !headless => v.address.clone(),
            _ => String::new(),
        },
        ports,
        tiers: Vec::new(),
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
    };
    (head, tiers)
}

/// Applies the min_healthy rule to raw tiers (see the module rules) and
/// emits the targets, adding their POPs' ranks to `chosen`. `min_healthy`
/// is per mille.
fn spill(
    raw: Vec<Vec<&Member<'_>>>,
    min_healthy: u32,
    chosen: &mut Vec<u32>,
    weight: impl Fn(&Member<'_>) -> u32,
) -> Vec<Vec<Arc<pb::Target>>> {
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
            .map(|m| u64::from(m.ready))
            .sum();
        let total: u64 = acc.iter().map(|m| m.total).sum();
        let healthy = ready > 0 && ready * 1000 >= u64::from(min_healthy) * total;
        if !healthy && i < last {
            continue;
        }
        let mut members: Vec<&Member<'_>> = std::mem::take(&mut acc)
            .into_iter()
            .filter(|m| m.eligible && m.ready > 0)
            .collect();
        // Only the best `room` are kept: select them before sorting, so a
        // tier of a thousand POPs costs a partition, not a full sort.
        if members.len() > room {
            members.select_nth_unstable_by(room - 1, |a, b| a.order(b));
            members.truncate(room);
        }
        members.sort_by(|a, b| a.order(b));
        room -= members.len();
        chosen.extend(members.iter().filter_map(|m| u32::try_from(m.rank).ok()));
        // Collected into a new vector: `into_iter().map().collect()` would
        // reuse `members`' buffer, sized for every exporter, and a view
        // holds its tiers for its whole life.
        let mut targets: Vec<Arc<pb::Target>> = Vec::with_capacity(members.len());
        targets.extend(members.iter().map(|m| {
            let w = weight(m);
            let make = || {
                Arc::new(pb::Target {
                    pop: m.pop.name.clone(),
                    weight: w,
                    endpoints: m
                        .export
                        .endpoints
                        .iter()
                        .filter(|e| e.ready)
                        .cloned()
                        .collect(),
                })
            };
            if w == m.ready {
                Arc::clone(m.target.get_or_init(make))
            } else {
                make()
            }
        }));
        if !targets.is_empty() {
            out.push(targets);
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

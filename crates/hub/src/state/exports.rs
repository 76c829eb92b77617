//! Exports, liveness, failback damping, RTT and VIPs: the inputs of
//! `decide` that POPs and the hub's detectors feed into the log.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_proto::pb::{self, ErrorCode};

use super::apply::{result_err, result_ok, valid_name};
use super::rtt::{rtt_bucket, rtt_bucket_floor_us, RTT_HYSTERESIS_BUCKETS};
use super::vip::Cidr;
use super::{key_of, State};

/// Failback damping (ms) for a POP none of whose services has a policy
/// (matches the CLI's `policy set --failback-after` default).
pub const DEFAULT_FAILBACK_AFTER_MS: u64 = 30_000;

type Key = (String, String);

impl State {
    /// `ApplyExports`: one POP's batch of export changes, idempotent by
    /// per-POP sequence number. An invalid batch is refused as a whole and
    /// its seq is not recorded (the agent may resend a fixed batch with it).
    pub(super) fn apply_exports(&mut self, index: u64, c: &pb::ApplyExports) -> pb::CommandResult {
        if !self.pops.contains_key(&c.pop) {
            return result_err(
                index,
                ErrorCode::NotFound,
                format!("no POP named {}", c.pop),
            );
        }
        let last = self.pop_status.get(&c.pop).map_or(0, |s| s.last_export_seq);
        if c.seq <= last {
            return pb::CommandResult {
                export_seq: last,
                ..result_ok(index)
            };
        }
        let mut named = BTreeSet::new();
        let mut upserts = Vec::with_capacity(c.upserts.len());
        for e in &c.upserts {
            let e = match canonical_export(e) {
                Ok(e) => e,
                Err(m) => return result_err(index, ErrorCode::Invalid, m),
            };
            if !named.insert(key_of(e.service.as_ref())) {
                return result_err(
                    index,
                    ErrorCode::Invalid,
                    "a service is named twice in one batch",
                );
            }
            upserts.push(e);
        }
        let mut withdrawals = Vec::with_capacity(c.withdrawals.len());
        for k in &c.withdrawals {
            let k = key_of(Some(k));
            if !named.insert(k.clone()) {
                return result_err(
                    index,
                    ErrorCode::Invalid,
                    "a service is named twice in one batch",
                );
            }
            withdrawals.push(k);
        }
        if c.full {
            // Everything this POP exports that the batch does not name. A
            // POP can only export global services (one exists exactly while
            // someone exports it), so look those up rather than scan every
            // POP's exports.
            let mine: Vec<Key> = self
                .services
                .keys()
                .filter(|k| !named.contains(*k))
                .filter(|(ns, name)| {
                    self.exports
                        .contains_key(&(ns.clone(), name.clone(), c.pop.clone()))
                })
                .cloned()
                .collect();
            withdrawals.extend(mine);
        }

        let mut touched = BTreeSet::new();
        for mut e in upserts {
            let (ns, name) = key_of(e.service.as_ref());
            let k = (ns.clone(), name.clone(), c.pop.clone());
            e.pop = c.pop.clone();
            match self.exports.get(&k) {
                Some(old)
                    if old.ports == e.ports
                        && old.r#type == e.r#type
                        && old.endpoints == e.endpoints =>
                {
                    // Unchanged content (e.g. a resend under a new seq): no
                    // index moves, so no view's epoch churns.
                }
                Some(old) => {
                    e.exported_index = old.exported_index;
                    e.updated_index = index;
                    self.exports.insert(k, e);
                    touched.insert((ns, name));
                }
                None => {
                    e.exported_index = index;
                    e.updated_index = index;
                    self.exports.insert(k, e);
                    touched.insert((ns, name));
                }
            }
        }
        for (ns, name) in withdrawals {
            if self
                .exports
                .remove(&(ns.clone(), name.clone(), c.pop.clone()))
                .is_some()
            {
                touched.insert((ns, name));
            }
        }
        self.pop_status
            .entry(c.pop.clone())
            .or_insert_with(|| new_status(&c.pop))
            .last_export_seq = c.seq;
        for k in touched {
            self.update_service_for_pop(index, &k, &c.pop);
        }
        pb::CommandResult {
            export_seq: c.seq,
            ..result_ok(index)
        }
    }

    /// Rebuilds the global service `k` from its exports after a change at
    /// `index`: MCS merge (oldest export wins for type and ports, later
    /// disagreeing exports are conflicts), VIPs on first appearance, and
    /// removal (with its VIPs) when nobody exports it any more.
    pub(super) fn recompute_service(&mut self, index: u64, k: &Key) {
        let exports: Vec<&pb::ServiceExport> = self
            .exports
            .range((k.0.clone(), k.1.clone(), String::new())..)
            .take_while(|((ns, name, _), _)| ns == &k.0 && name == &k.1)
            .map(|(_, e)| e)
            .collect();
        // Oldest export: lowest first-export index, then POP name (indexes
        // are unique per command, the name only makes the rule total).
        let Some(winner) = exports
            .iter()
            .min_by(|a, b| (a.exported_index, &a.pop).cmp(&(b.exported_index, &b.pop)))
        else {
            if self.services.remove(k).is_some() {
                let pops: Vec<String> = self.pops.keys().cloned().collect();
                for p in pops {
                    self.vips.remove(&(p, k.0.clone(), k.1.clone()));
                }
                self.tombstone_index = self.tombstone_index.max(index);
            }
            return;
        };
        let conflicts = exports
            .iter()
            .filter(|e| e.pop != winner.pop)
            .filter_map(|e| conflict_with(e, winner))
            .collect();
        let mut g = pb::GlobalService {
            service: winner.service.clone(),
            r#type: winner.r#type,
            ports: winner.ports.clone(),
            defined_by: winner.pop.clone(),
            created_index: index,
            updated_index: index,
            conflicts,
            pops: exports.iter().map(|e| e.pop.clone()).collect(),
        };
        let is_new = match self.services.get(k) {
            Some(old) => {
                g.created_index = old.created_index;
                // max, not assignment: in a real log `index` only grows, and
                // this keeps commands on distinct POPs commutative for tests
                // that replay them in another order with fixed indexes.
                g.updated_index = old.updated_index.max(index);
                false
            }
            None => true,
        };
        self.services.insert(k.clone(), g);
        if is_new {
            let pops: Vec<String> = self.pops.keys().cloned().collect();
            for p in pops {
                let used = self.vips_used(&p);
                self.allocate_vip(index, &p, k, used);
            }
        }
    }

    /// [`State::recompute_service`] after a change of POP `pop`'s export
    /// of `k` alone. While the oldest export (the winner) stays the same,
    /// only `pop`'s entries in the conflict and POP lists (both in POP-name
    /// order) can change, so they are patched; otherwise, or when `pop` is
    /// the winner, the service is rebuilt from every export. A thousand
    /// POPs exporting one service made every export commit rebuild those
    /// lists from a thousand exports.
    fn update_service_for_pop(&mut self, index: u64, k: &Key, pop: &str) {
        let Some(old) = self.services.get(k) else {
            return self.recompute_service(index, k);
        };
        if old.defined_by == pop {
            return self.recompute_service(index, k);
        }
        let Some(winner) = self
            .exports
            .get(&(k.0.clone(), k.1.clone(), old.defined_by.clone()))
        else {
            return self.recompute_service(index, k);
        };
        let mine = self
            .exports
            .get(&(k.0.clone(), k.1.clone(), pop.to_string()));
        if let Some(e) = mine {
            if (e.exported_index, &e.pop) < (winner.exported_index, &winner.pop) {
                return self.recompute_service(index, k);
            }
        }
        let conflict = mine.and_then(|e| conflict_with(e, winner));
        let exports = mine.is_some();
        let Some(g) = self.services.get_mut(k) else {
            return;
        };
        match (
            g.conflicts.binary_search_by(|c| c.pop.as_str().cmp(pop)),
            conflict,
        ) {
            (Ok(i), Some(c)) => g.conflicts[i] = c,
            (Ok(i), None) => {
                g.conflicts.remove(i);
            }
            (Err(i), Some(c)) => g.conflicts.insert(i, c),
            (Err(_), None) => {}
        }
        match g.pops.binary_search_by(|p| p.as_str().cmp(pop)) {
            Ok(i) if !exports => {
                g.pops.remove(i);
            }
            Err(i) if exports => g.pops.insert(i, pop.to_string()),
            _ => {}
        }
        g.updated_index = g.updated_index.max(index);
    }

    /// Addresses already allocated at POP `pop`, in its range's family.
    fn vips_used(&self, pop: &str) -> BTreeSet<u128> {
        let Some(cidr) = self.pops.get(pop).and_then(|p| Cidr::parse(&p.vip_cidr)) else {
            return BTreeSet::new();
        };
        self.vips
            .range((pop.to_string(), String::new(), String::new())..)
            .take_while(|((p, _, _), _)| p == pop)
            .filter_map(|(_, v)| cidr.addr_value(&v.address))
            .collect()
    }

    /// Gives service `k` a VIP at `pop` if it has none: the lowest free
    /// address of the POP's range. A full range leaves the service without
    /// a VIP at that POP (the view then carries an empty `vip`).
    fn allocate_vip(
        &mut self,
        index: u64,
        pop: &str,
        k: &Key,
        mut used: BTreeSet<u128>,
    ) -> BTreeSet<u128> {
        let vk = (pop.to_string(), k.0.clone(), k.1.clone());
        if self.vips.contains_key(&vk) {
            return used;
        }
        let Some(cidr) = self.pops.get(pop).and_then(|p| Cidr::parse(&p.vip_cidr)) else {
            return used;
        };
        if let Some(a) = cidr.first_free(&used) {
            used.insert(a);
            self.vips.insert(
                vk,
                pb::VipAllocation {
                    pop: pop.to_string(),
                    service: Some(pb::ServiceKey {
                        namespace: k.0.clone(),
                        name: k.1.clone(),
                    }),
                    address: cidr.addr_text(a),
                    allocated_index: index,
                },
            );
        }
        used
    }

    /// After a POP was created or its VIP range changed: drops its VIPs
    /// outside the range and allocates one for every global service that
    /// has none, in service-key order (deterministic).
    pub(super) fn reconcile_pop_vips(&mut self, index: u64, pop: &str) {
        let cidr = self.pops.get(pop).and_then(|p| Cidr::parse(&p.vip_cidr));
        let stale: Vec<_> = self
            .vips
            .range((pop.to_string(), String::new(), String::new())..)
            .take_while(|((p, _, _), _)| p == pop)
            .filter(|(_, v)| !cidr.is_some_and(|c| c.contains(&v.address)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.vips.remove(&k);
        }
        let mut used = self.vips_used(pop);
        let keys: Vec<Key> = self.services.keys().cloned().collect();
        for k in keys {
            used = self.allocate_vip(index, pop, &k, used);
        }
    }

    /// The VIP range for a POP record being written: the given one
    /// (validated, normalised), else the current one, else the next free
    /// dev block.
    pub(super) fn resolve_vip_cidr(&self, name: &str, given: &str) -> Result<String, String> {
        if !given.is_empty() {
            return Cidr::parse(given)
                .map(|c| c.to_text())
                .ok_or_else(|| format!("VIP range {given:?} is not a CIDR (e.g. 10.77.0.0/16)"));
        }
        if let Some(old) = self.pops.get(name).filter(|p| !p.vip_cidr.is_empty()) {
            return Ok(old.vip_cidr.clone());
        }
        if let Some(block) = Cidr::dev_block(self.dev_lowest_free) {
            return Ok(block.to_text());
        }
        // Pool exhausted (over 11,000 default POPs): share the first block.
        // Only POPs on one machine can collide, and none has that many.
        Ok(Cidr::dev_block(0).map(|c| c.to_text()).unwrap_or_default())
    }

    /// Counts a POP's VIP range in or out of [`State::dev_blocks`] (ranges
    /// outside the dev pool are not counted).
    pub(super) fn note_dev_block(&mut self, cidr: &str, added: bool) {
        let Some(k) = Cidr::parse(cidr).and_then(|c| c.dev_block_number()) else {
            return;
        };
        if added {
            *self.dev_blocks.entry(k).or_insert(0) += 1;
            // Blocks are mostly taken lowest first, so this advances by
            // one; after a removal it may pass several used blocks once.
            while self.dev_blocks.contains_key(&self.dev_lowest_free) {
                self.dev_lowest_free += 1;
            }
        } else if let Some(n) = self.dev_blocks.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.dev_blocks.remove(&k);
                self.dev_lowest_free = self.dev_lowest_free.min(k);
            }
        }
    }

    /// Removes everything that belongs to a removed POP: its exports (their
    /// services are recomputed), status, VIPs and RTTs.
    pub(super) fn forget_pop(&mut self, index: u64, pop: &str) {
        let mine: Vec<_> = self
            .exports
            .keys()
            .filter(|(_, _, p)| p == pop)
            .cloned()
            .collect();
        for k in &mine {
            self.exports.remove(k);
        }
        let services: BTreeSet<Key> = mine.into_iter().map(|(ns, n, _)| (ns, n)).collect();
        for k in services {
            self.recompute_service(index, &k);
        }
        self.pop_status.remove(pop);
        self.vips.retain(|(p, _, _), _| p != pop);
        self.rtts.retain(|(f, t), _| f != pop && t != pop);
        self.tombstone_index = self.tombstone_index.max(index);
    }

    /// `SetPopLiveness`: a transition decided by the hub node holding the
    /// POP's connection. Setting the current state again changes nothing
    /// (no index moves). Offline -> Online starts failback damping.
    pub(super) fn set_pop_liveness(
        &mut self,
        index: u64,
        c: &pb::SetPopLiveness,
    ) -> pb::CommandResult {
        if !self.pops.contains_key(&c.pop) {
            return result_err(
                index,
                ErrorCode::NotFound,
                format!("no POP named {}", c.pop),
            );
        }
        let to = match pb::PopLiveness::try_from(c.state) {
            Ok(pb::PopLiveness::Unknown) | Err(_) => {
                return result_err(
                    index,
                    ErrorCode::Invalid,
                    "liveness must be online, suspect or offline",
                )
            }
            Ok(s) => s,
        };
        let st = self
            .pop_status
            .entry(c.pop.clone())
            .or_insert_with(|| new_status(&c.pop));
        // Only the session that holds the POP may take it down: a POP that
        // reconnected through another hub node must not be marked offline
        // by the old connection's detector.
        if to != pb::PopLiveness::Online
            && !c.session.is_empty()
            && !st.holder.is_empty()
            && st.holder != c.session
        {
            return result_err(
                index,
                ErrorCode::Stale,
                format!(
                    "session {} no longer holds POP {} ({} does)",
                    c.session, c.pop, st.holder
                ),
            );
        }
        if to == pb::PopLiveness::Online {
            // A new holder changes no liveness, so no epoch moves.
            st.holder = c.session.clone();
        }
        if st.liveness == to as i32 {
            return result_ok(index);
        }
        match to {
            pb::PopLiveness::Offline => {
                st.was_offline = true;
                st.damped = false;
            }
            pb::PopLiveness::Online => {
                let from =
                    pb::PopLiveness::try_from(st.liveness).unwrap_or(pb::PopLiveness::Unknown);
                // Back from Suspect without having been Offline is the same
                // healthy period; anything else starts a new one.
                if from != pb::PopLiveness::Suspect || st.was_offline {
                    st.healthy_since_index = index;
                    st.healthy_since_ms = c.now_ms;
                }
                // Recovering: out of every tier until the damping ends.
                if st.was_offline {
                    st.damped = true;
                    st.was_offline = false;
                }
            }
            _ => {}
        }
        st.liveness = to as i32;
        st.liveness_index = index;
        st.reason = c.reason.clone();
        let event = pb::PopEvent {
            index,
            at_ms: c.now_ms,
            pop: c.pop.clone(),
            liveness: st.liveness,
            damped: st.damped,
            reason: c.reason.clone(),
        };
        self.record_event(event);
        result_ok(index)
    }

    /// `EndFailbackDamping`: only for the healthy period it names, so a
    /// proposal that raced with a new Offline/Online flap cannot cut the new
    /// period short.
    pub(super) fn end_failback_damping(
        &mut self,
        index: u64,
        c: &pb::EndFailbackDamping,
    ) -> pb::CommandResult {
        let Some(st) = self.pop_status.get_mut(&c.pop) else {
            return result_err(
                index,
                ErrorCode::NotFound,
                format!("no status for POP {}", c.pop),
            );
        };
        if !st.damped || st.healthy_since_index != c.healthy_since_index {
            return result_err(
                index,
                ErrorCode::Stale,
                format!(
                    "POP {} is not in the damping period started at {}",
                    c.pop, c.healthy_since_index
                ),
            );
        }
        st.damped = false;
        st.liveness_index = index;
        let event = pb::PopEvent {
            index,
            at_ms: c.now_ms,
            pop: c.pop.clone(),
            liveness: st.liveness,
            damped: false,
            reason: "failback damping ended: back in tiers".to_string(),
        };
        self.record_event(event);
        result_ok(index)
    }

    /// Adds to the bounded event log, kept sorted by log index with the
    /// lowest dropped first: the log is then the same whatever order
    /// commands on distinct records were applied in.
    fn record_event(&mut self, event: pb::PopEvent) {
        let at = self.events.partition_point(|e| e.index < event.index);
        self.events.insert(at, event);
        while self.events.len() > super::EVENT_LOG_LEN {
            self.events.pop_front();
        }
    }

    /// `ReportRtt`: stored as a bucket, replaced only when the new bucket is
    /// at least [`RTT_HYSTERESIS_BUCKETS`] away, so jitter never commits a
    /// change (and never moves an epoch).
    pub(super) fn report_rtt(&mut self, index: u64, c: &pb::ReportRtt) -> pb::CommandResult {
        if c.from_pop == c.to_pop || c.rtt_us == 0 {
            return result_err(
                index,
                ErrorCode::Invalid,
                "RTT needs two distinct POPs and a value > 0",
            );
        }
        for p in [&c.from_pop, &c.to_pop] {
            if !self.pops.contains_key(p) {
                return result_err(index, ErrorCode::NotFound, format!("no POP named {p}"));
            }
        }
        let bucket = rtt_bucket(c.rtt_us);
        let k = (c.from_pop.clone(), c.to_pop.clone());
        if let Some(old) = self.rtts.get(&k) {
            if old.bucket.abs_diff(bucket) < RTT_HYSTERESIS_BUCKETS {
                return result_ok(index);
            }
        }
        self.rtts.insert(
            k,
            pb::RttEntry {
                from_pop: c.from_pop.clone(),
                to_pop: c.to_pop.clone(),
                bucket,
                rtt_us: rtt_bucket_floor_us(bucket),
                updated_index: index,
            },
        );
        result_ok(index)
    }

    /// The failback damping period (ms) that applies to `pop`: the largest
    /// `failback_after` among the policies of the services it exports
    /// ([`DEFAULT_FAILBACK_AFTER_MS`] for a service without a policy, and
    /// for a POP that exports nothing). The hub proposes
    /// `EndFailbackDamping` once this long has passed since
    /// `healthy_since_ms`.
    pub fn failback_after_ms(&self, pop: &str) -> u64 {
        self.exports
            .iter()
            .filter(|((_, _, p), _)| p == pop)
            .map(|((ns, name, _), _)| {
                self.policies
                    .get(&(ns.clone(), name.clone()))
                    .map_or(DEFAULT_FAILBACK_AFTER_MS, |p| p.failback_after_ms)
            })
            .max()
            .unwrap_or(DEFAULT_FAILBACK_AFTER_MS)
    }
}

/// A fresh status record: liveness unknown, nothing applied.
fn new_status(pop: &str) -> pb::PopStatus {
    pb::PopStatus {
        pop: pop.to_string(),
        ..Default::default()
    }
}

/// Validates one export and puts it in canonical form (ports and endpoints
/// sorted and deduplicated, hub-owned fields cleared), so equal content
/// compares equal whatever order the agent sent it in.
fn canonical_export(e: &pb::ServiceExport) -> Result<pb::ServiceExport, String> {
    let (ns, name) = key_of(e.service.as_ref());
    if !valid_name(&ns) || !valid_name(&name) {
        return Err(format!(
            "service {ns:?}/{name:?}: namespace and name must be DNS labels"
        ));
    }
    if pb::ServiceType::try_from(e.r#type).is_err() {
        return Err(format!("service {ns}/{name}: unknown type {}", e.r#type));
    }
    let mut ports = BTreeMap::new();
    for p in &e.ports {
        if p.port == 0 || p.port > 65535 || pb::Protocol::try_from(p.protocol).is_err() {
            return Err(format!(
                "service {ns}/{name}: bad port {} / protocol {}",
                p.port, p.protocol
            ));
        }
        ports.insert((p.port, p.protocol, p.name.clone()), p.clone());
    }
    let mut endpoints = BTreeMap::new();
    for ep in &e.endpoints {
        if ep.address.is_empty() || ep.port > 65535 {
            return Err(format!(
                "service {ns}/{name}: bad endpoint {:?}:{}",
                ep.address, ep.port
            ));
        }
        endpoints.insert(
            (ep.address.clone(), ep.port, ep.hostname.clone()),
            ep.clone(),
        );
    }
    Ok(pb::ServiceExport {
        service: Some(pb::ServiceKey {
            namespace: ns,
            name,
        }),
        pop: String::new(),
        ports: ports.into_values().collect(),
        r#type: e.r#type,
        endpoints: endpoints.into_values().collect(),
        exported_index: 0,
        updated_index: 0,
    })
}

/// The MCS conflict of export `e` with the winning export, if its ports or
/// type differ.
fn conflict_with(e: &pb::ServiceExport, winner: &pb::ServiceExport) -> Option<pb::ExportConflict> {
    let mut what = Vec::new();
    if e.ports != winner.ports {
        what.push("ports");
    }
    if e.r#type != winner.r#type {
        what.push("type");
    }
    (!what.is_empty()).then(|| pb::ExportConflict {
        pop: e.pop.clone(),
        reason: what.join(","),
    })
}

#[cfg(test)]
mod tests;

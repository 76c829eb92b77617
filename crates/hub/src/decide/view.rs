//! A POP's view as a hub node holds it: each service's part behind an
//! `Arc`, with the inputs it was computed from.
//!
//! One export change moves one service. Holding the others by reference
//! lets the next view of the same POP reuse them (see
//! [`super::Prepared::view_from`]) and lets a session's delta skip them by
//! pointer instead of comparing thousands of targets.

use std::sync::Arc;

use switchyard_proto::{
    pb,
    uplink::{self as wire, ServiceEntry},
};

/// The decision table of one POP (`decide`'s output, shared form).
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// The POP this view is for.
    pub pop: String,
    /// Largest log index among the inputs read (see the module rules of
    /// [`super`]).
    pub epoch: u64,
    /// Visible services in key order, one per key.
    pub services: Vec<Arc<ServicePart>>,
    /// Gateways of the other POPs in any tier, in name order.
    pub peers: Vec<pb::PeerGateway>,
    /// The indexes every service part depends on (policies, removals, this
    /// POP's record, every POP record): parts are reused only while it
    /// stays. 0: no reuse (a view built from the wire form).
    pub(super) stamp: u64,
}

/// One service of a view, its targets shared.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePart {
    /// The service as the agent receives it, without its tiers.
    pub(super) head: pb::ServiceView,
    /// Its tiers, best first. A target (one POP's ready endpoints) is the
    /// same in every POP's view of the service, so views built from one
    /// preparation share them: a thousand views of twenty services with
    /// 64 targets each would otherwise hold 1.3 million copies.
    pub(super) tiers: Vec<Vec<Arc<pb::Target>>>,
    /// Largest index among this service's own inputs (its record, VIP,
    /// exporters' records and liveness, RTTs to them): with the view's
    /// stamp unchanged, an equal value means an equal part.
    pub(super) inputs: u64,
    /// Book ranks of the POPs chosen as targets (for the peer list).
    pub(super) chosen: Vec<u32>,
}

impl ServicePart {
    /// Whether the service's gateway must check importers (see
    /// `pb::ServiceView::import_restricted`).
    pub fn import_restricted(&self) -> bool {
        self.head.import_restricted
    }

    /// Same wire form, comparing shared targets by pointer first.
    fn same(&self, other: &Self) -> bool {
        self.head == other.head
            && self.tiers.len() == other.tiers.len()
            && self.tiers.iter().zip(&other.tiers).all(|(a, b)| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
            })
    }
}

impl wire::ServiceEntry for ServicePart {
    fn key(&self) -> (&str, &str) {
        self.head.key()
    }

    fn to_service_view(&self) -> pb::ServiceView {
        pb::ServiceView {
            tiers: self
                .tiers
                .iter()
                .map(|t| pb::Tier {
                    targets: t.iter().map(|x| (**x).clone()).collect(),
                })
                .collect(),
            ..self.head.clone()
        }
    }
}

impl View {
    /// The wire form: services copied out of their `Arc`s.
    pub fn to_pb(&self) -> pb::PopView {
        pb::PopView {
            pop: self.pop.clone(),
            epoch: self.epoch,
            services: self.services.iter().map(|s| s.to_service_view()).collect(),
            peers: self.peers.clone(),
        }
    }

    /// A view from its wire form (made canonical), never reused by
    /// [`super::Prepared::view_from`].
    pub fn from_pb(view: &pb::PopView) -> Self {
        let view = if wire::is_canonical(view) {
            view.clone()
        } else {
            wire::canonical_view(view)
        };
        Self {
            pop: view.pop,
            epoch: view.epoch,
            services: view
                .services
                .into_iter()
                .map(|mut head| {
                    let tiers = std::mem::take(&mut head.tiers)
                        .into_iter()
                        .map(|t| t.targets.into_iter().map(Arc::new).collect())
                        .collect();
                    Arc::new(ServicePart {
                        head,
                        tiers,
                        inputs: 0,
                        chosen: Vec::new(),
                    })
                })
                .collect(),
            peers: view.peers,
            stamp: 0,
        }
    }

    /// The delta that turns `old` into `self`, equal to
    /// [`wire::diff_views`] of their wire forms; parts shared by both are
    /// skipped without comparing them.
    pub fn delta_from(&self, old: &View) -> pb::ViewDelta {
        let (upserts, removals) =
            wire::diff_sorted_services::<ServicePart, _>(&old.services, &self.services, |a, b| {
                Arc::ptr_eq(a, b) || a.same(b)
            });
        wire::view_delta(
            old.epoch,
            &self.pop,
            self.epoch,
            &self.peers,
            upserts,
            removals,
        )
    }
}

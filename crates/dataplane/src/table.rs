//! The routing table: a compiled, immutable form of one `PopView`, and the
//! choice of attempts for one new connection (pure functions).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use switchyard_proto::pb;

use crate::ServiceKey;

/// One POP's view compiled for the dataplane.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Epoch of the view (0: empty table before any view).
    pub epoch: u64,
    /// Routable services (ClusterSetIP, TCP ports).
    pub services: HashMap<ServiceKey, Route>,
    /// Gateway tunnel address (`host:port`) per peer POP.
    pub peers: BTreeMap<String, String>,
}

/// How to reach one service from this POP.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// This POP's VIP for the service (`None` if the view had none or an
    /// unparsable one: then only [`crate::VipBind::Ephemeral`] binds it).
    pub vip: Option<IpAddr>,
    /// TCP service ports.
    pub ports: Vec<u16>,
    /// Tiers in order; each a list of targets.
    pub tiers: Vec<Vec<TargetRef>>,
    /// This POP's own ready endpoints for the service (empty if it does not
    /// export it): what tunnel streams from peers are served from.
    pub local: Vec<Endpoint>,
    /// Whether the service has a single port: then endpoints are reached on
    /// their own port; with several ports, on the requested service port.
    pub single_port: bool,
    /// POPs allowed to import the service when its policy restricts that
    /// (`export_to`; sorted); `None`: every POP.
    pub importers: Option<Vec<String>>,
}

/// A ready endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Port from the export (0: unset).
    pub port: u16,
}

/// One target of a tier.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetRef {
    /// This POP's endpoints.
    Local {
        /// Relative weight in the tier.
        weight: u32,
    },
    /// A peer POP, reached through its gateway.
    Remote {
        /// Peer POP name.
        pop: String,
        /// Relative weight in the tier.
        weight: u32,
    },
}

impl TargetRef {
    fn weight(&self) -> u32 {
        match self {
            Self::Local { weight } | Self::Remote { weight, .. } => (*weight).max(1),
        }
    }
}

/// One attempt for a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Connect to this local endpoint.
    Local {
        /// Tier index.
        tier: usize,
        /// Endpoint address.
        addr: SocketAddr,
    },
    /// Open a tunnel stream to this peer POP's gateway.
    Remote {
        /// Tier index.
        tier: usize,
        /// Peer POP.
        pop: String,
    },
}

impl Attempt {
    /// Tier index of the attempt.
    pub fn tier(&self) -> usize {
        match self {
            Self::Local { tier, .. } | Self::Remote { tier, .. } => *tier,
        }
    }
}

impl Route {
    /// The address of a local endpoint for service port `port`.
    pub fn endpoint_addr(&self, ep: &Endpoint, port: u16) -> SocketAddr {
        let p = if self.single_port && ep.port != 0 {
            ep.port
        } else {
            port
        };
        SocketAddr::new(ep.ip, p)
    }

    /// Whether this POP serves `caller`'s tunnel streams for the service:
    /// it exports it (has ready local endpoints) and, if the policy
    /// restricts importers, `caller` is one of them.
    pub fn serves(&self, caller: &str) -> bool {
        !self.local.is_empty()
            && self
                .importers
                .as_ref()
                .is_none_or(|i| i.binary_search_by(|p| p.as_str().cmp(caller)).is_ok())
    }

    /// Local endpoint addresses for `port`, rotated by `seed` (spreads
    /// load; the caller passes a counter).
    pub fn local_addrs(&self, port: u16, seed: usize) -> Vec<SocketAddr> {
        let n = self.local.len();
        (0..n)
            .map(|i| self.endpoint_addr(&self.local[(seed + i) % n], port))
            .collect()
    }
}

/// Compiles a view of POP `pop`. Services that are headless, have no TCP
/// port, or name a VIP that does not parse are kept out (the latter with
/// `vip: None`, see [`Route::vip`]).
pub fn compile(view: &pb::PopView, pop: &str) -> Table {
    let mut services = HashMap::new();
    for s in &view.services {
        let Some(key) = s.service.as_ref() else {
            continue;
        };
        if s.r#type() != pb::ServiceType::ClusterSetIp {
            continue;
        }
        let ports: Vec<u16> = if s.service_ports.is_empty() {
            s.ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .filter(|p| *p != 0)
                .collect()
        } else {
            s.service_ports
                .iter()
                .filter(|p| p.protocol() == pb::Protocol::Tcp)
                .filter_map(|p| u16::try_from(p.port).ok())
                .filter(|p| *p != 0)
                .collect()
        };
        if ports.is_empty() {
            continue;
        }
        let mut local = Vec::new();
        let mut tiers = Vec::new();
        for tier in &s.tiers {
            let mut targets = Vec::new();
            for t in &tier.targets {
                let eps: Vec<Endpoint> = t
                    .endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .filter_map(|e| {
                        Some(Endpoint {
                            ip: e.address.parse().ok()?,
                            port: u16::try_from(e.port).ok()?,
                        })
                    })
                    .collect();
                if t.pop == pop {
                    if eps.is_empty() {
                        continue;
                    }
                    if local.is_empty() {
                        local = eps;
                    }
                    targets.push(TargetRef::Local { weight: t.weight });
                } else {
                    targets.push(TargetRef::Remote {
                        pop: t.pop.clone(),
                        weight: t.weight,
                    });
                }
            }
            if !targets.is_empty() {
                tiers.push(targets);
            }
        }
        services.insert(
            ServiceKey::from(key),
            Route {
                importers: s.import_restricted.then(|| {
                    let mut i = s.importers.clone();
                    i.sort();
                    i
                }),
                vip: s.vip.parse().ok(),
                single_port: ports.len() == 1,
                ports,
                tiers,
                local,
            },
        );
    }
    let peers = view
        .peers
        .iter()
        .filter(|p| !p.gateway_addr.is_empty() && p.pop != pop)
        .map(|p| (p.pop.clone(), p.gateway_addr.clone()))
        .collect();
    Table {
        epoch: view.epoch,
        services,
        peers,
    }
}

/// The attempts for one new connection to `port` of `route`, at most
/// `max`: tiers in order, skipping remote targets for which `usable` says
/// no (down, or no tunnel); within a tier a weighted start chosen by
/// `seed`, then the others in order. Local targets contribute their
/// endpoints (rotated by `seed`).
pub fn plan(
    route: &Route,
    port: u16,
    seed: usize,
    max: usize,
    usable: impl Fn(&str) -> bool,
) -> Vec<Attempt> {
    let mut out = Vec::new();
    for (ti, tier) in route.tiers.iter().enumerate() {
        let live: Vec<&TargetRef> = tier
            .iter()
            .filter(|t| match t {
                TargetRef::Local { .. } => !route.local.is_empty(),
                TargetRef::Remote { pop, .. } => usable(pop),
            })
            .collect();
        if live.is_empty() {
            continue;
        }
        let total: u64 = live.iter().map(|t| u64::from(t.weight())).sum();
        let mut pick = (seed as u64) % total.max(1);
        let mut start = 0;
        for (i, t) in live.iter().enumerate() {
            let w = u64::from(t.weight());
            if pick < w {
                start = i;
                break;
            }
            pick -= w;
        }
        for i in 0..live.len() {
            match live[(start + i) % live.len()] {
                TargetRef::Local { .. } => {
                    for addr in route.local_addrs(port, seed) {
                        out.push(Attempt::Local { tier: ti, addr });
                    }
                }
                TargetRef::Remote { pop, .. } => out.push(Attempt::Remote {
                    tier: ti,
                    pop: pop.clone(),
                }),
            }
        }
    }
    out.truncate(max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(a: &str, port: u32, ready: bool) -> pb::Endpoint {
        pb::Endpoint {
            address: a.into(),
            port,
            ready,
            hostname: String::new(),
        }
    }

    fn target(pop: &str, eps: Vec<pb::Endpoint>) -> pb::Target {
        pb::Target {
            pop: pop.into(),
            weight: eps.len() as u32,
            endpoints: eps,
        }
    }

    fn view() -> pb::PopView {
        pb::PopView {
            pop: "a".into(),
            epoch: 7,
            services: vec![pb::ServiceView {
                service: Some(pb::ServiceKey {
                    namespace: "ns".into(),
                    name: "web".into(),
                }),
                vip: "127.77.0.5".into(),
                ports: vec![80],
                tiers: vec![
                    pb::Tier {
                        targets: vec![target("a", vec![ep("10.0.0.1", 8080, true)])],
                    },
                    pb::Tier {
                        targets: vec![
                            target("b", vec![ep("10.1.0.1", 80, true)]),
                            target("c", vec![ep("10.2.0.1", 80, true)]),
                        ],
                    },
                ],
                ..Default::default()
            }],
            peers: vec![
                pb::PeerGateway {
                    pop: "b".into(),
                    gateway_addr: "127.0.0.1:4000".into(),
                },
                pb::PeerGateway {
                    pop: "c".into(),
                    gateway_addr: String::new(),
                },
            ],
        }
    }

    #[test]
    fn compiles_local_and_remote_targets() {
        let t = compile(&view(), "a");
        assert_eq!(t.epoch, 7);
        let r = &t.services[&ServiceKey::new("ns", "web")];
        assert_eq!(r.vip, Some("127.77.0.5".parse().unwrap()));
        assert_eq!(r.ports, vec![80]);
        assert_eq!(r.local_addrs(80, 0), vec!["10.0.0.1:8080".parse().unwrap()]);
        assert_eq!(r.tiers.len(), 2);
        assert_eq!(t.peers.len(), 1, "peers without an address are left out");
    }

    #[test]
    fn plan_goes_in_tier_order_and_skips_unusable_peers() {
        let t = compile(&view(), "a");
        let r = &t.services[&ServiceKey::new("ns", "web")];
        let p = plan(r, 80, 0, 10, |_| true);
        assert_eq!(
            p[0],
            Attempt::Local {
                tier: 0,
                addr: "10.0.0.1:8080".parse().unwrap()
            }
        );
        assert_eq!(p.len(), 3);
        assert!(p[1..].iter().all(|a| a.tier() == 1));
        let p = plan(r, 80, 0, 10, |pop| pop != "b");
        assert_eq!(
            p[1],
            Attempt::Remote {
                tier: 1,
                pop: "c".into()
            }
        );
        assert_eq!(p.len(), 2);
        assert_eq!(plan(r, 80, 0, 1, |_| true).len(), 1, "bounded");
    }

    #[test]
    fn weights_spread_the_first_pick() {
        let mut v = view();
        v.services[0].tiers.remove(0);
        let t = compile(&v, "a");
        let r = &t.services[&ServiceKey::new("ns", "web")];
        let firsts: Vec<_> = (0..4).map(|s| plan(r, 80, s, 1, |_| true)).collect();
        assert!(firsts
            .iter()
            .any(|p| matches!(&p[0], Attempt::Remote { pop, .. } if pop == "b")));
        assert!(firsts
            .iter()
            .any(|p| matches!(&p[0], Attempt::Remote { pop, .. } if pop == "c")));
    }

    #[test]
    fn restricted_importers_are_honoured() {
        let mut v = view();
        let t = compile(&v, "a");
        let r = &t.services[&ServiceKey::new("ns", "web")];
        assert!(r.serves("anyone"), "unrestricted");
        v.services[0].import_restricted = true;
        v.services[0].importers = vec!["z".into(), "b".into()];
        let t = compile(&v, "a");
        let r = &t.services[&ServiceKey::new("ns", "web")];
        assert!(r.serves("b") && r.serves("z"));
        assert!(!r.serves("c"));
        v.services[0].importers.clear();
        assert!(!compile(&v, "a").services[&ServiceKey::new("ns", "web")].serves("b"));
        // Not exporting: nobody is served.
        v.services[0].import_restricted = false;
        v.services[0].tiers.remove(0);
        assert!(!compile(&v, "a").services[&ServiceKey::new("ns", "web")].serves("b"));
    }

    #[test]
    fn headless_and_not_ready_are_left_out() {
        let mut v = view();
        v.services[0].tiers[0].targets[0].endpoints[0].ready = false;
        let t = compile(&v, "a");
        let r = &t.services[&ServiceKey::new("ns", "web")];
        assert!(r.local.is_empty());
        assert_eq!(r.tiers.len(), 1);
        v.services[0].r#type = pb::ServiceType::Headless as i32;
        assert!(compile(&v, "a").services.is_empty());
    }
}

//! From the POP's local services and their probe health to the export set
//! sent to the hub (pure).
//!
//! Every configured endpoint is exported; its `ready` flag is its probe
//! health: only [`Health::Healthy`] is ready, so an endpoint not probed yet
//! ([`Health::Unknown`]) or missing from the readiness map is not ready.

use switchyard_proto::pb;

use crate::probe::{EndpointKey, Health, Readiness};
use crate::source::{LocalServices, Protocol, ServiceType};

/// The export set for `services` given the probes' `readiness`, in the
/// source's order (sorted by namespace and name).
pub fn to_exports(services: &LocalServices, readiness: &Readiness) -> Vec<pb::ServiceExport> {
    services
        .services
        .iter()
        .map(|s| pb::ServiceExport {
            service: Some(pb::ServiceKey {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            }),
            pop: String::new(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: u32::from(p.port),
                    protocol: match p.protocol {
                        Protocol::Tcp => pb::Protocol::Tcp,
                        Protocol::Udp => pb::Protocol::Udp,
                    } as i32,
                })
                .collect(),
            r#type: match s.service_type {
                ServiceType::ClusterSetIP => pb::ServiceType::ClusterSetIp,
                ServiceType::Headless => pb::ServiceType::Headless,
            } as i32,
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    let key = EndpointKey {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        address: e.address,
                        port: e.port,
                    };
                    pb::Endpoint {
                        address: e.address.to_string(),
                        port: u32::from(e.port),
                        ready: readiness.get(&key).copied().is_some_and(Health::is_ready),
                        hostname: e.hostname.clone().unwrap_or_default(),
                    }
                })
                .collect(),
            exported_index: 0,
            updated_index: 0,
        })
        .collect()
}

/// Whether every endpoint of `services` has a probe result (none is
/// [`Health::Unknown`] or missing). The shell waits for this, within a
/// grace period, before the first export after a start, so a restarting
/// agent does not briefly report its endpoints as not ready.
pub fn all_probed(services: &LocalServices, readiness: &Readiness) -> bool {
    services.services.iter().all(|s| {
        s.endpoints.iter().all(|e| {
            let key = EndpointKey {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                address: e.address,
                port: e.port,
            };
            !matches!(readiness.get(&key), None | Some(Health::Unknown))
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::parse_services;

    const FILE: &str = r#"
[[services]]
namespace = "shop"
name = "cart"
ports = [
  { name = "http", port = 80 },
  { name = "dns", port = 53, protocol = "UDP" },
]
endpoints = [
  { address = "10.0.0.5", port = 8080, hostname = "cart-0" },
  { address = "10.0.0.6", port = 8080 },
  { address = "fd00::7", port = 8080 },
]

[[services]]
namespace = "shop"
name = "db"
type = "Headless"
ports = [{ port = 5432 }]
"#;

    fn key(name: &str, addr: &str, port: u16) -> EndpointKey {
        EndpointKey {
            namespace: "shop".into(),
            name: name.into(),
            address: addr.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn maps_services_ports_types_and_health() {
        let services = parse_services(Path::new("t.toml"), FILE).unwrap();
        let mut readiness = Readiness::new();
        readiness.insert(key("cart", "10.0.0.5", 8080), Health::Healthy);
        readiness.insert(key("cart", "10.0.0.6", 8080), Health::Unhealthy);
        readiness.insert(key("cart", "fd00::7", 8080), Health::Unknown);
        let out = to_exports(&services, &readiness);
        assert_eq!(out.len(), 2);

        let cart = &out[0];
        assert_eq!(
            cart.service,
            Some(pb::ServiceKey {
                namespace: "shop".into(),
                name: "cart".into()
            })
        );
        assert!(cart.pop.is_empty());
        assert_eq!(cart.r#type, pb::ServiceType::ClusterSetIp as i32);
        assert_eq!(
            cart.ports,
            vec![
                pb::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: pb::Protocol::Tcp as i32
                },
                pb::ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: pb::Protocol::Udp as i32
                },
            ]
        );
        let eps: Vec<_> = cart
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.port, e.ready, e.hostname.as_str()))
            .collect();
        assert_eq!(
            eps,
            vec![
                ("10.0.0.5", 8080, true, "cart-0"),
                ("10.0.0.6", 8080, false, ""),
                ("fd00::7", 8080, false, ""),
            ]
        );

        let db = &out[1];
        assert_eq!(db.r#type, pb::ServiceType::Headless as i32);
        assert_eq!(db.ports[0].name, "");
        assert!(db.endpoints.is_empty());
        // Every mapped export passes the wire checks the session applies.
        for e in &out {
            switchyard_proto::uplink::check_export(e).unwrap();
        }
    }

    #[test]
    fn endpoint_missing_from_readiness_is_not_ready() {
        let services = parse_services(Path::new("t.toml"), FILE).unwrap();
        let out = to_exports(&services, &Readiness::new());
        assert!(out[0].endpoints.iter().all(|e| !e.ready));
    }

    #[test]
    fn all_probed_waits_for_every_endpoint() {
        let services = parse_services(Path::new("t.toml"), FILE).unwrap();
        let mut readiness = Readiness::new();
        assert!(!all_probed(&services, &readiness));
        readiness.insert(key("cart", "10.0.0.5", 8080), Health::Healthy);
        readiness.insert(key("cart", "10.0.0.6", 8080), Health::Unhealthy);
        readiness.insert(key("cart", "fd00::7", 8080), Health::Unknown);
        assert!(!all_probed(&services, &readiness));
        readiness.insert(key("cart", "fd00::7", 8080), Health::Healthy);
        assert!(all_probed(&services, &readiness));
        assert!(all_probed(&LocalServices::default(), &Readiness::new()));
    }

    #[test]
    fn empty_services_export_nothing() {
        assert!(to_exports(&LocalServices::default(), &Readiness::new()).is_empty());
    }
}

//! Export records of simulated POPs.

use switchyard_proto::pb;

/// A `ClusterSetIP` export of `ns/name` on TCP 8080 with one ready
/// endpoint, 127.0.0.1:8080: what every simulated POP exports.
pub fn sim_export(ns: &str, name: &str) -> pb::ServiceExport {
    pb::ServiceExport {
        service: Some(pb::ServiceKey {
            namespace: ns.into(),
            name: name.into(),
        }),
        ports: vec![pb::ServicePort {
            name: "http".into(),
            port: 8080,
            protocol: pb::Protocol::Tcp as i32,
        }],
        r#type: pb::ServiceType::ClusterSetIp as i32,
        endpoints: vec![pb::Endpoint {
            address: "127.0.0.1".into(),
            port: 8080,
            ready: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

//! Where a POP's local services come from.
//!
//! A [`ServiceSource`] yields the desired [`LocalServices`] of this POP (what
//! to export: services, their ports and endpoints, and how the agent probes
//! each endpoint) and notifies on every change. The file source
//! ([`FileSource`], TOML, reloaded on change) exists now; a Kubernetes source
//! comes later behind the same trait. [`StaticSource`] is a source set from
//! code (tests, embedding).
//!
//! The file schema is documented in `docs/services-file.md`.

mod config;
mod file;

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::watch;

pub use config::{parse_services, Problem, SourceError, MAX_FILE_LEN};
pub use file::{FileSource, DEFAULT_POLL_INTERVAL, FULL_CHECK_EVERY};

/// Default probe interval (1 s).
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(1000);
/// Default probe timeout (500 ms; never more than the interval).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default number of consecutive successes that make an unhealthy endpoint
/// healthy.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Default number of consecutive failures that make a healthy endpoint
/// unhealthy.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// Default expected HTTP status of an HTTP probe.
pub const DEFAULT_EXPECTED_STATUS: u16 = 200;

/// A source of the POP's desired local services.
///
/// Implementations keep the last good set: an invalid update (a broken file,
/// a rejected API object) never replaces it.
pub trait ServiceSource: Send + Sync {
    /// The current set of local services.
    fn snapshot(&self) -> LocalServices;
    /// A receiver that sees every change (await `changed()`); its current
    /// value is the snapshot.
    fn subscribe(&self) -> watch::Receiver<LocalServices>;
}

/// The desired local services of a POP, sorted by `(namespace, name)`, each
/// `(namespace, name)` at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalServices {
    /// The services, sorted by `(namespace, name)`.
    pub services: Vec<LocalService>,
}

impl LocalServices {
    /// The service `namespace/name`, if present.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&LocalService> {
        self.services
            .binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .and_then(|i| self.services.get(i))
    }
}

/// One service exported by this POP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    /// Namespace (DNS label, RFC 1123, at most 63 characters).
    pub namespace: String,
    /// Service name (DNS label, RFC 1123, at most 63 characters).
    pub name: String,
    /// `ClusterSetIP` (one VIP per POP) or `Headless` (endpoint addresses).
    pub service_type: ServiceType,
    /// Service ports; at least one for `ClusterSetIP`. Named when more than
    /// one; names and `(port, protocol)` unique.
    pub ports: Vec<Port>,
    /// Local backends, unique by `(address, port)`. May be empty.
    pub endpoints: Vec<EndpointSpec>,
    /// How the agent probes each endpoint.
    pub probe: ProbeSpec,
}

/// The type of a multi-cluster service (MCS API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceType {
    /// Reached through a virtual IP per POP.
    ClusterSetIP,
    /// DNS answers with the endpoint addresses; no VIP.
    Headless,
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Port name (DNS label); required when the service has several ports.
    pub name: Option<String>,
    /// Port number, 1..=65535.
    pub port: u16,
    /// Protocol (`TCP` by default).
    pub protocol: Protocol,
}

/// One local backend of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// IPv4 or IPv6 address.
    pub address: IpAddr,
    /// Port the backend listens on, 1..=65535.
    pub port: u16,
    /// Optional host name (DNS label) for headless per-endpoint names.
    pub hostname: Option<String>,
}

/// How the agent probes every endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What one probe does.
    pub check: ProbeCheck,
    /// Time between the starts of two probes of one endpoint.
    pub interval: Duration,
    /// Limit on one probe (connect, request and response); at most
    /// `interval`.
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy endpoint healthy (>= 1).
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy (>= 1).
    pub unhealthy_threshold: u32,
}

impl Default for ProbeSpec {
    /// A TCP connect probe with the default interval, timeout and thresholds.
    fn default() -> Self {
        Self {
            check: ProbeCheck::Tcp { port: None },
            interval: DEFAULT_PROBE_INTERVAL,
            timeout: DEFAULT_PROBE_TIMEOUT,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
        }
    }
}

/// The check one probe runs against an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    /// Success when a TCP connection is established.
    Tcp {
        /// Port to connect to instead of the endpoint's port.
        port: Option<u16>,
    },
    /// Success when `GET path` over HTTP/1.1 answers with `expected_status`.
    Http {
        /// Request path, starting with `/` (visible ASCII, no spaces).
        path: String,
        /// Expected status code, 100..=599.
        expected_status: u16,
        /// Port to connect to instead of the endpoint's port.
        port: Option<u16>,
        /// `Host` header; default `address:port` of the endpoint.
        host: Option<String>,
    },
}

/// A source whose services are set from code.
#[derive(Debug)]
pub struct StaticSource {
    tx: watch::Sender<LocalServices>,
}

impl StaticSource {
    /// A source starting with `services`.
    pub fn new(services: LocalServices) -> Self {
        Self {
            tx: watch::Sender::new(services),
        }
    }

    /// Replaces the services; subscribers are notified if they changed.
    pub fn set(&self, services: LocalServices) {
        self.tx.send_if_modified(|cur| {
            if *cur == services {
                false
            } else {
                *cur = services;
                true
            }
        });
    }
}

impl ServiceSource for StaticSource {
    fn snapshot(&self) -> LocalServices {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<LocalServices> {
        self.tx.subscribe()
    }
}

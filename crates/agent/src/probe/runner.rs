//! The async shell: one task per endpoint runs its probe on a
//! `tokio::time::interval` and feeds a [`ProbeState`]; transitions are
//! published on a `watch` of [`Readiness`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::check::probe_once;
use super::state::{Health, ProbeState};
use crate::source::{LocalServices, ProbeSpec};

/// Identifies one probed endpoint of one local service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Endpoint address.
    pub address: IpAddr,
    /// Endpoint port.
    pub port: u16,
}

/// Health of every endpoint of every local service. An endpoint appears as
/// soon as it is configured (as [`Health::Unknown`] until its first probe)
/// and disappears when it is removed from the source.
pub type Readiness = BTreeMap<EndpointKey, Health>;

struct Running {
    spec: ProbeSpec,
    task: JoinHandle<()>,
    /// Set (before the abort) when the probe is stopped; the task checks it
    /// under the readiness lock, so a probe finishing just as it is stopped
    /// cannot overwrite the entry of its replacement.
    stopped: Arc<AtomicBool>,
}

/// Runs the probes of the current set of local services.
///
/// Dropping it stops every probe task.
pub struct ProbeRunner {
    tx: watch::Sender<Readiness>,
    probes: HashMap<EndpointKey, Running>,
}

impl std::fmt::Debug for ProbeRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeRunner")
            .field("probes", &self.probes.len())
            .finish()
    }
}

impl Default for ProbeRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl ProbeRunner {
    /// A runner with no probes.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(Readiness::new()),
            probes: HashMap::new(),
        }
    }

    /// A receiver of the readiness map; it changes only on transitions and
    /// on endpoints added or removed.
    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.tx.subscribe()
    }

    /// The current readiness map.
    pub fn readiness(&self) -> Readiness {
        self.tx.borrow().clone()
    }

    /// Reconciles the probes with `services`: starts probes for new
    /// endpoints (first probe at once), stops those of removed endpoints,
    /// and restarts those whose probe spec changed (keeping their current
    /// health as the starting point). Must be called within a tokio runtime.
    pub fn apply(&mut self, services: &LocalServices) {
        let mut desired: HashMap<EndpointKey, ProbeSpec> = HashMap::new();
        for s in &services.services {
            for e in &s.endpoints {
                desired.insert(
                    EndpointKey {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        address: e.address,
                        port: e.port,
                    },
                    s.probe.clone(),
                );
            }
        }
        let mut removed = Vec::new();
        self.probes.retain(|key, running| {
            let keep = desired.get(key) == Some(&running.spec);
            if !keep {
                running.stopped.store(true, Ordering::SeqCst);
                running.task.abort();
                removed.push(key.clone());
            }
            keep
        });
        let probes = &mut self.probes;
        let tx = &self.tx;
        tx.send_if_modified(|map| {
            let mut changed = false;
            for key in &removed {
                if !desired.contains_key(key) {
                    changed |= map.remove(key).is_some();
                }
            }
            for (key, spec) in desired {
                if probes.contains_key(&key) {
                    continue;
                }
                // Under the lock: a restarted probe starts from the health
                // its endpoint has now.
                let health = *map.entry(key.clone()).or_insert_with(|| {
                    changed = true;
                    Health::Unknown
                });
                let state = ProbeState::starting_at(
                    health,
                    spec.healthy_threshold,
                    spec.unhealthy_threshold,
                );
                let stopped = Arc::new(AtomicBool::new(false));
                let task = tokio::spawn(run_probe(
                    key.clone(),
                    spec.clone(),
                    state,
                    tx.clone(),
                    stopped.clone(),
                ));
                probes.insert(
                    key,
                    Running {
                        spec,
                        task,
                        stopped,
                    },
                );
            }
            changed
        });
    }
}

impl Drop for ProbeRunner {
    fn drop(&mut self) {
        for r in self.probes.values() {
            r.stopped.store(true, Ordering::SeqCst);
            r.task.abort();
        }
    }
}

/// Runs a [`ProbeRunner`] that follows `source`: it applies the current
/// services at once and every change after. Returns the readiness receiver
/// and the task; aborting the task stops every probe. If `source` closes,
/// the last services keep being probed until the task is aborted.
pub fn follow(
    mut source: watch::Receiver<LocalServices>,
) -> (watch::Receiver<Readiness>, JoinHandle<()>) {
    let mut runner = ProbeRunner::new();
    let rx = runner.subscribe();
    let task = tokio::spawn(async move {
        let services = source.borrow_and_update().clone();
        runner.apply(&services);
        while source.changed().await.is_ok() {
            let services = source.borrow_and_update().clone();
            runner.apply(&services);
        }
        std::future::pending::<()>().await;
        drop(runner);
    });
    (rx, task)
}

async fn run_probe(
    key: EndpointKey,
    spec: ProbeSpec,
    mut state: ProbeState,
    tx: watch::Sender<Readiness>,
    stopped: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe_once(key.address, key.port, &spec.check, spec.timeout).await;
        let Some(health) = state.record(result.is_ok()) else {
            continue;
        };
        match &result {
            Ok(()) => tracing::info!(
                service = %format_args!("{}/{}", key.namespace, key.name),
                endpoint = %std::net::SocketAddr::new(key.address, key.port),
                ?health,
                "endpoint health changed"
            ),
            Err(e) => tracing::warn!(
                service = %format_args!("{}/{}", key.namespace, key.name),
                endpoint = %std::net::SocketAddr::new(key.address, key.port),
                ?health,
                error = %e,
                "endpoint health changed"
            ),
        }
        tx.send_if_modified(|map| match map.get_mut(&key) {
            Some(h) if *h != health && !stopped.load(Ordering::SeqCst) => {
                *h = health;
                true
            }
            _ => false,
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::source::ServiceSource;
    use crate::source::{EndpointSpec, LocalService, ProbeCheck, ServiceType, StaticSource};
    use std::sync::atomic::AtomicU16;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn spec(check: ProbeCheck) -> ProbeSpec {
        ProbeSpec {
            check,
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(5),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }

    fn services(name: &str, ports: &[u16], probe: ProbeSpec) -> LocalServices {
        LocalServices {
            services: vec![LocalService {
                namespace: "ns".into(),
                name: name.into(),
                service_type: ServiceType::Headless,
                ports: vec![],
                endpoints: ports
                    .iter()
                    .map(|&port| EndpointSpec {
                        address: LOCAL,
                        port,
                        hostname: None,
                    })
                    .collect(),
                probe,
            }],
        }
    }

    fn key(name: &str, port: u16) -> EndpointKey {
        EndpointKey {
            namespace: "ns".into(),
            name: name.into(),
            address: LOCAL,
            port,
        }
    }

    async fn wait_health(
        rx: &mut watch::Receiver<Readiness>,
        k: &EndpointKey,
        want: Option<Health>,
    ) {
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|m| m.get(k).copied() == want),
        )
        .await
        .unwrap_or_else(|_| panic!("{k:?} never became {want:?}"))
        .unwrap();
    }

    /// An HTTP server answering with the status in `status`.
    async fn http_server(status: Arc<AtomicU16>) -> u16 {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let status = status.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn tcp_probe_follows_listener() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let up = l.local_addr().unwrap().port();
        // A port with nothing listening.
        let down = {
            let tmp = TcpListener::bind((LOCAL, 0)).await.unwrap();
            tmp.local_addr().unwrap().port()
        };
        let mut runner = ProbeRunner::new();
        let mut rx = runner.subscribe();
        runner.apply(&services(
            "web",
            &[up, down],
            spec(ProbeCheck::Tcp { port: None }),
        ));
        let r = runner.readiness();
        assert_eq!(r.len(), 2);
        wait_health(&mut rx, &key("web", up), Some(Health::Healthy)).await;
        wait_health(&mut rx, &key("web", down), Some(Health::Unhealthy)).await;
        drop(l);
        wait_health(&mut rx, &key("web", up), Some(Health::Unhealthy)).await;

        // Removing an endpoint removes it from the map.
        runner.apply(&services(
            "web",
            &[down],
            spec(ProbeCheck::Tcp { port: None }),
        ));
        assert_eq!(runner.readiness().get(&key("web", up)), None);
        runner.apply(&LocalServices::default());
        assert!(runner.readiness().is_empty());
    }

    #[tokio::test]
    async fn http_probe_rises_and_falls() {
        let status = Arc::new(AtomicU16::new(200));
        let port = http_server(status.clone()).await;
        let check = ProbeCheck::Http {
            path: "/healthz".into(),
            expected_status: 200,
            port: None,
            host: None,
        };
        let mut runner = ProbeRunner::new();
        let mut rx = runner.subscribe();
        runner.apply(&services("api", &[port], spec(check.clone())));
        let k = key("api", port);
        wait_health(&mut rx, &k, Some(Health::Healthy)).await;
        status.store(500, Ordering::SeqCst);
        wait_health(&mut rx, &k, Some(Health::Unhealthy)).await;
        status.store(200, Ordering::SeqCst);
        wait_health(&mut rx, &k, Some(Health::Healthy)).await;

        // A changed spec restarts the probe from the current health.
        let mut changed = spec(check);
        changed.healthy_threshold = 5;
        runner.apply(&services("api", &[port], changed));
        assert_eq!(runner.readiness().get(&k), Some(&Health::Healthy));
    }

    #[tokio::test]
    async fn follow_tracks_the_source() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let source = StaticSource::new(LocalServices::default());
        let (mut rx, task) = follow(source.subscribe());
        source.set(services("a", &[port], spec(ProbeCheck::Tcp { port: None })));
        wait_health(&mut rx, &key("a", port), Some(Health::Healthy)).await;
        source.set(services("b", &[port], spec(ProbeCheck::Tcp { port: None })));
        wait_health(&mut rx, &key("a", port), None).await;
        wait_health(&mut rx, &key("b", port), Some(Health::Healthy)).await;
        task.abort();
        let _ = task.await;
        // The runner is dropped with the task: the channel closes.
        assert!(rx.changed().await.is_err());
    }
}

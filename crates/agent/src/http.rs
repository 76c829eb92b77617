//! The agent's HTTP listener: `/healthz`, `/readyz`, `/metrics`,
//! `/debug/view`, and the [`Status`] the rest of the agent updates for it.
//!
//! Metrics are plain atomics rendered in the Prometheus text format by
//! hand: the agent may share a process with a hub (`switchyard dev`), which
//! owns the process-global `metrics` recorder.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use switchyard_proto::pb;
use tokio::sync::watch;

/// Where the view being served came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewSource {
    /// Pushed by a hub node in this run of the agent.
    Hub,
    /// Loaded from the last-known-good file at start.
    Lkg,
}

impl ViewSource {
    /// `"hub"` or `"lkg"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ViewSource::Hub => "hub",
            ViewSource::Lkg => "lkg",
        }
    }
}

/// The view the agent serves, with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldView {
    /// The decision table.
    pub view: pb::PopView,
    /// Where it came from.
    pub source: ViewSource,
}

/// Counters and gauges of the agent (see [`Status::render_metrics`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Views accepted from hubs.
    pub views_applied: AtomicU64,
    /// Views refused (fencing, base mismatch, wrong POP).
    pub views_refused: AtomicU64,
    /// Highest export seq acknowledged by the hub.
    pub exports_acked_seq: AtomicU64,
    /// Export deltas sent (resends included).
    pub export_deltas_sent: AtomicU64,
    /// Export sets the hub refused as invalid.
    pub exports_refused: AtomicU64,
    /// Heartbeat datagrams sent.
    pub heartbeats_sent: AtomicU64,
    /// Connection attempts after the first (failed or lost connections).
    pub reconnects: AtomicU64,
    /// Sessions that reached Welcome.
    pub sessions_established: AtomicU64,
    /// Views that could not be written as last-known-good.
    pub lkg_write_failures: AtomicU64,
    /// Certificates renewed over the uplink.
    pub cert_renewals: AtomicU64,
    /// Renewals refused by the hub.
    pub cert_renewals_refused: AtomicU64,
    /// Expiry of the certificate in use (seconds since the Unix epoch).
    pub cert_not_after_s: AtomicU64,
    /// UDP payload bytes sent on uplink connections (quinn's statistics).
    pub uplink_udp_tx_bytes: AtomicU64,
    /// UDP payload bytes received on uplink connections.
    pub uplink_udp_rx_bytes: AtomicU64,
    /// Gateway certificates issued by the hub through this agent.
    pub gateway_certs_issued: AtomicU64,
    /// Gateway identity requests that got no certificate (hub refused or
    /// unreachable, and nothing valid stored).
    pub gateway_certs_failed: AtomicU64,
    /// RTT sample batches from gateways passed to the uplink.
    pub gateway_rtt_reports: AtomicU64,
}

/// What the agent knows about itself, shared with the HTTP handlers.
#[derive(Debug)]
pub struct Status {
    /// This POP's name.
    pub pop: String,
    /// Trust domain.
    pub domain: String,
    view: watch::Sender<Option<HeldView>>,
    connected: AtomicBool,
    hub_node: Mutex<String>,
    dns: std::sync::OnceLock<Arc<switchyard_dns::server::DnsStats>>,
    /// Counters for `/metrics`.
    pub counters: Counters,
}

impl Status {
    /// A status for `pop` in `domain` with no view.
    pub fn new(pop: String, domain: String) -> Self {
        Self {
            pop,
            domain,
            view: watch::Sender::new(None),
            connected: AtomicBool::new(false),
            hub_node: Mutex::new(String::new()),
            dns: std::sync::OnceLock::new(),
            counters: Counters::default(),
        }
    }

    /// Serves `view` from now on. Views only move forward: one with a lower
    /// epoch than the one held is ignored (the session fences already; this
    /// keeps the published view monotone whatever the caller).
    pub fn publish(&self, view: pb::PopView, source: ViewSource) {
        self.view.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.view.epoch > view.epoch) {
                return false;
            }
            *cur = Some(HeldView { view, source });
            true
        });
    }

    /// The view served, if any.
    pub fn view(&self) -> Option<HeldView> {
        self.view.borrow().clone()
    }

    /// A receiver of the served view (for embedded consumers: DNS, gateway).
    pub fn subscribe_view(&self) -> watch::Receiver<Option<HeldView>> {
        self.view.subscribe()
    }

    /// Records whether a session is established, and with which hub node.
    pub fn set_connected(&self, hub_node: Option<&str>) {
        self.connected.store(hub_node.is_some(), Ordering::Relaxed);
        if let Ok(mut h) = self.hub_node.lock() {
            *h = hub_node.unwrap_or_default().to_string();
        }
    }

    /// Whether a session is established.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The hub node of the established session ("" when none).
    pub fn hub_node(&self) -> String {
        self.hub_node.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The Prometheus text exposition of the agent's metrics.
    pub fn render_metrics(&self) -> String {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let view = self.view();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "switchyard_agent_connected",
            "gauge",
            "1 while a session with a hub node is established.",
            u64::from(self.is_connected()),
        );
        metric(
            "switchyard_agent_view_epoch",
            "gauge",
            "Epoch of the view served (0: none).",
            view.as_ref().map_or(0, |v| v.view.epoch),
        );
        metric(
            "switchyard_agent_view_from_lkg",
            "gauge",
            "1 while the view served is the last-known-good loaded at start.",
            u64::from(view.as_ref().is_some_and(|v| v.source == ViewSource::Lkg)),
        );
        metric(
            "switchyard_agent_views_applied_total",
            "counter",
            "Views accepted from hub nodes.",
            get(&c.views_applied),
        );
        metric(
            "switchyard_agent_views_refused_total",
            "counter",
            "Views refused (stale epoch, base mismatch, wrong POP).",
            get(&c.views_refused),
        );
        metric(
            "switchyard_agent_exports_acked_seq",
            "gauge",
            "Highest export sequence number acknowledged by the hub.",
            get(&c.exports_acked_seq),
        );
        metric(
            "switchyard_agent_export_deltas_sent_total",
            "counter",
            "Export deltas sent, resends included.",
            get(&c.export_deltas_sent),
        );
        metric(
            "switchyard_agent_exports_refused_total",
            "counter",
            "Export sets the hub refused as invalid.",
            get(&c.exports_refused),
        );
        metric(
            "switchyard_agent_heartbeats_sent_total",
            "counter",
            "Heartbeat datagrams sent.",
            get(&c.heartbeats_sent),
        );
        metric(
            "switchyard_agent_reconnects_total",
            "counter",
            "Connection attempts after a failed or lost connection.",
            get(&c.reconnects),
        );
        metric(
            "switchyard_agent_sessions_established_total",
            "counter",
            "Sessions that reached Welcome.",
            get(&c.sessions_established),
        );
        metric(
            "switchyard_agent_lkg_write_failures_total",
            "counter",
            "Views that could not be written as last-known-good.",
            get(&c.lkg_write_failures),
        );
        metric(
            "switchyard_agent_cert_renewals_total",
            "counter",
            "Certificates renewed over the uplink.",
            get(&c.cert_renewals),
        );
        metric(
            "switchyard_agent_cert_renewals_refused_total",
            "counter",
            "Certificate renewals refused by the hub.",
            get(&c.cert_renewals_refused),
        );
        metric(
            "switchyard_agent_cert_not_after_seconds",
            "gauge",
            "Expiry of the certificate in use (seconds since the Unix epoch).",
            get(&c.cert_not_after_s),
        );
        metric(
            "switchyard_agent_uplink_udp_tx_bytes_total",
            "counter",
            "UDP bytes sent on uplink connections (QUIC statistics).",
            get(&c.uplink_udp_tx_bytes),
        );
        metric(
            "switchyard_agent_uplink_udp_rx_bytes_total",
            "counter",
            "UDP bytes received on uplink connections (QUIC statistics).",
            get(&c.uplink_udp_rx_bytes),
        );
        metric(
            "switchyard_agent_gateway_certs_issued_total",
            "counter",
            "Gateway certificates issued by the hub through this agent.",
            get(&c.gateway_certs_issued),
        );
        metric(
            "switchyard_agent_gateway_certs_failed_total",
            "counter",
            "Gateway identity requests answered with no certificate.",
            get(&c.gateway_certs_failed),
        );
        metric(
            "switchyard_agent_gateway_rtt_reports_total",
            "counter",
            "RTT sample batches from gateways passed to the uplink.",
            get(&c.gateway_rtt_reports),
        );
        if let Some(dns) = self.dns.get() {
            let name = "switchyard_agent_dns_queries_total";
            let _ = writeln!(
                out,
                "# HELP {name} DNS queries (clusterset.local) by outcome."
            );
            let _ = writeln!(out, "# TYPE {name} counter");
            for (outcome, n) in dns.outcomes() {
                let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {n}");
            }
            let name = "switchyard_agent_dns_rate_limited_total";
            let _ = writeln!(
                out,
                "# HELP {name} DNS queries dropped by the per-source rate limit."
            );
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", dns.rate_limited());
        }
        out
    }

    /// Renders the DNS server's counters in `/metrics` from now on.
    pub fn set_dns_stats(&self, stats: Arc<switchyard_dns::server::DnsStats>) {
        let _ = self.dns.set(stats);
    }
}

/// The HTTP routes over `status`.
pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/view", get(debug_view))
        .with_state(status)
}

/// Binds `addr` and serves [`router`] until the task is aborted; returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Status>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(status);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "agent HTTP listener failed");
        }
    });
    Ok((bound, task))
}

/// 200 once a view is held (from a hub or the last-known-good), else 503.
async fn readyz(State(s): State<Arc<Status>>) -> Response {
    let connected = s.is_connected();
    match s.view() {
        Some(v) => Json(json!({
            "ready": true,
            "source": v.source.as_str(),
            "epoch": v.view.epoch,
            "connected": connected,
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "reason": "no view yet: no hub reached and no last-known-good file",
                "connected": connected,
            })),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<Status>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.render_metrics(),
    )
        .into_response()
}

async fn debug_view(State(s): State<Arc<Status>>) -> Response {
    match s.view() {
        Some(v) => {
            let mut body = view_json(&v.view);
            if let Value::Object(m) = &mut body {
                m.insert("source".into(), json!(v.source.as_str()));
                m.insert("connected".into(), json!(s.is_connected()));
                m.insert("hub_node".into(), json!(s.hub_node()));
            }
            Json(body).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "pop": s.pop, "error": "no view yet" })),
        )
            .into_response(),
    }
}

/// A view as JSON (enums by name, fields named as in `types.proto`).
pub fn view_json(v: &pb::PopView) -> Value {
    json!({
        "pop": v.pop,
        "epoch": v.epoch,
        "services": v.services.iter().map(service_json).collect::<Vec<_>>(),
        "peers": v.peers.iter().map(|p| json!({
            "pop": p.pop,
            "gateway_addr": p.gateway_addr,
        })).collect::<Vec<_>>(),
    })
}

fn service_json(s: &pb::ServiceView) -> Value {
    let key = s.service.clone().unwrap_or_default();
    let ty = match pb::ServiceType::try_from(s.r#type) {
        Ok(pb::ServiceType::Headless) => "Headless",
        Ok(pb::ServiceType::ClusterSetIp) => "ClusterSetIP",
        Err(_) => "unknown",
    };
    let stale = match pb::StaleMode::try_from(s.stale) {
        Ok(pb::StaleMode::Serve) => "serve",
        Ok(pb::StaleMode::DropRemoteAfter) => "drop_remote_after",
        Ok(pb::StaleMode::LocalOnly) => "local_only",
        Err(_) => "unknown",
    };
    let mode = match pb::PolicyMode::try_from(s.mode) {
        Ok(pb::PolicyMode::Locality) => "Locality",
        Ok(pb::PolicyMode::Failover) => "Failover",
        Ok(pb::PolicyMode::ActiveActive) => "ActiveActive",
        Err(_) => "unknown",
    };
    json!({
        "namespace": key.namespace,
        "name": key.name,
        "type": ty,
        "vip": s.vip,
        "ports": s.service_ports.iter().map(|p| json!({
            "name": p.name,
            "port": p.port,
            "protocol": if p.protocol == pb::Protocol::Udp as i32 { "UDP" } else { "TCP" },
        })).collect::<Vec<_>>(),
        "dns_ttl_s": s.dns_ttl_s,
        "stale": stale,
        "stale_drop_after_ms": s.stale_drop_after_ms,
        "mode": mode,
        "tiers": s.tiers.iter().map(|t| json!({
            "targets": t.targets.iter().map(|g| json!({
                "pop": g.pop,
                "weight": g.weight,
                "endpoints": g.endpoints.iter().map(|e| json!({
                    "address": e.address,
                    "port": e.port,
                    "hostname": e.hostname,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn view(epoch: u64) -> pb::PopView {
        pb::PopView {
            pop: "north-1".into(),
            epoch,
            services: vec![pb::ServiceView {
                service: Some(pb::ServiceKey {
                    namespace: "shop".into(),
                    name: "cart".into(),
                }),
                vip: "127.77.0.1".into(),
                ports: vec![80],
                service_ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: pb::Protocol::Tcp as i32,
                }],
                tiers: vec![pb::Tier {
                    targets: vec![pb::Target {
                        pop: "north-1".into(),
                        weight: 1,
                        endpoints: vec![pb::Endpoint {
                            address: "10.0.0.5".into(),
                            port: 8080,
                            ready: true,
                            hostname: String::new(),
                        }],
                    }],
                }],
                dns_ttl_s: 5,
                ..Default::default()
            }],
            peers: vec![],
        }
    }

    #[test]
    fn view_json_names_everything() {
        let j = view_json(&view(7));
        assert_eq!(j["epoch"], 7);
        let s = &j["services"][0];
        assert_eq!(s["namespace"], "shop");
        assert_eq!(s["type"], "ClusterSetIP");
        assert_eq!(s["mode"], "Locality");
        assert_eq!(s["stale"], "serve");
        assert_eq!(s["ports"][0]["protocol"], "TCP");
        assert_eq!(s["tiers"][0]["targets"][0]["pop"], "north-1");
        assert_eq!(s["tiers"][0]["targets"][0]["endpoints"][0]["port"], 8080);
    }

    #[test]
    fn published_view_never_goes_back() {
        let s = Status::new("north-1".into(), "example.org".into());
        assert!(s.view().is_none());
        s.publish(view(5), ViewSource::Lkg);
        s.publish(view(3), ViewSource::Hub);
        let v = s.view().unwrap();
        assert_eq!((v.view.epoch, v.source), (5, ViewSource::Lkg));
        s.publish(view(5), ViewSource::Hub);
        assert_eq!(s.view().unwrap().source, ViewSource::Hub);
        let m = s.render_metrics();
        assert!(m.contains("switchyard_agent_view_epoch 5\n"), "{m}");
        assert!(m.contains("switchyard_agent_view_from_lkg 0\n"), "{m}");
        assert!(m.contains("switchyard_agent_connected 0\n"), "{m}");
    }
}

//! The node's HTTP listener: the status page (`/`, refreshing itself from
//! `/api/status`), `/healthz`, `/readyz`, `/metrics`.

use axum::{
    extract::State as AxState, http::StatusCode, response::IntoResponse, routing::get, Router,
};
use metrics_exporter_prometheus::PrometheusHandle;
use openraft::async_runtime::watch::WatchReceiver;

use super::{overview, sessions};
use crate::{metrics, node::Hub};

#[derive(Clone)]
struct Ctx {
    hub: Hub,
    prom: Option<PrometheusHandle>,
}

/// The router for one hub node.
pub fn router(hub: Hub, prom: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/api/status", get(api_status))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(Ctx { hub, prom })
}

/// The page: static HTML and JavaScript built into the binary.
async fn status_page() -> impl IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("status.html"),
    )
}

/// The federation as this node's applied state shows it, with every
/// reachable node's uplink sessions.
async fn api_status(AxState(ctx): AxState<Ctx>) -> impl IntoResponse {
    let m = ctx.hub.raft().metrics().borrow_watched().clone();
    let facts = overview::NodeFacts {
        node: ctx.hub.id(),
        leader: m.current_leader.unwrap_or(0),
        term: m.current_term,
        applied_index: m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0),
    };
    let (sessions, unreachable) = sessions::gather(&ctx.hub, sessions::GATHER_TIMEOUT).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let o = ctx
        .hub
        .local(|s| overview::build(s, &facts, &sessions, unreachable, now));
    (
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        axum::Json(o),
    )
}

/// Ready when a leader is known and this node applied all it knows to be
/// committed: then its local reads are current and it can forward writes.
async fn readyz(AxState(ctx): AxState<Ctx>) -> impl IntoResponse {
    let m = ctx.hub.raft().metrics().borrow_watched().clone();
    let committed = m.local_committed.as_ref().map(|l| l.index()).unwrap_or(0);
    let applied = m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0);
    match m.current_leader {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no leader known\n".to_string(),
        ),
        Some(_) if applied < committed => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: applied {applied} < committed {committed}\n"),
        ),
        Some(l) => (
            StatusCode::OK,
            format!("ready: leader {l}, applied {applied}\n"),
        ),
    }
}

async fn metrics_page(AxState(ctx): AxState<Ctx>) -> impl IntoResponse {
    let m = ctx.hub.raft().metrics().borrow_watched().clone();
    let leader = m.current_leader.unwrap_or(0);
    ::metrics::gauge!(metrics::TERM).set(m.current_term as f64);
    ::metrics::gauge!(metrics::LEADER).set(leader as f64);
    ::metrics::gauge!(metrics::IS_LEADER).set(if leader == ctx.hub.id() { 1.0 } else { 0.0 });
    ::metrics::gauge!(metrics::COMMIT_INDEX)
        .set(m.local_committed.as_ref().map(|l| l.index()).unwrap_or(0) as f64);
    ::metrics::gauge!(metrics::APPLIED_INDEX)
        .set(m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0) as f64);
    match &ctx.prom {
        Some(p) => (StatusCode::OK, p.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed in this process\n".to_string(),
        ),
    }
}

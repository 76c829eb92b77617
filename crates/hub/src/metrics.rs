//! Prometheus metrics of a hub node.
//!
//! One recorder per process (a hub node is a process); tests that run
//! several nodes in one process share it, which only merges their counts.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Requests refused before reaching a handler, by `reason`.
pub const REJECTED: &str = "switchyard_hub_rejected_requests_total";
/// Proposals submitted through this node, by `outcome`.
pub const PROPOSALS: &str = "switchyard_hub_proposals_total";
/// Seconds from submitting a write to its commit and apply.
pub const COMMIT_LATENCY: &str = "switchyard_hub_commit_latency_seconds";
/// Raft term (gauge).
pub const TERM: &str = "switchyard_hub_raft_term";
/// Current leader's node id, 0 if none (gauge).
pub const LEADER: &str = "switchyard_hub_raft_leader";
/// Whether this node is the leader (gauge, 0 or 1).
pub const IS_LEADER: &str = "switchyard_hub_raft_is_leader";
/// Committed log index (gauge).
pub const COMMIT_INDEX: &str = "switchyard_hub_raft_commit_index";
/// Applied log index (gauge).
pub const APPLIED_INDEX: &str = "switchyard_hub_raft_applied_index";
/// gRPC responses by method and status code.
pub const GRPC_RESPONSES: &str = "switchyard_hub_grpc_responses_total";
/// Seconds one pass of view computation took (every due uplink session of
/// this node).
pub const VIEW_PASS: &str = "switchyard_hub_view_pass_seconds";
/// POP views computed by this node.
pub const VIEWS_COMPUTED: &str = "switchyard_hub_views_computed_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once and returns a handle to render
/// it; `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(REJECTED, "Requests refused before a handler ran, by reason");
    metrics::describe_counter!(PROPOSALS, "Writes proposed through this node, by outcome");
    metrics::describe_histogram!(COMMIT_LATENCY, "Write latency to commit and apply (s)");
    metrics::describe_gauge!(TERM, "Raft term");
    metrics::describe_gauge!(LEADER, "Leader node id (0: none)");
    metrics::describe_gauge!(IS_LEADER, "1 if this node leads");
    metrics::describe_gauge!(COMMIT_INDEX, "Committed log index");
    metrics::describe_gauge!(APPLIED_INDEX, "Applied log index");
    metrics::describe_counter!(GRPC_RESPONSES, "gRPC responses by method and code");
    metrics::describe_histogram!(VIEW_PASS, "One pass computing the due sessions' views (s)");
    metrics::describe_counter!(VIEWS_COMPUTED, "POP views computed for uplink sessions");
}

/// Counts one refused request.
pub fn rejected(reason: &'static str) {
    metrics::counter!(REJECTED, "reason" => reason).increment(1);
}

/// The rejection reason a gRPC status stands for, if it is one: an
/// oversized message (`OUT_OF_RANGE`, `RESOURCE_EXHAUSTED`) or one that
/// does not decode (`INTERNAL` / `INVALID_ARGUMENT` from the decoder).
pub fn rejection_reason(code: i32, message: &str) -> Option<&'static str> {
    match code {
        11 | 8 => Some("oversized"),
        13 | 3 if message.contains("decode") => Some("malformed"),
        _ => None,
    }
}

/// Counts one proposal by outcome.
pub fn counter_proposal(outcome: &'static str) {
    metrics::counter!(PROPOSALS, "outcome" => outcome).increment(1);
}

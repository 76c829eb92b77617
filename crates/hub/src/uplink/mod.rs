//! The hub's side of the agent uplink, sans I/O (the quinn shell that moves
//! bytes lives elsewhere).
//!
//! - [`session`]: one agent connection: Hello/Welcome, export deltas
//!   proposed to Raft and acknowledged after commit, the POP's view as a
//!   snapshot then deltas, heartbeats into the liveness detector.
//! - [`detector`]: phi-accrual liveness over heartbeat inter-arrival times.
//!
//! Wire rules: `docs/protocol.md`, "Agent <-> hub uplink".

pub mod detector;
pub mod session;

pub use detector::{Detector, DetectorConfig, Liveness};
pub use session::{
    CloseReason, ExportProposal, HubEvent, HubSession, HubSessionConfig, HubSessionStats,
};
/// The view delta functions the sessions use, re-exported for the shell.
pub use switchyard_proto::uplink::{apply_delta, diff_views};

#[cfg(test)]
mod tests;

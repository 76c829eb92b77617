//! The hub's side of the agent uplink: sans-IO session and detector, and
//! the quinn shell that moves their bytes.
//!
//! - [`session`]: one agent connection: Hello/Welcome, export deltas
//!   proposed to Raft and acknowledged after commit, the POP's view as a
//!   snapshot then deltas, heartbeats into the liveness detector.
//! - [`detector`]: phi-accrual liveness over heartbeat inter-arrival times.
//! - [`server`]: the quinn I/O shell (listener, one driver per connection,
//!   proposals, view pushes, damping timer).
//! - [`enrol`]: the `Enrolment` gRPC service and POP certificate signing.
//! - [`udp`]: the uplink's UDP socket, with large kernel buffers.
//! - `views`: every session's view on one node, computed together from one
//!   shared preparation of the state.
//!
//! Wire rules: `docs/protocol.md`, "Agent <-> hub uplink".

pub mod detector;
pub mod enrol;
pub mod server;
pub mod session;
pub mod udp;
mod views;

pub use detector::{Detector, DetectorConfig, Liveness};
pub use session::{
    CloseReason, ExportProposal, HubEvent, HubSession, HubSessionConfig, HubSessionStats,
};
/// The view delta functions the sessions use, re-exported for the shell.
pub use switchyard_proto::uplink::{apply_delta, diff_views};

#[cfg(test)]
mod tests;

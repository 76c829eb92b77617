//! The agent's side of the uplink to the hub, sans I/O (the quinn shell
//! that moves bytes lives elsewhere).
//!
//! [`session::AgentSession`]: Hello, export deltas with per-POP sequence
//! numbers against the last acknowledged set (resent after reconnect),
//! the POP's view as a snapshot then deltas with epoch fencing, acks after
//! the view is on disk, heartbeats as datagrams.
//!
//! Wire rules: `docs/protocol.md`, "Agent <-> hub uplink".

pub mod session;

pub use session::{
    AgentCloseReason, AgentEvent, AgentResume, AgentSession, AgentSessionConfig, AgentSessionStats,
    CsrError, ExportError, ExportSet,
};

#[cfg(test)]
mod tests;

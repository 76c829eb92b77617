//! The Switchyard hub: a Raft-replicated control plane.
//!
//! - [`state`]: the deterministic state machine (pure).
//! - [`decide`]: the decision table of one POP from the state (pure).
//! - [`raft`]: openraft type configuration, wire conversions, network.
//! - [`store`]: durable log and snapshots in redb, behind a crashable backend.

pub mod decide;
pub mod global_dns;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod uplink;

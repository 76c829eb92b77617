//! The Switchyard wire contract: protobuf messages and gRPC services
//! (compiled from `proto/` with protox), and the length-delimited framing
//! codec used on QUIC streams.
//!
//! Versioning rules are in `docs/protocol.md`.

pub mod frame;
pub mod uplink;

/// Version 1 of the contract (`package switchyard.v1`).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

pub use v1 as pb;

/// Format version written into `StateSnapshot.version`.
pub const STATE_SNAPSHOT_VERSION: u32 = 1;

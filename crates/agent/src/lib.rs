//! The Switchyard POP agent.
//!
//! This crate holds the agent's local pieces:
//!
//! - [`lkg`]: the last-known-good decision table on disk (atomic writes,
//!   checksum, epoch fencing);
//! - [`source`]: where the POP's local services come from (the
//!   [`source::ServiceSource`] trait and the TOML file source);
//! - [`probe`]: the agent's own TCP and HTTP health probes per endpoint.
//!
//! See `docs/ARCHITECTURE.md` and `docs/services-file.md`.

pub mod lkg;
pub mod probe;
pub mod source;
pub mod uplink;

//! The Switchyard POP agent.
//!
//! This crate holds the agent's local pieces:
//!
//! - [`lkg`]: the last-known-good decision table on disk (atomic writes,
//!   checksum, epoch fencing);
//! - [`source`]: where the POP's local services come from (the
//!   [`source::ServiceSource`] trait and the TOML file source);
//! - [`probe`]: the agent's own TCP and HTTP health probes per endpoint;
//! - [`exports`]: local services and probe health to the export set;
//! - [`enrol`]: first start with a join token (CSR, certificate);
//! - [`config`]: the data dir (enrolment record, TLS files, export seq);
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, `/debug/view`;
//! - [`gateway`]: certificates, view and reports for the POP's gateways;
//! - [`local_api`]: the local gRPC API a separate gateway process uses;
//! - [`run`]: the agent process and the QUIC uplink shell around
//!   [`uplink::AgentSession`].
//!
//! See `docs/ARCHITECTURE.md` and `docs/services-file.md`.

pub mod config;
pub mod enrol;
pub mod exports;
pub mod gateway;
pub mod http;
pub mod lkg;
pub mod local_api;
pub mod probe;
pub mod run;
pub mod source;
pub mod uplink;

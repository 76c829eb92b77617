//! Switchyard DNS.
//!
//! - [`zone`]: the POP zone `clusterset.local.` (Kubernetes MCS DNS) from a
//!   POP's view, served by the agent (`switchyard agent --dns`);
//! - [`global`]: the hub's global zone, gateways of healthy POPs ordered
//!   for the client's POP (`switchyard hub --dns --global-zone`);
//! - [`answers`]: the precomputed wire-format answer table both build, and
//!   the answer to one query (parse, lookup, copy, patch);
//! - [`query`]: parsing and validation of a query packet;
//! - [`limits`]: the optional per-source rate limit;
//! - [`server`]: the UDP and TCP shell.
//!
//! See `docs/dns.md` for the names served and the hardening rules.

pub mod answers;
pub mod global;
pub mod limits;
pub mod query;
pub mod server;
pub mod zone;

pub use answers::{respond, AnswerTable, Outcome, Transport};
pub use server::{DnsConfig, DnsServer};

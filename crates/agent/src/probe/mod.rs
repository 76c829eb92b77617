//! The agent's own health probes of its local endpoints.
//!
//! - [`ProbeState`] (pure): consecutive results to health transitions
//!   (rise/fall thresholds), unit-tested with synthetic results;
//! - [`probe_once`]: one TCP connect, or one minimal HTTP/1.1 `GET` written
//!   by hand over a tokio `TcpStream` (only the status line is read, at most
//!   [`MAX_STATUS_LINE`] bytes), bounded by the probe timeout;
//! - [`ProbeRunner`] / [`follow`]: one task per endpoint on a
//!   `tokio::time::interval`, publishing a `watch` of [`Readiness`].

mod check;
mod runner;
mod state;

pub use check::{parse_status_line, probe_once, ProbeError, MAX_STATUS_LINE};
pub use runner::{follow, EndpointKey, ProbeRunner, Readiness};
pub use state::{Health, ProbeState};

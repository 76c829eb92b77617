//! Placeholder until its issue: see docs/ARCHITECTURE.md.

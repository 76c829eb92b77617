//! Applying one command to the state.

use switchyard_proto::pb::{self, command::Kind, ErrorCode};

use super::State;

/// A successful result at `index`.
pub fn result_ok(index: u64) -> pb::CommandResult {
    pb::CommandResult {
        index,
        ..Default::default()
    }
}

/// A refusal at `index`: the entry is committed, the command had no effect.
pub fn result_err(index: u64, code: ErrorCode, message: impl Into<String>) -> pb::CommandResult {
    pb::CommandResult {
        error: code as i32,
        message: message.into(),
        index,
        ..Default::default()
    }
}

impl State {
    /// Applies the command committed at `index`. Deterministic.
    pub fn apply(&mut self, index: u64, cmd: &pb::Command) -> pb::CommandResult {
        let Some(kind) = &cmd.kind else {
            return result_err(index, ErrorCode::Invalid, "empty command");
        };
        match kind {
            Kind::InitFederation(c) => self.init_federation(index, c),
            _ => result_err(index, ErrorCode::Invalid, "not yet implemented"),
        }
    }

    fn init_federation(&mut self, index: u64, c: &pb::InitFederation) -> pb::CommandResult {
        if self.federation.is_some() {
            return result_err(index, ErrorCode::AlreadyExists, "federation already initialised");
        }
        match &c.federation {
            Some(f) => {
                self.federation = Some(f.clone());
                result_ok(index)
            }
            None => result_err(index, ErrorCode::Invalid, "federation missing"),
        }
    }
}

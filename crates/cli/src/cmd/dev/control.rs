//! How `switchyard dev kill|revive POP` reach the running `switchyard dev`:
//! one line over the Unix socket `DIR/dev.sock`, one line back. The running
//! `dev` owns every process it started, so it alone kills and restarts them
//! (and Ctrl-C still stops everything, revived processes included).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The socket's name in the dev dir.
pub const SOCKET: &str = "dev.sock";

/// Longest request line accepted (bytes).
pub const MAX_LINE: usize = 256;

/// A request to the running `dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// SIGKILL every process of the POP (a power cut).
    Kill(String),
    /// Start the POP's processes again.
    Revive(String),
}

impl Request {
    /// The wire form (one line, no newline).
    pub fn to_line(&self) -> String {
        match self {
            Request::Kill(p) => format!("kill {p}"),
            Request::Revive(p) => format!("revive {p}"),
        }
    }

    /// Parses one request line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut words = line.split_whitespace();
        let (Some(verb), Some(pop), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("expected `kill POP` or `revive POP`, got {line:?}"));
        };
        match verb {
            "kill" => Ok(Request::Kill(pop.to_string())),
            "revive" => Ok(Request::Revive(pop.to_string())),
            other => Err(format!("unknown request {other:?}: kill or revive")),
        }
    }
}

/// The socket path of the dev dir `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Sends `req` to the `dev` running in `dir` and returns its answer.
pub async fn send(dir: &Path, req: &Request) -> Result<String> {
    let path = socket_path(dir);
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| {
            format!(
                "no `switchyard dev` is running with --dir {} (cannot connect to {})",
                dir.display(),
                path.display()
            )
        })?;
    stream
        .write_all(format!("{}\n", req.to_line()).as_bytes())
        .await?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(4096)
        .read_line(&mut answer)
        .await?;
    let answer = answer.trim_end().to_string();
    match answer.strip_prefix("ok ") {
        Some(rest) => Ok(rest.to_string()),
        None => bail!("{}", answer.strip_prefix("error ").unwrap_or(&answer)),
    }
}

/// Reads one request line from an accepted connection (bounded).
pub async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<Request, String> {
    let mut line = String::new();
    let mut r = BufReader::new(stream).take(MAX_LINE as u64);
    r.read_line(&mut line)
        .await
        .map_err(|e| format!("cannot read request: {e}"))?;
    Request::parse(line.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_lines_are_refused() {
        for r in [Request::Kill("north-1".into()), Request::Revive("s".into())] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r));
        }
        for bad in ["", "kill", "kill a b", "stop a"] {
            assert!(Request::parse(bad).is_err(), "{bad:?}");
        }
    }
}

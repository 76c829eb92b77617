//! One probe of one endpoint: TCP connect, or a minimal HTTP/1.1 GET.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::source::ProbeCheck;

/// Longest HTTP status line read, in bytes. The probe reads only the status
/// line, never headers or body, and then closes the connection.
pub const MAX_STATUS_LINE: usize = 1024;

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe did not complete within its timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connection failed (refused, unreachable, ...).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The address probed.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing the request or reading the response failed.
    #[error("HTTP exchange with {addr} failed: {source}")]
    Io {
        /// The address probed.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The peer closed the connection before a complete status line.
    #[error("connection closed before an HTTP status line")]
    Closed,
    /// No status line within [`MAX_STATUS_LINE`] bytes.
    #[error("HTTP status line longer than {MAX_STATUS_LINE} bytes")]
    TooLarge,
    /// The status line is not `HTTP/1.x NNN ...`.
    #[error("malformed HTTP status line {0:?}")]
    BadStatusLine(String),
    /// The status differs from the expected one.
    #[error("HTTP status {got}, expected {expected}")]
    UnexpectedStatus {
        /// Status received.
        got: u16,
        /// Status expected.
        expected: u16,
    },
}

/// Runs one probe of the endpoint `address:endpoint_port`, bounded by
/// `timeout` as a whole (connect, request, response).
pub async fn probe_once(
    address: IpAddr,
    endpoint_port: u16,
    check: &ProbeCheck,
    timeout: Duration,
) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, run(address, endpoint_port, check)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn run(address: IpAddr, endpoint_port: u16, check: &ProbeCheck) -> Result<(), ProbeError> {
    match check {
        ProbeCheck::Tcp { port } => {
            let addr = SocketAddr::new(address, port.unwrap_or(endpoint_port));
            TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|source| ProbeError::Connect { addr, source })
        }
        ProbeCheck::Http {
            path,
            expected_status,
            port,
            host,
        } => {
            let addr = SocketAddr::new(address, port.unwrap_or(endpoint_port));
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|source| ProbeError::Connect { addr, source })?;
            let host = host.clone().unwrap_or_else(|| addr.to_string());
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: switchyard-agent/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            );
            let io = |source| ProbeError::Io { addr, source };
            stream.write_all(request.as_bytes()).await.map_err(io)?;
            let line = read_status_line(&mut stream).await.map_err(|e| match e {
                ReadError::Io(source) => ProbeError::Io { addr, source },
                ReadError::Closed => ProbeError::Closed,
                ReadError::TooLarge => ProbeError::TooLarge,
            })?;
            let got = parse_status_line(&line)?;
            if got == *expected_status {
                Ok(())
            } else {
                Err(ProbeError::UnexpectedStatus {
                    got,
                    expected: *expected_status,
                })
            }
        }
    }
}

enum ReadError {
    Io(std::io::Error),
    Closed,
    TooLarge,
}

/// Reads up to the first CRLF (at most [`MAX_STATUS_LINE`] bytes).
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, ReadError> {
    let mut buf = vec![0u8; MAX_STATUS_LINE];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].windows(2).position(|w| w == b"\r\n") {
            buf.truncate(end);
            return Ok(buf);
        }
        if len == buf.len() {
            return Err(ReadError::TooLarge);
        }
        let n = stream.read(&mut buf[len..]).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        len += n;
    }
}

/// Parses `HTTP/1.x NNN[ reason]` into the status code.
pub fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let bad = || ProbeError::BadStatusLine(String::from_utf8_lossy(line).into_owned());
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(bad)?;
    let (minor, rest) = rest.split_first().ok_or_else(bad)?;
    let rest = rest.strip_prefix(b" ").ok_or_else(bad)?;
    if !minor.is_ascii_digit() || rest.len() < 3 || (rest.len() > 3 && rest[3] != b' ') {
        return Err(bad());
    }
    let code = &rest[..3];
    if !code.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n = code
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&n) {
        return Err(bad());
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const LONG: Duration = Duration::from_secs(10);

    fn http(path: &str, expected_status: u16) -> ProbeCheck {
        ProbeCheck::Http {
            path: path.into(),
            expected_status,
            port: None,
            host: None,
        }
    }

    /// A listener answering every connection with `response` after reading
    /// the request head; returns its port and the first request received.
    async fn http_server(response: &'static [u8]) -> (u16, tokio::sync::mpsc::Receiver<String>) {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 512];
                    while !req.ends_with(b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let _ = tx.send(String::from_utf8_lossy(&req).into_owned()).await;
                    let _ = s.write_all(response).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn tcp_connect_ok_and_refused() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let check = ProbeCheck::Tcp { port: None };
        probe_once(LOCAL, port, &check, LONG).await.unwrap();
        drop(l);
        let err = probe_once(LOCAL, port, &check, LONG).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        // The probe's own port overrides the endpoint's.
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let other = l.local_addr().unwrap().port();
        let check = ProbeCheck::Tcp { port: Some(other) };
        probe_once(LOCAL, port, &check, LONG).await.unwrap();
    }

    #[tokio::test]
    async fn http_expected_status() {
        let (port, mut reqs) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        probe_once(LOCAL, port, &http("/healthz?x=1", 200), LONG)
            .await
            .unwrap();
        let req = reqs.recv().await.unwrap();
        assert!(req.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{req}"
        );
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");

        let err = probe_once(LOCAL, port, &http("/", 204), LONG)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ProbeError::UnexpectedStatus {
                got: 200,
                expected: 204
            }
        ));
    }

    #[tokio::test]
    async fn http_500_fails() {
        let (port, _reqs) = http_server(b"HTTP/1.0 500 Internal Server Error\r\n\r\n").await;
        let err = probe_once(LOCAL, port, &http("/", 200), LONG)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProbeError::UnexpectedStatus { got: 500, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_garbage_and_close_fail() {
        let (port, _r) = http_server(b"SSH-2.0-OpenSSH\r\n").await;
        let err = probe_once(LOCAL, port, &http("/", 200), LONG)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::BadStatusLine(_)), "{err}");
        let (port, _r) = http_server(b"HTTP/1.1 20").await;
        let err = probe_once(LOCAL, port, &http("/", 200), LONG)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Closed), "{err}");
        let (port, _r) = http_server(&[b'x'; 4096]).await;
        let err = probe_once(LOCAL, port, &http("/", 200), LONG)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::TooLarge), "{err}");
    }

    #[tokio::test]
    async fn accepts_but_never_answers_times_out() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        // Connections are accepted by the kernel (backlog) and never answered.
        let err = probe_once(LOCAL, port, &http("/", 200), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
        drop(l);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK").unwrap(), 200);
        assert_eq!(parse_status_line(b"HTTP/1.0 503").unwrap(), 503);
        assert_eq!(parse_status_line(b"HTTP/1.1 404 Not Found").unwrap(), 404);
        for bad in [
            &b""[..],
            b"HTTP/2 200",
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000",
            b"HTTP/1.1 abc",
            b"HTTP/1.1 099",
            b"HTTP/1.1  200",
            b"http/1.1 200",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }
}

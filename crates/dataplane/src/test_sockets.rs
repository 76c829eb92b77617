//! Sockets for unit tests.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// A connected pair of loopback sockets.
pub async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// One read of at most a byte, bounded in time: a socket its peer should
/// have closed would otherwise hang the test.
pub async fn read_one(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(20), s.read(&mut b))
        .await
        .expect("no EOF, reset or byte within 20 s")
}

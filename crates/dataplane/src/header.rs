//! The tunnel stream header and the one-byte answer (pure codec).
//!
//! A proxied connection is one QUIC bi-stream. The caller writes
//!
//! ```text
//! u16 BE length (of what follows, at most MAX_HEADER_LEN)
//! u8  version (1)
//! u16 BE service port
//! u8  namespace length, namespace bytes (UTF-8, at most MAX_NAME_LEN)
//! u8  name length, name bytes (UTF-8, at most MAX_NAME_LEN)
//! ```
//!
//! and then nothing until the receiver answered one [`Status`] byte: `Ok`
//! once it connected to its endpoint (then bytes flow both ways), anything
//! else and the receiver finishes the stream. The length is checked
//! against [`MAX_HEADER_LEN`] before anything is allocated.

use crate::ServiceKey;

/// Header format version.
pub const VERSION: u8 = 1;
/// Longest namespace or name (bytes): a DNS label.
pub const MAX_NAME_LEN: usize = 63;
/// Longest header after the length prefix (bytes).
pub const MAX_HEADER_LEN: usize = 1 + 2 + 1 + MAX_NAME_LEN + 1 + MAX_NAME_LEN;

/// What a tunnel stream asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The service.
    pub service: ServiceKey,
    /// The service port.
    pub port: u16,
}

/// A malformed header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Length prefix above [`MAX_HEADER_LEN`] or below the minimum.
    #[error("header length {0} out of range")]
    Length(usize),
    /// Unknown version byte.
    #[error("header version {0} unsupported")]
    Version(u8),
    /// Fields do not add up to the length.
    #[error("header truncated or with trailing bytes")]
    Shape,
    /// Empty or too long name, or not UTF-8.
    #[error("bad {0} in header")]
    Name(&'static str),
}

impl StreamHeader {
    /// The header with its length prefix; names longer than
    /// [`MAX_NAME_LEN`] are refused.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let ns = self.service.namespace.as_bytes();
        let name = self.service.name.as_bytes();
        check_name("namespace", ns)?;
        check_name("name", name)?;
        let len = 1 + 2 + 1 + ns.len() + 1 + name.len();
        let mut out = Vec::with_capacity(2 + len);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.push(VERSION);
        out.extend_from_slice(&self.port.to_be_bytes());
        out.push(ns.len() as u8);
        out.extend_from_slice(ns);
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        Ok(out)
    }

    /// Checks the length prefix (call before allocating the body).
    pub fn check_len(len: u16) -> Result<usize, HeaderError> {
        let len = usize::from(len);
        if !(1 + 2 + 1 + 1 + 1 + 1..=MAX_HEADER_LEN).contains(&len) {
            return Err(HeaderError::Length(len));
        }
        Ok(len)
    }

    /// Decodes the body (what follows the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, HeaderError> {
        Self::check_len(u16::try_from(body.len()).map_err(|_| HeaderError::Length(body.len()))?)?;
        let (&version, rest) = body.split_first().ok_or(HeaderError::Shape)?;
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let (port, rest) = rest.split_at_checked(2).ok_or(HeaderError::Shape)?;
        let port = u16::from_be_bytes([port[0], port[1]]);
        let (namespace, rest) = take_name("namespace", rest)?;
        let (name, rest) = take_name("name", rest)?;
        if !rest.is_empty() {
            return Err(HeaderError::Shape);
        }
        Ok(Self {
            service: ServiceKey::new(namespace, name),
            port,
        })
    }
}

fn check_name(what: &'static str, b: &[u8]) -> Result<(), HeaderError> {
    if b.is_empty() || b.len() > MAX_NAME_LEN {
        return Err(HeaderError::Name(what));
    }
    Ok(())
}

fn take_name<'a>(what: &'static str, b: &'a [u8]) -> Result<(String, &'a [u8]), HeaderError> {
    let (&len, rest) = b.split_first().ok_or(HeaderError::Shape)?;
    let (s, rest) = rest
        .split_at_checked(usize::from(len))
        .ok_or(HeaderError::Shape)?;
    check_name(what, s)?;
    let s = std::str::from_utf8(s).map_err(|_| HeaderError::Name(what))?;
    Ok((s.to_owned(), rest))
}

/// The receiver's one-byte answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected to an endpoint; bytes flow.
    Ok = 0,
    /// The header was malformed.
    BadHeader = 1,
    /// The service (or port) is not in the receiver's view.
    UnknownService = 2,
    /// The receiver does not export the service (it is not among the
    /// service's targets with ready endpoints in its own view).
    NotExported = 3,
    /// Every local endpoint refused or timed out.
    ConnectFailed = 4,
    /// Too many streams.
    Busy = 5,
}

impl Status {
    /// The status of a byte; unknown bytes are `None`.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Ok,
            1 => Self::BadHeader,
            2 => Self::UnknownService,
            3 => Self::NotExported,
            4 => Self::ConnectFailed,
            5 => Self::Busy,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> StreamHeader {
        StreamHeader {
            service: ServiceKey::new("default", "web"),
            port: 8080,
        }
    }

    #[test]
    fn round_trip() {
        let enc = h().encode().unwrap();
        let len = StreamHeader::check_len(u16::from_be_bytes([enc[0], enc[1]])).unwrap();
        assert_eq!(len, enc.len() - 2);
        assert_eq!(StreamHeader::decode(&enc[2..]).unwrap(), h());
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!(
            StreamHeader::check_len(u16::MAX),
            Err(HeaderError::Length(65535))
        );
        assert_eq!(StreamHeader::check_len(0), Err(HeaderError::Length(0)));
        let enc = h().encode().unwrap();
        let body = &enc[2..];
        // Truncated anywhere: an error, never a panic.
        for cut in 0..body.len() {
            assert!(StreamHeader::decode(&body[..cut]).is_err(), "cut {cut}");
        }
        let mut trailing = body.to_vec();
        trailing.push(0);
        assert_eq!(StreamHeader::decode(&trailing), Err(HeaderError::Shape));
        let mut version = body.to_vec();
        version[0] = 9;
        assert_eq!(StreamHeader::decode(&version), Err(HeaderError::Version(9)));
        let mut bad_utf8 = body.to_vec();
        bad_utf8[4] = 0xff;
        assert_eq!(
            StreamHeader::decode(&bad_utf8),
            Err(HeaderError::Name("namespace"))
        );
        let long = StreamHeader {
            service: ServiceKey::new("a".repeat(64), "web"),
            port: 1,
        };
        assert_eq!(long.encode(), Err(HeaderError::Name("namespace")));
    }

    #[test]
    fn status_bytes_round_trip() {
        for b in 0..=5u8 {
            assert_eq!(Status::from_byte(b).unwrap() as u8, b);
        }
        assert_eq!(Status::from_byte(6), None);
    }
}

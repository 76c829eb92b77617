//! Length-delimited framing for prost messages on byte streams.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of a
//! protobuf message. The length is checked against the codec's maximum
//! before any buffer is grown, so a peer cannot make us allocate by
//! announcing a huge frame.

use bytes::{Buf, BufMut, BytesMut};

/// Bytes taken by the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default maximum frame body (bytes): large enough for a decision table of
/// thousands of services, small enough to bound a connection's memory.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The announced or actual length is above the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length in bytes.
        len: usize,
        /// The codec's limit in bytes.
        max: usize,
    },
    /// The body is not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// A frame decoder/encoder with a size limit. Pure: feed it bytes, take
/// messages out; the caller owns the I/O.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec that refuses bodies above `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max }
    }

    /// The limit in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Appends `msg` as one frame to `dst`.
    pub fn encode<M: prost::Message>(&self, msg: &M, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = msg.encoded_len();
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        dst.reserve(HEADER_LEN + len);
        // The limit is far below u32::MAX, so the cast cannot truncate.
        dst.put_u32(len as u32);
        msg.encode(dst)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// Takes one whole frame's message out of `src` if it holds one.
    /// `Ok(None)` means more bytes are needed; the buffer is left as is.
    /// The announced length is checked before any allocation.
    pub fn decode<M: prost::Message + Default>(
        &self,
        src: &mut BytesMut,
    ) -> Result<Option<M>, FrameError> {
        let Some(len) = self.peek_len(src)? else {
            return Ok(None);
        };
        if src.len() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len);
        M::decode(body.freeze())
            .map(Some)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// The announced body length of the next frame, once the header is in.
    pub fn peek_len(&self, src: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use proptest::prelude::*;

    fn pop(name: &str) -> pb::Pop {
        pb::Pop {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_in_pieces() {
        let codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        codec.encode(&pop("north-1"), &mut wire).unwrap();
        codec.encode(&pop("south-1"), &mut wire).unwrap();
        let bytes = wire.freeze();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in bytes.iter() {
            buf.put_u8(*b);
            while let Some(m) = codec.decode::<pb::Pop>(&mut buf).unwrap() {
                out.push(m.name);
            }
        }
        assert_eq!(out, vec!["north-1", "south-1"]);
    }

    #[test]
    fn oversized_announcement_refused_before_body_arrives() {
        let codec = FrameCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert_eq!(
            codec.decode::<pb::Pop>(&mut buf),
            Err(FrameError::TooLarge { len: 256, max: 16 })
        );
        assert!(buf.capacity() < 256);
    }

    #[test]
    fn oversized_message_not_encoded() {
        let codec = FrameCodec::new(4);
        let mut buf = BytesMut::new();
        assert!(matches!(
            codec.encode(&pop("a-long-name"), &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn garbage_body_is_malformed() {
        let codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode::<pb::Pop>(&mut buf),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let codec = FrameCodec::new(128);
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..8 {
                match codec.decode::<pb::Command>(&mut buf) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}

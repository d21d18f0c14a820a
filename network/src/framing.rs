//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes of one
//! codec-encoded message.
//!
//! The length is checked against the maximum frame size as soon as its 4 bytes arrive,
//! before any byte of the body is buffered, and the body buffer only ever holds bytes
//! that actually arrived: a peer claiming 4 GiB costs us 4 bytes.

use bytes::{Buf as _, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use bulwark_crypto::codec::{self, CodecError};

use crate::SendError;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why an inbound frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame length {claimed} exceeds the limit of {limit} bytes")]
    TooLarge { claimed: u64, limit: usize },
    #[error("frame does not decode: {0}")]
    Malformed(CodecError),
}

/// Encodes `message` as one frame (prefix included), refusing it if its body would
/// exceed `max_frame_bytes`.
pub fn encode_frame<M: Serialize + ?Sized>(message: &M, max_frame_bytes: usize) -> Result<Bytes, SendError> {
    // Sized exactly (a sizing pass is cheap next to growing the buffer by doubling: a
    // 512 B request was reallocated and copied three times, a 100 KB batch ten).
    let len = codec::encoded_len(message).map_err(SendError::Encode)?;
    if len > max_frame_bytes {
        return Err(SendError::TooLarge { len, limit: max_frame_bytes });
    }
    let mut out = Vec::with_capacity(LENGTH_PREFIX_BYTES + len);
    out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
    codec::encode_into(message, &mut out).map_err(SendError::Encode)?;
    let len = out.len() - LENGTH_PREFIX_BYTES;
    let prefix = match u32::try_from(len) {
        Ok(prefix) if len <= max_frame_bytes => prefix,
        _ => return Err(SendError::TooLarge { len, limit: max_frame_bytes }),
    };
    out[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(Bytes::from(out))
}

/// Decodes one frame body (without its prefix) through the codec, with the frame limit.
pub fn decode_body<M: DeserializeOwned>(body: &[u8], max_frame_bytes: usize) -> Result<M, FrameError> {
    codec::decode(body, max_frame_bytes).map_err(FrameError::Malformed)
}

/// Splits a byte stream into frame bodies.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: BytesMut,
    max_frame_bytes: usize,
}

impl FrameDecoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder { buffer: BytesMut::new(), max_frame_bytes }
    }

    /// Appends bytes that arrived. Callers feed transport-sized chunks, so the buffer
    /// holds at most one partial frame (bounded by the limit) plus one chunk.
    pub fn extend(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete frame body, `Ok(None)` if more bytes are needed, or an error
    /// as soon as a length prefix exceeds the limit.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(prefix) = self.buffer.first_chunk::<LENGTH_PREFIX_BYTES>() else {
            return Ok(None);
        };
        let claimed = u32::from_be_bytes(*prefix);
        let len = usize::try_from(claimed).unwrap_or(usize::MAX);
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge { claimed: u64::from(claimed), limit: self.max_frame_bytes });
        }
        if self.buffer.len() < LENGTH_PREFIX_BYTES + len {
            return Ok(None);
        }
        self.buffer.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Bytes the buffer has allocated (for tests of memory bounds).
    pub fn capacity(&self) -> usize {
        self.buffer.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn huge_claim_is_refused_without_allocating_it() {
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[7; 100]);
        decoder.extend(&bytes);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge { claimed: u64::from(u32::MAX), limit: 1 << 20 })
        );
        assert!(decoder.capacity() < 4096, "{}", decoder.capacity());
    }

    #[test]
    fn claim_within_limit_buffers_only_what_arrived() {
        let mut decoder = FrameDecoder::new(16 << 20);
        decoder.extend(&(15u32 << 20).to_be_bytes());
        decoder.extend(&[1; 1000]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert!(decoder.capacity() < 64 << 10, "{}", decoder.capacity());
    }

    #[test]
    fn oversized_message_is_not_encoded_into_a_frame() {
        let err = encode_frame(&vec![0u8; 2000], 1000).unwrap_err();
        assert!(matches!(err, SendError::TooLarge { limit: 1000, .. }), "{err}");
    }

    #[test]
    fn garbage_body_is_malformed() {
        assert!(matches!(decode_body::<(u64, String)>(&[0xff; 9], 1024), Err(FrameError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn frames_survive_any_chunking(messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
                                       cut in 1usize..97) {
            let mut stream = Vec::new();
            for m in &messages {
                stream.extend_from_slice(&encode_frame(m, 1024).unwrap());
            }
            let mut decoder = FrameDecoder::new(1024);
            let mut out: Vec<Vec<u8>> = Vec::new();
            for chunk in stream.chunks(cut) {
                decoder.extend(chunk);
                while let Some(body) = decoder.next_frame().unwrap() {
                    out.push(decode_body(&body, 1024).unwrap());
                }
            }
            prop_assert_eq!(out, messages);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut decoder = FrameDecoder::new(512);
            decoder.extend(&bytes);
            while let Ok(Some(body)) = decoder.next_frame() {
                let _ = decode_body::<Vec<String>>(&body, 512);
            }
            prop_assert!(decoder.capacity() <= 4096);
        }
    }
}

//! The one wire and storage encoding of Bulwark.
//!
//! Everything that goes on the wire or to disk is encoded and decoded here, and nowhere
//! else, so the format can be replaced in one place. The format is bincode 2.0.1's
//! standard configuration (little endian, variable-length integers) driven by serde.
//!
//! Decoding is bounded twice: the caller passes the largest input it accepts for that
//! kind of value, and bincode is given an allocation limit derived from the actual
//! input length, so a length prefix that claims more bytes than the input could hold
//! (say 4 GiB in a 20-byte frame) is refused before anything of that size is allocated.
//! Trailing bytes after a value are an error: every value has one encoding, which is
//! what signatures are computed over.

use serde::{Deserialize, Serialize};

/// The largest input any decode accepts, whatever limit the caller passes (64 MiB).
pub const MAX_DECODE_BYTES: usize = 64 << 20;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed input: {0}")]
    Malformed(String),
    #[error("{trailing} trailing bytes after the value")]
    TrailingBytes { trailing: usize },
    #[error("value could not be encoded: {0}")]
    Encode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` in the wire format, into a buffer allocated once at its exact size
/// (a sizing pass, then the encoding). Growing a buffer by doubling instead copied a
/// 100 KB batch ten times, and for large values (snapshots) left freed blocks of every
/// size below it to the allocator while the peak held the old and the new buffer.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(encoded_len(value)?);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Encodes `value` by appending to `out` (no intermediate allocation).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// The encoded length of `value`, without keeping the bytes.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    let mut counter = ByteCounter(0);
    bincode::serde::encode_into_writer(value, &mut counter, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(counter.0)
}

struct ByteCounter(usize);

impl bincode::enc::write::Writer for ByteCounter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0 += bytes.len();
        Ok(())
    }
}

/// Decodes one value of type `T` that must fill `bytes` exactly.
///
/// `limit` is the largest input the caller accepts for this kind of value; it is capped
/// at [`MAX_DECODE_BYTES`]. Never panics on any input.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T, CodecError> {
    decode_capped(bytes, limit.min(MAX_DECODE_BYTES))
}

/// Largest value [`decode_large`] accepts.
pub const MAX_LARGE_DECODE_BYTES: usize = 1 << 30;

/// [`decode`] for values a replica reads back from its own store that may exceed
/// [`MAX_DECODE_BYTES`] (application snapshots), up to [`MAX_LARGE_DECODE_BYTES`].
/// Never for network input.
pub fn decode_large<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T, CodecError> {
    decode_capped(bytes, limit.min(MAX_LARGE_DECODE_BYTES))
}

fn decode_capped<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge { len: bytes.len(), limit });
    }
    // bincode's limit is a type parameter and counts bytes by their in-memory size (a
    // one-byte varint claims the 8 bytes of its u64), so it is set to 16 times the input,
    // rounded up to a power of four: no length prefix can make a decode allocate more
    // than 64 times the bytes that actually arrived.
    match bytes.len().saturating_mul(16) {
        0..=0x1000 => decode_with::<T, 0x1000>(bytes),
        0x1001..=0x4000 => decode_with::<T, 0x4000>(bytes),
        0x4001..=0x10000 => decode_with::<T, 0x10000>(bytes),
        0x10001..=0x40000 => decode_with::<T, 0x40000>(bytes),
        0x40001..=0x100000 => decode_with::<T, 0x100000>(bytes),
        0x100001..=0x400000 => decode_with::<T, 0x400000>(bytes),
        0x400001..=0x1000000 => decode_with::<T, 0x1000000>(bytes),
        0x1000001..=0x4000000 => decode_with::<T, 0x4000000>(bytes),
        0x4000001..=0x10000000 => decode_with::<T, 0x10000000>(bytes),
        0x10000001..=0x40000000 => decode_with::<T, 0x4000_0000>(bytes),
        _ => decode_with::<T, 0x1_0000_0000>(bytes),
    }
}

fn decode_with<'a, T: Deserialize<'a>, const LIMIT: usize>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (value, read) =
        bincode::serde::borrow_decode_from_slice::<T, _>(bytes, config().with_limit::<LIMIT>())
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != bytes.len() {
        return Err(CodecError::TrailingBytes { trailing: bytes.len() - read });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        round: u64,
        name: String,
        payload: Vec<u8>,
        parts: Vec<(u16, [u8; 32])>,
    }

    #[test]
    fn four_gib_length_prefix_is_refused_without_allocating() {
        // A Vec<u8> whose varint length prefix claims u32::MAX bytes: 0xFC marks a u32.
        let mut frame = vec![0xFC];
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        frame.extend_from_slice(&[0u8; 16]);
        let err = decode::<Vec<u8>>(&frame, 1 << 20).unwrap_err();
        assert!(matches!(err, CodecError::Malformed(_)), "{err}");
        // Same for a u64 prefix (0xFD) claiming 2^63 elements of a struct.
        let mut frame = vec![0xFD];
        frame.extend_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(decode::<Vec<Sample>>(&frame, 1 << 20).is_err());
        assert!(decode::<String>(&frame, 1 << 20).is_err());
    }

    #[test]
    fn integer_heavy_values_decode_despite_in_memory_accounting() {
        // 5,000 small u64s are one byte each on the wire but 8 bytes in memory.
        let ids: Vec<u64> = (0..5000).map(|i| i % 100).collect();
        let bytes = encode(&ids).unwrap();
        assert_eq!(decode::<Vec<u64>>(&bytes, MAX_DECODE_BYTES).unwrap(), ids);
    }

    #[test]
    fn encoding_is_bincode_in_one_allocation_of_its_size() {
        let sample = Sample {
            round: 9,
            name: "x".repeat(300),
            payload: vec![3; 70_000],
            parts: vec![(1, [2; 32]); 40],
        };
        let exact = encode(&sample).unwrap();
        assert_eq!(exact, bincode::serde::encode_to_vec(&sample, config()).unwrap());
        assert_eq!(exact.capacity(), exact.len());
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let bytes = encode(&vec![7u8; 2000]).unwrap();
        assert_eq!(
            decode::<Vec<u8>>(&bytes, 1000),
            Err(CodecError::TooLarge { len: bytes.len(), limit: 1000 })
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&5u64).unwrap();
        bytes.push(0);
        assert_eq!(decode::<u64>(&bytes, 64), Err(CodecError::TrailingBytes { trailing: 1 }));
    }

    #[test]
    fn encoded_len_matches_encode() {
        let s = Sample { round: 9, name: "x".into(), payload: vec![1; 300], parts: vec![(1, [2; 32])] };
        assert_eq!(encoded_len(&s).unwrap(), encode(&s).unwrap().len());
        let mut out = vec![9];
        encode_into(&s, &mut out).unwrap();
        assert_eq!(&out[1..], &encode(&s).unwrap()[..]);
    }

    proptest! {
        #[test]
        fn round_trip(round: u64, name in ".{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..600),
                      parts in proptest::collection::vec((any::<u16>(), any::<[u8; 32]>()), 0..8)) {
            let s = Sample { round, name, payload, parts };
            let bytes = encode(&s).unwrap();
            prop_assert_eq!(decode::<Sample>(&bytes, MAX_DECODE_BYTES).unwrap(), s);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<Sample>(&bytes, 4096);
            let _ = decode::<Vec<String>>(&bytes, 4096);
        }

        #[test]
        fn truncation_is_an_error(payload in proptest::collection::vec(any::<u8>(), 1..300), cut in 1usize..50) {
            let s = Sample { round: 1, name: "n".into(), payload, parts: vec![] };
            let bytes = encode(&s).unwrap();
            let keep = bytes.len().saturating_sub(cut);
            prop_assert!(decode::<Sample>(&bytes[..keep], 4096).is_err());
        }
    }
}

//! What clients and replicas say to each other, and what a block's payload holds.
//! Encoded only through `bulwark_crypto::codec`.

use bulwark_consensus::{Height, Payload};
use bulwark_crypto::{Digest, PublicKey, ReplicaId, codec};
use serde::{Deserialize, Serialize};

use crate::app::Transaction;

/// Largest operation a client may submit.
pub const MAX_OP_BYTES: usize = 128 << 10;
/// Largest block payload the mempool builds: what the consensus core accepts, less room
/// for the encoding of each transaction's envelope (see [`TX_ENVELOPE_BYTES`]).
pub const MAX_BATCH_BYTES: usize = bulwark_consensus::hotstuff::MAX_PAYLOAD_BYTES - 4096;
/// An upper bound on what encoding adds to each transaction's operation bytes.
pub const TX_ENVELOPE_BYTES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// Ordered through consensus and executed by every replica (linearizable).
    Ordered,
    /// Answered from this replica's committed state, marked with its height.
    LocalRead,
}

/// A client request. `(client, sequence)` identifies it: a retry with the same pair is
/// executed at most once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: u64,
    pub sequence: u64,
    pub kind: RequestKind,
    #[serde(with = "serde_bytes")]
    pub op: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Outcome {
    /// Executed at `height` with this application result.
    Executed(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A local read of the committed state at `height`.
    Read(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Refused before ordering; nothing changed.
    Rejected(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("operation of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("the mempool is full; retry later")]
    Busy,
    #[error("client id {claimed} does not belong to the key this connection presented")]
    WrongClientId { claimed: u64 },
    #[error("sequence {sequence} is too old for this client's session window")]
    TooOld { sequence: u64 },
    #[error("malformed: {0}")]
    Malformed(String),
}

/// A replica's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub client: u64,
    pub sequence: u64,
    pub replica: ReplicaId,
    pub height: Height,
    pub outcome: Outcome,
}

/// The client id bound to a key: the first 8 bytes of SHA-256 of the key.
pub fn client_id_of(key: &PublicKey) -> u64 {
    let digest = Digest::of(&key.to_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The transactions of a block payload. A payload that does not decode (a Byzantine
/// proposer's garbage) orders nothing, identically on every replica.
pub fn decode_batch(payload: &Payload) -> Vec<Transaction> {
    codec::decode(&payload.0, MAX_BATCH_BYTES * 2).unwrap_or_default()
}

pub fn encode_batch(txs: &[Transaction]) -> Payload {
    Payload(codec::encode(txs).unwrap_or_default())
}

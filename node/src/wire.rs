//! What clients and replicas say to each other, and what a block's payload holds.
//! Encoded only through `bulwark_crypto::codec`.

use bulwark_consensus::{Height, Payload};
use bulwark_crypto::{Digest, PublicKey, ReplicaId, codec};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::app::Transaction;

/// Largest operation a client may submit.
pub const MAX_OP_BYTES: usize = 128 << 10;
/// Largest encoded batch a replica builds or accepts from a peer.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// An upper bound on what encoding adds to each transaction's operation bytes.
pub const TX_ENVELOPE_BYTES: usize = 32;
/// Most batch digests one block payload names.
pub const MAX_BLOCK_BATCHES: usize = 4096;

/// What replicas send each other: their core's messages, and the transaction batches
/// that block payloads name by digest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerMessage<M> {
    Consensus(M),
    /// An encoded batch of transactions; it is named by [`batch_digest`] of these bytes.
    Batch(Bytes),
    /// Asks for the batches with these digests (at most [`MAX_FETCH_BATCHES`] are served).
    FetchBatches(Vec<Digest>),
    /// The latest application snapshot this replica can serve (sent every second).
    SnapshotOffer(SnapshotInfo),
    /// Asks for the peer's offer now (a replica that just started may be far behind).
    SnapshotQuery,
    /// Asks for the bytes of an offered snapshot from `offset` on.
    SnapshotFetch(SnapshotFetch),
    /// Bytes of an offered snapshot.
    SnapshotChunk(SnapshotChunk),
}

/// An application snapshot a replica offers to lagging peers. Honest replicas that
/// snapshot at the same height produce identical bytes, so `f + 1` identical offers
/// vouch for one (at least one of them is honest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The executed height the snapshot was taken at ...
    pub height: Height,
    /// ... the last block executed (its log digest for PBFT) ...
    pub block: Digest,
    /// ... and the replica's state digest after it.
    pub state_digest: Digest,
    /// The length of the snapshot's bytes and their [`snapshot_digest`].
    pub size: u64,
    pub digest: Digest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFetch {
    pub height: Height,
    pub digest: Digest,
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub height: Height,
    pub digest: Digest,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// With the first chunk: the encoded chain record of the snapshot's block, if the
    /// protocol keeps one (HotStuff's new root after the install); empty otherwise.
    #[serde(with = "serde_bytes")]
    pub anchor: Vec<u8>,
}

/// Most bytes of one [`SnapshotChunk`].
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The name of a snapshot's bytes: SHA-256 over them, domain-separated (the same as
/// feeding [`SNAPSHOT_DOMAIN`] and then the bytes to a hasher).
pub fn snapshot_digest(bytes: &[u8]) -> Digest {
    Digest::of_parts(&[SNAPSHOT_DOMAIN, bytes])
}

pub const SNAPSHOT_DOMAIN: &[u8] = b"bulwark/snapshot";

/// Most batches served for one [`PeerMessage::FetchBatches`].
pub const MAX_FETCH_BATCHES: usize = 64;

/// The name of a batch: SHA-256 over its encoding, domain-separated.
pub fn batch_digest(bytes: &[u8]) -> Digest {
    Digest::of_parts(&[b"bulwark/batch", bytes])
}

/// Encodes a batch of transactions (what [`PeerMessage::Batch`] carries).
pub fn encode_batch(txs: &[Transaction]) -> Vec<u8> {
    codec::encode(txs).unwrap_or_default()
}

/// A transaction as encoded in a batch, its operation borrowed from the batch's bytes
/// (the same encoding as [`Transaction`]).
#[derive(Deserialize)]
struct EncodedTransaction<'a> {
    client: u64,
    sequence: u64,
    #[serde(borrow)]
    op: &'a [u8],
}

/// The transactions of an encoded batch; `None` if it does not decode or is over
/// [`MAX_BATCH_BYTES`]. Their operations share the batch's buffer (no copy per
/// transaction).
pub fn decode_batch(bytes: &Bytes) -> Option<Vec<Transaction>> {
    let txs: Vec<EncodedTransaction<'_>> = codec::decode(bytes, MAX_BATCH_BYTES).ok()?;
    Some(
        txs.into_iter()
            .map(|tx| Transaction { client: tx.client, sequence: tx.sequence, op: bytes.slice_ref(tx.op) })
            .collect(),
    )
}

/// A block payload: the digests of the batches it orders, in order.
pub fn encode_block_payload(batches: &[Digest]) -> Payload {
    Payload(codec::encode(batches).unwrap_or_default())
}

/// The batch digests a block payload orders. A payload that does not decode or names
/// too many batches (a Byzantine proposer's garbage) orders nothing, identically on
/// every replica.
pub fn decode_block_payload(payload: &[u8]) -> Vec<Digest> {
    match codec::decode::<Vec<Digest>>(payload, MAX_BLOCK_BATCHES * 40 + 16) {
        Ok(digests) if digests.len() <= MAX_BLOCK_BATCHES => digests,
        _ => Vec::new(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// Ordered through consensus and executed by every replica (linearizable).
    Ordered,
    /// Answered from this replica's committed state, marked with its height.
    LocalRead,
    /// No operation: asks the replica to send this client the replies of its requests
    /// that reach the replica through other replicas' batches. Sent once per session.
    Subscribe,
}

/// A client request. `(client, sequence)` identifies it: a retry with the same pair is
/// executed at most once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: u64,
    pub sequence: u64,
    pub kind: RequestKind,
    /// Shared, so that the copy a client keeps for retries costs no allocation (the
    /// encoding is the same byte string as before).
    pub op: Bytes,
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

/// What a replica sends a client in one frame: the replies of one executed block to
/// that client (or one reply: a rejection, a local read).
pub type Replies = Vec<Reply>;

/// A replica's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub client: u64,
    pub sequence: u64,
    pub replica: ReplicaId,
    pub height: Height,
    pub outcome: Outcome,
}

/// Client ids with this bit set belong to keys; keyless clients use the other half.
const KEYED_CLIENT_BIT: u64 = 1 << 63;

/// The client id bound to a key: the first 8 bytes of SHA-256 of the key, in the keyed
/// half of the id space.
pub fn client_id_of(key: &PublicKey) -> u64 {
    let digest = Digest::of(&key.to_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first) | KEYED_CLIENT_BIT
}

/// Whether `id` is in the keyed half of the id space (only a connection presenting
/// the key may use it).
pub fn is_keyed_client_id(id: u64) -> bool {
    id & KEYED_CLIENT_BIT != 0
}

/// A random id for a keyless client.
pub fn keyless_client_id() -> u64 {
    rand::random::<u64>() & !KEYED_CLIENT_BIT
}

//! Replicated applications: the [`StateMachine`] trait and the two that ship.

pub mod kv;
pub mod ledger;

use bulwark_crypto::Digest;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One ordered client transaction, as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub client: u64,
    pub sequence: u64,
    /// Encoded as a byte string; shared with the batch it was decoded from.
    pub op: Bytes,
}

/// What executing one transaction produced (application-encoded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt(#[serde(with = "serde_bytes")] pub Vec<u8>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("malformed query: {0}")]
    Malformed(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("snapshot does not decode: {0}")]
    Malformed(String),
}

/// Largest snapshot a replica restores (its own, from its store).
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Encodes a frozen copy of an application's state (see [`StateMachine::snapshot`]).
pub type SnapshotJob = Box<dyn FnOnce() -> Vec<u8> + Send>;

/// A deterministic replicated state machine. Same transactions in the same order give
/// the same receipts and the same state digest on every replica. `state_digest` is
/// incremental (a hash chain over each block's effects), never a scan of the state.
pub trait StateMachine: Send + 'static {
    fn execute(&mut self, height: u64, txs: &[Transaction]) -> Vec<Receipt>;
    fn query(&self, request: &[u8]) -> Result<Vec<u8>, QueryError>;
    /// Checks an operation before it is ordered (e.g. a transfer's signature), so bad
    /// requests get a clear error at once. Execution must still re-check whatever this
    /// checks: a Byzantine leader can order anything.
    fn admit(&self, _op: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn state_digest(&self) -> Digest;
    /// A frozen copy of the state, taken cheaply on the execution thread (the shipped
    /// applications keep their state in persistent maps, cloned in O(1)); the returned
    /// job encodes it on another thread.
    fn snapshot(&self) -> SnapshotJob;
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError>;
}

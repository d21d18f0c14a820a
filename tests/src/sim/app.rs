//! A small deterministic state machine and mempool for the simulator: transactions are
//! `u64` ids, and the state digest is a hash chain over what was executed, so digests
//! are real and diverge if execution does.

use std::collections::BTreeSet;

use bulwark_consensus::{CommittedBlock, Height, Payload};
use bulwark_crypto::{Digest, codec};

/// Most transactions a simulated block carries.
pub const MAX_TXS_PER_BLOCK: usize = 16;

pub fn encode_payload(txs: &[u64]) -> Payload {
    Payload(codec::encode(txs).unwrap_or_default())
}

/// The transactions of a payload; a payload that does not decode orders nothing (the
/// same on every replica).
pub fn decode_payload(payload: &Payload) -> Vec<u64> {
    codec::decode::<Vec<u64>>(&payload.0, 1 << 16).unwrap_or_default()
}

/// The durable application state of one replica (it survives crashes: the applied
/// height is stored atomically with the state).
#[derive(Clone, Debug, Default)]
pub struct App {
    pub height: Height,
    pub state_digest: Digest,
    pub last_block: Digest,
    pub executed: BTreeSet<u64>,
}

/// What executing one committed block did.
pub struct Execution {
    pub txs: Vec<u64>,
    /// Transactions skipped because this replica had already executed them.
    pub duplicates: Vec<u64>,
}

impl App {
    /// Executes the next block. Transactions already executed are skipped
    /// (deterministically, so every replica skips the same ones).
    pub fn execute(&mut self, block: &CommittedBlock) -> Execution {
        let mut txs = Vec::new();
        let mut duplicates = Vec::new();
        for tx in decode_payload(&block.payload) {
            if self.executed.insert(tx) { txs.push(tx) } else { duplicates.push(tx) }
        }
        self.height = block.height;
        self.last_block = block.digest;
        self.state_digest = Digest::of_parts(&[
            self.state_digest.as_bytes(),
            &block.height.0.to_le_bytes(),
            &codec::encode(&txs).unwrap_or_default(),
        ]);
        Execution { txs, duplicates }
    }
}

/// Pending transactions of one replica; lost when it crashes.
#[derive(Clone, Debug, Default)]
pub struct Mempool {
    pending: BTreeSet<u64>,
}

impl Mempool {
    pub fn add(&mut self, tx: u64) {
        self.pending.insert(tx);
    }

    pub fn remove(&mut self, tx: u64) {
        self.pending.remove(&tx);
    }

    /// Up to `MAX_TXS_PER_BLOCK` transactions, oldest id first, leaving out `exclude`.
    pub fn take(&self, exclude: &BTreeSet<u64>) -> Vec<u64> {
        self.pending.iter().filter(|tx| !exclude.contains(tx)).take(MAX_TXS_PER_BLOCK).copied().collect()
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

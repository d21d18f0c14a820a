//! Pending client transactions: bounded in count and bytes, de-duplicated by
//! (client, sequence), drained into block payloads.

use std::collections::{HashSet, VecDeque};

use crate::app::Transaction;
use crate::wire::TX_ENVELOPE_BYTES;

#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    Duplicate,
    Full,
}

pub struct Mempool {
    queue: VecDeque<Transaction>,
    keys: HashSet<(u64, u64)>,
    bytes: usize,
    max_txs: usize,
    max_bytes: usize,
}

impl Mempool {
    pub fn new(max_txs: usize, max_bytes: usize) -> Mempool {
        Mempool { queue: VecDeque::new(), keys: HashSet::new(), bytes: 0, max_txs, max_bytes }
    }

    pub fn add(&mut self, tx: Transaction) -> Admission {
        if self.keys.contains(&(tx.client, tx.sequence)) {
            return Admission::Duplicate;
        }
        if self.queue.len() >= self.max_txs || self.bytes + tx.op.len() > self.max_bytes {
            return Admission::Full;
        }
        self.keys.insert((tx.client, tx.sequence));
        self.bytes += tx.op.len();
        self.queue.push_back(tx);
        Admission::Accepted
    }

    /// Up to `max_txs` of the oldest transactions not in `exclude` (what the chain
    /// being extended already orders) whose encoding fits in `max_bytes`. They stay
    /// pending until committed, so a proposal that is abandoned loses nothing.
    pub fn batch(&self, exclude: &HashSet<(u64, u64)>, max_txs: usize, max_bytes: usize) -> Vec<Transaction> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for tx in &self.queue {
            let size = tx.op.len() + TX_ENVELOPE_BYTES;
            if out.len() >= max_txs || bytes + size > max_bytes {
                break;
            }
            if !exclude.contains(&(tx.client, tx.sequence)) {
                bytes += size;
                out.push(tx.clone());
            }
        }
        out
    }

    /// Forgets transactions that were executed.
    pub fn remove_executed(&mut self, executed: &HashSet<(u64, u64)>) {
        if executed.is_empty() {
            return;
        }
        let mut removed = 0;
        self.queue.retain(|tx| {
            let keep = !executed.contains(&(tx.client, tx.sequence));
            if !keep {
                removed += tx.op.len();
            }
            keep
        });
        self.bytes -= removed;
        for key in executed {
            self.keys.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(client: u64, sequence: u64, len: usize) -> Transaction {
        Transaction { client, sequence, op: vec![0; len] }
    }

    #[test]
    fn bounded_deduplicated_and_batched() {
        let mut m = Mempool::new(3, 100);
        assert_eq!(m.add(tx(1, 1, 10)), Admission::Accepted);
        assert_eq!(m.add(tx(1, 1, 10)), Admission::Duplicate);
        assert_eq!(m.add(tx(1, 2, 95)), Admission::Full, "byte bound");
        assert_eq!(m.add(tx(2, 1, 10)), Admission::Accepted);
        assert_eq!(m.add(tx(3, 1, 10)), Admission::Accepted);
        assert_eq!(m.add(tx(4, 1, 10)), Admission::Full, "count bound");
        let exclude = HashSet::from([(2, 1)]);
        let batch = m.batch(&exclude, 10, 1000);
        assert_eq!(batch.iter().map(|t| t.client).collect::<Vec<_>>(), vec![1, 3]);
        m.remove_executed(&HashSet::from([(1, 1), (2, 1)]));
        assert_eq!((m.len(), m.bytes()), (1, 10));
    }

    #[test]
    fn a_full_batch_always_fits_in_a_block() {
        let mut m = Mempool::new(100_000, 1 << 30);
        for i in 0..5_000 {
            m.add(Transaction { client: u64::MAX - i, sequence: u64::MAX - i, op: vec![7; 512] });
        }
        let batch = m.batch(&HashSet::new(), 100_000, crate::wire::MAX_BATCH_BYTES);
        assert!(batch.len() > 1_000);
        let payload = crate::wire::encode_batch(&batch);
        assert!(payload.0.len() <= bulwark_consensus::hotstuff::MAX_PAYLOAD_BYTES, "{}", payload.0.len());
    }
}

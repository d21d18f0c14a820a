//! The key-value store: put, get, delete, compare-and-swap and range.

use std::ops::Bound;

use bulwark_crypto::{Digest, Hasher, codec};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{QueryError, Receipt, RestoreError, SnapshotJob, StateMachine, Transaction};

/// Largest key and value the store accepts.
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// Most entries one range returns.
pub const MAX_RANGE_ENTRIES: u32 = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Sets `key` to `new` if its current value is `expected` (`None`: absent).
    CompareAndSwap {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new: Vec<u8>,
    },
    /// Entries with `start <= key < end`, at most `limit`.
    Range {
        #[serde(with = "serde_bytes")]
        start: Vec<u8>,
        #[serde(with = "serde_bytes")]
        end: Vec<u8>,
        limit: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    Done,
    Value(Option<Vec<u8>>),
    /// Whether the swap happened, and the value before it.
    Swapped {
        swapped: bool,
        previous: Option<Vec<u8>>,
    },
    Entries(Vec<(Vec<u8>, Vec<u8>)>),
    /// The operation was refused (same on every replica); the state is unchanged.
    Invalid(String),
}

impl KvOp {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self).unwrap_or_default()
    }
}

impl KvResult {
    pub fn decode(bytes: &[u8]) -> Option<KvResult> {
        codec::decode(bytes, MAX_VALUE_BYTES * 2 + (8 << 20)).ok()
    }
}

/// Keys and values are shared byte strings: a snapshot freezes the map by an O(1)
/// clone, and each write afterwards copies the tree node it changes (up to 64 entries)
/// while the snapshot is encoded; copying an entry is then two reference counts, not
/// two allocations and a value's bytes. They also encode as one byte string each.
#[derive(Default)]
pub struct KvStore {
    entries: imbl::OrdMap<Bytes, Bytes>,
    digest: Digest,
}

impl KvStore {
    fn apply(&mut self, op: KvOp) -> KvResult {
        match op {
            KvOp::Put { key, .. } | KvOp::CompareAndSwap { key, .. } if key.len() > MAX_KEY_BYTES => {
                KvResult::Invalid(format!("key of {} bytes exceeds {MAX_KEY_BYTES}", key.len()))
            }
            KvOp::Put { value, .. } | KvOp::CompareAndSwap { new: value, .. }
                if value.len() > MAX_VALUE_BYTES =>
            {
                KvResult::Invalid(format!("value of {} bytes exceeds {MAX_VALUE_BYTES}", value.len()))
            }
            KvOp::Put { key, value } => {
                self.entries.insert(key.into(), value.into());
                KvResult::Done
            }
            KvOp::Get { key } => KvResult::Value(self.value(&key)),
            KvOp::Delete { key } => KvResult::Value(self.entries.remove(key.as_slice()).map(Vec::from)),
            KvOp::CompareAndSwap { key, expected, new } => {
                let previous = self.value(&key);
                let swapped = previous == expected;
                if swapped {
                    self.entries.insert(key.into(), new.into());
                }
                KvResult::Swapped { swapped, previous }
            }
            KvOp::Range { start, end, limit } => KvResult::Entries(self.range(&start, &end, limit)),
        }
    }

    fn value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.entries.get(key).map(|v| v.to_vec())
    }

    fn range(&self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        if start >= end {
            return Vec::new();
        }
        self.entries
            .range::<_, [u8]>((Bound::Included(start), Bound::Excluded(end)))
            .take(limit.min(MAX_RANGE_ENTRIES) as usize)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }
}

impl StateMachine for KvStore {
    fn execute(&mut self, height: u64, txs: &[Transaction]) -> Vec<Receipt> {
        let mut hasher = Hasher::new();
        hasher.update(self.digest.as_bytes()).update(&height.to_le_bytes());
        let receipts: Vec<Receipt> = txs
            .iter()
            .map(|tx| {
                let result = match codec::decode::<KvOp>(&tx.op, MAX_VALUE_BYTES + MAX_KEY_BYTES + 64) {
                    Ok(op) => self.apply(op),
                    Err(e) => KvResult::Invalid(format!("malformed operation: {e}")),
                };
                let bytes = codec::encode(&result).unwrap_or_default();
                // The chain covers what execution decided: each transaction's result.
                // Its operation is fixed by the agreed block already, so hashing it again
                // (512 B a put, on every replica) would detect nothing more.
                hasher.update(&tx.client.to_le_bytes()).update(&tx.sequence.to_le_bytes()).update(&bytes);
                Receipt(bytes)
            })
            .collect();
        self.digest = hasher.finalize();
        receipts
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, QueryError> {
        let op: KvOp = codec::decode(request, MAX_VALUE_BYTES + MAX_KEY_BYTES + 64)
            .map_err(|e| QueryError::Malformed(e.to_string()))?;
        let result = match op {
            KvOp::Get { key } => KvResult::Value(self.value(&key)),
            KvOp::Range { start, end, limit } => KvResult::Entries(self.range(&start, &end, limit)),
            _ => return Err(QueryError::Malformed("only get and range can be read locally".into())),
        };
        Ok(codec::encode(&result).unwrap_or_default())
    }

    fn state_digest(&self) -> Digest {
        self.digest
    }

    fn snapshot(&self) -> SnapshotJob {
        let (digest, entries) = (self.digest, self.entries.clone());
        Box::new(move || codec::encode(&(&digest, &entries)).unwrap_or_default())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let (digest, entries) = codec::decode_large(snapshot, super::MAX_SNAPSHOT_BYTES)
            .map_err(|e| RestoreError::Malformed(e.to_string()))?;
        self.digest = digest;
        self.entries = entries;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(seq: u64, op: KvOp) -> Transaction {
        Transaction { client: 1, sequence: seq, op: op.encode().into() }
    }

    #[test]
    fn operations_and_digest_are_deterministic() {
        let ops = vec![
            tx(1, KvOp::Put { key: b"a".to_vec(), value: b"1".to_vec() }),
            tx(
                2,
                KvOp::CompareAndSwap {
                    key: b"a".to_vec(),
                    expected: Some(b"1".to_vec()),
                    new: b"2".to_vec(),
                },
            ),
            tx(3, KvOp::CompareAndSwap { key: b"a".to_vec(), expected: None, new: b"3".to_vec() }),
            tx(4, KvOp::Put { key: b"b".to_vec(), value: b"x".to_vec() }),
            tx(5, KvOp::Range { start: b"a".to_vec(), end: b"z".to_vec(), limit: 10 }),
            tx(6, KvOp::Delete { key: b"b".to_vec() }),
            Transaction { client: 1, sequence: 7, op: vec![0xff; 3].into() },
        ];
        let mut a = KvStore::default();
        let mut b = KvStore::default();
        let ra = a.execute(1, &ops);
        assert_eq!(ra, b.execute(1, &ops));
        assert_eq!(a.state_digest(), b.state_digest());
        let results: Vec<KvResult> = ra.iter().map(|r| KvResult::decode(&r.0).unwrap()).collect();
        assert_eq!(results[1], KvResult::Swapped { swapped: true, previous: Some(b"1".to_vec()) });
        assert_eq!(results[2], KvResult::Swapped { swapped: false, previous: Some(b"2".to_vec()) });
        assert_eq!(
            results[4],
            KvResult::Entries(vec![(b"a".to_vec(), b"2".to_vec()), (b"b".to_vec(), b"x".to_vec())])
        );
        assert!(matches!(results[6], KvResult::Invalid(_)));
        let mut c = KvStore::default();
        c.restore(&(a.snapshot())()).unwrap();
        assert_eq!(c.state_digest(), a.state_digest());
        assert_eq!(
            c.query(&KvOp::Get { key: b"a".to_vec() }.encode()).unwrap(),
            a.query(&KvOp::Get { key: b"a".to_vec() }.encode()).unwrap()
        );
    }
}

//! Execution of the committed log: client sessions (exactly-once by client and
//! sequence), the application, its state digest, and durable snapshots from which a
//! restarted replica replays the log.

use std::collections::HashSet;

use bulwark_consensus::{CommittedBlock, Height};
use bulwark_crypto::{Digest, Hasher, codec};
use serde::{Deserialize, Serialize};

use crate::app::{Receipt, StateMachine, Transaction};
use crate::storage::{StorageError, Store, StoredSnapshot};
use crate::wire::{batch_digest, decode_batch, decode_block_payload};

/// Sequences a client may run ahead of its oldest unexecuted one; older ones are
/// refused as replays.
pub const SESSION_WINDOW: u64 = 4096;

/// 64-bit words of a session's window bitmap.
const WINDOW_WORDS: usize = (SESSION_WINDOW / 64) as usize;

/// Per-client record of executed sequence numbers: the highest executed one, and a
/// bitmap of the `SESSION_WINDOW` sequences up to it (sequence `s` is bit
/// `s % SESSION_WINDOW`). Admitting a sequence is a few bit operations and a clone is
/// 520 bytes (an ordered set of the window's sequences was a few percent of the machine
/// at 50,000 tx/s, and each snapshot made the next admission of each client copy it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    highest: u64,
    window: Box<[u64; WINDOW_WORDS]>,
}

impl Default for Session {
    fn default() -> Session {
        Session { highest: 0, window: Box::new([0; WINDOW_WORDS]) }
    }
}

/// Whether `sequence` is below the window that ends at `highest` (a replay). Sequences
/// whose window end would overflow are refused too.
fn below_window(sequence: u64, highest: u64) -> bool {
    sequence.checked_add(SESSION_WINDOW).is_none_or(|end| end <= highest)
}

impl Session {
    fn bit(sequence: u64) -> (usize, u64) {
        let index = sequence % SESSION_WINDOW;
        ((index / 64) as usize, 1 << (index % 64))
    }

    /// Whether `sequence` may execute now (not executed, not too old); if so, it is
    /// recorded as executed.
    fn admit(&mut self, sequence: u64) -> bool {
        if self.executed(sequence) {
            return false;
        }
        if sequence > self.highest {
            // The window slides up: the slots of the sequences it passes over are freed
            // (the one of `sequence` is set below).
            if sequence - self.highest >= SESSION_WINDOW {
                self.window.fill(0);
            } else {
                self.clear(self.highest + 1, sequence - self.highest - 1);
            }
            self.highest = sequence;
        }
        let (word, mask) = Session::bit(sequence);
        self.window[word] |= mask;
        true
    }

    /// Frees the slots of the `count` sequences from `first` on (`count` below the
    /// window's size), a word at a time: a client jumping its sequence far ahead costs
    /// every replica at most 64 word operations, not one per sequence.
    fn clear(&mut self, first: u64, count: u64) {
        let (mut index, mut left) = (first % SESSION_WINDOW, count);
        while left > 0 {
            let (word, bit) = ((index / 64) as usize, index % 64);
            let take = (64 - bit).min(left);
            let mask = if take == 64 { u64::MAX } else { ((1u64 << take) - 1) << bit };
            self.window[word] &= !mask;
            left -= take;
            index = (index + take) % SESSION_WINDOW;
        }
    }

    fn executed(&self, sequence: u64) -> bool {
        if below_window(sequence, self.highest) {
            return true;
        }
        let (word, mask) = Session::bit(sequence);
        sequence <= self.highest && self.window[word] & mask != 0
    }
}

/// A session as snapshots hold it (the bitmap's length is checked when decoded).
#[derive(Serialize)]
struct SessionRef<'a> {
    highest: u64,
    window: &'a [u64],
}

#[derive(Deserialize)]
struct SessionWire {
    highest: u64,
    window: Vec<u64>,
}

impl Serialize for Session {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SessionRef { highest: self.highest, window: &self.window[..] }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Session {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Session, D::Error> {
        let wire = SessionWire::deserialize(deserializer)?;
        let len = wire.window.len();
        let window = wire.window.into_boxed_slice().try_into().map_err(|_| {
            serde::de::Error::custom(format!("a session window of {len} words, not {WINDOW_WORDS}"))
        })?;
        Ok(Session { highest: wire.highest, window })
    }
}

/// What executing one block produced.
pub struct BlockOutcome {
    pub height: Height,
    pub state_digest: Digest,
    /// Fresh transactions and their receipts, in order.
    pub executed: Vec<(Transaction, Receipt)>,
    /// Transactions skipped as already executed (retries, or a Byzantine leader's
    /// replay).
    pub duplicates: usize,
}

pub struct Executor<A: StateMachine> {
    app: A,
    sessions: imbl::OrdMap<u64, Session>,
    height: Height,
    last_block: Digest,
    state_digest: Digest,
    snapshot_every: u64,
}

#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    #[serde(with = "serde_bytes")]
    app: Vec<u8>,
    sessions: imbl::OrdMap<u64, Session>,
}

impl<A: StateMachine> Executor<A> {
    pub fn new(app: A, snapshot_every: u64) -> Executor<A> {
        let state_digest = app.state_digest();
        Executor {
            app,
            sessions: imbl::OrdMap::new(),
            height: Height(0),
            last_block: Digest::ZERO,
            state_digest,
            snapshot_every: snapshot_every.max(1),
        }
    }

    pub fn height(&self) -> Height {
        self.height
    }

    pub fn last_block(&self) -> Digest {
        self.last_block
    }

    pub fn state_digest(&self) -> Digest {
        self.state_digest
    }

    pub fn app(&self) -> &A {
        &self.app
    }

    /// Whether `(client, sequence)` was executed already.
    pub fn was_executed(&self, client: u64, sequence: u64) -> bool {
        self.sessions.get(&client).is_some_and(|s| s.executed(sequence))
    }

    /// Whether `sequence` is too old for the client's window (a replay), or so close
    /// to `u64::MAX` that execution would refuse it (checked for clients without a
    /// session too, so that such a request is refused before it is ordered).
    pub fn too_old(&self, client: u64, sequence: u64) -> bool {
        below_window(sequence, self.sessions.get(&client).map_or(0, |s| s.highest))
    }

    /// Whether `block` is the next one to execute (blocks at or below the executed
    /// height are ignored: a restarted core re-derives commits).
    pub fn is_next(&self, block: &CommittedBlock) -> bool {
        block.height > self.height
    }

    /// Executes the next committed block, whose batches hold `txs` (in order).
    pub fn execute(&mut self, block: &CommittedBlock, txs: Vec<Transaction>) -> Option<BlockOutcome> {
        if !self.is_next(block) {
            return None;
        }
        let mut fresh = Vec::new();
        let mut duplicates = 0;
        for tx in txs {
            if self.sessions.entry(tx.client).or_default().admit(tx.sequence) {
                fresh.push(tx);
            } else {
                duplicates += 1;
            }
        }
        let receipts = self.app.execute(block.height.0, &fresh);
        self.height = block.height;
        self.last_block = block.digest;
        // The replica's digest chains the application's with the block position, so
        // two replicas agree only if they executed the same log.
        self.state_digest = Hasher::new()
            .update(self.state_digest.as_bytes())
            .update(&block.height.0.to_le_bytes())
            .update(self.app.state_digest().as_bytes())
            .clone()
            .finalize();
        Some(BlockOutcome {
            height: block.height,
            state_digest: self.state_digest,
            executed: fresh.into_iter().zip(receipts).collect(),
            duplicates,
        })
    }

    /// Whether a snapshot is due at the current height.
    pub fn snapshot_due(&self) -> bool {
        self.height.0.is_multiple_of(self.snapshot_every)
    }

    /// A snapshot of the executed state: taken at once (the state is frozen by O(1)
    /// clones of persistent maps), encoded when the returned job runs, on any thread.
    pub fn snapshot(&self) -> impl FnOnce() -> StoredSnapshot + Send + 'static {
        let app = self.app.snapshot();
        let sessions = self.sessions.clone();
        let (height, block, state_digest) = (self.height, self.last_block, self.state_digest);
        move || StoredSnapshot {
            height,
            block,
            state_digest,
            state: codec::encode(&SnapshotBody { app: app(), sessions }).unwrap_or_default(),
        }
    }

    /// Replaces the executed state with `snapshot`'s (a stored one, or one fetched from
    /// peers). On an error nothing changed.
    pub fn install(&mut self, snapshot: &StoredSnapshot) -> Result<(), String> {
        let body: SnapshotBody = codec::decode_large(&snapshot.state, crate::app::MAX_SNAPSHOT_BYTES)
            .map_err(|e| e.to_string())?;
        self.app.restore(&body.app).map_err(|e| e.to_string())?;
        self.sessions = body.sessions;
        self.height = snapshot.height;
        self.last_block = snapshot.block;
        self.state_digest = snapshot.state_digest;
        Ok(())
    }

    /// Restores the latest snapshot and replays the committed log after it, reading
    /// blocks from `store`. Returns the executed transaction keys (to drop from the
    /// mempool).
    pub fn recover<R: bulwark_consensus::StoredRecord>(
        &mut self,
        store: &Store,
    ) -> Result<HashSet<(u64, u64)>, StorageError> {
        if let Some(snapshot) = store.snapshot()? {
            self.install(&snapshot).map_err(|reason| StorageError::Corrupt {
                cf: "snapshot",
                key: "latest".into(),
                reason,
            })?;
        }
        let mut executed = HashSet::new();
        let last = store.last_logged_height()?;
        let mut height = self.height.next();
        while height <= last {
            let Some(digest) = store.log_entry(height)? else { break };
            let record: Option<R> = store.chain_record(&digest)?;
            let Some(payload) = record.as_ref().and_then(|r| r.payload()).cloned() else {
                return Err(StorageError::Corrupt {
                    cf: "chain",
                    key: digest.to_string(),
                    reason: format!("the committed block at height {height} is missing"),
                });
            };
            let block = CommittedBlock {
                height,
                round: bulwark_consensus::Round(0),
                digest,
                proposer: bulwark_crypto::ReplicaId(0),
                payload,
            };
            let txs = stored_transactions(store, &block)?;
            if let Some(outcome) = self.execute(&block, txs) {
                executed.extend(outcome.executed.iter().map(|(tx, _)| (tx.client, tx.sequence)));
            }
            height = height.next();
        }
        Ok(executed)
    }
}

/// The transactions of a committed block, read from its stored batches. A batch that
/// is missing or does not match its digest is a corrupted store (the batches of a
/// block are written with it).
pub fn stored_transactions(store: &Store, block: &CommittedBlock) -> Result<Vec<Transaction>, StorageError> {
    let mut txs = Vec::new();
    for digest in decode_block_payload(&block.payload.0) {
        txs.extend(checked_batch(&digest, store.batch(&digest)?, block.height)?);
    }
    Ok(txs)
}

/// Decodes a batch read back for `digest` (needed by the block at `height`), checking
/// that it is there and intact.
pub fn checked_batch(
    digest: &Digest,
    bytes: Option<Vec<u8>>,
    height: Height,
) -> Result<Vec<Transaction>, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt { cf: "batches", key: digest.to_string(), reason };
    let bytes =
        bytes.ok_or_else(|| corrupt(format!("the batch of the block at height {height} is missing")))?;
    if batch_digest(&bytes) != *digest {
        return Err(corrupt("the stored batch does not match its digest".into()));
    }
    decode_batch(&bytes.into()).ok_or_else(|| corrupt("the stored batch does not decode".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_execute_each_sequence_once_within_a_window() {
        let mut s = Session::default();
        assert!(s.admit(5));
        assert!(s.admit(3), "out of order within the window is fine");
        assert!(!s.admit(5), "a retry is not executed again");
        assert!(s.admit(5 + SESSION_WINDOW + 10));
        assert!(!s.admit(4), "too old: refused as a replay");
        assert!(s.executed(3) && s.executed(5 + SESSION_WINDOW + 10));
    }

    /// The window as an ordered set of the executed sequences at or above its floor:
    /// what sessions were before the bitmap, the model the bitmap must match.
    #[derive(Default)]
    struct Model {
        highest: u64,
        recent: std::collections::BTreeSet<u64>,
    }

    impl Model {
        fn admit(&mut self, sequence: u64) -> bool {
            if below_window(sequence, self.highest) || self.recent.contains(&sequence) {
                return false;
            }
            self.recent.insert(sequence);
            self.highest = self.highest.max(sequence);
            true
        }
    }

    proptest::proptest! {
        #[test]
        fn the_bitmap_window_admits_exactly_what_a_set_of_sequences_would(
            steps in proptest::collection::vec((0u64..3, 0u64..3 * SESSION_WINDOW), 1..400),
        ) {
            let (mut session, mut model, mut last) = (Session::default(), Model::default(), 0u64);
            for (kind, amount) in steps {
                // Mostly small steps forward, some retries below, some jumps.
                let sequence = match kind {
                    0 => last + amount % 8,
                    1 => last.saturating_sub(amount % (SESSION_WINDOW + 64)),
                    _ => last + amount,
                };
                last = last.max(sequence);
                proptest::prop_assert_eq!(session.admit(sequence), model.admit(sequence), "sequence {}", sequence);
                proptest::prop_assert_eq!(session.highest, model.highest);
                for probe in model.highest.saturating_sub(SESSION_WINDOW + 2)..=model.highest + 2 {
                    let expected = below_window(probe, model.highest) || model.recent.contains(&probe);
                    proptest::prop_assert_eq!(session.executed(probe), expected, "probe {}", probe);
                }
            }
        }
    }

    #[test]
    fn a_new_client_at_the_top_of_the_range_is_refused_before_ordering() {
        let executor = Executor::new(crate::app::kv::KvStore::default(), 100);
        assert!(executor.too_old(9, u64::MAX - SESSION_WINDOW + 1));
        assert!(!executor.too_old(9, u64::MAX - SESSION_WINDOW) && !executor.too_old(9, 1));
    }

    #[test]
    fn sequences_at_the_top_of_the_range_are_refused_not_overflowed() {
        let mut s = Session::default();
        assert!(!s.admit(u64::MAX) && !s.admit(u64::MAX - SESSION_WINDOW + 1));
        assert!(s.admit(u64::MAX - SESSION_WINDOW));
        assert!(s.executed(3), "far below the window: refused as a replay");
    }

    #[test]
    fn a_snapshot_session_round_trips_and_a_wrong_window_is_an_error() {
        let mut s = Session::default();
        for sequence in [1, 7, 4095, 4097, 9000] {
            s.admit(sequence);
        }
        let back: Session = codec::decode(&codec::encode(&s).unwrap(), 1 << 20).unwrap();
        assert_eq!(back, s);
        let short = codec::encode(&SessionRef { highest: 9, window: &[1, 2, 3] }).unwrap();
        let err = codec::decode::<Session>(&short, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("3 words"), "{err}");
    }
}

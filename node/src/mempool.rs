//! The mempool: this replica's pending client transactions, sealed into batches that
//! are disseminated to every replica, and the batches (its own and its peers') that are
//! available and not yet executed. Blocks order batches by digest, so the ordering path
//! carries 32 bytes per batch, not the transactions.
//!
//! Bounded everywhere: this replica's own transactions in count and bytes (clients are
//! answered `Busy` beyond that); each peer's batches in bytes (a flooding peer's extra
//! batches are refused, counted); the memory of executed batch digests in count.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bulwark_crypto::{Digest, ReplicaId};
use bytes::Bytes;

use crate::app::Transaction;
use crate::wire::{MAX_BATCH_BYTES, TX_ENVELOPE_BYTES, batch_digest, encode_batch};
use crate::{FastMap, FastSet};

#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// Already pending in one of this replica's batches.
    Duplicate,
    Full,
}

/// What became of a batch a peer sent.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchAdmission {
    Stored,
    /// Already held (or executed recently).
    Known,
    /// The author's quota of pending bytes is used up.
    OverQuota,
}

/// Limits of one mempool.
#[derive(Clone, Copy, Debug)]
pub struct MempoolLimits {
    /// This replica's own pending transactions (open and in unexecuted batches).
    pub max_txs: usize,
    pub max_bytes: usize,
    /// A batch is sealed at this many transactions ...
    pub batch_txs: usize,
    /// ... or this many encoded bytes ...
    pub batch_bytes: usize,
    /// ... or this long after its first transaction arrived.
    pub batch_delay: Duration,
    /// Pending bytes of batches authored by one peer.
    pub peer_quota_bytes: usize,
}

/// A batch available to this replica and not executed yet.
pub struct PendingBatch {
    pub author: ReplicaId,
    pub bytes: Bytes,
    /// Its transactions, decoded once (sharing `bytes`), until execution takes them.
    txs: Option<Vec<Transaction>>,
    /// Whether the store holds it (written with the first block that names it).
    pub persisted: bool,
    /// Arrival order (proposals take batches oldest first).
    order: u64,
    /// What a peer's batch was charged against its author's quota (0 for own batches).
    peer_charge: usize,
    /// For this replica's own batches: what admission charged for them and when the
    /// batch was last sent to the peers.
    own: Option<OwnBatch>,
}

struct OwnBatch {
    keys: Vec<(u64, u64)>,
    /// Bytes charged to the own-transaction budget.
    charged: usize,
    sent: Instant,
}

/// A peer's batch is charged at least this many bytes against its quota (so tiny
/// batches cannot multiply bookkeeping) ...
const MIN_BATCH_CHARGE: usize = 1024;
/// ... and a peer has at most this many unexecuted batches.
const MAX_PEER_BATCHES: usize = 4096;

/// Executed batch digests remembered, so a late copy is not taken as new.
const EXECUTED_REMEMBERED: usize = 65_536;

pub struct Mempool {
    me: ReplicaId,
    limits: MempoolLimits,
    sealed: Vec<(Digest, Bytes)>,
    open: Vec<Transaction>,
    open_bytes: usize,
    open_since: Option<Instant>,
    /// Keys of this replica's own pending transactions, open or sealed.
    own_keys: FastSet<(u64, u64)>,
    own_bytes: usize,
    batches: FastMap<Digest, PendingBatch>,
    by_order: BTreeMap<u64, Digest>,
    /// This replica's own pending batches, in the order they were sealed.
    own_order: BTreeMap<u64, Digest>,
    next_order: u64,
    /// Per peer: bytes charged and batches held.
    peer_usage: HashMap<ReplicaId, (usize, usize)>,
    executed: FastSet<Digest>,
    executed_order: VecDeque<Digest>,
}

impl Mempool {
    pub fn new(me: ReplicaId, limits: MempoolLimits) -> Mempool {
        Mempool {
            me,
            limits,
            sealed: Vec::new(),
            open: Vec::new(),
            open_bytes: 0,
            open_since: None,
            own_keys: FastSet::default(),
            own_bytes: 0,
            batches: FastMap::default(),
            by_order: BTreeMap::new(),
            own_order: BTreeMap::new(),
            next_order: 0,
            peer_usage: HashMap::new(),
            executed: FastSet::default(),
            executed_order: VecDeque::new(),
        }
    }

    /// Admits a client transaction into this replica's open batch (sealing the open
    /// batch first if the transaction would not fit, and after it if it is full).
    pub fn add(&mut self, tx: Transaction, now: Instant) -> Admission {
        let key = (tx.client, tx.sequence);
        if self.own_keys.contains(&key) {
            return Admission::Duplicate;
        }
        let size = tx.op.len() + TX_ENVELOPE_BYTES;
        if self.own_keys.len() >= self.limits.max_txs || self.own_bytes + size > self.limits.max_bytes {
            return Admission::Full;
        }
        if self.open_bytes + size > self.batch_cap() {
            self.seal(now);
        }
        self.own_keys.insert(key);
        self.own_bytes += size;
        self.open_bytes += size;
        self.open.push(tx);
        self.open_since.get_or_insert(now);
        if self.open.len() >= self.limits.batch_txs || self.open_bytes >= self.batch_cap() {
            self.seal(now);
        }
        Admission::Accepted
    }

    /// Encoded bytes a batch is sealed at (room left for the length prefix).
    fn batch_cap(&self) -> usize {
        self.limits.batch_bytes.min(MAX_BATCH_BYTES - 64)
    }

    /// When the open batch is due to be sealed, if it holds anything.
    pub fn seal_deadline(&self) -> Option<Instant> {
        self.open_since.map(|since| since + self.limits.batch_delay)
    }

    /// Seals the open batch (if any) as one of this replica's; its bytes wait in
    /// [`Mempool::take_sealed`] to be sent to every peer.
    pub fn seal(&mut self, now: Instant) {
        if self.open.is_empty() {
            return;
        }
        let txs = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        self.open_since = None;
        let keys: Vec<_> = txs.iter().map(|t| (t.client, t.sequence)).collect();
        let charged = txs.iter().map(|t| t.op.len() + TX_ENVELOPE_BYTES).sum();
        let bytes = Bytes::from(encode_batch(&txs));
        let digest = batch_digest(&bytes);
        let own = OwnBatch { keys, charged, sent: now };
        if self.executed.contains(&digest) || self.batches.contains_key(&digest) {
            // The same transactions in the same order were batched before (only
            // possible after a restart); they are already ordered or pending.
            self.release_own(own);
            return;
        }
        self.own_order.insert(self.next_order, digest);
        // Its transactions, sharing the batch's buffer, for execution to take.
        let txs = crate::wire::decode_batch(&bytes);
        self.insert(digest, self.me, bytes.clone(), txs, 0, Some(own));
        self.sealed.push((digest, bytes));
    }

    /// Batches sealed since the last call, to send to every peer.
    pub fn take_sealed(&mut self) -> Vec<(Digest, Bytes)> {
        std::mem::take(&mut self.sealed)
    }

    fn insert(
        &mut self,
        digest: Digest,
        author: ReplicaId,
        bytes: Bytes,
        txs: Option<Vec<Transaction>>,
        peer_charge: usize,
        own: Option<OwnBatch>,
    ) {
        let order = self.next_order;
        self.next_order += 1;
        self.by_order.insert(order, digest);
        let batch = PendingBatch { author, bytes, txs, persisted: false, order, peer_charge, own };
        self.batches.insert(digest, batch);
    }

    /// The transactions of a pending batch, decoded when it arrived; `None` if the
    /// batch is not here or they were taken already (decode its bytes then).
    pub fn take_transactions(&mut self, digest: &Digest) -> Option<Vec<Transaction>> {
        self.batches.get_mut(digest)?.txs.take()
    }

    /// Stores a batch `from` sent (its digest computed by the receiver, its transactions
    /// decoded if they were), within that peer's quota unless this replica asked for it
    /// (`solicited`: a block it is about to vote for or execute names it, and held
    /// messages are bounded elsewhere).
    pub fn add_batch(
        &mut self,
        from: ReplicaId,
        digest: Digest,
        bytes: Bytes,
        txs: Option<Vec<Transaction>>,
        solicited: bool,
    ) -> BatchAdmission {
        if self.batches.contains_key(&digest) || self.executed.contains(&digest) {
            return BatchAdmission::Known;
        }
        // The decoded transactions are held too (a few bytes of wire each can be a
        // `Transaction` in memory), so they count against the quota with the bytes.
        let decoded = txs.as_ref().map_or(0, |txs| txs.len() * size_of::<Transaction>());
        let charge = (bytes.len() + decoded).max(MIN_BATCH_CHARGE);
        let (used, count) = self.peer_usage.entry(from).or_default();
        if !solicited && (*used + charge > self.limits.peer_quota_bytes || *count >= MAX_PEER_BATCHES) {
            return BatchAdmission::OverQuota;
        }
        *used += charge;
        *count += 1;
        self.insert(digest, from, bytes, txs, charge, None);
        BatchAdmission::Stored
    }

    pub fn batch(&self, digest: &Digest) -> Option<&PendingBatch> {
        self.batches.get(digest)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.batches.contains_key(digest)
    }

    pub fn was_executed(&self, digest: &Digest) -> bool {
        self.executed.contains(digest)
    }

    pub fn mark_persisted(&mut self, digest: &Digest) {
        if let Some(batch) = self.batches.get_mut(digest) {
            batch.persisted = true;
        }
    }

    /// Up to `max` pending batches of at most `max_bytes` in all (at least one),
    /// leaving out `exclude` (what the chain being extended already orders): taken in
    /// turn from each author, each author's oldest first, so one replica's backlog
    /// cannot starve the others'.
    pub fn select(&self, exclude: &HashSet<Digest>, max: usize, max_bytes: usize) -> Vec<Digest> {
        let mut per_author: BTreeMap<ReplicaId, VecDeque<Digest>> = BTreeMap::new();
        for digest in self.by_order.values().filter(|d| !exclude.contains(*d)) {
            let Some(batch) = self.batches.get(digest) else { continue };
            let queue = per_author.entry(batch.author).or_default();
            if queue.len() < max {
                queue.push_back(*digest);
            }
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut full = false;
        while !full && !per_author.is_empty() {
            per_author.retain(|_, queue| {
                if full {
                    return false;
                }
                if let Some(digest) = queue.pop_front() {
                    let size = self.batches.get(&digest).map_or(0, |b| b.bytes.len());
                    if out.len() >= max || (!out.is_empty() && bytes + size > max_bytes) {
                        full = true;
                        return false;
                    }
                    bytes += size;
                    out.push(digest);
                }
                !queue.is_empty()
            });
        }
        out
    }

    /// Forgets an executed batch: it is no longer pending, and a late copy of it is
    /// recognised.
    pub fn executed(&mut self, digest: Digest) {
        if let Some(batch) = self.batches.remove(&digest) {
            self.by_order.remove(&batch.order);
            match batch.own {
                Some(own) => {
                    self.own_order.remove(&batch.order);
                    self.release_own(own);
                }
                None => {
                    if let Some((used, count)) = self.peer_usage.get_mut(&batch.author) {
                        *used = used.saturating_sub(batch.peer_charge);
                        *count = count.saturating_sub(1);
                    }
                }
            }
        }
        if self.executed.insert(digest) {
            self.executed_order.push_back(digest);
            if self.executed_order.len() > EXECUTED_REMEMBERED
                && let Some(old) = self.executed_order.pop_front()
            {
                self.executed.remove(&old);
            }
        }
    }

    /// Frees the admission budget of own transactions that are no longer pending.
    fn release_own(&mut self, own: OwnBatch) {
        for key in &own.keys {
            self.own_keys.remove(key);
        }
        self.own_bytes = self.own_bytes.saturating_sub(own.charged);
    }

    /// Up to `max` of this replica's own unexecuted batches, last sent more than
    /// `after` ago and not in `named` (batches some in-flight block orders: whoever
    /// lacks those fetches them); marks them sent now.
    pub fn due_for_resend(
        &mut self,
        now: Instant,
        after: Duration,
        named: &HashSet<Digest>,
        max: usize,
    ) -> Vec<Bytes> {
        let mut out = Vec::new();
        for digest in self.own_order.values() {
            if out.len() >= max {
                break;
            }
            let Some(batch) = self.batches.get_mut(digest) else { continue };
            if let Some(own) = &mut batch.own
                && now.duration_since(own.sent) >= after
                && !named.contains(digest)
            {
                own.sent = now;
                out.push(batch.bytes.clone());
            }
        }
        out
    }

    /// Pending transactions: this replica's own (open or sealed) and its peers' batches.
    pub fn len(&self) -> usize {
        self.own_keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.batches.is_empty()
    }

    /// Batches available and not executed.
    pub fn pending_batches(&self) -> usize {
        self.batches.len()
    }

    pub fn open_transactions(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> MempoolLimits {
        MempoolLimits {
            max_txs: 3,
            max_bytes: 1000,
            batch_txs: 2,
            batch_bytes: 1 << 20,
            batch_delay: Duration::from_millis(10),
            peer_quota_bytes: 100,
        }
    }

    fn tx(client: u64, sequence: u64, len: usize) -> Transaction {
        Transaction { client, sequence, op: vec![0; len].into() }
    }

    #[test]
    fn own_transactions_are_bounded_deduplicated_and_sealed_by_size_or_delay() {
        let t0 = Instant::now();
        let mut m = Mempool::new(ReplicaId(0), limits());
        assert_eq!(m.add(tx(1, 1, 10), t0), Admission::Accepted);
        assert_eq!(m.add(tx(1, 1, 10), t0), Admission::Duplicate);
        assert!(m.take_sealed().is_empty(), "one transaction: still open");
        assert_eq!(m.seal_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(m.add(tx(2, 1, 10), t0), Admission::Accepted);
        let sealed = m.take_sealed();
        assert_eq!(sealed.len(), 1, "two transactions: full, sealed");
        assert_eq!(m.seal_deadline(), None);
        let (digest, bytes) = sealed[0].clone();
        assert_eq!(digest, batch_digest(&bytes));
        // Its transactions, decoded at sealing, are taken once; then only its bytes are left.
        let txs = m.take_transactions(&digest).expect("decoded at sealing");
        assert_eq!(txs, vec![tx(1, 1, 10), tx(2, 1, 10)]);
        assert!(
            txs.iter().all(|t| bytes.as_ptr_range().contains(&t.op.as_ptr())),
            "shares the batch's buffer"
        );
        assert_eq!(m.take_transactions(&digest), None);
        assert_eq!(m.batch(&digest).map(|b| b.bytes.clone()), Some(bytes.clone()));
        assert_eq!(m.add(tx(2, 1, 10), t0), Admission::Duplicate, "pending in a sealed batch");
        assert_eq!(m.add(tx(3, 1, 10), t0), Admission::Accepted);
        assert_eq!(m.add(tx(4, 1, 10), t0), Admission::Full, "count bound");
        assert_eq!(m.select(&HashSet::new(), 10, usize::MAX), vec![digest]);
        m.executed(digest);
        assert_eq!(m.len(), 1);
        assert_eq!(m.add(tx(4, 1, 10), t0), Admission::Accepted, "budget released on execution");
        assert_eq!(
            m.add_batch(ReplicaId(1), digest, bytes, None, false),
            BatchAdmission::Known,
            "executed: a late copy"
        );
    }

    #[test]
    fn peers_batches_are_held_within_a_quota_and_selected_in_turn_per_author() {
        let mut m = Mempool::new(ReplicaId(0), MempoolLimits { peer_quota_bytes: 2500, ..limits() });
        let batch = |n: u8| Bytes::from(vec![n; 40]);
        let d = |n: u8| batch_digest(&batch(n));
        assert_eq!(m.add_batch(ReplicaId(1), d(1), batch(1), None, false), BatchAdmission::Stored);
        assert_eq!(m.add_batch(ReplicaId(1), d(1), batch(1), None, false), BatchAdmission::Known);
        assert_eq!(m.add_batch(ReplicaId(2), d(2), batch(2), None, false), BatchAdmission::Stored);
        assert_eq!(m.add_batch(ReplicaId(1), d(3), batch(3), None, false), BatchAdmission::Stored);
        // Each batch is charged at least 1 KiB: a third one from peer 1 is over 2,500.
        assert_eq!(m.add_batch(ReplicaId(1), d(4), batch(4), None, false), BatchAdmission::OverQuota);
        assert_eq!(
            m.add_batch(ReplicaId(1), d(4), batch(4), None, true),
            BatchAdmission::Stored,
            "asked for"
        );
        assert_eq!(m.select(&HashSet::from([d(2)]), 10, usize::MAX), vec![d(1), d(3), d(4)]);
        assert_eq!(
            m.select(&HashSet::new(), 10, usize::MAX),
            vec![d(1), d(2), d(3), d(4)],
            "in turn per author"
        );
        assert_eq!(m.select(&HashSet::new(), 2, usize::MAX), vec![d(1), d(2)]);
        assert_eq!(m.select(&HashSet::new(), 10, 100), vec![d(1), d(2)], "100 bytes: two batches of 40");
        assert_eq!(m.select(&HashSet::new(), 10, 1), vec![d(1)], "always at least one");
        m.executed(d(1));
        m.executed(d(3));
        assert_eq!(
            m.add_batch(ReplicaId(1), d(5), batch(5), None, false),
            BatchAdmission::Stored,
            "quota released"
        );
    }

    #[test]
    fn decoded_transactions_count_against_their_peers_quota() {
        // Empty operations are a few bytes each on the wire but a whole `Transaction`
        // each in memory: a batch of them is charged for what it holds decoded.
        let txs: Vec<Transaction> = (0..1000).map(|i| tx(9, i, 0)).collect();
        let bytes = Bytes::from(encode_batch(&txs));
        let decoded = crate::wire::decode_batch(&bytes).expect("well formed");
        let held = bytes.len() + decoded.len() * size_of::<Transaction>();
        assert!(bytes.len() * 4 < held, "the wire form is much smaller");
        let quota = MempoolLimits { peer_quota_bytes: held + MIN_BATCH_CHARGE - 1, ..limits() };
        let mut m = Mempool::new(ReplicaId(0), quota);
        let digest = batch_digest(&bytes);
        assert_eq!(m.add_batch(ReplicaId(1), digest, bytes, Some(decoded), false), BatchAdmission::Stored);
        let small = Bytes::from(vec![1; 40]);
        assert_eq!(
            m.add_batch(ReplicaId(1), batch_digest(&small), small.clone(), None, false),
            BatchAdmission::OverQuota,
            "the decoded batch used all but 1 KiB"
        );
        m.executed(digest);
        assert_eq!(
            m.add_batch(ReplicaId(1), batch_digest(&small), small, None, false),
            BatchAdmission::Stored,
            "released in full"
        );
    }

    #[test]
    fn a_full_batch_fits_in_a_batch_message() {
        let t0 = Instant::now();
        let mut m = Mempool::new(
            ReplicaId(0),
            MempoolLimits {
                max_txs: 100_000,
                max_bytes: 1 << 30,
                batch_txs: 100_000,
                batch_bytes: MAX_BATCH_BYTES,
                batch_delay: Duration::from_secs(1),
                peer_quota_bytes: 1 << 30,
            },
        );
        let (mut n, mut sealed) = (0, Vec::new());
        while sealed.is_empty() {
            // Operations of the largest size, so the last one does not fit.
            m.add(tx(u64::MAX - n, u64::MAX - n, crate::wire::MAX_OP_BYTES - n as usize), t0);
            n += 1;
            sealed = m.take_sealed();
        }
        m.seal(t0);
        sealed.extend(m.take_sealed());
        assert_eq!(sealed.len(), 2, "the full batch, then the transaction that did not fit");
        for (_, bytes) in sealed {
            assert!(bytes.len() <= MAX_BATCH_BYTES, "{n} txs, {} bytes", bytes.len());
            assert!(crate::wire::decode_batch(&bytes).is_some());
        }
    }
}

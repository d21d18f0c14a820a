//! State transfer: a replica that fell too far behind installs an application snapshot
//! instead of replaying the log block by block.
//!
//! Every replica offers its latest snapshot ([`SnapshotInfo`]: height, block, state
//! digest, size and digest of the bytes) to its peers. Honest replicas that snapshot at
//! the same height produce identical bytes, so when `f + 1` peers offer the identical
//! snapshot at least one honest replica vouches for it; a replica whose executed height
//! is more than `lag` below such a snapshot fetches its bytes in chunks, from one of
//! the vouching peers at a time (the next one when a peer stalls), hashing as they
//! arrive. Bytes that do not hash to the vouched digest are discarded and the peers
//! that served them are not asked again for this snapshot. This module is the
//! requester's bookkeeping only: no I/O and no clock of its own (the caller passes
//! `now`), so it is tested directly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bulwark_consensus::Height;
use bulwark_crypto::{Hasher, ReplicaId};

use crate::app::MAX_SNAPSHOT_BYTES;
use crate::wire::{SNAPSHOT_CHUNK_BYTES, SNAPSHOT_DOMAIN, SnapshotChunk, SnapshotFetch, SnapshotInfo};

/// Chunks asked for ahead of the one being waited for.
const WINDOW: u64 = 4;
/// A source that sends nothing useful for this long is replaced by the next one.
pub const STALL_AFTER: Duration = Duration::from_secs(3);
/// A transfer not done after this long is abandoned, and none starts for as long again
/// (the replica catches up block by block meanwhile).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// A request to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub to: ReplicaId,
    pub request: SnapshotFetch,
}

/// A snapshot whose bytes hash to the vouched digest.
#[derive(Debug)]
pub struct Received {
    pub info: SnapshotInfo,
    pub state: Vec<u8>,
    pub anchor: Vec<u8>,
    /// The peers that served its bytes (to blame if the install still refuses it).
    pub sources: BTreeSet<ReplicaId>,
}

/// What one chunk did.
#[derive(Debug)]
pub enum ChunkOutcome {
    /// Not for the transfer under way (stale, unsolicited, from another peer, out of
    /// order); dropped.
    Ignored,
    /// Appended; these requests go next.
    Progress(Vec<Fetch>),
    /// The bytes are complete but do not hash to the vouched digest: dropped; the next
    /// [`StateTransfer::poll`] starts over from peers that did not serve them.
    Corrupt,
    Complete(Received),
}

struct Transfer {
    info: SnapshotInfo,
    /// The peers that offered this snapshot, in turn.
    sources: Vec<ReplicaId>,
    turn: usize,
    state: Vec<u8>,
    hasher: Hasher,
    anchor: Vec<u8>,
    /// Bytes asked for from the current source (from `state.len()` on).
    requested: u64,
    served_by: BTreeSet<ReplicaId>,
    started: Instant,
    last_progress: Instant,
}

impl Transfer {
    fn source(&self) -> ReplicaId {
        self.sources[self.turn % self.sources.len()]
    }

    /// Asks the current source for the next chunks, up to the window.
    fn fill_window(&mut self) -> Vec<Fetch> {
        let mut out = Vec::new();
        let limit = (self.state.len() as u64 + WINDOW * SNAPSHOT_CHUNK_BYTES as u64).min(self.info.size);
        while self.requested < limit {
            out.push(Fetch {
                to: self.source(),
                request: SnapshotFetch {
                    height: self.info.height,
                    digest: self.info.digest,
                    offset: self.requested,
                },
            });
            self.requested += SNAPSHOT_CHUNK_BYTES as u64;
        }
        self.requested = self.requested.min(self.info.size);
        out
    }

    /// Moves to the next source and asks it from where the bytes stop.
    fn next_source(&mut self, now: Instant) -> Vec<Fetch> {
        self.turn += 1;
        self.requested = self.state.len() as u64;
        self.last_progress = now;
        self.fill_window()
    }
}

pub struct StateTransfer {
    /// Identical offers that vouch for a snapshot (f + 1).
    vouch: usize,
    /// Blocks behind a vouched snapshot before this replica installs it.
    lag: u64,
    offers: BTreeMap<ReplicaId, SnapshotInfo>,
    active: Option<Transfer>,
    /// Peers whose bytes failed the digest, per snapshot digest (not asked again for it).
    failed: BTreeMap<bulwark_crypto::Digest, BTreeSet<ReplicaId>>,
    /// No transfer starts before this (after one was abandoned).
    backoff_until: Option<Instant>,
    /// Transfers started: each starts at a different source, so no one peer is always
    /// asked first.
    started: usize,
}

impl StateTransfer {
    pub fn new(vouch: usize, lag: u64) -> StateTransfer {
        StateTransfer {
            vouch: vouch.max(1),
            lag,
            offers: BTreeMap::new(),
            active: None,
            failed: BTreeMap::new(),
            backoff_until: None,
            started: 0,
        }
    }

    /// Records `from`'s latest offer (one per peer: a newer one replaces it).
    pub fn on_offer(&mut self, from: ReplicaId, info: SnapshotInfo) {
        if info.size == 0 || info.size > MAX_SNAPSHOT_BYTES as u64 {
            return;
        }
        self.offers.insert(from, info);
    }

    /// The highest snapshot `vouch` peers offer identically, with the peers offering it.
    fn vouched(&self) -> Option<(SnapshotInfo, Vec<ReplicaId>)> {
        let mut by_info: BTreeMap<SnapshotInfo, Vec<ReplicaId>> = BTreeMap::new();
        for (peer, info) in &self.offers {
            by_info.entry(*info).or_default().push(*peer);
        }
        by_info.into_iter().filter(|(_, peers)| peers.len() >= self.vouch).max_by_key(|(info, _)| info.height)
    }

    /// The snapshot being fetched, if any.
    pub fn in_progress(&self) -> Option<SnapshotInfo> {
        self.active.as_ref().map(|t| t.info)
    }

    /// Called periodically: starts a transfer when a vouched snapshot is more than
    /// `lag` blocks above `executed`, and moves a stalled one to its next source.
    pub fn poll(&mut self, now: Instant, executed: Height) -> Vec<Fetch> {
        let newest = self.vouched().map(|(info, _)| info.height);
        if let Some(transfer) = &mut self.active {
            if transfer.info.height <= executed {
                // Caught up block by block meanwhile.
                self.active = None;
            } else if now.duration_since(transfer.started) >= GIVE_UP_AFTER {
                // Too slow (a source can trickle bytes just fast enough never to stall):
                // the peers that served it are not asked first for it again.
                let failed = self.failed.entry(transfer.info.digest).or_default();
                failed.extend(transfer.served_by.iter().copied());
                failed.insert(transfer.source());
                self.active = None;
                self.backoff_until = Some(now + GIVE_UP_AFTER);
                return Vec::new();
            } else if newest.is_some_and(|height| height > transfer.info.height)
                && (transfer.state.is_empty() || now.duration_since(transfer.last_progress) >= STALL_AFTER)
            {
                // Peers keep only their latest snapshots: when a newer one is vouched
                // for, fetch that one instead, at once if nothing arrived yet (the first
                // offers a restarted replica reads can be stale ones its peers queued
                // for it while it was down), else after a stall.
                self.active = None;
            } else if now.duration_since(transfer.last_progress) >= STALL_AFTER {
                return transfer.next_source(now);
            } else {
                return Vec::new();
            }
        }
        if self.backoff_until.is_some_and(|until| now < until) {
            return Vec::new();
        }
        let Some((info, peers)) = self.vouched() else { return Vec::new() };
        if info.height.0 <= executed.0.saturating_add(self.lag) {
            return Vec::new();
        }
        let failed = self.failed.get(&info.digest);
        let mut sources: Vec<ReplicaId> =
            peers.iter().copied().filter(|p| failed.is_none_or(|f| !f.contains(p))).collect();
        if sources.is_empty() {
            // Every offering peer served bad bytes once: give them all another turn
            // (the digest is still vouched for by at least one honest replica).
            self.failed.remove(&info.digest);
            sources = peers;
        }
        let mut hasher = Hasher::new();
        hasher.update(SNAPSHOT_DOMAIN);
        let mut transfer = Transfer {
            info,
            sources,
            turn: self.started,
            state: Vec::new(),
            hasher,
            anchor: Vec::new(),
            requested: 0,
            served_by: BTreeSet::new(),
            started: now,
            last_progress: now,
        };
        self.started = self.started.wrapping_add(1);
        let fetches = transfer.fill_window();
        self.active = Some(transfer);
        fetches
    }

    /// A chunk from `from`.
    pub fn on_chunk(&mut self, from: ReplicaId, chunk: SnapshotChunk, now: Instant) -> ChunkOutcome {
        let Some(transfer) = &mut self.active else { return ChunkOutcome::Ignored };
        let expected_len =
            (transfer.info.size - transfer.state.len() as u64).min(SNAPSHOT_CHUNK_BYTES as u64);
        if from != transfer.source()
            || chunk.height != transfer.info.height
            || chunk.digest != transfer.info.digest
            || chunk.offset != transfer.state.len() as u64
            || chunk.bytes.len() as u64 != expected_len
        {
            return ChunkOutcome::Ignored;
        }
        if chunk.offset == 0 {
            transfer.anchor = chunk.anchor;
        }
        transfer.hasher.update(&chunk.bytes);
        transfer.state.extend_from_slice(&chunk.bytes);
        transfer.served_by.insert(from);
        transfer.last_progress = now;
        if (transfer.state.len() as u64) < transfer.info.size {
            return ChunkOutcome::Progress(transfer.fill_window());
        }
        let Some(transfer) = self.active.take() else { return ChunkOutcome::Ignored };
        if transfer.hasher.finalize() != transfer.info.digest {
            self.failed.entry(transfer.info.digest).or_default().extend(transfer.served_by);
            return ChunkOutcome::Corrupt;
        }
        ChunkOutcome::Complete(Received {
            info: transfer.info,
            state: transfer.state,
            anchor: transfer.anchor,
            sources: transfer.served_by,
        })
    }

    /// The install refused a snapshot whose bytes hashed right (its anchor was bad):
    /// its sources are not asked for it again.
    pub fn refused(&mut self, digest: bulwark_crypto::Digest, sources: &BTreeSet<ReplicaId>) {
        self.failed.entry(digest).or_default().extend(sources.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::snapshot_digest;
    use bulwark_crypto::Digest;

    fn info(height: u64, bytes: &[u8]) -> SnapshotInfo {
        SnapshotInfo {
            height: Height(height),
            block: Digest([height as u8; 32]),
            state_digest: Digest([7; 32]),
            size: bytes.len() as u64,
            digest: snapshot_digest(bytes),
        }
    }

    fn chunk(info: &SnapshotInfo, bytes: &[u8], offset: u64) -> SnapshotChunk {
        let end = (offset as usize + SNAPSHOT_CHUNK_BYTES).min(bytes.len());
        SnapshotChunk {
            height: info.height,
            digest: info.digest,
            offset,
            bytes: bytes[offset as usize..end].to_vec(),
            anchor: if offset == 0 { b"anchor".to_vec() } else { Vec::new() },
        }
    }

    /// Serves every fetch from `bytes` (or `lie` for peers in `liars`) until done.
    fn run(
        st: &mut StateTransfer,
        mut fetches: Vec<Fetch>,
        bytes: &[u8],
        liars: &[ReplicaId],
        now: Instant,
    ) -> Option<Received> {
        let lie: Vec<u8> = bytes.iter().map(|b| b ^ 1).collect();
        for _ in 0..10_000 {
            let fetch = fetches.first().copied()?;
            fetches.remove(0);
            let source = if liars.contains(&fetch.to) { &lie } else { bytes };
            let info = st.in_progress().expect("a transfer");
            match st.on_chunk(fetch.to, chunk(&info, source, fetch.request.offset), now) {
                ChunkOutcome::Ignored => {}
                ChunkOutcome::Progress(more) => fetches.extend(more),
                ChunkOutcome::Corrupt => fetches.extend(st.poll(now, Height(0))),
                ChunkOutcome::Complete(received) => return Some(received),
            }
        }
        None
    }

    #[test]
    fn a_snapshot_needs_f_plus_one_identical_offers_and_enough_lag() {
        let bytes = vec![3u8; 10];
        let mut st = StateTransfer::new(2, 100);
        let now = Instant::now();
        st.on_offer(ReplicaId(1), info(1000, &bytes));
        assert!(st.poll(now, Height(0)).is_empty(), "one offer vouches for nothing");
        st.on_offer(ReplicaId(2), info(1000, b"other bytes"));
        assert!(st.poll(now, Height(0)).is_empty(), "two different offers vouch for nothing");
        st.on_offer(ReplicaId(3), info(1000, &bytes));
        assert!(st.poll(now, Height(950)).is_empty(), "within the lag: catch up block by block");
        let fetches = st.poll(now, Height(10));
        assert_eq!(fetches.len(), 1);
        assert!([ReplicaId(1), ReplicaId(3)].contains(&fetches[0].to));
    }

    #[test]
    fn bytes_arrive_in_chunks_and_are_checked_against_the_digest() {
        let bytes: Vec<u8> = (0..(2 * SNAPSHOT_CHUNK_BYTES + 17)).map(|i| i as u8).collect();
        let mut st = StateTransfer::new(2, 0);
        let now = Instant::now();
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(50, &bytes));
        }
        let fetches = st.poll(now, Height(0));
        assert_eq!(fetches.len(), 3, "the whole snapshot fits in the window");
        let received = run(&mut st, fetches, &bytes, &[], now).expect("complete");
        assert_eq!(received.state, bytes);
        assert_eq!(received.anchor, b"anchor");
        assert!(st.in_progress().is_none());
    }

    #[test]
    fn a_lying_source_is_dropped_and_the_transfer_completes_from_an_honest_one() {
        let bytes: Vec<u8> = (0..(3 * SNAPSHOT_CHUNK_BYTES)).map(|i| (i * 7) as u8).collect();
        let mut st = StateTransfer::new(2, 0);
        let now = Instant::now();
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(50, &bytes));
        }
        let fetches = st.poll(now, Height(0));
        let liar = fetches[0].to;
        let received = run(&mut st, fetches, &bytes, &[liar], now).expect("complete");
        assert_eq!(received.state, bytes);
        assert!(!received.sources.contains(&liar));
    }

    #[test]
    fn a_stalled_source_is_replaced_and_stale_or_foreign_chunks_are_ignored() {
        let bytes = vec![9u8; SNAPSHOT_CHUNK_BYTES + 1];
        let mut st = StateTransfer::new(2, 0);
        let start = Instant::now();
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(50, &bytes));
        }
        let first = st.poll(start, Height(0));
        let info = st.in_progress().expect("started");
        let other = if first[0].to == ReplicaId(1) { ReplicaId(2) } else { ReplicaId(1) };
        assert!(matches!(st.on_chunk(other, chunk(&info, &bytes, 0), start), ChunkOutcome::Ignored));
        let mut wrong_offset = chunk(&info, &bytes, 0);
        wrong_offset.offset = 1;
        assert!(matches!(st.on_chunk(first[0].to, wrong_offset, start), ChunkOutcome::Ignored));
        assert!(st.poll(start + Duration::from_secs(1), Height(0)).is_empty());
        let again = st.poll(start + STALL_AFTER, Height(0));
        assert_eq!(again[0].to, other, "the next source after a stall");
        assert_eq!(again[0].request.offset, 0);
        assert!(st.poll(start + STALL_AFTER, Height(60)).is_empty(), "caught up meanwhile: abandoned");
        assert!(st.in_progress().is_none());
    }

    #[test]
    fn a_newer_vouched_snapshot_replaces_a_transfer_that_has_received_nothing() {
        let (old, new) = (vec![1u8; SNAPSHOT_CHUNK_BYTES + 5], vec![2u8; 40]);
        let mut st = StateTransfer::new(2, 0);
        let now = Instant::now();
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(400, &old));
        }
        let first = st.poll(now, Height(0));
        assert_eq!(st.in_progress().map(|i| i.height), Some(Height(400)));
        assert!(st.poll(now, Height(0)).is_empty(), "no newer offer: the transfer goes on");
        // Bytes arrived: a newer snapshot no longer interrupts it.
        let ChunkOutcome::Progress(_) = st.on_chunk(first[0].to, chunk(&info(400, &old), &old, 0), now)
        else {
            panic!("the first chunk is progress")
        };
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(800, &new));
        }
        assert!(st.poll(now, Height(0)).is_empty());
        assert_eq!(st.in_progress().map(|i| i.height), Some(Height(400)));
        // A fresh transfer of a stale snapshot is replaced at once.
        let mut st = StateTransfer::new(2, 0);
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(400, &old));
        }
        st.poll(now, Height(0));
        for peer in [1, 2] {
            st.on_offer(ReplicaId(peer), info(800, &new));
        }
        let fetches = st.poll(now, Height(0));
        assert_eq!(st.in_progress().map(|i| i.height), Some(Height(800)));
        assert_eq!(fetches.len(), 1);
        assert_eq!(fetches[0].request.height, Height(800));
    }

    #[test]
    fn a_transfer_that_never_completes_is_abandoned_for_a_while() {
        let bytes = vec![1u8; 100];
        let mut st = StateTransfer::new(1, 0);
        let start = Instant::now();
        st.on_offer(ReplicaId(1), info(50, &bytes));
        assert_eq!(st.poll(start, Height(0)).len(), 1);
        let mut now = start;
        while now < start + GIVE_UP_AFTER {
            now += STALL_AFTER;
            st.poll(now, Height(0));
        }
        assert!(st.in_progress().is_none(), "given up");
        assert!(st.poll(now + Duration::from_secs(1), Height(0)).is_empty(), "backing off");
        assert_eq!(st.poll(now + GIVE_UP_AFTER, Height(0)).len(), 1, "tried again after the back-off");
    }
}

//! The PBFT replica: normal case, checkpoints, state transfer and view changes, as one
//! sans-IO state machine.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bulwark_crypto::{Committee, Digest, KeyPair, QuorumSignatures, ReplicaId, Signed, codec};

use super::types::*;
use crate::hotstuff::TimeoutPolicy;
use crate::protocol::{
    Actions, CommittedBlock, Event, Evidence, EvidenceKind, Height, Input, LoadRequest, Outgoing, Payload,
    PayloadRequest, Protocol, Recipient, Round, Time,
};

/// Log digests kept to answer state-transfer requests (older ones are on disk but a
/// peer that far behind needs a snapshot, which PBFT does not transfer yet).
pub const LOG_INDEX_KEPT: usize = 8192;
/// Checkpoint messages kept per sender (the latest ones above the stable checkpoint).
const CHECKPOINTS_PER_SENDER: usize = 4;

#[derive(Debug)]
pub struct Config {
    pub id: ReplicaId,
    pub committee: Committee,
    pub key: KeyPair,
    pub timeouts: TimeoutPolicy,
    /// Most sequence numbers the primary has in flight (assigned, not yet committed).
    pub pipeline: u64,
}

/// What a replica restarts from: its last safety record, its stored batches and
/// committed entries, and what its application executed.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    pub safety: Option<SafetyState>,
    pub executed: Height,
    pub executed_state: Digest,
    /// The log digest after `executed` (the last executed block's digest).
    pub executed_log: Option<Digest>,
    pub records: Vec<Record>,
}

/// One sequence number in the window.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// The pre-prepare accepted in the current view.
    accepted: Option<SignedOrder>,
    /// The latest prepare and commit of each replica.
    prepares: BTreeMap<ReplicaId, Vote>,
    commits: BTreeMap<ReplicaId, Vote>,
    /// The highest-view prepared certificate.
    prepared: Option<PreparedCert>,
    commit_sent: Option<Round>,
    committed: Option<CommitCert>,
}

/// A PBFT replica.
pub struct Pbft {
    cfg: Config,
    view: Round,
    changing: bool,
    /// View changes since the last commit (the timeout backs off with it).
    attempts: u32,
    stable: CheckpointCert,
    slots: BTreeMap<Height, Slot>,
    payloads: HashMap<Digest, Payload>,
    /// The highest sequence number each kept payload was accepted or wanted at: a
    /// payload is kept until that sequence number is stable, even across a view change
    /// that clears the orders naming it (a new view may bring it back).
    payload_seqs: HashMap<Digest, Height>,
    next_seq: Height,
    /// The last sequence number handed to execution, and the log digest after it.
    delivered: Height,
    delivered_log: Digest,
    log_index: BTreeMap<Height, Digest>,
    own_checkpoints: BTreeMap<Height, CheckpointData>,
    checkpoints: BTreeMap<ReplicaId, VecDeque<Signed<CheckpointData>>>,
    /// The latest view change of each replica.
    view_changes: BTreeMap<ReplicaId, Signed<ViewChangeData>>,
    last_new_view: Option<Signed<NewViewData>>,
    /// The highest view each peer spoke in above ours: asked for their new view.
    view_hints: BTreeMap<ReplicaId, Round>,
    payload_pending: bool,
    /// The primary got an empty payload with batches in flight: it waits for a commit
    /// before it asks again.
    idle: bool,
    wanted_payloads: BTreeSet<Digest>,
    progress_deadline: Option<Time>,
    retry_deadline: Option<Time>,
    /// A state-transfer request is out until then.
    fetch_deadline: Option<Time>,
    /// While changing views: when our view change is sent again (messages before GST
    /// may be lost, and a view change nobody heard would stall us).
    resend_deadline: Option<Time>,
    fetch_turn: usize,
    /// Committed entries recovered from storage, not yet executed: delivered at start.
    recovered: Vec<CommittedEntry>,
    out: Actions<Message, Record>,
}

impl std::fmt::Debug for Pbft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pbft")
            .field("id", &self.cfg.id)
            .field("view", &self.view)
            .field("changing", &self.changing)
            .field("stable", &self.stable.seq())
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl Pbft {
    /// A fresh replica, or one restarted from `recovery`.
    pub fn recover(cfg: Config, recovery: Recovery) -> Pbft {
        let genesis = CheckpointCert::genesis(&cfg.committee);
        let mut pbft = Pbft {
            view: Round(0),
            changing: false,
            attempts: 0,
            stable: genesis.clone(),
            slots: BTreeMap::new(),
            payloads: HashMap::new(),
            payload_seqs: HashMap::new(),
            next_seq: Height(1),
            delivered: recovery.executed,
            delivered_log: recovery.executed_log.unwrap_or(genesis.data.log),
            log_index: BTreeMap::new(),
            own_checkpoints: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            last_new_view: None,
            view_hints: BTreeMap::new(),
            payload_pending: false,
            idle: false,
            wanted_payloads: BTreeSet::new(),
            progress_deadline: None,
            retry_deadline: None,
            fetch_deadline: None,
            resend_deadline: None,
            fetch_turn: 0,
            recovered: Vec::new(),
            out: Actions::default(),
            cfg,
        };
        pbft.log_index.insert(pbft.delivered, pbft.delivered_log);
        if let Some(safety) = recovery.safety {
            pbft.view = safety.view;
            pbft.changing = safety.changing;
            pbft.stable = safety.stable;
            pbft.next_seq = safety.next_seq;
            for order in safety.accepted {
                if order.order.view == pbft.view && !pbft.changing {
                    pbft.slots.entry(order.order.seq).or_default().accepted = Some(order);
                }
            }
            for cert in safety.prepared {
                let view = cert.order().view;
                let slot = pbft.slots.entry(cert.order().seq).or_default();
                if view == pbft.view {
                    slot.commit_sent = Some(view);
                }
                slot.prepared = Some(cert);
            }
        }
        let mut committed: BTreeMap<Height, CommittedEntry> = BTreeMap::new();
        for record in recovery.records {
            match record {
                Record::Batch(b) if b.order.seq > pbft.stable.seq() => {
                    pbft.keep_payload(b.order.seq, b.order.digest, b.payload);
                }
                Record::Committed(e) => {
                    if e.seq() <= recovery.executed {
                        if recovery.executed.0 - e.seq().0 < LOG_INDEX_KEPT as u64 {
                            pbft.log_index.insert(e.seq(), e.log_digest());
                        }
                    } else {
                        committed.insert(e.seq(), e);
                    }
                }
                _ => {}
            }
        }
        // Committed but not executed before the crash: delivered again, in order, as
        // long as they continue the executed log.
        let (mut expected, mut parent) = (pbft.delivered.next(), pbft.delivered_log);
        for (seq, entry) in committed {
            if seq != expected || entry.parent != parent {
                break;
            }
            (expected, parent) = (seq.next(), entry.log_digest());
            pbft.recovered.push(entry);
        }
        pbft
    }

    pub fn view(&self) -> Round {
        self.view
    }

    pub fn stable_checkpoint(&self) -> Height {
        self.stable.seq()
    }

    pub fn delivered(&self) -> Height {
        self.delivered
    }

    fn committee(&self) -> &Committee {
        &self.cfg.committee
    }

    fn primary_of(&self, view: Round) -> ReplicaId {
        primary(&self.cfg.committee, view)
    }

    fn is_primary(&self) -> bool {
        self.primary_of(self.view) == self.cfg.id
    }

    fn in_window(&self, seq: Height) -> bool {
        seq > self.stable.seq() && seq.0 <= self.stable.seq().0.saturating_add(WINDOW)
    }

    fn broadcast(&mut self, msg: Message) {
        self.out.send.push(Outgoing { to: Recipient::AllOthers, msg });
    }

    fn send_to(&mut self, to: ReplicaId, msg: Message) {
        self.out.send.push(Outgoing { to: Recipient::One(to), msg });
    }

    fn refuse(&mut self, from: ReplicaId, reason: &'static str) {
        self.out.events.push(Event::Refused { from, reason });
    }

    fn safety_state(&self) -> SafetyState {
        SafetyState {
            view: self.view,
            changing: self.changing,
            stable: self.stable.clone(),
            accepted: self.slots.values().filter_map(|s| s.accepted).collect(),
            prepared: self.slots.values().filter_map(|s| s.prepared.clone()).collect(),
            next_seq: self.next_seq,
        }
    }

    /// Queues the safety state to be made durable before this step's messages leave.
    fn persist_safety(&mut self) {
        let state = self.safety_state();
        self.out.persist.retain(|r| !matches!(r, Record::Safety(_)));
        self.out.persist.push(Record::Safety(state));
    }

    fn timeout_ms(&self) -> u64 {
        self.cfg.timeouts.duration(self.attempts)
    }

    // ---- normal case ----

    /// As the primary, asks the host for the next batch when the window and the
    /// pipeline have room.
    fn maybe_request_payload(&mut self) {
        if self.changing || !self.is_primary() || self.payload_pending || self.idle {
            return;
        }
        if self.delivered < self.stable.seq() || !self.in_window(self.next_seq) {
            return;
        }
        let in_flight = self.next_seq.0.saturating_sub(1).saturating_sub(self.delivered.0);
        if in_flight >= self.cfg.pipeline.max(1) {
            return;
        }
        // The host leaves out what the batches in flight order, so it must know them.
        let mut previous = Digest::ZERO;
        for seq in self.delivered.0 + 1..self.next_seq.0 {
            let Some(order) = self.slots.get(&Height(seq)).and_then(|s| s.accepted) else { return };
            if !self.payloads.contains_key(&order.order.digest) {
                return;
            }
            previous = batch_key(order.order.seq, &order.order.digest);
        }
        self.payload_pending = true;
        self.out.want_payload = Some(PayloadRequest { round: self.view, parent: previous });
    }

    fn on_payload(&mut self, view: Round, payload: Payload) {
        self.payload_pending = false;
        if view != self.view || self.changing || !self.is_primary() || !self.in_window(self.next_seq) {
            return;
        }
        if self.delivered < self.stable.seq() {
            return;
        }
        // A host that hands over too much gets an empty batch ordered instead: the
        // heartbeat goes on, and nothing the backups would refuse is sent.
        let payload = if payload.0.len() > MAX_PAYLOAD_BYTES { Payload::default() } else { payload };
        let seq = self.next_seq;
        let in_flight = seq.0.saturating_sub(1).saturating_sub(self.delivered.0);
        if payload.0.is_empty() && in_flight > 0 {
            // Nothing to order and the pipeline is moving: no empty batch needed.
            self.idle = true;
            return;
        }
        let order = Order { view: self.view, seq, digest: batch_digest(&payload) };
        let signed = SignedOrder::sign(order, &self.cfg.key, &self.cfg.committee);
        self.slots.entry(seq).or_default().accepted = Some(signed);
        self.store_batch(order, payload.clone());
        self.next_seq = seq.next();
        self.persist_safety();
        self.broadcast(Message::PrePrepare(PrePrepare { order: signed, payload }));
    }

    /// Keeps the payload of an accepted order, durably, linked to the batch before it
    /// so the host can see everything in flight.
    fn store_batch(&mut self, order: Order, payload: Payload) {
        let previous = self.previous_key(order.seq);
        self.keep_payload(order.seq, order.digest, payload.clone());
        self.out.persist.push(Record::Batch(BatchRecord { order, payload, previous }));
    }

    fn keep_payload(&mut self, seq: Height, digest: Digest, payload: Payload) {
        let at = self.payload_seqs.entry(digest).or_default();
        *at = (*at).max(seq);
        self.payloads.insert(digest, payload);
    }

    /// The batch key of the sequence number before `seq` if it is still in flight.
    fn previous_key(&self, seq: Height) -> Digest {
        let before = Height(seq.0.saturating_sub(1));
        if before <= self.delivered {
            return Digest::ZERO;
        }
        self.slots
            .get(&before)
            .and_then(|s| s.accepted)
            .map_or(Digest::ZERO, |o| batch_key(before, &o.order.digest))
    }

    fn on_pre_prepare(&mut self, now: Time, from: ReplicaId, pp: PrePrepare) {
        let order = pp.order.order;
        if self.behind_in_view(order.view) {
            return self.hint_view(now, order.view, from);
        }
        if order.view < self.view {
            return self.refuse(from, "pre-prepare from an earlier view");
        }
        if self.is_primary() {
            return self.refuse(from, "pre-prepare in a view we lead");
        }
        if !self.in_window(order.seq) {
            return self.refuse(from, "pre-prepare outside the window");
        }
        let slot = self.slots.entry(order.seq).or_default();
        if let Some(accepted) = slot.accepted {
            if accepted.order != order {
                let offender = primary(&self.cfg.committee, order.view);
                let evidence = Pbft::evidence(
                    EvidenceKind::ConflictingProposals,
                    offender,
                    order.view,
                    &accepted,
                    &pp.order,
                );
                self.out.evidence.push(evidence);
            }
            return;
        }
        slot.accepted = Some(pp.order);
        self.wanted_payloads.remove(&order.digest);
        self.store_batch(order, pp.payload);
        self.persist_safety();
        self.send_vote(Phase::Prepare, order);
        self.check_slot(now, order.seq);
    }

    fn evidence(
        kind: EvidenceKind,
        offender: ReplicaId,
        view: Round,
        first: &impl serde::Serialize,
        second: &impl serde::Serialize,
    ) -> Evidence {
        Evidence {
            offender,
            round: view,
            kind,
            first: codec::encode(first).unwrap_or_default(),
            second: codec::encode(second).unwrap_or_default(),
        }
    }

    fn send_vote(&mut self, phase: Phase, order: Order) {
        let vote = Vote::sign(phase, order, self.cfg.id, &self.cfg.key, &self.cfg.committee);
        let slot = self.slots.entry(order.seq).or_default();
        match phase {
            Phase::Prepare => {
                slot.prepares.insert(self.cfg.id, vote);
                self.broadcast(Message::Prepare(vote));
            }
            Phase::Commit => {
                slot.commits.insert(self.cfg.id, vote);
                self.broadcast(Message::Commit(vote));
            }
        }
    }

    fn on_vote(&mut self, now: Time, from: ReplicaId, phase: Phase, vote: Vote) {
        let order = vote.order;
        if self.behind_in_view(order.view) {
            self.hint_view(now, order.view, from);
        }
        if !self.in_window(order.seq) {
            return;
        }
        let slot = self.slots.entry(order.seq).or_default();
        let votes = match phase {
            Phase::Prepare => &mut slot.prepares,
            Phase::Commit => &mut slot.commits,
        };
        match votes.get(&vote.signer) {
            Some(known) if known.order.view == order.view && known.order.digest != order.digest => {
                let known = *known;
                let evidence =
                    Pbft::evidence(EvidenceKind::ConflictingVotes, vote.signer, order.view, &known, &vote);
                self.out.evidence.push(evidence);
                return;
            }
            Some(known) if known.order.view >= order.view => return,
            _ => {
                votes.insert(vote.signer, vote);
            }
        }
        self.check_slot(now, order.seq);
    }

    /// Moves a slot on: prepared (send a commit), committed (deliver).
    fn check_slot(&mut self, now: Time, seq: Height) {
        let quorum = self.committee().quorum();
        let primary = self.primary_of(self.view);
        let (view, changing) = (self.view, self.changing);
        let Some(slot) = self.slots.get_mut(&seq) else { return };
        let mut commit = None;
        if let Some(accepted) = slot.accepted
            && !changing
            && accepted.order.view == view
            && slot.commit_sent != Some(view)
        {
            let prepares: Vec<_> = slot
                .prepares
                .values()
                .filter(|v| v.order == accepted.order && v.signer != primary)
                .map(|v| (v.signer, v.signature))
                .collect();
            if prepares.len() + 1 >= quorum {
                slot.prepared =
                    Some(PreparedCert { pre_prepare: accepted, prepares: QuorumSignatures::new(prepares) });
                slot.commit_sent = Some(view);
                commit = Some(accepted.order);
            }
        }
        let mut newly_committed = false;
        if slot.committed.is_none() {
            let mut counts: BTreeMap<Order, Vec<_>> = BTreeMap::new();
            for v in slot.commits.values() {
                counts.entry(v.order).or_default().push((v.signer, v.signature));
            }
            if let Some((order, commits)) = counts.into_iter().find(|(_, c)| c.len() >= quorum) {
                slot.committed = Some(CommitCert { order, commits: QuorumSignatures::new(commits) });
                newly_committed = true;
            }
        }
        if let Some(order) = commit {
            self.persist_safety();
            self.send_vote(Phase::Commit, order);
            return self.check_slot(now, seq);
        }
        if newly_committed {
            self.out.events.push(Event::QuorumCertificate { round: view });
            self.note_progress(now);
            self.deliver(now);
        }
    }

    /// Hands committed entries to execution in sequence order, never with a gap.
    fn deliver(&mut self, now: Time) {
        loop {
            let next = self.delivered.next();
            if next <= self.stable.seq() {
                break; // behind a stable checkpoint: state transfer
            }
            let Some(cert) = self.slots.get(&next).and_then(|s| s.committed.clone()) else { break };
            let Some(payload) = self.payloads.get(&cert.order.digest).cloned() else {
                self.want_payload(now, next, cert.order.digest);
                break;
            };
            let entry = CommittedEntry { cert, payload, parent: self.delivered_log };
            self.out.persist.push(Record::Committed(entry.clone()));
            self.commit_entry(now, entry);
        }
        self.ensure_fetching(now);
    }

    fn commit_entry(&mut self, now: Time, entry: CommittedEntry) {
        let seq = entry.seq();
        let digest = entry.log_digest();
        self.out.commit.push(CommittedBlock {
            height: seq,
            round: entry.cert.order.view,
            digest,
            proposer: self.primary_of(entry.cert.order.view),
            payload: entry.payload,
        });
        self.delivered = seq;
        self.delivered_log = digest;
        self.log_index.insert(seq, digest);
        while self.log_index.len() > LOG_INDEX_KEPT {
            self.log_index.pop_first();
        }
        self.attempts = 0;
        self.idle = false;
        self.note_progress(now);
    }

    fn note_progress(&mut self, now: Time) {
        if !self.changing {
            self.progress_deadline = Some(now.plus_millis(self.timeout_ms()));
        }
    }

    fn want_payload(&mut self, now: Time, seq: Height, digest: Digest) {
        let at = self.payload_seqs.entry(digest).or_default();
        *at = (*at).max(seq);
        if self.wanted_payloads.insert(digest) {
            self.broadcast(Message::FetchPayload(digest));
            self.arm_retry(now);
        }
    }

    fn arm_retry(&mut self, now: Time) {
        if self.retry_deadline.is_none() {
            self.retry_deadline = Some(now.plus_millis(self.cfg.timeouts.base_ms));
        }
    }

    // ---- checkpoints and state transfer ----

    fn on_executed(&mut self, now: Time, height: Height, state: Digest) {
        if height == Height(0) || !height.0.is_multiple_of(CHECKPOINT_INTERVAL) {
            return;
        }
        let Some(log) = self.log_index.get(&height).copied() else { return };
        let data = CheckpointData { seq: height, log, state };
        self.own_checkpoints.insert(height, data);
        while self.own_checkpoints.len() > CHECKPOINTS_PER_SENDER {
            self.own_checkpoints.pop_first();
        }
        if self.stable.seq() == height && self.stable.data != data {
            self.mismatch(height, data.state, self.stable.data.state);
        }
        let differing: Vec<Event> = self
            .checkpoints
            .values()
            .flatten()
            .filter(|c| c.value.seq == height && c.value.state != state)
            .map(|c| Event::StateDigestMismatch {
                height,
                ours: state,
                claimed: c.value.state,
                proposer: c.signer,
            })
            .collect();
        self.out.events.extend(differing);
        if height <= self.stable.seq() {
            return;
        }
        let signed = Signed::sign(data, self.cfg.id, &self.cfg.key, self.committee().chain_id()).into_inner();
        self.broadcast(Message::Checkpoint(signed.clone()));
        self.store_checkpoint(now, signed);
    }

    fn mismatch(&mut self, height: Height, ours: Digest, claimed: Digest) {
        let proposer = self.stable.signatures.signers().next().unwrap_or(self.cfg.id);
        self.out.events.push(Event::StateDigestMismatch { height, ours, claimed, proposer });
    }

    fn store_checkpoint(&mut self, now: Time, checkpoint: Signed<CheckpointData>) {
        let data = checkpoint.value;
        if let Some(ours) = self.own_checkpoints.get(&data.seq)
            && checkpoint.signer != self.cfg.id
            && ours.state != data.state
        {
            // A replica executed the same log to another state (or lies about it).
            let event = Event::StateDigestMismatch {
                height: data.seq,
                ours: ours.state,
                claimed: data.state,
                proposer: checkpoint.signer,
            };
            self.out.events.push(event);
        }
        if data.seq <= self.stable.seq() {
            return;
        }
        let kept = self.checkpoints.entry(checkpoint.signer).or_default();
        if kept.iter().any(|c| c.value == data) {
            return;
        }
        kept.push_back(checkpoint);
        if kept.len() > CHECKPOINTS_PER_SENDER {
            kept.pop_front();
        }
        let signatures: Vec<_> = self
            .checkpoints
            .values()
            .flatten()
            .filter(|c| c.value == data)
            .map(|c| (c.signer, c.signature))
            .collect();
        if signatures.len() >= self.committee().quorum() {
            let cert = CheckpointCert { data, signatures: QuorumSignatures::new(signatures) };
            self.advance_stable(now, cert);
        }
    }

    /// A new stable checkpoint: collect garbage below it, and fetch what we lack.
    fn advance_stable(&mut self, now: Time, cert: CheckpointCert) {
        let seq = cert.seq();
        if seq <= self.stable.seq() {
            return;
        }
        if let Some(ours) = self.own_checkpoints.get(&seq)
            && ours.state != cert.data.state
        {
            let ours = ours.state;
            self.mismatch(seq, ours, cert.data.state);
        }
        self.stable = cert;
        self.slots.retain(|s, _| *s > seq);
        for kept in self.checkpoints.values_mut() {
            kept.retain(|c| c.value.seq > seq);
        }
        self.payload_seqs.retain(|_, at| *at > seq);
        let live = &self.payload_seqs;
        self.payloads.retain(|d, _| live.contains_key(d));
        self.wanted_payloads.retain(|d| live.contains_key(d));
        self.next_seq = self.next_seq.max(seq.next());
        self.persist_safety();
        self.note_progress(now);
        self.deliver(now);
    }

    /// Behind the stable checkpoint: ask one of its signers for the entries after ours.
    fn ensure_fetching(&mut self, now: Time) {
        if self.delivered >= self.stable.seq() {
            return;
        }
        if self.fetch_deadline.is_some_and(|at| at > now) {
            return; // a request is out
        }
        let signers: Vec<ReplicaId> =
            self.stable.signatures.signers().filter(|s| *s != self.cfg.id).collect();
        if signers.is_empty() {
            return;
        }
        let peer = signers[self.fetch_turn % signers.len()];
        self.fetch_turn += 1;
        self.send_to(peer, Message::FetchLog { after: self.delivered, max: MAX_FETCH_ENTRIES as u32 });
        self.fetch_deadline = Some(now.plus_millis(self.cfg.timeouts.base_ms));
    }

    fn on_fetch_log(&mut self, from: ReplicaId, after: Height, max: u32) {
        if after >= self.delivered {
            return;
        }
        let top = Height(after.0.saturating_add(u64::from(max)).min(self.delivered.0));
        let Some(key) = self.log_index.get(&top).copied() else {
            return self.refuse(from, "state transfer from before the kept log");
        };
        let max = (top.0 - after.0) as u32;
        self.out.load.push(LoadRequest { requester: from, key, max });
    }

    fn on_loaded(&mut self, request: LoadRequest, records: Vec<Record>) {
        let mut newest_first: Vec<CommittedEntry> = records
            .into_iter()
            .filter_map(|r| match r {
                Record::Committed(e) => Some(e),
                _ => None,
            })
            .take(MAX_FETCH_ENTRIES)
            .collect();
        newest_first.reverse();
        // The oldest first, within the byte budget (the first one always goes).
        let mut bytes = 0;
        let entries: Vec<CommittedEntry> = newest_first
            .into_iter()
            .enumerate()
            .take_while(|(i, e)| {
                bytes += if *i == 0 { 0 } else { e.payload.0.len() };
                bytes <= MAX_FETCH_BYTES
            })
            .map(|(_, e)| e)
            .collect();
        if !entries.is_empty() {
            self.send_to(request.requester, Message::LogEntries(entries));
        }
    }

    fn on_log_entries(&mut self, now: Time, entries: Vec<CommittedEntry>) {
        let mut progressed = false;
        for entry in entries {
            if entry.seq() != self.delivered.next() {
                continue;
            }
            if entry.parent != self.delivered_log {
                break;
            }
            self.out.persist.push(Record::Committed(entry.clone()));
            self.commit_entry(now, entry);
            progressed = true;
        }
        if progressed {
            self.fetch_deadline = None;
            self.deliver(now);
        }
    }

    // ---- view changes ----

    /// `from` spoke in a view above ours: ask it for that view's new-view message
    /// (once per view it reaches, and again on each retry while we lag).
    fn hint_view(&mut self, now: Time, view: Round, from: ReplicaId) {
        if self.view_hints.get(&from).is_none_or(|v| *v < view) {
            self.view_hints.insert(from, view);
            self.send_to(from, Message::FetchView(self.view));
            self.arm_retry(now);
        }
    }

    fn behind_in_view(&self, view: Round) -> bool {
        view > self.view || (view == self.view && self.changing)
    }

    fn start_view_change(&mut self, now: Time, view: Round) {
        if view < self.view || (view == self.view && self.changing) {
            return;
        }
        self.view = view;
        self.changing = true;
        self.attempts = self.attempts.saturating_add(1);
        self.payload_pending = false;
        self.idle = false;
        for slot in self.slots.values_mut() {
            slot.accepted = None;
        }
        self.persist_safety();
        self.out.events.push(Event::EnteredRound {
            round: view,
            leader: self.primary_of(view),
            via_timeout: true,
        });
        self.broadcast_view_change(now);
    }

    /// Sends our view change for the view we are changing to (again after a restart:
    /// the same one, rebuilt from the persisted state).
    fn broadcast_view_change(&mut self, now: Time) {
        let data = ViewChangeData {
            view: self.view,
            stable: self.stable.clone(),
            prepared: self.slots.values().filter_map(|s| s.prepared.clone()).collect(),
        };
        let vc = Signed::sign(data, self.cfg.id, &self.cfg.key, self.committee().chain_id()).into_inner();
        self.broadcast(Message::ViewChange(vc.clone()));
        self.view_changes.insert(self.cfg.id, vc);
        self.progress_deadline = None;
        self.resend_deadline = Some(now.plus_millis(self.cfg.timeouts.base_ms));
        self.arm_view_change_timer(now);
        self.maybe_new_view(now);
    }

    /// The timer of a view change starts only once 2f+1 replicas want the view or a
    /// later one (as in Castro–Liskov): a replica never moves past a view that a quorum has not reached,
    /// so honest replicas cannot drift apart one timeout at a time.
    fn arm_view_change_timer(&mut self, now: Time) {
        if !self.changing || self.progress_deadline.is_some() {
            return;
        }
        // A replica that asks for a later view has given up on this one too.
        let view = self.view;
        let wanting = self.view_changes.values().filter(|vc| vc.value.view >= view).count();
        if wanting >= self.committee().quorum() {
            self.progress_deadline = Some(now.plus_millis(self.timeout_ms()));
        }
    }

    fn on_view_change(&mut self, now: Time, vc: Signed<ViewChangeData>) {
        let view = vc.value.view;
        if view == self.view
            && !self.changing
            && let Some(nv) = self.last_new_view.as_ref().filter(|nv| nv.value.view == view)
        {
            // It missed the new view we are in: send it again.
            let nv = nv.clone();
            return self.send_to(vc.signer, Message::NewView(nv));
        }
        if view < self.view || (view == self.view && !self.changing) {
            return;
        }
        match self.view_changes.get(&vc.signer) {
            Some(known) if known.value.view >= view => return,
            _ => {
                self.view_changes.insert(vc.signer, vc);
            }
        }
        // f+1 replicas want a later view: at least one is honest, so join the lowest.
        let mut later: Vec<Round> = self
            .view_changes
            .iter()
            .filter(|(id, vc)| **id != self.cfg.id && vc.value.view > self.view)
            .map(|(_, vc)| vc.value.view)
            .collect();
        if later.len() > self.committee().max_faulty() {
            later.sort();
            let target = later[later.len() - self.committee().max_faulty() - 1];
            self.start_view_change(now, target);
        }
        self.arm_view_change_timer(now);
        self.maybe_new_view(now);
    }

    fn maybe_new_view(&mut self, now: Time) {
        if !self.changing || !self.is_primary() {
            return;
        }
        let view = self.view;
        let mut view_changes: Vec<_> =
            self.view_changes.values().filter(|vc| vc.value.view == view).cloned().collect();
        let quorum = self.committee().quorum();
        if view_changes.len() < quorum {
            return;
        }
        // Any quorum is safe; exactly one keeps the message bounded, and the ones with
        // the highest stable checkpoints carry the fewest prepared certificates.
        view_changes.sort_by_key(|vc| std::cmp::Reverse(vc.value.stable.seq()));
        view_changes.truncate(quorum);
        let Some(plan) = plan_new_view(&view_changes) else { return };
        let pre_prepares = plan
            .orders
            .iter()
            .map(|(seq, digest)| {
                SignedOrder::sign(
                    Order { view, seq: *seq, digest: *digest },
                    &self.cfg.key,
                    &self.cfg.committee,
                )
            })
            .collect();
        let data = NewViewData { view, view_changes, pre_prepares };
        let nv = Signed::sign(data, self.cfg.id, &self.cfg.key, self.committee().chain_id()).into_inner();
        self.enter_view(now, nv.clone());
        self.broadcast(Message::NewView(nv));
    }

    fn on_new_view(&mut self, now: Time, nv: Signed<NewViewData>) {
        let view = nv.value.view;
        if view < self.view || (view == self.view && !self.changing) {
            return;
        }
        self.enter_view(now, nv);
    }

    /// Starts view `nv.view` from a verified new-view message (ours or the primary's).
    fn enter_view(&mut self, now: Time, nv: Signed<NewViewData>) {
        let view = nv.value.view;
        let Some(plan) = plan_new_view(&nv.value.view_changes) else { return };
        self.view = view;
        self.changing = false;
        self.resend_deadline = None;
        self.payload_pending = false;
        self.idle = false;
        for slot in self.slots.values_mut() {
            slot.accepted = None;
        }
        if plan.stable.seq() > self.stable.seq() {
            self.advance_stable(now, plan.stable.clone());
        }
        let high = plan.orders.last().map_or(plan.stable.seq(), |(seq, _)| *seq);
        self.next_seq = high.max(self.stable.seq()).next();
        let primary = self.is_primary();
        let mut prepares = Vec::new();
        for signed in &nv.value.pre_prepares {
            let order = signed.order;
            if !self.in_window(order.seq) {
                continue;
            }
            self.slots.entry(order.seq).or_default().accepted = Some(*signed);
            if !primary {
                prepares.push(order);
            }
        }
        self.view_changes.retain(|_, vc| vc.value.view > view);
        self.last_new_view = Some(nv);
        self.persist_safety();
        for order in &prepares {
            self.send_vote(Phase::Prepare, *order);
        }
        self.progress_deadline = Some(now.plus_millis(self.timeout_ms()));
        self.out.events.push(Event::EnteredRound {
            round: view,
            leader: self.primary_of(view),
            via_timeout: false,
        });
        let seqs: Vec<Height> = self.slots.keys().copied().collect();
        for seq in seqs {
            if let Some(order) = self.slots.get(&seq).and_then(|s| s.accepted).map(|o| o.order) {
                if order.digest == null_digest() {
                    self.store_batch(order, Payload::default());
                } else if let Some(payload) = self.payloads.get(&order.digest).cloned() {
                    self.store_batch(order, payload);
                } else {
                    self.want_payload(now, order.seq, order.digest);
                }
            }
            self.check_slot(now, seq);
        }
        self.deliver(now);
    }

    fn on_timeout(&mut self, now: Time) {
        if self.resend_deadline.is_some_and(|at| at <= now) {
            self.resend_deadline = Some(now.plus_millis(self.cfg.timeouts.base_ms));
            if let Some(vc) = self.view_changes.get(&self.cfg.id).filter(|vc| vc.value.view == self.view) {
                let vc = vc.clone();
                self.broadcast(Message::ViewChange(vc));
            }
        }
        if self.progress_deadline.is_some_and(|at| at <= now) {
            self.progress_deadline = None;
            self.start_view_change(now, self.view.next());
        }
        if self.retry_deadline.is_some_and(|at| at <= now) {
            self.retry_deadline = None;
            let ahead: Vec<ReplicaId> =
                self.view_hints.iter().filter(|(_, v)| self.behind_in_view(**v)).map(|(id, _)| *id).collect();
            for peer in &ahead {
                self.send_to(*peer, Message::FetchView(self.view));
            }
            if !ahead.is_empty() {
                self.arm_retry(now);
            }
            if !self.wanted_payloads.is_empty() {
                let wanted: Vec<Digest> = self.wanted_payloads.iter().copied().collect();
                for digest in wanted {
                    self.broadcast(Message::FetchPayload(digest));
                }
                self.arm_retry(now);
            }
        }
        if self.fetch_deadline.is_some_and(|at| at <= now) {
            self.fetch_deadline = None;
            self.ensure_fetching(now);
        }
    }

    fn on_start(&mut self, now: Time) {
        for entry in std::mem::take(&mut self.recovered) {
            self.commit_entry(now, entry);
        }
        let (round, leader) = (self.view, self.primary_of(self.view));
        self.out.events.push(Event::EnteredRound { round, leader, via_timeout: false });
        self.progress_deadline = Some(now.plus_millis(self.timeout_ms()));
        if self.changing {
            self.broadcast_view_change(now);
        }
    }

    fn on_message(&mut self, now: Time, from: ReplicaId, msg: Message) {
        match msg {
            Message::PrePrepare(pp) => self.on_pre_prepare(now, from, pp),
            Message::Prepare(v) => self.on_vote(now, from, Phase::Prepare, v),
            Message::Commit(v) => self.on_vote(now, from, Phase::Commit, v),
            Message::Checkpoint(c) => self.store_checkpoint(now, c),
            Message::ViewChange(vc) => self.on_view_change(now, vc),
            Message::NewView(nv) => self.on_new_view(now, nv),
            Message::FetchLog { after, max } => self.on_fetch_log(from, after, max),
            Message::LogEntries(entries) => self.on_log_entries(now, entries),
            Message::FetchPayload(digest) => {
                if let Some(payload) = self.payloads.get(&digest) {
                    let bytes = payload.0.clone();
                    self.send_to(from, Message::PayloadReply(bytes));
                }
            }
            Message::PayloadReply(bytes) => {
                let payload = Payload(bytes);
                let digest = batch_digest(&payload);
                if self.wanted_payloads.remove(&digest) {
                    let accepted =
                        self.slots.values().filter_map(|s| s.accepted).find(|o| o.order.digest == digest);
                    match accepted {
                        Some(order) => self.store_batch(order.order, payload),
                        None => {
                            let seq = self.payload_seqs.get(&digest).copied().unwrap_or_default();
                            self.keep_payload(seq, digest, payload);
                        }
                    }
                    self.deliver(now);
                }
            }
            Message::FetchView(view) => {
                if let Some(nv) = &self.last_new_view
                    && nv.value.view >= view
                {
                    let nv = nv.clone();
                    self.send_to(from, Message::NewView(nv));
                }
            }
        }
    }
}

impl Protocol for Pbft {
    type Message = Message;
    type Record = Record;

    fn handle(&mut self, now: Time, input: Input<Message, Record>) -> Actions<Message, Record> {
        match input {
            Input::Start => self.on_start(now),
            Input::Message { from, msg } => self.on_message(now, from, msg.into_inner()),
            Input::Timeout => self.on_timeout(now),
            Input::Payload { round, payload } => self.on_payload(round, payload),
            Input::Executed { height, state_digest } => self.on_executed(now, height, state_digest),
            Input::Loaded { request, records } => self.on_loaded(request, records),
        }
        self.maybe_request_payload();
        std::mem::take(&mut self.out)
    }

    fn next_deadline(&self) -> Option<Time> {
        [self.progress_deadline, self.retry_deadline, self.fetch_deadline, self.resend_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    fn id(&self) -> ReplicaId {
        self.cfg.id
    }
}

//! The HotStuff core: chained HotStuff with the two-chain commit rule and timeout
//! certificates (Jolteon / DiemBFT v4). A plain state machine stepped by
//! [`Protocol::handle`]; every effect leaves as an [`Actions`] entry.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_crypto::{Committee, Digest, KeyPair, ReplicaId, Signed, codec};

use super::aggregator::{ROUND_WINDOW, TimeoutAggregator, TimeoutOutcome, VoteAggregator, VoteOutcome};
use super::block_tree::{BlockTree, InsertError};
use super::election::LeaderReputation;
use super::pacemaker::{LeaderElection, Pacemaker, RoundTimer, TimeoutPolicy};
use super::safety::SafetyRules;
use super::types::{
    Block, ExecutionClaim, MAX_PAYLOAD_BYTES, MAX_SYNC_BLOCKS, Message, Proposal, QuorumCert, Record,
    SafetyState, SyncRequest, SyncResponse, TimeoutCert, TimeoutData, TimeoutMsg, VoteData,
};
use crate::protocol::{
    Actions, CommittedBlock, Event, Evidence, EvidenceKind, Height, Input, LoadRequest, Outgoing, Payload,
    PayloadRequest, Protocol, Recipient, Round, Time,
};

/// State digests of executed heights kept to check proposers' claims.
const EXECUTED_RETAINED: usize = 1024;
/// Blocks waiting for a missing ancestor, at most: proposals, and twice as many for
/// blocks that came in sync responses (room to walk back to a gap behind a full
/// buffer of proposals).
const MAX_ORPHANS: usize = 1024;
/// Outstanding catch-up requests, at most.
const MAX_REQUESTS: usize = 64;
/// A catch-up request unanswered for this long is sent to the next peer when the
/// block is needed again (besides on each local timeout, which may never come while
/// rounds keep succeeding).
const SYNC_RETRY_MS: u64 = 500;

/// How a replica runs HotStuff.
#[derive(Debug)]
pub struct Config {
    pub id: ReplicaId,
    pub committee: Committee,
    pub key: KeyPair,
    pub timeouts: TimeoutPolicy,
    /// Blocks asked for per catch-up request (at most 64).
    pub sync_batch: u32,
}

/// What a restarted replica gets back from its storage.
#[derive(Debug, Default)]
pub struct Recovery {
    pub safety: Option<SafetyState>,
    /// The last block the host executed (the new root); `None` means genesis.
    pub root: Option<Block>,
    /// The state digest after executing `root`.
    pub executed: ExecutionClaim,
    /// Stored blocks; those that do not extend `root` are ignored.
    pub blocks: Vec<Block>,
    /// The committed chain ending at `root`, oldest first: the last
    /// [`LeaderReputation::history_wanted`] blocks the store has (fewer after a
    /// snapshot install). Seeds the leader election.
    pub committed: Vec<Block>,
}

pub struct HotStuff {
    cfg: Config,
    leaders: Box<dyn LeaderElection>,
    tree: BlockTree,
    safety: SafetyRules,
    pacemaker: Pacemaker,
    /// Leaders this replica saw let a round end in a timeout certificate (see
    /// `process_tc`), until a block of one of their rounds is certified. Rounds they
    /// lead, or whose votes go to them, run on a shortened timer: a crashed leader then
    /// costs a fraction of a timeout per rotation instead of two whole ones. Local and
    /// timing-only (never safety).
    suspects: BTreeSet<ReplicaId>,
    /// The last round this replica voted in (since it started).
    voted_round: Round,
    votes: VoteAggregator,
    timeouts: TimeoutAggregator,
    /// Our timeout for the current round, re-sent while the round lasts.
    own_timeout: Option<TimeoutMsg>,
    /// State digests after executed heights (a bounded window).
    executed: BTreeMap<Height, Digest>,
    last_executed: ExecutionClaim,
    /// Claims about heights we have not executed yet: height -> (claimed, proposer).
    pending_claims: BTreeMap<Height, Vec<(Digest, ReplicaId)>>,
    /// Blocks whose parent is missing, by that parent's digest.
    orphans: BTreeMap<Digest, Vec<Block>>,
    /// The parent of each block held in `orphans`, by the block's digest. A held block
    /// is not missing: what its chain misses is the parent of its oldest held ancestor.
    orphan_parents: BTreeMap<Digest, Digest>,
    /// Blocks asked for and neither in the tree nor held: digest -> (peer asked last,
    /// when).
    requested: BTreeMap<Digest, (ReplicaId, Time)>,
    /// The proposal of the current round waiting for its ancestors before we vote.
    pending_vote: Option<(Digest, Option<TimeoutCert>)>,
    /// We lead this round but lack the block our high QC certifies: ask the host for
    /// a payload again once it arrives (the host chooses it against that chain).
    proposal_waits_for_parent: Option<Round>,
    /// First proposal seen per (round, author), for equivocation evidence.
    seen_proposals: BTreeMap<(Round, ReplicaId), Proposal>,
    payload_asked: Option<Round>,
    now: Time,
    out: Actions<Message, Record>,
}

impl std::fmt::Debug for HotStuff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotStuff")
            .field("id", &self.cfg.id)
            .field("round", &self.pacemaker.round())
            .field("root_height", &self.tree.root().height)
            .finish()
    }
}

impl HotStuff {
    /// A replica starting from genesis.
    pub fn new(cfg: Config) -> HotStuff {
        HotStuff::recover(cfg, Recovery::default())
    }

    /// A replica rebuilt from what it persisted and what the host executed.
    pub fn recover(cfg: Config, recovery: Recovery) -> HotStuff {
        let from_genesis = recovery.root.as_ref().is_none_or(|root| root.height == Height(0));
        let leaders = Box::new(LeaderReputation::new(&cfg.committee, from_genesis));
        HotStuff::with_leader_election(cfg, recovery, leaders)
    }

    pub fn with_leader_election(
        cfg: Config,
        recovery: Recovery,
        mut leaders: Box<dyn LeaderElection>,
    ) -> HotStuff {
        for block in &recovery.committed {
            leaders.committed(block);
        }
        let genesis = Block::genesis(&cfg.committee);
        let root = recovery.root.unwrap_or(genesis);
        let safety = recovery.safety.unwrap_or_else(|| SafetyState {
            highest_vote_round: Round(0),
            locked_round: Round(0),
            last_proposed_round: Round(0),
            high_qc: QuorumCert::genesis(&cfg.committee),
            last_tc: None,
        });
        let mut tree = BlockTree::new(root);
        let mut blocks = recovery.blocks;
        blocks.sort_by_key(|b| b.height);
        for block in blocks {
            let digest = block.digest();
            let _ = tree.insert(block, digest);
        }
        let mut executed = BTreeMap::new();
        executed.insert(recovery.executed.height, recovery.executed.state_digest);
        let policy = cfg.timeouts;
        HotStuff {
            cfg,
            leaders,
            tree,
            safety: SafetyRules::new(safety),
            pacemaker: Pacemaker::new(policy),
            suspects: BTreeSet::new(),
            voted_round: Round(0),
            votes: VoteAggregator::default(),
            timeouts: TimeoutAggregator::default(),
            own_timeout: None,
            executed,
            last_executed: recovery.executed,
            pending_claims: BTreeMap::new(),
            orphans: BTreeMap::new(),
            orphan_parents: BTreeMap::new(),
            requested: BTreeMap::new(),
            pending_vote: None,
            proposal_waits_for_parent: None,
            seen_proposals: BTreeMap::new(),
            payload_asked: None,
            now: Time(0),
            out: Actions::default(),
        }
    }

    pub fn round(&self) -> Round {
        self.pacemaker.round()
    }

    pub fn committed_height(&self) -> Height {
        self.tree.root().height
    }

    pub fn high_qc(&self) -> &QuorumCert {
        self.safety.high_qc()
    }

    pub fn leader(&self, round: Round) -> ReplicaId {
        self.leaders.leader(round)
    }

    /// Whether `leader` is suspected of having crashed (its rounds and the rounds
    /// before them run on a shortened timer).
    pub fn is_suspected(&self, leader: ReplicaId) -> bool {
        self.suspects.contains(&leader)
    }

    pub fn committee(&self) -> &Committee {
        &self.cfg.committee
    }

    // ----- persistence and output -------------------------------------------------

    fn persist_safety(&mut self) {
        self.out.persist.push(Record::Safety(self.safety.state().clone()));
    }

    fn send(&mut self, to: Recipient, msg: Message) {
        self.out.send.push(Outgoing { to, msg });
    }

    fn refuse(&mut self, from: ReplicaId, reason: &'static str) {
        self.out.events.push(Event::Refused { from, reason });
    }

    // ----- rounds -------------------------------------------------------------------

    fn advance_round(&mut self, round: Round, via_timeout: bool, skip: bool) {
        let timer = if skip {
            RoundTimer::Skipped
        } else if self.suspects.contains(&self.leader(round))
            || self.suspects.contains(&self.leader(round.next()))
        {
            RoundTimer::Shortened
        } else {
            RoundTimer::Full
        };
        if !self.pacemaker.advance(round, self.now, via_timeout, timer) {
            return;
        }
        self.own_timeout = None;
        self.pending_vote = None;
        self.proposal_waits_for_parent = None;
        let keep_from = Round(round.0.saturating_sub(1));
        self.votes.prune_below(keep_from);
        self.timeouts.prune_below(keep_from);
        self.seen_proposals =
            self.seen_proposals.split_off(&(Round(round.0.saturating_sub(ROUND_WINDOW)), ReplicaId(0)));
        let leader = self.leader(round);
        self.out.events.push(Event::EnteredRound { round, leader, via_timeout });
        if leader == self.cfg.id
            && self.safety.check_propose(round).is_ok()
            && self.payload_asked != Some(round)
        {
            self.payload_asked = Some(round);
            self.out.want_payload = Some(PayloadRequest { round, parent: self.safety.high_qc().block() });
        }
    }

    /// A verified QC: keep it if highest, commit what it completes, enter the next round.
    fn process_qc(&mut self, qc: &QuorumCert, from: ReplicaId) {
        self.safety.observe_qc(qc);
        // Its round's leader got a block certified: no longer suspected.
        let leader = self.leader(qc.round());
        self.suspects.remove(&leader);
        if qc.vote.height > self.tree.root().height && !self.tree.contains(&qc.block()) {
            self.request_block(qc.block(), from);
        }
        self.try_commit_via(qc);
        if qc.round() >= self.round() {
            self.advance_round(qc.round().next(), false, false);
        }
    }

    fn process_tc(&mut self, tc: &TimeoutCert) {
        self.safety.observe_tc(tc);
        if tc.round >= self.round() {
            // The round ended without a certified block. If we voted in it, its leader
            // proposed and the next leader, who had our vote for a whole timeout, did not
            // certify it: that one may have crashed, and waiting out its round again
            // would only double the stall, so its round is skipped after a short grace.
            // Otherwise the round's own leader may have crashed.
            let voted = self.voted_round == tc.round;
            let culprit = if voted { self.leader(tc.round.next()) } else { self.leader(tc.round) };
            let skip = voted && culprit != self.cfg.id;
            if culprit != self.cfg.id {
                self.suspects.insert(culprit);
            }
            self.advance_round(tc.round.next(), true, skip);
        }
    }

    /// Two-chain commit rule: a block is committed when its child in the next round is
    /// certified. `qc` certifies the child.
    fn try_commit_via(&mut self, qc: &QuorumCert) {
        if cfg!(feature = "unsafe-one-chain-commit") {
            // Deliberately broken (test-only): commit a block as soon as it is certified.
            if qc.vote.height > self.tree.root().height
                && self.tree.extends(&qc.block(), &self.tree.root_digest())
            {
                let certified = qc.block();
                self.commit_chain(&certified);
            }
            return;
        }
        let Some(child) = self.tree.get(&qc.block()) else { return };
        let parent_digest = child.parent;
        let child_round = child.round;
        let Some(parent) = self.tree.get(&parent_digest) else { return };
        if parent.round.next() != child_round || parent.height <= self.tree.root().height {
            return;
        }
        if !self.tree.extends(&parent_digest, &self.tree.root_digest()) {
            return;
        }
        self.commit_chain(&parent_digest);
    }

    /// Commits `digest` and its uncommitted ancestors, oldest first.
    fn commit_chain(&mut self, digest: &Digest) {
        for block in self.tree.commit(digest) {
            self.leaders.committed(&block);
            let digest = block.digest();
            self.out.commit.push(CommittedBlock {
                height: block.height,
                round: block.round,
                digest,
                proposer: block.author,
                payload: block.payload,
            });
        }
        self.prune_orphans();
    }

    // ----- proposals --------------------------------------------------------------------

    fn on_payload(&mut self, round: Round, payload: Payload) {
        if round != self.round()
            || self.leader(round) != self.cfg.id
            || self.safety.check_propose(round).is_err()
        {
            return;
        }
        let payload = if payload.0.len() > MAX_PAYLOAD_BYTES {
            // A host bug must not cost the round: propose an empty block instead.
            self.out.events.push(Event::Refused { from: self.cfg.id, reason: "payload too large" });
            Payload::default()
        } else {
            payload
        };
        let parent = self.safety.high_qc().block();
        if !self.tree.contains(&parent) {
            // The payload was chosen without that chain: ask again once it arrives.
            self.proposal_waits_for_parent = Some(round);
            let from = self.safety.high_qc().signatures.signers().next().unwrap_or(self.cfg.id);
            self.request_block(parent, from);
            return;
        }
        self.propose(round, payload);
    }

    fn propose(&mut self, round: Round, payload: Payload) {
        let high_qc = self.safety.high_qc().clone();
        let last_round_tc = match self.safety.last_tc() {
            Some(tc) if high_qc.round().next() != round && tc.round.next() == round => Some(tc.clone()),
            _ if high_qc.round().next() == round => None,
            _ => return, // no certificate justifies proposing in this round
        };
        let block = Block {
            round,
            height: high_qc.vote.height.next(),
            parent: high_qc.block(),
            justify: high_qc,
            author: self.cfg.id,
            executed: self.last_executed,
            payload,
        };
        self.safety.record_propose(round);
        self.persist_safety();
        let proposal = Proposal::new(block, &self.cfg.key, &self.cfg.committee, last_round_tc);
        self.send(Recipient::AllOthers, Message::Proposal(proposal.clone()));
        self.on_proposal(self.cfg.id, proposal);
    }

    fn on_proposal(&mut self, from: ReplicaId, proposal: Proposal) {
        let block = &proposal.block;
        // Its certificates were verified and hold whoever carries them. Processed
        // first: the commits they complete are what the proposer elected with, and a
        // replica whose election disagrees for a while still follows the chain.
        let justify = block.justify.clone();
        self.process_qc(&justify, from);
        if let Some(tc) = &proposal.last_round_tc {
            self.process_tc(tc);
        }
        if block.author != self.leader(block.round) && self.leaders.settled() {
            return self.refuse(from, "proposer is not the round's leader");
        }
        let key = (block.round, block.author);
        match self.seen_proposals.get(&key) {
            Some(first) if first.block != proposal.block => {
                let evidence = Evidence {
                    offender: block.author,
                    round: block.round,
                    kind: EvidenceKind::ConflictingProposals,
                    first: codec::encode(first).unwrap_or_default(),
                    second: codec::encode(&proposal).unwrap_or_default(),
                };
                self.out.evidence.push(evidence);
                return self.refuse(from, "equivocating proposal");
            }
            Some(_) => {}
            // Only a window of rounds around ours: proposals for far-future rounds
            // would otherwise pile up unpruned (and the sum overflow near u64::MAX).
            None if block.round.0.saturating_add(ROUND_WINDOW) >= self.round().0
                && block.round.0 <= self.round().0.saturating_add(ROUND_WINDOW) =>
            {
                self.seen_proposals.insert(key, proposal.clone());
            }
            None => {}
        }
        let digest = block.digest();
        let round = block.round;
        self.insert_block(proposal.block.clone(), digest, from, false);
        if round == self.round() {
            // The leader we were about to skip is alive: give its round a fair timer.
            let timer =
                if self.is_suspected(block.author) { RoundTimer::Shortened } else { RoundTimer::Full };
            self.pacemaker.unskip(self.now, timer);
            self.pending_vote = Some((digest, proposal.last_round_tc));
            self.try_vote();
        }
    }

    /// Votes for the pending proposal once its block is in the tree.
    fn try_vote(&mut self) {
        let Some((digest, tc)) = self.pending_vote.clone() else { return };
        let Some(block) = self.tree.get(&digest) else { return };
        if !self.tree.contains(&digest) || block.round != self.round() {
            return;
        }
        self.pending_vote = None;
        let (round, height, qc_round, author, claim) =
            (block.round, block.height, block.justify.round(), block.author, block.executed);
        if !self.check_claim(claim, author) {
            return self.refuse(author, "state digest claim disagrees with our execution");
        }
        if let Err(refusal) = self.safety.check_vote(round, qc_round, tc.as_ref()) {
            tracing::debug!(replica = %self.cfg.id, %round, %refusal, "not voting");
            return self.refuse(author, "safety rules refuse to vote");
        }
        self.safety.record_vote(round, qc_round);
        self.voted_round = round;
        self.persist_safety();
        let vote = Signed::sign(
            VoteData { block: digest, round, height },
            self.cfg.id,
            &self.cfg.key,
            self.cfg.committee.chain_id(),
        );
        let next_leader = self.leader(round.next());
        if self.is_suspected(next_leader) || !self.leaders.settled() {
            // The next leader may be dead: every replica that suspects it forms this
            // round's QC itself, so the block is certified and only the dead leader's
            // own round times out (not this one as well). An unsettled replica may not
            // know who leads next: its vote goes to all.
            let vote = vote.into_inner();
            self.send(Recipient::AllOthers, Message::Vote(vote.clone()));
            self.on_vote(self.cfg.id, vote);
        } else if next_leader == self.cfg.id {
            self.on_vote(self.cfg.id, vote.into_inner());
        } else {
            self.send(Recipient::One(next_leader), Message::Vote(vote.into_inner()));
        }
    }

    fn on_vote(&mut self, from: ReplicaId, vote: Signed<VoteData>) {
        let round = vote.value.round;
        let next_leader = self.leader(round.next());
        if next_leader != self.cfg.id && !self.is_suspected(next_leader) && self.leaders.settled() {
            return self.refuse(from, "vote sent to a replica that does not lead the next round");
        }
        if round.next() < self.round() || round.0 > self.round().0 + ROUND_WINDOW {
            return self.refuse(from, "vote outside the round window");
        }
        match self.votes.add(vote, &self.cfg.committee) {
            VoteOutcome::Formed(qc) => {
                self.out.events.push(Event::QuorumCertificate { round });
                self.process_qc(&qc, from);
            }
            VoteOutcome::Equivocation(evidence) => {
                self.out.evidence.push(evidence);
                self.refuse(from, "double vote");
            }
            VoteOutcome::Pending | VoteOutcome::Duplicate => {}
        }
    }

    // ----- timeouts -----------------------------------------------------------------------

    fn local_timeout(&mut self) {
        let round = self.round();
        self.pacemaker.local_timeout(self.now);
        if let Some(own) = self.own_timeout.clone() {
            // Still stuck: send our timeout again (messages may have been lost).
            self.send(Recipient::AllOthers, Message::Timeout(own));
            return;
        }
        if let Err(refusal) = self.safety.check_timeout(round) {
            tracing::debug!(replica = %self.cfg.id, %round, %refusal, "not timing out");
            return;
        }
        self.safety.record_timeout(round);
        self.persist_safety();
        let high_qc = self.safety.high_qc().clone();
        let data = TimeoutData { round, high_qc_round: high_qc.round() };
        let timeout =
            Signed::sign(data, self.cfg.id, &self.cfg.key, self.cfg.committee.chain_id()).into_inner();
        let last_round_tc = self.safety.last_tc().filter(|tc| tc.round.next() == round).cloned();
        let msg = TimeoutMsg { timeout, high_qc, last_round_tc };
        self.own_timeout = Some(msg.clone());
        self.send(Recipient::AllOthers, Message::Timeout(msg.clone()));
        self.on_timeout_msg(self.cfg.id, msg);
    }

    fn on_timeout_msg(&mut self, from: ReplicaId, msg: TimeoutMsg) {
        self.process_qc(&msg.high_qc, from);
        if let Some(tc) = &msg.last_round_tc {
            self.process_tc(tc);
        }
        let round = msg.timeout.value.round;
        if round < self.round() || round.0 > self.round().0 + ROUND_WINDOW {
            return;
        }
        match self.timeouts.add(&msg.timeout, &self.cfg.committee) {
            TimeoutOutcome::Formed(tc) => {
                self.out.events.push(Event::TimeoutCertificate { round });
                self.process_tc(&tc);
            }
            TimeoutOutcome::Pending { signers } => {
                // f+1 replicas gave up on our round: at least one honest did, so join
                // them rather than wait for our own timer.
                if round == self.round()
                    && signers > self.cfg.committee.max_faulty()
                    && self.own_timeout.is_none()
                {
                    self.local_timeout();
                }
            }
            TimeoutOutcome::Duplicate => {}
        }
    }

    // ----- execution --------------------------------------------------------------------

    fn on_executed(&mut self, height: Height, state_digest: Digest) {
        if height <= self.last_executed.height && self.executed.contains_key(&height) {
            return;
        }
        self.executed.insert(height, state_digest);
        while self.executed.len() > EXECUTED_RETAINED {
            self.executed.pop_first();
        }
        self.last_executed = ExecutionClaim { height, state_digest };
        for (claimed, proposer) in self.pending_claims.remove(&height).unwrap_or_default() {
            if claimed != state_digest {
                self.flag_mismatch(height, state_digest, claimed, proposer);
            }
        }
        self.pending_claims = self.pending_claims.split_off(&height);
    }

    /// Checks a proposer's execution claim against ours. Claims about heights we have
    /// not executed are kept and checked when we get there.
    fn check_claim(&mut self, claim: ExecutionClaim, proposer: ReplicaId) -> bool {
        if claim.height == Height(0) {
            return true;
        }
        match self.executed.get(&claim.height) {
            Some(ours) if *ours == claim.state_digest => true,
            Some(ours) => {
                let ours = *ours;
                self.flag_mismatch(claim.height, ours, claim.state_digest, proposer);
                false
            }
            None if claim.height > self.last_executed.height => {
                if self.pending_claims.len() < EXECUTED_RETAINED {
                    self.pending_claims.entry(claim.height).or_default().push((claim.state_digest, proposer));
                }
                true
            }
            None => true, // older than what we keep
        }
    }

    fn flag_mismatch(&mut self, height: Height, ours: Digest, claimed: Digest, proposer: ReplicaId) {
        tracing::warn!(replica = %self.cfg.id, %height, %ours, %claimed, %proposer, "state digest mismatch: execution diverged");
        self.out.events.push(Event::StateDigestMismatch { height, ours, claimed, proposer });
    }

    // ----- block tree and catch-up ----------------------------------------------------

    /// Inserts a verified block (and any orphans waiting for it), persisting each.
    /// `solicited`: it came in a sync response.
    fn insert_block(&mut self, block: Block, digest: Digest, from: ReplicaId, solicited: bool) {
        let mut queue = vec![(block, digest)];
        while let Some((block, digest)) = queue.pop() {
            let justify = block.justify.clone();
            match self.tree.insert(block.clone(), digest) {
                Ok(true) => {
                    self.requested.remove(&digest);
                    self.out.persist.push(Record::Block(block));
                    self.try_commit_via(&justify);
                    if self.safety.high_qc().block() == digest {
                        let qc = self.safety.high_qc().clone();
                        self.try_commit_via(&qc);
                    }
                    for child in self.orphans.remove(&digest).unwrap_or_default() {
                        let child_digest = child.digest();
                        self.orphan_parents.remove(&child_digest);
                        queue.push((child, child_digest));
                    }
                }
                Ok(false) => {}
                Err(InsertError::MissingParent(parent)) => {
                    self.requested.remove(&digest);
                    let limit = if solicited { 2 * MAX_ORPHANS } else { MAX_ORPHANS };
                    if !self.orphan_parents.contains_key(&digest) {
                        if self.orphan_parents.len() >= limit {
                            // Dropped, and its parent not asked for: the held chains are
                            // completed first; it is asked for again from its children.
                            continue;
                        }
                        self.orphans.entry(parent).or_default().push(block);
                        self.orphan_parents.insert(digest, parent);
                    }
                    self.request_block(parent, from);
                }
                Err(InsertError::Conflicts) => {
                    // Asked for, but it lost to the committed chain: never ask again.
                    self.requested.remove(&digest);
                }
            }
        }
        self.try_vote();
        if let Some(round) = self.proposal_waits_for_parent {
            let parent = self.safety.high_qc().block();
            if round == self.round() && self.tree.contains(&parent) {
                self.proposal_waits_for_parent = None;
                self.out.want_payload = Some(PayloadRequest { round, parent });
            }
        }
    }

    /// Drops held blocks at or below the committed root: their parents are never
    /// coming (they lost to the committed chain or are committed already).
    fn prune_orphans(&mut self) {
        if self.orphans.is_empty() {
            return;
        }
        let root = self.tree.root().height;
        let parents = &mut self.orphan_parents;
        self.orphans.retain(|_, children| {
            children.retain(|b| {
                let keep = b.height > root;
                if !keep {
                    parents.remove(&b.digest());
                }
                keep
            });
            !children.is_empty()
        });
    }

    /// The block a chain through `digest` misses: `digest` itself, or the parent of
    /// its oldest held ancestor when `digest` is held.
    fn missing_ancestor(&self, mut digest: Digest) -> Digest {
        while let Some(parent) = self.orphan_parents.get(&digest) {
            digest = *parent;
        }
        digest
    }

    /// Asks for the block that a chain through `digest` misses, first from `peer`; a
    /// request unanswered for [`SYNC_RETRY_MS`] goes to the next peer.
    fn request_block(&mut self, digest: Digest, peer: ReplicaId) {
        let digest = self.missing_ancestor(digest);
        if self.tree.get(&digest).is_some() {
            return;
        }
        let peer = match self.requested.get(&digest) {
            Some((_, at)) if self.now.0.saturating_sub(at.0) < SYNC_RETRY_MS => return,
            Some((asked, _)) => self.next_peer(*asked),
            None if self.requested.len() >= MAX_REQUESTS => return,
            None if peer == self.cfg.id => self.next_peer(peer),
            None => peer,
        };
        self.requested.insert(digest, (peer, self.now));
        self.send_sync_request(digest, peer);
    }

    fn send_sync_request(&mut self, digest: Digest, peer: ReplicaId) {
        let max_blocks = self.cfg.sync_batch.clamp(1, MAX_SYNC_BLOCKS as u32);
        self.out.events.push(Event::SyncRequested { peer, block: digest });
        self.send(Recipient::One(peer), Message::SyncRequest(SyncRequest { block: digest, max_blocks }));
    }

    /// The next replica after `peer` in id order, skipping ourselves.
    fn next_peer(&self, peer: ReplicaId) -> ReplicaId {
        let ids: Vec<ReplicaId> = self.cfg.committee.ids().filter(|id| *id != self.cfg.id).collect();
        let pos = ids.iter().position(|id| *id > peer).unwrap_or(0);
        ids.get(pos).copied().unwrap_or(peer)
    }

    /// Asks another peer for everything still missing (called on each local timeout).
    fn retry_requests(&mut self) {
        let pending: Vec<(Digest, ReplicaId)> = self.requested.iter().map(|(d, (p, _))| (*d, *p)).collect();
        for (digest, peer) in pending {
            if self.tree.get(&digest).is_some() {
                self.requested.remove(&digest);
                continue;
            }
            let next = self.next_peer(peer);
            self.requested.insert(digest, (next, self.now));
            self.send_sync_request(digest, next);
        }
    }

    fn on_sync_request(&mut self, from: ReplicaId, request: SyncRequest) {
        let max = (request.max_blocks as usize).min(MAX_SYNC_BLOCKS);
        let blocks = self.tree.chain_ending_at(&request.block, max);
        if blocks.is_empty() {
            // Not in memory: the host reads it from storage and we answer on `Loaded`.
            self.out.load.push(LoadRequest { requester: from, key: request.block, max: max as u32 });
        } else {
            self.send(Recipient::One(from), Message::SyncResponse(SyncResponse { blocks }));
        }
    }

    fn on_loaded(&mut self, request: LoadRequest, records: Vec<Record>) {
        let blocks: Vec<Block> = records
            .into_iter()
            .filter_map(|r| match r {
                Record::Block(b) if b.height.0 > 0 => Some(b),
                _ => None,
            })
            .take((request.max as usize).min(MAX_SYNC_BLOCKS))
            .collect();
        let linked = blocks.first().is_some_and(|b| b.digest() == request.key)
            && blocks.windows(2).all(|w| w[0].parent == w[1].digest());
        if linked {
            self.send(Recipient::One(request.requester), Message::SyncResponse(SyncResponse { blocks }));
        }
    }

    fn on_sync_response(&mut self, from: ReplicaId, response: SyncResponse) {
        let Some(first) = response.blocks.first() else { return };
        let first_digest = first.digest();
        if self.tree.get(&first_digest).is_some() {
            // A late answer (the request went to another peer too).
            return;
        }
        if !self.requested.contains_key(&first_digest) && !self.orphan_parents.contains_key(&first_digest) {
            return self.refuse(from, "unsolicited sync response");
        }
        // Oldest first, so each block finds its parent.
        for block in response.blocks.into_iter().rev() {
            let digest = block.digest();
            if block.height <= self.tree.root().height {
                continue;
            }
            self.insert_block(block, digest, from, true);
        }
    }
}

impl Protocol for HotStuff {
    type Message = Message;
    type Record = Record;

    fn handle(&mut self, now: Time, input: Input<Message, Record>) -> Actions<Message, Record> {
        self.now = self.now.max(now);
        match input {
            Input::Start => {
                let high_qc = self.safety.high_qc().clone();
                let peer = high_qc.signatures.signers().find(|s| *s != self.cfg.id).unwrap_or(self.cfg.id);
                // Re-derive commits from the stored chain; the host skips what it executed.
                for block in self.tree.chain_ending_at(&high_qc.block(), usize::MAX) {
                    self.try_commit_via(&block.justify.clone());
                }
                self.process_qc(&high_qc, peer);
                let round = self.safety.certified_round().next();
                let via_timeout = self.safety.last_tc().is_some_and(|tc| tc.round >= high_qc.round());
                self.advance_round(round, via_timeout, false);
            }
            Input::Message { from, msg } => match msg.into_inner() {
                Message::Proposal(p) => self.on_proposal(from, p),
                Message::Vote(v) => self.on_vote(from, v),
                Message::Timeout(t) => self.on_timeout_msg(from, t),
                Message::SyncRequest(r) => self.on_sync_request(from, r),
                Message::SyncResponse(r) => self.on_sync_response(from, r),
            },
            Input::Timeout => {
                if self.pacemaker.expired(self.now) {
                    self.local_timeout();
                    self.retry_requests();
                }
            }
            Input::Payload { round, payload } => self.on_payload(round, payload),
            Input::Executed { height, state_digest } => self.on_executed(height, state_digest),
            Input::Loaded { request, records } => self.on_loaded(request, records),
        }
        std::mem::take(&mut self.out)
    }

    fn next_deadline(&self) -> Option<Time> {
        self.pacemaker.deadline()
    }

    fn id(&self) -> ReplicaId {
        self.cfg.id
    }
}

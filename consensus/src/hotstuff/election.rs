//! Leader reputation: round-robin over the replicas that the committed chain shows to
//! be alive, so a crashed or silent leader is skipped instead of costing a timeout on
//! every rotation.
//!
//! The rule is a pure function of committed history, so every honest replica that has
//! committed the same blocks elects the same leader; safety never depends on it (a
//! replica votes at most once per round whoever proposes). For round `r`:
//! - take the last [`LeaderReputation::window`] committed blocks whose round is at most
//!   `r − LAG` (every honest replica in round `r − 1` has committed those, unless more
//!   than two rounds in a row failed just before; see [`LAG`]);
//! - a replica is *active* if it authored one of them or signed the QC one of them
//!   carries (its vote counted);
//! - if between 1 and f replicas are inactive, the leader of `r` is the
//!   `r mod |active|`-th active replica in id order; otherwise (a young chain, or more
//!   than f inactive, which the committed chain cannot show with at most f faults)
//!   plain round-robin over the whole committee.
//!
//! A restarted replica is seeded with the committed blocks ending at its root; one that
//! installed a snapshot and lacks them is *unsettled* until it has committed a window
//! plus [`LAG`] blocks; meanwhile the core accepts any proposer and sends its votes to
//! every replica (see `HotStuff::on_proposal`).

use std::collections::VecDeque;

use bulwark_crypto::{Committee, ReplicaId};

use super::pacemaker::{LeaderElection, RoundRobin};
use super::types::Block;
use crate::protocol::{Height, Round};

/// Elections for round `r` use committed blocks of rounds ≤ `r − LAG`. Two-chain
/// commit lags a block by two rounds when rounds succeed, and by two more per failed
/// round in between (a block is committed once a child in the next round is certified):
/// 6 covers two failed rounds in a row, a crashed leader's (the round whose votes went
/// to it, and its own), so replicas agree on the elections right after a crash. More
/// failures in a row can make elections differ for a few rounds (liveness, not safety).
pub const LAG: u64 = 6;

/// What the election keeps of one committed block.
#[derive(Debug, Clone)]
struct Entry {
    round: Round,
    /// Positions (in id order) of the author and of the signers of its QC.
    present: u128,
}

#[derive(Debug, Clone)]
pub struct LeaderReputation {
    committee: Committee,
    /// The schedule while the history shows no (or too many) inactive replicas.
    round_robin: RoundRobin,
    window: usize,
    /// Committed blocks in chain order, at most `window + LAG_SLACK` of them.
    history: VecDeque<Entry>,
    /// The history reaches back to genesis or holds [`LeaderReputation::history_wanted`]
    /// blocks: this replica elects what every other honest replica with the same
    /// commits elects.
    settled: bool,
}

/// Each active replica leads once in n rounds, so a window of n + 1 committed blocks
/// holds a block of every active leader even with a failed round among them.
fn window(committee: &Committee) -> usize {
    committee.size() + 1
}

/// Entries kept beyond the window: those younger than `r − LAG` for the rounds in
/// flight, which elections of the coming rounds still need.
const LAG_SLACK: usize = 64;

impl LeaderReputation {
    /// An election with no history yet: `from_genesis` says whether the chain starts
    /// at genesis (so an empty history is complete).
    pub fn new(committee: &Committee, from_genesis: bool) -> LeaderReputation {
        LeaderReputation {
            committee: committee.clone(),
            round_robin: RoundRobin::new(committee),
            window: window(committee),
            history: VecDeque::new(),
            settled: from_genesis,
        }
    }

    /// How many committed blocks an election looks at.
    pub fn window(&self) -> usize {
        self.window
    }

    /// How many committed blocks ending at its root a restarted replica should be
    /// seeded with to be settled at once: a window below the lag, and the lag above it.
    pub fn history_wanted(committee: &Committee) -> usize {
        window(committee) + LAG as usize
    }

    fn position_bit(&self, id: ReplicaId) -> u128 {
        match self.committee.position(id) {
            // Committees of more than 128 members use round-robin (see `leader`).
            Some(p) if p < 128 => 1u128 << p,
            _ => 0,
        }
    }
}

impl LeaderElection for LeaderReputation {
    fn leader(&self, round: Round) -> ReplicaId {
        let n = self.committee.size();
        let limit = round.0.saturating_sub(LAG);
        let mut present = 0u128;
        let mut counted = 0;
        for entry in self.history.iter().rev().skip_while(|e| e.round.0 > limit).take(self.window) {
            present |= entry.present;
            counted += 1;
        }
        let active = present.count_ones() as usize;
        let inactive = n.saturating_sub(active);
        if counted < self.window || inactive == 0 || inactive > self.committee.max_faulty() || n > 128 {
            return self.round_robin.leader(round);
        }
        let k = (round.0 % active as u64) as usize;
        let position = (0..n).filter(|p| present & (1u128 << p) != 0).nth(k).unwrap_or(0);
        self.committee.members()[position].id
    }

    fn committed(&mut self, block: &Block) {
        if block.height == Height(0) {
            return;
        }
        if block.height == Height(1) {
            // The whole chain is known from here on.
            self.history.clear();
            self.settled = true;
        }
        let mut present = self.position_bit(block.author);
        for signer in block.justify.signatures.signers() {
            present |= self.position_bit(signer);
        }
        self.history.push_back(Entry { round: block.round, present });
        while self.history.len() > self.window + LAG_SLACK {
            self.history.pop_front();
        }
        if self.history.len() >= self.window + LAG as usize {
            self.settled = true;
        }
    }

    fn settled(&self) -> bool {
        self.settled
    }
}

#[cfg(test)]
mod tests {
    use bulwark_crypto::{Digest, Domain, KeyPair, QuorumSignatures};

    use super::*;
    use crate::hotstuff::types::{ExecutionClaim, QuorumCert, VoteData};
    use crate::protocol::Payload;

    fn committee(n: usize) -> Committee {
        Committee::deterministic("election", n, 7100).unwrap().0
    }

    /// A block with a QC signed by `signers` (the election reads who signed, it does not
    /// verify: the core verified every block it commits).
    fn block(height: u64, round: u64, author: u16, signers: &[u16]) -> Block {
        let key = KeyPair::from_seed([7; 32]);
        let signature = key.sign(Domain::Vote, bulwark_crypto::ChainId::from_name("election"), &round);
        let signatures = signers.iter().map(|s| (ReplicaId(*s), signature)).collect::<Vec<_>>();
        Block {
            round: Round(round),
            height: Height(height),
            parent: Digest::default(),
            justify: QuorumCert {
                vote: VoteData {
                    block: Digest::default(),
                    round: Round(round - 1),
                    height: Height(height - 1),
                },
                signatures: QuorumSignatures::new(signatures),
            },
            author: ReplicaId(author),
            executed: ExecutionClaim::default(),
            payload: Payload::default(),
        }
    }

    /// Commits rounds `from..to`, each led round-robin and signed by `voters`; rounds led
    /// by `dead` fail (no block).
    fn run(
        e: &mut LeaderReputation,
        height: &mut u64,
        rounds: std::ops::Range<u64>,
        voters: &[u16],
        dead: Option<u16>,
    ) {
        for round in rounds {
            let leader = e.leader(Round(round)).0;
            if Some(leader) == dead {
                continue;
            }
            *height += 1;
            e.committed(&block(*height, round, leader, voters));
        }
    }

    #[test]
    fn a_young_or_healthy_chain_is_round_robin() {
        let c = committee(4);
        let mut e = LeaderReputation::new(&c, true);
        assert!(e.settled());
        let mut height = 0;
        run(&mut e, &mut height, 1..40, &[0, 1, 2], None);
        // Replica 3 never votes but leads its own rounds: still active.
        for round in 40..80 {
            assert_eq!(e.leader(Round(round)), ReplicaId((round % 4) as u16), "round {round}");
        }
    }

    #[test]
    fn a_dead_replica_is_skipped_after_a_window_and_back_once_its_votes_count() {
        let c = committee(4);
        let mut e = LeaderReputation::new(&c, true);
        let mut height = 0;
        run(&mut e, &mut height, 1..20, &[0, 1, 2, 3], None);
        // Replica 2 crashes: it neither leads nor votes.
        run(&mut e, &mut height, 20..40, &[0, 1, 3], Some(2));
        let leaders: Vec<u16> = (40..60).map(|r| e.leader(Round(r)).0).collect();
        assert!(!leaders.contains(&2), "{leaders:?}");
        for id in [0, 1, 3] {
            assert!(leaders.contains(&id), "{leaders:?}");
        }
        // How many of its rounds it cost: at most three after the crash (commits here are
        // instant; the lag of 6 rounds is what it waits for).
        let mut e2 = LeaderReputation::new(&c, true);
        let mut h2 = 0;
        run(&mut e2, &mut h2, 1..20, &[0, 1, 2, 3], None);
        let mut failed = 0;
        for round in 20..60 {
            let leader = e2.leader(Round(round)).0;
            if leader == 2 {
                failed += 1;
                continue;
            }
            h2 += 1;
            e2.committed(&block(h2, round, leader, &[0, 1, 3]));
        }
        assert!(failed <= 3, "the dead leader was elected {failed} times");
        // It restarts and its votes count again: it leads again.
        run(&mut e2, &mut h2, 60..70, &[1, 2, 3], Some(99));
        let leaders: Vec<u16> = (75..90).map(|r| e2.leader(Round(r)).0).collect();
        assert!(leaders.contains(&2), "{leaders:?}");
    }

    #[test]
    fn more_than_f_inactive_falls_back_to_round_robin() {
        let c = committee(4);
        let mut e = LeaderReputation::new(&c, true);
        let mut height = 0;
        // Only replica 0 leads and signs (an impossible chain with f = 1): no exclusion.
        for round in 1..20 {
            height += 1;
            e.committed(&block(height, round, 0, &[0]));
        }
        for round in 20..28 {
            assert_eq!(e.leader(Round(round)), ReplicaId((round % 4) as u16));
        }
    }

    #[test]
    fn a_replica_seeded_without_history_is_unsettled_until_a_window_is_committed() {
        let c = committee(4);
        let mut e = LeaderReputation::new(&c, false);
        assert!(!e.settled());
        let mut height = 100;
        let enough = LeaderReputation::history_wanted(&c) as u64;
        run(&mut e, &mut height, 200..(200 + enough - 1), &[0, 1, 2, 3], None);
        assert!(!e.settled());
        run(&mut e, &mut height, 300..301, &[0, 1, 2, 3], None);
        assert!(e.settled());
    }

    #[test]
    fn replicas_with_the_same_commits_elect_the_same_leaders() {
        // One replica from genesis, one restarted and seeded with the last blocks.
        let c = committee(7);
        let mut a = LeaderReputation::new(&c, true);
        let mut height = 0;
        let mut blocks = Vec::new();
        for round in 1..200u64 {
            let leader = a.leader(Round(round)).0;
            if leader == 5 || (round % 11 == 0) {
                continue; // 5 is dead; some rounds fail for other reasons
            }
            height += 1;
            let b = block(height, round, leader, &[0, 1, 2, 3, 4, 6]);
            a.committed(&b);
            blocks.push(b);
        }
        // Seeded with just the blocks a restart reads (fewer than `a` keeps): settled
        // only with the last of them, and then electing what `a` elects.
        let mut b = LeaderReputation::new(&c, false);
        let seed = &blocks[blocks.len() - LeaderReputation::history_wanted(&c)..];
        for blk in seed {
            assert!(!b.settled());
            b.committed(blk);
        }
        assert!(b.settled());
        for round in 200..260 {
            assert_eq!(a.leader(Round(round)), b.leader(Round(round)));
        }
    }
}

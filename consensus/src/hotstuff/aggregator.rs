//! Vote and timeout aggregation into quorum and timeout certificates. Bounded: only a
//! window of rounds is accepted, and rounds below the current one are dropped.
//! Iteration is in a fixed order (BTreeMap), and equivocating voters leave evidence.

use std::collections::BTreeMap;

use bulwark_crypto::{Committee, Digest, QuorumSignatures, ReplicaId, Signature, Signed, codec};

use super::types::{QuorumCert, TimeoutCert, TimeoutData, VoteData};
use crate::protocol::{Evidence, EvidenceKind, Round};

/// How far ahead of the current round votes and timeouts are kept.
pub const ROUND_WINDOW: u64 = 64;

/// What adding a vote did.
#[derive(Debug)]
pub enum VoteOutcome {
    Pending,
    Duplicate,
    Formed(QuorumCert),
    /// The signer voted for another block in the same round.
    Equivocation(Evidence),
}

#[derive(Debug, Default)]
pub struct VoteAggregator {
    /// round -> voter -> the vote it cast.
    by_round: BTreeMap<Round, BTreeMap<ReplicaId, Signed<VoteData>>>,
    certified: BTreeMap<Round, Digest>,
}

impl VoteAggregator {
    pub fn add(&mut self, vote: Signed<VoteData>, committee: &Committee) -> VoteOutcome {
        let round = vote.value.round;
        let votes = self.by_round.entry(round).or_default();
        if let Some(previous) = votes.get(&vote.signer) {
            if previous.value == vote.value {
                return VoteOutcome::Duplicate;
            }
            return VoteOutcome::Equivocation(Evidence {
                offender: vote.signer,
                round,
                kind: EvidenceKind::ConflictingVotes,
                first: codec::encode(previous).unwrap_or_default(),
                second: codec::encode(&vote).unwrap_or_default(),
            });
        }
        let data = vote.value;
        votes.insert(vote.signer, vote);
        if self.certified.contains_key(&round) {
            return VoteOutcome::Pending;
        }
        let matching: Vec<(ReplicaId, Signature)> =
            votes.values().filter(|v| v.value == data).map(|v| (v.signer, v.signature)).collect();
        if matching.len() < committee.quorum() {
            return VoteOutcome::Pending;
        }
        self.certified.insert(round, data.block);
        VoteOutcome::Formed(QuorumCert { vote: data, signatures: QuorumSignatures::new(matching) })
    }

    /// Drops everything below `round`.
    pub fn prune_below(&mut self, round: Round) {
        self.by_round = self.by_round.split_off(&round);
        self.certified = self.certified.split_off(&round);
    }
}

/// What adding a timeout did.
#[derive(Debug, PartialEq, Eq)]
pub enum TimeoutOutcome {
    /// `signers` distinct replicas timed out in the round so far.
    Pending {
        signers: usize,
    },
    Duplicate,
    Formed(TimeoutCert),
}

#[derive(Debug, Default)]
pub struct TimeoutAggregator {
    by_round: BTreeMap<Round, BTreeMap<ReplicaId, (Round, Signature)>>,
    certified: BTreeMap<Round, ()>,
}

impl TimeoutAggregator {
    pub fn add(&mut self, timeout: &Signed<TimeoutData>, committee: &Committee) -> TimeoutOutcome {
        let round = timeout.value.round;
        let entries = self.by_round.entry(round).or_default();
        if entries.contains_key(&timeout.signer) {
            return TimeoutOutcome::Duplicate;
        }
        entries.insert(timeout.signer, (timeout.value.high_qc_round, timeout.signature));
        if entries.len() < committee.quorum() || self.certified.contains_key(&round) {
            return TimeoutOutcome::Pending { signers: entries.len() };
        }
        self.certified.insert(round, ());
        let mut groups: BTreeMap<Round, Vec<(ReplicaId, Signature)>> = BTreeMap::new();
        for (signer, (high_qc_round, signature)) in entries.iter() {
            groups.entry(*high_qc_round).or_default().push((*signer, *signature));
        }
        TimeoutOutcome::Formed(TimeoutCert {
            round,
            groups: groups.into_iter().map(|(r, sigs)| (r, QuorumSignatures::new(sigs))).collect(),
        })
    }

    pub fn prune_below(&mut self, round: Round) {
        self.by_round = self.by_round.split_off(&round);
        self.certified = self.certified.split_off(&round);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_crypto::{KeyPair, Verified};

    fn vote(keys: &[KeyPair], c: &Committee, who: u16, block: u8, round: u64) -> Signed<VoteData> {
        let data = VoteData { block: Digest([block; 32]), round: Round(round), height: crate::Height(round) };
        Signed::sign(data, ReplicaId(who), &keys[who as usize], c.chain_id()).into_inner()
    }

    #[test]
    fn two_f_votes_do_not_form_a_qc_and_two_f_plus_one_do() {
        for n in [4usize, 7] {
            let (c, keys) = Committee::deterministic("agg", n, 7000).unwrap();
            let mut agg = VoteAggregator::default();
            for who in 0..(c.quorum() - 1) as u16 {
                assert!(matches!(agg.add(vote(&keys, &c, who, 1, 5), &c), VoteOutcome::Pending));
            }
            // A repeat of the same vote does not count twice.
            assert!(matches!(agg.add(vote(&keys, &c, 0, 1, 5), &c), VoteOutcome::Duplicate));
            match agg.add(vote(&keys, &c, (c.quorum() - 1) as u16, 1, 5), &c) {
                VoteOutcome::Formed(qc) => {
                    assert_eq!(qc.signatures.len(), c.quorum());
                    assert!(qc.verify(&c).is_ok());
                }
                other => panic!("expected a QC, got {other:?}"),
            }
        }
    }

    #[test]
    fn double_vote_is_evidence() {
        let (c, keys) = Committee::deterministic("agg", 4, 7000).unwrap();
        let mut agg = VoteAggregator::default();
        agg.add(vote(&keys, &c, 2, 1, 9), &c);
        match agg.add(vote(&keys, &c, 2, 7, 9), &c) {
            VoteOutcome::Equivocation(e) => {
                assert_eq!(
                    (e.offender, e.round, e.kind),
                    (ReplicaId(2), Round(9), EvidenceKind::ConflictingVotes)
                );
                let first: Signed<VoteData> = codec::decode(&e.first, 4096).unwrap();
                assert!(Verified::check(first, &c).is_ok());
            }
            other => panic!("expected evidence, got {other:?}"),
        }
    }

    #[test]
    fn timeouts_form_a_verifiable_tc_grouped_by_high_qc_round() {
        let (c, keys) = Committee::deterministic("agg", 7, 7000).unwrap();
        let mut agg = TimeoutAggregator::default();
        let mut formed = None;
        for who in 0..c.quorum() as u16 {
            let data = TimeoutData { round: Round(10), high_qc_round: Round(u64::from(who % 3) + 5) };
            let t = Signed::sign(data, ReplicaId(who), &keys[who as usize], c.chain_id()).into_inner();
            if let TimeoutOutcome::Formed(tc) = agg.add(&t, &c) {
                formed = Some(tc);
            }
        }
        let tc = formed.expect("a quorum of timeouts forms a TC");
        assert_eq!(tc.max_high_qc_round(), Round(7));
        assert_eq!(tc.signer_count(), c.quorum());
        assert_eq!(tc.verify(&c), Ok(()));
    }
}

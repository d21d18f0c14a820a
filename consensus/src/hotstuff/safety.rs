//! Safety rules (DiemBFT v4 / Jolteon, two-chain): the small component that keeps a
//! replica from signing two conflicting things, with its own durable state. Every vote,
//! timeout and proposal is checked here first and recorded here before it is signed;
//! the caller persists [`SafetyRules::state`] before the signed message leaves.

use super::types::{QuorumCert, SafetyState, TimeoutCert};
use crate::protocol::Round;

/// Why the safety rules refused to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("already voted or timed out in round {highest_vote_round}, asked for {round}")]
    AlreadyVoted { round: Round, highest_vote_round: Round },
    #[error("block round {round} is not above its QC round {qc_round}")]
    RoundNotAboveQc { round: Round, qc_round: Round },
    #[error("block neither extends the previous round's QC nor is justified by its TC with a high enough QC")]
    NotSafeToExtend,
    #[error(
        "cannot time out round {round} with a QC of round {qc_round} below the locked round {locked_round}"
    )]
    QcBelowLock { round: Round, qc_round: Round, locked_round: Round },
    #[error("no certificate for round {round} - 1")]
    NoCertificateForPreviousRound { round: Round },
    #[error("already proposed in round {round}")]
    AlreadyProposed { round: Round },
}

#[derive(Debug, Clone)]
pub struct SafetyRules {
    state: SafetyState,
}

fn consecutive(round: Round, previous: Round) -> bool {
    previous.next() == round
}

impl SafetyRules {
    pub fn new(state: SafetyState) -> SafetyRules {
        SafetyRules { state }
    }

    /// What must be durable before a message signed after the last `record_*` leaves.
    pub fn state(&self) -> &SafetyState {
        &self.state
    }

    pub fn high_qc(&self) -> &QuorumCert {
        &self.state.high_qc
    }

    pub fn last_tc(&self) -> Option<&TimeoutCert> {
        self.state.last_tc.as_ref()
    }

    /// The round a replica with this state should be in: one above its highest
    /// certificate (after a restart, this is a round its peers can also reach).
    pub fn certified_round(&self) -> Round {
        let tc_round = self.state.last_tc.as_ref().map(|tc| tc.round).unwrap_or_default();
        self.state.high_qc.round().max(tc_round)
    }

    /// Keeps the highest QC seen. Returns whether it changed.
    pub fn observe_qc(&mut self, qc: &QuorumCert) -> bool {
        if qc.round() > self.state.high_qc.round() {
            self.state.high_qc = qc.clone();
            return true;
        }
        false
    }

    /// Keeps the highest TC seen.
    pub fn observe_tc(&mut self, tc: &TimeoutCert) {
        if self.state.last_tc.as_ref().is_none_or(|t| tc.round > t.round) {
            self.state.last_tc = Some(tc.clone());
        }
    }

    /// DiemBFT v4 `safe_to_vote`: at most one vote per round, and the block either
    /// extends the QC of the previous round or is justified by the previous round's TC
    /// with a QC at least as high as any its signers reported (the 2-chain lock).
    pub fn check_vote(&self, round: Round, qc_round: Round, tc: Option<&TimeoutCert>) -> Result<(), Refusal> {
        if round <= self.state.highest_vote_round {
            return Err(Refusal::AlreadyVoted { round, highest_vote_round: self.state.highest_vote_round });
        }
        if round <= qc_round {
            return Err(Refusal::RoundNotAboveQc { round, qc_round });
        }
        let extends_tc =
            tc.is_some_and(|tc| consecutive(round, tc.round) && qc_round >= tc.max_high_qc_round());
        if consecutive(round, qc_round) || extends_tc { Ok(()) } else { Err(Refusal::NotSafeToExtend) }
    }

    pub fn record_vote(&mut self, round: Round, qc_round: Round) {
        self.state.highest_vote_round = round;
        self.state.locked_round = self.state.locked_round.max(qc_round);
    }

    /// DiemBFT v4 `safe_to_timeout`: never below the last vote, never with a QC below
    /// the lock, and only in a round entered by a certificate of the previous one.
    pub fn check_timeout(&self, round: Round) -> Result<(), Refusal> {
        let qc_round = self.state.high_qc.round();
        if qc_round < self.state.locked_round {
            return Err(Refusal::QcBelowLock { round, qc_round, locked_round: self.state.locked_round });
        }
        if round < self.state.highest_vote_round || round <= qc_round {
            return Err(Refusal::AlreadyVoted { round, highest_vote_round: self.state.highest_vote_round });
        }
        let tc_round = self.state.last_tc.as_ref().map(|tc| tc.round);
        if consecutive(round, qc_round) || tc_round.is_some_and(|r| consecutive(round, r)) {
            Ok(())
        } else {
            Err(Refusal::NoCertificateForPreviousRound { round })
        }
    }

    pub fn record_timeout(&mut self, round: Round) {
        self.state.highest_vote_round = self.state.highest_vote_round.max(round);
    }

    /// A leader proposes at most once per round, across restarts too.
    pub fn check_propose(&self, round: Round) -> Result<(), Refusal> {
        if round <= self.state.last_proposed_round {
            return Err(Refusal::AlreadyProposed { round });
        }
        Ok(())
    }

    pub fn record_propose(&mut self, round: Round) {
        self.state.last_proposed_round = round;
    }
}

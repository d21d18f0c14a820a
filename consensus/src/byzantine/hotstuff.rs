//! How a malicious HotStuff replica crafts its lies: [`Forgeable`] for HotStuff
//! messages. Everything it makes is signed with its own key; what it cannot make is a
//! valid signature of anyone else, which is why forged certificates never verify.

use bulwark_crypto::{Digest, Domain, QuorumSignatures, ReplicaId, Signed};

use super::behaviour::CertDefect;
use super::forge::{Forgeable, Forger, MessageKind};
use crate::hotstuff::{
    Block, MAX_SYNC_BLOCKS, Message, Proposal, QuorumCert, SyncRequest, TimeoutCert, TimeoutData, TimeoutMsg,
    VoteData,
};
use crate::protocol::{Height, Payload, Round};

fn sign_proposal(forger: &Forger, block: Block, tc: Option<TimeoutCert>) -> Message {
    Message::Proposal(Proposal::new(block, forger.key(), forger.committee(), tc))
}

/// `qc` made invalid by `defect` (same vote data, so a block still links to its parent).
fn forge_qc(forger: &mut Forger, qc: &QuorumCert, defect: CertDefect) -> QuorumCert {
    let quorum = forger.committee().quorum();
    QuorumCert {
        vote: qc.vote,
        signatures: forger.forge_signatures(&qc.signatures, Domain::Vote, &qc.vote, quorum, defect),
    }
}

/// A timeout certificate for `round` with `defect`: the forger has only its own key.
fn forge_tc(forger: &mut Forger, round: Round, high_qc_round: Round, defect: CertDefect) -> TimeoutCert {
    let committee = forger.committee().clone();
    let quorum = committee.quorum();
    let high_qc_round = high_qc_round.min(Round(round.0.saturating_sub(1)));
    let data = TimeoutData { round, high_qc_round };
    let own = forger.key().sign(Domain::Timeout, committee.chain_id(), &data);
    let mut signatures = vec![(forger.id(), own)];
    match defect {
        CertDefect::TooFewSigners => {}
        CertDefect::DuplicateSigner => signatures.resize(quorum, (forger.id(), own)),
        CertDefect::UnknownSigner => {
            signatures.extend((1..quorum).map(|i| (ReplicaId(u16::MAX - i as u16), own)));
        }
        CertDefect::InventedSignature => {
            signatures
                .extend(committee.ids().filter(|id| *id != forger.id()).take(quorum - 1).map(|id| (id, own)));
        }
    }
    TimeoutCert { round, groups: vec![(high_qc_round, QuorumSignatures::new(signatures))] }
}

/// The first round at or after `target` that the forger leads under round-robin (or
/// the last one before it, at the end of the round space).
pub(super) fn led_round(forger: &Forger, target: Round) -> Round {
    let n = forger.committee().size() as u64;
    let position = forger.position() as u64;
    let start = target.0 - target.0 % n;
    match start.checked_add(position) {
        Some(r) if r >= target.0 => Round(r),
        Some(r) => Round(r.checked_add(n).unwrap_or(r)),
        None => Round(start - n + position),
    }
}

impl Forgeable for Message {
    fn kind(&self) -> MessageKind {
        match self {
            Message::Proposal(_) => MessageKind::Proposal,
            Message::Vote(_) => MessageKind::Vote,
            Message::Timeout(_) => MessageKind::Timeout,
            Message::SyncRequest(_) | Message::SyncResponse(_) => MessageKind::Sync,
        }
    }

    fn round(&self) -> Option<Round> {
        Message::round(self)
    }

    fn conflicting_proposal(&self, forger: &mut Forger) -> Option<Message> {
        let Message::Proposal(p) = self else { return None };
        let mut block = p.block.clone();
        // The payload is opaque here: the second block orders nothing (an empty
        // payload, or one byte that is not the first's). What matters is that both are
        // validly signed blocks of the same round and height.
        block.payload = if block.payload.0.is_empty() { Payload(vec![0]) } else { Payload(Vec::new()) };
        forger.remember_second_proposal(block.round, block.digest());
        Some(sign_proposal(forger, block, p.last_round_tc.clone()))
    }

    fn conflicting_vote(&self, forger: &mut Forger) -> Option<Message> {
        let Message::Vote(v) = self else { return None };
        let other = match forger.second_proposal(v.value.round) {
            Some(second) if second != v.value.block => second,
            _ => forger.invented_digest(),
        };
        let data = VoteData { block: other, ..v.value };
        let vote = Signed::sign(data, forger.id(), forger.key(), forger.committee().chain_id());
        Some(Message::Vote(vote.into_inner()))
    }

    fn with_bad_signature(&self, forger: &mut Forger) -> Option<Message> {
        Some(match self {
            Message::Proposal(p) => {
                let mut p = p.clone();
                p.signature = forger.wrong_signature(Domain::Proposal);
                Message::Proposal(p)
            }
            Message::Vote(v) => {
                let mut v = v.clone();
                v.signature = forger.wrong_signature(Domain::Vote);
                Message::Vote(v)
            }
            Message::Timeout(t) => {
                let mut t = t.clone();
                t.timeout.signature = forger.wrong_signature(Domain::Timeout);
                Message::Timeout(t)
            }
            Message::SyncRequest(_) | Message::SyncResponse(_) => return None,
        })
    }

    fn with_forged_qc(&self, forger: &mut Forger, defect: CertDefect) -> Option<Message> {
        match self {
            Message::Proposal(p) => {
                let mut block = p.block.clone();
                block.justify = forge_qc(forger, &block.justify, defect);
                Some(sign_proposal(forger, block, p.last_round_tc.clone()))
            }
            Message::Timeout(t) => {
                let mut t = t.clone();
                t.high_qc = forge_qc(forger, &t.high_qc, defect);
                Some(Message::Timeout(t))
            }
            _ => None,
        }
    }

    fn with_forged_tc(&self, forger: &mut Forger, defect: CertDefect) -> Option<Message> {
        match self {
            Message::Proposal(p) => {
                let block = p.block.clone();
                let tc = forge_tc(forger, block.round, block.justify.round(), defect);
                Some(sign_proposal(forger, block, Some(tc)))
            }
            Message::Timeout(t) => {
                let mut t = t.clone();
                t.last_round_tc = Some(forge_tc(forger, t.timeout.value.round, t.high_qc.round(), defect));
                Some(Message::Timeout(t))
            }
            _ => None,
        }
    }

    fn at_round(&self, forger: &mut Forger, round: Round) -> Option<Message> {
        match self {
            Message::Proposal(p) => {
                let mut block = p.block.clone();
                block.round = led_round(forger, round);
                Some(sign_proposal(forger, block, p.last_round_tc.clone()))
            }
            Message::Timeout(t) => {
                let data = TimeoutData { round, high_qc_round: t.high_qc.round() };
                let timeout = Signed::sign(data, forger.id(), forger.key(), forger.committee().chain_id());
                Some(Message::Timeout(TimeoutMsg {
                    timeout: timeout.into_inner(),
                    high_qc: t.high_qc.clone(),
                    last_round_tc: t.last_round_tc.clone(),
                }))
            }
            _ => None,
        }
    }

    fn with_wrong_state_digest(&self, forger: &mut Forger) -> Option<Message> {
        let Message::Proposal(p) = self else { return None };
        let mut block = p.block.clone();
        block.executed.state_digest =
            Digest::of_parts(&[b"bulwark/byzantine/wrong-state", block.executed.state_digest.as_bytes()]);
        Some(sign_proposal(forger, block, p.last_round_tc.clone()))
    }

    fn useless(forger: &mut Forger, round: Round, turn: usize) -> Option<Message> {
        let block = forger.invented_digest();
        Some(if turn.is_multiple_of(2) {
            // Each one makes the receiver look in memory and storage for a block that
            // does not exist.
            Message::SyncRequest(SyncRequest { block, max_blocks: MAX_SYNC_BLOCKS as u32 })
        } else {
            // Costs the receiver a signature check; a vote for a block nobody has.
            let ahead = forger.next_u64() % 4;
            let round = Round(round.0.saturating_add(ahead).max(1));
            let data = VoteData { block, round, height: Height(round.0) };
            Message::Vote(
                Signed::sign(data, forger.id(), forger.key(), forger.committee().chain_id()).into_inner(),
            )
        })
    }
}

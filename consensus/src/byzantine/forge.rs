//! What a malicious wrapper needs from a protocol: a way to look at its messages and to
//! craft malicious variants of them. The wrappers in [`super::wrapper`] only speak this
//! trait, so the PBFT core reuses them by implementing it for its message type.

use std::collections::BTreeMap;

use bulwark_crypto::{Committee, Digest, Domain, KeyPair, QuorumSignatures, ReplicaId, Signature};
use serde::Serialize;

use super::CertDefect;

use crate::protocol::{Round, WireMessage};

/// The role a message plays, as far as the behaviours care.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MessageKind {
    /// A leader's proposal (HotStuff proposal, PBFT pre-prepare).
    Proposal,
    /// A vote for a proposal (HotStuff vote, PBFT prepare/commit).
    Vote,
    /// A signed give-up on a round (HotStuff timeout, PBFT view change).
    Timeout,
    /// Catch-up traffic, not signed as a whole.
    Sync,
    Other,
}

/// The malicious replica's means: its own key (it can sign anything, but only as
/// itself), the committee, and a deterministic stream of numbers (no clock, no OS
/// randomness: a simulation replays exactly).
pub struct Forger {
    id: ReplicaId,
    key: KeyPair,
    committee: Committee,
    state: u64,
    /// The second block of each round we equivocated in, so a double vote can go to it.
    second_proposals: BTreeMap<Round, Digest>,
}

impl std::fmt::Debug for Forger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forger").field("id", &self.id).finish()
    }
}

/// Rounds of second proposals remembered.
const REMEMBERED_ROUNDS: usize = 16;

impl Forger {
    /// `seed` drives every choice the behaviours make (who gets which half, what to
    /// replay); the same seed gives the same attack.
    pub fn new(id: ReplicaId, key: KeyPair, committee: Committee, seed: u64) -> Forger {
        Forger {
            id,
            key,
            committee,
            state: seed ^ (u64::from(id.0) << 48),
            second_proposals: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// Our position in the committee (drives round-robin leadership).
    pub fn position(&self) -> usize {
        self.committee.position(self.id).unwrap_or_default()
    }

    /// The next number of a deterministic stream (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A digest nobody has a block for.
    pub fn invented_digest(&mut self) -> Digest {
        let n = self.next_u64();
        Digest::of_parts(&[b"bulwark/byzantine/invented", &n.to_le_bytes()])
    }

    /// Every other member, in id order.
    pub fn others(&self) -> Vec<ReplicaId> {
        self.committee.ids().filter(|id| *id != self.id).collect()
    }

    pub fn remember_second_proposal(&mut self, round: Round, digest: Digest) {
        self.second_proposals.insert(round, digest);
        while self.second_proposals.len() > REMEMBERED_ROUNDS {
            self.second_proposals.pop_first();
        }
    }

    pub fn second_proposal(&self, round: Round) -> Option<Digest> {
        self.second_proposals.get(&round).copied()
    }

    /// A signature by the forger over something else than what it will be attached to.
    pub fn wrong_signature(&mut self, domain: Domain) -> Signature {
        let nonce = self.next_u64();
        self.key.sign(domain, self.committee.chain_id(), &nonce)
    }

    /// A signature set over `value` that fails verification by `defect`: `existing`
    /// (with our own signature added) cut to one short of `required`, then padded.
    /// The forger has only its own key, so it can never make a valid set alone.
    pub fn forge_signatures<T: Serialize + ?Sized>(
        &self,
        existing: &QuorumSignatures,
        domain: Domain,
        value: &T,
        required: usize,
        defect: CertDefect,
    ) -> QuorumSignatures {
        let own = self.key.sign(domain, self.committee.chain_id(), value);
        let mut signatures: Vec<(ReplicaId, Signature)> = existing.signatures().to_vec();
        if !signatures.iter().any(|(id, _)| *id == self.id) {
            signatures.insert(0, (self.id, own));
        }
        signatures.truncate(required.saturating_sub(1).max(1));
        match defect {
            CertDefect::TooFewSigners => {}
            CertDefect::DuplicateSigner => {
                let first = signatures[0];
                signatures.push(first);
            }
            CertDefect::UnknownSigner => signatures.push((ReplicaId(u16::MAX), own)),
            CertDefect::InventedSignature => {
                // A member that did not sign and is not us: our own signature under its name.
                let absent = self
                    .committee
                    .ids()
                    .find(|id| *id != self.id && !signatures.iter().any(|(s, _)| s == id));
                signatures.push((absent.unwrap_or(ReplicaId(u16::MAX)), own));
            }
        }
        QuorumSignatures::new(signatures)
    }
}

/// Protocol-specific crafting. Each method returns `None` when it does not apply to
/// the message (a vote has no quorum certificate to forge); the wrapper then sends the
/// message unchanged. Messages passed in are the honest core's own, so they are signed
/// by the forger; everything returned is signed by the forger too (it has no other key).
pub trait Forgeable: WireMessage + Sized {
    fn kind(&self) -> MessageKind;

    /// The round (or view) the message speaks about.
    fn round(&self) -> Option<Round>;

    /// A proposal for the same round with a different block.
    fn conflicting_proposal(&self, forger: &mut Forger) -> Option<Self>;

    /// A vote in the same round for a different block (the second block of an
    /// equivocation if we made one, else a block that does not exist).
    fn conflicting_vote(&self, forger: &mut Forger) -> Option<Self>;

    /// The same message with a signature that does not verify.
    fn with_bad_signature(&self, forger: &mut Forger) -> Option<Self>;

    /// The same proposal or timeout carrying a quorum certificate with `defect`.
    fn with_forged_qc(&self, forger: &mut Forger, defect: super::CertDefect) -> Option<Self>;

    /// The same proposal or timeout carrying a timeout certificate with `defect` for
    /// the round it speaks about.
    fn with_forged_tc(&self, forger: &mut Forger, defect: super::CertDefect) -> Option<Self>;

    /// The same proposal or timeout, re-signed for a round at or near `round`.
    fn at_round(&self, forger: &mut Forger, round: Round) -> Option<Self>;

    /// The same proposal claiming a state digest that does not match execution.
    fn with_wrong_state_digest(&self, forger: &mut Forger) -> Option<Self>;

    /// A valid but useless message for a flood (`turn` picks the kind).
    fn useless(forger: &mut Forger, round: Round, turn: usize) -> Option<Self>;
}

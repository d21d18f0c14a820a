//! How a malicious PBFT replica crafts its lies: [`Forgeable`] for PBFT messages.
//! As for HotStuff, everything is signed with the forger's own key, so certificates it
//! forges (prepared, checkpoint, view-change sets) never verify.

use bulwark_crypto::{Digest, Domain, QuorumSignatures, ReplicaId, Signed};

use super::behaviour::CertDefect;
use super::forge::{Forgeable, Forger, MessageKind};
use super::hotstuff::led_round;
use crate::pbft::{
    CHECKPOINT_INTERVAL, CheckpointCert, CheckpointData, MAX_FETCH_ENTRIES, Message, NewViewData, Order,
    Phase, PrePrepare, PreparedCert, SignedOrder, ViewChangeData, Vote, batch_digest,
};
use crate::protocol::{Height, Payload, Round};

fn sign_pre_prepare(forger: &Forger, order: Order, payload: Payload) -> Message {
    let order = SignedOrder::sign(order, forger.key(), forger.committee());
    Message::PrePrepare(PrePrepare { order, payload })
}

fn sign_view_change(forger: &Forger, data: ViewChangeData) -> Message {
    Message::ViewChange(
        Signed::sign(data, forger.id(), forger.key(), forger.committee().chain_id()).into_inner(),
    )
}

fn sign_new_view(forger: &Forger, data: NewViewData) -> Message {
    Message::NewView(
        Signed::sign(data, forger.id(), forger.key(), forger.committee().chain_id()).into_inner(),
    )
}

fn phase_of(msg: &Message) -> Option<(Phase, Vote)> {
    match msg {
        Message::Prepare(v) => Some((Phase::Prepare, *v)),
        Message::Commit(v) => Some((Phase::Commit, *v)),
        _ => None,
    }
}

fn vote_message(phase: Phase, vote: Vote) -> Message {
    match phase {
        Phase::Prepare => Message::Prepare(vote),
        Phase::Commit => Message::Commit(vote),
    }
}

/// A view change whose proofs fail by `defect`: its first prepared certificate, or
/// an invented one above its stable checkpoint.
fn forge_prepared(forger: &mut Forger, data: &ViewChangeData, defect: CertDefect) -> ViewChangeData {
    let mut data = data.clone();
    let required = forger.committee().quorum() - 1;
    let cert = match data.prepared.first() {
        Some(cert) => cert.clone(),
        None => {
            let order = Order {
                view: Round(data.view.0.saturating_sub(1)),
                seq: data.stable.seq().next(),
                digest: forger.invented_digest(),
            };
            let pre_prepare = SignedOrder { order, signature: forger.wrong_signature(Domain::PrePrepare) };
            PreparedCert { pre_prepare, prepares: QuorumSignatures::default() }
        }
    };
    let prepares = forger.forge_signatures(&cert.prepares, Domain::Prepare, &cert.order(), required, defect);
    let forged = PreparedCert { pre_prepare: cert.pre_prepare, prepares };
    if data.prepared.is_empty() {
        data.prepared.push(forged);
    } else {
        data.prepared[0] = forged;
    }
    data
}

/// A stable checkpoint one interval above `stable`, with signatures failing by `defect`.
fn forge_checkpoint(forger: &mut Forger, stable: &CheckpointCert, defect: CertDefect) -> CheckpointCert {
    let data = CheckpointData {
        seq: Height(stable.seq().0 + CHECKPOINT_INTERVAL),
        log: forger.invented_digest(),
        state: forger.invented_digest(),
    };
    let quorum = forger.committee().quorum();
    let signatures =
        forger.forge_signatures(&QuorumSignatures::default(), Domain::Checkpoint, &data, quorum, defect);
    CheckpointCert { data, signatures }
}

impl Forgeable for Message {
    fn kind(&self) -> MessageKind {
        match self {
            Message::PrePrepare(_) | Message::NewView(_) => MessageKind::Proposal,
            Message::Prepare(_) | Message::Commit(_) => MessageKind::Vote,
            Message::ViewChange(_) => MessageKind::Timeout,
            Message::Checkpoint(_) => MessageKind::Other,
            Message::FetchLog { .. }
            | Message::LogEntries(_)
            | Message::FetchPayload(_)
            | Message::PayloadReply(_)
            | Message::FetchView(_) => MessageKind::Sync,
        }
    }

    fn round(&self) -> Option<Round> {
        self.view()
    }

    fn conflicting_proposal(&self, forger: &mut Forger) -> Option<Message> {
        let Message::PrePrepare(pp) = self else { return None };
        // The second batch orders nothing (an empty payload, or one byte that is not
        // the first's): what matters is two signed pre-prepares for one (view, seq).
        let payload = if pp.payload.0.is_empty() { Payload(vec![0]) } else { Payload(Vec::new()) };
        let order = Order { digest: batch_digest(&payload), ..pp.order.order };
        forger.remember_second_proposal(order.view, order.digest);
        Some(sign_pre_prepare(forger, order, payload))
    }

    fn conflicting_vote(&self, forger: &mut Forger) -> Option<Message> {
        let (phase, vote) = phase_of(self)?;
        let digest = match forger.second_proposal(vote.order.view) {
            Some(second) if second != vote.order.digest => second,
            _ => forger.invented_digest(),
        };
        let order = Order { digest, ..vote.order };
        Some(vote_message(phase, Vote::sign(phase, order, forger.id(), forger.key(), forger.committee())))
    }

    fn with_bad_signature(&self, forger: &mut Forger) -> Option<Message> {
        Some(match self {
            Message::PrePrepare(pp) => {
                let mut pp = pp.clone();
                pp.order.signature = forger.wrong_signature(Domain::PrePrepare);
                Message::PrePrepare(pp)
            }
            Message::Prepare(v) => {
                Message::Prepare(Vote { signature: forger.wrong_signature(Domain::Prepare), ..*v })
            }
            Message::Commit(v) => {
                Message::Commit(Vote { signature: forger.wrong_signature(Domain::Commit), ..*v })
            }
            Message::Checkpoint(c) => {
                let mut c = c.clone();
                c.signature = forger.wrong_signature(Domain::Checkpoint);
                Message::Checkpoint(c)
            }
            Message::ViewChange(vc) => {
                let mut vc = vc.clone();
                vc.signature = forger.wrong_signature(Domain::ViewChange);
                Message::ViewChange(vc)
            }
            Message::NewView(nv) => {
                let mut nv = nv.clone();
                nv.signature = forger.wrong_signature(Domain::NewView);
                Message::NewView(nv)
            }
            _ => return None,
        })
    }

    fn with_forged_qc(&self, forger: &mut Forger, defect: CertDefect) -> Option<Message> {
        match self {
            Message::ViewChange(vc) => {
                let data = forge_prepared(forger, &vc.value, defect);
                Some(sign_view_change(forger, data))
            }
            Message::NewView(nv) => {
                // The view changes that justify it: too few, repeated, or invented.
                let mut data = nv.value.clone();
                let quorum = forger.committee().quorum();
                data.view_changes.truncate(quorum - 1);
                let first = data.view_changes.first().cloned()?;
                match defect {
                    CertDefect::TooFewSigners => {}
                    CertDefect::DuplicateSigner => data.view_changes.push(first),
                    CertDefect::UnknownSigner | CertDefect::InventedSignature => {
                        let absent = forger
                            .committee()
                            .ids()
                            .find(|id| data.view_changes.iter().all(|vc| vc.signer != *id))
                            .filter(|_| defect == CertDefect::InventedSignature)
                            .unwrap_or(ReplicaId(u16::MAX));
                        let mut invented = first;
                        invented.signer = absent;
                        data.view_changes.push(invented);
                    }
                }
                Some(sign_new_view(forger, data))
            }
            _ => None,
        }
    }

    fn with_forged_tc(&self, forger: &mut Forger, defect: CertDefect) -> Option<Message> {
        let Message::ViewChange(vc) = self else { return None };
        let mut data = vc.value.clone();
        data.stable = forge_checkpoint(forger, &data.stable, defect);
        data.prepared.retain(|c| c.order().seq > data.stable.seq());
        Some(sign_view_change(forger, data))
    }

    fn at_round(&self, forger: &mut Forger, round: Round) -> Option<Message> {
        match self {
            Message::PrePrepare(pp) => {
                let order = Order { view: led_round(forger, round), ..pp.order.order };
                Some(sign_pre_prepare(forger, order, pp.payload.clone()))
            }
            Message::ViewChange(vc) => {
                Some(sign_view_change(forger, ViewChangeData { view: round, ..vc.value.clone() }))
            }
            _ => None,
        }
    }

    fn with_wrong_state_digest(&self, forger: &mut Forger) -> Option<Message> {
        let Message::Checkpoint(c) = self else { return None };
        let data = CheckpointData {
            state: Digest::of_parts(&[b"bulwark/byzantine/wrong-state", c.value.state.as_bytes()]),
            ..c.value
        };
        let signed = Signed::sign(data, forger.id(), forger.key(), forger.committee().chain_id());
        Some(Message::Checkpoint(signed.into_inner()))
    }

    fn useless(forger: &mut Forger, round: Round, turn: usize) -> Option<Message> {
        Some(match turn % 3 {
            // Makes the receiver look up its log for a state transfer nobody needs.
            0 => Message::FetchLog { after: Height(0), max: MAX_FETCH_ENTRIES as u32 },
            // A payload nobody has.
            1 => Message::FetchPayload(forger.invented_digest()),
            // Costs the receiver a signature check; a commit for a batch nobody has.
            _ => {
                let seq = Height(1 + forger.next_u64() % 64);
                let order = Order { view: round, seq, digest: forger.invented_digest() };
                Message::Commit(Vote::sign(
                    Phase::Commit,
                    order,
                    forger.id(),
                    forger.key(),
                    forger.committee(),
                ))
            }
        })
    }
}

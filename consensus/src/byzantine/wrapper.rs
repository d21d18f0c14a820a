//! [`Byzantine`]: an honest core whose outgoing messages are transformed by the
//! selected behaviours. The core itself is untouched and unaware: it keeps its own
//! honest state, and the lies happen between it and the network.

use std::collections::VecDeque;

use bulwark_crypto::ReplicaId;

use super::behaviour::{Behaviour, Behaviours, CertDefect};
use super::forge::{Forgeable, Forger, MessageKind};
use crate::protocol::{Actions, Input, Outgoing, Protocol, Recipient, Round, Time};

/// Messages kept for `stale-replay`: recent ones, and a sparse sample of older ones.
const RECENT_KEPT: usize = 128;
const ARCHIVE_KEPT: usize = 64;
const ARCHIVE_EVERY: u64 = 16;
/// Stale messages replayed per step, at most.
const REPLAYS_PER_STEP: usize = 2;

/// A protocol core running `behaviours`.
pub struct Byzantine<P: Protocol> {
    core: P,
    behaviours: Behaviours,
    forger: Forger,
    /// The highest round our own (honest) core spoke about: what "current" and
    /// "stale" mean for the behaviours. Others' messages never move it, so another
    /// Byzantine replica's huge rounds cannot.
    round: Round,
    recent: VecDeque<(Round, P::Message)>,
    archive: VecDeque<(Round, P::Message)>,
    observed: u64,
    /// Rotates through the certificate defects when none was chosen.
    defect_turn: usize,
}

impl<P: Protocol> std::fmt::Debug for Byzantine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Byzantine")
            .field("id", &self.forger.id())
            .field("behaviours", &self.behaviours.to_string())
            .finish()
    }
}

impl<P> Byzantine<P>
where
    P: Protocol,
    P::Message: Forgeable,
{
    /// Wraps `core`, which must run with the same key `forger` holds.
    pub fn new(core: P, behaviours: Behaviours, forger: Forger) -> Byzantine<P> {
        Byzantine {
            core,
            behaviours,
            forger,
            round: Round(0),
            recent: VecDeque::new(),
            archive: VecDeque::new(),
            observed: 0,
            defect_turn: 0,
        }
    }

    pub fn core(&self) -> &P {
        &self.core
    }

    pub fn behaviours(&self) -> &Behaviours {
        &self.behaviours
    }

    fn observe(&mut self, msg: &P::Message) {
        let Some(round) = msg.round() else { return };
        self.observed += 1;
        if self.observed.is_multiple_of(ARCHIVE_EVERY) {
            if self.archive.len() == ARCHIVE_KEPT {
                self.archive.pop_front();
            }
            self.archive.push_back((round, msg.clone()));
        }
        if self.recent.len() == RECENT_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((round, msg.clone()));
    }

    fn next_defect(&mut self, chosen: Option<CertDefect>) -> CertDefect {
        chosen.unwrap_or_else(|| {
            self.defect_turn += 1;
            CertDefect::ALL[self.defect_turn % CertDefect::ALL.len()]
        })
    }

    /// Other replicas rotated by `round`, so each gets each role over time.
    fn others_rotated(&self, round: Round) -> Vec<ReplicaId> {
        let mut others = self.forger.others();
        if !others.is_empty() {
            let shift = (round.0 % others.len() as u64) as usize;
            others.rotate_left(shift);
        }
        others
    }

    /// Sends each message as `craft` rewrites it, or unchanged where it has no variant.
    fn rewrite_each(
        &mut self,
        send: Vec<Outgoing<P::Message>>,
        out: &mut Vec<Outgoing<P::Message>>,
        mut craft: impl FnMut(&mut Self, &P::Message) -> Option<P::Message>,
    ) {
        for o in send {
            let msg = craft(self, &o.msg).unwrap_or(o.msg);
            out.push(Outgoing { to: o.to, msg });
        }
    }

    /// `spoke`: the honest core sent a proposal, vote or timeout in this step. Behaviours
    /// that add traffic only do so then, so that two Byzantine replicas never feed
    /// each other's floods (each message one receives would otherwise make it send
    /// several more to the other).
    fn apply(
        &mut self,
        behaviour: Behaviour,
        send: Vec<Outgoing<P::Message>>,
        spoke: bool,
    ) -> Vec<Outgoing<P::Message>> {
        let mut out = Vec::with_capacity(send.len());
        match behaviour {
            Behaviour::Silent => {}
            Behaviour::Equivocate { overlap } => {
                for o in send {
                    self.equivocate(o, overlap, &mut out);
                }
            }
            Behaviour::SelectiveLeader => {
                for o in send {
                    if o.msg.kind() != MessageKind::Proposal || o.to != Recipient::AllOthers {
                        out.push(o);
                        continue;
                    }
                    let round = o.msg.round().unwrap_or_default();
                    let chosen = self.forger.committee().max_faulty() + 1;
                    for to in self.others_rotated(round).into_iter().take(chosen) {
                        out.push(Outgoing { to: Recipient::One(to), msg: o.msg.clone() });
                    }
                }
            }
            Behaviour::DoubleVote => {
                for o in send {
                    if o.msg.kind() == MessageKind::Vote
                        && let Some(second) = o.msg.conflicting_vote(&mut self.forger)
                    {
                        let second = Outgoing { to: o.to, msg: second };
                        // Either vote may arrive first: the receiver keeps the first.
                        if self.forger.next_u64().is_multiple_of(2) {
                            out.extend([o, second]);
                        } else {
                            out.extend([second, o]);
                        }
                    } else {
                        out.push(o);
                    }
                }
            }
            Behaviour::WithholdVotes { to_positions } => {
                let committee = self.forger.committee().clone();
                out.extend(send.into_iter().filter(|o| {
                    o.msg.kind() != MessageKind::Vote
                        || matches!((o.to, to_positions), (Recipient::One(id), Some(k))
                            if committee.position(id).is_some_and(|p| p < k))
                }));
            }
            Behaviour::BadSignature => {
                self.rewrite_each(send, &mut out, |b, msg| msg.with_bad_signature(&mut b.forger));
            }
            Behaviour::ForgeQc { defect } => self.rewrite_each(send, &mut out, |b, msg| {
                let defect = b.next_defect(defect);
                msg.with_forged_qc(&mut b.forger, defect)
            }),
            Behaviour::ForgeTc { defect } => self.rewrite_each(send, &mut out, |b, msg| {
                let defect = b.next_defect(defect);
                msg.with_forged_tc(&mut b.forger, defect)
            }),
            // Whatever carries a state digest (a HotStuff proposal, a PBFT checkpoint).
            Behaviour::WrongStateDigest => {
                self.rewrite_each(send, &mut out, |b, msg| msg.with_wrong_state_digest(&mut b.forger));
            }
            Behaviour::RoundJump { by } => {
                for o in send {
                    if matches!(o.msg.kind(), MessageKind::Proposal | MessageKind::Timeout) {
                        let round = o.msg.round().unwrap_or_default();
                        // Far ahead, and at the very end of the round space (overflow).
                        let far = Round(round.0.saturating_add(by));
                        let end = Round(u64::MAX - (self.forger.next_u64() % 4));
                        for target in [far, end] {
                            if let Some(jump) = o.msg.at_round(&mut self.forger, target) {
                                out.push(Outgoing { to: Recipient::AllOthers, msg: jump });
                            }
                        }
                    }
                    out.push(o);
                }
            }
            Behaviour::StaleReplay { lag } => {
                out.extend(send);
                let stale_below = Round(self.round.0.saturating_sub(lag));
                let pool: Vec<&P::Message> = self
                    .archive
                    .iter()
                    .chain(self.recent.iter())
                    .filter(|(r, _)| *r > Round(0) && *r <= stale_below)
                    .map(|(_, m)| m)
                    .collect();
                if spoke && !pool.is_empty() {
                    for _ in 0..REPLAYS_PER_STEP {
                        let pick = (self.forger.next_u64() % pool.len() as u64) as usize;
                        out.push(Outgoing { to: Recipient::AllOthers, msg: pool[pick].clone() });
                    }
                }
            }
            Behaviour::Flood { per_step } => {
                out.extend(send);
                for turn in 0..if spoke { per_step } else { 0 } {
                    if let Some(msg) = P::Message::useless(&mut self.forger, self.round, turn) {
                        out.push(Outgoing { to: Recipient::AllOthers, msg });
                    }
                }
            }
        }
        out
    }

    fn equivocate(&mut self, o: Outgoing<P::Message>, overlap: usize, out: &mut Vec<Outgoing<P::Message>>) {
        if o.msg.kind() != MessageKind::Proposal || o.to != Recipient::AllOthers {
            out.push(o);
            return;
        }
        let Some(second) = o.msg.conflicting_proposal(&mut self.forger) else {
            out.push(o);
            return;
        };
        let round = o.msg.round().unwrap_or_default();
        let others = self.others_rotated(round);
        let half = others.len().div_ceil(2);
        let (first_half, second_half) = others.split_at(half);
        for to in first_half {
            out.push(Outgoing { to: Recipient::One(*to), msg: o.msg.clone() });
        }
        for (i, to) in second_half.iter().enumerate() {
            out.push(Outgoing { to: Recipient::One(*to), msg: second.clone() });
            if i < overlap {
                out.push(Outgoing { to: Recipient::One(*to), msg: o.msg.clone() });
            }
        }
    }
}

impl<P> Protocol for Byzantine<P>
where
    P: Protocol,
    P::Message: Forgeable,
{
    type Message = P::Message;
    type Record = P::Record;

    fn handle(&mut self, now: Time, input: Input<P::Message, P::Record>) -> Actions<P::Message, P::Record> {
        if let Input::Message { msg, .. } = &input {
            let msg: &P::Message = msg;
            self.observe(msg);
        }
        let mut actions = self.core.handle(now, input);
        let spoke = actions.send.iter().any(|o| {
            matches!(o.msg.kind(), MessageKind::Proposal | MessageKind::Vote | MessageKind::Timeout)
        });
        for o in &actions.send {
            if let Some(round) = o.msg.round()
                && o.msg.kind() != MessageKind::Sync
            {
                self.round = self.round.max(round);
            }
        }
        for o in actions.send.clone() {
            self.observe(&o.msg);
        }
        let behaviours = self.behaviours.clone();
        for behaviour in behaviours.iter() {
            let send = std::mem::take(&mut actions.send);
            actions.send = self.apply(*behaviour, send, spoke);
        }
        actions
    }

    fn next_deadline(&self) -> Option<Time> {
        self.core.next_deadline()
    }

    fn id(&self) -> ReplicaId {
        self.core.id()
    }
}

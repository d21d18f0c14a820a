//! Malicious replicas, in one place: wrappers around an honest core.
//!
//! A [`Byzantine`] core runs the honest core unchanged and transforms what it sends
//! according to its [`Behaviours`]. The honest code has no `if malicious` branch: a
//! behaviour is either a rewrite of the [`Actions`](crate::Actions) an honest step
//! produced (drop, redirect, duplicate, replay, add), or, where it must craft a message
//! (a second proposal, a forged certificate, a wrong state digest), a call into the
//! small [`Forgeable`] trait that a protocol's message type implements. HotStuff's
//! implementation is in `hotstuff.rs`, PBFT's in `pbft.rs`: both cores run under the same
//! wrappers.
//!
//! The behaviours (see [`Behaviour`] for each one's parameters):
//!
//! | name | expressed as |
//! |---|---|
//! | `equivocate` | a proposal broadcast becomes two signed proposals, one per half of the others |
//! | `double-vote` | each vote is followed (or preceded) by a signed vote for another block |
//! | `silent` | every send is dropped |
//! | `withhold-votes` | vote sends are dropped (or kept only towards some replicas) |
//! | `bad-signature` | every signed message's signature is replaced by one that fails |
//! | `forge-qc` | proposals and timeouts carry a QC one short, padded with a duplicate, an unknown signer or an invented signature |
//! | `forge-tc` | proposals and timeouts carry a TC with the same defects |
//! | `stale-replay` | whenever the core speaks, valid messages (own and received) from earlier rounds are sent again |
//! | `round-jump` | proposals and timeouts are also sent re-signed for far rounds and rounds near `u64::MAX` |
//! | `wrong-state-digest` | proposals (HotStuff) and checkpoints (PBFT) claim a state digest that is not the execution's |
//! | `flood` | whenever the core speaks, sync requests and signed votes for blocks that do not exist go to everyone |
//! | `selective-leader` | a proposal broadcast goes to only f+1 other replicas |
//!
//! Twins (two honest instances of one replica with the same key, in different
//! partitions) needs no wrapper: it is a deployment of two honest cores, arranged by
//! the simulator.

mod behaviour;
mod forge;
pub(crate) mod hotstuff;
mod pbft;
mod wrapper;

pub use behaviour::{Behaviour, Behaviours, CertDefect, ParseError, parse_assignments};
pub use forge::{Forgeable, Forger, MessageKind};
pub use wrapper::Byzantine;

use crate::protocol::{Actions, Input, Protocol, Time};

/// A boxed core is a core: hosts can hold honest and wrapped replicas alike, as
/// `Box<dyn Protocol<Message = M, Record = R>>`.
impl<P: Protocol + ?Sized> Protocol for Box<P> {
    type Message = P::Message;
    type Record = P::Record;

    fn handle(&mut self, now: Time, input: Input<P::Message, P::Record>) -> Actions<P::Message, P::Record> {
        (**self).handle(now, input)
    }

    fn next_deadline(&self) -> Option<Time> {
        (**self).next_deadline()
    }

    fn id(&self) -> bulwark_crypto::ReplicaId {
        (**self).id()
    }
}

#[cfg(test)]
mod tests;

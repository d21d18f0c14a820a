//! Bulwark's protocol cores as pure, sans-IO state machines.
//!
//! A core does no I/O, reads no clock and spawns nothing: time and messages come in as
//! [`Input`]s, and everything it wants done comes out as [`Actions`]. This is what makes
//! the simulator exact and every failure replayable from a seed.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod byzantine;
pub mod hotstuff;
pub mod pbft;
pub mod protocol;

pub use protocol::{
    Actions, CommittedBlock, Event, Evidence, EvidenceKind, Height, Input, LoadRequest, Outgoing, Payload,
    PayloadRequest, Protocol, ProtocolKind, Recipient, Round, StoredRecord, Time, UnknownProtocol,
    WireMessage,
};

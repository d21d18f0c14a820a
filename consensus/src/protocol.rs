//! The interface between a protocol core and its host (the tokio runtime or the
//! simulator). Nothing here names a particular protocol.
//!
//! A core is stepped with an [`Input`] at a [`Time`] the host passes in and answers with
//! [`Actions`], which the host carries out in the documented order before it feeds the
//! next input. The core tells the host when it next wants a [`Input::Timeout`] through
//! [`Protocol::next_deadline`].

use std::fmt;

use bulwark_crypto::{Committee, Digest, ReplicaId, Verified, Verify};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Milliseconds on the host's clock. The core never reads a clock: time only comes in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Time(pub u64);

impl Time {
    pub fn plus_millis(self, millis: u64) -> Time {
        Time(self.0.saturating_add(millis))
    }
}

/// A protocol round (HotStuff) or view (PBFT).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Round(pub u64);

impl Round {
    pub fn next(self) -> Round {
        Round(self.0.saturating_add(1))
    }
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A position in the committed log (1 is the first block after genesis).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Height(pub u64);

impl Height {
    pub fn next(self) -> Height {
        Height(self.0.saturating_add(1))
    }
}

impl fmt::Display for Height {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a block orders. Opaque to the core: the host decides what it means (the node
/// puts its transaction batch here, the simulator transaction ids). Encoded as one length-prefixed byte string (not a sequence of u8 values), so large
/// payloads encode and decode at memcpy speed.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Payload(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// A message type a core exchanges. Verified against the committee before it is fed to
/// the core (see `bulwark_crypto::Verified`).
pub trait WireMessage:
    Serialize
    + DeserializeOwned
    + Clone
    + fmt::Debug
    + Send
    + Verify<Context = Committee, Error: std::error::Error + Send + Sync + 'static>
    + 'static
{
    /// The largest encoded message a host should accept for this protocol.
    const MAX_ENCODED_BYTES: usize;

    /// The payload bytes this message carries (proposals, fetched blocks or entries).
    /// A host whose payloads name data held elsewhere (the node's batch digests) makes
    /// sure it holds that data before the core sees the message.
    fn payloads(&self) -> Vec<&[u8]>;
}

/// A record a core asks to be persisted, and that a restarted core is rebuilt from.
pub trait StoredRecord: Serialize + DeserializeOwned + Clone + fmt::Debug + Send + 'static {
    /// For records that are part of a hash-linked chain (blocks): their digest and
    /// their parent's, so a host can answer [`LoadRequest`]s by walking parents.
    fn chain_link(&self) -> Option<(Digest, Digest)>;

    /// The payload a chain record carries, so a host can leave out of a new proposal
    /// what the uncommitted ancestors already order.
    fn payload(&self) -> Option<&Payload>;

    /// The log height a chain record is about: once the log is executed past it, the
    /// record is no longer in flight.
    fn height(&self) -> Option<Height>;
}

/// A deterministic, sans-IO protocol core.
pub trait Protocol {
    type Message: WireMessage;
    type Record: StoredRecord;

    /// Steps the core. Never blocks, never panics on any input.
    fn handle(
        &mut self,
        now: Time,
        input: Input<Self::Message, Self::Record>,
    ) -> Actions<Self::Message, Self::Record>;

    /// When the core next wants [`Input::Timeout`]. The host may call earlier or later;
    /// the core checks the time it is given.
    fn next_deadline(&self) -> Option<Time>;

    /// This replica's id.
    fn id(&self) -> ReplicaId;
}

/// Everything that can happen to a core.
#[derive(Debug)]
pub enum Input<M, R> {
    /// The first input after construction (fresh or recovered from storage).
    Start,
    /// A message from an authenticated peer, already verified.
    Message { from: ReplicaId, msg: Verified<M> },
    /// The deadline from [`Protocol::next_deadline`] passed.
    Timeout,
    /// The payload asked for in [`Actions::want_payload`].
    Payload { round: Round, payload: Payload },
    /// The host executed the committed block at `height`; `state_digest` is the
    /// application's digest after it.
    Executed { height: Height, state_digest: Digest },
    /// The answer to a [`LoadRequest`]: stored records of the chain ending at
    /// `request.key`, newest first (possibly fewer than asked, possibly none).
    Loaded { request: LoadRequest, records: Vec<R> },
}

/// Where a message goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Recipient {
    One(ReplicaId),
    /// Every other replica.
    AllOthers,
}

#[derive(Clone, Debug)]
pub struct Outgoing<M> {
    pub to: Recipient,
    pub msg: M,
}

/// A block the protocol committed, in log order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedBlock {
    pub height: Height,
    pub round: Round,
    pub digest: Digest,
    pub proposer: ReplicaId,
    pub payload: Payload,
}

/// A request to read stored chain records: `key` and up to `max - 1` of its ancestors,
/// newest first, to answer `requester` (a lagging peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadRequest {
    pub requester: ReplicaId,
    pub key: Digest,
    pub max: u32,
}

/// Proof that a replica misbehaved: two conflicting statements it signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub offender: ReplicaId,
    pub round: Round,
    pub kind: EvidenceKind,
    /// The two signed messages, encoded with the codec, so anyone can check them.
    pub first: Vec<u8>,
    pub second: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvidenceKind {
    ConflictingProposals,
    ConflictingVotes,
}

/// Things worth a metric or a log line that need no action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    EnteredRound {
        round: Round,
        leader: ReplicaId,
        via_timeout: bool,
    },
    QuorumCertificate {
        round: Round,
    },
    TimeoutCertificate {
        round: Round,
    },
    /// Another replica's claimed state digest at `height` differs from ours (HotStuff:
    /// a block's proposer; PBFT: a checkpoint's signer).
    StateDigestMismatch {
        height: Height,
        ours: Digest,
        claimed: Digest,
        proposer: ReplicaId,
    },
    /// A verified message that the protocol still refused (wrong leader, stale, ...).
    Refused {
        from: ReplicaId,
        reason: &'static str,
    },
    /// Catch-up asked `peer` for blocks ending at `block`.
    SyncRequested {
        peer: ReplicaId,
        block: Digest,
    },
}

/// What the host must do, in this order, before it feeds the next input:
/// 1. persist everything in `persist`, durably (synced), in order;
/// 2. only then send `send` (a vote never leaves before its safety state is durable);
/// 3. hand `commit` to execution, in order, and report each with [`Input::Executed`];
/// 4. if `want_payload` is set, answer with [`Input::Payload`] for that round;
///    answer each of `load` with [`Input::Loaded`];
/// 5. record `evidence` and `events` (metrics, logs).
#[derive(Debug)]
pub struct Actions<M, R> {
    pub persist: Vec<R>,
    pub send: Vec<Outgoing<M>>,
    pub commit: Vec<CommittedBlock>,
    pub want_payload: Option<PayloadRequest>,
    pub load: Vec<LoadRequest>,
    pub evidence: Vec<Evidence>,
    pub events: Vec<Event>,
}

/// The core leads `round` and wants a payload for a block extending `parent`. The
/// host should leave out what `parent`'s uncommitted ancestors already carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadRequest {
    pub round: Round,
    pub parent: Digest,
}

impl<M, R> Default for Actions<M, R> {
    fn default() -> Self {
        Actions {
            persist: Vec::new(),
            send: Vec::new(),
            commit: Vec::new(),
            want_payload: None,
            load: Vec::new(),
            evidence: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl<M, R> Actions<M, R> {
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.send.is_empty()
            && self.commit.is_empty()
            && self.want_payload.is_none()
            && self.load.is_empty()
            && self.evidence.is_empty()
            && self.events.is_empty()
    }
}

/// Which protocol a committee runs. Chosen per committee (`protocol = "hotstuff"` or
/// `"pbft"` in its file); everything around the core is shared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolKind {
    #[default]
    HotStuff,
    Pbft,
}

impl ProtocolKind {
    pub const ALL: [ProtocolKind; 2] = [ProtocolKind::HotStuff, ProtocolKind::Pbft];

    pub fn name(self) -> &'static str {
        match self {
            ProtocolKind::HotStuff => "hotstuff",
            ProtocolKind::Pbft => "pbft",
        }
    }
}

impl fmt::Display for ProtocolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protocol name that is neither `hotstuff` nor `pbft`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?} (expected \"hotstuff\" or \"pbft\")")]
pub struct UnknownProtocol(pub String);

impl std::str::FromStr for ProtocolKind {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProtocolKind::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| UnknownProtocol(s.to_string()))
    }
}

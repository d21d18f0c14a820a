//! PBFT messages, certificates and records, and how each is verified.
//!
//! Views are [`Round`]s and sequence numbers are [`Height`]s: sequence number `n`
//! commits at log height `n`, null requests included (they commit an empty payload).

use std::collections::BTreeSet;

use bulwark_crypto::{
    Committee, CryptoError, Digest, Domain, KeyPair, QuorumSignatures, ReplicaId, Signature, Signed,
    SignedKind, Verify,
};
use serde::{Deserialize, Serialize};

use crate::protocol::{Height, Payload, Round, StoredRecord, WireMessage};

/// Largest payload a pre-prepare may carry (the same bound as a HotStuff block).
pub const MAX_PAYLOAD_BYTES: usize = crate::hotstuff::MAX_PAYLOAD_BYTES;
/// A checkpoint every this many sequence numbers.
pub const CHECKPOINT_INTERVAL: u64 = 16;
/// Sequence numbers above the low watermark that may be in the protocol at once
/// (the window `(h, h + WINDOW]`).
pub const WINDOW: u64 = 4 * CHECKPOINT_INTERVAL;
/// Most committed entries one state-transfer answer carries.
pub const MAX_FETCH_ENTRIES: usize = 64;
/// Payload bytes one state-transfer answer carries at most (beyond its first entry).
pub const MAX_FETCH_BYTES: usize = 4 << 20;

/// The primary of `view`: committee members in id order, one view each.
pub fn primary(committee: &Committee, view: Round) -> ReplicaId {
    let members = committee.members();
    // A committee is never empty (n ≥ 4 is validated).
    members[(view.0 % members.len() as u64) as usize].id
}

/// The digest a pre-prepare orders: the SHA-256 of the payload bytes.
pub fn batch_digest(payload: &Payload) -> Digest {
    Digest::of_parts(&[b"bulwark/pbft/batch", &payload.0])
}

/// The digest of the null request a new view puts in a gap.
pub fn null_digest() -> Digest {
    batch_digest(&Payload::default())
}

/// The committed log as a hash chain: each entry's digest covers its sequence number,
/// its batch and the previous entry's digest, so a checkpoint vouches for the whole
/// prefix.
pub fn log_digest(seq: Height, batch: &Digest, parent: &Digest) -> Digest {
    Digest::of_parts(&[b"bulwark/pbft/log", &seq.0.to_le_bytes(), batch.as_bytes(), parent.as_bytes()])
}

/// The log digest before the first entry.
pub fn genesis_log_digest(committee: &Committee) -> Digest {
    Digest::of_parts(&[b"bulwark/pbft/genesis", committee.chain_id().0.as_bytes()])
}

/// What pre-prepares, prepares and commits are about: batch `digest` at `seq` in `view`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Order {
    pub view: Round,
    pub seq: Height,
    pub digest: Digest,
}

/// The primary's signature on an order (domain `PrePrepare`): part of every prepared
/// certificate, so it travels without the payload.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedOrder {
    pub order: Order,
    pub signature: Signature,
}

impl SignedOrder {
    pub fn sign(order: Order, key: &KeyPair, committee: &Committee) -> SignedOrder {
        SignedOrder { order, signature: key.sign(Domain::PrePrepare, committee.chain_id(), &order) }
    }

    pub fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        let signer = primary(committee, self.order.view);
        let key = committee.public_key(signer).ok_or(CryptoError::UnknownSigner(signer))?;
        key.verify(Domain::PrePrepare, committee.chain_id(), &self.order, &self.signature)
            .map_err(VerifyError::PrePrepareSignature)
    }
}

/// A primary's pre-prepare: an order and the payload it names.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PrePrepare {
    pub order: SignedOrder,
    pub payload: Payload,
}

/// A prepare or a commit: one replica's signature on an order, under the domain of its
/// phase.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Vote {
    pub order: Order,
    pub signer: ReplicaId,
    pub signature: Signature,
}

/// The two voting phases.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Prepare,
    Commit,
}

impl Phase {
    pub fn domain(self) -> Domain {
        match self {
            Phase::Prepare => Domain::Prepare,
            Phase::Commit => Domain::Commit,
        }
    }
}

impl Vote {
    pub fn sign(phase: Phase, order: Order, signer: ReplicaId, key: &KeyPair, committee: &Committee) -> Vote {
        Vote { order, signer, signature: key.sign(phase.domain(), committee.chain_id(), &order) }
    }

    pub fn verify(&self, phase: Phase, committee: &Committee) -> Result<(), VerifyError> {
        let key = committee.public_key(self.signer).ok_or(CryptoError::UnknownSigner(self.signer))?;
        key.verify(phase.domain(), committee.chain_id(), &self.order, &self.signature)
            .map_err(VerifyError::VoteSignature)
    }
}

/// Proof that an order prepared: the primary's pre-prepare signature and 2f prepares
/// from distinct backups.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PreparedCert {
    pub pre_prepare: SignedOrder,
    pub prepares: QuorumSignatures,
}

impl PreparedCert {
    pub fn order(&self) -> Order {
        self.pre_prepare.order
    }

    pub fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        self.pre_prepare.verify(committee)?;
        let primary = primary(committee, self.order().view);
        if self.prepares.signers().any(|s| s == primary) {
            return Err(VerifyError::Malformed("the primary prepared its own order"));
        }
        self.prepares
            .verify(committee, Domain::Prepare, &self.order(), committee.quorum() - 1)
            .map_err(VerifyError::PreparedCert)
    }
}

/// Proof that an order committed: 2f+1 commits.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CommitCert {
    pub order: Order,
    pub commits: QuorumSignatures,
}

impl CommitCert {
    pub fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        self.commits
            .verify(committee, Domain::Commit, &self.order, committee.quorum())
            .map_err(VerifyError::CommitCert)
    }
}

/// What a checkpoint says: after sequence number `seq`, the log digest is `log` and
/// the application's state digest is `state`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct CheckpointData {
    pub seq: Height,
    pub log: Digest,
    pub state: Digest,
}

impl SignedKind for CheckpointData {
    const DOMAIN: Domain = Domain::Checkpoint;
}

/// A stable checkpoint: 2f+1 matching checkpoint signatures, or the genesis checkpoint.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CheckpointCert {
    pub data: CheckpointData,
    pub signatures: QuorumSignatures,
}

impl CheckpointCert {
    pub fn genesis(committee: &Committee) -> CheckpointCert {
        CheckpointCert {
            data: CheckpointData { seq: Height(0), log: genesis_log_digest(committee), state: Digest::ZERO },
            signatures: QuorumSignatures::default(),
        }
    }

    pub fn seq(&self) -> Height {
        self.data.seq
    }

    pub fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        if self.data.seq == Height(0) {
            return if *self == CheckpointCert::genesis(committee) {
                Ok(())
            } else {
                Err(VerifyError::Malformed("a sequence-0 checkpoint that is not genesis"))
            };
        }
        if !self.data.seq.0.is_multiple_of(CHECKPOINT_INTERVAL) {
            return Err(VerifyError::Malformed("checkpoint off the interval"));
        }
        self.signatures
            .verify(committee, Domain::Checkpoint, &self.data, committee.quorum())
            .map_err(VerifyError::CheckpointCert)
    }
}

/// A replica's view change to `view`: its last stable checkpoint and, for every
/// sequence number above it, the highest-view order it prepared.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ViewChangeData {
    pub view: Round,
    pub stable: CheckpointCert,
    pub prepared: Vec<PreparedCert>,
}

impl SignedKind for ViewChangeData {
    const DOMAIN: Domain = Domain::ViewChange;
}

fn verify_view_change(vc: &Signed<ViewChangeData>, committee: &Committee) -> Result<(), VerifyError> {
    vc.verify(committee).map_err(VerifyError::ViewChangeSignature)?;
    let data = &vc.value;
    data.stable.verify(committee)?;
    let low = data.stable.seq();
    let mut seqs = BTreeSet::new();
    for cert in &data.prepared {
        let order = cert.order();
        if order.seq <= low || order.seq.0 > low.0.saturating_add(WINDOW) {
            return Err(VerifyError::Malformed("prepared certificate outside the window"));
        }
        if order.view >= data.view {
            return Err(VerifyError::Malformed("prepared certificate not from an earlier view"));
        }
        if !seqs.insert(order.seq) {
            return Err(VerifyError::Malformed("two prepared certificates for one sequence number"));
        }
        cert.verify(committee)?;
    }
    Ok(())
}

/// What a new view starts with, computed from 2f+1 view changes: the highest stable
/// checkpoint among them, and for every sequence number above it up to the highest
/// prepared one, the order prepared in the highest view, or a null request.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewViewPlan {
    pub stable: CheckpointCert,
    /// (seq, digest) in sequence order, contiguous from `stable.seq() + 1`.
    pub orders: Vec<(Height, Digest)>,
}

/// Computes the plan of a new view from its view changes. Deterministic: the primary
/// builds its new-view message with it and every backup recomputes it to check.
pub fn plan_new_view(view_changes: &[Signed<ViewChangeData>]) -> Option<NewViewPlan> {
    let stable = view_changes.iter().map(|vc| &vc.value.stable).max_by_key(|s| s.seq())?.clone();
    let low = stable.seq();
    let mut best: std::collections::BTreeMap<Height, Order> = std::collections::BTreeMap::new();
    if !cfg!(feature = "unsafe-pbft-forget-prepared") {
        for cert in view_changes.iter().flat_map(|vc| &vc.value.prepared) {
            let order = cert.order();
            if order.seq <= low {
                continue;
            }
            match best.get(&order.seq) {
                Some(known) if known.view >= order.view => {}
                _ => {
                    best.insert(order.seq, order);
                }
            }
        }
    }
    let high = best.keys().next_back().copied().unwrap_or(low);
    let orders = (low.0 + 1..=high.0)
        .map(|s| {
            let seq = Height(s);
            (seq, best.get(&seq).map_or_else(null_digest, |o| o.digest))
        })
        .collect();
    Some(NewViewPlan { stable, orders })
}

/// The new primary's message: the view changes it collected and the orders of the
/// plan, each signed as a pre-prepare of the new view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewViewData {
    pub view: Round,
    pub view_changes: Vec<Signed<ViewChangeData>>,
    pub pre_prepares: Vec<SignedOrder>,
}

impl SignedKind for NewViewData {
    const DOMAIN: Domain = Domain::NewView;
}

fn verify_new_view(nv: &Signed<NewViewData>, committee: &Committee) -> Result<(), VerifyError> {
    let data = &nv.value;
    if nv.signer != primary(committee, data.view) {
        return Err(VerifyError::Malformed("new view not from the view's primary"));
    }
    nv.verify(committee).map_err(VerifyError::NewViewSignature)?;
    let mut senders = BTreeSet::new();
    for vc in &data.view_changes {
        if vc.value.view != data.view {
            return Err(VerifyError::Malformed("view change for another view"));
        }
        if !senders.insert(vc.signer) {
            return Err(VerifyError::Malformed("two view changes from one replica"));
        }
    }
    if senders.len() < committee.quorum() {
        return Err(VerifyError::Malformed("too few view changes"));
    }
    for vc in &data.view_changes {
        verify_view_change(vc, committee)?;
    }
    let plan = plan_new_view(&data.view_changes).ok_or(VerifyError::Malformed("no view changes"))?;
    if data.pre_prepares.len() != plan.orders.len() {
        return Err(VerifyError::NewViewMismatch);
    }
    for (signed, (seq, digest)) in data.pre_prepares.iter().zip(&plan.orders) {
        let order = signed.order;
        if order.view != data.view || order.seq != *seq || order.digest != *digest {
            return Err(VerifyError::NewViewMismatch);
        }
        signed.verify(committee)?;
    }
    Ok(())
}

/// A committed entry of the log, with the commits that prove it: state transfer needs
/// no trust in whoever sends it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CommittedEntry {
    pub cert: CommitCert,
    pub payload: Payload,
    /// The log digest before this entry (checked by the receiver, which knows it).
    pub parent: Digest,
}

impl CommittedEntry {
    pub fn seq(&self) -> Height {
        self.cert.order.seq
    }

    pub fn log_digest(&self) -> Digest {
        log_digest(self.seq(), &self.cert.order.digest, &self.parent)
    }

    fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        if self.payload.0.len() > MAX_PAYLOAD_BYTES {
            return Err(VerifyError::Malformed("payload too large"));
        }
        if batch_digest(&self.payload) != self.cert.order.digest {
            return Err(VerifyError::Malformed("payload does not match its digest"));
        }
        self.cert.verify(committee)
    }
}

/// Everything PBFT replicas send each other.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Message {
    PrePrepare(PrePrepare),
    Prepare(Vote),
    Commit(Vote),
    Checkpoint(Signed<CheckpointData>),
    ViewChange(Signed<ViewChangeData>),
    NewView(Signed<NewViewData>),
    /// Asks for the committed entries after `after` (state transfer).
    FetchLog {
        after: Height,
        max: u32,
    },
    /// Committed entries in sequence order, consecutive.
    LogEntries(Vec<CommittedEntry>),
    /// Asks for the payload of a batch digest this replica lacks.
    FetchPayload(Digest),
    PayloadReply(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Asks for the new-view message of `view` (or a later one).
    FetchView(Round),
}

impl Message {
    /// The view a message speaks about, if any.
    pub fn view(&self) -> Option<Round> {
        match self {
            Message::PrePrepare(p) => Some(p.order.order.view),
            Message::Prepare(v) | Message::Commit(v) => Some(v.order.view),
            Message::ViewChange(vc) => Some(vc.value.view),
            Message::NewView(nv) => Some(nv.value.view),
            _ => None,
        }
    }
}

/// Why a message failed verification.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("pre-prepare signature: {0}")]
    PrePrepareSignature(CryptoError),
    #[error("vote signature: {0}")]
    VoteSignature(CryptoError),
    #[error("prepared certificate: {0}")]
    PreparedCert(CryptoError),
    #[error("commit certificate: {0}")]
    CommitCert(CryptoError),
    #[error("checkpoint: {0}")]
    Checkpoint(CryptoError),
    #[error("checkpoint certificate: {0}")]
    CheckpointCert(CryptoError),
    #[error("view change signature: {0}")]
    ViewChangeSignature(CryptoError),
    #[error("new view signature: {0}")]
    NewViewSignature(CryptoError),
    #[error("new view's pre-prepares differ from what its view changes imply")]
    NewViewMismatch,
    #[error("unknown signer: {0}")]
    Signer(#[from] CryptoError),
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

impl Verify for Message {
    type Context = Committee;
    type Error = VerifyError;

    fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        match self {
            Message::PrePrepare(p) => {
                if p.payload.0.len() > MAX_PAYLOAD_BYTES {
                    return Err(VerifyError::Malformed("payload too large"));
                }
                if batch_digest(&p.payload) != p.order.order.digest {
                    return Err(VerifyError::Malformed("payload does not match its digest"));
                }
                if p.order.order.seq == Height(0) {
                    return Err(VerifyError::Malformed("sequence number 0"));
                }
                p.order.verify(committee)
            }
            Message::Prepare(v) => {
                if v.signer == primary(committee, v.order.view) {
                    return Err(VerifyError::Malformed("a prepare from the view's primary"));
                }
                v.verify(Phase::Prepare, committee)
            }
            Message::Commit(v) => v.verify(Phase::Commit, committee),
            Message::Checkpoint(c) => {
                if c.value.seq == Height(0) || !c.value.seq.0.is_multiple_of(CHECKPOINT_INTERVAL) {
                    return Err(VerifyError::Malformed("checkpoint off the interval"));
                }
                c.verify(committee).map_err(VerifyError::Checkpoint)
            }
            Message::ViewChange(vc) => verify_view_change(vc, committee),
            Message::NewView(nv) => verify_new_view(nv, committee),
            Message::FetchLog { max, .. } => {
                if *max == 0 || *max as usize > MAX_FETCH_ENTRIES {
                    return Err(VerifyError::Malformed("fetch size out of range"));
                }
                Ok(())
            }
            Message::LogEntries(entries) => {
                if entries.is_empty() || entries.len() > MAX_FETCH_ENTRIES {
                    return Err(VerifyError::Malformed("entry count out of range"));
                }
                let bytes: usize = entries.iter().skip(1).map(|e| e.payload.0.len()).sum();
                if bytes > MAX_FETCH_BYTES {
                    return Err(VerifyError::Malformed("entries too large"));
                }
                for pair in entries.windows(2) {
                    if pair[1].seq() != pair[0].seq().next() || pair[1].parent != pair[0].log_digest() {
                        return Err(VerifyError::Malformed("entries are not consecutive"));
                    }
                }
                entries.iter().try_for_each(|e| e.verify(committee))
            }
            Message::PayloadReply(bytes) => {
                if bytes.len() > MAX_PAYLOAD_BYTES {
                    return Err(VerifyError::Malformed("payload too large"));
                }
                Ok(())
            }
            Message::FetchPayload(_) | Message::FetchView(_) => Ok(()),
        }
    }
}

impl WireMessage for Message {
    // A state-transfer answer (its byte budget, one full entry beyond it, and room for
    // certificates); a new view with 2f+1 view changes of a full window stays below.
    const MAX_ENCODED_BYTES: usize = MAX_FETCH_BYTES + MAX_PAYLOAD_BYTES + MAX_FETCH_ENTRIES * 8192;

    fn payloads(&self) -> Vec<&[u8]> {
        match self {
            Message::PrePrepare(p) => vec![&p.payload.0],
            Message::LogEntries(entries) => entries.iter().map(|e| e.payload.0.as_slice()).collect(),
            Message::PayloadReply(bytes) => vec![bytes],
            Message::Prepare(_)
            | Message::Commit(_)
            | Message::Checkpoint(_)
            | Message::ViewChange(_)
            | Message::NewView(_)
            | Message::FetchLog { .. }
            | Message::FetchPayload(_)
            | Message::FetchView(_) => Vec::new(),
        }
    }
}

/// The state a restarted replica must not contradict.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SafetyState {
    /// The view this replica is in, or is changing to.
    pub view: Round,
    /// It sent a view change for `view` and has not yet accepted its new view: it
    /// takes no part in earlier views.
    pub changing: bool,
    pub stable: CheckpointCert,
    /// Per sequence number above the stable checkpoint, the order accepted in `view`
    /// (prepared-for as a backup, or assigned as the primary).
    pub accepted: Vec<SignedOrder>,
    /// Per sequence number above the stable checkpoint, the highest-view prepared
    /// certificate.
    pub prepared: Vec<PreparedCert>,
    /// As the primary of `view`: the next sequence number to assign.
    pub next_seq: Height,
}

/// A payload this replica accepted, kept until its sequence number is stable.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BatchRecord {
    pub order: Order,
    pub payload: Payload,
    /// The batch key of the previous sequence number as this replica knew it (or the
    /// log digest of the last committed entry), so a host can walk what is in flight.
    pub previous: Digest,
}

impl BatchRecord {
    /// The key of an accepted batch: its sequence number and digest, not its view, so
    /// a batch carried into a new view keeps its key.
    pub fn key(&self) -> Digest {
        batch_key(self.order.seq, &self.order.digest)
    }
}

pub fn batch_key(seq: Height, digest: &Digest) -> Digest {
    Digest::of_parts(&[b"bulwark/pbft/batch-key", &seq.0.to_le_bytes(), digest.as_bytes()])
}

/// What the PBFT core persists.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Record {
    Safety(SafetyState),
    Batch(BatchRecord),
    Committed(CommittedEntry),
}

impl StoredRecord for Record {
    fn chain_link(&self) -> Option<(Digest, Digest)> {
        match self {
            Record::Safety(_) => None,
            Record::Batch(b) => Some((b.key(), b.previous)),
            Record::Committed(e) => Some((e.log_digest(), e.parent)),
        }
    }

    fn payload(&self) -> Option<&Payload> {
        match self {
            Record::Safety(_) => None,
            Record::Batch(b) => Some(&b.payload),
            Record::Committed(e) => Some(&e.payload),
        }
    }

    fn height(&self) -> Option<Height> {
        match self {
            Record::Safety(_) => None,
            Record::Batch(b) => Some(b.order.seq),
            Record::Committed(e) => Some(e.seq()),
        }
    }
}

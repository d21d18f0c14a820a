//! HotStuff blocks, certificates and messages, and how each is verified.

use std::collections::BTreeSet;

use bulwark_crypto::{
    Committee, CryptoError, Digest, Domain, KeyPair, QuorumSignatures, ReplicaId, Signature, Signed,
    SignedKind, Verify, codec,
};
use serde::{Deserialize, Serialize};

use crate::protocol::{Height, Payload, Round, StoredRecord, WireMessage};

/// Largest payload a block may carry (the node carries batch digests, not bytes).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Most blocks one sync response may carry.
pub const MAX_SYNC_BLOCKS: usize = 64;

/// What a proposer claims about execution: the application's state digest after the
/// committed log up to `height`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct ExecutionClaim {
    pub height: Height,
    pub state_digest: Digest,
}

/// A HotStuff block. Its digest is the SHA-256 of its encoding.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Block {
    pub round: Round,
    pub height: Height,
    pub parent: Digest,
    /// Certifies `parent` (round `justify.vote.round`).
    pub justify: QuorumCert,
    pub author: ReplicaId,
    pub executed: ExecutionClaim,
    pub payload: Payload,
}

impl Block {
    /// The first block of every chain: round 0, height 0, committed by definition.
    pub fn genesis(committee: &Committee) -> Block {
        Block {
            round: Round(0),
            height: Height(0),
            parent: committee.chain_id().0,
            justify: QuorumCert { vote: VoteData::default(), signatures: QuorumSignatures::default() },
            author: ReplicaId(0),
            executed: ExecutionClaim::default(),
            payload: Payload::default(),
        }
    }

    pub fn digest(&self) -> Digest {
        // Encoding our own in-memory value cannot fail; see `signing_bytes`.
        Digest::of(&codec::encode(self).unwrap_or_default())
    }
}

/// What a vote is for. A quorum certificate is 2f+1 signatures over one `VoteData`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct VoteData {
    pub block: Digest,
    pub round: Round,
    pub height: Height,
}

impl SignedKind for VoteData {
    const DOMAIN: Domain = Domain::Vote;
}

/// A quorum certificate: a quorum of votes for one block.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct QuorumCert {
    pub vote: VoteData,
    pub signatures: QuorumSignatures,
}

impl QuorumCert {
    /// The certificate of the genesis block, which needs no signatures.
    pub fn genesis(committee: &Committee) -> QuorumCert {
        let genesis = Block::genesis(committee);
        QuorumCert {
            vote: VoteData { block: genesis.digest(), round: Round(0), height: Height(0) },
            signatures: QuorumSignatures::default(),
        }
    }

    pub fn round(&self) -> Round {
        self.vote.round
    }

    pub fn block(&self) -> Digest {
        self.vote.block
    }

    fn is_genesis(&self, committee: &Committee) -> bool {
        self.vote.round == Round(0) && *self == QuorumCert::genesis(committee)
    }

    /// A quorum of distinct committee members signed `vote` (or it is the genesis QC).
    pub fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        if self.vote.round == Round(0) {
            return if self.is_genesis(committee) { Ok(()) } else { Err(VerifyError::BadGenesisCertificate) };
        }
        self.signatures
            .verify(committee, Domain::Vote, &self.vote, committee.quorum())
            .map_err(VerifyError::QuorumCert)
    }
}

/// What a replica signs when it gives up on a round.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct TimeoutData {
    pub round: Round,
    /// The round of the highest QC the signer had; a TC carries these so the next
    /// leader's block must extend a QC at least as high (the 2-chain locking rule).
    pub high_qc_round: Round,
}

impl SignedKind for TimeoutData {
    const DOMAIN: Domain = Domain::Timeout;
}

/// A timeout certificate: a quorum of timeouts for one round. Signatures are grouped by
/// the high-QC round their signers reported, each group over one `TimeoutData`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TimeoutCert {
    pub round: Round,
    pub groups: Vec<(Round, QuorumSignatures)>,
}

impl TimeoutCert {
    /// The highest QC round any signer reported: a block justified by this TC must
    /// extend a QC of at least this round.
    pub fn max_high_qc_round(&self) -> Round {
        self.groups.iter().map(|(r, _)| *r).max().unwrap_or_default()
    }

    pub fn signer_count(&self) -> usize {
        self.groups.iter().map(|(_, s)| s.len()).sum()
    }

    pub fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        let mut signers = BTreeSet::new();
        let mut high_qc_rounds = BTreeSet::new();
        for (high_qc_round, signatures) in &self.groups {
            if *high_qc_round >= self.round || !high_qc_rounds.insert(*high_qc_round) {
                return Err(VerifyError::MalformedTimeoutCert);
            }
            for signer in signatures.signers() {
                if !signers.insert(signer) {
                    return Err(VerifyError::TimeoutCert(CryptoError::DuplicateSigner(signer)));
                }
            }
        }
        if signers.len() < committee.quorum() {
            return Err(VerifyError::TimeoutCert(CryptoError::InsufficientSigners {
                got: signers.len(),
                need: committee.quorum(),
            }));
        }
        for (high_qc_round, signatures) in &self.groups {
            let data = TimeoutData { round: self.round, high_qc_round: *high_qc_round };
            signatures.verify(committee, Domain::Timeout, &data, 1).map_err(VerifyError::TimeoutCert)?;
        }
        Ok(())
    }
}

/// The proposer's signature covers the block digest (one hash, no second encoding).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ProposalDigest(pub Digest);

impl SignedKind for ProposalDigest {
    const DOMAIN: Domain = Domain::Proposal;
}

/// A leader's proposal; `last_round_tc` justifies a round entered by timeout.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Proposal {
    pub block: Block,
    pub signature: Signature,
    pub last_round_tc: Option<TimeoutCert>,
}

impl Proposal {
    pub fn new(
        block: Block,
        key: &KeyPair,
        committee: &Committee,
        last_round_tc: Option<TimeoutCert>,
    ) -> Proposal {
        let signature = key.sign(Domain::Proposal, committee.chain_id(), &ProposalDigest(block.digest()));
        Proposal { block, signature, last_round_tc }
    }
}

/// A replica's timeout for a round, with what the next leader needs to go on.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TimeoutMsg {
    pub timeout: Signed<TimeoutData>,
    pub high_qc: QuorumCert,
    pub last_round_tc: Option<TimeoutCert>,
}

/// Asks a peer for `block` and up to `max_blocks - 1` of its ancestors.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SyncRequest {
    pub block: Digest,
    pub max_blocks: u32,
}

/// Blocks answering a [`SyncRequest`], newest first; each one's parent follows it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SyncResponse {
    pub blocks: Vec<Block>,
}

/// Everything HotStuff replicas send each other.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Message {
    Proposal(Proposal),
    Vote(Signed<VoteData>),
    Timeout(TimeoutMsg),
    SyncRequest(SyncRequest),
    SyncResponse(SyncResponse),
}

impl Message {
    /// The round a message speaks about, if any (for logs and Byzantine wrappers).
    pub fn round(&self) -> Option<Round> {
        match self {
            Message::Proposal(p) => Some(p.block.round),
            Message::Vote(v) => Some(v.value.round),
            Message::Timeout(t) => Some(t.timeout.value.round),
            Message::SyncRequest(_) | Message::SyncResponse(_) => None,
        }
    }
}

/// Why a message failed verification. Every variant is a reason to count.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("proposal signature: {0}")]
    ProposalSignature(CryptoError),
    #[error("vote signature: {0}")]
    VoteSignature(CryptoError),
    #[error("timeout signature: {0}")]
    TimeoutSignature(CryptoError),
    #[error("quorum certificate: {0}")]
    QuorumCert(CryptoError),
    #[error("timeout certificate: {0}")]
    TimeoutCert(CryptoError),
    #[error("timeout certificate groups are malformed")]
    MalformedTimeoutCert,
    #[error("a round-0 certificate that is not the genesis certificate")]
    BadGenesisCertificate,
    #[error("block is malformed: {0}")]
    MalformedBlock(&'static str),
    #[error("timeout claims high QC round {claimed} but carries {carried}")]
    TimeoutHighQcMismatch { claimed: Round, carried: Round },
    #[error("sync message is malformed: {0}")]
    MalformedSync(&'static str),
}

/// Checks that do not need signatures: shape and linkage of a block.
fn check_block_shape(block: &Block) -> Result<(), VerifyError> {
    if block.payload.0.len() > MAX_PAYLOAD_BYTES {
        return Err(VerifyError::MalformedBlock("payload too large"));
    }
    if block.round <= block.justify.round() {
        return Err(VerifyError::MalformedBlock("round not above its QC's round"));
    }
    if block.parent != block.justify.block() {
        return Err(VerifyError::MalformedBlock("parent is not the certified block"));
    }
    if block.height != block.justify.vote.height.next() {
        return Err(VerifyError::MalformedBlock("height is not its parent's plus one"));
    }
    if block.executed.height >= block.height {
        return Err(VerifyError::MalformedBlock("execution claim is not about an ancestor"));
    }
    Ok(())
}

impl Verify for Message {
    type Context = Committee;
    type Error = VerifyError;

    fn verify(&self, committee: &Committee) -> Result<(), VerifyError> {
        match self {
            Message::Proposal(p) => {
                check_block_shape(&p.block)?;
                let key = committee
                    .public_key(p.block.author)
                    .ok_or(VerifyError::ProposalSignature(CryptoError::UnknownSigner(p.block.author)))?;
                key.verify(
                    Domain::Proposal,
                    committee.chain_id(),
                    &ProposalDigest(p.block.digest()),
                    &p.signature,
                )
                .map_err(VerifyError::ProposalSignature)?;
                p.block.justify.verify(committee)?;
                if let Some(tc) = &p.last_round_tc {
                    tc.verify(committee)?;
                }
                Ok(())
            }
            Message::Vote(v) => v.verify(committee).map_err(VerifyError::VoteSignature),
            Message::Timeout(t) => {
                if t.timeout.value.high_qc_round != t.high_qc.round() {
                    return Err(VerifyError::TimeoutHighQcMismatch {
                        claimed: t.timeout.value.high_qc_round,
                        carried: t.high_qc.round(),
                    });
                }
                if t.high_qc.round() >= t.timeout.value.round {
                    return Err(VerifyError::MalformedBlock("timeout's high QC is not below its round"));
                }
                t.timeout.verify(committee).map_err(VerifyError::TimeoutSignature)?;
                t.high_qc.verify(committee)?;
                if let Some(tc) = &t.last_round_tc {
                    tc.verify(committee)?;
                }
                Ok(())
            }
            Message::SyncRequest(r) => {
                if r.max_blocks == 0 || r.max_blocks as usize > MAX_SYNC_BLOCKS {
                    return Err(VerifyError::MalformedSync("max_blocks out of range"));
                }
                Ok(())
            }
            Message::SyncResponse(r) => {
                if r.blocks.is_empty() || r.blocks.len() > MAX_SYNC_BLOCKS {
                    return Err(VerifyError::MalformedSync("block count out of range"));
                }
                for pair in r.blocks.windows(2) {
                    if pair[0].parent != pair[1].digest() {
                        return Err(VerifyError::MalformedSync("blocks are not a parent chain"));
                    }
                }
                for block in &r.blocks {
                    if block.height == Height(0) {
                        return Err(VerifyError::MalformedSync("genesis is never synced"));
                    }
                    check_block_shape(block)?;
                    block.justify.verify(committee)?;
                }
                Ok(())
            }
        }
    }
}

impl WireMessage for Message {
    // A sync response of 64 blocks of full payloads, with room for certificates.
    const MAX_ENCODED_BYTES: usize = MAX_SYNC_BLOCKS * (MAX_PAYLOAD_BYTES / 16) + (1 << 20);

    fn payloads(&self) -> Vec<&[u8]> {
        match self {
            Message::Proposal(p) => vec![&p.block.payload.0],
            Message::SyncResponse(r) => r.blocks.iter().map(|b| b.payload.0.as_slice()).collect(),
            Message::Vote(_) | Message::Timeout(_) | Message::SyncRequest(_) => Vec::new(),
        }
    }
}

/// The state that keeps a replica from contradicting itself across restarts
/// (DiemBFT v4 safety rules, plus the last round it proposed in).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SafetyState {
    /// Highest round this replica voted or timed out in.
    pub highest_vote_round: Round,
    /// Highest QC round among the blocks it voted for (its 2-chain lock).
    pub locked_round: Round,
    /// Highest round this replica proposed in; it never proposes twice in a round.
    pub last_proposed_round: Round,
    /// The highest QC and TC it knows, so a restart re-enters the right round with a
    /// certificate that justifies it.
    pub high_qc: QuorumCert,
    pub last_tc: Option<TimeoutCert>,
}

/// What the HotStuff core persists.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Record {
    Safety(SafetyState),
    Block(Block),
}

impl StoredRecord for Record {
    fn chain_link(&self) -> Option<(Digest, Digest)> {
        match self {
            Record::Block(b) => Some((b.digest(), b.parent)),
            Record::Safety(_) => None,
        }
    }

    fn payload(&self) -> Option<&Payload> {
        match self {
            Record::Block(b) => Some(&b.payload),
            Record::Safety(_) => None,
        }
    }

    fn height(&self) -> Option<Height> {
        match self {
            Record::Block(b) => Some(b.height),
            Record::Safety(_) => None,
        }
    }
}

//! Domain-separated signing: `Signed<T>` and `Verified<T>`.
//!
//! What is signed is `"bulwark/sig/v1\0" || domain tag || chain id || encode(value)`.
//! The domain tag says what kind of value it is (a vote, a timeout, ...), the chain id
//! which committee it is for, so a signature for one kind or one committee never
//! verifies as another.

use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::{ChainId, Committee, CryptoError, KeyPair, PublicKey, ReplicaId, Signature, codec};

const SIGNING_PREFIX: &[u8] = b"bulwark/sig/v1\0";

/// What kind of value a signature is for. Values are part of the signed bytes: never
/// renumber a variant, only add new ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[repr(u8)]
pub enum Domain {
    Proposal = 1,
    Vote = 2,
    Timeout = 3,
    SyncRequest = 4,
    SyncResponse = 5,
    ClientRequest = 6,
    ClientReply = 7,
    Batch = 8,
    PrePrepare = 9,
    Prepare = 10,
    Commit = 11,
    Checkpoint = 12,
    ViewChange = 13,
    NewView = 14,
    Transfer = 15,
    BatchAck = 16,
}

impl Domain {
    /// Every domain, for tests that check cross-domain separation.
    pub const ALL: [Domain; 16] = [
        Domain::Proposal,
        Domain::Vote,
        Domain::Timeout,
        Domain::SyncRequest,
        Domain::SyncResponse,
        Domain::ClientRequest,
        Domain::ClientReply,
        Domain::Batch,
        Domain::PrePrepare,
        Domain::Prepare,
        Domain::Commit,
        Domain::Checkpoint,
        Domain::ViewChange,
        Domain::NewView,
        Domain::Transfer,
        Domain::BatchAck,
    ];
}

/// A value that is signed under one fixed domain.
pub trait SignedKind: Serialize {
    const DOMAIN: Domain;
}

/// The exact bytes a signature of `value` under `domain` and `chain` covers.
pub fn signing_bytes<T: Serialize + ?Sized>(domain: Domain, chain: ChainId, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_PREFIX.len() + 33 + 64);
    out.extend_from_slice(SIGNING_PREFIX);
    out.push(domain as u8);
    out.extend_from_slice(chain.0.as_bytes());
    // Encoding a value of a derived `Serialize` type into a Vec cannot fail: bincode
    // only refuses sequences of unknown length, which serde's derive never produces.
    codec::encode_into(value, &mut out).expect("in-memory encoding of a derived type");
    out
}

impl KeyPair {
    /// Signs `value` under `domain` for the committee `chain`.
    pub fn sign<T: Serialize + ?Sized>(&self, domain: Domain, chain: ChainId, value: &T) -> Signature {
        self.sign_raw(&signing_bytes(domain, chain, value))
    }
}

impl PublicKey {
    /// Verifies a signature made by [`KeyPair::sign`] with the same domain and chain.
    pub fn verify<T: Serialize + ?Sized>(
        &self,
        domain: Domain,
        chain: ChainId,
        value: &T,
        signature: &Signature,
    ) -> Result<(), CryptoError> {
        self.verify_raw(&signing_bytes(domain, chain, value), signature)
    }
}

/// A value signed by a committee member. Unchecked: whatever arrives from the network
/// is a `Signed<T>` until [`Verified::check`] turns it into a `Verified<Signed<T>>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub value: T,
    pub signer: ReplicaId,
    pub signature: Signature,
}

impl<T: SignedKind> Signed<T> {
    /// Signs `value` as `signer`. A value we signed ourselves is verified by
    /// construction.
    pub fn sign(value: T, signer: ReplicaId, key: &KeyPair, chain: ChainId) -> Verified<Signed<T>> {
        let signature = key.sign(T::DOMAIN, chain, &value);
        Verified(Signed { value, signer, signature })
    }
}

/// Something whose authenticity can be checked against a context (usually the
/// committee). Implemented by `Signed<T>` and by protocol messages that carry several
/// signatures (a proposal with its quorum certificate).
pub trait Verify {
    type Context: ?Sized;
    type Error;
    fn verify(&self, context: &Self::Context) -> Result<(), Self::Error>;
}

impl<T: SignedKind> Verify for Signed<T> {
    type Context = Committee;
    type Error = CryptoError;

    fn verify(&self, committee: &Committee) -> Result<(), CryptoError> {
        let key = committee.public_key(self.signer).ok_or(CryptoError::UnknownSigner(self.signer))?;
        key.verify(T::DOMAIN, committee.chain_id(), &self.value, &self.signature)
    }
}

/// A value whose authenticity was checked. The only ways to build one are
/// [`Verified::check`] (which runs the value's [`Verify`] implementation) and signing it
/// ourselves ([`Signed::sign`]), so unchecked data cannot reach a protocol core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verified<T>(T);

impl<T: Verify> Verified<T> {
    /// Checks `value` and wraps it on success.
    pub fn check(value: T, context: &T::Context) -> Result<Verified<T>, T::Error> {
        value.verify(context)?;
        Ok(Verified(value))
    }
}

impl<T> Verified<T> {
    pub fn into_inner(self) -> T {
        self.0
    }

    /// Keeps the proof of verification while looking at a part of the value. The
    /// closure cannot build a `Verified` of anything it was not given.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Verified<U> {
        Verified(f(self.0))
    }
}

impl<T> Deref for Verified<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Committee;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct VoteLike {
        round: u64,
    }
    impl SignedKind for VoteLike {
        const DOMAIN: Domain = Domain::Vote;
    }

    #[test]
    fn signed_round_trip_through_the_codec() {
        let (committee, keys) = Committee::deterministic("a", 4, 7000).unwrap();
        let signed =
            Signed::sign(VoteLike { round: 3 }, ReplicaId(2), &keys[2], committee.chain_id()).into_inner();
        let bytes = codec::encode(&signed).unwrap();
        let back: Signed<VoteLike> = codec::decode(&bytes, 1024).unwrap();
        let verified = Verified::check(back, &committee).unwrap();
        assert_eq!(verified.value.round, 3);
    }

    #[test]
    fn a_signature_under_one_domain_fails_under_every_other() {
        let key = KeyPair::generate();
        let chain = ChainId::from_name("a");
        for signed_as in Domain::ALL {
            let sig = key.sign(signed_as, chain, &42u64);
            for checked_as in Domain::ALL {
                let result = key.public().verify(checked_as, chain, &42u64, &sig);
                assert_eq!(result.is_ok(), signed_as == checked_as, "{signed_as:?} vs {checked_as:?}");
            }
        }
    }

    #[test]
    fn a_signature_for_another_committee_fails() {
        let key = KeyPair::generate();
        let sig = key.sign(Domain::Vote, ChainId::from_name("a"), &1u64);
        assert_eq!(
            key.public().verify(Domain::Vote, ChainId::from_name("b"), &1u64, &sig),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn tampered_wrong_key_and_unknown_signer_each_fail() {
        let (committee, keys) = Committee::deterministic("a", 4, 7000).unwrap();
        let chain = committee.chain_id();
        let good = Signed::sign(VoteLike { round: 1 }, ReplicaId(0), &keys[0], chain).into_inner();

        let mut tampered = good.clone();
        tampered.value.round = 2;
        assert_eq!(Verified::check(tampered, &committee), Err(CryptoError::BadSignature));

        let mut wrong_key = good.clone();
        wrong_key.signer = ReplicaId(1);
        assert_eq!(Verified::check(wrong_key, &committee), Err(CryptoError::BadSignature));

        let mut unknown = good;
        unknown.signer = ReplicaId(9);
        assert_eq!(Verified::check(unknown, &committee), Err(CryptoError::UnknownSigner(ReplicaId(9))));
    }
}

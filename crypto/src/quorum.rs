//! Quorum certificate signature sets: many replicas' signatures over one message,
//! checked with ed25519 batch verification.

use serde::{Deserialize, Serialize};

use crate::{Committee, CryptoError, Domain, ReplicaId, Signature, signing_bytes};

/// (signer, signature) pairs over one message, kept sorted by signer.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QuorumSignatures {
    signatures: Vec<(ReplicaId, Signature)>,
}

impl QuorumSignatures {
    /// Collects signatures, sorting them by signer. Duplicates are kept so that
    /// [`QuorumSignatures::verify`] can refuse them; honest aggregators never add one.
    pub fn new(mut signatures: Vec<(ReplicaId, Signature)>) -> Self {
        signatures.sort_by_key(|(id, _)| *id);
        QuorumSignatures { signatures }
    }

    pub fn len(&self) -> usize {
        self.signatures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.signatures.is_empty()
    }

    pub fn signers(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.signatures.iter().map(|(id, _)| *id)
    }

    pub fn signatures(&self) -> &[(ReplicaId, Signature)] {
        &self.signatures
    }

    /// Checks that at least `required` distinct committee members signed `value` under
    /// `domain` for this committee. Structure is checked before any cryptography:
    /// a duplicate or unknown signer, or too few signers, is refused without verifying.
    /// On a failed batch, each signature is checked alone to name the culprit.
    pub fn verify<T: Serialize + ?Sized>(
        &self,
        committee: &Committee,
        domain: Domain,
        value: &T,
        required: usize,
    ) -> Result<(), CryptoError> {
        let mut keys = Vec::with_capacity(self.signatures.len());
        for (i, (signer, _)) in self.signatures.iter().enumerate() {
            if i > 0 && self.signatures[i - 1].0 == *signer {
                return Err(CryptoError::DuplicateSigner(*signer));
            }
            let key = committee.public_key(*signer).ok_or(CryptoError::UnknownSigner(*signer))?;
            keys.push(*key.inner());
        }
        if self.signatures.len() < required {
            return Err(CryptoError::InsufficientSigners { got: self.signatures.len(), need: required });
        }
        let message = signing_bytes(domain, committee.chain_id(), value);
        verify_batch(&message, &self.signatures, &keys)
    }
}

fn verify_batch(
    message: &[u8],
    signatures: &[(ReplicaId, Signature)],
    keys: &[ed25519_dalek::VerifyingKey],
) -> Result<(), CryptoError> {
    let messages: Vec<&[u8]> = vec![message; signatures.len()];
    let sigs: Vec<ed25519_dalek::Signature> = signatures.iter().map(|(_, s)| *s.inner()).collect();
    if ed25519_dalek::verify_batch(&messages, &sigs, keys).is_ok() {
        return Ok(());
    }
    for ((signer, sig), key) in signatures.iter().zip(keys) {
        if key.verify_strict(message, sig.inner()).is_err() {
            return Err(CryptoError::BadSignatureFrom(*signer));
        }
    }
    // Every signature verified alone but the batch failed: a crafted signature that
    // only strict single verification accepts is still refused.
    Err(CryptoError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Committee, KeyPair};

    fn sign_all(committee: &Committee, keys: &[KeyPair], who: &[u16], value: &u64) -> QuorumSignatures {
        QuorumSignatures::new(
            who.iter()
                .map(|&i| (ReplicaId(i), keys[i as usize].sign(Domain::Vote, committee.chain_id(), value)))
                .collect(),
        )
    }

    #[test]
    fn quorum_sets_for_four_and_seven() {
        for n in [4usize, 7] {
            let (c, keys) = Committee::deterministic("q", n, 7000).unwrap();
            let q = c.quorum();
            let ids: Vec<u16> = (0..n as u16).collect();
            let value = 77u64;

            // 2f+1 distinct valid signers verify; so does everyone.
            assert_eq!(sign_all(&c, &keys, &ids[..q], &value).verify(&c, Domain::Vote, &value, q), Ok(()));
            assert_eq!(sign_all(&c, &keys, &ids, &value).verify(&c, Domain::Vote, &value, q), Ok(()));

            // Only 2f signers.
            assert_eq!(
                sign_all(&c, &keys, &ids[..q - 1], &value).verify(&c, Domain::Vote, &value, q),
                Err(CryptoError::InsufficientSigners { got: q - 1, need: q })
            );

            // A duplicate signer padding the set to a quorum.
            let mut dup: Vec<u16> = ids[..q - 1].to_vec();
            dup.push(0);
            assert_eq!(
                sign_all(&c, &keys, &dup, &value).verify(&c, Domain::Vote, &value, q),
                Err(CryptoError::DuplicateSigner(ReplicaId(0)))
            );

            // An unknown signer.
            let mut set = sign_all(&c, &keys, &ids[..q - 1], &value).signatures().to_vec();
            set.push((ReplicaId(500), keys[0].sign(Domain::Vote, c.chain_id(), &value)));
            assert_eq!(
                QuorumSignatures::new(set).verify(&c, Domain::Vote, &value, q),
                Err(CryptoError::UnknownSigner(ReplicaId(500)))
            );

            // One bad signature in the batch: signed over another value.
            let mut set = sign_all(&c, &keys, &ids[..q], &value).signatures().to_vec();
            set[1].1 = keys[1].sign(Domain::Vote, c.chain_id(), &(value + 1));
            assert_eq!(
                QuorumSignatures::new(set).verify(&c, Domain::Vote, &value, q),
                Err(CryptoError::BadSignatureFrom(ReplicaId(1)))
            );

            // Right signers, wrong domain.
            assert_eq!(
                sign_all(&c, &keys, &ids[..q], &value).verify(&c, Domain::Timeout, &value, q),
                Err(CryptoError::BadSignatureFrom(ReplicaId(0)))
            );
        }
    }
}
